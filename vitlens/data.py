"""The data layer: turns a ``--data`` spec into a torch dataset of model-ready image tensors, and batches it.

A spec is a dataset name (``digits``, or one of the torchvision datasets in :func:`known_datasets`), a folder
(ImageFolder layout, optionally with ``train/`` and ``test/`` halves, or just images), one image file, or a list
of image files. Images are decoded lazily; an image that cannot be decoded is skipped, and
:func:`iterate_batches` reports all skips in one warning at the end.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vitlens.errors import ParameterError, UsageError, VitlensError
from vitlens.layout import Preprocess
from vitlens.log import logger

if TYPE_CHECKING:
    from vitlens.models.vit import ViT

Split = Literal["train", "test", "all"]
SPLITS: tuple[str, ...] = ("train", "test", "all")

# torchvision's ImageFolder list plus GIF; matched case-insensitively. Other files in a folder are ignored.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
)

# Our name -> (torchvision class, constructor arguments for our "train" and "test" splits).
_TORCHVISION: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "cifar10": ("CIFAR10", {"train": {"train": True}, "test": {"train": False}}),
    "cifar100": ("CIFAR100", {"train": {"train": True}, "test": {"train": False}}),
    "mnist": ("MNIST", {"train": {"train": True}, "test": {"train": False}}),
    "fashion-mnist": ("FashionMNIST", {"train": {"train": True}, "test": {"train": False}}),
    "svhn": ("SVHN", {"train": {"split": "train"}, "test": {"split": "test"}}),
    "stl10": ("STL10", {"train": {"split": "train"}, "test": {"split": "test"}}),
    "flowers102": ("Flowers102", {"train": {"split": "train"}, "test": {"split": "test"}}),
    "oxford-iiit-pet": ("OxfordIIITPet", {"train": {"split": "trainval"}, "test": {"split": "test"}}),
}

# Data without an official split gets a fixed, stratified 80/20 hold-out, independent of the user's --seed so
# that "train" and "test" never overlap across runs with different seeds.
_HOLDOUT_FRACTION = 0.2
_HOLDOUT_SEED = 0

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

_WHITE = (255, 255, 255, 255)


def known_datasets() -> list[str]:
    """Dataset names ``--data`` accepts besides paths."""
    return ["digits", *_TORCHVISION]


def default_data_root() -> Path:
    """Where named datasets live: ``$VITLENS_DATA_ROOT``, else ``~/.cache/vitlens/data``."""
    env = os.environ.get("VITLENS_DATA_ROOT")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vitlens" / "data"


# --------------------------------------------------------------------------------------------------------------
# Decoding and preprocessing


def _read_file(path: Path) -> Image.Image:
    """Decode an image file fully (so truncation shows here), treating a decompression bomb as unreadable."""
    with warnings.catch_warnings():
        # PIL only *warns* between MAX_IMAGE_PIXELS and twice that; we want such files skipped, not decoded.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            im.load()
            return im.copy()  # the context manager closes the file, and a closed PIL image refuses operations


def _to_model_mode(img: Image.Image, in_chans: int) -> Image.Image:
    """Convert any PIL mode to ``L`` (``in_chans=1``) or ``RGB`` (``in_chans=3``).

    16-bit grey is rescaled to 8 bits (PIL's own ``convert`` clips it, turning most of the range white);
    transparency is composited onto white, which is how viewers show such images.
    """
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 'I' is what PIL gives for 16-bit sources in some formats, so it is read as 0..65535 too.
        wide = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = img.convert("L")  # float images have no agreed range; PIL clips to 0..255
    elif img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, _WHITE), img.convert("RGBA"))
    target = "L" if in_chans == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def _resize_crop(img: Image.Image, preprocess: Preprocess) -> Image.Image:
    """timm's eval geometry: resize to ``img_size / crop_pct``, then centre-crop ``img_size``.

    With ``crop_mode='center'`` a square input resizes the shorter side and keeps the aspect ratio, and a non-square
    one resizes to exactly ``floor(H / crop_pct), floor(W / crop_pct)``
    (``timm.data.transforms_factory.transforms_imagenet_eval``); ``crop_mode='squash'`` always resizes to exactly
    that size (aspect not kept), as Hugging Face's ``ViTImageProcessor`` does. The 1e-6 lets a ``crop_pct`` read as
    ``crop / resize`` (e.g. 17 / 25) give back ``resize`` where the float quotient lands just below it.
    """
    H, W = preprocess.img_size
    w, h = img.size
    if H == W and preprocess.crop_mode == "center":
        size = math.floor(H / preprocess.crop_pct + 1e-6)
        # torchvision's Resize(int) rounding: the longer side is truncated, not rounded.
        new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    else:
        new_w, new_h = math.floor(W / preprocess.crop_pct + 1e-6), math.floor(H / preprocess.crop_pct + 1e-6)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _RESAMPLE[preprocess.interpolation])
    # torchvision's CenterCrop offsets; PIL fills anything outside the image (crop_pct > 1) with black.
    left, top = round((new_w - W) / 2.0), round((new_h - H) / 2.0)
    return img.crop((left, top, left + W, top + H))


def _channel_stats(preprocess: Preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as ``[C, 1, 1]`` tensors, fitted to ``in_chans``.

    A grey model often carries the RGB defaults; the average is exact when the three values are equal (as in
    :class:`Preprocess`'s own default) and a grey image is a mix of the channels otherwise.
    """
    C = preprocess.in_chans
    stats = []
    for name in ("mean", "std"):
        values = tuple(getattr(preprocess, name))
        if len(values) == 1:
            values = values * C
        elif len(values) != C and C == 1:
            values = (sum(values) / len(values),)
        elif len(values) != C:
            raise VitlensError(f"preprocess {name} has {len(values)} values but the model takes {C} channels")
        stats.append(torch.tensor(values, dtype=torch.float32).view(C, 1, 1))  # [C, 1, 1]
    if bool((stats[1] <= 0).any()):
        raise VitlensError(f"preprocess std must be positive, got {tuple(preprocess.std)}")
    return stats[0], stats[1]


def _check_preprocess(preprocess: Preprocess) -> None:
    if preprocess.in_chans not in (1, 3):
        raise VitlensError(f"models with in_chans={preprocess.in_chans} are not supported; vitlens feeds grey or RGB")
    if preprocess.interpolation not in _RESAMPLE:
        known = ", ".join(_RESAMPLE)
        raise VitlensError(f"unknown interpolation {preprocess.interpolation!r}; use one of {known}")
    if min(preprocess.img_size) < 1 or preprocess.crop_pct <= 0:
        raise VitlensError(f"bad preprocess: img_size {preprocess.img_size}, crop_pct {preprocess.crop_pct}")


# --------------------------------------------------------------------------------------------------------------
# Readers: picklable callables from an item key to a decoded PIL image (DataLoader workers get a copy);
# files use _read_file itself.


@dataclass
class _ArrayReader:
    pixels: np.ndarray  # [N, H, W] uint8 grey

    def __call__(self, key: int) -> Image.Image:
        return Image.fromarray(self.pixels[key], "L")


@dataclass
class _TorchvisionReader:
    parts: dict[str, Any]  # our split name -> torchvision dataset (built without a transform, so it yields PIL)

    def __call__(self, key: tuple[str, int]) -> Image.Image:
        part, i = key
        return self.parts[part][i][0]


# --------------------------------------------------------------------------------------------------------------
# The dataset


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
        UsageError: ``batch_size`` or ``num_workers`` out of range.
        VitlensError: no image at all could be read.
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {batch_size}")
    if num_workers < 0:
        raise UsageError(f"--num-workers must be 0 or more, not {num_workers}")
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
    if len(skipped) == n:
        raise VitlensError(
            f"none of the {n} images of {dataset.spec} could be read (e.g. {dataset.names[skipped[0]]}); "
            "check that they are image files PIL can open"
        )
    if skipped:
        s = "s" if len(skipped) > 1 else ""
        logger.warning(f"skipped {len(skipped)} unreadable image{s} (e.g. {dataset.names[skipped[0]]})")


# --------------------------------------------------------------------------------------------------------------
# Sources: each returns everything of the requested split; open_dataset then takes the num_images subset.


@dataclass
class _Source:
    keys: list[Any]
    reader: Callable[[Any], Image.Image]
    names: list[str]
    labels: np.ndarray | None  # [N] int64
    classes: list[str] | None
    spec: str


def _holdout_is_test(labels: np.ndarray) -> np.ndarray:
    """Fixed stratified 80/20 split: ``round(0.2 * n_c)`` random members of each class go to test.

    Written out rather than sklearn's ``train_test_split(stratify=...)``, which refuses classes with a single
    image, common in a user's ImageFolder; here such an image simply stays in train.
    """
    rng = np.random.default_rng(_HOLDOUT_SEED)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_test = round(_HOLDOUT_FRACTION * len(members))
        is_test[rng.permutation(members)[:n_test]] = True
    return is_test


def _split_mask(is_test: np.ndarray, split: str) -> np.ndarray:
    if split == "all":
        return np.ones_like(is_test)
    return is_test if split == "test" else ~is_test


def _digits_source(split: str) -> _Source:
    from sklearn.datasets import load_digits  # sklearn's import is slow; only digits needs it

    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8], 0..16 -> 0..255
    labels = bunch.target.astype(np.int64)  # [1797]
    is_test = _holdout_is_test(labels)
    keep = np.flatnonzero(_split_mask(is_test, split))
    # The name carries the image's hold-out side, so it is the same whichever split was asked for.
    names = [f"digits/{'test' if is_test[i] else 'train'}/{i:04d}" for i in keep]
    return _Source(
        keys=keep.tolist(),
        reader=_ArrayReader(pixels),
        names=names,
        labels=labels[keep],
        classes=[str(d) for d in range(10)],
        spec=f"digits:{split}",
    )


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _torchvision_source(name: str, split: str, root: Path, download: bool) -> _Source:
    import torchvision.datasets  # heavy; only the named datasets need it

    class_name, split_args = _TORCHVISION[name]
    dataset_cls = getattr(torchvision.datasets, class_name)
    parts = ("train", "test") if split == "all" else (split,)
    if download:
        root.mkdir(parents=True, exist_ok=True)
    built: dict[str, Any] = {}
    for part in parts:
        try:
            built[part] = dataset_cls(root=str(root), download=download, **split_args[part])
        except (RuntimeError, OSError) as e:
            if not download:
                raise VitlensError(
                    f"{name} ({part}) is not in {root} or is incomplete; add --download to fetch it, "
                    "or --data-root DIR to point at a copy"
                ) from e
            raise VitlensError(f"could not download {name} into {root}: {_one_line(e)}") from e
    keys: list[tuple[str, int]] = []
    names: list[str] = []
    label_parts: list[np.ndarray] = []
    for part, ds in built.items():
        # The label arrays are in memory already; reading them avoids decoding every image.
        raw = next(v for v in (getattr(ds, a, None) for a in ("targets", "labels", "_labels")) if v is not None)
        label_parts.append(np.asarray(raw, dtype=np.int64))
        keys += [(part, i) for i in range(len(ds))]
        names += [f"{name}/{part}/{i:05d}" for i in range(len(ds))]
    labels = np.concatenate(label_parts)
    classes = getattr(next(iter(built.values())), "classes", None)
    if not classes:  # SVHN and STL10 builds without them: their labels are the digits / indices themselves
        classes = [str(c) for c in range(int(labels.max()) + 1)]
    return _Source(keys, _TorchvisionReader(built), names, labels, list(classes), f"{name}:{split}")


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _subdirs(folder: Path) -> list[Path]:
    """Visible subfolders (symlinked ones included), sorted by name."""
    try:
        with os.scandir(folder) as entries:
            return sorted((Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir()), key=str)
    except OSError:
        return []


def _top_images(folder: Path) -> list[Path]:
    try:
        with os.scandir(folder) as entries:
            return sorted((Path(e.path) for e in entries if _is_image_name(e.name) and e.is_file()), key=str)
    except OSError:
        return []


def _walk_images(top: Path) -> list[Path]:
    """All images under ``top``, recursively, sorted by path.

    Symlinked folders are followed (class folders are often links) but each real folder is visited once, keyed
    by device and inode, so a link back up the tree ends instead of looping forever as ``os.walk`` would.
    """
    seen: set[tuple[int, int]] = set()
    found: list[Path] = []
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as entries:
                for e in entries:
                    if e.name.startswith("."):
                        continue
                    if e.is_dir():
                        stack.append(Path(e.path))
                    elif _is_image_name(e.name) and e.is_file():
                        found.append(Path(e.path))
        except OSError as e:
            logger.warning(f"cannot list {folder}: {e.strerror or _one_line(e)}; left out")
    return sorted(found, key=lambda p: p.relative_to(top).parts)


def _warn_empty_classes(empty: list[str], where: Path) -> None:
    if empty:
        listed = ", ".join(repr(c) for c in empty)
        logger.warning(f"no images for class {listed} in {where}; kept in the class list with 0 images")


def _labelled_source(root: Path, folders: dict[str, Path], split: str, holdout: bool) -> _Source:
    """ImageFolder(s): ``folders`` maps a part name to a folder of class subfolders.

    Classes are the sorted union over all parts, so a label means the same class in train and test.
    """
    class_dirs = {part: {d.name: d for d in _subdirs(f)} for part, f in folders.items()}
    classes = sorted(set().union(*class_dirs.values()))
    wanted = list(folders) if (holdout or split == "all") else [split]
    paths: list[Path] = []
    labels: list[int] = []
    for part in wanted:
        counts = []
        for c, cls in enumerate(classes):
            found = _walk_images(class_dirs[part][cls]) if cls in class_dirs[part] else []
            paths += found
            labels += [c] * len(found)
            counts.append(len(found))
        _warn_empty_classes([cls for cls, n in zip(classes, counts, strict=True) if n == 0], folders[part])
    label_array = np.asarray(labels, dtype=np.int64)
    if holdout:
        keep = np.flatnonzero(_split_mask(_holdout_is_test(label_array), split))
        paths, label_array = [paths[i] for i in keep], label_array[keep]
    return _Source(
        keys=paths,
        reader=_read_file,
        names=[p.relative_to(root).as_posix() for p in paths],
        labels=label_array,
        classes=classes,
        spec=f"{root}:{split}",
    )


def _folder_source(folder: Path, split: str) -> _Source:
    root = folder.resolve()
    halves = {part: root / part for part in ("train", "test")}
    if all(h.is_dir() and _subdirs(h) for h in halves.values()):
        source = _labelled_source(root, halves, split, holdout=False)
    elif any(_walk_images(d) for d in _subdirs(root)):
        loose = _top_images(root)
        if loose:
            logger.warning(f"{len(loose)} images directly in {root} are in no class folder; left out")
        source = _labelled_source(root, {"all": root}, split, holdout=True)
    else:
        paths = _top_images(root)
        source = _Source(paths, _read_file, [p.name for p in paths], None, None, str(root))
    if not source.keys:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise VitlensError(
            f"no images ({exts}) for split {split!r} in {root}; give a folder of images or an ImageFolder"
        )
    return source


def _files_source(files: Sequence[str | Path], spec: str | None = None) -> _Source:
    if not files:
        raise UsageError("no image files given; pass at least one path")
    paths = [Path(f).expanduser() for f in files]
    missing = [p for p in paths if not p.exists()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise VitlensError(f"image file not found: {missing[0]}{more}")
    folders = [p for p in paths if p.is_dir()]
    if folders:
        raise VitlensError(f"{folders[0]} is a folder; pass a folder on its own, not in a list of image files")
    if spec is None:
        # A list has no natural name; the digest of the resolved paths (order included) is stable and short.
        digest = hashlib.sha256("\n".join(str(p.resolve()) for p in paths).encode("utf-8", "surrogateescape"))
        spec = f"files:{len(paths)}:{digest.hexdigest()[:16]}"
    return _Source(paths, _read_file, [str(f) for f in files], None, None, spec)


def _resolve_source(
    spec: str | os.PathLike | Sequence[str | os.PathLike], split: str, data_root: str | Path | None, download: bool
) -> _Source:
    if not isinstance(spec, (str, os.PathLike)):
        return _files_source(list(spec))
    text = os.fspath(spec)
    key = text.strip().lower().replace("_", "-")
    # A known name wins over a same-named folder in the working directory; write ./mnist for the folder.
    if isinstance(spec, str) and key == "digits":
        return _digits_source(split)
    if isinstance(spec, str) and key in _TORCHVISION:
        root = Path(data_root).expanduser() if data_root is not None else default_data_root()
        return _torchvision_source(key, split, root, download)
    path = Path(text).expanduser()
    if path.is_dir():
        return _folder_source(path, split)
    if path.exists():
        return _files_source([text], spec=str(path.resolve()))
    raise VitlensError(
        f"--data {text!r} is neither a known dataset ({', '.join(known_datasets())}) nor an existing file or folder"
    )


# --------------------------------------------------------------------------------------------------------------
# Subsets


def _stratified_quota(counts: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """How many of ``n`` to take from each class: proportional to ``counts``, summing exactly to ``n``.

    Every non-empty class gets at least one image when ``n`` allows it (a class absent from the subset would
    silently vanish from per-class results); the rest is shared by largest remainder, ties broken by a seeded
    shuffle rather than by class order.
    """
    present = counts > 0
    base = present.astype(np.int64) if n >= present.sum() else np.zeros_like(counts)
    room = counts - base
    share = (n - base.sum()) * room / room.sum()
    quota = base + np.floor(share).astype(np.int64)
    tiebreak = rng.permutation(len(counts))
    order = np.lexsort((tiebreak, -(share - np.floor(share))))  # largest remainder first
    for c in order:
        if quota.sum() == n:
            break
        if quota[c] < counts[c]:
            quota[c] += 1
    return quota


def _subset(labels: np.ndarray | None, total: int, n: int, seed: int) -> np.ndarray:
    """Indices (sorted, so the original order is kept) of a seeded ``n``-subset, stratified when labelled."""
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(total, size=n, replace=False))
    counts = np.bincount(labels, minlength=int(labels.max()) + 1)
    quota = _stratified_quota(counts, n, rng)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=q, replace=False) for c, q in enumerate(quota) if q]
    return np.sort(np.concatenate(chosen))


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
