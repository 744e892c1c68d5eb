"""Write ``docs/cli.md``, the CLI reference, from the Typer app itself (``python scripts/gen_cli_docs.py``).

``tests/test_docs.py`` regenerates it in memory and compares, so the committed page never goes stale.
"""

from __future__ import annotations

import sys
from pathlib import Path, PurePath
from typing import Any, get_args, get_origin

import typer.main

from vitlens.cli.app import app

OUT = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
HEADER = """\
# CLI reference

Generated from the Typer app by `scripts/gen_cli_docs.py`; do not edit by hand. Every command also answers
`vitlens COMMAND --help`. Defaults shown here are the built-in ones: `vitlens.toml`, `[tool.vitlens]` and
`VITLENS_*` variables can change them (see [Configuration](config.md)).
"""


def _cell(text: str) -> str:
    """One Markdown table cell: a single line, pipes escaped."""
    return _escape(" ".join(text.split())).replace("|", "\\|")


def _escape(text: str) -> str:
    """Help text is plain text: keep ``rollout/<image>.png`` from being read as HTML."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _is_option(param: Any) -> bool:
    return not param.opts[0].isidentifier()  # an argument's only "opt" is its Python name


def _type(param: Any) -> str:
    if getattr(param, "is_flag", False):
        return "flag"
    annotation = param.type_descriptor.annotation
    if get_origin(annotation) is list:
        (item,) = get_args(annotation)
        return f"{getattr(item, '__name__', str(item))} ..."
    if isinstance(annotation, type) and issubclass(annotation, PurePath):
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _default(param: Any) -> str:
    if isinstance(param.show_default, str):  # typer's show_default="text": what --help prints instead
        return f"`{param.show_default}`"
    value = param.default
    if param.show_default is False or value is None or callable(value):
        return ""
    if getattr(param, "is_flag", False):
        return "on" if value else ""
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value)
    return f"`{value}`" if str(value) != "" else ""


def _metavar(param: Any) -> str:
    name = param.metavar or param.name.upper()
    name += " ..." if param.nargs == -1 else ""
    return name if param.required else f"[{name}]"


def _names(param: Any) -> str:
    if not _is_option(param):
        return f"`{_metavar(param)}`"
    return ", ".join(f"`{n}`" for n in [*param.opts, *param.secondary_opts])


def _params(command: Any) -> list[Any]:
    return [p for p in command.params if not getattr(p, "hidden", False) and "--help" not in p.opts]


def _params_table(command: Any) -> list[str]:
    params = _params(command)
    if not params:
        return []
    lines = ["| Argument / option | Type | Default | Help |", "|---|---|---|---|"]
    for p in params:
        lines.append(f"| {_names(p)} | {_cell(_type(p))} | {_cell(_default(p))} | {_cell(p.help or '')} |")
    return [*lines, ""]


def _usage(name: str, command: Any) -> str:
    arguments = [_metavar(p) for p in _params(command) if not _is_option(p)]
    return " ".join([f"vitlens {name}", "[OPTIONS]", *arguments])


def _help_text(command: Any) -> str:
    # click's convention: a form feed ends what --help shows.
    return _escape((command.help or "").split("\f")[0].strip())


def render() -> str:
    """The CLI reference page, as Markdown."""
    group = typer.main.get_command(app)  # the click group (typer vendors click: duck-typed here)
    lines = [HEADER, "## `vitlens`", "", _help_text(group), "", "```text", "vitlens [OPTIONS] COMMAND [ARGS]...", "```"]
    lines += ["", *_params_table(group)]
    for name, command in group.commands.items():  # in registration order
        if command.hidden:
            continue
        lines += [f"## `vitlens {name}`", "", _help_text(command), "", "```text", _usage(name, command), "```", ""]
        lines += _params_table(command)
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> None:
    text = render()
    OUT.write_text(text, encoding="utf-8")
    sys.stderr.write(f"wrote {OUT} ({len(text)} characters)\n")


if __name__ == "__main__":
    main()
