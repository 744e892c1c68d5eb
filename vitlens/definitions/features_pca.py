"""features: PCA of images' patch tokens as RGB, with a foreground split (DINOv2 paper, Oquab et al. 2023, Fig. 1)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitlens import defaults, distributed
from vitlens.errors import ParameterError, VitlensError
from vitlens.registry import Definition, register
from vitlens.result import Result, check_image_index, int_pair

if TYPE_CHECKING:
    import torch
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from PIL import Image

    from vitlens.analysis.features_pca import FeaturesPCA
    from vitlens.data import ImageDataset
    from vitlens.models.vit import ViT

Progress = Callable[[int, int], None]  # progress(done_images, total_images), over every pass
FINAL_NORM = "final-norm"  # tokens of the last layer: forward_features, after the final norm (what the head sees)
BLOCK_OUTPUT = "block-output"  # tokens of any other layer: the block's raw output (residual stream, no norm)


def check_layer(layer: Any, depth: int) -> int:
    """``layer`` as a 0-based index of one of ``depth`` blocks (negative counts from the end)."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ParameterError("layer", f"layer must be a 0-based layer index, not {layer!r}")
    if not -depth <= layer < depth:
        raise ParameterError("layer", f"layer {layer} is out of range: the model has {depth} layers (0..{depth - 1})")
    return layer % depth


@dataclass(frozen=True, eq=False, repr=False)
class FeaturesPCAResult(Result):
    """The joint PCA of a set of images' patch tokens, its RGB maps, and the photos they are drawn beside.

    Attributes:
        pca: components, explained variance, scores, RGB maps and foreground split
            (:class:`~vitlens.analysis.features_pca.FeaturesPCA`).
        images: each image's name, in the order of the maps.
        source: the model it came from.
        data: the data spec of the images.
        layer: the 0-based block whose tokens were analysed.
        tokens: ``final-norm`` (the last layer: the final norm's output) or ``block-output`` (any other layer: the
            block's output before any norm).
        patch_size: ``(ph, pw)`` in pixels.
        photos: the images as the model sees them, for the figure; None for a result read back from its files. An
            init-only argument kept as an attribute, not a field (as in
            :class:`~vitlens.definitions.rollout.RolloutResult`).
    """

    pca: FeaturesPCA
    images: tuple[str, ...]
    source: str
    data: str
    layer: int
    tokens: str
    patch_size: tuple[int, int]
    prefix_tokens: tuple[str, ...] = ()  # the prefix token kinds in sequence order (cls, dist, reg)
    photos: InitVar[Sequence[Image.Image] | None] = None

    analysis = "features"
    stem = "features"

    def __post_init__(self, photos: Sequence[Image.Image] | None) -> None:
        object.__setattr__(self, "photos", None if photos is None else tuple(photos))

    # ---------------------------------------------------------------------------------------------- numbers
    def to_dict(self) -> dict[str, Any]:
        # Components [K, D], scores and maps live in features.npz; the JSON keeps the numbers people read.
        pca = self.pca
        return {
            "images": list(self.images),
            "source": self.source,
            "data": self.data,
            "layer": self.layer,
            "tokens": self.tokens,
            "num_components": pca.num_components,
            "explained_variance_ratio": pca.explained_variance_ratio.tolist(),
            "explained_variance": pca.explained_variance.tolist(),
            "foreground": pca.foreground,
            "threshold": pca.threshold,
            "num_fit_patches": pca.num_fit_patches,
            "foreground_fraction": pca.foreground_fraction,
            "grid_size": list(pca.grid_size),
            "patch_size": list(self.patch_size),
            "arrays_file": f"{self.stem}.npz",
            "prefix_tokens": list(self.prefix_tokens),
        }

    def summary(self) -> str:
        ratios = ", ".join(f"{r:.1%}" for r in self.pca.explained_variance_ratio[:3])
        return (
            f"{len(self.images)} images, layer {self.layer} ({self.tokens}), explained variance {ratios}, "
            f"fitted on {self.pca.foreground_fraction:.0%} of patches"
        )

    def key_numbers(self) -> dict[str, Any]:
        payload = self.to_dict()
        keys = ("layer", "explained_variance_ratio", "foreground", "foreground_fraction")
        return {"num_images": len(self.images), **{k: payload[k] for k in keys}}

    # ---------------------------------------------------------------------------------------------- drawing
    def _titles(self) -> list[str]:
        return [Path(name).name for name in self.images]

    def plot(self, ax: Axes | None = None, index: int = 0) -> Axes:
        """Draw image ``index``'s RGB map (upsampled to its photo when the result has the photos).

        Raises:
            ParameterError: ``index`` is not the position of one of the images.
        """
        check_image_index(index, len(self.images))
        from vitlens.plotting.features_pca import plot_features_pca

        photo = None if self.photos is None else self.photos[index]
        return plot_features_pca(photo, self.pca.rgb[index], ax=ax, title=self._titles()[index])

    def figure(self) -> Figure:
        """Every photo beside its RGB map (the maps alone for a result read back from its files)."""
        from vitlens.plotting.features_pca import features_pca_figure

        pca = self.pca
        fitted = "all patches" if pca.foreground == "none" else f"foreground (PC1 > {pca.threshold:g})"
        title = f"patch-token PCA, layer {self.layer} ({self.tokens}), fitted on {fitted}"
        return features_pca_figure(self.photos, pca.rgb, self._titles(), title=title)

    # ---------------------------------------------------------------------------------------------- files
    def _write(self, out: Path, fmt: str, payload: dict[str, Any]) -> list[Path]:
        """features.<fmt>, features.npz and features.json."""
        import numpy as np

        from vitlens.io import ensure_out_dir, write_json, write_npz
        from vitlens.plotting.style import save_figure

        pca = self.pca
        fig = self.figure()
        arrays: dict[str, Any] = {
            "components": pca.components,  # [K, D]
            "mean": pca.mean,  # [D]
            "explained_variance": pca.explained_variance,  # [K]
            "explained_variance_ratio": pca.explained_variance_ratio,  # [K]
            "scores": pca.scores,  # [B, H, W, K]
            "rgb": pca.rgb,  # [B, H, W, 3]
            "images": np.asarray(list(self.images), dtype=str),
            "grid_size": np.asarray(pca.grid_size),
        }
        if pca.foreground_mask is not None:
            arrays["foreground_mask"] = pca.foreground_mask  # [B, H, W]
            arrays["foreground_scores"] = pca.foreground_scores  # [B, H, W]
            arrays["foreground_component"] = pca.foreground_component  # [D]
        out = ensure_out_dir(out)
        return [
            save_figure(fig, out / f"features.{fmt}", fmt=fmt),  # type: ignore[arg-type]
            write_npz(out / "features.npz", **arrays),
            write_json(out / "features.json", payload),
        ]

    @classmethod
    def _read(cls, folder: Path, payload: dict[str, Any]) -> FeaturesPCAResult:
        import numpy as np

        from vitlens.analysis.features_pca import FeaturesPCA

        with np.load(folder / "features.npz", allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        threshold = payload["threshold"]
        pca = FeaturesPCA(
            components=arrays["components"],
            mean=arrays["mean"],
            explained_variance=arrays["explained_variance"],
            explained_variance_ratio=arrays["explained_variance_ratio"],
            scores=arrays["scores"],
            rgb=arrays["rgb"],
            foreground=payload["foreground"],
            threshold=None if threshold is None else float(threshold),
            foreground_mask=arrays.get("foreground_mask"),
            foreground_scores=arrays.get("foreground_scores"),
            foreground_component=arrays.get("foreground_component"),
            num_fit_patches=int(payload["num_fit_patches"]),
            grid_size=int_pair(arrays["grid_size"]),
        )
        return cls(
            pca,
            tuple(str(name) for name in arrays["images"]),
            payload["source"],
            payload["data"],
            int(payload["layer"]),
            payload["tokens"],
            int_pair(payload["patch_size"]),
            tuple(payload.get("prefix_tokens", ())),
        )


def patch_token_batches(vit: ViT, dataset: ImageDataset, *, layer: int, batch_size: int) -> Iterator[torch.Tensor]:
    """The patch tokens ``[b, H*W, D]`` of ``dataset``'s images, batch by batch, in order.

    ``layer`` is the last block: ``vit.features`` (forward_features, after the final norm). Any other layer: that
    block's output, read by a hook scoped to each forward pass (before any norm).
    """
    import torch

    from vitlens.data import iterate_batches

    patches = vit.layout.patch_slice
    dtype = next(vit.model.parameters()).dtype
    last = layer == vit.depth - 1
    with torch.inference_mode():
        for batch in iterate_batches(dataset, batch_size=batch_size, device=vit.device):
            images = batch.images.to(dtype)
            if last:
                tokens = vit.features(images)  # [b, N, D]
            else:
                captured: list[torch.Tensor] = []
                with vit.hooks(blocks=lambda _layer, t, kept=captured: kept.append(t), layers=[layer]):
                    vit.features(images)
                tokens = captured[0]  # [b, N, D]
            yield tokens[:, patches]  # [b, H*W, D]


def features_pca(
    vit: ViT,
    images: ImageDataset | str | os.PathLike | Sequence[str | os.PathLike],
    *,
    layer: int = defaults.FEATURES_LAYER,
    num_components: int = defaults.FEATURES_NUM_COMPONENTS,
    foreground: str | float = defaults.FEATURES_FOREGROUND,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> FeaturesPCAResult:
    """PCA of the patch tokens of ``images``, fitted jointly so colours compare across images (DINOv2 paper Fig. 1).

    The tokens are those after ``layer``: for the last layer (the default, -1) the model's final normed output
    (``forward_features``, what the head sees), for any other layer that block's raw output (before the final norm).
    With ``foreground="auto"`` a first PCA on all patches is thresholded at 0 on its first component, oriented so
    that the side with fewer patches on the grid's border is the foreground, and the returned PCA is fitted on the
    foreground patches only; a number is used as that threshold instead of 0; ``"none"`` fits on all patches
    (:func:`vitlens.analysis.features_pca.features_pca_batches`). The PCA is fitted from float64 moments accumulated
    batch by batch, so memory does not grow with the number of images (each pass runs the images through the model
    again: two passes with ``none``, three otherwise). Under torchrun each rank runs its shard of the images, the
    moments are combined across ranks and the maps gathered in dataset order: every rank returns the single
    process's result (to float64 rounding).

    Args:
        vit: the model (:func:`vitlens.load`).
        images: an :class:`~vitlens.data.ImageDataset`, image files, a folder (all its images), or a data spec
            (its test split, a few images; see :func:`vitlens.definitions.rollout.open_images`).
        layer: 0-based block (negative from the end).
        num_components: components kept, 1 .. embed_dim; the first three are the RGB map.
        foreground: ``"auto"``, ``"none"`` or a threshold on the oriented first component.
        batch_size: images per forward pass; None for the device's default.
        progress: called as ``progress(done, total)`` after every batch, ``total`` counting every pass.

    Raises:
        ParameterError: a bad option or a layer outside the model.
        VitlensError: an image cannot be read, or the foreground holds fewer than 2 patches.
    """
    from vitlens.analysis.features_pca import check_foreground, check_num_components, features_pca_batches
    from vitlens.data import ImageDataset
    from vitlens.definitions.rollout import open_images
    from vitlens.device import resolve_batch_size

    check_num_components(num_components)
    foreground = check_foreground(foreground)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ParameterError("batch_size", f"batch_size must be at least 1, not {batch_size!r}")
    if num_components > vit.embed_dim:
        raise ParameterError(
            "num_components", f"num_components must be at most {vit.embed_dim} (the token width), not {num_components}"
        )
    layer = check_layer(layer, vit.depth)
    dataset = images if isinstance(images, ImageDataset) else open_images(vit, images)
    photos = tuple(dataset.load_pil(i) for i in range(len(dataset)))  # one-line error for a file that is no image
    n, passes = len(dataset), 2 if foreground == "none" else 3
    size = resolve_batch_size(batch_size, vit.device)
    # Under torchrun each rank streams its contiguous block of the images in every pass; the analysis combines the
    # moments across ranks and gathers the maps in dataset order (the whole set and no collective in one process).
    local = distributed.shard(dataset)
    owned = distributed.shard_indices(n) if local is not dataset else None  # [n_rank]
    calls = 0

    def batches() -> Iterator[torch.Tensor]:
        nonlocal calls
        offset, seen = calls * n, 0
        calls += 1
        report = progress
        if owned is not None:  # rank 0 draws the whole set's count; the other ranks stay silent
            report = distributed.global_progress(progress, n, offset=offset, grand_total=passes * n)
            offset = 0
        for tokens in patch_token_batches(vit, local, layer=layer, batch_size=size):
            seen += tokens.shape[0]
            if report is not None:
                report(offset + seen, passes * n)
            yield tokens
        if seen != len(local):  # a skipped image would shift every later map against its name
            raise VitlensError(f"{len(local) - seen} of {n} images could not be read; remove the unreadable files")

    pca = features_pca_batches(
        batches,
        grid_size=vit.layout.grid_size,
        num_components=num_components,
        foreground=foreground,
        image_indices=owned,
    )
    return FeaturesPCAResult(
        pca,
        tuple(dataset.names),
        vit.source,
        dataset.spec,
        layer,
        FINAL_NORM if layer == vit.depth - 1 else BLOCK_OUTPUT,
        int_pair(vit.layout.patch_size),
        tuple(vit.layout.prefix_kinds),
        photos,
    )


def _section(run: Any) -> FeaturesPCAResult:
    return features_pca(run.vit, run.open_images(), batch_size=run.batch_size)


DEFINITION = register(
    Definition(
        name="features",
        title="patch-feature PCA",
        paper="DINOv2 paper Fig. 1 (Oquab et al. 2023)",
        result=FeaturesPCAResult,
        compute=features_pca,
        section=_section,
        needs_data=True,
        order=45,
        command="vitlens.cli.features:features",
    )
)
