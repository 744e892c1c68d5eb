"""CLIP image towers (open_clip, OpenAI CLIP, open_clip timm trunks) converted to timm compute ``encode_image``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIP, build_model_from_openai_state_dict, set_model_preprocess_cfg  # noqa: E402
from open_clip.push_to_hf_hub import save_config_for_hf  # noqa: E402
from open_clip.transform import image_transform  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from tests.conftest import make_vit  # noqa: E402
from vitlens.data import _resize_crop  # noqa: E402
from vitlens.errors import VitlensError  # noqa: E402
from vitlens.layout import Preprocess  # noqa: E402
from vitlens.models.clip import OPENAI_MEAN, OPENAI_STD, convert_clip, is_clip  # noqa: E402
from vitlens.models.convert import build_vit  # noqa: E402

VISION = dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32)  # 2 heads of 32
TEXT = dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
EMBED = 16


def _jitter(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every weight off its init (LayerNorm 1/0, zero biases, layer scale 1e-5) so that each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _clip(seed: int = 0, *, quick_gelu: bool = False, text: dict | None = None, **vision) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(embed_dim=EMBED, vision_cfg={**VISION, **vision}, text_cfg=text or TEXT, quick_gelu=quick_gelu)
    return _jitter(model, seed)


def _model_cfg(model: CLIP, **vision) -> dict:
    return {
        "embed_dim": EMBED,
        "quick_gelu": isinstance(model.visual.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU),
        "vision_cfg": {**VISION, **vision},
        "text_cfg": TEXT,
    }


def _save_hub(model: CLIP, model_cfg: dict, tmp_path, preprocess: dict | None = None) -> tuple[dict, dict]:
    """Save as open_clip's hub export does (weights + open_clip_config.json) and read both back."""
    pp = {"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic", "resize_mode": "shortest"}
    set_model_preprocess_cfg(model, {**pp, **(preprocess or {})})
    save_file(model.state_dict(), tmp_path / "open_clip_model.safetensors")
    save_config_for_hf(model, tmp_path / "open_clip_config.json", model_config=model_cfg)
    sd = load_file(tmp_path / "open_clip_model.safetensors")
    return sd, json.loads((tmp_path / "open_clip_config.json").read_text())


def _timm(conv, **override) -> torch.nn.Module:
    vit = build_vit(conv.arch, {**conv.kwargs, **override}).eval()
    vit.load_state_dict(conv.state_dict, strict=True)
    return vit


def _images(size: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_open_clip_hub_export_matches_encode_image(tmp_path):
    """(a) open_clip (GELU) saved as its hub export converts with its config; forward == encode_image."""
    model = _clip()
    sd, config = _save_hub(model, _model_cfg(model), tmp_path)
    assert is_clip(sd)
    conv = convert_clip(sd, open_clip_config=config)
    assert conv.source_format == "open_clip" and conv.guessed == {}
    assert conv.kwargs["act_layer"] == "gelu" and conv.kwargs["num_heads"] == 2
    assert conv.kwargs["layer_norm_eps"] == 1e-5 and conv.kwargs["num_classes"] == EMBED
    assert len(conv.dropped) == 1 and conv.dropped[0].startswith("text tower (18 tensors: ")
    json.dumps(conv.kwargs)  # JSON-ready
    x = _images()
    with torch.no_grad():
        _close(_timm(conv)(x), model.encode_image(x))


def test_openai_release_matches_open_clip_reader(tmp_path):
    """(b) An OpenAI-style file (fp16 weights, TorchScript-only entries) with openai=True: QuickGELU, width // 64
    heads, as open_clip's own OpenAI reader builds it."""
    # OpenAI's layout has 64-wide heads in both towers (open_clip's reader assumes text width // 64 heads too).
    model = _clip(quick_gelu=True, width=128, head_width=64, text={**TEXT, "width": 64, "heads": 1})
    sd = {k: v.half() for k, v in model.state_dict().items()}
    sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(8), vocab_size=torch.tensor(50))
    torch.save(sd, tmp_path / "ViT-T-8.pt")
    sd = torch.load(tmp_path / "ViT-T-8.pt", weights_only=True)
    reference = build_model_from_openai_state_dict(dict(sd), quick_gelu=True, cast_dtype=None).float().eval()

    conv = convert_clip(sd, openai=True)
    assert conv.source_format == "openai-clip" and conv.guessed == {}
    assert conv.kwargs["act_layer"] == "quick_gelu" and conv.kwargs["num_heads"] == 2
    assert "input_resolution" in conv.dropped[0]
    x = _images()
    with torch.no_grad():
        _close(_timm(conv)(x), reference.encode_image(x))

    # Without openai=True the TorchScript-only entries make QuickGELU the (recorded) guess.
    guessed = convert_clip(sd, num_heads=2)
    assert guessed.kwargs["act_layer"] == "quick_gelu" and '"gelu"' in guessed.guessed["act_layer"]


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_wrong_activation_is_detected(quick_gelu):
    """(c) The same weights with the other activation (as --model-kwargs would force) are measurably different,
    so (a) and (b) can fail."""
    model = _clip(quick_gelu=quick_gelu)
    conv = convert_clip(model.state_dict(), open_clip_config={"model_cfg": _model_cfg(model)})
    wrong = "gelu" if quick_gelu else "quick_gelu"
    x = _images()
    with torch.no_grad():
        diff = (_timm(conv, act_layer=wrong)(x) - model.encode_image(x)).abs().max().item()
    assert diff > 1e-3, diff


def test_visual_tower_alone_without_config():
    """(d) ``model.visual.state_dict()`` converts without a config; what cannot be read is listed as guessed."""
    model = _clip()
    sd = model.visual.state_dict()
    assert is_clip(sd)
    conv = convert_clip(sd, num_heads=2)
    assert conv.dropped == []
    assert set(conv.guessed) == {"act_layer", "global_pool"}  # heads were given
    assert "quick_gelu" in conv.guessed["act_layer"]  # the remedy names the other activation
    assert conv.preprocess == {} and conv.preprocess_defaults["mean"] == list(OPENAI_MEAN)
    x = _images()
    with torch.no_grad():
        _close(_timm(conv)(x), model.encode_image(x))


def test_detection_of_layouts():
    """(e) Full and tower-only layouts (after the loader strips ``module.``), trunk towers, not timm or others."""
    model = _clip()
    full, tower = model.state_dict(), model.visual.state_dict()
    training = {"module." + k: v for k, v in full.items()}  # DDP checkpoint, as open_clip's trainer saves it
    assert is_clip({k.removeprefix("module."): v for k, v in training.items()})
    assert is_clip(full) and is_clip(tower)
    assert is_clip({"visual.trunk.pos_embed": torch.zeros(1), "visual.head.proj.weight": torch.zeros(1)})
    assert not is_clip(make_vit("cls").state_dict())
    assert not is_clip({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)})


def test_attention_maps_match_multihead_attention():
    """(f) timm's explicit attention equals open_clip's nn.MultiheadAttention weights, every layer and head."""
    model = _clip()
    conv = convert_clip(model.state_dict(), open_clip_config={"model_cfg": _model_cfg(model)})
    vit = _timm(conv)
    captured = []
    hooks = []
    for blk in vit.blocks:
        blk.attn.fused_attn = False
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda m, i, o: captured.append(o)))
    x = _images()
    try:
        with torch.no_grad():
            vit(x)
            h = model.visual._embeds(x)  # [B, N+1, D] after ln_pre, as the first block sees it
            for layer, blk in enumerate(model.visual.transformer.resblocks):
                q = blk.ln_1(h)
                _, ref = blk.attn(q, q, q, need_weights=True, average_attn_weights=False)  # [B, heads, N+1, N+1]
                _close(captured[layer], ref)
                h = blk(h)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(captured) == 2 and captured[0].shape == (2, 2, 17, 17)


def test_unknown_width_without_heads_is_one_line():
    """(g) A width outside the head table, no config and no num_heads: one line asking for --num-heads."""
    with pytest.raises(VitlensError, match="--num-heads") as e:
        convert_clip(_clip().visual.state_dict())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "vision",
    [
        # layer scale, q/k LayerNorm, sub-LayerNorms, no ln_pre, average pool with LayerNorm after it (CLIPA-like)
        dict(
            ls_init_value=0.1,
            qk_norm=True,
            scale_attn_inner=True,
            scale_fc=True,
            no_ln_pre=True,
            pool_type="avg",
            final_ln_after_pool=True,
        ),
        dict(pool_type="avg"),  # LayerNorm on every token, then the average
        dict(pool_type="tok", final_ln_after_pool=True, pos_embed_type="sin_cos_2d"),
        dict(image_size=[32, 48], patch_size=[8, 8]),  # non-square grid, sizes as pairs
    ],
    ids=["extras", "avg", "tok-final-ln", "nonsquare"],
)
def test_open_clip_variants(vision):
    """open_clip's vision_cfg options that timm's VisionTransformer computes exactly."""
    model = _clip(**vision)
    conv = convert_clip(model.state_dict(), open_clip_config={"model_cfg": _model_cfg(model, **vision)})
    x = torch.randn(2, 3, *model.visual.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _close(_timm(conv)(x), model.encode_image(x))


@pytest.mark.parametrize(
    ("vision", "field"),
    [
        (dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2), "attentional_pool"),
        (dict(scaled_cosine_attn=True), "scaled_cosine_attn"),
        (dict(scale_attn=True), "scale_attn"),
    ],
)
def test_unsupported_open_clip_features_refused(vision, field):
    """Features with no timm counterpart are refused in one line naming the config field, config or not."""
    model = _clip(**vision)
    for config in ({"model_cfg": _model_cfg(model, **vision)}, None):
        with pytest.raises(VitlensError, match=f"vision_cfg.{field}") as e:
            convert_clip(model.state_dict(), open_clip_config=config, num_heads=2)
        assert "\n" not in str(e.value)


def test_config_that_contradicts_weights_refused():
    model = _clip()
    with pytest.raises(VitlensError, match="vision_cfg.layers"):
        convert_clip(model.state_dict(), open_clip_config={"model_cfg": _model_cfg(model, layers=3)})
    with pytest.raises(VitlensError, match="ResNet"):
        convert_clip({"visual.attnpool.positional_embedding": torch.zeros(5, 8)})
    trunk = {"visual.trunk.pos_embed": torch.zeros(1, 101, 96)}
    relpos = {"model_cfg": {"embed_dim": EMBED, "vision_cfg": {"timm_model_name": "test_vit_relpos"}}}
    with pytest.raises(VitlensError, match="not a timm VisionTransformer"):
        convert_clip(trunk, open_clip_config=relpos)


@pytest.mark.parametrize(
    ("name", "pool", "proj", "image_size"),
    # timm's own tiny test ViTs (160 px, width 64 / 96). open_clip builds the trunk at timm's default size whatever
    # image_size says (32 in the first case): the stored weights decide.
    [("test_vit", "", "linear", 32), ("test_vit3", "map", "none", 160)],
    ids=["clip-linear", "siglip-map"],
)
def test_timm_trunk_tower(name, pool, proj, image_size, tmp_path):
    """open_clip towers around a timm ViT (as its SigLIP configs build them) become that timm model."""
    timm_cfg = dict(timm_model_name=name, timm_pool=pool, timm_proj=proj, image_size=image_size)
    torch.manual_seed(0)
    model = _jitter(CLIP(embed_dim=EMBED, vision_cfg=timm_cfg, text_cfg=TEXT))
    model_cfg = {"embed_dim": EMBED, "vision_cfg": timm_cfg, "text_cfg": TEXT}
    sd, config = _save_hub(model, model_cfg, tmp_path, {"mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "squash"})
    assert is_clip(sd)
    conv = convert_clip(sd, open_clip_config=config)
    assert conv.source_format == "open_clip-timm-trunk" and conv.arch == name
    assert conv.kwargs.get("img_size", 160) == 160 and len(conv.dropped) == 1
    assert conv.preprocess["crop_mode"] == "squash" and conv.preprocess["mean"] == [0.5] * 3
    x = _images(160, batch=1)
    with torch.no_grad():
        _close(_timm(conv)(x), model.encode_image(x))

    with pytest.raises(VitlensError, match="open_clip_config.json"):
        convert_clip(sd)


@pytest.fixture(scope="module")
def china():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    from PIL import Image

    return Image.fromarray(sklearn_datasets.load_sample_image("china.jpg"))  # 640 x 427 RGB


@pytest.mark.parametrize(
    ("preprocess_cfg", "square"),
    [
        ({"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic", "resize_mode": "shortest"}, True),
        ({"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic", "resize_mode": "shortest"}, False),
        ({"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "resize_mode": "squash"}, False),
        ({}, True),  # nothing stated: OpenAI CLIP's transform from the defaults
    ],
    ids=["shortest-square", "shortest", "squash", "defaults"],
)
def test_preprocess_matches_open_clip_transform(china, preprocess_cfg, square):
    """(h) vitlens' resize/crop + normalisation with the converted fields == open_clip's image_transform."""
    img = china.crop((0, 0, 427, 427)) if square else china
    model = _clip()
    conv = convert_clip(
        model.state_dict(), open_clip_config={"model_cfg": _model_cfg(model), "preprocess_cfg": preprocess_cfg}
    )
    fields = {**conv.preprocess_defaults, **conv.preprocess}
    assert set(fields) == {"mean", "std", "interpolation", "crop_pct", "crop_mode"}
    size = 224
    pre = Preprocess(img_size=(size, size), **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    pixels = np.asarray(_resize_crop(img, pre), dtype=np.float32) / 255.0  # [H, W, 3]
    ours = (torch.from_numpy(pixels).permute(2, 0, 1) - torch.tensor(pre.mean).view(3, 1, 1)) / torch.tensor(
        pre.std
    ).view(3, 1, 1)
    theirs = image_transform(size, is_train=False, **preprocess_cfg)(img)  # [3, H, W]
    _close(ours, theirs)
