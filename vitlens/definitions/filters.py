"""filters: principal components of the linear patch projection (ViT paper §4.5, Fig. 7 left)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitlens.errors import ParameterError, VitlensError
from vitlens.registry import Definition, register
from vitlens.result import Result

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from vitlens.analysis.filters import FilterPCA
    from vitlens.models.vit import ViT


@dataclass(frozen=True, eq=False, repr=False)
class FiltersResult(Result):
    """The principal components of a model's patch-embedding filters.

    Attributes:
        pca: the components, explained variance and mean filter (:class:`~vitlens.analysis.filters.FilterPCA`).
        source: the model it came from.
        arch: its architecture name.
        embed_dim: ``D``, the number of filters.
        available_components: ``min(D, C*ph*pw)``, how many components exist.
    """

    pca: FilterPCA
    source: str
    arch: str
    embed_dim: int
    available_components: int
    prefix_tokens: tuple[str, ...] = ()  # the prefix token kinds in sequence order (cls, dist, reg)

    analysis = "filters"
    stem = "filters"

    def to_dict(self) -> dict[str, Any]:
        d, (c, ph, pw) = self.embed_dim, self.pca.mean_filter.shape
        ratio = self.pca.explained_variance_ratio  # [K]
        return {
            "source": self.source,
            "arch": self.arch,
            "embed_dim": int(d),
            "in_chans": int(c),
            "patch_size": [int(ph), int(pw)],
            "num_components": self.pca.num_components,
            "available_components": int(self.available_components),
            "components_shape": list(self.pca.components.shape),
            "explained_variance_ratio": [float(r) for r in ratio],
            "cumulative_explained_variance": float(ratio.sum()),
            "prefix_tokens": list(self.prefix_tokens),
        }

    def summary(self) -> str:
        share = 100 * float(self.pca.explained_variance_ratio.sum())
        return f"{self.pca.num_components} components explain {share:.1f}%"

    def key_numbers(self) -> dict[str, Any]:
        return {
            "num_components": self.pca.num_components,
            "cumulative_explained_variance": float(self.pca.explained_variance_ratio.sum()),
        }

    def plot(self, ax: Axes | None = None) -> Axes:
        from vitlens.plotting.filters import plot_filter_components

        return plot_filter_components(self.pca, ax=ax)

    def figure(self) -> Figure:
        from vitlens.plotting.filters import filters_figure

        return filters_figure(self.pca)

    def _write(self, out: Path, fmt: str, payload: dict[str, Any]) -> list[Path]:
        from vitlens.io import ensure_out_dir, write_json, write_npz
        from vitlens.plotting.style import save_figure

        fig = self.figure()
        out = ensure_out_dir(out)
        return [
            write_npz(
                out / "filters.npz",
                components=self.pca.components,  # [K, C, ph, pw]
                explained_variance_ratio=self.pca.explained_variance_ratio,  # [K]
                singular_values=self.pca.singular_values,  # [min(D, C*ph*pw)]
                mean_filter=self.pca.mean_filter,  # [C, ph, pw]
            ),
            write_json(out / "filters.json", payload),
            save_figure(fig, out / f"filters.{fmt}", fmt=fmt),  # type: ignore[arg-type]
        ]

    @classmethod
    def _read(cls, folder: Path, payload: dict[str, Any]) -> FiltersResult:
        import numpy as np

        from vitlens.analysis.filters import FilterPCA

        with np.load(folder / "filters.npz", allow_pickle=False) as npz:
            pca = FilterPCA(
                components=npz["components"],
                explained_variance_ratio=npz["explained_variance_ratio"],
                singular_values=npz["singular_values"],
                mean_filter=npz["mean_filter"],
            )
        facts = (int(payload["embed_dim"]), int(payload["available_components"]))
        return cls(pca, payload["source"], payload["arch"], *facts, tuple(payload.get("prefix_tokens", ())))


def filters(vit: ViT, *, num_components: int | None = None) -> FiltersResult:
    """Principal components of the patch-embedding filters (ViT paper §4.5, Fig. 7 left).

    The ``D`` filters of the linear patch projection, each a ``C x ph x pw`` image, are centred and decomposed by
    SVD (:func:`vitlens.analysis.filter_pca`); the paper shows the first 28 components.

    Args:
        vit: the model (:func:`vitlens.load`).
        num_components: how many components to keep; default the paper's 28, or all there are if fewer. More than
            exist is reduced to all of them, with a warning.

    Raises:
        ParameterError: ``num_components`` below 1.
        VitlensError: the patch embedding is not one linear projection, or has NaN/inf weights.
    """
    import torch

    from vitlens.analysis.filters import filter_pca
    from vitlens.log import logger

    if num_components is not None and num_components < 1:
        raise ParameterError("num_components", f"num_components must be at least 1, not {num_components}")
    weight = vit.patch_projection()  # [D, C, ph, pw]; raises for hybrid / conv-stem patch embeddings
    if not torch.isfinite(weight).all():
        raise VitlensError("the patch projection has NaN/inf weights: its principal components are undefined")
    d, c, ph, pw = weight.shape
    available = min(d, c * ph * pw)  # a centred D x (C*ph*pw) matrix has at most this many components
    if num_components is not None and num_components > available:
        logger.warning(
            "num_components=%d: only %d components exist (%d filters of %d values); showing all of them",
            num_components,
            available,
            d,
            c * ph * pw,
        )
        num_components = available
    pca = filter_pca(weight, num_components=num_components)
    return FiltersResult(pca, vit.source, vit.arch, int(d), int(available), tuple(vit.layout.prefix_kinds))


def _section(run: Any) -> FiltersResult:
    return filters(run.vit)


DEFINITION = register(
    Definition(
        name="filters",
        title="patch-embedding filter PCA",
        paper="ViT paper Fig. 7 left",
        result=FiltersResult,
        compute=filters,
        section=_section,
        needs_data=False,
        order=10,
        command="vitlens.cli.filters:filters",
    )
)
