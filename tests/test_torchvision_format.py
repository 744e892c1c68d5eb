"""torchvision ``VisionTransformer`` checkpoints converted to timm compute the same logits, features and attention."""

from __future__ import annotations

import pytest
import torch

torchvision = pytest.importorskip("torchvision")

from vitlens.errors import VitlensError  # noqa: E402
from vitlens.models.convert import build_vit  # noqa: E402
from vitlens.models.torchvision_vit import convert_torchvision_vit, is_torchvision_vit  # noqa: E402

TINY = {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}


def _tiny_tv(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(**{**TINY, "num_classes": 5, **overrides}).eval()
    # torchvision zero-initialises the head: give it weights so the logits test something.
    with torch.no_grad():
        for p in model.heads.parameters():
            p.normal_(std=0.2)
    return model


def _saved(model: torch.nn.Module, tmp_path) -> dict[str, torch.Tensor]:
    """Save as torchvision users do and read back as the loader does."""
    path = tmp_path / "vit.pth"
    torch.save(model.state_dict(), path)
    return torch.load(path, weights_only=True)


def _converted(sd: dict[str, torch.Tensor], **kw) -> torch.nn.Module:
    conv = convert_torchvision_vit(sd, **kw)
    timm_model = build_vit(conv.arch, conv.kwargs).eval()
    timm_model.load_state_dict(conv.state_dict, strict=True)
    return timm_model


def _tv_attention(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Per-head attention of each torchvision layer: it calls MultiheadAttention with need_weights=False, so the
    layer inputs are captured and the weights recomputed by the same module with need_weights=True."""
    inputs: list[tuple[torch.nn.Module, torch.Tensor]] = []
    handles = [
        layer.self_attention.register_forward_pre_hook(lambda m, args: inputs.append((m, args[0])))
        for layer in model.encoder.layers
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return [m(q, q, q, need_weights=True, average_attn_weights=False)[1] for m, q in inputs]


def _timm_attention(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Post-softmax attention [B, heads, N, N] of each timm block (explicit path, attn_drop output hooked)."""
    captured: list[torch.Tensor] = []
    handles = []
    try:
        for block in model.blocks:
            block.attn.fused_attn = False
            handles.append(block.attn.attn_drop.register_forward_hook(lambda m, i, out: captured.append(out)))
        model(x)
    finally:
        for h in handles:
            h.remove()
        for block in model.blocks:
            block.attn.fused_attn = True
    return captured


@torch.no_grad()
def test_logits_features_and_attention_match(tmp_path):
    tv = _tiny_tv()
    sd = _saved(tv, tmp_path)
    assert is_torchvision_vit(sd)
    conv = convert_torchvision_vit(sd, num_heads=2)
    assert conv.source_format == "torchvision"
    assert conv.kwargs["img_size"] == 32 and conv.kwargs["num_classes"] == 5
    assert conv.guessed == {} and conv.dropped == []
    timm_model = _converted(sd, num_heads=2)

    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(timm_model(x), tv(x), atol=1e-5, rtol=1e-5)

    # Encoder output after encoder.ln (all tokens) against timm's forward_features (after `norm`).
    feats: list[torch.Tensor] = []
    handle = tv.encoder.ln.register_forward_hook(lambda m, i, out: feats.append(out))
    try:
        tv(x)
    finally:
        handle.remove()
    torch.testing.assert_close(timm_model.forward_features(x), feats[0], atol=1e-5, rtol=1e-5)

    tv_attn, timm_attn = _tv_attention(tv, x), _timm_attention(timm_model, x)
    assert len(tv_attn) == len(timm_attn) == 2
    for ours, theirs in zip(timm_attn, tv_attn, strict=True):
        assert ours.shape == (2, 2, 17, 17)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_legacy_mlp_names_are_read(tmp_path):
    tv = _tiny_tv()
    sd = {
        k.replace(".mlp.0.", ".mlp.linear_1.").replace(".mlp.3.", ".mlp.linear_2."): v
        for k, v in tv.state_dict().items()
    }
    assert any(".mlp.linear_1." in k for k in sd)
    timm_model = _converted(sd, num_heads=2)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(timm_model(x), tv(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_pre_logits_head_is_kept_and_logits_match(tmp_path):
    tv = _tiny_tv(representation_size=16)
    sd = _saved(tv, tmp_path)
    conv = convert_torchvision_vit(sd, num_heads=2)
    assert conv.kwargs["num_classes"] == 5 and conv.dropped == []
    assert conv.kwargs["head_layers"] == [{"linear": [32, 16]}, {"act": "tanh"}, {"linear": [16, 5]}]
    assert sorted(k for k in conv.state_dict if k.startswith("head")) == [
        "head.0.bias",
        "head.0.weight",
        "head.2.bias",
        "head.2.weight",
    ]
    timm_model = _converted(sd, num_heads=2)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(timm_model(x), tv(x), atol=1e-5, rtol=1e-5)


def test_custom_width_needs_num_heads(tmp_path):
    sd = _tiny_tv().state_dict()
    with pytest.raises(VitlensError, match="num-heads") as err:
        convert_torchvision_vit(sd)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("builder", "heads", "weights", "interpolation", "crop_pct"),
    [
        ("vit_b_16", 12, "ViT_B_16_Weights.IMAGENET1K_V1", "bilinear", 224 / 256),
        ("vit_b_32", 12, "ViT_B_32_Weights.IMAGENET1K_V1", "bilinear", 224 / 256),
        ("vit_l_16", 16, "ViT_L_16_Weights.IMAGENET1K_V1", "bilinear", 224 / 242),
        ("vit_h_14", 16, "ViT_H_14_Weights.IMAGENET1K_SWAG_LINEAR_V1", "bicubic", 1.0),
    ],
)
def test_builder_sizes_guess_heads_and_transforms(builder, heads, weights, interpolation, crop_pct):
    # Built on the meta device: the builders' real keys and shapes, no memory and no initialisation time.
    with torch.device("meta"):
        sd = getattr(torchvision.models, builder)().state_dict()
        conv = convert_torchvision_vit(sd)
        assert conv.kwargs["num_heads"] == heads
        assert "pass --num-heads" in conv.guessed["num_heads"]
        assert conv.preprocess == {} and weights in conv.preprocess_default_why
        assert conv.preprocess_defaults["interpolation"] == interpolation
        assert conv.preprocess_defaults["crop_pct"] == pytest.approx(crop_pct)
        assert conv.preprocess_defaults["crop_mode"] == "center"
        build_vit(conv.arch, conv.kwargs).load_state_dict(conv.state_dict, strict=True)


def test_swag_e2e_size_gets_swag_transforms_and_custom_shapes_the_recipe_default():
    with torch.device("meta"):
        conv = convert_torchvision_vit(torchvision.models.vit_b_16(image_size=384).state_dict())
    assert conv.kwargs["img_size"] == 384 and "SWAG_E2E" in conv.preprocess_default_why
    assert conv.preprocess_defaults["interpolation"] == "bicubic" and conv.preprocess_defaults["crop_pct"] == 1.0
    conv = convert_torchvision_vit(_tiny_tv().state_dict(), num_heads=2)
    assert "IMAGENET1K_V1" in conv.preprocess_default_why
    assert conv.preprocess_defaults["interpolation"] == "bilinear"
    assert conv.preprocess_defaults["crop_pct"] == pytest.approx(224 / 256)


def test_conv_stem_is_refused():
    from torchvision.models.vision_transformer import ConvStemConfig

    tv = _tiny_tv(conv_stem_configs=[ConvStemConfig(out_channels=8, kernel_size=3, stride=8)])
    sd = tv.state_dict()
    assert is_torchvision_vit(sd)
    with pytest.raises(VitlensError, match="convolutional stem") as err:
        convert_torchvision_vit(sd, num_heads=2)
    assert "\n" not in str(err.value)


def test_non_square_grid_and_unknown_keys_are_refused():
    sd = _tiny_tv().state_dict()
    bad = {**sd, "encoder.pos_embedding": sd["encoder.pos_embedding"][:, :-1]}
    with pytest.raises(VitlensError, match="1 \\+ n\\*n rows"):
        convert_torchvision_vit(bad, num_heads=2)
    with pytest.raises(VitlensError, match="extra.weight"):
        convert_torchvision_vit({**sd, "extra.weight": torch.zeros(1)}, num_heads=2)


def test_timm_state_dict_is_not_torchvision():
    timm = pytest.importorskip("timm")
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5
    )
    assert not is_torchvision_vit(model.state_dict())
