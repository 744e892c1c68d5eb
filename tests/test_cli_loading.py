"""End to end: checkpoints saved the way their producing libraries save them load through ``load_vit`` and the CLI,
compute the producer's function, and every message the loading issue listed as misleading is replaced.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import make_vit
from typer.testing import CliRunner

from vitlens.cli.app import app
from vitlens.models import load_vit

runner = CliRunner()


def _info(*args: str):
    return runner.invoke(app, ["info", *args, "--device", "cpu", "--json"])


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ------------------------------------------------------------------------------------ Hugging Face transformers
def _hf_vit_classifier(tmp_path, **save):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=3,
        id2label={0: "cat", 1: "dog", 2: "fox"},
        label2id={"cat": 0, "dog": 1, "fox": 2},
    )
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).eval()
    folder = tmp_path / "vit-hf"
    model.save_pretrained(folder, **save)
    processor = transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.4] * 3, image_std=[0.3] * 3
    )
    processor.save_pretrained(folder)
    return model, folder, processor


def test_hf_folder_file_and_sharded_folder_load_with_logits_equal(tmp_path):
    model, folder, _ = _hf_vit_classifier(tmp_path)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(pixel_values=x).logits
    for spec in (folder, folder / "model.safetensors"):
        vit = load_vit(spec, device="cpu")
        assert vit.source_format == "hf-transformers:ViTForImageClassification"
        assert vit.class_names == ["cat", "dog", "fox"]
        assert vit.preprocess.mean == pytest.approx((0.4,) * 3) and vit.preprocess.crop_mode == "squash"
        assert not any(k.startswith(("mean", "num_heads")) for k in vit.guessed)
        with torch.no_grad():
            torch.testing.assert_close(vit.model(x), ref, atol=1e-5, rtol=1e-5)
    sharded_model, sharded, _ = _hf_vit_classifier(tmp_path / "s", max_shard_size="20KB")
    assert list(sharded.glob("*.index.json")), "the test needs a sharded save"
    vit = load_vit(sharded, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(vit.model(x), sharded_model(pixel_values=x).logits, atol=1e-5, rtol=1e-5)


def test_hf_preprocessing_equals_the_image_processor_on_a_real_image(tmp_path):
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_image

    from vitlens.data import _resize_crop

    _, folder, processor = _hf_vit_classifier(tmp_path)
    # A real photo, not square: ViTImageProcessor squashes it to 32 x 32 (no crop, so no rounding conventions).
    photo = Image.fromarray(load_sample_image("china.jpg")[50:400, 60:560])
    vit = load_vit(folder, device="cpu")
    ours = np.asarray(_resize_crop(photo, vit.preprocess), dtype=np.float32) / 255.0
    ours = (ours - np.array(vit.preprocess.mean, dtype=np.float32)) / np.array(vit.preprocess.std, dtype=np.float32)
    # transformers 5's default ViTImageProcessor resizes with torchvision; its PIL twin resizes as vitlens does
    # (PIL), and the two backends differ by a grey level on a few pixels.
    transformers = pytest.importorskip("transformers")
    pil = transformers.ViTImageProcessorPil(**processor.to_dict())
    theirs = pil(images=photo, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    default = processor(images=photo, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    assert np.abs(ours - default).max() <= 2 / 255 / 0.3 + 1e-6 and np.abs(ours - default).mean() < 1e-3


def test_hf_info_names_the_format_and_the_folder_is_not_refused(tmp_path):
    _, folder, _ = _hf_vit_classifier(tmp_path)
    facts = _json(_info(str(folder)))
    assert facts["source_format"] == "hf-transformers:ViTForImageClassification"
    assert facts["num_heads"] == 2 and facts["class_names"] == ["cat", "dog", "fox"]
    assert any("preprocessor_config.json" in note for note in facts["converted"])


# ----------------------------------------------------------------------------------------------- torchvision
def test_torchvision_state_dict_loads_through_the_cli(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    ).eval()
    torch.save(model.state_dict(), tmp_path / "tv.pth")
    result = _info(str(tmp_path / "tv.pth"), "--num-heads", "2")
    facts = _json(result)
    assert facts["source_format"] == "torchvision" and facts["num_classes"] == 5
    x = torch.randn(2, 3, 32, 32)
    vit = load_vit(tmp_path / "tv.pth", num_heads=2, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(vit.model(x), model(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------ CLIP
def _open_clip_model(quick_gelu: bool, width: int = 64):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=2, width=width, head_width=64, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
        quick_gelu=quick_gelu,
    ).eval()
    return open_clip, model


def test_openai_torchscript_release_loads_as_data_without_raw_warnings(tmp_path):
    open_clip, model = _open_clip_model(quick_gelu=True)
    open_clip.model.convert_weights_to_lp(model, dtype=torch.float16)  # as OpenAI's releases are stored
    image, text = torch.randn(1, 3, 32, 32).half(), torch.randint(0, 64, (1, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, (image, text), check_trace=False), str(tmp_path / "ViT-T-8.pt"))
    model = model.float()  # the reference: the same (float16-rounded) weights in float32
    result = _info(str(tmp_path / "ViT-T-8.pt"))
    facts = _json(result)
    assert facts["source_format"] == "openai-clip" and "act_layer" not in facts["guessed"]
    assert "truncated or corrupt" not in result.stderr and "Warning" not in result.stderr
    assert "dropped text tower" in result.stderr
    vit = load_vit(tmp_path / "ViT-T-8.pt", device="cpu")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit.model(x), model.encode_image(x), atol=1e-5, rtol=1e-5)


def test_open_clip_visual_tower_is_not_called_a_cnn(tmp_path):
    _, model = _open_clip_model(quick_gelu=False)
    torch.save(model.visual.state_dict(), tmp_path / "visual.pth")
    result = _info(str(tmp_path / "visual.pth"), "--num-heads", "1")
    facts = _json(result)
    assert facts["source_format"].startswith("open_clip") and "CNN" not in result.output
    assert "guessed act_layer" in result.stderr  # the activation is not in the weights: said on every command


def test_quick_gelu_weights_are_not_silently_gelu(tmp_path):
    _, model = _open_clip_model(quick_gelu=True)
    torch.save(model.state_dict(), tmp_path / "clip.pth")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.encode_image(x)
        guessed = load_vit(tmp_path / "clip.pth", num_heads=1, device="cpu")
        assert "act_layer" in guessed.guessed
        told = load_vit(tmp_path / "clip.pth", num_heads=1, device="cpu", model_kwargs={"act_layer": "quick_gelu"})
        assert "act_layer" not in told.guessed
        torch.testing.assert_close(told.model(x), ref, atol=1e-5, rtol=1e-5)
        assert (guessed.model(x) - ref).abs().max() > 1e-3  # open_clip's GELU default is another function


# ------------------------------------------------------------------------------------- misleading messages
def test_dinov2_registers_checkpoint_loads_instead_of_unexpected_key(tmp_path):
    model = make_vit("reg_no_embed_class")  # timm's form of DINOv2 with registers
    sd = {k: v for k, v in model.state_dict().items() if k != "reg_token"}
    # DINOv2's own form: the class token has a position-embedding row; registers are inserted after it.
    cls_pos = torch.randn(1, 1, 48)
    sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)  # [1, 1 + 16, 48]
    sd["cls_token"] = sd["cls_token"] - cls_pos
    sd["register_tokens"] = model.state_dict()["reg_token"]
    sd["mask_token"] = torch.zeros(1, 48)
    torch.save(sd, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    facts = _json(_info(str(tmp_path / "dinov2_vits14_reg4_pretrain.pth"), "--num-heads", "3"))
    assert facts["source_format"] == "dinov2" and facts["prefix_tokens"] == ["cls", "reg", "reg", "reg", "reg"]
    vit = load_vit(tmp_path / "dinov2_vits14_reg4_pretrain.pth", num_heads=3, device="cpu")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit.model.forward_features(x), model.forward_features(x), atol=1e-5, rtol=1e-5)


def test_ambiguous_width_asks_for_num_heads_in_one_line(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        model = VisionTransformer(img_size=28, patch_size=14, embed_dim=1536, depth=1, num_heads=24, num_classes=0)
    sd = {k: torch.zeros(v.shape) for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "giant.pth")
    result = _info(str(tmp_path / "giant.pth"))
    assert result.exit_code == 1
    assert "width 1536 has several" in result.stderr and "pass --num-heads" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_guesses_are_said_by_every_command_not_only_info(tmp_path):
    torch.save(make_vit("cls").state_dict(), tmp_path / "m.pth")
    result = runner.invoke(app, ["pos-sim", str(tmp_path / "m.pth"), "--num-heads", "3", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("warning: guessed")]
    assert len(lines) == 1 and "mean=(0.5, 0.5, 0.5)" in lines[0]
    quiet = runner.invoke(
        app, ["pos-sim", str(tmp_path / "m.pth"), "--num-heads", "3", "--out", str(tmp_path / "q"), "--quiet"]
    )
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_preprocess_flags_reach_the_model(tmp_path):
    torch.save(make_vit("cls").state_dict(), tmp_path / "m.pth")
    args = [str(tmp_path / "m.pth"), "--num-heads", "3", "--mean", "0.485,0.456,0.406", "--std", "0.2"]
    facts = _json(_info(*args, "--crop-pct", "0.875", "--interpolation", "bilinear"))
    assert facts["mean"] == pytest.approx([0.485, 0.456, 0.406]) and facts["std"] == pytest.approx([0.2] * 3)
    assert facts["crop_pct"] == 0.875 and facts["interpolation"] == "bilinear" and not facts["guessed"]
    bad = _info(*args[:3], "--interpolation", "cubic-ish")
    assert bad.exit_code == 2 and "--interpolation must be one of" in bad.stderr


# ------------------------------------------------------------------------------------------------- hub cache
def test_hf_hub_repo_of_any_library_loads_from_the_hub_cache(tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import constants

    _, folder, _ = _hf_vit_classifier(tmp_path)
    cache = tmp_path / "hub-cache"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--acme--tiny-vit"
    shutil.copytree(folder, repo / "snapshots" / revision)  # the layout hf_hub_download reads back
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no network here: the cache must be enough
    vit = load_vit("hf-hub:acme/tiny-vit", device="cpu")
    assert vit.source_format == "hf-transformers:ViTForImageClassification"
    assert vit.model_id == f"hf-hub:acme/tiny-vit@{revision}" and vit.class_names == ["cat", "dog", "fox"]
    missing = runner.invoke(app, ["info", "hf-hub:acme/absent", "--device", "cpu"])
    assert missing.exit_code == 1 and "found no model weights" in missing.stderr and "hf download" in missing.stderr


def test_open_clip_hub_folder_loads_with_its_config(tmp_path):
    from safetensors.torch import save_file

    open_clip, model = _open_clip_model(quick_gelu=True)
    from open_clip.push_to_hf_hub import save_config_for_hf

    pre = {"mean": (0.3,) * 3, "std": (0.6,) * 3, "interpolation": "bicubic", "resize_mode": "shortest"}
    open_clip.set_model_preprocess_cfg(model, pre)
    model_cfg = {
        "embed_dim": 16,
        "quick_gelu": True,
        "vision_cfg": {"layers": 2, "width": 64, "head_width": 64, "patch_size": 8, "image_size": 32},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    folder = tmp_path / "open_clip-hub"
    folder.mkdir()
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    save_config_for_hf(model, folder / "open_clip_config.json", model_config=model_cfg)
    vit = load_vit(folder, device="cpu")
    assert vit.source_format.startswith("open_clip") and not vit.guessed
    assert vit.preprocess.mean == pytest.approx((0.3,) * 3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit.model(x), model.encode_image(x), atol=1e-5, rtol=1e-5)
