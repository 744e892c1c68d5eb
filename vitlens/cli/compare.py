"""`vitlens compare`: the analyses of many checkpoints (a training run, or a list of models) side by side."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vitlens import defaults
from vitlens.cli.console import err_console, out_console, print_json, run_metadata
from vitlens.cli.fewshot import L2Opt, NoCacheOpt, SeedsOpt, ShotsOpt, parse_l2, parse_shots
from vitlens.cli.options import (
    DATA_PANEL,
    ArchOpt,
    BatchSizeOpt,
    CheckpointKeyOpt,
    CropPctOpt,
    DataOpt,
    DeviceOpt,
    ImgSizeOpt,
    InterpolationOpt,
    JsonOpt,
    MeanOpt,
    NumHeadsOpt,
    PretrainedOpt,
    QuietOpt,
    SplitOpt,
    StdOpt,
    check_num_images,
)
from vitlens.distributed import is_main
from vitlens.errors import UsageError

if TYPE_CHECKING:
    from vitlens.compare import CompareResult

COMPARE_PANEL = "Compare"
# Written out rather than imported from vitlens.compare, which stays out of `vitlens --help`'s imports.
ANALYSIS_NAMES = "pos-sim, filters, attention-distance, fewshot, cka"

CheckpointsArg = Annotated[
    list[str],
    typer.Argument(
        help="A `vitlens train --save-every N` run folder (read in epoch order), or checkpoints in the order to show.",
        show_default=False,
    ),
]
AnalysesOpt = Annotated[
    str | None,
    typer.Option(
        "--analyses",
        help=f"Comma-separated subset of: {ANALYSIS_NAMES} (cka: each checkpoint to the last, layer by layer).",
        rich_help_panel=COMPARE_PANEL,
    ),
]
CompareNumImagesOpt = Annotated[
    int,
    typer.Option("--num-images", help="Images for attention distance and CKA.", rich_help_panel=DATA_PANEL),
]
FewshotNumImagesOpt = Annotated[
    int | None,
    typer.Option(
        "--fewshot-num-images",
        help="A stratified subset of each few-shot split (default: all).",
        rich_help_panel=DATA_PANEL,
        show_default=False,
    ),
]
MinibatchSizeOpt = Annotated[
    int,
    typer.Option(
        "--minibatch-size", help="CKA's minibatch (the estimate depends on it).", rich_help_panel=COMPARE_PANEL
    ),
]
CompareOutOpt = Annotated[
    Path,
    typer.Option("--out", "-o", help="Output folder (its cache/ makes reruns cheap).", rich_help_panel=COMPARE_PANEL),
]


def compare(
    checkpoints: CheckpointsArg,
    arch: ArchOpt = None,
    num_heads: NumHeadsOpt = None,
    img_size: ImgSizeOpt = None,
    device: DeviceOpt = "auto",
    pretrained: PretrainedOpt = True,
    checkpoint_key: CheckpointKeyOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    crop_pct: CropPctOpt = None,
    interpolation: InterpolationOpt = None,
    data: DataOpt = "digits",
    split: SplitOpt = "test",
    num_images: CompareNumImagesOpt = defaults.COMPARE_NUM_IMAGES,
    fewshot_num_images: FewshotNumImagesOpt = None,
    batch_size: BatchSizeOpt = None,
    analyses: AnalysesOpt = None,
    shots: ShotsOpt = ",".join(str(s) for s in defaults.REPORT_SHOTS),
    seeds: SeedsOpt = defaults.REPORT_SEEDS,
    l2: L2Opt = f"{defaults.REPORT_L2:g}",
    minibatch_size: MinibatchSizeOpt = defaults.CKA_MINIBATCH_SIZE,
    no_cache: NoCacheOpt = False,
    out: CompareOutOpt = Path("vitlens-compare"),
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run pos-sim, filters, attention distance, few-shot and CKA-to-the-last on every checkpoint and show the trends.

    Writes index.html, report.md, summary.json, compare.csv and one compare_<analysis>.png per analysis. Each
    result is cached under OUT/cache by checkpoint (file hash) and options, so adding a checkpoint computes only it.
    """
    from vitlens.compare import compare as run_compare
    from vitlens.compare import parse_analyses

    started = time.perf_counter()
    parse_analyses(analyses)
    check_num_images(num_images)
    if fewshot_num_images is not None:
        check_num_images(fewshot_num_images)
    shot_counts = parse_shots(shots)
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1, not {seeds}")
    if minibatch_size < 4:
        raise UsageError(f"--minibatch-size must be at least 4 (the unbiased HSIC needs 4 rows), not {minibatch_size}")
    load_options = {
        "arch": arch,
        "num_heads": num_heads,
        "img_size": img_size,
        "device": device,
        "pretrained": pretrained,
        "checkpoint_key": checkpoint_key,
        "mean": mean,
        "std": std,
        "crop_pct": crop_pct,
        "interpolation": interpolation,
    }
    progress = None
    console = err_console()
    if not quiet and console.is_terminal and is_main():  # torchrun: rank 0 draws
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(
            TextColumn("compare: {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("checkpoints"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
    kwargs = {
        "analyses": analyses,
        "data": data,
        "out": out,
        "split": split,
        "num_images": num_images,
        "fewshot_num_images": fewshot_num_images,
        "shots": shot_counts,
        "seeds": seeds,
        "l2": parse_l2(l2),
        "minibatch_size": minibatch_size,
        "batch_size": batch_size,
        "load_options": load_options,
        "use_cache": not no_cache,
    }
    if progress is None:
        result = run_compare(checkpoints, **kwargs)
    else:
        with progress:
            task = progress.add_task("starting", total=len(checkpoints))

            def on_step(name: str, done: int, total: int) -> None:
                progress.update(task, description=name or "done", completed=done, total=total)

            result = run_compare(checkpoints, **kwargs, on_step=on_step)
    if json_:
        print_json({**result.summary, "meta": run_metadata(started, command="compare", device=device)})
    elif not quiet:
        _summarise(result)


def _summarise(result: CompareResult) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"vitlens compare: {len(result.checkpoints)} models", title_justify="left")
    table.add_column("epoch" if result.run else "model")
    headline = {
        "pos-sim": ("row_col_score", None, "pos-sim row/col"),
        "attention-distance": ("head_std_px", -1, "head spread, last layer (px)"),
        "fewshot": (None, None, "few-shot (largest shots)"),
        "cka": ("cka_to_last", 0, "CKA to last, layer 0"),
        "filters": ("first_component_share", None, "filter PC 1 share"),
    }
    shown = [a for a in result.analyses if a in headline]
    for a in shown:
        table.add_column(headline[a][2], justify="right")
    for ckpt in result.checkpoints:
        cells = [str(ckpt.epoch) if result.run else ckpt.name]
        mine = [r for r in result.rows if r.model == ckpt.name]
        for a in shown:
            quantity, layer, _ = headline[a]
            rows = [r for r in mine if r.analysis == a and (quantity is None or r.quantity == quantity)]
            if layer is not None and rows:
                rows = [r for r in rows if r.layer == sorted({x.layer for x in rows})[layer]]
            value = rows[-1].value if rows else None
            cells.append("n/a" if value is None else f"{value:.3f}")
        table.add_row(*[escape(c) for c in cells])
    console = out_console()
    console.print(table)
    cached = sum(len(result.analyses) - len(v) for v in result.computed.values())
    console.print(
        f"wrote index.html, report.md, summary.json, compare.csv and figures to {escape(str(result.out))} "
        f"({cached} result(s) read from the cache)"
    )
