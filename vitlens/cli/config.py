"""`vitlens config`, and the hand-over of project settings to click as every command's ``default_map``."""

from __future__ import annotations

import time
from typing import Any

import typer

from vitlens.cli.console import out_console, print_json, run_metadata
from vitlens.cli.options import JsonOpt


def accepted_keys(group: Any) -> dict[str, dict[str, str]]:
    """For every command, the configuration keys it accepts mapped to parameter names.

    A parameter is reachable by its name (``num_images``, ``json_`` excepted) and by its long option without dashes
    (``num-images``, ``format`` for ``fmt``).
    ``group`` is the app's command group (typer vendors its own click, so it is duck-typed: ``.commands``).
    """
    keys: dict[str, dict[str, str]] = {}
    for name, command in getattr(group, "commands", {}).items():
        accepted: dict[str, str] = {}
        for param in command.params:
            if param.name is None or param.name in ("json_", "quiet"):
                continue  # output mode is per invocation, not a project default
            accepted[param.name] = param.name
            for opt in param.opts:
                if opt.startswith("--"):
                    accepted[opt[2:]] = param.name
                    accepted[opt[2:].replace("-", "_")] = param.name
        keys[name] = accepted
    return keys


def apply_settings(ctx: typer.Context) -> None:
    """Load the project settings and set ``ctx.default_map`` so that explicit flags still win.

    A top-level setting (``model``, ``data``, ``out``, ``device``) applies to every command with a parameter of that
    name whose built-in default is not None (``model`` always): ``info --out`` and ``rollout --data`` stay off
    unless asked for, because giving them changes what those commands do.

    Raises:
        UsageError: invalid configuration file.
    """
    from vitlens.config import load_settings

    group = ctx.command
    settings = load_settings(commands=accepted_keys(group))
    default_map: dict[str, dict[str, Any]] = {}
    for name, command in getattr(group, "commands", {}).items():
        params = {p.name: p for p in command.params}
        from_file: dict[str, Any] = {}
        from_env: dict[str, Any] = {}
        for key, value in settings.values.items():
            param = params.get(key)
            source = settings.sources.get(key, "default")
            if value is None or param is None or source == "default":
                continue
            if key == "model" or param.default is not None:
                (from_env if source.startswith("env ") else from_file)[key] = value
        # file top level < file command table < environment
        defaults = {**from_file, **settings.commands.get(name, {}), **from_env}
        if defaults:
            default_map[name] = defaults
    if default_map:
        ctx.default_map = {**(ctx.default_map or {}), **default_map}


def config(ctx: typer.Context, json_: JsonOpt = False) -> None:
    """Show the effective project settings and where each comes from (default, file, or VITLENS_* variable).

    Settings come from vitlens.toml or [tool.vitlens] in pyproject.toml (the nearest, from the working directory
    up); VITLENS_MODEL, VITLENS_DATA, VITLENS_OUT and VITLENS_DEVICE override it; command-line flags override both.
    """
    from rich.table import Table

    from vitlens.config import load_settings

    started = time.perf_counter()
    facts = load_settings(commands=accepted_keys(ctx.find_root().command)).to_dict()
    if json_:
        print_json({**facts, "meta": run_metadata(started, command="config")})
        return
    table = Table(title=f"vitlens settings (file: {facts['file'] or 'none'})", title_justify="left")
    for column in ("key", "value", "source"):
        table.add_column(column)
    for row in facts["settings"]:
        shown = "(command default)" if row["value"] is None else str(row["value"])
        table.add_row(row["key"], shown, row["source"])
    out_console().print(table)
