"""The ``vitlens`` Typer app: global options and command registration (heavy imports stay in the commands)."""

from __future__ import annotations

import importlib
from typing import Annotated

import typer

from vitlens import __version__
from vitlens.cli import compare as compare_cmd
from vitlens.cli import config as config_cmd
from vitlens.cli import info as info_cmd
from vitlens.cli import report as report_cmd
from vitlens.cli import train as train_cmd
from vitlens.cli.console import fail, handle_errors, set_debug, setup_logging
from vitlens.errors import VitlensError
from vitlens.registry import definitions

app = typer.Typer(
    name="vitlens",
    help="Look inside trained Vision Transformers: the analyses of the ViT paper on your checkpoint.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vitlens {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (also VITLENS_DEBUG=1).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what vitlens does to stderr.")] = False,
) -> None:
    set_debug(debug)
    setup_logging(verbose=verbose)
    try:  # project defaults (vitlens.toml / [tool.vitlens] / VITLENS_*) become click's default_map
        config_cmd.apply_settings(ctx)
    except VitlensError as e:
        raise fail(str(e), e.exit_code) from None


app.command("info")(handle_errors(info_cmd.info))
for _definition in definitions():  # one command per registered analysis, in report order
    _module, _function = _definition.command.split(":")
    app.command(_definition.name)(handle_errors(getattr(importlib.import_module(_module), _function)))
app.command("train")(handle_errors(train_cmd.train))
app.command("report")(handle_errors(report_cmd.report))
app.command("compare")(handle_errors(compare_cmd.compare))
app.command("config")(handle_errors(config_cmd.config))


def main() -> None:
    """Console-script entry point."""
    app()
