"""One consistent, reproducible look for every vitlens figure, applied per figure (never global rcParams).

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot, so no global figure registry and no
GUI backend) and saved with fixed fonts and sizes and without timestamps, so the same inputs give byte-identical
PNGs on the same platform.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import matplotlib as mpl
from matplotlib.figure import Figure

from vitlens.io import atomic_path

FigureFormat = Literal["png", "svg", "pdf"]

STYLE: dict[str, object] = {
    "font.family": "DejaVu Sans",  # ships with matplotlib: the same glyphs on every machine
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "image.cmap": "viridis",
    "savefig.dpi": 120,
    "svg.hashsalt": "vitlens",  # stable element ids in SVG output
    "svg.fonttype": "none",
    "pdf.compression": 6,
}
DPI = 120


@contextmanager
def vitlens_style() -> Iterator[None]:
    """Apply vitlens' style inside the block only (``rc_context`` restores the caller's settings)."""
    with mpl.rc_context(STYLE):
        yield


def new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure of ``width`` x ``height`` inches; build it inside :func:`vitlens_style`."""
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_figure(fig: Figure, path: str | os.PathLike, *, fmt: FigureFormat | None = None) -> Path:
    """Write ``fig`` atomically, with no timestamp or software version in the file's metadata."""
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".").lower() or "png"  # type: ignore[assignment]
    metadata: dict[str, object]
    if fmt == "png":
        metadata = {"Software": None}
    elif fmt == "svg":
        metadata = {"Date": None, "Creator": None}
    elif fmt == "pdf":
        metadata = {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None}
    else:
        metadata = {}
    with vitlens_style(), atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format=fmt, dpi=DPI, metadata=metadata)
    return path
