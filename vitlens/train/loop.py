"""The training loop: builds a run, steps it epoch by epoch, stops cleanly on Ctrl-C, and writes the checkpoints."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitlens import __version__
from vitlens.distributed import lost_peer
from vitlens.errors import Interrupted, UsageError, VitlensError
from vitlens.history import EpochStats
from vitlens.io import ensure_out_dir
from vitlens.log import logger
from vitlens.train.config import NO_FLIP_DATA, TrainConfig, _validate
from vitlens.train.files import FINAL_FILE, _read_resume, _save_resume, _write_curves, _write_metrics
from vitlens.train.inputs import _augment, _load_split, _probe_classes, _Tensors
from vitlens.train.model import _finetune_model, _scratch_model
from vitlens.train.schedule import _step_seed, lr_at

if TYPE_CHECKING:
    import torch
    from torch import nn


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


@dataclass
class _Run:
    """What every step of one run shares: the model and its optimiser, the data in memory, the schedule."""

    config: TrainConfig
    out: Path
    device: torch.device
    model: nn.Module  # the bare model: its state_dict is what checkpoints hold
    forward: nn.Module  # what the training step calls: ``model`` itself, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 loss scaling; None in bf16 and full precision
    autocast_dtype: torch.dtype | None  # None: full precision
    train_set: _Tensors
    test_set: _Tensors
    flip: bool  # mirror images in augmentation (not for digits and text)
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    meta_base: dict[str, Any]  # checkpoint metadata shared by every checkpoint of the run
    rank: int  # this process's rank under torchrun (0 in one process)
    world_size: int  # processes training together (1 in one process)
    part: slice  # this rank's rows of every global batch of ``config.batch_size`` images
    test_part: slice  # this rank's rows of the held-out split

    def lr(self, steps_done: int) -> float:
        """The learning rate after ``steps_done`` optimiser steps."""
        c = self.config
        return lr_at(steps_done, total_steps=self.total_steps, warmup_steps=self.warmup_steps, lr=c.lr, min_lr=c.min_lr)


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
        RankFailed: under torchrun, another rank failed.

    Under torchrun (a process group of N ranks, see :mod:`vitlens.distributed`) the run is one
    DistributedDataParallel job with the same global batch: every rank holds the data and the same shuffled order,
    takes its contiguous part of each global batch of ``config.batch_size`` images, and the gradients are averaged
    so that each step is the single process's step (the loss is each rank's sum over its part divided by the
    global batch). Rank 0 alone writes checkpoints, ``resume.pt`` and metrics; a resume is read by rank 0 and sent
    to the others. The weights equal one process's up to float rounding (dropout and drop-path draw per rank).
    """
    from vitlens.models.checkpoint import save_checkpoint

    callbacks = callbacks or TrainCallbacks()
    out = ensure_out_dir(out)
    config, state = _resumed_config(config, out) if resume else (config, None)
    _validate(config)
    run = _build_run(config, out)
    start_epoch, start_step, history, carried = _restore(run, state)
    if callbacks.on_start:
        callbacks.on_start(config.epochs, run.steps_per_epoch, start_epoch, config.batch_size)

    steps_done = start_epoch * run.steps_per_epoch + start_step
    started = time.perf_counter()
    with _stop_on_sigint() as sig:

        def stop(steps_done: int) -> bool:
            wanted = sig["stop"] or (stop_after_steps is not None and steps_done >= stop_after_steps)
            if run.world_size == 1:
                return wanted
            from vitlens.distributed import all_reduce_max

            return bool(all_reduce_max(int(wanted)))  # Ctrl-C reaches ranks at different steps: stop together

        for epoch in range(start_epoch, config.epochs):
            first, sums = (start_step, carried) if epoch == start_epoch else (0, [0.0] * 4)
            stats, steps_done = _run_epoch(
                run, epoch, first, steps_done, history, sums, stop=stop, on_step=callbacks.on_step
            )
            history.append(stats)
            _end_epoch(run, epoch, history)
            if callbacks.on_epoch:
                callbacks.on_epoch(stats)
    final_meta = {**run.meta_base, "epoch": len(history), "test_acc": history[-1].test_acc if history else None}
    checkpoint = save_checkpoint(out / FINAL_FILE, run.model.state_dict(), final_meta)
    _write_curves(out, history)
    return TrainResult(
        checkpoint=checkpoint,
        history=history,
        test_acc=history[-1].test_acc if history else float("nan"),
        seconds=time.perf_counter() - started,
        num_train=len(run.train_set.labels),
        num_test=len(run.test_set.labels),
    )


def _resumed_config(config: TrainConfig, out: Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The saved run's config (``epochs`` may only grow, to extend the run) and its resume state (read by rank 0
    and sent to the other ranks, whose nodes need not see ``out``)."""
    from vitlens.distributed import broadcast_object, is_main

    state = broadcast_object(_read_resume(out) if is_main() else None)
    saved = TrainConfig.from_json(json.loads(state["config"]))
    config = replace(saved, epochs=max(config.epochs, saved.epochs) if config.epochs else saved.epochs)
    return config, state


def _build_run(config: TrainConfig, out: Path) -> _Run:
    """Model, data, optimiser and schedule, built in a fixed order: the seeded model init must not move."""
    import torch

    from vitlens import distributed
    from vitlens.device import resolve_device

    device = resolve_device(config.device)
    rank, world = distributed.rank(), distributed.world_size()
    if config.batch_size < world:
        raise UsageError(
            f"--batch-size is the global batch: at least one image per rank ({world}), not {config.batch_size}"
        )

    # Labels first (cheap) so that one-class data fails before any model is built.
    torch.manual_seed(config.seed)
    probe = _probe_classes(config)
    built = _finetune_model(config, len(probe)) if config.init_from else _scratch_model(config, len(probe))
    model = built.model.to(device)
    forward = model
    if world > 1:  # the same seeded init on every rank; DDP also broadcasts rank 0's weights
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters keeps DDP's first gradient buckets for the whole run (it rebuilds them after the
        # first step otherwise): a resumed run then sums each gradient over the ranks in the same order as an
        # uninterrupted one, so the resume is exact; it also tolerates parameters a model does not use.
        forward = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    train_set = _load_split(config, built.preprocess, "train", device)
    test_set = _load_split(config, built.preprocess, "test", device)
    flip = config.data.split(":")[0].lower() not in NO_FLIP_DATA

    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(model, config.weight_decay, no_weight_decay_list=model.no_weight_decay())
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999))
    n = len(train_set.labels)
    steps_per_epoch = max(1, n // config.batch_size)  # drop the last partial batch: steady batch statistics
    autocast_dtype = _autocast_dtype(device)
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
    return _Run(
        config=config,
        out=out,
        device=device,
        model=model,
        forward=forward,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None,
        autocast_dtype=autocast_dtype,
        train_set=train_set,
        test_set=test_set,
        flip=flip,
        steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * config.epochs,
        warmup_steps=int(config.warmup_epochs * steps_per_epoch),
        meta_base=meta_base,
        rank=rank,
        world_size=world,
        part=_slice(distributed.shard_indices(config.batch_size, rank_=rank, world=world)),
        test_part=_slice(distributed.shard_indices(len(test_set.labels), rank_=rank, world=world)),
    )


def _slice(indices) -> slice:
    """The contiguous run of ``indices`` (a shard) as a slice."""
    return slice(int(indices[0]), int(indices[-1]) + 1) if len(indices) else slice(0, 0)


def _restore(run: _Run, state: dict[str, Any] | None) -> tuple[int, int, list[EpochStats], list[float]]:
    """Load a resume state into the run; the (epoch, step) to continue from, the history so far, and the sums of
    the interrupted epoch's steps before ``step`` (loss, correct, seen, seconds; zeros at an epoch's start)."""
    if state is None:
        return 0, 0, [], [0.0] * 4
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    start_epoch, start_step = int(state["epoch"]), int(state["step"])
    history = [EpochStats(**h) for h in json.loads(state["history"])]
    if start_epoch >= run.config.epochs:
        raise VitlensError(f"the run in {run.out} already finished {start_epoch} epochs; raise --epochs to extend it")
    saved_world = int(state.get("world_size", 1))
    if saved_world != run.world_size:
        logger.warning(
            "resuming on %d rank(s) a run saved on %d: the same global batches, so the weights follow the same "
            "path up to float rounding, not bit for bit",
            run.world_size,
            saved_world,
        )
    carried = [float(v) for v in state.get("epoch_sums", (0, 0, 0, 0))]  # absent in files of older versions
    return start_epoch, start_step, history, carried


def _run_epoch(
    run: _Run,
    epoch: int,
    first: int,
    steps_done: int,
    history: list[EpochStats],
    carried: list[float],
    *,
    stop: Callable[[int], bool],
    on_step: Callable[[int, int, float], None] | None,
) -> tuple[EpochStats, int]:
    """Steps ``first`` to the end of ``epoch``, then the held-out accuracy; the epoch's stats and the steps done.

    ``carried`` holds the epoch's sums over steps before ``first`` from an interrupted run (loss, correct, seen,
    seconds; all ranks' together), so that a resumed epoch's row in ``metrics.csv`` is the uninterrupted one's.

    Raises:
        Interrupted: ``stop`` said so before a step; ``resume.pt`` then points at that step.
    """
    import torch

    config = run.config
    run.model.train()
    epoch_started = time.perf_counter() - carried[3]
    n = len(run.train_set.labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_step_seed(config.seed, epoch, -1)))
    # This rank's part, added across ranks at the end of the epoch: the carried global sums count once, on rank 0.
    loss_sum, correct, seen = carried[:3] if run.rank == 0 else (0.0, 0, 0)
    for step in range(first, run.steps_per_epoch):
        if stop(steps_done):
            sums = _global_sums([loss_sum, correct, seen], run.world_size)
            _save_resume(
                run.out, run.model, run.optimizer, run.scaler, config, epoch, step, history, run.world_size,
                epoch_sums=[*sums, time.perf_counter() - epoch_started],
            )  # fmt: skip
            raise Interrupted(
                f"interrupted at epoch {epoch + 1} step {step}; resume with: vitlens train --resume {run.out}"
            )
        with lost_peer("the gradient all-reduce"):  # a peer that died mid-step: one RankFailed line, not gloo's
            part_loss, logits, y = _train_step(run, epoch, step, order, steps_done)
        steps_done += 1
        loss_sum += part_loss
        correct += int((logits.argmax(-1) == y).sum())
        seen += len(y)
        if on_step:  # the loss of this rank's part of the batch
            on_step(epoch, step, part_loss / max(1, len(y)))
    test = run.test_part
    test_correct = _count_correct(run.model, run.test_set.images[test], run.test_set.labels[test], batch_size=256)
    loss_sum, correct, seen, test_correct = _global_sums([loss_sum, correct, seen, test_correct], run.world_size)
    test_acc = test_correct / max(1, len(run.test_set.labels))
    seconds = time.perf_counter() - epoch_started
    stats = EpochStats(
        epoch=epoch + 1,
        train_loss=loss_sum / max(1, seen),
        train_acc=correct / max(1, seen),
        test_acc=test_acc,
        lr=run.lr(steps_done),
        seconds=seconds,
        images_per_s=seen / max(seconds, 1e-9),
    )
    return stats, steps_done


def _global_sums(values: list[float], world_size: int) -> list[float]:
    """``values`` added over the ranks (float64), or as they are in one process."""
    if world_size == 1:
        return [float(v) for v in values]
    import numpy as np

    from vitlens.distributed import all_reduce_sum

    return all_reduce_sum(np.array(values, dtype=np.float64)).tolist()


def _train_step(
    run: _Run, epoch: int, step: int, order: torch.Tensor, steps_done: int
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One optimiser step on global batch ``step`` of ``order`` (this rank's part of it); returns the summed loss
    of the part, its logits and its labels.

    Every random draw of the step (crop, flip, erasing, dropout, drop-path) comes from seeds of (seed, epoch, step),
    which is what makes a resumed run give the same weights. Under DistributedDataParallel the augmentation draws
    are the global batch's (each rank keeps its rows); dropout draws on rank r use the step's seed plus r.
    """
    import torch

    config = run.config
    gen = torch.Generator().manual_seed(_step_seed(config.seed, epoch, step))
    torch.manual_seed(_step_seed(config.seed, epoch, step) + run.rank)  # dropout / drop-path draws
    batch = order[step * config.batch_size : (step + 1) * config.batch_size]  # the global batch
    idx = batch[run.part].to(run.device)
    x = _augment(
        run.train_set.images[idx],
        mode=config.augment,
        flip=run.flip,
        gen=gen,
        translate=config.translate,
        part=run.part,
        batch_size=len(batch),
    )
    y = run.train_set.labels[idx]
    lr = run.lr(steps_done)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(run.device.type, dtype=run.autocast_dtype, enabled=run.autocast_dtype is not None):
        logits = run.forward(x)
        part_sum = torch.nn.functional.cross_entropy(
            logits.float(), y, label_smoothing=config.label_smoothing, reduction="sum"
        )
    # The global batch's mean loss: DDP averages the ranks' gradients (divides by world_size), so each rank's
    # share is its sum times world_size over the global batch. One process: the plain mean.
    loss = part_sum * (run.world_size / len(batch))
    if not torch.isfinite(loss):
        raise VitlensError(f"training diverged (loss {loss.item()}) at epoch {epoch + 1}; lower --lr")
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
        run.optimizer.step()
    return part_sum.item(), logits, y


def _end_epoch(run: _Run, epoch: int, history: list[EpochStats]) -> None:
    """After an epoch: metrics, the periodic checkpoint (``save_every``), and the resume point at the next epoch."""
    from vitlens.models.checkpoint import save_checkpoint

    config, out = run.config, run.out
    _write_metrics(out, history)
    meta = {**run.meta_base, "epoch": epoch + 1, "test_acc": history[-1].test_acc}
    if config.save_every and (epoch + 1) % config.save_every == 0 and epoch + 1 < config.epochs:
        folder = ensure_out_dir(out / "checkpoints")  # rank 0 only creates it
        save_checkpoint(folder / f"epoch_{epoch + 1:03d}.safetensors", run.model.state_dict(), meta)
    _save_resume(out, run.model, run.optimizer, run.scaler, config, epoch + 1, 0, history, run.world_size)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on preprocessed ``images`` (eval mode, no augmentation)."""
    return _count_correct(model, images, labels, batch_size=batch_size) / max(1, len(labels))


def _count_correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int) -> int:
    """How many of ``images`` ``model`` classifies as ``labels`` (eval mode, no augmentation)."""
    import torch

    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(labels), batch_size):
            correct += int((model(images[i : i + batch_size]).argmax(-1) == labels[i : i + batch_size]).sum())
    return correct


def _autocast_dtype(device: torch.device):
    """bf16 where the GPU supports it, else fp16 with loss scaling; full precision on CPU / MPS."""
    import torch

    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
