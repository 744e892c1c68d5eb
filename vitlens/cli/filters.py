"""`vitlens filters`: principal components of the patch-embedding filters (ViT paper Fig. 7 left)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from vitlens.cli.console import out_console, run_metadata, save_and_print
from vitlens.cli.options import (
    OUTPUT_PANEL,
    FormatOpt,
    JsonOpt,
    ModelOptions,
    OutOpt,
    QuietOpt,
    check_format,
    with_model_options,
)

if TYPE_CHECKING:
    from vitlens.analysis.filters import FilterPCA

ComponentsOpt = Annotated[
    int | None,
    typer.Option(
        "--components",
        "-k",
        help="How many principal components to show (default 28 as in the paper, or all there are if fewer).",
        show_default=False,
        rich_help_panel=OUTPUT_PANEL,
    ),
]
SUMMARY_ROWS = 5  # components listed in the terminal summary; the rest are in filters.json


@with_model_options
def filters(
    vit_options: ModelOptions,
    components: ComponentsOpt = None,
    out: OutOpt = Path("vitlens-out"),
    fmt: FormatOpt = "png",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """PCA of the linear patch projection's filters, shown as images (ViT paper Fig. 7 left).

    Writes filters.{png,npz,json} to --out. Each component's sign is arbitrary: inverted colours are the same component.
    """
    from vitlens.definitions.filters import filters as compute

    started = time.perf_counter()
    fmt = check_format(fmt)
    vit = vit_options.load()
    result = compute(vit, num_components=components)
    meta = run_metadata(started, command="filters", device=str(vit.device))
    save_and_print(
        result,
        out,
        fmt,
        meta,
        json_=json_,
        quiet=quiet,
        summarise=lambda files: _summarise(result.pca, result.to_dict(), out, files),
    )


def _summarise(result: FilterPCA, payload: dict[str, Any], out: Path, files: list[Path]) -> None:
    from rich.table import Table

    ph, pw = payload["patch_size"]
    table = Table()
    for name in ("component", "explained", "cumulative"):
        table.add_column(name, justify="right")
    cumulative = 0.0
    for i, ratio in enumerate(result.explained_variance_ratio[:SUMMARY_ROWS]):
        cumulative += float(ratio)
        table.add_row(str(i), f"{100 * ratio:.2f}%", f"{100 * cumulative:.2f}%")
    console = out_console()
    console.print(
        f"[bold]patch-embedding filter PCA[/] of {payload['source']}: "
        f"{payload['embed_dim']} filters of {payload['in_chans']}x{ph}x{pw}"
    )
    console.print(table)
    k = result.num_components
    console.print(
        f"the first {k} of {payload['available_components']} components explain "
        f"{100 * payload['cumulative_explained_variance']:.1f}% of the filters' variance (signs are arbitrary)"
    )
    console.print(f"wrote {', '.join(f.name for f in files)} to {out}")
