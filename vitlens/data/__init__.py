"""The data layer: turns a ``--data`` spec into a torch dataset of model-ready image tensors, and batches it.

A spec is a dataset name (``digits``, or one of the torchvision datasets in :func:`known_datasets`), a folder
(ImageFolder layout, optionally with ``train/`` and ``test/`` halves, or just images), one image file, or a list
of image files. Images are decoded lazily; an image that cannot be decoded is skipped, and
:func:`iterate_batches` reports all skips in one warning at the end.

Inside: :mod:`~vitlens.data.images` (decoding and the model's input geometry), :mod:`~vitlens.data.sources` (what a
spec names), :mod:`~vitlens.data.subsets` (hold-out split and ``num_images`` subset), :mod:`~vitlens.data.dataset`
(the dataset and its batches). Everything callers use is imported from here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from vitlens.data.dataset import Batch, ImageDataset, collate_skipping, iterate_batches
from vitlens.data.images import _channel_stats as _channel_stats
from vitlens.data.images import _check_preprocess
from vitlens.data.images import _resize_crop as _resize_crop
from vitlens.data.sources import IMAGE_EXTENSIONS, _resolve_source, default_data_root, known_datasets
from vitlens.data.subsets import _subset
from vitlens.errors import ParameterError, VitlensError
from vitlens.layout import Preprocess
from vitlens.log import logger

if TYPE_CHECKING:
    from vitlens.models.vit import ViT

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "Batch",
    "ImageDataset",
    "Split",
    "collate_skipping",
    "default_data_root",
    "iterate_batches",
    "known_datasets",
    "open_dataset",
]

Split = Literal["train", "test", "all"]
SPLITS: tuple[str, ...] = ("train", "test", "all")


def open_dataset(
    spec: str | os.PathLike | Sequence[str | os.PathLike],
    preprocess: Preprocess | ViT,
    *,
    split: Split = "test",
    num_images: int | None = None,
    seed: int = 0,
    data_root: str | Path | None = None,
    download: bool = False,
    require_labels: bool = False,
) -> ImageDataset:
    """Open the images a ``--data`` spec names, preprocessed for the model.

    Args:
        spec: a name from :func:`known_datasets`, a folder, an image file, or a sequence of image files.
        preprocess: the model's input geometry and normalisation, or the model itself (its ``preprocess``).
        split: ``train``, ``test`` or ``all``. Data without an official split (digits, a plain ImageFolder) is
            split 80/20, stratified, with a fixed seed; unlabelled data ignores it.
        num_images: take this many, stratified by class when labelled, chosen with ``seed``; None for all.
        seed: seed of the ``num_images`` subset.
        data_root: where named torchvision datasets live (default :func:`default_data_root`).
        download: fetch a named torchvision dataset if it is not in ``data_root``.
        require_labels: fail early if the data has no labels.

    Raises:
        ParameterError: bad ``split`` or ``num_images``.
        VitlensError: unknown spec, missing dataset files, a folder without images, or no labels when required.
    """
    preprocess = getattr(preprocess, "preprocess", preprocess)  # a ViT: its preprocessing
    if split not in SPLITS:
        raise ParameterError("split", f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if num_images is not None and num_images <= 0:
        raise ParameterError("num_images", f"num_images must be a positive number, not {num_images}")
    _check_preprocess(preprocess)
    source = _resolve_source(spec, split, data_root, download)
    if require_labels and source.labels is None:
        raise VitlensError(
            f"{source.spec} has no labels; this analysis needs them: use an ImageFolder layout "
            f"(one subfolder per class) or a named dataset such as digits"
        )
    keys, names, labels, spec_key = source.keys, source.names, source.labels, source.spec
    total = len(keys)
    if num_images is not None and num_images > total:
        logger.warning(f"asked for {num_images} images but {source.spec} has {total}; using all {total}")
    elif num_images is not None and num_images < total:
        keep = _subset(labels, total, num_images, seed)
        keys, names = [keys[i] for i in keep], [names[i] for i in keep]
        labels = labels[keep] if labels is not None else None
        spec_key = f"{source.spec}#n={num_images},seed={seed}"
    return ImageDataset(
        keys=keys,
        reader=source.reader,
        names=names,
        labels=labels,
        classes=source.classes,
        spec=spec_key,
        preprocess=preprocess,
    )
