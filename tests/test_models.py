"""Loading: every file kind round-trips, every layout is inferred, and wrong options fail cleanly.

Broken, hostile and mismatching checkpoint files are test_reliability_checkpoints.py's.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import VIT_FIXTURES, input_for, make_vit, native_kwargs, save_fixture
from vitlens.errors import ParameterError, UsageError, VitlensError
from vitlens.models import load_vit
from vitlens.models.checkpoint import save_checkpoint


def _same_outputs(model, vit) -> bool:
    x = input_for(model)
    with torch.no_grad():
        return torch.allclose(model(x), vit.model(x), atol=1e-5)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".ckpt", ".safetensors"])
def test_round_trip_every_file_kind(tmp_path, tiny_vit, suffix):
    name, model = tiny_vit
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    vit = load_vit(path, **native_kwargs(name))
    assert _same_outputs(model, vit)
    assert vit.layout.grid_size == tuple(model.patch_embed.grid_size)
    assert vit.layout.num_prefix_tokens == model.num_prefix_tokens
    assert vit.layout.pos_embed_includes_prefix == (not model.no_embed_class)
    assert vit.num_heads == 3 and vit.depth == 2 and vit.embed_dim == 48
    assert vit.guessed.get("num_heads") is None  # given explicitly
    assert vit.identity.startswith("sha256:")


@pytest.mark.parametrize(
    ("container", "prefix"),
    [("state_dict", "module."), ("model", ""), ("model_ema", "model."), ("teacher", "backbone.")],
)
def test_containers_and_prefixes(tmp_path, container, prefix):
    model = make_vit("cls")
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    if prefix == "backbone.":  # DINO: a projection head beside the backbone is ignored
        sd["head.mlp.0.weight"] = torch.zeros(7, 48)
    path = tmp_path / "ckpt.pth"
    torch.save({container: sd, "epoch": 3, "optimizer": {"lr": 0.1}}, path)
    vit = load_vit(path, num_heads=3, device="cpu")
    assert _same_outputs(model, vit)


def test_heads_guessed_from_width_table(tmp_path):
    model = make_vit("cls")
    # width 48 is not in the table: falls back to 64-wide heads -> error; width 192 -> 3 heads guessed
    from timm.models.vision_transformer import VisionTransformer

    wide = VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=1, num_heads=3, num_classes=0)
    torch.save(wide.state_dict(), tmp_path / "w.pth")
    vit = load_vit(tmp_path / "w.pth", device="cpu")
    assert vit.num_heads == 3 and "num_heads" in vit.guessed
    torch.save(model.state_dict(), tmp_path / "n.pth")
    with pytest.raises(VitlensError, match="--num-heads"):
        load_vit(tmp_path / "n.pth", device="cpu")


def test_arch_option(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    small = VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=2, num_heads=3, num_classes=4)
    torch.save(small.state_dict(), tmp_path / "s.pth")
    opts = dict(model_kwargs={"depth": 2}, img_size=32, device="cpu")
    vit = load_vit(tmp_path / "s.pth", arch="vit_tiny_patch16_224", **opts)
    assert vit.layout.grid_size == (2, 2) and vit.num_classes == 4


def test_mlp_head_dropped_with_warning(tmp_path, caplog):
    model = make_vit("cls")
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    sd["head.0.weight"] = torch.zeros(16, 48)
    sd["head.2.weight"] = torch.zeros(5, 16)
    torch.save(sd, tmp_path / "m.pth")
    with caplog.at_level(logging.WARNING, logger="vitlens"):
        vit = load_vit(tmp_path / "m.pth", num_heads=3, device="cpu")
    assert vit.num_classes == 0
    assert "not one linear layer" in caplog.text


def test_unknown_key_is_an_error(tmp_path):
    sd = make_vit("cls").state_dict()
    sd["blocks.0.attn.extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "x.pth")
    with pytest.raises(VitlensError, match=r"unexpected 1 keys \(blocks.0.attn.extra.weight\)"):
        load_vit(tmp_path / "x.pth", num_heads=3, device="cpu")


def test_img_size_resamples_pos_embed(tmp_path):
    model = make_vit("cls")
    torch.save(model.state_dict(), tmp_path / "c.pth")
    vit = load_vit(tmp_path / "c.pth", num_heads=3, img_size="48,64", device="cpu")
    assert vit.layout.grid_size == (6, 8)
    assert vit.preprocess.img_size == (48, 64)
    assert vit.model.pos_embed.shape[1] == 1 + 48
    with torch.no_grad():
        assert vit.model(torch.randn(1, 3, 48, 64)).shape == (1, 5)
    with pytest.raises(ParameterError, match="^img_size 30,30 is not divisible") as info:
        load_vit(tmp_path / "c.pth", num_heads=3, img_size=30, device="cpu")
    assert info.value.param == "img_size"


def _write_google_npz(model, path):
    """Export a timm ViT in the original Google ViT .npz layout (the inverse of timm's `_load_weights`)."""
    d = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    hd = d // heads
    w = {
        "embedding/kernel": model.patch_embed.proj.weight.permute(2, 3, 1, 0),
        "embedding/bias": model.patch_embed.proj.bias,
        "cls": model.cls_token,
        "Transformer/posembed_input/pos_embedding": model.pos_embed,
        "Transformer/encoder_norm/scale": model.norm.weight,
        "Transformer/encoder_norm/bias": model.norm.bias,
        "head/kernel": model.head.weight.T,
        "head/bias": model.head.bias,
    }
    for i, blk in enumerate(model.blocks):
        p = f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        qw, kw, vw = blk.attn.qkv.weight.chunk(3)
        qb, kb, vb = blk.attn.qkv.bias.chunk(3)
        for n, wt, b in (("query", qw, qb), ("key", kw, kb), ("value", vw, vb)):
            w[f"{mha}{n}/kernel"] = wt.T.reshape(d, heads, hd)
            w[f"{mha}{n}/bias"] = b.reshape(heads, hd)
        w[f"{mha}out/kernel"] = blk.attn.proj.weight.reshape(d, heads, hd).permute(1, 2, 0)
        w[f"{mha}out/bias"] = blk.attn.proj.bias
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = blk.norm1.weight, blk.norm1.bias
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = blk.norm2.weight, blk.norm2.bias
        for r, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
            w[f"{p}MlpBlock_3/Dense_{r}/kernel"] = fc.weight.T
            w[f"{p}MlpBlock_3/Dense_{r}/bias"] = fc.bias
    np.savez(path, **{k: v.detach().numpy() for k, v in w.items()})


def test_google_npz_round_trip(tmp_path):
    model = make_vit("cls")
    _write_google_npz(model, tmp_path / "vit.npz")
    vit = load_vit(tmp_path / "vit.npz", device="cpu")
    assert vit.num_heads == 3  # read from the query kernel's shape, not guessed
    assert _same_outputs(model, vit)


def test_vitlens_checkpoint_rebuilds_from_metadata(tmp_path):
    model = make_vit("reg")
    _, kwargs = VIT_FIXTURES["reg"]
    meta = {
        "arch": "vit_inferred",
        "model_kwargs": kwargs,
        "preprocess": {"mean": [0.1, 0.2, 0.3], "std": [0.3, 0.2, 0.1]},
        "class_names": list("abcde"),
    }
    save_checkpoint(tmp_path / "v.safetensors", model.state_dict(), meta)
    vit = load_vit(tmp_path / "v.safetensors", device="cpu")  # no --num-heads needed: metadata has it
    assert _same_outputs(model, vit)
    assert vit.class_names == list("abcde") and vit.preprocess.mean == (0.1, 0.2, 0.3)
    assert not vit.guessed


def test_timm_name_random_init_and_unknown_name():
    vit = load_vit("vit_tiny_patch16_224", pretrained=False, img_size=64, device="cpu")
    assert vit.layout.grid_size == (4, 4) and vit.num_heads == 3
    assert vit.identity.endswith("random-init")
    with pytest.raises(VitlensError, match="not a file and not a timm model name"):
        load_vit("no_such_model_xyz", device="cpu")


def test_device_errors():
    with pytest.raises(UsageError, match="unknown device"):
        load_vit("demo", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(VitlensError, match="CUDA is not available"):
            load_vit("demo", device="cuda")


def test_hybrid_stem_layout_is_in_pixels():
    vit = load_vit("vit_tiny_r_s16_p8_224", pretrained=False, device="cpu")
    assert vit.layout.img_size == (224, 224) and vit.in_chans == 3
    assert vit.layout.patch_size == (224 // vit.layout.grid_size[0], 224 // vit.layout.grid_size[1])
    assert not vit.has_linear_patch_embed
    with pytest.raises(VitlensError, match="not one linear projection"):
        vit.patch_projection()


def test_atomic_outputs_get_normal_permissions(tmp_path):
    import os

    from vitlens.io import write_text

    umask = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_offline_pretrained_uses_the_cache_only_and_fails_in_one_line(monkeypatch):
    import timm
    from huggingface_hub import constants

    import vitlens.models.load as load_mod

    monkeypatch.setattr(load_mod, "_host_resolves", lambda host, timeout=3.0: False)
    seen = []
    real_create = timm.create_model

    def spy(*args, **kwargs):
        seen.append(constants.HF_HUB_OFFLINE)  # no minute of download retries: the hub client is offline
        return real_create(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    before = constants.HF_HUB_OFFLINE
    with pytest.raises(VitlensError, match="could not fetch pretrained weights .*--no-pretrained"):
        load_vit("vit_tiny_patch16_224.augreg_in21k", device="cpu")
    assert seen == [True]
    assert before == constants.HF_HUB_OFFLINE


def test_checkpoints_get_normal_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "c.safetensors", make_vit("cls").state_dict(), {"arch": "x", "model_kwargs": {}})
    finally:
        os.umask(umask)
    assert (tmp_path / "c.safetensors").stat().st_mode & 0o777 == 0o644


def test_checkpoint_is_hashed_only_when_its_identity_is_asked_for(tmp_path, monkeypatch):
    import hashlib

    import vitlens.models.checkpoint as ckpt_mod

    path = save_fixture(tmp_path, "cls")
    calls = []
    real = ckpt_mod.file_sha256
    monkeypatch.setattr(ckpt_mod, "file_sha256", lambda p, **kw: calls.append(p) or real(p, **kw))
    vit = load_vit(path, num_heads=3, device="cpu")
    assert calls == []  # loading reads the file once, without hashing it
    expected = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert vit.identity == expected and vit.identity == expected
    assert len(calls) == 1  # computed once, then cached
