"""Training: loss goes down, held-out data stays held out, resume is exact, checkpoints rebuild, bad input fails."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import assert_one_line_error, make_vit
from vitlens.cli.app import app
from vitlens.errors import Interrupted
from vitlens.models import load_vit
from vitlens.models.checkpoint import read_checkpoint
from vitlens.train import PRESETS, TrainCallbacks, TrainConfig, preset_config, train

runner = CliRunner()

TINY = TrainConfig(
    data="digits",
    arch="vit_tiny_patch16_224",
    model_kwargs=dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
    epochs=3,
    batch_size=32,
    lr=3e-3,
    warmup_epochs=0.5,
    augment="none",
    device="cpu",
)


def test_training_lowers_the_loss_and_holds_out_test_data(tmp_path):
    result = train(TINY, tmp_path)
    first, last = result.history[0], result.history[-1]
    assert last.train_loss < first.train_loss
    assert last.test_acc > 0.25  # far above chance (0.1) after 3 tiny epochs
    from vitlens.data import open_dataset
    from vitlens.layout import Preprocess

    pre = Preprocess(img_size=(8, 8), in_chans=1, mean=(0.5,), std=(0.5,))
    train_names = set(open_dataset("digits", pre, split="train").names)
    test_names = set(open_dataset("digits", pre, split="test").names)
    assert not train_names & test_names
    assert (result.num_train, result.num_test) == (len(train_names), len(test_names))
    assert result.num_train + result.num_test == 1797
    rows = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("epoch,train_loss") and len(rows) == 4
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_checkpoint_metadata_round_trips(tmp_path):
    result = train(replace(TINY, epochs=1), tmp_path)
    raw = read_checkpoint(result.checkpoint)
    meta = raw.metadata
    assert meta["arch"] == "vit_tiny_patch16_224" and meta["num_classes"] == 10
    assert meta["class_names"] == [str(i) for i in range(10)]
    assert meta["data"] == "digits" and meta["epoch"] == 1 and meta["test_acc"] == pytest.approx(result.test_acc)
    assert meta["preprocess"]["mean"] == [0.5] and meta["vitlens_version"]
    vit = load_vit(result.checkpoint, device="cpu")  # rebuilt from the metadata alone
    assert vit.layout.grid_size == (4, 4) and vit.in_chans == 1 and not vit.guessed
    # the rebuilt model reproduces the recorded held-out accuracy
    from vitlens.data import iterate_batches, open_dataset
    from vitlens.train import evaluate

    ds = open_dataset("digits", vit.preprocess, split="test")
    batch = next(iterate_batches(ds, batch_size=len(ds)))
    assert evaluate(vit.model, batch.images, batch.labels) == pytest.approx(result.test_acc)


def test_resume_gives_the_same_weights(tmp_path):
    straight = train(TINY, tmp_path / "a")
    with pytest.raises(Interrupted, match="resume with"):
        train(TINY, tmp_path / "b", stop_after_steps=70)  # mid-way through epoch 2 (44 steps an epoch)
    assert not (tmp_path / "b" / "model.safetensors").exists()
    resumed = train(TrainConfig(epochs=0), tmp_path / "b", resume=True)
    a = read_checkpoint(straight.checkpoint).state_dict
    b = read_checkpoint(resumed.checkpoint).state_dict
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # every row of metrics.csv, the interrupted epoch's included (its sums before the stop travel in resume.pt)
    numbers = [[(h.epoch, h.train_loss, h.train_acc, h.test_acc, h.lr) for h in r.history] for r in (resumed, straight)]
    assert numbers[0] == numbers[1]


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path):
    def press_ctrl_c(epoch, step, loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        train(replace(TINY, epochs=1), tmp_path, callbacks=TrainCallbacks(on_step=press_ctrl_c))
    state = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 4)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_save_every_keeps_the_trajectory(tmp_path):
    train(replace(TINY, epochs=3, save_every=1), tmp_path)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["epoch_001.safetensors", "epoch_002.safetensors"]  # the last one is model.safetensors
    assert read_checkpoint(tmp_path / "checkpoints" / "epoch_002.safetensors").metadata["epoch"] == 2


def test_finetune_replaces_head_and_resamples_pos_embed(tmp_path):
    from vitlens.train import _finetune_model

    src = tmp_path / "src.pth"
    torch.save(make_vit("cls").state_dict(), src)  # 5 classes, 32 px, 4x4 grid
    ft = replace(TINY, init_from=str(src), img_size=(48, 48), model_kwargs={"num_heads": 3})
    built = _finetune_model(ft, num_classes=10)
    assert built.model.head.out_features == 10
    assert torch.count_nonzero(built.model.head.weight) == 0 and torch.count_nonzero(built.model.head.bias) == 0
    assert tuple(built.model.patch_embed.grid_size) == (6, 6) and built.model.pos_embed.shape[1] == 37
    # and a short fine-tuning run writes a checkpoint that rebuilds at the new size
    result = train(replace(ft, epochs=1), tmp_path / "ft")
    vit = load_vit(result.checkpoint, device="cpu")
    assert vit.layout.grid_size == (6, 6) and vit.num_classes == 10 and vit.in_chans == 3


@pytest.mark.parametrize(
    ("total_steps", "warmup_steps", "lr", "min_lr"),
    [(132, 22, 3e-3, 1e-5), (300, 45, 1e-3, 1e-5), (40, 0, 5e-4, 0.0), (20, 15, 1e-2, 1e-4)],
)
def test_lr_at_is_timms_cosine_schedule_with_warmup(total_steps, warmup_steps, lr, min_lr):
    # timm's CosineLRScheduler updated per optimiser step: linear warmup from lr/100 as a prefix, then one cosine
    # cycle of the remaining steps down to min_lr, where it stays. TINY's schedule is the first case (3 x 44 steps).
    from timm.scheduler import CosineLRScheduler

    from vitlens.train import lr_at

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=total_steps - warmup_steps,
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=lr / 100,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    ours, timms = [], []
    for step in range(total_steps + 3):  # a few steps past the end: min_lr, not a second cycle
        scheduler.step_update(num_updates=step)
        timms.append(optimizer.param_groups[0]["lr"])
        ours.append(lr_at(step, total_steps=total_steps, warmup_steps=warmup_steps, lr=lr, min_lr=min_lr))
    np.testing.assert_allclose(ours, timms, rtol=1e-12, atol=0)


def test_every_preset_is_a_train_config():
    for name in PRESETS:
        preset_config(name)  # a key that is not a TrainConfig field raises TypeError


def _cli(*args):
    return runner.invoke(app, ["train", *map(str, args)])


def test_cli_train_json(tmp_path):
    mk = json.dumps({"mlp_ratio": 2.0, "in_chans": 1})
    result = _cli(
        "--data", "digits", "--arch", "vit_tiny_patch16_224", "--img-size", 16, "--patch-size", 4,
        "--embed-dim", 32, "--depth", 1, "--num-heads", 2, "--model-kwargs", mk, "--epochs", 1,
        "--device", "cpu", "--out", tmp_path, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["epochs"] == 1 and 0 <= data["test_acc"] <= 1 and data["num_train"] + data["num_test"] == 1797
    assert (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("setup", "args", "needle"),
    [
        ("unlabelled", ["--data", "{dir}"], "has no labels"),
        ("one_class", ["--data", "{dir}"], "at least 2"),
        (None, ["--data", "digits", "--arch", "resnet10t"], "not a Vision Transformer"),
        (None, ["--data", "digits", "--out", "/proc/vitlens-cannot-write"], "cannot create output directory"),
        (None, ["--resume", "{dir}"], "nothing to resume"),
    ],
)
def test_cli_train_errors(tmp_path, setup, args, needle):
    folder = tmp_path / "data"
    folder.mkdir()
    if setup == "unlabelled":
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    elif setup == "one_class":
        (folder / "cat").mkdir()
        for i in range(5):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / "cat" / f"{i}.png")
    args = [a.replace("{dir}", str(folder)) for a in args]
    if "--out" not in args and "--resume" not in args:
        args += ["--out", str(tmp_path / "out")]
    result = _cli(*args, "--epochs", "1", "--device", "cpu")
    assert_one_line_error(result, 1, needle)


@pytest.mark.slow
def test_demo_preset_reaches_95_percent_and_reproduces_the_shipped_model(tmp_path):
    from vitlens.models.load import demo_checkpoint_path

    config = preset_config("demo", device="cpu")
    shipped = read_checkpoint(demo_checkpoint_path()).metadata
    recorded = {k: v for k, v in shipped["train_config"].items() if k != "device"}
    assert recorded == {k: v for k, v in config.to_json().items() if k != "device"}  # shipped = today's preset
    result = train(config, tmp_path)
    assert result.test_acc >= 0.95
    assert abs(shipped["test_acc"] - result.test_acc) <= 0.015  # same seed -> same accuracy within noise
