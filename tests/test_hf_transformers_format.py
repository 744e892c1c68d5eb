"""Hugging Face transformers ViT-family checkpoints: tiny models built and saved with transformers, converted, and
compared with the rebuilt timm model (features, logits, attention maps) and with the processors' pixels."""

from __future__ import annotations

import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from vitlens.data import _channel_stats, _resize_crop  # noqa: E402
from vitlens.errors import VitlensError  # noqa: E402
from vitlens.layout import Preprocess  # noqa: E402
from vitlens.models.convert import INFERRED_DISTILLED_ARCH, build_vit  # noqa: E402
from vitlens.models.hf_transformers import convert_hf_transformers, is_hf_transformers  # noqa: E402

T = transformers
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
LABELS = {0: "tench", 1: "goldfish", 2: "shark"}

# case -> (config, model class, base-model forward kwargs). Activations, qkv bias, a non-square grid, SwiGLU and
# registers vary across cases so each mapping is exercised by at least one comparison.
CASES = {
    "ViTModel": (lambda: T.ViTConfig(intermediate_size=64, **{**TINY, "image_size": [32, 48]}), T.ViTModel),
    "ViTForImageClassification": (
        lambda: T.ViTConfig(intermediate_size=48, hidden_act="gelu_pytorch_tanh", id2label=LABELS, **TINY),
        T.ViTForImageClassification,
    ),
    "DeiTModel": (lambda: T.DeiTConfig(intermediate_size=64, qkv_bias=False, **TINY), T.DeiTModel),
    "DeiTForImageClassification": (
        lambda: T.DeiTConfig(intermediate_size=64, num_labels=3, **TINY),
        T.DeiTForImageClassification,
    ),
    "DeiTForImageClassificationWithTeacher": (
        lambda: T.DeiTConfig(intermediate_size=64, num_labels=3, **TINY),
        T.DeiTForImageClassificationWithTeacher,
    ),
    "Dinov2Model": (lambda: T.Dinov2Config(**TINY), T.Dinov2Model),
    "Dinov2Model-swiglu": (lambda: T.Dinov2Config(use_swiglu_ffn=True, mlp_ratio=3, **TINY), T.Dinov2Model),
    "Dinov2ForImageClassification": (lambda: T.Dinov2Config(num_labels=3, **TINY), T.Dinov2ForImageClassification),
    "Dinov2WithRegistersModel": (
        lambda: T.Dinov2WithRegistersConfig(num_register_tokens=3, hidden_act="quick_gelu", **TINY),
        T.Dinov2WithRegistersModel,
    ),
    "Dinov2WithRegistersForImageClassification": (
        lambda: T.Dinov2WithRegistersConfig(num_register_tokens=2, use_swiglu_ffn=True, num_labels=3, **TINY),
        T.Dinov2WithRegistersForImageClassification,
    ),
    "ViTMAEForPreTraining": (
        lambda: T.ViTMAEConfig(
            intermediate_size=64,
            mask_ratio=0.0,
            decoder_hidden_size=16,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2,
            decoder_intermediate_size=32,
            **TINY,
        ),
        T.ViTMAEForPreTraining,
    ),
    "ViTMSNForImageClassification": (
        lambda: T.ViTMSNConfig(intermediate_size=64, num_labels=3, **TINY),
        T.ViTMSNForImageClassification,
    ),
    "IJepaForImageClassification": (
        lambda: T.IJepaConfig(intermediate_size=64, num_labels=3, **TINY),
        T.IJepaForImageClassification,
    ),
}


def _hf_model(case: str, seed: int = 0) -> torch.nn.Module:
    make_config, cls = CASES[case]
    torch.manual_seed(seed)
    model = cls(make_config())
    model.set_attn_implementation("eager")  # explicit attention weights for output_attentions
    with torch.no_grad():
        for p in model.parameters():  # move every tensor off its init value (registers start at 0, scales at 1)
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def _saved(model: torch.nn.Module, path) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict and config exactly as ``save_pretrained`` writes them."""
    model.save_pretrained(path)
    sd = safetensors_torch.load_file(str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    return sd, config


def _input(config: dict, batch: int = 2) -> torch.Tensor:
    size = config["image_size"]
    h, w = size if isinstance(size, list) else (size, size)
    return torch.randn(batch, config.get("num_channels", 3), h, w, generator=torch.Generator().manual_seed(1))


def _hf_forward(model: torch.nn.Module, x: torch.Tensor):
    """(last_hidden_state, attentions, logits or None) of a transformers model on ``x``."""
    base = getattr(model, model.base_model_prefix, model)
    extra = {}
    if isinstance(base, T.ViTMAEModel):  # keep the patch order: no shuffling (mask_ratio is 0 in the config)
        extra["noise"] = torch.arange(base.embeddings.patch_embeddings.num_patches).float().expand(x.shape[0], -1)
    with torch.no_grad():
        out = base(x, output_attentions=True, **extra)
        logits = model(x).logits if hasattr(model, "classifier") or hasattr(model, "cls_classifier") else None
    return out.last_hidden_state, out.attentions, logits


@contextmanager
def _timm_attention(model: torch.nn.Module):
    """Each block's softmax attention [B, heads, T, T], from the explicit (unfused) path."""
    maps: list[torch.Tensor] = []
    handles = []
    try:
        for block in model.blocks:
            block.attn.fused_attn = False
            handles.append(block.attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o.detach())))
        yield maps
    finally:
        for h in handles:
            h.remove()


def _convert_and_build(sd: dict, config: dict, **kwargs):
    conv = convert_hf_transformers(sd, config, **kwargs)
    json.dumps(conv.kwargs)  # JSON-ready
    model = build_vit(conv.arch, conv.kwargs)
    model.load_state_dict(conv.state_dict, strict=True)
    return conv, model.eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("case", list(CASES))
def test_converted_model_matches_transformers(case, tmp_path):
    hf = _hf_model(case)
    sd, config = _saved(hf, tmp_path)
    assert is_hf_transformers(sd, config)
    conv, vit = _convert_and_build(sd, config)
    assert conv.source_format == f"hf-transformers:{type(hf).__name__}"

    x = _input(config)
    hidden, hf_attn, logits = _hf_forward(hf, x)
    with torch.no_grad(), _timm_attention(vit) as timm_attn:
        features = vit.forward_features(x)
    torch.testing.assert_close(features, hidden, atol=1e-5, rtol=1e-5)
    assert len(timm_attn) == len(hf_attn) == config["num_hidden_layers"]
    for ours, theirs in zip(timm_attn, hf_attn, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

    if "Dinov2" in case and logits is not None:
        # concat(cls, mean patch) of width 2D: dropped, with a line that says why; the features still match.
        assert vit.num_classes == 0 and any("concat" in d and d.startswith("classifier") for d in conv.dropped)
    elif logits is not None:
        with torch.no_grad():
            torch.testing.assert_close(vit(x), logits, atol=1e-5, rtol=1e-5)
    else:
        assert vit.num_classes == 0


def test_registers_sit_after_the_class_token_without_position_embeddings(tmp_path):
    hf = _hf_model("Dinov2WithRegistersModel")
    sd, config = _saved(hf, tmp_path)
    conv, vit = _convert_and_build(sd, config)
    assert conv.kwargs["reg_tokens"] == 3 and conv.kwargs["no_embed_class"] is True
    assert vit.pos_embed.shape[1] == 16  # patches only
    emb = hf.embeddings
    # The class token carries its position embedding; the registers carry none.
    torch.testing.assert_close(vit.cls_token, emb.cls_token + emb.position_embeddings[:, :1])
    torch.testing.assert_close(vit.reg_token, emb.register_tokens)
    # Token order [cls, reg x 3, patches]: a register's hidden state, not a patch's, sits at index 1.
    x = _input(config)
    hidden, _, _ = _hf_forward(hf, x)
    with torch.no_grad():
        features = vit.forward_features(x)
    torch.testing.assert_close(features[:, 1:4], hidden[:, 1:4], atol=1e-5, rtol=1e-5)


def test_distilled_heads_and_their_mean(tmp_path):
    hf = _hf_model("DeiTForImageClassificationWithTeacher")
    sd, config = _saved(hf, tmp_path)
    conv, vit = _convert_and_build(sd, config)
    assert conv.arch == INFERRED_DISTILLED_ARCH and vit.num_prefix_tokens == 2
    x = _input(config)
    with torch.no_grad():
        out = hf(x)
        torch.testing.assert_close(vit(x), (out.cls_logits + out.distillation_logits) / 2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            vit.forward_features(x)[:, 1], hf.deit(x).last_hidden_state[:, 1], atol=1e-5, rtol=1e-5
        )


def test_in_memory_layout_of_transformers_5(tmp_path):
    """``model.state_dict()`` of transformers 5 (layers.N.attention.q_proj, split SwiGLU gate / up) converts too."""
    for case in ("ViTForImageClassification", "Dinov2Model-swiglu"):
        hf = _hf_model(case)
        sd = {k: v.clone() for k, v in hf.state_dict().items()}
        assert any(".q_proj." in k for k in sd)  # the in-memory names, not the saved ones
        config = json.loads(hf.config.to_json_string())
        _, vit = _convert_and_build(sd, config)
        x = _input(config)
        hidden, _, logits = _hf_forward(hf, x)
        with torch.no_grad():
            torch.testing.assert_close(vit.forward_features(x), hidden, atol=1e-5, rtol=1e-5)
            if logits is not None:
                torch.testing.assert_close(vit(x), logits, atol=1e-5, rtol=1e-5)


def test_released_sizes_build_with_the_right_shapes():
    """DINOv2-g/14 with registers (SwiGLU hidden 4096 from mlp_ratio 4) and ViT-B/16 at full size, on the meta
    device: shapes only, no memory."""
    configs = (
        T.Dinov2WithRegistersConfig(
            hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True, image_size=518,
            patch_size=14,
        ),
        T.ViTConfig(),
    )  # fmt: skip
    for config, cls in zip(configs, (T.Dinov2WithRegistersModel, T.ViTForImageClassification), strict=True):
        with torch.device("meta"):
            sd = cls(config).state_dict()
        conv = convert_hf_transformers(sd, json.loads(config.to_json_string()))
        with torch.device("meta"):
            vit = build_vit(conv.arch, conv.kwargs)
        vit.load_state_dict(conv.state_dict, strict=True)
    assert tuple(conv.state_dict["blocks.0.attn.qkv.weight"].shape) == (3 * 768, 768)


def test_what_is_read_dropped_and_named(tmp_path):
    sd, config = _saved(_hf_model("ViTModel"), tmp_path / "vit")
    conv = convert_hf_transformers(sd, config)
    assert conv.kwargs["layer_norm_eps"] == 1e-12 and conv.kwargs["img_size"] == [32, 48]
    assert any(d.startswith("pooler (pooler.dense.weight, pooler.dense.bias)") for d in conv.dropped)
    assert conv.class_names is None and conv.preprocess == {} and conv.preprocess_defaults["mean"] == (0.5, 0.5, 0.5)
    assert conv.guessed == {}

    sd, config = _saved(_hf_model("ViTForImageClassification"), tmp_path / "cls")
    conv = convert_hf_transformers(sd, config)
    assert conv.class_names == ["tench", "goldfish", "shark"] and conv.kwargs["act_layer"] == "gelu_tanh"

    sd, config = _saved(_hf_model("ViTMAEForPreTraining"), tmp_path / "mae")
    conv = convert_hf_transformers(sd, config)
    assert [d.split(" ", 1)[0] for d in conv.dropped] == ["decoder"]

    sd, config = _saved(_hf_model("Dinov2WithRegistersModel"), tmp_path / "reg")
    conv = convert_hf_transformers(sd, config)
    assert conv.source_format == "hf-transformers:Dinov2WithRegistersModel" and conv.kwargs["act_layer"] == "quick_gelu"
    assert conv.dropped == [] and any("mask_token" in c for c in conv.converted)
    assert conv.preprocess_defaults["crop_mode"] == "center" and conv.preprocess_defaults["crop_pct"] == 224 / 256


def test_recognises_the_layout_only():
    from timm.models.vision_transformer import VisionTransformer

    timm_sd = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2).state_dict()
    assert not is_hf_transformers(timm_sd, {"architecture": "vit_tiny"})
    assert is_hf_transformers({"embeddings.patch_embeddings.projection.weight": torch.zeros(1)}, None)
    assert is_hf_transformers({"dinov2.embeddings.patch_embeddings.projection.weight": torch.zeros(1)}, None)


def _one_line_error(sd, config, match, **kwargs):
    with pytest.raises(VitlensError, match=match) as info:
        convert_hf_transformers(sd, config, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"num_hidden_layers": 10**9}, "num_hidden_layers = 1000000000"),
        ({"num_attention_heads": 0}, "num_attention_heads = 0"),
        ({"hidden_size": 30, "num_attention_heads": 4}, "does not divide"),
        ({"image_size": "large"}, "image_size = 'large'"),
        ({"patch_size": [8, 8, 8]}, "patch_size"),
        ({"hidden_act": "relu6"}, "hidden_act 'relu6'"),
        ({"layer_norm_eps": -1}, "layer_norm_eps"),
        ({"model_type": "swin"}, "model_type 'swin' .*plain ViTs only"),
        ({"model_type": "beit"}, "model_type 'beit' .*plain ViTs only"),
        ({"model_type": None}, "no model_type"),
    ],
)
def test_absurd_configs_are_refused_before_any_tensor(change, match):
    config = {"model_type": "vit", "architectures": ["ViTModel"], **TINY, "intermediate_size": 64, **change}
    _one_line_error({}, config, match)  # no tensors at all: the config alone must stop it


def test_missing_config_says_where_it_belongs():
    _one_line_error({"embeddings.patch_embeddings.projection.weight": torch.zeros(1)}, None, "config.json must sit")


@pytest.mark.parametrize(
    ("case", "change", "match"),
    [
        ("ViTModel", {"num_hidden_layers": 3}, "num_hidden_layers = 3 but the weights have layers 0-1"),
        ("ViTModel", {"intermediate_size": 128}, "intermediate_size gives an MLP width of 128 but layer 0's is 64"),
        ("ViTModel", {"hidden_size": 64}, "does not match embeddings.patch_embeddings.projection.weight"),
        ("ViTModel", {"image_size": 64}, "does not match embeddings.position_embeddings"),
        ("DeiTModel", {"qkv_bias": True}, "qkv_bias = True but the query projection has no bias"),
        ("Dinov2WithRegistersModel", {"num_register_tokens": 4}, "num_register_tokens = 4"),
        ("Dinov2Model-swiglu", {"use_swiglu_ffn": False}, "use_swiglu_ffn = False"),
        ("ViTForImageClassification", {"num_attention_heads": 4}, None),
    ],
)
def test_config_and_weights_disagreeing_is_named(case, change, match, tmp_path):
    sd, config = _saved(_hf_model(case), tmp_path)
    if match is None:  # heads cannot be checked against the weights; a conflicting --num-heads is refused
        _one_line_error(sd, config, "num_attention_heads = 2 but 4 heads", num_heads=4)
        return
    _one_line_error(sd, {**config, **change}, match)


# --- preprocessing --------------------------------------------------------------------------------------------


def _square_photo():
    from PIL import Image

    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    pixels = sklearn_datasets.load_sample_image("china.jpg")  # [427, 640, 3] uint8
    return Image.fromarray(pixels[10:410, 120:520])  # 400 x 400: no centre-crop rounding conventions differ


@pytest.mark.parametrize(
    ("processor", "expect"),
    [
        (
            lambda: T.ViTImageProcessorPil(size={"height": 224, "width": 224}),
            {"crop_mode": "squash", "crop_pct": 1.0, "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5)},
        ),
        (
            lambda: T.DeiTImageProcessorPil(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
            {"crop_mode": "squash", "crop_pct": 224 / 256, "interpolation": "bicubic"},
        ),
        (
            lambda: T.BitImageProcessorPil(
                size={"shortest_edge": 256}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
            ),
            {"crop_mode": "center", "crop_pct": 224 / 256, "interpolation": "bicubic", "std": (0.229, 0.224, 0.225)},
        ),
        (
            lambda: T.ViTImageProcessorPil(size={"height": 200, "width": 200}, resample=0, rescale_factor=1 / 127.5),
            {"crop_mode": "squash", "interpolation": "nearest", "mean": (0.25, 0.25, 0.25)},
        ),
    ],
)
def test_preprocessing_matches_the_processor(processor, expect, tmp_path):
    proc = processor()
    proc.save_pretrained(tmp_path)
    pp_config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    sd, config = _saved(_hf_model("ViTModel"), tmp_path / "model")
    conv = convert_hf_transformers(sd, config, preprocessor_config=pp_config)
    assert conv.preprocess_from == "preprocessor_config.json"
    for key, value in expect.items():
        assert conv.preprocess[key] == (value if isinstance(value, str) else pytest.approx(value)), key

    image = _square_photo()
    theirs = proc(image, return_tensors="pt")["pixel_values"][0]  # [3, S, S]
    preprocess = Preprocess(img_size=tuple(theirs.shape[1:]), **conv.preprocess)
    crop = _resize_crop(image, preprocess)
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)  # [3, S, S]
    mean, std = _channel_stats(preprocess)
    torch.testing.assert_close((pixels - mean) / std, theirs, atol=1e-5, rtol=1e-5)
