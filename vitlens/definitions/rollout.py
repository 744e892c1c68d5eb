"""rollout: attention rollout maps of images (Abnar & Zuidema 2020; ViT paper Fig. 6 and App. D.8)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitlens import defaults
from vitlens.errors import ParameterError, VitlensError, spec_named
from vitlens.registry import Definition, register
from vitlens.result import Result, check_image_index, int_pair

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from PIL import Image

    from vitlens.analysis.rollout import HeadFusion, Rollout
    from vitlens.data import ImageDataset
    from vitlens.models.vit import ViT

Progress = Callable[[int, int], None]  # progress(done_images, total_images)
HEAD_FUSIONS = ("mean", "max", "min")


def unique_stems(names: Sequence[str]) -> list[str]:
    """File stems for ``names``, made unique (``a``, ``a-1``, ...) case-insensitively, for case-blind filesystems."""
    used: set[str] = set()
    stems = []
    for name in names:
        base = Path(name).stem or "image"
        stem, k = base, 1
        while stem.lower() in used:
            stem, k = f"{base}-{k}", k + 1
        used.add(stem.lower())
        stems.append(stem)
    return stems


def rollout_settings(result: Rollout) -> str:
    """The rollout's options in words, for titles: target, head fusion, discard ratio, layers."""
    first, last = result.start_layer, result.start_layer + result.num_layers - 1
    target = "mean of patch tokens" if result.target == "mean-patch" else f"{result.target} token"
    return f"{target}, {result.head_fusion} over heads, discard {result.discard_ratio:g}, layers {first}-{last}"


@dataclass(frozen=True, eq=False, repr=False)
class RolloutResult(Result):
    """Attention rollout maps of a set of images, with the photos they are drawn over.

    Attributes:
        rollout: the maps ``[B, H, W]`` (each scaled to max 1), their mass on patches and the options
            (:class:`~vitlens.analysis.rollout.Rollout`).
        images: each image's name, in the order of the maps.
        stems: each image's file stem under ``rollout/``, unique case-insensitively.
        target_defaulted: whether the target was chosen for the model (``cls``, or ``mean-patch`` without a class
            token) rather than asked for.
        source: the model it came from.
        data: the data spec of the images.
        patch_size: ``(ph, pw)`` in pixels.
        heads: the target's raw attention per head in one layer, ``[B, heads, H, W]``, or None.
        heads_layer: that layer (0-based), or None.
        prefix_tokens: the prefix token kinds in sequence order (cls, dist, reg).
        threshold: the share of each head's attention on patches its mask holds (DINO's ``--threshold``), or None.
        heads_masks: per image and head, the smallest set of patches holding ``threshold`` of the head's weight on
            patches, ``[B, heads, H, W]`` booleans (:func:`~vitlens.analysis.rollout.threshold_masks`), or None.
        photos: the images as the model sees them (``ImageDataset.load_pil``), for the overlays; None for a result
            read back by :func:`~vitlens.result.load_result`, which keeps the numbers but not the photos. An init-only
            argument kept as an attribute, not a field: ``==`` (field by field), ``to_dict`` and the files leave it
            out, so a result read back equals the one saved.
    """

    rollout: Rollout
    images: tuple[str, ...]
    stems: tuple[str, ...]
    target_defaulted: bool
    source: str
    data: str
    patch_size: tuple[int, int]
    heads: np.ndarray | None = None
    heads_layer: int | None = None
    prefix_tokens: tuple[str, ...] = ()  # the prefix token kinds in sequence order (cls, dist, reg)
    threshold: float | None = None
    heads_masks: np.ndarray | None = None  # [B, heads, H, W] bool, with threshold only
    photos: InitVar[Sequence[Image.Image] | None] = None

    analysis = "rollout"
    stem = "rollout"

    def __post_init__(self, photos: Sequence[Image.Image] | None) -> None:
        # Base Result.__eq__ compares every dataclass field; the photos are what the maps are drawn over, not part
        # of the result, so they live outside the fields (frozen: set through object.__setattr__).
        object.__setattr__(self, "photos", None if photos is None else tuple(photos))

    # ---------------------------------------------------------------------------------------------- numbers
    def to_dict(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "images": list(self.images),
            "stems": list(self.stems),
            **self.rollout.to_dict(),
            "target_defaulted": self.target_defaulted,
            "source": self.source,
            "data": self.data,
            "patch_size": list(self.patch_size),
        }
        if self.heads is not None:
            payload["heads_layer"] = self.heads_layer
            payload["heads"] = self.heads.tolist()
        if self.heads_masks is not None:
            payload["threshold"] = self.threshold
            payload["heads_masks"] = self.heads_masks.tolist()
        payload["prefix_tokens"] = list(self.prefix_tokens)
        return payload

    def summary(self) -> str:
        return (
            f"{len(self.images)} images, {self.rollout.target} token, "
            f"mean mass on patches {self._mean_patch_mass():.3f}"
        )

    def key_numbers(self) -> dict[str, Any]:
        return {
            "num_images": len(self.images),
            "target": self.rollout.target,
            "mean_patch_mass": self._mean_patch_mass(),
        }

    def _mean_patch_mass(self) -> float:
        import numpy as np

        return float(np.mean(self.rollout.patch_mass))

    # ---------------------------------------------------------------------------------------------- drawing
    def _titles(self) -> list[str]:
        return [Path(name).name for name in self.images]

    def plot(self, ax: Axes | None = None, index: int = 0) -> Axes:
        """Draw image ``index``'s rollout map over its photo in grey, or the map alone when the result has no
        photos (read back from its files).

        Raises:
            ParameterError: ``index`` is not the position of one of the images.
        """
        check_image_index(index, len(self.images))
        from vitlens.plotting.rollout import plot_rollout

        photo = None if self.photos is None else self.photos[index]
        return plot_rollout(photo, self.rollout.maps[index], ax=ax, title=self._titles()[index])

    def figure(self) -> Figure:
        """The figure the CLI saves as ``rollout.<fmt>`` (every image, photo above overlay), or for one image its
        ``rollout/<stem>.<fmt>``; without photos, the grid of maps alone."""
        from vitlens.plotting.rollout import rollout_figure, rollout_grid_figure, rollout_map_grid_figure

        title = f"attention rollout: {rollout_settings(self.rollout)}"
        if self.photos is None:
            return rollout_map_grid_figure(self.rollout.maps, self._titles(), title=title)
        if len(self.photos) == 1:
            return rollout_figure(self.photos[0], self.rollout.maps[0], title=self._titles()[0])
        return rollout_grid_figure(self.photos, self.rollout.maps, self._titles(), title=title)

    # ---------------------------------------------------------------------------------------------- files
    def _write(self, out: Path, fmt: str, payload: dict[str, Any]) -> list[Path]:
        """rollout/<stem>.<fmt> per image, rollout.<fmt> (more than one image), rollout_heads_L<layer>.<fmt> (with
        per-head maps), rollout_heads_L<layer>_masks.<fmt> (with a threshold), rollout.npz and rollout.json."""
        import numpy as np

        from vitlens.io import ensure_out_dir, write_json, write_npz
        from vitlens.plotting.rollout import head_attention_figure, head_mask_figure, rollout_figure
        from vitlens.plotting.style import save_figure

        if self.photos is None:
            raise VitlensError(
                "this rollout has no photos (it was read back from its files), so its overlays cannot be drawn: "
                "compute it again with vitlens.rollout to save it"
            )
        photos, maps, titles = self.photos, self.rollout.maps, self._titles()
        # The summary figures are built first (a plotting error then leaves no files); the per-image figures are
        # built and written one at a time below, so memory holds one of them, however many images there are.
        grid = self.figure() if len(photos) > 1 else None
        heads_fig = masks_fig = None
        if self.heads is not None:
            layer, target = int(self.heads_layer), self.rollout.target  # type: ignore[arg-type]
            heads_fig = head_attention_figure(photos, self.heads, titles, layer=layer, target=target)
            if self.heads_masks is not None:
                opts = {"layer": layer, "target": target, "threshold": float(self.threshold)}  # type: ignore[arg-type]
                masks_fig = head_mask_figure(photos, self.heads_masks, titles, **opts)

        out = ensure_out_dir(out)
        image_dir = ensure_out_dir(out / "rollout")
        files = [
            save_figure(rollout_figure(photo, rollout_map, title=title), image_dir / f"{stem}.{fmt}", fmt=fmt)  # type: ignore[arg-type]
            for photo, rollout_map, title, stem in zip(photos, maps, titles, self.stems, strict=True)
        ]
        if grid is not None:
            files.append(save_figure(grid, out / f"rollout.{fmt}", fmt=fmt))  # type: ignore[arg-type]
        arrays: dict[str, Any] = {
            "maps": maps,  # [B, H, W]
            "patch_mass": self.rollout.patch_mass,  # [B]
            "images": np.asarray(list(self.images), dtype=str),
            "grid_size": np.asarray(self.rollout.grid_size),
        }
        if heads_fig is not None:
            name = f"rollout_heads_L{self.heads_layer}.{fmt}"
            files.append(save_figure(heads_fig, out / name, fmt=fmt))  # type: ignore[arg-type]
            arrays["heads"] = self.heads  # [B, heads, H, W]
            arrays["heads_layer"] = np.int64(self.heads_layer)
        if masks_fig is not None:
            name = f"rollout_heads_L{self.heads_layer}_masks.{fmt}"
            files.append(save_figure(masks_fig, out / name, fmt=fmt))  # type: ignore[arg-type]
            arrays["heads_masks"] = self.heads_masks  # [B, heads, H, W] bool
        files.append(write_npz(out / "rollout.npz", **arrays))
        files.append(write_json(out / "rollout.json", payload))
        return files

    @classmethod
    def _read(cls, folder: Path, payload: dict[str, Any]) -> RolloutResult:
        import numpy as np

        from vitlens.analysis.rollout import Rollout

        with np.load(folder / "rollout.npz", allow_pickle=False) as npz:
            maps, patch_mass = npz["maps"], npz["patch_mass"]
            images = tuple(str(name) for name in npz["images"])
            grid_size = int_pair(npz["grid_size"])
            heads = npz.get("heads")  # [B, heads, H, W], saved with per-head maps only
            heads_masks = npz.get("heads_masks")  # [B, heads, H, W] bool, saved with a threshold only
        rollout = Rollout(
            maps=maps,
            patch_mass=patch_mass,
            head_fusion=payload["head_fusion"],
            discard_ratio=float(payload["discard_ratio"]),
            start_layer=int(payload["start_layer"]),
            num_layers=int(payload["num_layers"]),
            target=payload["target"],
            grid_size=grid_size,  # type: ignore[arg-type]
        )
        return cls(
            rollout,
            images,
            tuple(payload["stems"]),
            bool(payload["target_defaulted"]),
            payload["source"],
            payload["data"],
            int_pair(payload["patch_size"]),
            heads,
            None if heads is None else int(payload["heads_layer"]),
            tuple(payload.get("prefix_tokens", ())),
            None if heads_masks is None else float(payload["threshold"]),
            heads_masks,
        )


def open_images(
    vit: ViT,
    images: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    split: str = "test",
    num_images: int | None = None,
) -> ImageDataset:
    """The images a caller names, as :func:`rollout` reads them.

    A folder (or a list holding one folder) gives every image in it, with no train/test hold-out; image files give
    themselves; any other string is a data spec (``digits``, ``cifar10``, ...), of which ``split`` is taken, a
    stratified subset of ``num_images`` images (default :data:`~vitlens.defaults.ROLLOUT_DATA_IMAGES`).

    Raises:
        ParameterError: ``images`` names nothing that exists (the error names ``images``, not the data spec).
    """
    with spec_named("images"):
        return _open_images(vit, images, split=split, num_images=num_images)


def _open_images(
    vit: ViT, images: str | os.PathLike | Sequence[str | os.PathLike], *, split: str, num_images: int | None
) -> ImageDataset:
    from vitlens.data import IMAGE_EXTENSIONS, open_dataset

    if isinstance(images, str | os.PathLike):
        path = Path(images).expanduser()
        if path.is_dir():
            return open_dataset(images, vit.preprocess, split="all", num_images=num_images)
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return open_dataset([images], vit.preprocess, num_images=num_images)
        count = defaults.ROLLOUT_DATA_IMAGES if num_images is None else num_images
        return open_dataset(images, vit.preprocess, split=split, num_images=count)  # type: ignore[arg-type]
    images = list(images)
    if not images:
        raise ParameterError("images", "images must name at least one image, a folder or a data spec, not []")
    if len(images) == 1 and Path(images[0]).expanduser().is_dir():
        return open_dataset(images[0], vit.preprocess, split="all", num_images=num_images)
    return open_dataset(images, vit.preprocess, num_images=num_images)


def _check_layer(name: str, layer: Any, depth: int) -> int:
    """``layer`` as a 0-based index of one of ``depth`` layers (negative counts from the end)."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ParameterError(name, f"{name} must be a 0-based layer index, not {layer!r}")
    if not -depth <= layer < depth:
        raise ParameterError(name, f"{name} {layer} is out of range: the model has {depth} layers (0..{depth - 1})")
    return layer % depth


def _check_count(name: str, value: Any, rule: str) -> None:
    """``value`` is None or an integer of at least 1; else a ParameterError saying ``name`` must ``rule``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ParameterError(name, f"{name} must {rule}, not {value!r}")


def check_options(head_fusion: Any, discard_ratio: Any, start_layer: Any) -> None:
    """Check the options that need no model (the CLI calls this before loading one).

    Raises:
        ParameterError: ``head_fusion`` not mean, max or min; ``discard_ratio`` not in [0, 1); ``start_layer`` not
            an integer of 0 or more.
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ParameterError("head_fusion", f"head_fusion must be mean, max or min, not {head_fusion!r}")
    number = isinstance(discard_ratio, int | float) and not isinstance(discard_ratio, bool)
    if not number or not 0.0 <= discard_ratio < 1.0:
        raise ParameterError("discard_ratio", f"discard_ratio must be in [0, 1), not {discard_ratio!r}")
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or start_layer < 0:
        raise ParameterError("start_layer", f"start_layer must be 0 or more (0-based), not {start_layer!r}")


def check_threshold(threshold: Any) -> None:
    """Check ``threshold``: None, or a share of the attention mass in (0, 1] (the CLI calls this before loading).

    Raises:
        ParameterError: ``threshold`` is not a number in (0, 1].
    """
    number = isinstance(threshold, int | float) and not isinstance(threshold, bool)
    if threshold is not None and (not number or not 0.0 < threshold <= 1.0):
        raise ParameterError("threshold", f"threshold must be in (0, 1], not {threshold!r}")


def rollout(
    vit: ViT,
    images: ImageDataset | str | os.PathLike | Sequence[str | os.PathLike],
    *,
    head_fusion: HeadFusion = defaults.ROLLOUT_HEAD_FUSION,  # type: ignore[assignment]
    discard_ratio: float = defaults.ROLLOUT_DISCARD_RATIO,
    start_layer: int = defaults.ROLLOUT_START_LAYER,
    target: str | None = None,
    per_head_layer: int | None = None,
    threshold: float | None = None,
    split: str = "test",
    num_images: int | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> RolloutResult:
    """Attention rollout of each image: which patches the class token (or ``target``) draws its information from.

    Abnar & Zuidema 2020, as in the ViT paper's Fig. 6 and App. D.8: each layer's heads are fused into one
    ``[N, N]`` matrix, the residual connection is modelled as ``(A + I)`` with rows renormalised, and the layers are
    multiplied, ``R = A_L @ ... @ A_start``; the map is the target's row of ``R`` on the patches, scaled to max 1
    (:func:`vitlens.analysis.attention_rollout`, streamed one layer of one batch at a time).

    Args:
        vit: the model (:func:`vitlens.load`).
        images: an :class:`~vitlens.data.ImageDataset`, image files, a folder (all its images), or a data spec
            (``split``, ``num_images`` images; see :func:`open_images`).
        head_fusion: ``mean`` (the paper's), ``max`` or ``min`` over heads.
        discard_ratio: fraction in [0, 1) of each layer's weakest patch-to-patch weights set to 0 (prefix rows and
            columns kept); the paper discards nothing.
        start_layer: first layer multiplied in (0-based).
        target: the row the map is read from: ``cls``, ``dist``, ``reg:N`` or ``mean-patch`` (the mean of the patch
            tokens' rows); default ``cls``, or ``mean-patch`` for models without a class token.
        per_head_layer: also keep the target's raw attention to each patch per head in this layer (0-based,
            negative from the end), the DINO-style view; None for none.
        threshold: with ``per_head_layer``, also keep per image and head the smallest set of patches holding this
            share, in (0, 1], of the head's attention on patches (prefix tokens, registers included, left out of
            the mass), as DINO's ``visualize_attention.py --threshold`` (e.g. 0.6); None for none.
        split: with a data spec, ``train``, ``test`` or ``all``.
        num_images: with a data spec, folder or image files, a subset of this many images.
        batch_size: images per forward pass; None for the device's default. Results do not depend on it.
        progress: called as ``progress(done, total)`` after every batch (both passes, with ``per_head_layer``).

    Returns:
        The maps, with the photos for the overlays.

    Raises:
        ParameterError: a bad option, a layer outside the model, or ``num_images`` given with a dataset.
        VitlensError: the model has no ``target`` token, or an image cannot be read.
    """
    from vitlens.analysis.rollout import resolve_target, threshold_masks
    from vitlens.attention import default_target, head_attention_for, rollout_for
    from vitlens.data import ImageDataset

    check_options(head_fusion, discard_ratio, start_layer)
    _check_count("num_images", num_images, "be a positive number")
    _check_count("batch_size", batch_size, "be at least 1")
    if num_images is not None and isinstance(images, ImageDataset):
        raise ParameterError(
            "num_images", "num_images applies to a data spec; a dataset is used whole (open it with num_images=)"
        )
    _check_layer("start_layer", start_layer, vit.depth)
    heads_layer = None if per_head_layer is None else _check_layer("per_head_layer", per_head_layer, vit.depth)
    check_threshold(threshold)
    if threshold is not None and heads_layer is None:
        raise ParameterError("threshold", "threshold needs per_head_layer: the masks are cut from the per-head maps")
    defaulted = target is None
    target = default_target(vit.layout) if target is None else target
    if not isinstance(target, str):
        raise ParameterError("target", f"target must be cls, dist, reg:N or mean-patch, not {target!r}")
    resolve_target(target, vit.layout)  # ParameterError for a bad form; VitlensError when the model lacks the token

    if isinstance(images, ImageDataset):
        dataset = images
    else:
        dataset = open_images(vit, images, split=split, num_images=num_images)
    photos = tuple(dataset.load_pil(i) for i in range(len(dataset)))  # one-line error for a file that is no image
    n, passes = len(dataset), 1 if heads_layer is None else 2

    def stage(offset: int) -> Progress | None:
        # One progress bar for both passes over the images: the rollout, then the per-head layer.
        return None if progress is None else (lambda done, _total: progress(offset + done, passes * n))

    options = {"head_fusion": head_fusion, "discard_ratio": discard_ratio, "start_layer": start_layer}
    maps = rollout_for(vit, dataset, batch_size=batch_size, target=target, progress=stage(0), **options)
    heads = None
    if heads_layer is not None:
        opts = {"layer": heads_layer, "target": target, "batch_size": batch_size, "progress": stage(n)}
        heads = head_attention_for(vit, dataset, **opts)  # [B, heads, H, W] weights on patch tokens only
    masks = None if threshold is None else threshold_masks(heads, mass=threshold)  # [B, heads, H, W] bool
    return RolloutResult(
        maps,
        tuple(dataset.names),
        tuple(unique_stems(dataset.names)),
        defaulted,
        vit.source,
        dataset.spec,
        int_pair(vit.layout.patch_size),
        heads,
        heads_layer,
        tuple(vit.layout.prefix_kinds),
        None if threshold is None else float(threshold),
        masks,
        photos,
    )


def _section(run: Any) -> RolloutResult:
    return rollout(run.vit, run.open_images(), batch_size=run.batch_size)


DEFINITION = register(
    Definition(
        name="rollout",
        title="attention rollout",
        paper="ViT paper Fig. 6, App. D.8 (Abnar & Zuidema 2020)",
        result=RolloutResult,
        compute=rollout,
        section=_section,
        needs_data=True,
        order=40,
        command="vitlens.cli.rollout:rollout",
    )
)
