"""The files of a run folder besides the weights: ``resume.pt`` (exact resume), ``metrics.csv`` and ``curves.png``."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vitlens import __version__
from vitlens.errors import VitlensError
from vitlens.history import EpochStats
from vitlens.io import atomic_path, write_text
from vitlens.log import logger
from vitlens.train.config import TrainConfig

RESUME_FILE = "resume.pt"
FINAL_FILE = "model.safetensors"


def _save_resume(
    out: Path,
    model,
    optimizer,
    scaler,
    config: TrainConfig,
    epoch: int,
    step: int,
    history,
    world_size: int = 1,
    epoch_sums: list[float] | None = None,
) -> None:
    """Everything needed to continue exactly: weights, optimiser, scaler, position (epoch, step), history, the
    number of ranks that trained (a resume on another number follows the same path up to float rounding), and
    mid-epoch the epoch's sums so far (loss, correct, seen, seconds), so that its metrics cover the whole epoch.

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
        "world_size": world_size,
        "epoch_sums": [float(v) for v in epoch_sums or (0, 0, 0, 0)],
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
