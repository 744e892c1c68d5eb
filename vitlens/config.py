"""Project defaults: a ``vitlens.toml`` or ``[tool.vitlens]`` table, ``VITLENS_*`` variables, and where each came from.

Precedence, lowest first: built-in defaults < the file < environment variables < command-line flags (the last is
applied by the CLI, which hands these settings to click as its ``default_map``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitlens.errors import UsageError

# Top-level keys and their built-in defaults (None: each command keeps its own default).
GLOBAL_DEFAULTS: dict[str, Any] = {"model": "demo", "data": "digits", "out": None, "device": None}
ENV_VARS = {key: f"VITLENS_{key.upper()}" for key in GLOBAL_DEFAULTS}
CONFIG_FILE = "vitlens.toml"
PYPROJECT = "pyproject.toml"


@dataclass(frozen=True)
class Settings:
    """Effective project settings.

    Attributes:
        values: the top-level settings (``model``, ``data``, ``out``, ``device``); None when nothing sets one.
        commands: per-command options, ``{command: {param_name: value}}``, names with ``_`` (``num_images``).
        sources: where each value came from, keyed ``model`` or ``fewshot.shots``: ``default``, the file's path,
            or ``env VITLENS_X``.
        file: the configuration file read, if any.
    """

    values: dict[str, Any] = field(default_factory=dict)
    commands: dict[str, dict[str, Any]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    file: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        rows = [{"key": k, "value": self.values.get(k), "source": self.sources.get(k, "default")} for k in self.values]
        for command, options in self.commands.items():
            for name, value in options.items():
                key = f"{command}.{name}"
                rows.append({"key": key, "value": value, "source": self.sources.get(key, "default")})
        return {"file": None if self.file is None else str(self.file), "settings": rows}


def find_config(cwd: str | os.PathLike | None = None) -> tuple[Path, bool] | None:
    """The nearest ``vitlens.toml``, or ``pyproject.toml`` with a ``[tool.vitlens]`` table, from ``cwd`` upwards.

    Returns:
        The path and whether it is a ``pyproject.toml``; None when no directory up to the root has one.
    """
    start = Path.cwd() if cwd is None else Path(cwd)
    for folder in (start, *start.resolve().parents):
        candidate = folder / CONFIG_FILE
        if candidate.is_file():
            return candidate, False
        pyproject = folder / PYPROJECT
        # A pyproject.toml without the table is some other project's file: keep looking upwards.
        if pyproject.is_file() and "tool.vitlens" in _read_text(pyproject):
            return pyproject, True
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the vitlens configuration {path}: {e}")


def _parse_toml(path: Path) -> dict[str, Any] | None:
    """The file's table, or None when no TOML parser is available (Python 3.10 without ``tomli``)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            from vitlens.log import logger

            logger.warning(f"ignoring {path}: reading TOML on Python 3.10 needs `pip install tomli`")
            return None
    try:
        return tomllib.loads(_read_text(path))
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path} is not valid TOML: {e}")


def load_settings(
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    *,
    commands: Mapping[str, Any] | None = None,
) -> Settings:
    """Read the project settings of ``cwd`` (default: the working directory) and ``env`` (default ``os.environ``).

    Args:
        commands: if given, the valid command names, each mapped to ``{key: parameter name}`` for the keys it
            accepts (e.g. ``num-images`` and ``num_images`` -> ``num_images``, ``format`` -> ``fmt``); a sub-table or
            key outside them is an error. Without it, any key is accepted, with ``-`` read as ``_``.

    Raises:
        UsageError: the file is not valid TOML, or names an unknown key or command (the message names the file).
    """
    env = os.environ if env is None else env
    values = dict(GLOBAL_DEFAULTS)
    sources = {key: "default" for key in values}
    per_command: dict[str, dict[str, Any]] = {}
    found = find_config(cwd)
    path = None
    if found is not None:
        path, is_pyproject = found
        table = _parse_toml(path)
        if table is not None:
            if is_pyproject:
                table = table.get("tool", {}).get("vitlens", {})
            if not isinstance(table, dict):
                raise UsageError(f"{path}: tool.vitlens must be a table")
            for key, value in table.items():
                if isinstance(value, dict):
                    per_command[key] = _command_table(path, key, value, commands)
                    for name in per_command[key]:
                        sources[f"{key}.{name}"] = str(path)
                elif key in GLOBAL_DEFAULTS:
                    values[key] = _scalar(path, key, value)
                    sources[key] = str(path)
                else:
                    known = ", ".join(GLOBAL_DEFAULTS)
                    raise UsageError(f"{path}: unknown key {key!r} (top-level keys: {known}, or a table per command)")
    for key, var in ENV_VARS.items():
        if env.get(var):
            values[key] = env[var]
            sources[key] = f"env {var}"
    return Settings(values=values, commands=per_command, sources=sources, file=path)


def _scalar(path: Path, key: str, value: Any) -> Any:
    if not isinstance(value, str | int | float | bool) and not (
        isinstance(value, list) and all(isinstance(v, str | int | float) for v in value)
    ):
        raise UsageError(f"{path}: {key} must be a string, number, boolean or list, not {type(value).__name__}")
    return value


def _command_table(
    path: Path, command: str, table: dict[str, Any], commands: Mapping[str, Any] | None
) -> dict[str, Any]:
    if commands is not None and command not in commands:
        raise UsageError(f"{path}: unknown command table {command!r} (commands: {', '.join(sorted(commands))})")
    options = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if commands is not None:
            accepted = commands[command]
            name = accepted.get(key) or accepted.get(name)
            if name is None:
                raise UsageError(f"{path}: command {command!r} has no option {key!r}")
        options[name] = _scalar(path, f"{command}.{key}", value)
    return options
