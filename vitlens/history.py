"""One epoch's training numbers: what ``vitlens train`` records and ``plotting.curves`` draws (shared by both, so
neither imports the other)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based count of finished epochs
    train_loss: float
    train_acc: float
    test_acc: float
    lr: float
    seconds: float
    images_per_s: float
