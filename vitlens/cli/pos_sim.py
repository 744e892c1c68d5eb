"""`vitlens pos-sim`: cosine similarity of the learned position embeddings (ViT paper Fig. 7 centre)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitlens.cli.console import out_console, print_json, run_metadata
from vitlens.cli.options import (
    ArchOpt,
    CheckpointKeyOpt,
    CropPctOpt,
    DeviceOpt,
    FormatOpt,
    ImgSizeOpt,
    InterpolationOpt,
    JsonOpt,
    MeanOpt,
    ModelArg,
    ModelKwargsOpt,
    ModelOptions,
    NumHeadsOpt,
    OutOpt,
    PretrainedOpt,
    QuietOpt,
    StdOpt,
    check_format,
)
from vitlens.errors import VitlensError

if TYPE_CHECKING:
    from vitlens.analysis.pos_sim import PositionSimilarity

SUMMARY_DISTANCES = 6  # nearest distances listed in the terminal summary (plus the farthest); all are in the JSON


def pos_sim(
    model: ModelArg = None,
    arch: ArchOpt = None,
    num_heads: NumHeadsOpt = None,
    model_kwargs: ModelKwargsOpt = None,
    img_size: ImgSizeOpt = None,
    device: DeviceOpt = "auto",
    pretrained: PretrainedOpt = True,
    checkpoint_key: CheckpointKeyOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    crop_pct: CropPctOpt = None,
    interpolation: InterpolationOpt = None,
    out: OutOpt = Path("vitlens-out"),
    fmt: FormatOpt = "png",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Cosine similarity of every patch position's embedding with every other's (ViT paper Fig. 7 centre).

    Writes pos_sim.{png,npz,json} to --out. With --img-size the embeddings are first resampled to that input size.
    """
    import torch

    from vitlens.analysis.pos_sim import position_similarity
    from vitlens.outputs import save_pos_sim

    started = time.perf_counter()
    fmt = check_format(fmt)
    vit = ModelOptions.of(locals()).load()
    pos_embed = vit.position_embedding()  # [N_pos, D]; raises when there is no learned absolute embedding
    if not torch.isfinite(pos_embed).all():
        raise VitlensError("the position embedding has NaN/inf values: its similarities are undefined")
    result = position_similarity(pos_embed, vit.layout)

    summary = _summary(result)
    payload: dict[str, Any] = {
        "source": vit.source,
        "arch": vit.arch,
        "img_size": list(vit.layout.img_size),
        "patch_size": list(vit.layout.patch_size),
        **summary,
    }
    meta = run_metadata(started, command="pos-sim", device=str(vit.device))
    # The file keeps the summaries; the [H, W, H, W] array (1.9 M numbers at 37 x 37) lives in pos_sim.npz.
    files = save_pos_sim(result, out, payload={**payload, "similarity_file": "pos_sim.npz", "meta": meta}, fmt=fmt)
    if json_:
        print_json(
            {**payload, "similarity": _json_array(result.similarity), "files": [str(f) for f in files], "meta": meta}
        )
    elif not quiet:
        _summarise(result, payload, out, files)


def _summary(result: PositionSimilarity) -> dict[str, Any]:
    """The JSON-safe comparison numbers (what :meth:`PositionSimilarity.to_dict` gives, without the array)."""
    return {
        "grid_size": list(result.grid_size),
        "similarity_by_distance": {
            "distance": result.distances.tolist(),
            "mean_similarity": _json_array(result.similarity_by_distance),
            "num_pairs": result.pairs_by_distance.tolist(),
        },
        "row_col_score": None if result.row_col_score is None else _json_array(result.row_col_score),
        "neighbour_minus_far": None if result.neighbour_minus_far is None else _json_array(result.neighbour_minus_far),
    }


def _json_array(values: Any) -> Any:
    """A number or numpy array as (nested lists of) floats, non-finite values as ``None`` (JSON has no NaN)."""
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(arr), arr, None).tolist()


def _summarise(result: PositionSimilarity, payload: dict[str, Any], out: Path, files: list[Path]) -> None:
    from rich.table import Table

    h, w = result.grid_size
    table = Table()
    for name in ("grid distance", "mean cosine similarity", "pairs"):
        table.add_column(name, justify="right")
    shown = list(range(min(SUMMARY_DISTANCES, len(result.distances))))
    if len(result.distances) > len(shown):
        shown.append(len(result.distances) - 1)  # the farthest, what neighbour_minus_far compares against
    for m in shown:
        if m == shown[-1] and m != len(shown) - 1:
            table.add_row("...", "", "")
        table.add_row(
            str(int(result.distances[m])), f"{result.similarity_by_distance[m]:.3f}", str(result.pairs_by_distance[m])
        )
    console = out_console()
    console.print(f"[bold]position embedding similarity[/] of {payload['source']}: {h}x{w} patches")
    console.print(table)
    far = int(result.distances[-1])
    row_col = (
        "same row or column minus all other positions"
        if result.row_col_score is not None
        else ("one row or column: every pair shares a line")
    )
    near_far = f"distance 1 minus distance {far}" if far > 1 else "every pair of positions is at distance 1"
    console.print(f"row_col_score       {_fmt(result.row_col_score)}  {row_col}")
    console.print(f"neighbour_minus_far {_fmt(result.neighbour_minus_far)}  {near_far}")
    console.print("(> 0: nearby positions, and positions sharing a row or column, have similar embeddings)")
    console.print(f"wrote {', '.join(f.name for f in files)} to {out}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"
