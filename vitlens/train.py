"""Training small ViTs from scratch and fine-tuning loadable ones, with exact resume and atomic checkpoints.

The recipe is the small-data recipe of DeiT / "How to train your ViT" (AugReg), scaled down: AdamW, linear warmup
then cosine decay, label smoothing, global-norm gradient clipping as in the ViT paper, random crop with padding and
(where it makes sense) horizontal flips. Every random choice of a step is drawn from a generator seeded by
(seed, epoch, step), so a run interrupted anywhere and resumed gives the same weights as an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from vitlens import __version__
from vitlens.errors import Interrupted, UsageError, VitlensError
from vitlens.history import EpochStats
from vitlens.io import atomic_path, ensure_out_dir, write_text
from vitlens.layout import Preprocess
from vitlens.log import logger

if TYPE_CHECKING:
    import torch
    from torch import nn

Augment = Literal["none", "basic", "strong"]
# Datasets whose images must not be mirrored (digits and text read differently when flipped).
NO_FLIP_DATA = ("digits", "mnist", "svhn")
GREY_DATA = ("digits", "mnist", "fashion-mnist")
RESUME_FILE = "resume.pt"
FINAL_FILE = "model.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; stored in checkpoints and resume files."""

    data: str = "digits"  # --data spec (must have labels)
    arch: str = "vit_tiny_patch16_224"  # timm ViT architecture for training from scratch
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # timm kwargs (img_size, depth, ...); with init_from,
    # the loader's options for the source model (num_heads, extra timm kwargs)
    init_from: str | None = None  # fine-tune this model (anything load_vit accepts) instead of training from scratch
    img_size: tuple[int, int] | None = None  # fine-tuning: resample the position embedding to this size
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3  # peak AdamW learning rate, reached after warmup
    weight_decay: float = 0.05  # DeiT's AdamW weight decay; not applied to norms, biases, pos. emb. and tokens
    warmup_epochs: float = 3.0  # linear warmup from lr/100 (DeiT uses 5 of 300 epochs; small runs need fewer)
    min_lr: float = 1e-5  # cosine decays to this
    label_smoothing: float = 0.1  # DeiT / AugReg
    grad_clip: float = 1.0  # global-norm clipping at 1, as in the ViT paper (App. B.1)
    augment: Augment = "basic"  # none | basic (crop with padding + flip where sensible) | strong (+ random erasing)
    translate: float = 0.125  # crop padding as a fraction of the side (CIFAR's classic 4 px of 32)
    seed: int = 0
    save_every: int = 0  # keep a checkpoint every N epochs (0: only the final one)
    data_root: str | None = None
    download: bool = False
    device: str = "auto"
    num_workers: int = 0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["img_size"] = list(self.img_size) if self.img_size else None
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        if data.get("img_size"):
            data["img_size"] = tuple(data["img_size"])
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


# Presets: settings measured to work (see docs/training.md for accuracy and time on a 2-core CPU).
PRESETS: dict[str, dict[str, Any]] = {
    # The embedded demo model: 32x32 grey digits, patch 4 -> an 8x8 grid worth looking at. Digits are centred, so
    # crops are padded by a quarter of the side (+-8 px = +-2 patches): every position then sees strokes, and the
    # position embeddings learn a clean 2-D structure (docs/training.md has the numbers). 8 heads of width 8 give
    # more spread in attention distance than 4 of width 16 at the same cost.
    "demo": dict(
        data="digits",
        arch="vit_tiny_patch16_224",
        model_kwargs=dict(img_size=32, patch_size=4, in_chans=1, embed_dim=64, depth=4, num_heads=8, mlp_ratio=2.0),
        epochs=40,
        batch_size=64,
        lr=2e-3,
        weight_decay=0.05,
        warmup_epochs=3.0,
        augment="basic",
        translate=0.25,
        seed=0,
    ),
    # A small ViT for 32x32 CIFAR-10 photos: patch 4 (8x8 grid), 6 layers of width 192.
    "cifar10-tiny": dict(
        data="cifar10",
        arch="vit_tiny_patch16_224",
        model_kwargs=dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=2.0),
        epochs=50,
        batch_size=128,
        lr=1e-3,
        weight_decay=0.05,
        warmup_epochs=5.0,
        augment="basic",
        seed=0,
    ),
}


def preset_config(name: str, **overrides: Any) -> TrainConfig:
    if name not in PRESETS:
        raise UsageError(f"unknown preset '{name}': choose from {', '.join(PRESETS)}")
    return TrainConfig(**{**PRESETS[name], **overrides})


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    history: list[EpochStats]
    test_acc: float
    seconds: float
    num_train: int
    num_test: int


@dataclass
class TrainCallbacks:
    """Progress hooks for the CLI; the library itself prints nothing."""

    on_start: Callable[[int, int, int, int], None] | None = None  # (epochs, steps_per_epoch, start_epoch, batch)
    on_step: Callable[[int, int, float], None] | None = None  # (epoch, step, loss)
    on_epoch: Callable[[EpochStats], None] | None = None


# ------------------------------------------------------------------------------------------------ data
@dataclass
class _Tensors:
    images: torch.Tensor  # [N, C, H, W] normalised, on the training device
    labels: torch.Tensor  # [N] int64
    classes: list[str]
    spec: str


def _load_split(config: TrainConfig, preprocess: Preprocess, split: str, device: torch.device) -> _Tensors:
    """Decode a split once into memory: small-data training re-reads every image each epoch."""
    import torch

    from vitlens.data import iterate_batches, open_dataset

    ds = open_dataset(
        config.data,
        preprocess,
        split=split,  # type: ignore[arg-type]
        data_root=config.data_root,
        download=config.download,
        require_labels=True,
    )
    images, labels = [], []
    for batch in iterate_batches(ds, batch_size=256, num_workers=config.num_workers):
        images.append(batch.images)
        labels.append(batch.labels)
    return _Tensors(torch.cat(images).to(device), torch.cat(labels).to(device), list(ds.classes or []), ds.spec)


def _augment(
    x: torch.Tensor, *, mode: Augment, flip: bool, gen: torch.Generator, translate: float = 0.125
) -> torch.Tensor:
    """Random crop with zero padding of ``translate`` x the side (+ flips, + random erasing for 'strong')."""
    import torch
    import torch.nn.functional as F

    if mode == "none":
        return x
    b, _, h, w = x.shape
    ph, pw = max(1, round(h * translate)), max(1, round(w * translate))
    padded = F.pad(x, (pw, pw, ph, ph))  # zero = the mean colour after normalisation
    oy = torch.randint(0, 2 * ph + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pw + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h)).to(x.device)  # [B, H]
    cols = (ox[:, None] + torch.arange(w)).to(x.device)  # [B, W]
    bidx = torch.arange(b, device=x.device)[:, None, None]
    x = padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # [B, C, H, W]
    if flip:
        mirror = (torch.rand(b, generator=gen) < 0.5).to(x.device)
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    if mode == "strong":  # random erasing (Zhong et al. 2020), as in DeiT, of a quarter-sized box
        erase = (torch.rand(b, generator=gen) < 0.25).to(x.device)
        ey = torch.randint(0, h - h // 2 + 1, (b,), generator=gen).to(x.device)
        ex = torch.randint(0, w - w // 2 + 1, (b,), generator=gen).to(x.device)
        yy = torch.arange(h, device=x.device)[None, :, None]
        xx = torch.arange(w, device=x.device)[None, None, :]
        box = (yy >= ey[:, None, None]) & (yy < ey[:, None, None] + h // 2)
        box = box & (xx >= ex[:, None, None]) & (xx < ex[:, None, None] + w // 2) & erase[:, None, None]
        x = x.masked_fill(box[:, None], 0.0)
    return x


# ----------------------------------------------------------------------------------------------- model
@dataclass
class _Model:
    model: nn.Module
    arch: str
    kwargs: dict[str, Any]
    preprocess: Preprocess
    source: str | None


def _scratch_model(config: TrainConfig, num_classes: int) -> _Model:
    from vitlens.models.load import build_model
    from vitlens.models.vit import is_timm_vit, token_layout

    kwargs = dict(config.model_kwargs)
    base = config.data.split(":")[0].lower()
    kwargs.setdefault("in_chans", 1 if base in GREY_DATA else 3)
    if config.img_size is not None:
        kwargs["img_size"] = tuple(config.img_size)
    kwargs["num_classes"] = num_classes
    model = build_model(config.arch, kwargs)
    if not is_timm_vit(model):
        raise VitlensError(f"--arch {config.arch} is not a Vision Transformer; vitlens trains timm ViTs only")
    in_chans = int(kwargs["in_chans"])
    preprocess = Preprocess(
        img_size=token_layout(model).img_size,
        in_chans=in_chans,
        mean=(0.5,) * in_chans,  # timm's ViT default: inputs in [-1, 1]
        std=(0.5,) * in_chans,
        interpolation="bicubic",
        crop_pct=1.0,
    )
    if "img_size" in kwargs and isinstance(kwargs["img_size"], tuple):
        kwargs["img_size"] = list(kwargs["img_size"])
    return _Model(model, config.arch, kwargs, preprocess, None)


def _finetune_model(config: TrainConfig, num_classes: int) -> _Model:
    """Load ``init_from``, resample its position embedding, and give it a new zero-initialised head.

    The ViT paper fine-tunes with a zero-initialised D x K head (§3.2); its position embeddings are resampled
    (timm's interpolation) when the input size changes.
    """

    from vitlens.models.load import load_vit

    load_kwargs = dict(config.model_kwargs)  # when fine-tuning: options for loading the source model
    heads = load_kwargs.pop("num_heads", None)
    vit = load_vit(config.init_from, num_heads=heads, model_kwargs=load_kwargs, img_size=config.img_size, device="cpu")
    vit.reset_head(num_classes)  # zero-initialised, as the ViT paper fine-tunes (§3.2)
    model = vit.model
    arch = vit.arch.split(".")[0] if vit.arch and not vit.arch.startswith("hf-hub:") else vit.arch
    kwargs = dict(vit.arch_kwargs)
    kwargs["img_size"] = list(vit.layout.img_size)
    kwargs["num_classes"] = num_classes
    if arch.startswith("hf-hub:") or not arch:
        raise VitlensError(
            f"cannot record how to rebuild '{vit.source}' for a vitlens checkpoint; fine-tune from a timm name "
            "or a checkpoint file"
        )
    return _Model(model, arch, kwargs, vit.preprocess, vit.source)


# ------------------------------------------------------------------------------------------- schedule
def lr_at(step: int, *, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warmup from lr/100 to lr, then cosine decay to min_lr (per optimiser step).

    The same schedule as timm's ``CosineLRScheduler(t_initial=total_steps - warmup_steps, lr_min=min_lr,
    warmup_t=warmup_steps, warmup_lr_init=lr / 100, warmup_prefix=True, t_in_epochs=False)`` stepped with
    ``step_update(step)``; ``step`` counts the optimiser steps already taken.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (0.01 + 0.99 * step / warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _step_seed(seed: int, epoch: int, step: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + step) % (2**63 - 1)


# ---------------------------------------------------------------------------------------------- interrupts
@contextmanager
def _stop_on_sigint() -> Iterator[dict[str, bool]]:
    """Turn the first Ctrl-C into a request to stop after the current step; a second one stops at once."""
    flag = {"stop": False}
    try:
        previous = signal.getsignal(signal.SIGINT)
    except ValueError:  # not the main thread: leave signals alone
        yield flag
        return

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------------------------------- train
def train(
    config: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    callbacks: TrainCallbacks | None = None,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Train (or fine-tune) a ViT and write ``model.safetensors``, ``metrics.csv`` and ``curves.png`` to ``out``.

    Args:
        config: the run's settings (ignored with ``resume``, except ``epochs`` which may extend the run).
        out: output directory; also where ``resume.pt`` lives.
        resume: continue the run saved in ``out/resume.pt``.
        callbacks: progress hooks.
        stop_after_steps: behave as if Ctrl-C came after this many optimiser steps (for tests).

    Raises:
        Interrupted: Ctrl-C; a resumable ``resume.pt`` was written first.
        VitlensError: bad data (no labels, one class), an architecture that is not a ViT, an unwritable ``out``.
    """
    import torch

    from vitlens.device import resolve_device
    from vitlens.models.checkpoint import save_checkpoint

    callbacks = callbacks or TrainCallbacks()
    out = ensure_out_dir(out)
    state = None
    if resume:
        state = _read_resume(out)
        saved = TrainConfig.from_json(json.loads(state["config"]))
        config = replace(saved, epochs=max(config.epochs, saved.epochs) if config.epochs else saved.epochs)
    _validate(config)
    device = resolve_device(config.device)

    # Labels first (cheap) so that one-class data fails before any model is built.
    torch.manual_seed(config.seed)
    probe = _probe_classes(config)
    built = _finetune_model(config, len(probe)) if config.init_from else _scratch_model(config, len(probe))
    model = built.model.to(device)
    train_set = _load_split(config, built.preprocess, "train", device)
    test_set = _load_split(config, built.preprocess, "test", device)
    flip = config.data.split(":")[0].lower() not in NO_FLIP_DATA

    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(model, config.weight_decay, no_weight_decay_list=model.no_weight_decay())
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999))
    n = len(train_set.labels)
    steps_per_epoch = max(1, n // config.batch_size)  # drop the last partial batch: steady batch statistics
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(config.warmup_epochs * steps_per_epoch)
    autocast_dtype = _autocast_dtype(device)
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None

    start_epoch, start_step, history = 0, 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_step = int(state["epoch"]), int(state["step"])
        history = [EpochStats(**h) for h in json.loads(state["history"])]
        if start_epoch >= config.epochs:
            raise VitlensError(f"the run in {out} already finished {start_epoch} epochs; raise --epochs to extend it")
    if callbacks.on_start:
        callbacks.on_start(config.epochs, steps_per_epoch, start_epoch, config.batch_size)

    meta_base = {
        "arch": built.arch,
        "model_kwargs": built.kwargs,
        "preprocess": built.preprocess.as_dict(),
        "class_names": train_set.classes,
        "num_classes": len(train_set.classes),
        "vitlens_version": __version__,
        "data": config.data,
        "train_config": config.to_json(),
        "init_from": built.source,
    }
    steps_done = start_epoch * steps_per_epoch + start_step
    started = time.perf_counter()
    with _stop_on_sigint() as sig:
        for epoch in range(start_epoch, config.epochs):
            model.train()
            epoch_started = time.perf_counter()
            order = torch.randperm(n, generator=torch.Generator().manual_seed(_step_seed(config.seed, epoch, -1)))
            loss_sum, correct, seen = 0.0, 0, 0
            first = start_step if epoch == start_epoch else 0
            for step in range(first, steps_per_epoch):
                if sig["stop"] or (stop_after_steps is not None and steps_done >= stop_after_steps):
                    _save_resume(out, model, optimizer, scaler, config, epoch, step, history)
                    raise Interrupted(
                        f"interrupted at epoch {epoch + 1} step {step}; resume with: vitlens train --resume {out}"
                    )
                gen = torch.Generator().manual_seed(_step_seed(config.seed, epoch, step))
                torch.manual_seed(_step_seed(config.seed, epoch, step))  # dropout / drop-path draws
                idx = order[step * config.batch_size : (step + 1) * config.batch_size].to(device)
                x = _augment(train_set.images[idx], mode=config.augment, flip=flip, gen=gen, translate=config.translate)
                y = train_set.labels[idx]
                lr = lr_at(
                    steps_done, total_steps=total_steps, warmup_steps=warmup_steps, lr=config.lr, min_lr=config.min_lr
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits = model(x)
                    loss = torch.nn.functional.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
                if not torch.isfinite(loss):
                    raise VitlensError(f"training diverged (loss {loss.item()}) at epoch {epoch + 1}; lower --lr")
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                    optimizer.step()
                steps_done += 1
                loss_sum += loss.item() * len(y)
                correct += int((logits.argmax(-1) == y).sum())
                seen += len(y)
                if callbacks.on_step:
                    callbacks.on_step(epoch, step, loss.item())
            test_acc = evaluate(model, test_set.images, test_set.labels, batch_size=256)
            seconds = time.perf_counter() - epoch_started
            stats = EpochStats(
                epoch=epoch + 1,
                train_loss=loss_sum / max(1, seen),
                train_acc=correct / max(1, seen),
                test_acc=test_acc,
                lr=lr_at(
                    steps_done, total_steps=total_steps, warmup_steps=warmup_steps, lr=config.lr, min_lr=config.min_lr
                ),
                seconds=seconds,
                images_per_s=seen / max(seconds, 1e-9),
            )
            history.append(stats)
            _write_metrics(out, history)
            meta = {**meta_base, "epoch": epoch + 1, "test_acc": test_acc}
            if config.save_every and (epoch + 1) % config.save_every == 0 and epoch + 1 < config.epochs:
                (out / "checkpoints").mkdir(exist_ok=True)
                save_checkpoint(out / "checkpoints" / f"epoch_{epoch + 1:03d}.safetensors", model.state_dict(), meta)
            _save_resume(out, model, optimizer, scaler, config, epoch + 1, 0, history)
            if callbacks.on_epoch:
                callbacks.on_epoch(stats)
    final_meta = {**meta_base, "epoch": len(history), "test_acc": history[-1].test_acc if history else None}
    checkpoint = save_checkpoint(out / FINAL_FILE, model.state_dict(), final_meta)
    _write_curves(out, history)
    return TrainResult(
        checkpoint=checkpoint,
        history=history,
        test_acc=history[-1].test_acc if history else float("nan"),
        seconds=time.perf_counter() - started,
        num_train=n,
        num_test=len(test_set.labels),
    )


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on preprocessed ``images`` (eval mode, no augmentation)."""
    import torch

    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(labels), batch_size):
            correct += int((model(images[i : i + batch_size]).argmax(-1) == labels[i : i + batch_size]).sum())
    return correct / max(1, len(labels))


def _validate(config: TrainConfig) -> None:
    checks = [
        (config.epochs >= 1, f"--epochs must be at least 1, not {config.epochs}"),
        (config.batch_size >= 1, f"--batch-size must be at least 1, not {config.batch_size}"),
        (config.lr > 0, f"--lr must be positive, not {config.lr}"),
        (config.weight_decay >= 0, f"--weight-decay must be >= 0, not {config.weight_decay}"),
        (config.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, not {config.warmup_epochs}"),
        (0 <= config.label_smoothing < 1, f"--label-smoothing must be in [0, 1), not {config.label_smoothing}"),
        (config.save_every >= 0, f"--save-every must be >= 0, not {config.save_every}"),
        (config.augment in ("none", "basic", "strong"), "--augment must be none, basic or strong"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def _probe_classes(config: TrainConfig) -> list[str]:
    """The training split's classes (labels only, no decoding); fails for unlabelled or one-class data."""
    from vitlens.data import open_dataset

    probe = open_dataset(
        config.data,
        Preprocess(img_size=(8, 8), in_chans=1, mean=(0.5,), std=(0.5,)),
        split="train",
        data_root=config.data_root,
        download=config.download,
        require_labels=True,
    )
    classes = list(probe.classes or [])
    present = len(set(int(v) for v in probe.labels)) if probe.labels is not None else 0
    if present < 2:
        raise VitlensError(f"{config.data} has {present} class with images; training a classifier needs at least 2")
    return classes


def _autocast_dtype(device: torch.device):
    """bf16 where the GPU supports it, else fp16 with loss scaling; full precision on CPU / MPS."""
    import torch

    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _save_resume(out: Path, model, optimizer, scaler, config: TrainConfig, epoch: int, step: int, history) -> None:
    """Everything needed to continue exactly: weights, optimiser, scaler, position (epoch, step), history.

    Random state needs no saving: every step's draws come from generators seeded by (seed, epoch, step).
    The file holds tensors and plain values only, so it is read back with ``weights_only=True``.
    """
    import torch

    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "step": step,
        "config": json.dumps(config.to_json()),
        "history": json.dumps([asdict(h) for h in history]),
        "vitlens_version": __version__,
    }
    if scaler is not None:
        payload["scaler"] = scaler.state_dict()
    with atomic_path(out / RESUME_FILE) as tmp:
        torch.save(payload, tmp)


def _read_resume(out: Path) -> dict[str, Any]:
    import torch

    path = out / RESUME_FILE
    if not path.exists():
        raise VitlensError(f"nothing to resume: {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or hostile: never executed, always one line
        raise VitlensError(f"cannot resume from {path}: {str(e).splitlines()[0][:160]}")


def _write_metrics(out: Path, history: list[EpochStats]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["epoch", "train_loss", "train_acc", "test_acc", "lr", "seconds", "images_per_s"])
    for h in history:
        writer.writerow(
            [h.epoch, f"{h.train_loss:.6f}", f"{h.train_acc:.6f}", f"{h.test_acc:.6f}", f"{h.lr:.3e}",
             f"{h.seconds:.3f}", f"{h.images_per_s:.1f}"]
        )  # fmt: skip
    write_text(out / "metrics.csv", buf.getvalue())


def _write_curves(out: Path, history: list[EpochStats]) -> None:
    if not history:
        return
    from vitlens.plotting.curves import training_curves_figure
    from vitlens.plotting.style import save_figure

    save_figure(training_curves_figure(history), out / "curves.png")
    logger.debug("wrote %s", out / "curves.png")
