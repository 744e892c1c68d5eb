"""Training small ViTs from scratch and fine-tuning loadable ones, with exact resume and atomic checkpoints.

The recipe is the small-data recipe of DeiT / "How to train your ViT" (AugReg), scaled down: AdamW, linear warmup
then cosine decay, label smoothing, global-norm gradient clipping as in the ViT paper, random crop with padding and
(where it makes sense) horizontal flips. Every random choice of a step is drawn from a generator seeded by
(seed, epoch, step), so a run interrupted anywhere and resumed gives the same weights as an uninterrupted one.

Inside: :mod:`~vitlens.train.config` (settings and presets), :mod:`~vitlens.train.model` (scratch or fine-tune),
:mod:`~vitlens.train.inputs` (data in memory, augmentation), :mod:`~vitlens.train.schedule` (learning rate, step
seeds), :mod:`~vitlens.train.loop` (the loop), :mod:`~vitlens.train.files` (resume file, metrics, curves).
Everything callers use is imported from here.
"""

from __future__ import annotations

from vitlens.history import EpochStats
from vitlens.train.config import GREY_DATA, NO_FLIP_DATA, PRESETS, Augment, TrainConfig, preset_config
from vitlens.train.files import FINAL_FILE, RESUME_FILE
from vitlens.train.loop import TrainCallbacks, TrainResult, evaluate, train
from vitlens.train.model import _finetune_model as _finetune_model
from vitlens.train.schedule import lr_at

__all__ = [
    "FINAL_FILE",
    "GREY_DATA",
    "NO_FLIP_DATA",
    "PRESETS",
    "RESUME_FILE",
    "Augment",
    "EpochStats",
    "TrainCallbacks",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "lr_at",
    "preset_config",
    "train",
]
