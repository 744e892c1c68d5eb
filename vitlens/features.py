"""Features of a frozen ViT for probes: any set of layers' token representations from one forward pass.

Block outputs are read by scoped hooks (removed even when the forward raises); ``pre-logits`` is what the classifier
head sees (the final norm, then the class token or the mean of patch tokens), ``cls`` and ``mean-patch`` a block
output's class token and mean of its patch tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from vitlens.capture import resolve_layers
from vitlens.data import iterate_batches
from vitlens.device import resolve_batch_size
from vitlens.errors import ParameterError, VitlensError
from vitlens.log import logger

if TYPE_CHECKING:
    from vitlens.data import ImageDataset
    from vitlens.models.vit import ViT

FeatureKind = Literal["pre-logits", "cls", "mean-patch"]
FEATURE_KINDS: tuple[str, ...] = ("pre-logits", "cls", "mean-patch")
# Old names still accepted, with a warning: `mean-patch` is what rollout's --target calls the same pooling.
DEPRECATED_FEATURES: dict[str, str] = {"gap": "mean-patch"}
Progress = Callable[[int, int], None]  # progress(done_images, total_images)


# --------------------------------------------------------------------------------------------------------------
# Feature extraction


def canonical_feature(feature: str) -> str:
    """``feature`` under its current name: a deprecated one (``gap``) mapped, with a warning; others as given."""
    if isinstance(feature, str) and feature in DEPRECATED_FEATURES:
        current = DEPRECATED_FEATURES[feature]
        logger.warning(f"feature {feature!r} is deprecated; use {current!r} (the same features)")
        return current
    return feature


def resolve_feature_layers(vit: ViT, layers: Sequence[int] | None, feature: FeatureKind) -> list[int]:
    """Check ``feature`` against the model and turn ``layers`` into sorted 0-based block indices.

    Pre-logits (final norm and pooling, what the classifier head sees) exist after the last block only; they are
    keyed by that block's index. ``None`` means the last block. A deprecated ``feature`` name is accepted (see
    :func:`canonical_feature`).

    Raises:
        ParameterError: unknown ``feature``, a layer out of range, or pre-logits asked for at an inner layer.
        VitlensError: ``cls`` on a model without a class token.
    """
    feature = canonical_feature(feature)
    if feature not in FEATURE_KINDS:
        raise ParameterError("feature", f"feature must be one of {', '.join(FEATURE_KINDS)}, not {feature!r}")
    depth = vit.depth
    chosen = resolve_layers([-1] if layers is None else list(layers), depth)
    if feature == "pre-logits" and chosen != [depth - 1]:
        raise ParameterError(
            "layers", f"layers {chosen} need feature cls or mean-patch: pre-logits exist after the last block only"
        )
    if feature == "cls" and not vit.layout.has_class_token:
        raise VitlensError("this model has no class token (it pools the patch tokens); use --feature mean-patch")
    return chosen


def extract_features(
    vit: ViT,
    dataset: ImageDataset,
    *,
    layers: Sequence[int] | None = None,
    feature: FeatureKind = "pre-logits",
    batch_size: int | None = None,
    progress: Progress | None = None,
    num_workers: int = 0,
) -> dict[int, torch.Tensor]:
    """Frozen features of every image of ``dataset``, for all ``layers`` from one forward pass.

    Args:
        vit: the loaded model; batches go to ``vit.device``.
        dataset: images preprocessed for ``vit``.
        layers: 0-based block indices (negative from the end); None for the last block.
        feature: ``pre-logits`` (what the head sees), ``cls`` (the class token after the block) or ``mean-patch``
            (the mean of the patch tokens after the block; ``gap`` is a deprecated name for it). ``cls`` and
            ``mean-patch`` read the block's raw output (the residual stream, before the final norm): the probe
            standardises every feature anyway.
        batch_size: images per forward pass; None for the device's default (:func:`vitlens.device.default_batch_size`).
        progress: called as ``progress(done, total)`` before the first batch and after every batch.
        num_workers: DataLoader worker processes.

    Under torchrun each rank runs the forward passes of its own contiguous shard
    (:func:`vitlens.distributed.shard`) and the rows are gathered in dataset order to every rank
    (:func:`vitlens.distributed.gather_in_order`), so every rank returns the single process's features; the probes
    solved on them afterwards are then the same on every rank.

    Returns:
        ``{layer: [len(dataset), D] float32 on the CPU}``, rows in dataset order.

    Raises:
        ParameterError / VitlensError: as :func:`resolve_feature_layers`; an image could not be read (rows must line
            up with ``dataset.labels``).
    """
    from vitlens import distributed

    feature = canonical_feature(feature)
    chosen = resolve_feature_layers(vit, layers, feature)
    layout = vit.layout
    total = len(dataset)
    progress = distributed.global_progress(progress, total)  # None on ranks other than 0
    dataset = distributed.shard(dataset)  # this rank's contiguous block; the whole dataset in a single process
    n = len(dataset)
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in chosen}  # [B, D] per batch, in order

    def pool(tokens: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, D]
        if feature == "cls":
            return tokens[:, layout.token_index("cls")]
        return tokens[:, layout.patch_slice].mean(dim=1)

    def keep(layer: int, tokens: torch.Tensor) -> None:
        parts[layer].append(pool(tokens).float().cpu())

    done = seen = 0
    if progress is not None:
        progress(0, n)
    dtype = next(vit.model.parameters()).dtype
    batch_size = resolve_batch_size(batch_size, vit.device)
    with torch.inference_mode(), vit.hooks(blocks=keep, layers=[] if feature == "pre-logits" else chosen):
        for batch in iterate_batches(dataset, batch_size=batch_size, num_workers=num_workers, device=vit.device):
            tokens = vit.features(batch.images.to(dtype))  # [B, N, D]
            if feature == "pre-logits":
                parts[chosen[0]].append(vit.pre_logits(tokens).float().cpu())  # [B, D]
            seen += batch.images.shape[0]
            if progress is not None:
                done = int(batch.indices[-1]) + 1
                progress(done, n)
    if progress is not None and done != n:
        progress(n, n)
    if seen != n:
        # A skipped image would shift every later row against dataset.labels.
        raise VitlensError(
            f"{n - seen} of {n} images of {dataset.spec} could not be read; few-shot probes need every image "
            "of the split (remove the unreadable files)"
        )
    if not distributed.is_distributed():
        return {layer: torch.cat(parts[layer]) for layer in chosen}  # [N, D] each
    # One gather for all layers: [n_rank, L, D] per rank (a rank that owned no image sends an empty block).
    local = np.stack([torch.cat(parts[la]).numpy() for la in chosen], axis=1) if n else np.zeros(0, np.float32)
    rows = distributed.gather_in_order(local, distributed.shard_indices(total))  # [N, L, D], dataset order
    return {layer: torch.from_numpy(np.ascontiguousarray(rows[:, i])) for i, layer in enumerate(chosen)}
