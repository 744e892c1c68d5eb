"""Every dataset-wide command through the command line under ``torchrun`` (2 ranks, gloo, CPU): the one JSON
summary printed is the single process's, and the folder holds the single process's files.

``tests/test_distributed.py`` and ``tests/test_distributed_more.py`` prove the numbers through the Python API
(sharding really happened, only rank 0 wrote); this module proves the command line's part: each command joins the
job (``torchrun_job``), rank 1 stays silent, and nothing differs from ``vitlens CMD`` in one process.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.test_distributed import _assert_close_tree, _vitlens_json

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("vitlens") is None, reason="the vitlens console script is not installed"),
]

NUM_IMAGES = "11"  # divisible by neither 2 nor 3
DIGITS = ["--data", "digits", "--num-images", NUM_IMAGES, "--batch-size", "4"]
COMMANDS = {
    "rollout": ["rollout", "demo", *DIGITS],
    "tokens": ["tokens", "demo", *DIGITS, "--images", "digits"],
    "features": ["features", "demo", *DIGITS],
    "cka": ["cka", "demo", *DIGITS, "--minibatch-size", "4"],  # minibatches 4 + 4 (+ 3 dropped): one per rank
    "explain-faithfulness": ["explain", "demo", "--faithfulness", *DIGITS[:2], "--num-images", "5", "--steps", "4"],
    "fewshot": ["fewshot", "demo", "--data", "digits", "--num-images", "30", "--shots", "2", "--seeds", "2"],
    "report": ["report", "demo", *DIGITS, "--rollout-images", "3", "--shots", "2", "--seeds", "1"],
    "compare": [
        "compare",
        "{run}",
        "--analyses",
        "attention-distance,fewshot,cka,pos-sim",
        *DIGITS[2:4],
        "--minibatch-size",
        "4",
        "--fewshot-num-images",
        "23",
        "--shots",
        "1",
        "--seeds",
        "1",
    ],
}


def _run(args: list[str], out: Path, ranks: int) -> tuple[dict, list[str]]:
    """``vitlens ARGS`` into ``out`` in one process or under torchrun; the one JSON object printed and the files
    written."""
    extra = ["--cache-dir", str(out / "cache")] if args[0] == "fewshot" else []
    printed = _vitlens_json([*args, "--out", str(out / "run"), *extra], ranks)
    return printed, sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def _comparable(tree):
    """The summary without wall times, and with file paths reduced to their names (each run has its folder)."""
    if isinstance(tree, dict):
        return {k: _comparable(v) for k, v in tree.items() if not k.endswith(("seconds", "_per_s"))}
    if isinstance(tree, list):
        return [_comparable(v) for v in tree]
    if isinstance(tree, str) and os.sep in tree:
        return Path(tree).name
    return tree


@pytest.mark.parametrize("command", list(COMMANDS))
def test_cli_command_under_torchrun_gives_the_single_process_summary(command, tmp_path):
    args = COMMANDS[command]
    if "{run}" in args:  # compare: a training run's folder with a checkpoint of epoch 1 and the final weights
        from tests.test_compare import make_run

        args = [str(make_run(tmp_path / "run", (1,), final=2)) if a == "{run}" else a for a in args]
    single, single_files = _run(args, tmp_path / "single", 1)
    ranks, ranks_files = _run(args, tmp_path / "ranks", 2)
    assert ranks_files == single_files
    _assert_close_tree(_comparable(ranks), _comparable(single), command)
