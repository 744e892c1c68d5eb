"""Sources: what a ``--data`` spec names (digits, a torchvision dataset, a folder, image files), read as keys, a
reader, names and labels for the requested split; :func:`vitlens.data.open_dataset` then takes the subset.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vitlens.data.images import _one_line, _read_file
from vitlens.data.subsets import _holdout_is_test, _split_mask
from vitlens.errors import ParameterError, VitlensError
from vitlens.log import logger

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


def known_datasets() -> list[str]:
    """Dataset names ``--data`` accepts besides paths."""
    return ["digits", *_TORCHVISION]


def default_data_root() -> Path:
    """Where named datasets live: ``$VITLENS_DATA_ROOT``, else ``~/.cache/vitlens/data``."""
    env = os.environ.get("VITLENS_DATA_ROOT")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vitlens" / "data"


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
# Sources: each returns everything of the requested split; open_dataset then takes the num_images subset.


@dataclass
class _Source:
    keys: list[Any]
    reader: Callable[[Any], Image.Image]
    names: list[str]
    labels: np.ndarray | None  # [N] int64
    classes: list[str] | None
    spec: str


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
        raise ParameterError("spec", "spec is an empty list: pass at least one image file")
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
    raise ParameterError(
        "spec",
        f"spec {text!r} is neither a known dataset ({', '.join(known_datasets())}) nor an existing file or folder",
    )
