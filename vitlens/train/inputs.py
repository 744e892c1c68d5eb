"""The training data: each split decoded once into device memory, and the per-step augmentation of a batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vitlens.errors import VitlensError
from vitlens.layout import Preprocess
from vitlens.train.config import Augment, TrainConfig

if TYPE_CHECKING:
    import torch


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
    x: torch.Tensor,
    *,
    mode: Augment,
    flip: bool,
    gen: torch.Generator,
    translate: float = 0.125,
    part: slice | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Random crop with zero padding of ``translate`` x the side (+ flips, + random erasing for 'strong').

    Under DistributedDataParallel ``x`` is one rank's ``part`` of a global batch of ``batch_size`` images: the
    random draws are made for the whole global batch, in the single process's order, and the rank keeps its rows,
    so every image gets the crop, flip and erasing it would get in one process.
    """
    import torch
    import torch.nn.functional as F

    if mode == "none":
        return x
    b, _, h, w = x.shape
    total = b if batch_size is None else batch_size  # the global batch the draws are made for
    part = slice(0, b) if part is None else part

    def draw(high: int) -> torch.Tensor:  # [b]: this part's rows of the global batch's [total] draws
        return torch.randint(0, high, (total,), generator=gen)[part]

    def coin(p: float) -> torch.Tensor:
        return (torch.rand(total, generator=gen) < p)[part].to(x.device)

    ph, pw = max(1, round(h * translate)), max(1, round(w * translate))
    padded = F.pad(x, (pw, pw, ph, ph))  # zero = the mean colour after normalisation
    oy = draw(2 * ph + 1)
    ox = draw(2 * pw + 1)
    rows = (oy[:, None] + torch.arange(h)).to(x.device)  # [B, H]
    cols = (ox[:, None] + torch.arange(w)).to(x.device)  # [B, W]
    bidx = torch.arange(b, device=x.device)[:, None, None]
    x = padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # [B, C, H, W]
    if flip:
        mirror = coin(0.5)
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    if mode == "strong":  # random erasing (Zhong et al. 2020), as in DeiT, of a quarter-sized box
        erase = coin(0.25)
        ey = draw(h - h // 2 + 1).to(x.device)
        ex = draw(w - w // 2 + 1).to(x.device)
        yy = torch.arange(h, device=x.device)[None, :, None]
        xx = torch.arange(w, device=x.device)[None, None, :]
        box = (yy >= ey[:, None, None]) & (yy < ey[:, None, None] + h // 2)
        box = box & (xx >= ex[:, None, None]) & (xx < ex[:, None, None] + w // 2) & erase[:, None, None]
        x = x.masked_fill(box[:, None], 0.0)
    return x


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
