"""attention-distance: mean attention distance per layer and head (ViT paper App. D.7, Fig. 7 right)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitlens import defaults
from vitlens.errors import ParameterError
from vitlens.registry import Definition, register
from vitlens.result import Result, int_pair

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from vitlens.analysis.attention_distance import AttentionDistance
    from vitlens.attention import Progress
    from vitlens.data import ImageDataset, Split
    from vitlens.models.vit import ViT


@dataclass(frozen=True, eq=False, repr=False)
class AttentionDistanceResult(Result):
    """How far each layer's heads look, in pixels, averaged over images.

    Attributes:
        distance: per layer and head mean distance, its spread over images and the prefix tokens' share
            (:class:`~vitlens.analysis.attention_distance.AttentionDistance`).
        source: the model it came from.
        data: the data spec of the images averaged over (:attr:`vitlens.data.ImageDataset.spec`).
        depth: the model's number of layers.
        num_heads: heads per layer.
        prefix_tokens: the kinds of the prefix tokens in sequence order (``cls``, ``dist``, ``reg``).
    """

    distance: AttentionDistance
    source: str
    data: str
    depth: int
    num_heads: int
    prefix_tokens: tuple[str, ...]

    analysis = "attention-distance"
    stem = "attention_distance"

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.distance.to_dict(),
            "source": self.source,
            "data": self.data,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "prefix_tokens": list(self.prefix_tokens),
        }

    @property
    def mean_px_by_layer(self) -> list[float]:
        """Mean distance of each layer over its heads, in pixels, layer 0 first."""
        return [float(v) for v in self.distance.distance_px.mean(axis=1)]

    def summary(self) -> str:
        per_layer, d = self.mean_px_by_layer, self.distance
        return (
            f"layer 0: {per_layer[0]:.1f} px, layer {len(per_layer) - 1}: {per_layer[-1]:.1f} px "
            f"(uniform {d.uniform_px:.1f} px, {d.num_images} images)"
        )

    def key_numbers(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "num_images": self.distance.num_images,
            "uniform_px": float(self.distance.uniform_px),
            "mean_px_by_layer": self.mean_px_by_layer,
        }

    def plot(self, ax: Axes | None = None) -> Axes:
        from vitlens.plotting.attention_distance import plot_attention_distance

        return plot_attention_distance(self.distance, ax=ax)

    def figure(self) -> Figure:
        from vitlens.plotting.attention_distance import attention_distance_figure

        return attention_distance_figure(self.distance)

    def _write(self, out: Path, fmt: str, payload: dict[str, Any]) -> list[Path]:
        import numpy as np

        from vitlens.io import ensure_out_dir, write_json, write_npz, write_text
        from vitlens.plotting.style import save_figure

        d = self.distance
        fig = self.figure()
        rows = ["layer,head,mean_px,std_px,prefix_mass"]
        depth, heads = d.distance_px.shape
        for layer in range(depth):
            for head in range(heads):
                values = (d.distance_px[layer, head], d.std_px[layer, head], d.prefix_mass[layer, head])
                rows.append(f"{layer},{head}," + ",".join(f"{float(v):.6g}" for v in values))
        out = ensure_out_dir(out)
        return [
            write_text(out / "attention_distance.csv", "\n".join(rows) + "\n"),
            write_npz(
                out / "attention_distance.npz",
                distance_px=d.distance_px,  # [depth, heads]
                std_px=d.std_px,
                prefix_mass=d.prefix_mass,
                uniform_px=np.float64(d.uniform_px),
                num_images=np.int64(d.num_images),
                renormalized=np.bool_(d.renormalized),
                patch_size=np.asarray(d.patch_size),
                grid_size=np.asarray(d.grid_size),
            ),
            write_json(out / "attention_distance.json", payload),
            save_figure(fig, out / f"attention_distance.{fmt}", fmt=fmt),  # type: ignore[arg-type]
        ]

    @classmethod
    def _read(cls, folder: Path, payload: dict[str, Any]) -> AttentionDistanceResult:
        import numpy as np

        from vitlens.analysis.attention_distance import AttentionDistance

        with np.load(folder / "attention_distance.npz", allow_pickle=False) as npz:
            distance = AttentionDistance(
                distance_px=npz["distance_px"],
                std_px=npz["std_px"],
                prefix_mass=npz["prefix_mass"],
                num_images=int(npz["num_images"]),
                renormalized=bool(npz["renormalized"]),
                uniform_px=float(npz["uniform_px"]),
                patch_size=int_pair(npz["patch_size"]),
                grid_size=int_pair(npz["grid_size"]),
            )
        return cls(
            distance,
            payload["source"],
            payload["data"],
            int(payload["depth"]),
            int(payload["num_heads"]),
            tuple(payload["prefix_tokens"]),
        )


def attention_distance(
    vit: ViT,
    data: ImageDataset | str | os.PathLike | Sequence[str | os.PathLike],
    *,
    num_images: int | None = None,
    split: Split = "test",
    batch_size: int | None = None,
    renormalize: bool = defaults.ATTENTION_DISTANCE_RENORMALIZE,
    progress: Progress | None = None,
) -> AttentionDistanceResult:
    """Mean attention distance in pixels of every layer and head (ViT paper App. D.7, Fig. 7 right).

    For one image, layer and head the distance is ``mean_i sum_j a_ij * ||p_i - p_j||`` over patch queries ``i`` and
    patch keys ``j``, ``p`` being the patch centres in pixels: the paper's analogue of a CNN's receptive field size.
    It is averaged over the images (the paper used 128), streaming, so memory does not grow with their number
    (:class:`vitlens.analysis.AttentionDistanceAccumulator`); the result does not depend on ``batch_size``.

    Args:
        vit: the model (:func:`vitlens.load`).
        data: the images: an :class:`~vitlens.data.ImageDataset` (:func:`vitlens.open_dataset`), used whole, or a
            data spec (``"digits"``, a folder, image files) opened here with ``split`` and ``num_images``.
        num_images: with a data spec, a stratified subset of this many images; default the paper's 128. To average
            over all images of a spec, open it with ``vitlens.open_dataset(spec, vit, num_images=None)``.
        split: with a data spec, ``train``, ``test`` or ``all``.
        batch_size: images per forward pass; None for the device's default.
        renormalize: rescale each patch query's weights on patches to sum to 1, so that the weight it gives prefix
            tokens (class, registers, which have no position) does not count as distance 0; that weight is reported
            as ``prefix_mass``. On by default: register and attention-sink models would otherwise look more local.
        progress: called as ``progress(done_images, total_images)`` before the first batch and after each.

    Raises:
        ParameterError: ``num_images`` below 1, or given with a dataset; a bad ``split``; ``batch_size`` below 1.
        VitlensError: an unknown data spec, or no image could be read.
    """
    from vitlens.attention import mean_attention_distance_for
    from vitlens.data import ImageDataset, open_dataset

    if num_images is not None and num_images < 1:
        raise ParameterError("num_images", f"num_images must be a positive number, not {num_images}")
    if batch_size is not None and batch_size < 1:
        raise ParameterError("batch_size", f"batch_size must be at least 1, not {batch_size}")
    if not isinstance(data, ImageDataset):
        if num_images is None:
            num_images = defaults.ATTENTION_DISTANCE_NUM_IMAGES
        data = open_dataset(data, vit.preprocess, split=split, num_images=num_images)
    elif num_images is not None:
        raise ParameterError(
            "num_images", "num_images applies to a data spec; a dataset is used whole (open it with num_images=)"
        )
    distance = mean_attention_distance_for(vit, data, batch_size=batch_size, renormalize=renormalize, progress=progress)
    return AttentionDistanceResult(
        distance,
        vit.source,
        data.spec,
        int(vit.depth),
        int(vit.num_heads),
        tuple(vit.layout.prefix_kinds),
    )


def _section(run: Any) -> AttentionDistanceResult:
    dataset = run.open(run.data, split=run.split, num_images=run.num_images)
    return attention_distance(run.vit, dataset, batch_size=run.batch_size)


DEFINITION = register(
    Definition(
        name="attention-distance",
        title="mean attention distance",
        paper="ViT paper App. D.7, Fig. 7 right",
        result=AttentionDistanceResult,
        compute=attention_distance,
        section=_section,
        needs_data=True,
        order=30,
        command="vitlens.cli.attention_distance:attention_distance",
    )
)
