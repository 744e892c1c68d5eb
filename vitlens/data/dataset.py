"""The dataset of model-ready image tensors, and its batching, which skips unreadable images and reports them once."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vitlens.data.images import _channel_stats, _check_preprocess, _one_line, _resize_crop, _to_model_mode
from vitlens.errors import ParameterError, VitlensError
from vitlens.layout import Preprocess
from vitlens.log import logger


class ImageDataset(Dataset):
    """Model-ready images from one spec, decoded lazily; build it with :func:`open_dataset`.

    ``dataset[i]`` is ``(image [C, H, W] float32, label or -1, i)``, or ``None`` when image ``i`` cannot be
    decoded, so that a DataLoader worker never dies on a bad file (:func:`collate_skipping` drops the Nones).

    Attributes:
        classes: class names, index = label; None for unlabelled data.
        labels: int64 label per item; None for unlabelled data.
        names: display name per item (path relative to the folder given, or e.g. ``digits/test/0007``).
        spec: canonical description of the selection, usable as a cache key.
        preprocess: the geometry and normalisation applied.
    """

    def __init__(
        self,
        *,
        keys: Sequence[Any],
        reader: Callable[[Any], Image.Image],
        names: list[str],
        labels: np.ndarray | None,
        classes: list[str] | None,
        spec: str,
        preprocess: Preprocess,
    ) -> None:
        _check_preprocess(preprocess)
        self._keys = list(keys)
        self._reader = reader
        self.names = names
        self.labels = labels
        self.classes = classes
        self.spec = spec
        self.preprocess = preprocess
        self._mean, self._std = _channel_stats(preprocess)  # [C, 1, 1] each

    def __len__(self) -> int:
        return len(self._keys)

    def with_preprocess(self, preprocess: Preprocess) -> ImageDataset:
        """The same images, in the same order, with another model's geometry and normalisation (two models compared
        on one dataset each see it as their own preprocessing says). Its spec is unchanged: the spec names the
        selection, and the feature cache keys on the model's preprocessing separately."""
        if preprocess == self.preprocess:
            return self
        return ImageDataset(
            keys=self._keys,
            reader=self._reader,
            names=list(self.names),
            labels=self.labels,
            classes=self.classes,
            spec=self.spec,
            preprocess=preprocess,
        )

    def subset(self, indices: Sequence[int], *, tag: str) -> ImageDataset:
        """The items at ``indices`` (in that order), as a dataset of its own; ``tag`` goes into its spec (cache key)."""
        keep = [int(i) for i in indices]
        return ImageDataset(
            keys=[self._keys[i] for i in keep],
            reader=self._reader,
            names=[self.names[i] for i in keep],
            labels=None if self.labels is None else self.labels[keep],
            classes=self.classes,
            spec=f"{self.spec}#{tag}",
            preprocess=self.preprocess,
        )

    def file_stamps(self) -> list[tuple[int, int] | None]:
        """``(size, mtime_ns)`` of each item's file, or None for items that are not files (in-memory datasets) or
        cannot be stat'ed: what a cache keyed on this dataset checks to notice an image edited in place."""
        stamps: list[tuple[int, int] | None] = []
        for key in self._keys:
            if isinstance(key, (str, os.PathLike)):
                try:
                    st = os.stat(key)
                except OSError:
                    stamps.append(None)
                    continue
                stamps.append((st.st_size, st.st_mtime_ns))
            else:
                stamps.append(None)
        return stamps

    def __repr__(self) -> str:
        kind = f"{len(self.classes)} classes" if self.classes is not None else "unlabelled"
        return f"ImageDataset({self.spec!r}, {len(self)} images, {kind})"

    def _decode(self, index: int) -> Image.Image:
        img = _to_model_mode(self._reader(self._keys[index]), self.preprocess.in_chans)
        if min(img.size) == 0:
            raise ValueError("image has no pixels")
        return img

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int] | None:
        try:
            img = self._decode(index)
        except Exception:
            # Decoders raise almost anything on a bad file (OSError, SyntaxError, struct.error, ...); only the
            # decode is guarded, so a bug in the tensor code below still surfaces.
            return None
        img = _resize_crop(img, self.preprocess)
        pixels = np.asarray(img, dtype=np.float32) / 255.0  # [H, W] (L) or [H, W, 3] (RGB)
        x = torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1)).permute(2, 0, 1)  # [C, H, W]
        x = (x - self._mean) / self._std
        label = int(self.labels[index]) if self.labels is not None else -1
        return x.contiguous(), label, index

    def load_pil(self, index: int, *, cropped: bool = True) -> Image.Image:
        """The un-normalised image ``index`` as the model sees it, in ``L`` or ``RGB``, for overlays.

        Args:
            index: item index.
            cropped: resize and centre-crop to ``img_size`` (pixel-aligned with attention maps); False gives
                the decoded image at its own size.

        Raises:
            VitlensError: the image cannot be decoded.
        """
        try:
            img = self._decode(index)
        except Exception as e:
            raise VitlensError(f"cannot read image {self.names[index]}: {_one_line(e)}") from e
        return _resize_crop(img, self.preprocess) if cropped else img


@dataclass
class Batch:
    """A batch of decodable items; unreadable ones are already dropped, so B may be smaller than asked."""

    images: torch.Tensor  # [B, C, H, W] float32, normalised
    labels: torch.Tensor  # [B] int64, -1 when unlabelled
    indices: torch.Tensor  # [B] int64 dataset index of each row

    def to(self, device: torch.device | str | None) -> Batch:
        if device is None:
            return self
        return Batch(self.images.to(device, non_blocking=True), self.labels.to(device), self.indices.to(device))

    def pin_memory(self) -> Batch:
        """Called by DataLoader's pin-memory thread."""
        return Batch(self.images.pin_memory(), self.labels.pin_memory(), self.indices.pin_memory())


def collate_skipping(items: list[tuple[torch.Tensor, int, int] | None]) -> Batch | None:
    """DataLoader ``collate_fn``: stack the readable items, drop the Nones; None when nothing is left."""
    kept = [item for item in items if item is not None]
    if not kept:
        return None
    return Batch(
        images=torch.stack([item[0] for item in kept]),  # [B, C, H, W]
        labels=torch.tensor([item[1] for item in kept], dtype=torch.int64),  # [B]
        indices=torch.tensor([item[2] for item in kept], dtype=torch.int64),  # [B]
    )


def iterate_batches(
    dataset: ImageDataset,
    *,
    batch_size: int,
    num_workers: int = 0,
    device: torch.device | str | None = None,
) -> Iterator[Batch]:
    """Yield the dataset in order, in batches on ``device``, skipping unreadable images.

    Skips are counted here, in the main process: the loader is sequential, so batch ``k`` was asked for
    indices ``[k * batch_size, (k + 1) * batch_size)`` and whatever is missing from it was unreadable. That
    works the same with worker processes, which cannot report back otherwise. One warning at the end.

    Raises:
        ParameterError: ``batch_size`` or ``num_workers`` out of range.
        VitlensError: no image at all could be read.
    """
    if batch_size < 1:
        raise ParameterError("batch_size", f"batch_size must be at least 1, not {batch_size}")
    if num_workers < 0:
        raise ParameterError("num_workers", f"num_workers must be 0 or more, not {num_workers}")
    # Checked above, now, rather than at the first next() as the body of a generator would be.
    return _batches(dataset, batch_size, num_workers, torch.device(device) if device is not None else None)


def _batches(dataset: ImageDataset, batch_size: int, num_workers: int, device: torch.device | None) -> Iterator[Batch]:
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skipping,
        pin_memory=device is not None and device.type == "cuda",
    )
    n = len(dataset)
    skipped: list[int] = []
    for k, batch in enumerate(loader):
        asked = range(k * batch_size, min((k + 1) * batch_size, n))
        got = set() if batch is None else set(batch.indices.tolist())
        skipped.extend(i for i in asked if i not in got)
        if batch is not None:
            yield batch.to(device)
    if n and len(skipped) == n:
        raise VitlensError(
            f"none of the {n} images of {dataset.spec} could be read (e.g. {dataset.names[skipped[0]]}); "
            "check that they are image files PIL can open"
        )
    if skipped:
        s = "s" if len(skipped) > 1 else ""
        logger.warning(f"skipped {len(skipped)} unreadable image{s} (e.g. {dataset.names[skipped[0]]})")
