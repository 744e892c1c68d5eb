"""pos-sim: cosine similarity of the learned position embeddings (ViT paper §4.5, Fig. 7 centre)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitlens.errors import VitlensError
from vitlens.registry import Definition, register
from vitlens.result import Result, int_pair

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from vitlens.analysis.pos_sim import PositionSimilarity
    from vitlens.models.vit import ViT


@dataclass(frozen=True, eq=False, repr=False)
class PosSimResult(Result):
    """How similar each patch position's embedding is to every other's.

    Attributes:
        sim: the ``[H, W, H, W]`` similarities and their summaries
            (:class:`~vitlens.analysis.pos_sim.PositionSimilarity`).
        source: the model it came from.
        arch: its architecture name.
        img_size: the model's input size ``(H, W)`` in pixels (the embedding is resampled to it first).
        patch_size: ``(ph, pw)`` in pixels.
    """

    sim: PositionSimilarity
    source: str
    arch: str
    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    prefix_tokens: tuple[str, ...] = ()  # the prefix token kinds in sequence order (cls, dist, reg)

    analysis = "pos-sim"
    stem = "pos_sim"

    def to_dict(self) -> dict[str, Any]:
        # The [H, W, H, W] array (1.9 M numbers at 37 x 37) lives in pos_sim.npz; the JSON keeps the summaries.
        sim = self.sim
        return {
            "source": self.source,
            "arch": self.arch,
            "img_size": list(self.img_size),
            "patch_size": list(self.patch_size),
            "grid_size": list(sim.grid_size),
            "similarity_by_distance": {
                "distance": sim.distances.tolist(),
                "mean_similarity": json_array(sim.similarity_by_distance),
                "num_pairs": sim.pairs_by_distance.tolist(),
            },
            "row_col_score": None if sim.row_col_score is None else json_array(sim.row_col_score),
            "neighbour_minus_far": None if sim.neighbour_minus_far is None else json_array(sim.neighbour_minus_far),
            "similarity_file": f"{self.stem}.npz",
            "prefix_tokens": list(self.prefix_tokens),
        }

    def summary(self) -> str:
        sim = self.sim
        return f"row/column score {_signed(sim.row_col_score)}, near minus far {_signed(sim.neighbour_minus_far)}"

    def key_numbers(self) -> dict[str, Any]:
        payload = self.to_dict()
        return {k: payload[k] for k in ("grid_size", "row_col_score", "neighbour_minus_far")}

    def plot(self, ax: Axes | None = None) -> Axes:
        from vitlens.plotting.pos_sim import plot_position_similarity

        return plot_position_similarity(self.sim, ax=ax)

    def figure(self) -> Figure:
        from vitlens.plotting.pos_sim import pos_sim_figure

        return pos_sim_figure(self.sim)

    def _write(self, out: Path, fmt: str, payload: dict[str, Any]) -> list[Path]:
        import numpy as np

        from vitlens.io import ensure_out_dir, write_json, write_npz
        from vitlens.plotting.style import save_figure

        sim = self.sim
        fig = self.figure()
        out = ensure_out_dir(out)
        return [
            write_npz(
                out / "pos_sim.npz",
                similarity=sim.similarity,  # [H, W, H, W]
                distances=sim.distances,  # [M]
                similarity_by_distance=sim.similarity_by_distance,  # [M]
                pairs_by_distance=sim.pairs_by_distance,  # [M]
                grid_size=np.asarray(sim.grid_size),
            ),
            write_json(out / "pos_sim.json", payload),
            save_figure(fig, out / f"pos_sim.{fmt}", fmt=fmt),  # type: ignore[arg-type]
        ]

    @classmethod
    def _read(cls, folder: Path, payload: dict[str, Any]) -> PosSimResult:
        import numpy as np

        from vitlens.analysis.pos_sim import PositionSimilarity

        with np.load(folder / "pos_sim.npz", allow_pickle=False) as npz:
            sim = PositionSimilarity(
                similarity=npz["similarity"],
                distances=npz["distances"],
                similarity_by_distance=npz["similarity_by_distance"],
                pairs_by_distance=npz["pairs_by_distance"],
                row_col_score=_float_or_none(payload["row_col_score"]),
                neighbour_minus_far=_float_or_none(payload["neighbour_minus_far"]),
                grid_size=int_pair(npz["grid_size"]),
            )
        facts = (payload["source"], payload["arch"], int_pair(payload["img_size"]), int_pair(payload["patch_size"]))
        return cls(sim, *facts, tuple(payload.get("prefix_tokens", ())))


def json_array(values: Any) -> Any:
    """A number or numpy array as (nested lists of) floats, non-finite values as ``None`` (JSON has no NaN)."""
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(arr), arr, None).tolist()


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def pos_sim(vit: ViT) -> PosSimResult:
    """Cosine similarity of every patch position's learned embedding with every other's (ViT paper §4.5, Fig. 7 centre).

    The patch rows of the position embedding (prefix rows skipped) are compared pairwise by cosine similarity
    (:func:`vitlens.analysis.position_similarity`), and summarised by grid distance and by a row/column score: the
    paper's observation is that nearby positions, and positions sharing a row or column, have similar embeddings.
    A model loaded at another input size compares the embedding resampled to that size.

    Args:
        vit: the model (:func:`vitlens.load`).

    Raises:
        VitlensError: the model has no learned absolute position embedding, it has NaN/inf values, or the patch grid
            is 1x1.
    """
    import torch

    from vitlens.analysis.pos_sim import position_similarity

    pos_embed = vit.position_embedding()  # [N_pos, D]; raises when there is no learned absolute embedding
    if not torch.isfinite(pos_embed).all():
        raise VitlensError("the position embedding has NaN/inf values: its similarities are undefined")
    sim = position_similarity(pos_embed, vit.layout)
    layout = vit.layout
    facts = (vit.source, vit.arch, int_pair(layout.img_size), int_pair(layout.patch_size))
    return PosSimResult(sim, *facts, tuple(layout.prefix_kinds))


def _section(run: Any) -> PosSimResult:
    return pos_sim(run.vit)


DEFINITION = register(
    Definition(
        name="pos-sim",
        title="position-embedding similarity",
        paper="ViT paper Fig. 7 centre",
        result=PosSimResult,
        compute=pos_sim,
        section=_section,
        needs_data=False,
        order=20,
        command="vitlens.cli.pos_sim:pos_sim",
    )
)
