"""The analyses vitlens knows: one :class:`Definition` each, registered once, in report order.

The CLI commands, the report's sections, ``vitlens.load_result``, the flat ``vitlens.*`` names and the docs all
loop over :func:`definitions`; adding an analysis means writing its pure function (``vitlens/analysis/``), its plot
(``vitlens/plotting/``), its definition module (``vitlens/definitions/``, found here by listing that package) and its
command (``vitlens/cli/``). Torch-free: listing the analyses costs no import of the heavy libraries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vitlens.result import Result

_REGISTRY: dict[str, Definition] = {}


@dataclass(frozen=True)
class Definition:
    """One analysis: its name (CLI command and report section), what it computes, and how each caller runs it.

    Attributes:
        name: the command and section name, e.g. ``"pos-sim"``.
        title: a few words for headings, e.g. ``"position-embedding similarity"``.
        paper: where the analysis comes from, e.g. ``"ViT paper Fig. 7 centre"``.
        result: the :class:`~vitlens.result.Result` subclass it returns (it knows its files, figure and numbers).
        compute: the public function (``vitlens.pos_sim``): model (and data) plus options in, result out.
        section: how the report runs it: ``section(run)`` with the report's shared options (model, data, ...).
        needs_data: whether it streams images through the model.
        order: its place in the report and in ``vitlens --help`` (ascending).
        command: ``"module:function"`` of its CLI command (imported by the CLI only).
    """

    name: str
    title: str
    paper: str
    result: type[Result]
    compute: Callable[..., Result]
    section: Callable[[Any], Result]
    needs_data: bool
    order: int
    command: str


def register(definition: Definition) -> Definition:
    """Add ``definition`` to the registry (once per name).

    Raises:
        RuntimeError: the name is taken, or the result type replaced the base class's ``repr`` / ``==`` (declare
            result dataclasses with ``repr=False, eq=False``: arrays make dataclass equality raise).
    """
    from vitlens.result import Result

    if definition.name in _REGISTRY and _REGISTRY[definition.name] is not definition:
        raise RuntimeError(f"analysis {definition.name!r} is registered twice")
    result = definition.result
    if result.__repr__ is not Result.__repr__ or result.__eq__ is not Result.__eq__:
        raise RuntimeError(f"{result.__name__} must be a dataclass with repr=False, eq=False (see vitlens.result)")
    _REGISTRY[definition.name] = definition
    return definition


def definitions() -> list[Definition]:
    """Every registered analysis, in report order (each module of ``vitlens.definitions`` registers one)."""
    import importlib
    import pkgutil

    import vitlens.definitions

    for module in pkgutil.iter_modules(vitlens.definitions.__path__):
        importlib.import_module(f"vitlens.definitions.{module.name}")
    return sorted(_REGISTRY.values(), key=lambda d: (d.order, d.name))


def get(name: str) -> Definition:
    """The definition called ``name``.

    Raises:
        KeyError: no such analysis.
    """
    found = {d.name: d for d in definitions()}
    if name not in found:
        raise KeyError(f"no analysis {name!r}; known: {', '.join(found)}")
    return found[name]
