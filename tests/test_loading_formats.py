"""Loading checkpoints as their producers save them: DINOv2's and MAE's own layouts, Lightning and DINO containers,
timm hub folders and train.py checkpoints; preprocessing read or visibly guessed; the head table; messages.

References are independent implementations: transformers' DINOv2 (the same weights under its own names, converted by
the documented key mapping) and timm's VisionTransformer for layouts that are timm's own.
"""

from __future__ import annotations

import argparse
import json
import logging

import pytest
import torch
from conftest import input_for, make_vit
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from vitlens.errors import ParameterError, VitlensError
from vitlens.models import load_vit
from vitlens.models.infer import heads_for_width


def _features(vit, x):
    with torch.no_grad():
        return vit.model.forward_features(x)


# ------------------------------------------------------------------------------------------- DINOv2 layout
def _hf_dinov2(tmp_path, registers: int, swiglu: bool = False):
    """A tiny transformers DINOv2 and its weights as ``save_pretrained`` writes them (the names on the hub)."""
    transformers = pytest.importorskip("transformers")
    cfg_cls = transformers.Dinov2WithRegistersConfig if registers else transformers.Dinov2Config
    extra = {"num_register_tokens": registers} if registers else {}
    cfg = cfg_cls(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        layerscale_value=0.7,
        use_swiglu_ffn=swiglu,
        **extra,
    )
    model_cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # make the prefix tokens and position embeddings matter
        for name, p in model.named_parameters():
            if "embeddings" in name and "patch" not in name:
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "hf")
    from safetensors.torch import load_file

    return model, load_file(str(tmp_path / "hf" / "model.safetensors"))


def _to_dinov2_layout(hf_sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """transformers' DINOv2 weights under facebookresearch/dinov2's names (their conversion script, inverted)."""
    out = {
        "cls_token": hf_sd["embeddings.cls_token"],
        "mask_token": hf_sd["embeddings.mask_token"],
        "pos_embed": hf_sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf_sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf_sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf_sd["layernorm.weight"],
        "norm.bias": hf_sd["layernorm.bias"],
    }
    if "embeddings.register_tokens" in hf_sd:
        out["register_tokens"] = hf_sd["embeddings.register_tokens"]
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            out[f"{dst}attn.qkv.{part}"] = torch.cat(
                [hf_sd[f"{src}attention.attention.{n}.{part}"] for n in ("query", "key", "value")]
            )
            out[f"{dst}attn.proj.{part}"] = hf_sd[f"{src}attention.output.dense.{part}"]
            out[f"{dst}norm1.{part}"] = hf_sd[f"{src}norm1.{part}"]
            out[f"{dst}norm2.{part}"] = hf_sd[f"{src}norm2.{part}"]
            if f"{src}mlp.weights_in.{part}" in hf_sd:
                out[f"{dst}mlp.w12.{part}"] = hf_sd[f"{src}mlp.weights_in.{part}"]
                out[f"{dst}mlp.w3.{part}"] = hf_sd[f"{src}mlp.weights_out.{part}"]
            else:
                out[f"{dst}mlp.fc1.{part}"] = hf_sd[f"{src}mlp.fc1.{part}"]
                out[f"{dst}mlp.fc2.{part}"] = hf_sd[f"{src}mlp.fc2.{part}"]
        out[f"{dst}ls1.gamma"] = hf_sd[f"{src}layer_scale1.lambda1"]
        out[f"{dst}ls2.gamma"] = hf_sd[f"{src}layer_scale2.lambda1"]
    return {k: v.clone() for k, v in out.items()}


@pytest.mark.parametrize(("registers", "swiglu"), [(0, False), (4, False), (4, True)])
def test_dinov2_layout_matches_transformers(tmp_path, registers, swiglu):
    hf, saved = _hf_dinov2(tmp_path, registers, swiglu)
    sd = _to_dinov2_layout(saved, depth=2)
    # DINOv2's pretraining checkpoints nest the backbone in the teacher (with the projection head beside it).
    torch.save(
        {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, "dino_head.w": torch.zeros(2)}}, tmp_path / "d.pth"
    )
    vit = load_vit(tmp_path / "d.pth", num_heads=2, device="cpu")
    assert vit.source_format == "dinov2"
    assert vit.layout.prefix_kinds == ("cls",) + ("reg",) * registers
    assert vit.num_heads == 2 and vit.layout.grid_size == (2, 2)
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
    torch.testing.assert_close(_features(vit, x), ref, atol=1e-5, rtol=1e-5)
    assert vit.preprocess.mean == pytest.approx((0.485, 0.456, 0.406))
    assert any(k.startswith("mean/std") for k in vit.guessed)


def test_dinov2_chunked_blocks_flattened(tmp_path):
    hf, saved = _hf_dinov2(tmp_path, 0)
    sd = _to_dinov2_layout(saved, depth=2)
    # BlockChunk (block_chunks=2, one block each): blocks.<chunk>.<global index>.
    chunked = {k.replace("blocks.0.", "blocks.0.0.").replace("blocks.1.", "blocks.1.1."): v for k, v in sd.items()}
    torch.save(chunked, tmp_path / "c.pth")
    vit = load_vit(tmp_path / "c.pth", num_heads=2, device="cpu")
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(_features(vit, x), hf(pixel_values=x).last_hidden_state, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- MAE layout
def _mae_checkpoint(tmp_path):
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=0).eval()
    sd = dict(encoder.state_dict())
    sd |= {  # MAE's decoder (mae/models_mae.py names)
        "mask_token": torch.zeros(1, 1, 16),
        "decoder_embed.weight": torch.randn(16, 48),
        "decoder_embed.bias": torch.zeros(16),
        "decoder_pos_embed": torch.zeros(1, 17, 16),
        "decoder_blocks.0.norm1.weight": torch.ones(16),
        "decoder_norm.weight": torch.ones(16),
        "decoder_pred.weight": torch.randn(192, 16),
    }
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": sd, "epoch": 799, "args": argparse.Namespace(model="mae_vit_tiny")}, path)
    return path, encoder


def test_mae_pretraining_checkpoint_drops_decoder_in_one_line(tmp_path, caplog):
    path, encoder = _mae_checkpoint(tmp_path)
    with caplog.at_level(logging.WARNING, logger="vitlens"):
        vit = load_vit(path, num_heads=3, device="cpu")
    assert vit.source_format == "mae"
    x = input_for(encoder)
    with torch.no_grad():
        torch.testing.assert_close(_features(vit, x), encoder.forward_features(x), atol=1e-5, rtol=1e-5)
    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(lines) == 1 and "MAE decoder (7 tensors" in lines[0]


# ------------------------------------------------------------------------------------------ containers
@pytest.mark.parametrize("attribute", ["net", "vit", "backbone_model"])
def test_lightning_checkpoint_with_any_module_attribute(tmp_path, attribute):
    model = make_vit("cls")
    sd = {f"{attribute}.{k}": v for k, v in model.state_dict().items()}
    sd["criterion.weight"] = torch.ones(5)  # other modules of the LightningModule
    ckpt = {"state_dict": sd, "epoch": 3, "global_step": 30, "pytorch-lightning_version": "2.4.0"}
    torch.save(ckpt, tmp_path / "last.ckpt")
    vit = load_vit(tmp_path / "last.ckpt", num_heads=3, device="cpu")
    x = input_for(model)
    with torch.no_grad():
        torch.testing.assert_close(vit.model(x), model(x))


def test_teacher_student_choice_is_said_and_checkpoint_key_picks(tmp_path, caplog):
    teacher, student = make_vit("cls", seed=0), make_vit("cls", seed=1)
    ckpt = {
        "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()},
        "teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()},
        "epoch": 100,
    }
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    x = input_for(teacher)
    with caplog.at_level(logging.WARNING, logger="vitlens"):
        vit = load_vit(tmp_path / "checkpoint.pth", num_heads=3, device="cpu")
    assert "took 'teacher'" in caplog.text and "--checkpoint-key student" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(vit.model.forward_features(x), teacher.forward_features(x))
        picked = load_vit(tmp_path / "checkpoint.pth", num_heads=3, device="cpu", checkpoint_key="student")
        torch.testing.assert_close(picked.model.forward_features(x), student.forward_features(x))
    with pytest.raises(VitlensError, match="--checkpoint-key nope"):
        load_vit(tmp_path / "checkpoint.pth", num_heads=3, device="cpu", checkpoint_key="nope")


def test_flat_prefixes_several_models(tmp_path, caplog):
    online, ema = make_vit("cls", seed=0), make_vit("cls", seed=1)
    sd = {f"online.{k}": v for k, v in online.state_dict().items()}
    sd |= {f"model_ema.{k}": v for k, v in ema.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "two.ckpt")
    x = input_for(online)
    with caplog.at_level(logging.WARNING, logger="vitlens"):
        vit = load_vit(tmp_path / "two.ckpt", num_heads=3, device="cpu")
    assert "took 'model_ema'" in caplog.text and "--checkpoint-key online" in caplog.text
    picked = load_vit(tmp_path / "two.ckpt", num_heads=3, device="cpu", checkpoint_key="online")
    with torch.no_grad():
        torch.testing.assert_close(vit.model(x), ema(x))
        torch.testing.assert_close(picked.model(x), online(x))


def test_timm_train_checkpoint_uses_its_arch_and_args(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=7).eval()
    args = argparse.Namespace(model="vit_tiny_patch16_224", mean=[0.4, 0.4, 0.4], std=None, crop_pct=0.95)
    ckpt = {"epoch": 9, "arch": "vit_tiny_patch16_224", "state_dict": model.state_dict(), "args": args}
    torch.save(ckpt, tmp_path / "model_best.pth.tar")
    vit = load_vit(tmp_path / "model_best.pth.tar", device="cpu")
    assert vit.source_format == "timm-train:vit_tiny_patch16_224"
    assert vit.layout.img_size == (64, 64)  # built at the checkpoint's grid, not resampled to 224
    assert vit.preprocess.mean == pytest.approx((0.4, 0.4, 0.4)) and vit.preprocess.crop_pct == 0.95
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(vit.model(x), model(x))


# ------------------------------------------------------------------------------------------ timm hub folders
def test_timm_hub_folder_local_dir_and_file_beside_config(tmp_path):
    import timm
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=3).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.1, 0.2, 0.3), "std": (0.7, 0.8, 0.9), "crop_pct": 0.95}
    folder = tmp_path / "hub"
    save_for_hf(model, folder, model_args={"img_size": 32}, safe_serialization="both")
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    x = torch.randn(2, 3, 32, 32)
    for spec in (folder, f"local-dir:{folder}", folder / "model.safetensors"):
        vit = load_vit(spec, device="cpu")
        assert vit.source_format == "timm-hub:vit_tiny_patch16_224"
        assert vit.preprocess.mean == pytest.approx((0.1, 0.2, 0.3)) and vit.preprocess.crop_pct == 0.95
        assert not any(k.startswith("mean") for k in vit.guessed)
        with torch.no_grad():
            torch.testing.assert_close(vit.model(x), model(x))


def test_timm_hub_config_with_absurd_values_is_refused(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": 3, "model_args": {"depth": 10**9}})
    )
    save_file({k: v.contiguous() for k, v in make_vit("cls").state_dict().items()}, str(folder / "model.safetensors"))
    with pytest.raises(VitlensError, match="depth = 1000000000"):
        load_vit(folder, device="cpu")


# ------------------------------------------------------------------------------------------ preprocessing
def test_plain_state_dict_gets_timm_vit_defaults_and_says_so(tmp_path, caplog):
    torch.save(make_vit("cls").state_dict(), tmp_path / "m.pth")
    with caplog.at_level(logging.WARNING, logger="vitlens"):
        vit = load_vit(tmp_path / "m.pth", num_heads=3, device="cpu")
    # What is said is what is used: timm's ViT default 0.5 / 0.5, bicubic, crop 0.9.
    assert vit.preprocess.mean == (0.5, 0.5, 0.5) and vit.preprocess.std == (0.5, 0.5, 0.5)
    assert vit.preprocess.crop_pct == 0.9 and vit.preprocess.interpolation == "bicubic"
    key = "mean/std/interpolation/crop_pct"
    assert key in vit.guessed and "0.5" in vit.guessed[key]
    assert f"guessed {key}" in caplog.text


def test_distilled_state_dict_gets_deit_defaults(tmp_path):
    torch.save(make_vit("distilled").state_dict(), tmp_path / "deit.pth")
    vit = load_vit(tmp_path / "deit.pth", num_heads=3, device="cpu")
    assert vit.preprocess.mean == pytest.approx((0.485, 0.456, 0.406)) and vit.preprocess.crop_pct == 0.875


def test_preprocess_overrides_replace_the_guess(tmp_path):
    torch.save(make_vit("cls").state_dict(), tmp_path / "m.pth")
    vit = load_vit(tmp_path / "m.pth", num_heads=3, device="cpu", mean="0.1,0.2,0.3", std=0.25, crop_pct=1.0)
    assert vit.preprocess.mean == (0.1, 0.2, 0.3) and vit.preprocess.std == (0.25, 0.25, 0.25)
    assert vit.preprocess.crop_pct == 1.0
    assert "interpolation" in vit.guessed and not any("mean" in k for k in vit.guessed)
    demo = load_vit("demo", device="cpu", interpolation="BILINEAR")
    assert demo.preprocess.interpolation == "bilinear" and not demo.guessed
    with pytest.raises(ParameterError, match="^mean has 2 values") as mean:
        load_vit(tmp_path / "m.pth", num_heads=3, device="cpu", mean="0.1,0.2")
    with pytest.raises(ParameterError, match="^std must be positive") as std:
        load_vit(tmp_path / "m.pth", num_heads=3, device="cpu", std="0,1,1")
    with pytest.raises(ParameterError, match="^interpolation must be one of") as interpolation:
        load_vit(tmp_path / "m.pth", num_heads=3, device="cpu", interpolation="cubic-ish")
    assert (mean.value.param, std.value.param, interpolation.value.param) == ("mean", "std", "interpolation")


def test_npz_gets_half_half_and_keeps_the_pre_logits_head(tmp_path, caplog):
    import numpy as np
    from timm.models.vision_transformer import _load_weights  # noqa: F401  (the reader vitlens relies on)

    model = make_vit("cls")
    sd = model.state_dict()
    arrays = {
        "embedding/kernel": sd["patch_embed.proj.weight"].permute(2, 3, 1, 0).numpy(),
        "embedding/bias": sd["patch_embed.proj.bias"].numpy(),
        "cls": sd["cls_token"].numpy(),
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"].numpy(),
        "Transformer/encoder_norm/scale": sd["norm.weight"].numpy(),
        "Transformer/encoder_norm/bias": sd["norm.bias"].numpy(),
        "pre_logits/kernel": np.random.default_rng(0).normal(size=(48, 48)).astype(np.float32),  # [in, out]
        "pre_logits/bias": np.random.default_rng(1).normal(size=48).astype(np.float32),
        "head/kernel": sd["head.weight"].T.numpy(),
        "head/bias": sd["head.bias"].numpy(),
    }
    for i in range(2):
        b, p = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        qkv_w, qkv_b = sd[f"{p}attn.qkv.weight"], sd[f"{p}attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            arrays[f"{b}MultiHeadDotProductAttention_1/{n}/kernel"] = (
                qkv_w[j * 48 : (j + 1) * 48].T.reshape(48, 3, 16).numpy()
            )
            arrays[f"{b}MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j * 48 : (j + 1) * 48].reshape(3, 16).numpy()
        arrays[f"{b}MultiHeadDotProductAttention_1/out/kernel"] = (
            sd[f"{p}attn.proj.weight"].T.reshape(3, 16, 48).numpy()
        )
        arrays[f"{b}MultiHeadDotProductAttention_1/out/bias"] = sd[f"{p}attn.proj.bias"].numpy()
        for ln, t in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            arrays[f"{b}{ln}/scale"] = sd[f"{p}{t}.weight"].numpy()
            arrays[f"{b}{ln}/bias"] = sd[f"{p}{t}.bias"].numpy()
        for r, t in ((0, "fc1"), (1, "fc2")):
            arrays[f"{b}MlpBlock_3/Dense_{r}/kernel"] = sd[f"{p}mlp.{t}.weight"].T.numpy()
            arrays[f"{b}MlpBlock_3/Dense_{r}/bias"] = sd[f"{p}mlp.{t}.bias"].numpy()
    np.savez(tmp_path / "ViT-T_8.npz", **arrays)
    with caplog.at_level(logging.WARNING, logger="vitlens"):
        vit = load_vit(tmp_path / "ViT-T_8.npz", device="cpu")
    assert vit.preprocess.mean == (0.5, 0.5, 0.5) and any(k.startswith("mean/std") for k in vit.guessed)
    assert "dropped" not in caplog.text and vit.describe()["head"] == "mlp: linear 48→48, tanh, linear 48→5"
    x = input_for(model)
    with torch.no_grad():
        torch.testing.assert_close(vit.model.forward_features(x), model.forward_features(x), atol=1e-5, rtol=1e-5)
        # The ViT paper's head written out on the class token: tanh(x W_pre + b_pre) W_head + b_head (kernels [in, out])
        cls = model.forward_head(model.forward_features(x), pre_logits=True)  # [B, 48]
        a = {k: torch.from_numpy(v) for k, v in arrays.items() if k.startswith(("pre_logits/", "head/"))}
        expected = torch.tanh(cls @ a["pre_logits/kernel"] + a["pre_logits/bias"]) @ a["head/kernel"] + a["head/bias"]
        torch.testing.assert_close(vit.model(x), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- heads and errors
def test_head_table_rows_and_refusals():
    assert heads_for_width(1152, None)[0] == 16  # SigLIP So400m, not 1152 / 64 = 18
    assert heads_for_width(1536, None, family="dinov2")[0] == 24
    with pytest.raises(VitlensError, match="width 1536 has several"):
        heads_for_width(1536, None)
    with pytest.raises(VitlensError, match="not a standard ViT width: pass --num-heads"):
        heads_for_width(320, None)
    assert heads_for_width(320, 5) == (5, None)


def test_guessed_heads_warn_on_every_load(tmp_path, caplog):
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=1, num_heads=3, num_classes=0)
    torch.save(model.state_dict(), tmp_path / "t.pth")
    with caplog.at_level(logging.WARNING, logger="vitlens"):
        vit = load_vit(tmp_path / "t.pth", device="cpu")
    assert vit.num_heads == 3 and "guessed num_heads" in caplog.text and "DeiT-Ti" in caplog.text


def test_q_norm_gives_the_head_count(tmp_path):
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=4, qk_norm=True)
    torch.save(model.state_dict(), tmp_path / "q.pth")
    vit = load_vit(tmp_path / "q.pth", device="cpu")
    assert vit.num_heads == 4 and "num_heads" not in vit.guessed


def test_unrecognised_state_dict_lists_keys_and_formats(tmp_path):
    torch.save({"encoder.w": torch.zeros(2), "decoder.w": torch.zeros(2)}, tmp_path / "x.pth")
    with pytest.raises(
        VitlensError, match=r"does not recognise this state dict \(keys: encoder.w, decoder.w\).*torchvision"
    ):
        load_vit(tmp_path / "x.pth", device="cpu")


def test_swin_is_named_not_called_a_cnn(tmp_path):
    import timm

    sd = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, window_size=7).state_dict()
    torch.save(sd, tmp_path / "swin.pth")
    with pytest.raises(VitlensError, match="relative position biases"):
        load_vit(tmp_path / "swin.pth", device="cpu")


def test_deit3_release_layer_scale_names(tmp_path):
    model = make_vit("layerscale")
    sd = {
        k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v for k, v in model.state_dict().items()
    }
    torch.save({"model": sd}, tmp_path / "deit_3_small_224_1k.pth")
    vit = load_vit(tmp_path / "deit_3_small_224_1k.pth", device="cpu")  # heads from the q/k norm width
    assert any("gamma_1" in note for note in vit.converted) and vit.preprocess.crop_pct == 1.0
    x = input_for(model)
    with torch.no_grad():
        torch.testing.assert_close(vit.model(x), model(x))


def test_preprocess_options_from_the_project_config(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vitlens.cli.app import app

    torch.save(make_vit("cls").state_dict(), tmp_path / "m.pth")
    (tmp_path / "vitlens.toml").write_text('[info]\nmean = "0.25,0.25,0.25"\ncrop-pct = 0.8\n')
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["info", "m.pth", "--num-heads", "3", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["mean"] == [0.25] * 3 and facts["crop_pct"] == 0.8


def _vitlens_pixels(photo, preprocess):
    import numpy as np

    from vitlens.data import _resize_crop

    x = np.asarray(_resize_crop(photo, preprocess), dtype=np.float32) / 255.0
    x = (x - np.array(preprocess.mean, dtype=np.float32)) / np.array(preprocess.std, dtype=np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)  # [C, H, W]


def _photo():
    from PIL import Image
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg")[40:400, 80:440])  # a real photo, 360 x 360


def test_timm_hub_preprocessing_equals_timms_own_transform(tmp_path):
    import timm
    from timm.data import create_transform, resolve_data_config
    from timm.models._hub import save_for_hf

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0).eval()
    model.pretrained_cfg = {
        **model.pretrained_cfg,
        "mean": (0.2, 0.3, 0.4),
        "crop_pct": 0.8,
        "interpolation": "bilinear",
    }
    save_for_hf(model, tmp_path / "hub", model_args={"img_size": 64}, safe_serialization=True)
    vit = load_vit(tmp_path / "hub", device="cpu")
    theirs = create_transform(**resolve_data_config({"input_size": (3, 64, 64)}, model=model))(_photo())
    torch.testing.assert_close(_vitlens_pixels(_photo(), vit.preprocess), theirs, atol=1e-5, rtol=0)


def test_torchvision_default_preprocessing_equals_the_weights_transforms(tmp_path):
    torchvision = pytest.importorskip("torchvision")

    model = torchvision.models.VisionTransformer(
        image_size=224, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    vit = load_vit(tmp_path / "vit.pth", num_heads=2, device="cpu")
    assert any(k.startswith("mean/std") for k in vit.guessed)  # said, and what is said is the V1 transform:
    theirs = torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1.transforms()(_photo())
    torch.testing.assert_close(_vitlens_pixels(_photo(), vit.preprocess), theirs, atol=1e-5, rtol=0)
