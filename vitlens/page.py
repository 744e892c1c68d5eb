"""The pieces the report and compare pages share: plain CSS, HTML tables, inlined PNG figures, Markdown tables and
the versions line.

Everything here is string building (no torch, no matplotlib), so that a page renders from saved numbers alone and
two pages that show the same kind of table write it the same way.
"""

from __future__ import annotations

import base64
import html
import platform
from collections.abc import Sequence
from typing import Any, Literal

# The compare page's whole style sheet; the report page has its own, larger one (vitlens/assets/report/report.css).
PLAIN_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f4f4f4}.ok{color:#17702c}.failed{color:#b00020;font-weight:bold}.skipped{color:#777}
img{max-width:100%;border:1px solid #eee;margin:.3em 0}code{background:#f4f4f4;padding:0 .2em}"""

Alignment = Literal["left", "center", "right"]
# GitHub's delimiter row: a colon on the side the column is aligned to; plain dashes leave it to the renderer.
_RULES: dict[Alignment | None, str] = {None: "---", "left": ":---", "center": ":---:", "right": "---:"}


def html_table(header: Sequence[str] | None, rows: Sequence[Sequence[str]], *, escape: bool = True) -> str:
    """An HTML table on one line, with a header row when ``header`` is given.

    Header cells are always escaped. Body cells are escaped too, unless ``escape`` is False: then they are written
    as given, for cells the caller built as HTML (links, status spans) from parts it escaped itself.
    """
    cell = html.escape if escape else str
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def png_figure(png: bytes, alt: str) -> str:
    """A ``<figure>`` whose image is ``png`` inlined as base64, so the page needs no file beside it to show it."""
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def markdown_cell(text: Any) -> str:
    """``text`` as one Markdown table cell: a pipe would end the cell and a newline the row, so pipes are escaped
    and newlines become spaces."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(
    header: Sequence[Any], rows: Sequence[Sequence[Any]], *, align: Sequence[Alignment | None] | None = None
) -> str:
    """A Markdown (GitHub) table: the header, the delimiter row and one line per row, every cell through
    :func:`markdown_cell`; lines joined by newlines, none at the end.

    Args:
        header: the column names.
        rows: the cells, one sequence per row, as many as ``header``.
        align: per column, ``left``, ``center``, ``right`` or None (plain ``---``: the renderer's default); None
            for no alignment in any column.
    """
    rules = [_RULES[a] for a in align] if align is not None else [_RULES[None]] * len(header)
    lines = ["| " + " | ".join(markdown_cell(h) for h in header) + " |", "|" + "".join(f"{r}|" for r in rules)]
    lines += ["| " + " | ".join(markdown_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    """Versions of vitlens, Python and the libraries whose behaviour the numbers depend on, for a page's footer
    (numbers from another torch or timm need not match to the last digit)."""
    from importlib.metadata import PackageNotFoundError, version

    import vitlens

    found = {"vitlens": getattr(vitlens, "__version__", "?"), "python": platform.python_version()}
    for package in ("torch", "timm", "numpy", "matplotlib"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found
