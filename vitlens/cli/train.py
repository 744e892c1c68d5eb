"""`vitlens train`: train a small ViT from scratch or fine-tune a loadable one, with progress and checkpoints."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from vitlens.cli.console import err_console, out_console, print_json, run_metadata, torchrun_rank
from vitlens.cli.options import (
    DataRootOpt,
    DeviceOpt,
    DownloadOpt,
    ImgSizeOpt,
    JsonOpt,
    ModelKwargsOpt,
    ModelOptions,
    NumHeadsOpt,
    QuietOpt,
)
from vitlens.errors import UsageError

RECIPE = "Recipe"


def train(
    data: Annotated[str | None, typer.Option("--data", help="Labelled data: digits, cifar10, ..., or DIR.")] = None,
    arch: Annotated[str | None, typer.Option("--arch", help="timm ViT architecture (from scratch).")] = None,
    preset: Annotated[
        str | None, typer.Option("--preset", help="demo | cifar10-tiny: tested settings; flags override.")
    ] = None,
    init_from: Annotated[
        str | None, typer.Option("--from", help="Fine-tune this model (file, timm name, demo) instead.")
    ] = None,
    img_size: ImgSizeOpt = None,
    patch_size: Annotated[int | None, typer.Option("--patch-size", help="Patch size (from scratch).")] = None,
    embed_dim: Annotated[int | None, typer.Option("--embed-dim", help="Width (from scratch).")] = None,
    depth: Annotated[int | None, typer.Option("--depth", help="Number of blocks (from scratch).")] = None,
    num_heads: NumHeadsOpt = None,
    model_kwargs: ModelKwargsOpt = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Epochs.", rich_help_panel=RECIPE)] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", rich_help_panel=RECIPE)] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.", rich_help_panel=RECIPE)] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay", rich_help_panel=RECIPE)] = None,
    warmup_epochs: Annotated[float | None, typer.Option("--warmup-epochs", rich_help_panel=RECIPE)] = None,
    label_smoothing: Annotated[float | None, typer.Option("--label-smoothing", rich_help_panel=RECIPE)] = None,
    augment: Annotated[
        str | None, typer.Option("--augment", help="none | basic | strong.", rich_help_panel=RECIPE)
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", rich_help_panel=RECIPE)] = None,
    save_every: Annotated[
        int | None, typer.Option("--save-every", help="Keep a checkpoint every N epochs.", rich_help_panel=RECIPE)
    ] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue the interrupted run in this directory.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/<preset or arch>).")] = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a ViT on labelled data; writes model.safetensors, metrics.csv and curves.png to --out.

    Under torchrun: DistributedDataParallel, --batch-size is the global batch (split across the ranks).
    """
    from vitlens import train as lib

    started = time.perf_counter()
    values: dict[str, Any] = {
        "data": data,
        "arch": arch,
        "init_from": init_from,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "warmup_epochs": warmup_epochs,
        "label_smoothing": label_smoothing,
        "augment": augment,
        "seed": seed,
        "save_every": save_every,
        "data_root": str(data_root) if data_root else None,
        "download": download or None,
        "device": device,
    }
    overrides = {k: v for k, v in values.items() if v is not None}
    arch_overrides = {
        k: v
        for k, v in {"patch_size": patch_size, "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}.items()
        if v is not None
    }
    extra_kwargs = ModelOptions(model_kwargs=model_kwargs).kwargs()
    if init_from and (arch or patch_size or embed_dim or depth):
        raise UsageError("--from fine-tunes an existing model: --arch/--patch-size/--embed-dim/--depth do not apply")
    if resume is not None:
        out = resume
        config = lib.TrainConfig(epochs=epochs or 0)
    else:
        base = lib.PRESETS[preset] if preset else {}
        if preset and preset not in lib.PRESETS:
            raise UsageError(f"unknown preset '{preset}': choose from {', '.join(lib.PRESETS)}")
        if not preset and not data:
            raise UsageError("--data is required (or use --preset demo)")
        mk = {**base.get("model_kwargs", {}), **extra_kwargs, **arch_overrides}
        if init_from:  # the loader's options for the source model
            mk = {**extra_kwargs, **({"num_heads": num_heads} if num_heads else {})}
        from vitlens.models.load import parse_img_size

        size = parse_img_size(img_size)
        config = lib.TrainConfig(**{**base, **overrides, "model_kwargs": mk, "img_size": size})
        if out is None:
            out = Path("runs") / (preset or config.arch)
    progress = _Progress(quiet=quiet or (torchrun_rank() or 0) != 0)  # torchrun: rank 0 reports for all
    callbacks = lib.TrainCallbacks(on_start=progress.start, on_step=progress.step, on_epoch=progress.epoch)
    try:
        result = lib.train(config, out, resume=resume is not None, callbacks=callbacks)
    finally:
        progress.close()
    summary = {
        "checkpoint": str(result.checkpoint),
        "test_acc": result.test_acc,
        "epochs": len(result.history),
        "num_train": result.num_train,
        "num_test": result.num_test,
        "seconds": round(result.seconds, 2),
        "history": [h.__dict__ for h in result.history],
    }
    if json_:
        print_json({**summary, "meta": run_metadata(started, command="train")})
    elif not quiet:
        out_console().print(
            f"held-out accuracy [bold]{100 * result.test_acc:.2f}%[/] after {len(result.history)} epochs "
            f"({result.seconds:.0f} s, {result.num_train} train / {result.num_test} held-out images)\n"
            f"wrote {result.checkpoint}, {Path(out) / 'metrics.csv'}, {Path(out) / 'curves.png'}"
        )


class _Progress:
    """A transient rich progress bar per epoch (loss) on a terminal, and one stderr line per finished epoch."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet
        self.console = err_console()
        self.bar = None
        self.task = None
        self.epochs = 0
        self.steps = 0

    def start(self, epochs: int, steps_per_epoch: int, start_epoch: int, batch_size: int) -> None:
        self.epochs, self.steps = epochs, steps_per_epoch
        if self.quiet or not self.console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}"),
            TextColumn("{task.fields[ips]:,.0f} img/s"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task(
            f"epoch {start_epoch + 1}/{epochs}", total=steps_per_epoch, loss=float("nan"), ips=0.0
        )
        self.batch_size = batch_size
        self.epoch_started = time.perf_counter()
        self.first_step = None

    def step(self, epoch: int, step: int, loss: float) -> None:
        if self.bar is None:
            return
        if self.first_step is None:
            self.first_step, self.epoch_started = step, time.perf_counter()
        elapsed = time.perf_counter() - self.epoch_started
        ips = (step - self.first_step) * self.batch_size / elapsed if elapsed > 0 else 0.0
        desc = f"epoch {epoch + 1}/{self.epochs}"
        self.bar.update(self.task, completed=step + 1, loss=loss, ips=ips, description=desc)

    def epoch(self, stats) -> None:
        if self.quiet:
            return
        self.console.print(
            f"epoch {stats.epoch:>3}/{self.epochs}  loss {stats.train_loss:.4f}  "
            f"held-out {100 * stats.test_acc:6.2f}%  {stats.images_per_s:,.0f} img/s  {stats.seconds:.1f} s"
        )
        if self.bar is not None:
            self.bar.reset(self.task, total=self.steps, loss=float("nan"), ips=0.0)
            self.first_step = None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
