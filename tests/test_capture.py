"""Attention capture: exact maps on every layout, unchanged outputs, and state restored whatever happens."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import input_for, make_vit
from vitlens.capture import attention_capture
from vitlens.errors import ParameterError, VitlensError
from vitlens.layout import Preprocess
from vitlens.models.vit import ViT


def _wrap(model) -> ViT:
    size = tuple(model.patch_embed.img_size)
    return ViT(model, Preprocess(img_size=size))


def _reference_attention(block, x):
    """softmax(q k^T * scale) recomputed by hand from the block's qkv projection (with q/k norm)."""
    attn = block.attn
    b, n, _ = x.shape
    h = block.norm1(x)
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return torch.softmax((q @ k.transpose(-2, -1)) * attn.scale, dim=-1)  # [B, heads, N, N]


def test_maps_match_hand_computation_and_outputs_unchanged(tiny_vit):
    _, model = tiny_vit
    vit = _wrap(model)
    x = input_for(model)
    with torch.no_grad():
        expected_out = model(x)
        # inputs to each block, from an uncaptured run
        block_inputs = []
        hooks = [blk.register_forward_pre_hook(lambda m, a: block_inputs.append(a[0])) for blk in model.blocks]
        model(x)
        for hk in hooks:
            hk.remove()
        got: dict[int, torch.Tensor] = {}
        with attention_capture(vit, lambda i, a: got.__setitem__(i, a.clone())) as layers:
            out = model(x)
    assert layers == [0, 1]
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    n = vit.layout.num_tokens
    for i, blk in enumerate(model.blocks):
        assert got[i].shape == (2, 3, n, n)
        torch.testing.assert_close(got[i], _reference_attention(blk, block_inputs[i]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[i].sum(-1), torch.ones(2, 3, n), atol=1e-5, rtol=1e-5)


def test_flags_and_hooks_restored_after_success_and_error():
    model = make_vit("reg")
    vit = _wrap(model)
    for blk in model.blocks:
        blk.attn.fused_attn = True

    def boom(i, a):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"), attention_capture(vit, boom), torch.no_grad():
        model(input_for(model))
    for blk in model.blocks:
        assert blk.attn.fused_attn is True
        assert not blk.attn.attn_drop._forward_hooks
    seen = []
    with attention_capture(vit, lambda i, a: seen.append(i), layers=[-1]), torch.no_grad():
        model(input_for(model))
    assert seen == [1]
    assert all(blk.attn.fused_attn is True and not blk.attn.attn_drop._forward_hooks for blk in model.blocks)
    with torch.no_grad():
        model(input_for(model))
    assert seen == [1]  # nothing captured outside the block


def test_bad_layer_index():
    vit = _wrap(make_vit("cls"))
    with (
        pytest.raises(ParameterError, match="^layers: layer 5 is out of range") as info,
        attention_capture(vit, lambda i, a: None, layers=[5]),
    ):
        pass
    assert info.value.param == "layers"


def test_no_attention_module_raises():
    model = make_vit("cls")
    for blk in model.blocks:
        del blk.attn.fused_attn  # a module timm did not build: no explicit-attention switch
    vit = _wrap(model)
    with pytest.raises(VitlensError, match="no timm attention module"), attention_capture(vit, lambda i, a: None):
        pass


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_one_hook_manager_captures_attention_and_blocks_in_one_pass():
    model = make_vit("reg")
    vit = ViT(model, Preprocess(img_size=(32, 32)))
    x = input_for(model)
    attn, blocks = {}, {}
    with torch.no_grad():
        with vit.hooks(attention=lambda i, a: attn.__setitem__(i, a.clone()), blocks=blocks.__setitem__, layers=[-1]):
            out = vit.model.forward_features(x)
        reference = vit.model.forward_features(x)
        # Independent: the last block's output by running the blocks by hand (timm's forward_features minus norm).
        tokens = vit.model.norm_pre(vit.model._pos_embed(vit.model.patch_embed(x)))
        for block in vit.model.blocks:
            tokens = block(tokens)
    assert sorted(attn) == sorted(blocks) == [1]
    torch.testing.assert_close(blocks[1], tokens)
    torch.testing.assert_close(out, reference)  # capturing changes nothing
    assert attn[1].shape == (2, 3, 21, 21) and torch.allclose(attn[1].sum(-1), torch.ones(2, 3, 21))
    assert _hook_count(model) == 0


def test_fused_attention_switch_is_scoped_and_restored_after_an_error():
    model = make_vit("cls")
    vit = ViT(model, Preprocess(img_size=(32, 32)))
    before = [b.attn.fused_attn for b in model.blocks]
    with vit.fused_attention(not before[0]):
        assert all(b.attn.fused_attn is (not before[0]) for b in model.blocks)
    assert [b.attn.fused_attn for b in model.blocks] == before
    with pytest.raises(RuntimeError), vit.hooks(attention=lambda i, a: None, blocks=lambda i, t: None):
        raise RuntimeError("forward failed")
    assert [b.attn.fused_attn for b in model.blocks] == before and _hook_count(model) == 0


@pytest.mark.parametrize("outer_grad", [True, False])
def test_graph_from_records_the_graph_from_one_block_on(outer_grad):
    """explain last-layer's graph: the blocks before the chosen one keep no graph, the chosen one's input is the
    leaf, the gradient there equals the gradient of a full-graph forward; the grad mode and hooks are restored."""
    from vitlens.capture import graph_from

    vit = _wrap(make_vit("reg"))
    last = vit.depth - 1
    x = input_for(vit.model)
    flags: dict[int, bool] = {}
    seen: list[torch.Tensor] = []
    with torch.set_grad_enabled(outer_grad):
        with graph_from(vit, -1), vit.hooks(blocks=lambda i, t: flags.__setitem__(i, t.requires_grad)):
            mine = vit.blocks()[last].register_forward_pre_hook(lambda m, a: seen.append(a[0]))  # after graph_from's
            (grad,) = torch.autograd.grad(vit.model(x).sum(), seen[-1])
        assert torch.is_grad_enabled() is outer_grad
    assert flags == {i: i == last for i in range(vit.depth)}
    assert seen[-1].is_leaf
    assert all(len(block._forward_pre_hooks) == (i == last) for i, block in enumerate(vit.blocks()))  # mine only
    # the gradient at the last block's input of a forward that records everything
    seen.clear()
    with torch.enable_grad():
        (want,) = torch.autograd.grad(vit.model(x.clone().requires_grad_()).sum(), seen[-1])
    mine.remove()
    assert not seen[-1].is_leaf
    torch.testing.assert_close(grad, want)
