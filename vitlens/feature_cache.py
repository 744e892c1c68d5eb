"""The on-disk feature cache: features of one model on one dataset, keyed by everything that changes them.

A probe sweep (shots x seeds x λ) reuses one extraction; the key holds the model's identity, the data spec and its
files' stamps, the preprocessing, the layers and the feature kind, so a change to any of them misses the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from vitlens import distributed
from vitlens.errors import VitlensError
from vitlens.features import FeatureKind, Progress, canonical_feature, extract_features, resolve_feature_layers
from vitlens.log import logger

if TYPE_CHECKING:
    from vitlens.data import ImageDataset
    from vitlens.models.vit import ViT

CacheStatus = Literal["hit", "miss", "off"]


def default_cache_dir() -> Path:
    """Where features are cached: ``$VITLENS_CACHE_DIR``, else ``~/.cache/vitlens/features``."""
    env = os.environ.get("VITLENS_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vitlens" / "features"


def feature_cache_key(vit: ViT, dataset: ImageDataset, *, layers: Sequence[int], feature: str) -> dict[str, Any]:
    """Everything the cached features depend on, JSON-ready; the cache file name is a hash of it.

    ``dataset.spec`` carries the split and the ``num_images`` subset; the names and labels catch files added to,
    removed from or renamed in a folder, and each file's size and modification time an image edited in place.
    ``feature`` is keyed under its current name, so a deprecated one (``gap``) shares its features' entry.
    """
    from vitlens import __version__

    listing = hashlib.sha256()
    for name in dataset.names:
        listing.update(name.encode("utf-8", "surrogateescape") + b"\0")
    if dataset.labels is not None:
        listing.update(np.ascontiguousarray(dataset.labels, dtype=np.int64).tobytes())
    for stamp in dataset.file_stamps():
        listing.update(b"-\0" if stamp is None else f"{stamp[0]}:{stamp[1]}\0".encode())
    return {
        "format": 2,
        "vitlens": __version__,
        "model": vit.identity,
        "arch": vit.arch,
        "arch_kwargs": json.loads(json.dumps(vit.arch_kwargs, sort_keys=True, default=str)),
        "dtype": str(next(vit.model.parameters()).dtype),
        "data": dataset.spec,
        "num_images": len(dataset),
        "listing": listing.hexdigest(),
        "preprocess": vit.preprocess.as_dict(),
        "layers": [int(la) for la in layers],
        "feature": canonical_feature(feature),
    }


def _canonical(key: Mapping[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def cache_path(cache_dir: str | os.PathLike, key: Mapping[str, Any]) -> Path:
    digest = hashlib.sha256(_canonical(key).encode("utf-8")).hexdigest()
    return Path(cache_dir).expanduser() / f"features-{digest[:32]}.npz"


def load_cached_features(path: Path, key: Mapping[str, Any]) -> dict[int, torch.Tensor] | None:
    """The features stored at ``path`` if the file holds exactly ``key``; None when absent, stale or corrupt."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            stored_key = str(npz["key"][()])
            layers = [int(la) for la in npz["layers"]]
            feats = np.asarray(npz["features"], dtype=np.float32)  # [L, N, D]
    except Exception as e:  # a truncated or foreign file raises almost anything (BadZipFile, ValueError, KeyError)
        logger.warning(f"ignoring unreadable feature cache {path} ({type(e).__name__}); recomputing")
        return None
    if stored_key != _canonical(key):
        logger.info(f"feature cache {path} was written for other inputs; recomputing")
        return None
    if layers != list(key["layers"]) or feats.ndim != 3 or feats.shape[:2] != (len(layers), key["num_images"]):
        logger.warning(f"ignoring inconsistent feature cache {path}; recomputing")
        return None
    return {layer: torch.from_numpy(feats[i].copy()) for i, layer in enumerate(layers)}


def save_cached_features(path: Path, key: Mapping[str, Any], features: Mapping[int, torch.Tensor]) -> bool:
    """Write ``features`` with their ``key`` atomically; a cache that cannot be written is a warning, not an error."""
    from vitlens.io import atomic_path

    layers = list(features)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                key=np.array(_canonical(key)),
                layers=np.asarray(layers, dtype=np.int64),
                features=torch.stack([features[la] for la in layers]).numpy(),  # [L, N, D]
            )
    except (OSError, VitlensError) as e:
        logger.warning(f"could not write the feature cache {path}: {e}; continuing without it")
        return False
    return True


def cached_features(
    vit: ViT,
    dataset: ImageDataset,
    *,
    layers: Sequence[int] | None = None,
    feature: FeatureKind = "pre-logits",
    batch_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: Progress | None = None,
    num_workers: int = 0,
) -> tuple[dict[int, torch.Tensor], CacheStatus]:
    """:func:`extract_features`, read from and written to the on-disk cache.

    Models without a stable identity (built in memory) are never cached.

    Under torchrun every rank looks for the cache file itself (no shared filesystem is assumed), and the ranks
    agree before anyone computes: a hit only if every rank found it, otherwise all extract their shards together
    (:func:`extract_features` gathers the rows to every rank). Rank 0 alone writes the file, atomically, so no
    rank ever reads a half-written file and no two ranks write it; the others do not wait for the write, since
    they already hold the features.

    Returns:
        The features and whether they came from the cache (``hit``), were computed and stored (``miss``), or the
        cache was not used (``off``).
    """
    feature = canonical_feature(feature)  # once, so that a deprecated name warns once
    chosen = resolve_feature_layers(vit, layers, feature)
    key = feature_cache_key(vit, dataset, layers=chosen, feature=feature) if use_cache and vit.identity else None
    path = cache_path(default_cache_dir() if cache_dir is None else cache_dir, key) if key is not None else None
    if path is not None:
        feats = load_cached_features(path, key)
        # One rank without the file (another node's disk, or a write not yet landed) makes every rank extract:
        # the extraction is a collective, so all ranks must take the same branch.
        if distributed.all_reduce_sum(int(feats is None)) == 0:
            logger.info(f"features of {dataset.spec} from the cache {path}")
            return feats, "hit"  # type: ignore[return-value]
    opts = {"batch_size": batch_size, "progress": progress, "num_workers": num_workers}
    feats = extract_features(vit, dataset, layers=chosen, feature=feature, **opts)
    if path is None:
        return feats, "off"
    if distributed.is_main():  # every rank holds the same gathered features; one writer
        save_cached_features(path, key, feats)
    return feats, "miss"
