"""`vitlens report`: every analysis of MODEL in one folder, with index.html, report.md and summary.json."""

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
    BatchSizeOpt,
    DataOpt,
    DataRootOpt,
    DownloadOpt,
    JsonOpt,
    ModelOptions,
    OutOpt,
    QuietOpt,
    SplitOpt,
    check_num_images,
    with_model_options,
)
from vitlens.device import resolve_batch_size
from vitlens.errors import UsageError
from vitlens.registry import definitions

if TYPE_CHECKING:
    from vitlens.report import ReportResult

REPORT_PANEL = "Report"
# From the registry: its definition modules import no torch or matplotlib, so `--help` stays fast.
SECTION_NAMES = ", ".join(("info", *(d.name for d in definitions())))

SectionsOpt = Annotated[
    str | None,
    typer.Option("--sections", help=f"Comma-separated subset of: {SECTION_NAMES}.", rich_help_panel=REPORT_PANEL),
]
ImagesOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--images",
        help="Image file (repeat the option) or one folder for rollout, instead of images of --data.",
        rich_help_panel=DATA_PANEL,
        show_default=False,
    ),
]
ReportNumImagesOpt = Annotated[
    int,
    typer.Option(
        "--num-images", help="Images for attention distance (the paper used 128).", rich_help_panel=DATA_PANEL
    ),
]
RolloutImagesOpt = Annotated[
    int, typer.Option("--rollout-images", help="Images of --data for rollout.", rich_help_panel=REPORT_PANEL)
]


@with_model_options
def report(
    vit_options: ModelOptions,
    data: DataOpt = "digits",
    images: ImagesOpt = None,
    split: SplitOpt = "test",
    num_images: ReportNumImagesOpt = defaults.REPORT_NUM_IMAGES,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    batch_size: BatchSizeOpt = None,
    sections: SectionsOpt = None,
    rollout_images: RolloutImagesOpt = defaults.REPORT_ROLLOUT_IMAGES,
    shots: ShotsOpt = ",".join(str(s) for s in defaults.REPORT_SHOTS),
    seeds: SeedsOpt = defaults.REPORT_SEEDS,
    l2: L2Opt = f"{defaults.REPORT_L2:g}",
    no_cache: NoCacheOpt = False,
    out: OutOpt = Path("vitlens-report"),
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run every analysis on MODEL into one folder: index.html, report.md, summary.json and each command's files.

    A failing section is marked failed and the others still run (exit code 1). Few-shot runs when --data has labels.
    """
    from vitlens.report import build_report, parse_sections

    started = time.perf_counter()
    chosen = parse_sections(sections)
    check_num_images(num_images)
    check_num_images(rollout_images)
    shot_counts = parse_shots(shots)
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1, not {seeds}")
    l2_value = parse_l2(l2)
    vit = vit_options.load()
    batch_size = resolve_batch_size(batch_size, vit.device)

    console = err_console()
    progress = None
    if not quiet and console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(
            TextColumn("report: {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("sections"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
    kwargs = {
        "data": data,
        "images": images,
        "sections": chosen,
        "out": out,
        "split": split,
        "num_images": num_images,
        "rollout_images": rollout_images,
        "shots": shot_counts,
        "seeds": seeds,
        "l2": l2_value,
        "batch_size": batch_size,
        "data_root": data_root,
        "download": download,
        "use_cache": not no_cache,
    }
    if progress is None:
        result = build_report(vit, **kwargs)
    else:
        with progress:
            task = progress.add_task("starting", total=len(chosen))

            def on_section(name: str, done: int, total: int) -> None:
                progress.update(task, description=name or "done", completed=done, total=total)

            result = build_report(vit, **kwargs, on_section=on_section)

    if json_:
        print_json({**result.summary, "meta": run_metadata(started, command="report", device=str(vit.device))})
    elif not quiet:
        _summarise(result)
    if not result.ok:
        raise typer.Exit(1)


def _summarise(result: ReportResult) -> None:
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"vitlens report: {escape(str(result.summary['source']))}", title_justify="left")
    table.add_column("section")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    table.add_column("key number")
    colour = {"ok": "green", "failed": "bold red", "skipped": "dim"}
    for s in result.sections:
        detail = s.key if s.status == "ok" else (s.error or "")
        table.add_row(s.name, Text(s.status, style=colour[s.status]), f"{s.seconds:.1f}", Text(detail))
    console = out_console()
    console.print(table)
    console.print(f"wrote index.html, report.md, summary.json and the sections' files to {escape(str(result.out))}")
    if not result.ok:
        err_console().print(f"[bold red]failed sections:[/] {', '.join(result.failed)}")
