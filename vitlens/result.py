"""The result object every analysis returns: compute once, then draw, save, serialise or read back.

Modelled on scikit-learn's Display objects: the numbers are computed by the analysis function, and the object only
presents them. ``plot(ax=None)`` draws into an Axes, ``figure()`` builds the figure the CLI saves, ``save(dir)``
writes exactly the files the CLI command writes, ``to_dict()`` is what ``--json`` prints, and
:func:`load_result` reads a saved folder back into the same object. matplotlib is imported only when drawing.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vitlens.errors import ParameterError, VitlensError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


class Result:
    """Base of every analysis result (subclasses are ``@dataclass(frozen=True, eq=False, repr=False)``).

    Subclasses set :attr:`analysis` (the registry name, which is also the CLI command) and :attr:`stem` (the stem of
    their files), and implement :meth:`to_dict`, :meth:`plot`, :meth:`figure`, :meth:`summary`, :meth:`key_numbers`,
    :meth:`_write` and :meth:`_read`.
    """

    analysis: ClassVar[str] = ""
    stem: ClassVar[str] = ""

    # ---------------------------------------------------------------------------------------------- numbers
    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready numbers: the content of ``<stem>.json`` (without run metadata) and of ``--json``."""
        raise NotImplementedError

    def summary(self) -> str:
        """One line with the headline numbers (the report's key line, ``repr``'s text)."""
        raise NotImplementedError

    def key_numbers(self) -> dict[str, Any]:
        """The few numbers the report's summary shows for this analysis."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------- drawing
    def plot(self, ax: Axes | None = None) -> Axes:
        """Draw the main panel into ``ax`` (a new figure when None) and return the Axes."""
        raise NotImplementedError

    def figure(self) -> Figure:
        """The full figure the CLI command saves (not shown, not saved)."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------- files
    def save(self, out: str | os.PathLike, fmt: str = "png", *, meta: dict[str, Any] | None = None) -> list[Path]:
        """Write the analysis's files into ``out`` (created if needed), as the CLI command does.

        Figures are built before anything is written, so a plotting error leaves no files; each file is written
        atomically.

        Args:
            out: the output folder.
            fmt: figure format, ``png``, ``svg`` or ``pdf``.
            meta: run metadata to store in the JSON file under ``meta`` (the CLI's versions and timings).

        Raises:
            ParameterError: an unknown ``fmt``.
        """
        from vitlens.defaults import FIGURE_FORMATS

        fmt = str(fmt).strip().lower()
        if fmt not in FIGURE_FORMATS:
            raise ParameterError("fmt", f"fmt must be one of {', '.join(FIGURE_FORMATS)}, not {fmt!r}")
        payload = finite(self.to_dict())
        if meta is not None:
            payload["meta"] = meta
        return self._write(Path(out), fmt, payload)

    def _write(self, out: Path, fmt: str, payload: dict[str, Any]) -> list[Path]:
        raise NotImplementedError

    @classmethod
    def _read(cls, folder: Path, payload: dict[str, Any]) -> Result:
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------- display
    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.analysis}: {self.summary()}>"

    def _repr_html_(self) -> str:
        """The figure (PNG, inlined) under the summary line, for notebooks."""
        import base64
        import html
        import io

        from vitlens.plotting.style import DPI, vitlens_style

        buffer = io.BytesIO()
        with vitlens_style():
            self.figure().savefig(buffer, format="png", dpi=DPI)
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        return (
            f"<div><p><b>{html.escape(self.analysis)}</b>: {html.escape(self.summary())}</p>"
            f'<img alt="{html.escape(self.analysis)}" src="data:image/png;base64,{data}"></div>'
        )

    def __eq__(self, other: object) -> bool:
        """Field by field; arrays compare by shape and values (NaN equal to NaN), never raising."""
        if type(other) is not type(self):
            return NotImplemented
        return all(
            _equal(getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        )

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside: not hashable


def _equal(a: Any, b: Any) -> bool:
    import numpy as np

    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype.kind != b.dtype.kind:
            return False
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b) and type(a) is type(b):
        return all(_equal(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def finite(obj: Any) -> Any:
    """``obj`` with non-finite floats as None and numpy scalars as Python numbers (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def int_pair(values: Any) -> tuple[int, int]:
    """Two integers (a grid or patch size) from a list read back from JSON / NPZ, or from a layout's tuple."""
    first, second = (int(v) for v in values)
    return first, second


def check_image_index(index: Any, num_images: int) -> None:
    """Raise a ParameterError naming ``index`` unless it is the position of one of ``num_images`` images (negative
    from the end), for the per-image results' ``plot(index=...)``."""
    n = num_images
    if isinstance(index, bool) or not isinstance(index, int) or not -n <= index < n:
        raise ParameterError("index", f"index must be an image's position, 0..{n - 1}, not {index!r}")


def load_result(folder: str | os.PathLike, analysis: str | None = None) -> Result:
    """Read a saved analysis (``result.save(folder)``, a CLI command's ``--out`` or a report folder) back.

    Args:
        folder: where the files are.
        analysis: which analysis to read (``"pos-sim"``) when the folder holds several (a report).

    Raises:
        ParameterError: the folder holds no saved analysis, several without ``analysis``, or not the one asked for.
    """
    import json

    from vitlens.registry import definitions

    folder = Path(folder)
    known = {d.name: d for d in definitions()}
    if analysis is not None and analysis not in known:
        raise ParameterError("analysis", f"analysis must be one of {', '.join(known)}, not {analysis!r}")
    present = [d for d in known.values() if (folder / f"{d.result.stem}.json").is_file()]
    if analysis is not None:
        present = [d for d in present if d.name == analysis]
    if not present:
        what = f"a saved {analysis}" if analysis else "a saved analysis (<name>.json beside its files)"
        raise ParameterError("folder", f"folder {folder} holds no {what}")
    if len(present) > 1:
        names = ", ".join(d.name for d in present)
        raise ParameterError("analysis", f"folder {folder} holds several analyses ({names}): pass analysis=")
    definition = present[0]
    path = folder / f"{definition.result.stem}.json"
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VitlensError(f"{path} is not readable JSON: {e}")
    return definition.result._read(folder, payload)
