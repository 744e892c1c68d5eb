"""A checkpoint's own classifier is kept when it is more than one Linear layer: the logits are the original model's."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import input_for, make_vit
from torch import nn
from typer.testing import CliRunner

from vitlens.cli.app import app
from vitlens.errors import ParameterError
from vitlens.models import load_vit
from vitlens.models.checkpoint import save_checkpoint
from vitlens.models.convert import build_head, build_vit

runner = CliRunner()
_BACKBONE = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)


def _randomise(module: nn.Module, seed: int = 3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def _with_head(name: str, head: nn.Module) -> nn.Module:
    """A fixture model whose Linear head is replaced by ``head`` (as a user's script would before training)."""
    model = make_vit(name)
    model.head = _randomise(head)
    return model.eval()


def _saved(model: nn.Module, path, rename: tuple[str, str] | None = None):
    sd = model.state_dict()
    if rename is not None:
        sd = {(rename[1] + k[len(rename[0]) :] if k.startswith(rename[0]) else k): v for k, v in sd.items()}
    torch.save(sd, path)
    return path


# -------------------------------------------------------------------------------------------- torchvision
@torch.no_grad()
def test_torchvision_representation_head_gives_torchvision_logits(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    tv = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5,
        representation_size=16,
    ).eval()  # fmt: skip
    _randomise(tv.heads)  # torchvision zero-initialises heads.head: the logits would test nothing
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    vit = load_vit(tmp_path / "tv.pth", num_heads=2, device="cpu")
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(vit.model(x), tv(x), atol=1e-5, rtol=1e-5)
    assert vit.num_classes == 5 and vit.dropped == []
    assert vit.describe()["head"] == "mlp: linear 32→16, tanh, linear 16→5"
    assert "head_act" not in vit.guessed  # torchvision's Tanh is in its code, not a guess
    # pre_logits is still what the classifier reads: the class token after the final norm (torchvision's heads input)
    seen: list[torch.Tensor] = []
    handle = tv.heads.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        tv(x)
    finally:
        handle.remove()
    torch.testing.assert_close(vit.pre_logits(vit.features(x)), seen[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- timm-layout state dicts
@torch.no_grad()
def test_sequential_head_is_kept_and_its_activation_guessed(tmp_path, caplog):
    # Linear, GELU, Dropout, Linear: parameters at head.0 and head.3.
    model = _with_head("cls", nn.Sequential(nn.Linear(48, 16), nn.GELU(), nn.Dropout(0.1), nn.Linear(16, 7)))
    with caplog.at_level(logging.WARNING, logger="vitlens"):
        vit = load_vit(_saved(model, tmp_path / "m.pth"), num_heads=3, device="cpu")
    x = input_for(model)
    torch.testing.assert_close(vit.model(x), model(x), atol=1e-5, rtol=1e-5)
    assert vit.num_classes == 7 and vit.dropped == []
    assert vit.describe()["head"] == "mlp: linear 48→16, gelu, linear 16→7"
    assert "GELU" in vit.guessed["head_act"] and "guessed head_act" in caplog.text  # said on every command
    assert vit.arch_kwargs["head_layers"] == [{"linear": [48, 16]}, {"act": "gelu"}, {"linear": [16, 7]}]
    assert vit.preprocess.mean == (0.5, 0.5, 0.5)  # timm's ViT default, not DeiT-III's (a converted note is no hint)


@torch.no_grad()
def test_head_act_from_model_kwargs_replaces_the_guess(tmp_path):
    model = _with_head("cls", nn.Sequential(nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 7), nn.Tanh()))
    # nn.Tanh after the last Linear has no parameters and is not in the state dict: trim it from the reference
    model.head = model.head[:3]
    path = _saved(model, tmp_path / "m.pth")
    x = input_for(model)
    guessed = load_vit(path, num_heads=3, device="cpu")
    assert not torch.allclose(guessed.model(x), model(x), atol=1e-3)  # GELU is not ReLU: the guess matters
    vit = load_vit(path, num_heads=3, model_kwargs={"head_act": "relu"}, device="cpu")
    torch.testing.assert_close(vit.model(x), model(x), atol=1e-5, rtol=1e-5)
    assert "head_act" not in vit.guessed and vit.describe()["head"] == "mlp: linear 48→16, relu, linear 16→7"


@torch.no_grad()
def test_mlp_head_prefix_with_layer_norm_first(tmp_path):
    # vit-pytorch's later mlp_head: LayerNorm(dim), Linear(dim, classes), on the mean-pooled tokens.
    model = _with_head("gap", nn.Sequential(nn.LayerNorm(48), nn.Linear(48, 4)))
    vit = load_vit(_saved(model, tmp_path / "p.pth", rename=("head.", "mlp_head.")), num_heads=3, device="cpu")
    x = input_for(model)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)  # [B, 48]
    ln, fc = model.head
    # The reference written out: (x - mean) / sqrt(var + 1e-5) * gamma + beta, then W x + b.
    mu, var = pooled.mean(-1, keepdim=True), pooled.var(-1, unbiased=False, keepdim=True)
    expected = ((pooled - mu) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias) @ fc.weight.T + fc.bias
    torch.testing.assert_close(vit.model(x), expected, atol=1e-5, rtol=1e-5)
    assert vit.describe()["head"] == "mlp: layer_norm 48, linear 48→4"
    assert "mlp_head -> head" in vit.converted and "head_layer_norm_eps" in vit.guessed


def test_reset_head_replaces_the_mlp_by_one_linear_layer(tmp_path):
    model = _with_head("cls", nn.Sequential(nn.Linear(48, 16), nn.GELU(), nn.Linear(16, 7)))
    vit = load_vit(_saved(model, tmp_path / "m.pth"), num_heads=3, device="cpu")
    vit.reset_head(3)
    assert isinstance(vit.model.head, nn.Linear) and vit.num_classes == 3
    assert vit.describe()["head"] == "linear 48→3"
    with torch.no_grad():
        assert torch.equal(vit.model(input_for(model)), torch.zeros(2, 3))  # zero-initialised (ViT paper §3.2)
    # A fine-tuned checkpoint records the new head, not the old MLP's description.
    assert "head_layers" not in vit.arch_kwargs and "head_act" not in vit.arch_kwargs
    out = save_checkpoint(
        tmp_path / "tuned.safetensors", vit.model.state_dict(), {"arch": vit.arch, "model_kwargs": vit.arch_kwargs}
    )
    again = load_vit(out, device="cpu")
    assert again.num_classes == 3 and again.describe()["head"] == "linear 48→3"


@torch.no_grad()
def test_vitlens_checkpoint_round_trips_the_head(tmp_path):
    model = _with_head("reg", nn.Sequential(nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 7)))
    first = load_vit(_saved(model, tmp_path / "m.pth"), num_heads=3, model_kwargs={"head_act": "relu"}, device="cpu")
    out = save_checkpoint(
        tmp_path / "v.safetensors", first.model.state_dict(), {"arch": first.arch, "model_kwargs": first.arch_kwargs}
    )
    again = load_vit(out, device="cpu")
    x = input_for(model)
    assert again.source_format == "vitlens" and again.guessed == {}
    torch.testing.assert_close(again.model(x), model(x), atol=1e-5, rtol=1e-5)
    assert again.describe()["head"] == "mlp: linear 48→16, relu, linear 16→7"


# -------------------------------------------------------------------------------------------- dropped
def test_dino_projection_head_stays_dropped(tmp_path, caplog):
    sd = {k: v for k, v in make_vit("cls").state_dict().items() if not k.startswith("head.")}
    sd["head.mlp.0.weight"], sd["head.mlp.0.bias"] = torch.zeros(64, 48), torch.zeros(64)
    sd["head.last_layer.weight_g"], sd["head.last_layer.weight_v"] = torch.ones(100, 1), torch.zeros(100, 64)
    torch.save(sd, tmp_path / "dino.pth")
    with caplog.at_level(logging.WARNING, logger="vitlens"):
        vit = load_vit(tmp_path / "dino.pth", num_heads=3, device="cpu")
    assert vit.num_classes == 0 and vit.describe()["head"] == "none"
    assert "head.mlp.0.weight" in vit.dropped[0] and "dropped classifier" in caplog.text


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("cls", {"head.0.weight": torch.zeros(16, 40), "head.0.bias": torch.zeros(16)}),  # not the width
        ("cls", {"head.0.weight": torch.zeros(16, 48)}),  # Linear without bias: not rebuilt
        ("distilled", {"head.0.weight": torch.zeros(16, 48), "head.0.bias": torch.zeros(16)}),  # two-headed DeiT
    ],
)
def test_heads_that_do_not_chain_are_dropped(tmp_path, name, head):
    sd = {k: v for k, v in make_vit(name).state_dict().items() if not k.startswith("head.")}
    torch.save({**sd, **head}, tmp_path / "h.pth")
    vit = load_vit(tmp_path / "h.pth", num_heads=3, device="cpu")
    assert vit.num_classes == 0 and vit.dropped


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("layers", "match"),
    [
        ([{"linear": [40, 5]}], "does not read the 48 features"),
        ([{"linear": [48, 16]}, {"act": "swish2"}, {"linear": [16, 5]}], "activation 'swish2'"),
        ([{"linear": [48, 16]}, {"act": "gelu"}], "must end with a linear layer"),
        ([{"conv": [48, 5]}], "unknown layer 'conv'"),
        ([], "non-empty list"),
    ],
)
def test_bad_head_layers_name_model_kwargs(layers, match):
    with pytest.raises(ParameterError, match=match) as err:
        build_head(layers, 48)
    assert err.value.param == "model_kwargs"


def test_head_act_without_a_multi_layer_head_and_num_classes_mismatch_are_refused():
    with pytest.raises(ParameterError, match="head_act applies"):
        build_vit("vit_inferred", {**_BACKBONE, "num_classes": 5, "head_act": "relu"})
    layers = [{"linear": [48, 16]}, {"act": "gelu"}, {"linear": [16, 7]}]
    with pytest.raises(ParameterError, match="num_classes 5 disagrees"):
        build_vit("vit_inferred", {**_BACKBONE, "num_classes": 5, "head_layers": layers})


# ------------------------------------------------------------------------------------------------- CLI
def test_info_json_shows_the_head_and_the_guess(tmp_path):
    model = _with_head("cls", nn.Sequential(nn.Linear(48, 16), nn.GELU(), nn.Linear(16, 7)))
    path = _saved(model, tmp_path / "m.pth")
    result = runner.invoke(app, ["info", str(path), "--num-heads", "3", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["head"] == "mlp: linear 48→16, gelu, linear 16→7" and facts["num_classes"] == 7
    assert "head_act" in facts["guessed"]
    bad = runner.invoke(app, ["info", str(path), "--num-heads", "3", "--model-kwargs", '{"head_act": "swish2"}'])
    assert bad.exit_code == 2 and "swish2" in bad.stderr and "Traceback" not in bad.stderr
