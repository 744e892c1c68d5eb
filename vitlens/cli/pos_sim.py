"""`vitlens pos-sim`: cosine similarity of the learned position embeddings (ViT paper Fig. 7 centre)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from vitlens.cli.console import out_console, print_json, run_metadata
from vitlens.cli.options import (
    FormatOpt,
    JsonOpt,
    ModelOptions,
    OutOpt,
    QuietOpt,
    check_format,
    with_model_options,
)

if TYPE_CHECKING:
    from vitlens.analysis.pos_sim import PositionSimilarity

SUMMARY_DISTANCES = 6  # nearest distances listed in the terminal summary (plus the farthest); all are in the JSON


@with_model_options
def pos_sim(
    vit_options: ModelOptions,
    out: OutOpt = Path("vitlens-out"),
    fmt: FormatOpt = "png",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Cosine similarity of every patch position's embedding with every other's (ViT paper Fig. 7 centre).

    Writes pos_sim.{png,npz,json} to --out. With --img-size the embeddings are first resampled to that input size.
    """
    from vitlens.definitions.pos_sim import json_array
    from vitlens.definitions.pos_sim import pos_sim as compute

    started = time.perf_counter()
    fmt = check_format(fmt)
    vit = vit_options.load()
    result = compute(vit)
    meta = run_metadata(started, command="pos-sim", device=str(vit.device))
    files = result.save(out, fmt, meta=meta)
    if json_:
        # The terminal's JSON carries the [H, W, H, W] array itself instead of the name of the file holding it.
        payload = {k: v for k, v in result.to_dict().items() if k != "similarity_file"}
        print_json(
            {**payload, "similarity": json_array(result.sim.similarity), "files": [str(f) for f in files], "meta": meta}
        )
    elif not quiet:
        _summarise(result.sim, result.source, out, files)


def _summarise(result: PositionSimilarity, source: str, out: Path, files: list[Path]) -> None:
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
    console.print(f"[bold]position embedding similarity[/] of {source}: {h}x{w} patches")
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
