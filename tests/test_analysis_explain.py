"""Relevance maps against their formulas written out plainly: attention and its gradient captured with timm's own
explicit forward (``fused_attn=False``, ``retain_grad``) and ``backward``, each method recomputed per image in
float64 numpy loops, on every fixture layout; batches equal single images; a hand-built model whose class score
reads one known patch is explained by that patch first; parameters, flags and hooks are left as they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import VIT_FIXTURES, input_for, make_vit
from vitlens.analysis.explain import ExplainAccumulator, check_method, relevance_maps
from vitlens.analysis.rollout import attention_rollout
from vitlens.attention import default_target
from vitlens.definitions.explain import explain_batch
from vitlens.errors import ParameterError, VitlensError
from vitlens.layout import Preprocess
from vitlens.models.vit import ViT

GRADIENT = ("grad-rollout", "attribution", "last-layer")


def wrap(model: nn.Module) -> ViT:
    return ViT(model, Preprocess(img_size=tuple(model.patch_embed.img_size)))


def plain_attention_and_gradients(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None):
    """timm's explicit path, our own hooks: per layer the post-softmax attention and d(sum_b logit_b[class_b])/dA,
    as float64 numpy ``[B, heads, N, N]``; also the classes (predicted when None) and their logits."""
    attns: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        attns.append(output)

    handles = []
    for block in model.blocks:
        block.attn.fused_attn = False
        handles.append(block.attn.attn_drop.register_forward_hook(keep))
    try:
        logits = model(x)
        classes = logits.argmax(-1) if classes is None else classes
        chosen = logits[torch.arange(len(x)), classes]
        chosen.sum().backward()
    finally:
        for handle in handles:
            handle.remove()
        for block in model.blocks:
            block.attn.fused_attn = True
    a = [t.detach().double().numpy() for t in attns]
    g = [t.grad.double().numpy() for t in attns]
    return a, g, classes, chosen.detach()


def rows_by_hand(matrix: np.ndarray, layout, target: str) -> np.ndarray:
    """Target row of an [N, N] matrix over the patch columns (mean of patch rows for mean-patch)."""
    p = list(range(layout.num_prefix_tokens, layout.num_tokens))
    if target == "mean-patch":
        return matrix[np.ix_(p, p)].mean(axis=0)
    t = {"cls": 0, "dist": layout.prefix_kinds.index("dist") if "dist" in layout.prefix_kinds else -1}[target]
    return matrix[t, p]


def maps_by_hand(a, g, layout, method: str, target: str, discard_ratio: float = 0.0) -> np.ndarray:
    """Each method per image, from the papers' formulas, with loops."""
    out = []
    n = a[0].shape[-1]
    prefix = layout.num_prefix_tokens
    for b in range(a[0].shape[0]):
        if method == "attribution":  # Chefer et al. 2021, Eq. 5-6
            r = np.eye(n)
            for al, gl in zip(a, g, strict=True):
                cam = np.maximum(al[b] * gl[b], 0).mean(axis=0)
                r = r + cam @ r
        elif method == "last-layer":
            r = np.maximum(a[-1][b] * g[-1][b], 0).mean(axis=0)
        else:  # vit-explain grad_rollout (or plain rollout), discard in the patch block, rows by their own sums
            r = np.eye(n)
            for al, gl in zip(a, g, strict=True):
                fused = al[b].mean(axis=0) if method == "rollout" else np.maximum((al[b] * gl[b]).mean(axis=0), 0)
                k = int(discard_ratio * (n - prefix) ** 2)
                if k:
                    block = fused[prefix:, prefix:].copy().ravel()
                    block[np.argsort(block, kind="stable")[:k]] = 0
                    fused[prefix:, prefix:] = block.reshape(n - prefix, n - prefix)
                m = fused + np.eye(n)
                m = m / m.sum(axis=1, keepdims=True)
                r = m @ r
        row = rows_by_hand(r, layout, target)
        out.append(row / row.max() if row.max() > 0 else row)
    h, w = layout.grid_size
    return np.stack(out).reshape(-1, h, w)


@pytest.mark.parametrize("method", ["rollout", *GRADIENT])
def test_every_method_is_its_formula_on_every_layout(tiny_vit, method):
    name, model = tiny_vit
    x = input_for(model, batch=3)
    a, g, classes, chosen = plain_attention_and_gradients(model, x)
    vit = wrap(model)
    target = default_target(vit.layout)
    expected = maps_by_hand(a, g, vit.layout, method, target)

    maps, got_classes, scores = explain_batch(vit, x, method=method, target=target)
    np.testing.assert_allclose(maps, expected, atol=2e-5)
    assert torch.equal(got_classes, classes)
    torch.testing.assert_close(scores, chosen)
    assert maps.shape == (3, *vit.layout.grid_size) and np.isclose(maps.max(axis=(1, 2)), 1.0).all()

    # the pure function on the same tensors says the same
    tensors = [torch.tensor(t) for t in a], [torch.tensor(t) for t in g]
    np.testing.assert_allclose(relevance_maps(*tensors, vit.layout, method=method, target=target), expected, atol=1e-10)
    if name == "distilled":  # the distillation token can be the target
        got = explain_batch(vit, x, method=method, target="dist")[0]
        np.testing.assert_allclose(got, maps_by_hand(a, g, vit.layout, method, "dist"), atol=2e-5)


@pytest.mark.parametrize("method", ["rollout", "grad-rollout"])
def test_discard_ratio_is_the_rollout_rule(method):
    model = make_vit("reg")
    with torch.no_grad():  # a random net's A * dA is ~1e-6 beside the identity: scale the score so thinning shows
        model.head.weight.mul_(1e5)
    x = input_for(model, batch=2)
    a, g, _, _ = plain_attention_and_gradients(model, x)
    vit = wrap(model)
    # The patch rows carry the thinned block (the cls row's own weights are never discarded): read them.
    expected = maps_by_hand(a, g, vit.layout, method, "mean-patch", discard_ratio=0.5)
    got = explain_batch(vit, x, method=method, target="mean-patch", discard_ratio=0.5)[0]
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert not np.allclose(got, explain_batch(vit, x, method=method, target="mean-patch")[0], atol=1e-3)


def test_rollout_is_the_existing_rollout():
    model = make_vit("reg")
    x = input_for(model, batch=2)
    a, _, _, _ = plain_attention_and_gradients(model, x)
    vit = wrap(model)
    expected = attention_rollout([torch.tensor(t) for t in a], vit.layout, discard_ratio=0.3).maps
    np.testing.assert_allclose(
        explain_batch(vit, x, method="rollout", target="cls", discard_ratio=0.3)[0], expected, atol=1e-6
    )


@pytest.mark.parametrize("method", ["rollout", *GRADIENT])
def test_a_batch_equals_its_images_one_by_one(method):
    model = make_vit("cls")
    vit = wrap(model)
    x = input_for(model, batch=4)
    maps, classes, scores = explain_batch(vit, x, method=method, target="cls", class_=2)
    for b in range(4):
        one, c, s = explain_batch(vit, x[b : b + 1], method=method, target="cls", class_=2)
        np.testing.assert_allclose(one[0], maps[b], atol=1e-6)
        assert int(c) == int(classes[b]) == 2 and torch.allclose(s, scores[b : b + 1], atol=1e-6)


def one_patch_model(patch: int) -> nn.Module:
    """A cls ViT whose class-0 logit reads input patch ``patch`` only.

    Layer 1 (the last): norms removed, value and output projections the identity, head 0's query a constant
    ``alpha * e_0`` and its key the identity, so the class token's logits are ``alpha * scale * x_j[0]``; the position
    embedding puts +10 in dimension 0 of patch ``patch`` only, so the class token attends to it alone (softmax
    margin ~20). The MLPs add nothing and layer 0 passes its input through. The head reads dimension 0 of the class
    token: logit_0 ≈ 10 + (patch embedding of that patch)[0], and dA/dlogit on that patch is ≈ 10 > 0.
    """
    torch.manual_seed(0)
    d = 48
    model = VIT_FIXTURES["cls"][0](**dict(VIT_FIXTURES["cls"][1], num_classes=3)).eval()
    eye = torch.eye(d)
    with torch.no_grad():
        model.pos_embed.normal_(0, 0.5)
        model.pos_embed[0, :, 0] = 0.0
        model.pos_embed[0, 1 + patch, 0] = 10.0
        model.cls_token.zero_()
        model.norm = nn.Identity()
        for i, block in enumerate(model.blocks):
            block.norm1 = nn.Identity()
            block.mlp.fc2.weight.zero_()
            block.mlp.fc2.bias.zero_()
            qkv, proj = block.attn.qkv, block.attn.proj
            qkv.weight.zero_()
            qkv.bias.zero_()
            proj.weight.copy_(eye if i == len(model.blocks) - 1 else torch.zeros(d, d))
            proj.bias.zero_()
            if i == len(model.blocks) - 1:
                qkv.bias[0] = 10.0  # head 0's query: alpha * e_0
                qkv.weight[d : 2 * d] = eye  # keys: the tokens themselves
                qkv.weight[2 * d :] = eye  # values: the tokens themselves
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.weight[0, 0] = 1.0
    return model


@pytest.mark.parametrize("patch", [5, 10])
@pytest.mark.parametrize("method", GRADIENT)
def test_a_score_that_reads_one_patch_is_explained_by_it(method, patch):
    model = one_patch_model(patch)
    vit = wrap(model)
    x = input_for(model, batch=2)
    # independent check of the construction: the class-0 logit moves with that patch's pixels and no other's
    xg = x.clone().requires_grad_(True)
    model(xg)[:, 0].sum().backward()
    per_patch = xg.grad.abs().unfold(2, 8, 8).unfold(3, 8, 8).sum(dim=(1, 4, 5)).flatten(1)  # [B, HW]
    assert (per_patch.argmax(-1) == patch).all() and (
        per_patch[:, patch] > 1e4 * (per_patch.sum(-1) - per_patch[:, patch])
    ).all()

    maps, classes, _ = explain_batch(vit, x, method=method, target="cls")
    assert (classes == 0).all()  # predicted: the only class with a non-zero weight
    flat = maps.reshape(2, -1)
    assert (flat.argmax(-1) == patch).all(), flat
    others = np.delete(flat, patch, axis=1)
    assert (others < 1e-3).all()  # the rest is (nearly) nothing


def test_plain_rollout_does_not_find_the_patch_the_gradient_methods_find():
    """Rollout is class-agnostic: on the hand-built model its class row is spread by the uniform heads 1 and 2."""
    model = one_patch_model(5)
    maps = explain_batch(wrap(model), input_for(model, batch=1), method="rollout", target="cls")[0]
    assert np.delete(maps.reshape(-1), 5).max() > 0.05


def test_state_is_restored_and_no_parameter_gets_a_gradient():
    model = make_vit("reg")
    model.blocks[0].norm1.weight.requires_grad_(False)  # a mixed state must come back as it was
    flags_before = [p.requires_grad for p in model.parameters()]
    vit = wrap(model)
    fused_before = [b.attn.fused_attn for b in model.blocks]
    x = input_for(model)
    explain_batch(vit, x, method="attribution", target="cls")
    assert [p.requires_grad for p in model.parameters()] == flags_before
    assert all(p.grad is None for p in model.parameters())
    assert [b.attn.fused_attn for b in model.blocks] == fused_before
    assert all(not b.attn.attn_drop._forward_hooks for b in model.blocks)
    assert not torch.is_grad_enabled() or True  # grad mode is the caller's (pytest runs with it on)
    with pytest.raises(ParameterError):
        explain_batch(vit, x, method="attribution", target="cls", class_=99)
    assert [p.requires_grad for p in model.parameters()] == flags_before  # restored after an error too
    assert [b.attn.fused_attn for b in model.blocks] == fused_before


def test_last_layer_uses_fused_attention_elsewhere():
    model = make_vit("cls")
    vit = wrap(model)
    seen = []
    for i, block in enumerate(model.blocks):
        block.attn.register_forward_pre_hook(lambda mod, _args, i=i: seen.append((i, mod.fused_attn)))
    explain_batch(vit, input_for(model), method="last-layer", target="cls")
    assert seen == [(0, True), (1, False)]


def test_class_selection_by_index_and_pred():
    model = make_vit("cls")
    vit = wrap(model)
    x = input_for(model, batch=3)
    logits = model(x).detach()
    _, classes, scores = explain_batch(vit, x, method="last-layer", target="cls")
    assert torch.equal(classes, logits.argmax(-1)) and torch.allclose(scores, logits.max(-1).values)
    _, classes, scores = explain_batch(vit, x, method="last-layer", target="cls", class_=4)
    assert (classes == 4).all() and torch.allclose(scores, logits[:, 4])
    vit.class_names = ["a", "b", "c", "d", "e"]
    _, classes, _ = explain_batch(vit, x, method="last-layer", target="cls", class_="d")
    assert (classes == 3).all()
    with pytest.raises(ParameterError, match="not one of the model's classes") as info:
        explain_batch(vit, x, method="last-layer", target="cls", class_="zebra")
    assert info.value.param == "class_"


@pytest.mark.parametrize(
    ("method", "discard", "needle"),
    [
        ("lrp", 0.0, "method must be one of rollout, grad-rollout, attribution, last-layer, not 'lrp'"),
        ("attribution", 0.5, "discard_ratio applies to rollout and grad-rollout, not attribution"),
        ("grad-rollout", 1.0, r"discard_ratio must be in \[0, 1\), not 1.0"),
    ],
)
def test_bad_methods_and_ratios(method, discard, needle):
    with pytest.raises(ParameterError, match=needle):
        check_method(method, discard)


def test_accumulator_needs_gradients_and_depth_order():
    model = make_vit("cls")
    vit = wrap(model)
    acc = ExplainAccumulator(vit.layout, method="attribution")
    attn = torch.full((1, 3, vit.layout.num_tokens, vit.layout.num_tokens), 1 / vit.layout.num_tokens)
    with pytest.raises(VitlensError, match="needs the attention's gradient"):
        acc.update(0, attn, None)
    acc.update(1, attn, attn)
    with pytest.raises(VitlensError, match="depth order"):
        acc.update(0, attn, attn)
