"""`vitlens info`: what vitlens understood of a checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vitlens.cli.console import out_console, print_json, run_metadata
from vitlens.cli.options import (
    JsonOpt,
    ModelOptions,
    QuietOpt,
    with_model_options,
)


@with_model_options
def info(
    vit_options: ModelOptions,
    out: Annotated[Path | None, typer.Option("--out", help="Also write info.json here.")] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show the architecture, token layout and preprocessing vitlens read from MODEL.

    Also the source format, what was converted, what was dropped, and what was guessed (and why).
    """
    started = time.perf_counter()
    opts = vit_options
    vit = opts.load()
    facts = vit.describe()
    if out is not None:
        from vitlens.io import ensure_out_dir, write_json

        write_json(ensure_out_dir(out) / "info.json", facts)
    if json_:
        print_json({**facts, "meta": run_metadata(started, command="info")})
        return
    if quiet:
        return
    table = Table(title=f"vitlens info: {facts['source']}", show_header=False, title_justify="left")
    table.add_column("fact", style="bold")
    table.add_column("value")
    for key, value in facts.items():
        if key in ("guessed", "converted", "dropped"):
            continue
        if isinstance(value, list | tuple):
            shown = "x".join(map(str, value)) if key.endswith("_size") else ", ".join(map(_short, value))
        elif isinstance(value, float):
            shown = _short(value)
        else:
            shown = str(value)
        mark = " [yellow](guessed)[/]" if any(key in g for g in facts["guessed"]) else ""
        table.add_row(key, shown + mark)
    console = out_console()
    console.print(table)
    for note in facts["converted"]:
        console.print(f"[cyan]converted[/] {note}", highlight=False)
    for part in facts["dropped"]:
        console.print(f"[yellow]dropped[/] {part}", highlight=False)
    for fact, why in facts["guessed"].items():
        console.print(f"[yellow]guessed[/] {fact}: {why}", highlight=False)


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
