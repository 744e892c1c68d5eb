"""Streaming attention over a dataset: run a ViT batch by batch and reduce each layer's attention as it is computed.

This is the driver behind ``vitlens attention-distance`` and ``vitlens rollout``. Each layer's post-softmax
``[B, heads, N, N]`` goes from :func:`~vitlens.capture.attention_capture` straight into an accumulator's
``update(layer, attn)`` and is dropped, so memory holds one layer's attention of one batch, whatever the depth or
the number of images. Everything runs under ``torch.inference_mode()`` on ``vit.device``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from vitlens import distributed
from vitlens.analysis.attention_distance import AttentionDistance, AttentionDistanceAccumulator
from vitlens.analysis.rollout import (
    HeadFusion,
    Rollout,
    RolloutAccumulator,
    RolloutTarget,
    cls_attention_per_head,
    resolve_target,
)
from vitlens.capture import attention_capture, resolve_layers
from vitlens.data import iterate_batches
from vitlens.device import resolve_batch_size
from vitlens.errors import ParameterError, VitlensError
from vitlens.log import logger

if TYPE_CHECKING:
    from vitlens.data import Batch, ImageDataset
    from vitlens.layout import TokenLayout
    from vitlens.models.vit import ViT

Progress = Callable[[int, int], None]  # progress(done_images, total_images), called after every batch

# The explicit attention path materialises one layer's [B, heads, N, N] map (and softmax's input beside it). At
# 224 px that is small (ViT-B/16, batch 64: 114 MiB), but it grows with N^2: ViT-S/14 at 518 px (N = 1370) needs
# 43 MiB per image and layer, so batch 64 would hold 2.8 GiB twice. Batches are cut so that one map stays under a
# budget; results do not depend on the batch size.
CPU_ATTENTION_BUDGET_BYTES = 64 * 2**20
"""On the CPU a smaller batch is not slower once one map is past the cache (measured: see "Numbers quoted in the
code" in docs/benchmarks.md). At 224 px no ViT up to ViT-L/16 is cut below the CPU's default batch of 8."""
ACCELERATOR_ATTENTION_BUDGET_BYTES = 256 * 2**20
"""On CUDA and MPS larger batches keep the device busy; 256 MiB leaves ViT-L/16 at 224 px its batch of 64 and cuts
ViT-S/14 at 518 px to 5 (not yet measured on a GPU)."""


def default_attention_budget(device: torch.device) -> int:
    """Bytes one layer's attention map of one batch may take on ``device`` (see :data:`CPU_ATTENTION_BUDGET_BYTES`)."""
    return CPU_ATTENTION_BUDGET_BYTES if device.type == "cpu" else ACCELERATOR_ATTENTION_BUDGET_BYTES


class LayerAccumulator(Protocol):
    """Anything that reduces one layer's attention ``[B, heads, N, N]`` at a time."""

    def update(self, layer: int, attn: torch.Tensor) -> None: ...


def default_target(layout: TokenLayout) -> str:
    """The rollout target when none is asked for: the class token, or ``mean-patch`` for models without one
    (global-average-pool ViTs read their prediction from the mean of the patch tokens)."""
    return "cls" if layout.has_class_token else "mean-patch"


def stream_attention(
    vit: ViT,
    dataset: ImageDataset,
    accumulator: LayerAccumulator,
    *,
    batch_size: int | None = None,
    layers: Sequence[int] | None = None,
    on_batch: Callable[[Batch], None] | None = None,
    progress: Progress | None = None,
    num_workers: int = 0,
    attention_budget_bytes: int | None = None,
) -> int:
    """Run ``vit`` over ``dataset`` and feed every chosen layer's attention to ``accumulator.update`` at once.

    Args:
        vit: the loaded model; batches go to ``vit.device``.
        dataset: images preprocessed for ``vit`` (:func:`vitlens.data.open_dataset` with ``vit.preprocess``).
        accumulator: receives ``update(layer, attn)`` for each chosen layer of each batch, in depth order. ``attn``
            is valid only during the call: reduce it, never keep it.
        batch_size: images per forward pass at most; None for the device's default
            (:func:`vitlens.device.default_batch_size`).
        layers: 0-based layers to capture (negative from the end); all when None. Uncaptured layers keep their
            fused attention kernel.
        on_batch: called with the :class:`~vitlens.data.Batch` after its forward pass (e.g. to read and reset a
            per-batch accumulator).
        progress: called as ``progress(done, total)`` before the first batch and after every batch.
        num_workers: DataLoader worker processes.
        attention_budget_bytes: ``batch_size`` is lowered (with one info line) where one layer's attention map
            would be larger than this (see :func:`capped_batch_size`); None for the device's default
            (:func:`default_attention_budget`).

    Returns:
        The number of images that went through the model (unreadable ones are skipped with one warning).
    """
    total = len(dataset)
    done = seen = 0
    if progress is not None:
        progress(0, total)
    dtype = next(vit.model.parameters()).dtype
    batch_size = resolve_batch_size(batch_size, vit.device)
    batch_size = capped_batch_size(vit, batch_size, dtype=dtype, budget_bytes=attention_budget_bytes)
    # NaN/inf attention (NaN weights, fp16 overflow) would give NaN results; the flags stay on the device, so
    # checking costs no synchronisation per layer, only one at the end. The check reads the map's sum, which is
    # NaN or inf exactly when an entry is (softmax weights lie in [0, 1], so the sum cannot overflow float32):
    # one reduction instead of isfinite's several passes and a boolean map.
    non_finite: dict[int, torch.Tensor] = {}

    def update(layer: int, attn: torch.Tensor) -> None:
        bad = ~torch.isfinite(attn.sum(dtype=torch.promote_types(attn.dtype, torch.float32)))
        non_finite[layer] = bad if layer not in non_finite else non_finite[layer] | bad
        accumulator.update(layer, attn)

    with torch.inference_mode(), attention_capture(vit, update, layers=layers):
        for batch in iterate_batches(dataset, batch_size=batch_size, num_workers=num_workers, device=vit.device):
            # forward_features: attention lives in the blocks, the classifier head is not needed.
            vit.features(batch.images.to(dtype))
            seen += batch.images.shape[0]
            if on_batch is not None:
                on_batch(batch)
            if progress is not None:
                # Batches come in order, so everything up to this batch's last index was asked for (skips too).
                done = int(batch.indices[-1]) + 1
                progress(done, total)
    if progress is not None and done != total:
        progress(total, total)
    bad_layers = [layer for layer, bad in sorted(non_finite.items()) if bool(bad)]
    if bad_layers:
        raise VitlensError(
            f"the attention of layer {bad_layers[0]} has NaN/inf values (NaN/inf weights in the checkpoint, or an "
            f"overflow in {dtype}): the attention analyses are undefined"
        )
    return seen


def capped_batch_size(vit: ViT, batch_size: int, *, dtype: torch.dtype, budget_bytes: int | None = None) -> int:
    """``batch_size``, lowered where needed so that one layer's ``[B, heads, N, N]`` attention fits ``budget_bytes``
    (None: :func:`default_attention_budget` for ``vit.device``).

    Never below 1: a single image whose map is over the budget still runs.
    """
    if budget_bytes is None:
        budget_bytes = default_attention_budget(vit.device)
    per_image = vit.num_heads * vit.layout.num_tokens**2 * dtype.itemsize
    fits = max(1, budget_bytes // per_image)
    if batch_size > fits:
        logger.info(
            f"batch size {batch_size} -> {fits}: one layer's attention map is {per_image / 2**20:.1f} MiB per image "
            f"({vit.layout.num_tokens} tokens), kept under {budget_bytes / 2**20:.0f} MiB per batch"
        )
        return fits
    return batch_size


def mean_attention_distance_for(
    vit: ViT,
    dataset: ImageDataset,
    *,
    batch_size: int | None = None,
    renormalize: bool = True,
    progress: Progress | None = None,
    num_workers: int = 0,
) -> AttentionDistance:
    """Mean attention distance of every layer and head of ``vit``, averaged over ``dataset`` (ViT paper App. D.7).

    The state is ``O(depth * heads)`` (see :class:`~vitlens.analysis.AttentionDistanceAccumulator`, which also
    explains ``renormalize``); the result does not depend on ``batch_size``. Under torchrun each rank streams its
    shard of ``dataset`` and the sums are all-reduced, so every rank returns the single process's result.

    Raises:
        VitlensError: no image could be read.
    """
    acc = AttentionDistanceAccumulator(vit.layout, depth=vit.depth, num_heads=vit.num_heads, renormalize=renormalize)
    local = distributed.shard(dataset)  # the whole dataset in a single process
    progress = distributed.global_progress(progress, len(dataset))
    stream_attention(vit, local, acc, batch_size=batch_size, progress=progress, num_workers=num_workers)
    acc.all_reduce()  # under torchrun: every rank now holds the sums over all images
    return acc.result()


def _check_layer(name: str, layer: int, depth: int, *, from_end: bool = False) -> None:
    """``layer`` (the parameter ``name``) is a 0-based index of one of ``depth`` layers; ``from_end``: or negative."""
    if not (-depth if from_end else 0) <= layer < depth:
        raise ParameterError(name, f"{name} {layer} is out of range: the model has {depth} layers (0..{depth - 1})")


def _require_all(seen: int, dataset: ImageDataset) -> None:
    # Per-image results are returned in dataset order; a skipped image would shift every later map onto the
    # wrong image, so here a skip is an error rather than a warning.
    if seen != len(dataset):
        raise VitlensError(
            f"{len(dataset) - seen} of {len(dataset)} images of {dataset.spec} could not be read; "
            "per-image maps need every image"
        )


def rollout_for(
    vit: ViT,
    dataset: ImageDataset,
    *,
    batch_size: int | None = None,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    start_layer: int = 0,
    target: RolloutTarget | None = None,
    progress: Progress | None = None,
    num_workers: int = 0,
) -> Rollout:
    """Attention rollout (Abnar & Zuidema 2020; ViT paper App. D.8) of every image in ``dataset``.

    The running product ``[B, N, N]`` lives for one batch only (the accumulator is reset after each), and each
    batch's ``[B, H, W]`` maps are kept, so the result does not depend on ``batch_size``.

    Args:
        target: ``cls``, ``dist``, ``reg:N`` or ``mean-patch``; None for :func:`default_target`.
        Others: as :class:`~vitlens.analysis.RolloutAccumulator`.

    Returns:
        Maps ``[len(dataset), H, W]`` in dataset order, each scaled to max 1.

    Raises:
        ParameterError: ``start_layer`` outside the model's layers.
        UsageError: a bad ``head_fusion``, ``discard_ratio`` or ``target``.
        VitlensError: the model has no ``target`` token, or an image could not be read.
    """
    target = default_target(vit.layout) if target is None else target
    _check_layer("start_layer", start_layer, vit.depth)
    acc = RolloutAccumulator(vit.layout, head_fusion=head_fusion, discard_ratio=discard_ratio, start_layer=start_layer)
    resolve_target(target, vit.layout)  # fail before any forward pass
    maps: list[np.ndarray] = []  # [B, H, W] per batch
    patch_mass: list[np.ndarray] = []  # [B] per batch

    def read_and_reset(_batch: Batch) -> None:
        part = acc.result(target=target)
        maps.append(part.maps)
        patch_mass.append(part.patch_mass)
        acc.reset()

    local = distributed.shard(dataset)  # the whole dataset in a single process
    seen = stream_attention(
        vit,
        local,
        acc,
        batch_size=batch_size,
        layers=range(start_layer, vit.depth),
        on_batch=read_and_reset,
        progress=distributed.global_progress(progress, len(dataset)),
        num_workers=num_workers,
    )
    _require_all(seen, local)
    return Rollout(
        maps=_in_dataset_order(maps, dataset),  # [B, H, W]
        patch_mass=_in_dataset_order(patch_mass, dataset),  # [B]
        head_fusion=head_fusion,
        discard_ratio=float(discard_ratio),
        start_layer=start_layer,
        num_layers=vit.depth - start_layer,
        target=target,
        grid_size=tuple(vit.layout.grid_size),
    )


class _HeadMaps:
    """Collects :func:`~vitlens.analysis.cls_attention_per_head` of one layer, batch by batch."""

    def __init__(self, layout: TokenLayout, layer: int, target: str) -> None:
        self.layout, self.layer, self.target = layout, layer, target
        self.parts: list[np.ndarray] = []  # [B, heads, H, W] per batch

    def update(self, layer: int, attn: torch.Tensor) -> None:
        if layer == self.layer:
            self.parts.append(cls_attention_per_head(attn, self.layout, target=self.target))


def head_attention_for(
    vit: ViT,
    dataset: ImageDataset,
    *,
    layer: int,
    target: RolloutTarget | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
    num_workers: int = 0,
) -> np.ndarray:
    """The ``target`` token's raw attention to each patch in ``layer``, per head (the DINO-style view).

    Args:
        layer: 0-based layer (negative from the end).
        target: as :func:`rollout_for`; None for :func:`default_target`.

    Returns:
        ``[len(dataset), heads, H, W]`` attention weights, unscaled, in dataset order.

    Raises:
        ParameterError: ``layer`` out of range.
        UsageError: a malformed target.
        VitlensError: the model has no ``target`` token, or an image could not be read.
    """
    target = default_target(vit.layout) if target is None else target
    _check_layer("layer", layer, vit.depth, from_end=True)
    (index,) = resolve_layers([layer], vit.depth)
    resolve_target(target, vit.layout)
    acc = _HeadMaps(vit.layout, index, target)
    local = distributed.shard(dataset)  # the whole dataset in a single process
    progress = distributed.global_progress(progress, len(dataset))
    seen = stream_attention(
        vit, local, acc, batch_size=batch_size, layers=[index], progress=progress, num_workers=num_workers
    )
    _require_all(seen, local)
    return _in_dataset_order(acc.parts, dataset)  # [B, heads, H, W]


def _in_dataset_order(parts: list[np.ndarray], dataset: ImageDataset) -> np.ndarray:
    """This rank's per-batch rows, concatenated; under torchrun every rank's rows, gathered in dataset order."""
    if not distributed.is_distributed():
        return np.concatenate(parts)
    local = np.concatenate(parts) if parts else np.zeros(0)  # a rank may own no image
    return distributed.gather_in_order(local, distributed.shard_indices(len(dataset)))
