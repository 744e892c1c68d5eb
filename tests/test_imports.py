"""Import hygiene: which heavy or layer-crossing packages each part of vitlens may pull in (docs/design.md).

Only the CLI imports typer/rich, only the plots import matplotlib (and never pyplot), ``import vitlens`` is torch-free
and ``vitlens --help`` is instant. The test process has imported everything already, so the rules run in fresh
interpreters, each importing its modules in turn and noting which step first loaded which banned module.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _submodules(package: str) -> list[str]:
    """``package``'s submodules, listed from the source tree without importing them."""
    folder = REPO.joinpath(*package.split("."))
    return sorted(f"{package}.{m.name}" for m in pkgutil.iter_modules([str(folder)]) if not m.name.startswith("_"))


CLI = ("typer", "rich")
LIBRARY = ("matplotlib", *CLI)  # what nothing below the CLI and the plots may import

_DRAW = """
import io, torch
from vitlens.analysis import filter_pca, position_similarity
from vitlens.layout import TokenLayout
from vitlens.plotting.filters import filters_figure
from vitlens.plotting.pos_sim import pos_sim_figure
filters_figure(filter_pca(torch.randn(40, 3, 4, 4))).savefig(io.BytesIO(), format="png")
pos_sim_figure(position_similarity(torch.randn(9, 8), TokenLayout((3, 3), (4, 4), ()))).savefig(io.BytesIO())
"""
_HELP = "from vitlens.cli.app import app\ntry:\n    app(['--help'])\nexcept SystemExit:\n    pass"


def _imports(modules: list[str], banned: tuple[str, ...]) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(m, f"import {m}", banned) for m in modules]


# One list per fresh interpreter of (step, code, modules the step may not import), run in this order. A step can
# only be checked for modules no earlier step loaded: one that relies on another's absence comes first.
INTERPRETERS: list[list[tuple[str, str, tuple[str, ...]]]] = [
    [
        # The flat API is lazy: listing the analyses imports every definition, and still no torch.
        ("vitlens.analyses()", "import vitlens\nvitlens.analyses()", ("torch", *LIBRARY)),
        *_imports(_submodules("vitlens.definitions"), ("torch", *LIBRARY)),
        # The pages' shared pieces are string building: a page renders from saved numbers without torch.
        *_imports(["vitlens.page"], ("torch", *LIBRARY)),
        # The analyses are tensors in, dataclasses out: no timm either.
        *_imports(["vitlens.analysis"], ("timm", *LIBRARY)),
        # torchvision and scikit-learn load only when one of their datasets is opened.
        *_imports(["vitlens.data"], ("torchvision", "sklearn", *LIBRARY)),
        *_imports(
            [
                "vitlens.analysis.fewshot",
                "vitlens.attention",
                "vitlens.capture",
                "vitlens.feature_cache",
                "vitlens.features",
                "vitlens.models",
                "vitlens.report",
            ],
            LIBRARY,
        ),
        # Figures are built on Figure objects, never through pyplot's global state, even when drawn and saved.
        *_imports(_submodules("vitlens.plotting"), ("matplotlib.pyplot", *CLI)),
        ("drawing and saving figures", _DRAW, ("matplotlib.pyplot", *CLI)),
    ],
    # `vitlens --help` stays instant: nothing heavy until a command runs (typer and rich load here, so alone).
    [("vitlens --help", _HELP, ("torch", "timm", "matplotlib", "sklearn"))],
]

# Runs the steps given as JSON; the last line of stdout maps each banned module that got loaded to the step that did.
START = "the interpreter's start"
_CHILD = """
import json, sys
steps, START = json.loads(sys.argv[1]), sys.argv[2]
watched = {m for _, _, banned in steps for m in banned}
loaded_by = {m: START for m in watched if m in sys.modules}
for label, code, _ in steps:
    exec(code, {})
    loaded_by.update({m: label for m in watched if m in sys.modules and m not in loaded_by})
print("\\nLOADED_BY " + json.dumps(loaded_by))
"""


def test_each_layer_imports_only_what_it_may():
    assert _submodules("vitlens.definitions") and _submodules("vitlens.plotting")  # the tree is where it was
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, json.dumps(steps), START],
            cwd=REPO,  # `-c` puts the working folder first on sys.path: the checkout under test is what is imported
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for steps in INTERPRETERS
    ]
    broken = []
    for steps, proc in zip(INTERPRETERS, procs, strict=True):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        loaded_by = json.loads(out.rstrip().splitlines()[-1].removeprefix("LOADED_BY "))
        order = {START: -1} | {label: i for i, (label, _, _) in enumerate(steps)}
        bans = {label: banned for label, _, banned in steps}
        for i, (label, _, banned) in enumerate(steps):
            for module in banned:
                by = loaded_by.get(module)
                if by == label:
                    broken.append(f"{label} imports {module}")
                elif by is not None and order[by] < i and module not in bans.get(by, ()):  # else reported at `by`
                    broken.append(f"{label} cannot be checked for {module}: {by}, before it, loads it (reorder)")
    assert not broken, "\n".join(broken)
