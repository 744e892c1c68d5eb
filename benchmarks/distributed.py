"""`vitlens attention-distance` on 1 process against 2 processes under torchrun on the CPU (issue 20): images/s,
speed-up, efficiency, start-up cost, and whether the two runs give the same numbers.

``python -m benchmarks.distributed [--model vit_small_patch16_224] [--img-size 224] [--num-images 512]
[--startup-images 32] [--rounds 2] [--configs 1x1,2x1,1x2]`` runs the command users run, the ``vitlens`` console
script (under ``python -m torch.distributed.run --standalone --nproc-per-node N`` when N > 1), in a fresh process
tree per run, and writes ``results/distributed.json`` and ``results/distributed.md``.

Configurations are ``PxT``: P processes with T torch threads each (``OMP_NUM_THREADS=T``). ``1x1`` is the baseline,
``2x1`` the distributed run of the issue (one core per rank), and ``1x2`` the reference a user on a 2-core machine
already has without torchrun: one process with two threads.

Every run pays a fixed start-up (interpreter and imports, torchrun's launcher and the process group, model load,
the dataset, the figure and files at the end) before its images. Each configuration therefore runs at two image
counts, ``--startup-images`` and ``--num-images``; the steady-state rate is the difference in images over the
difference in wall time, and the start-up is what the small run took beyond its images at that rate. The wall times
are the best over ``--rounds`` rounds, each round running every configuration once (so a slow spell on a shared
machine hits all of them).

The model is ``--model`` with random weights drawn once (seed 0) and saved to a temporary ``.pth`` that every run
loads (``--arch``): each rank must hold the same weights, and timm's random initialisation differs per process. The
data are scikit-learn's digits (``--data digits --split all``), upsampled to the model's input. Every configuration's
``distance_px``, ``std_px`` and ``prefix_mass`` at ``--num-images`` are compared with the baseline's; the benchmark
exits 1 (after writing its files) if a configuration with more than one process has a ``distance_px`` or
``prefix_mass`` (means over images) off by more than ``--tolerance``, relative. The other differences are reported:
``std_px`` is a difference of float64 moments of float32 per-image values, so where the shards cut the batches
elsewhere than one process (image counts not a multiple of ranks x batch) the float32 rounding of an image, which
depends on its batch, shows in it amplified; and other thread counts may round float32 differently.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.__main__ import RESULTS, machine
from vitlens.page import markdown_table

COMPARED = ("distance_px", "std_px", "prefix_mass")  # the attention-distance JSON's arrays, [layers, heads] each
CHECKED = ("distance_px", "prefix_mass")  # the means over images, held to --tolerance (module docstring)


@dataclass(frozen=True)
class Config:
    """One way to run the command on the CPU."""

    processes: int  # torchrun's --nproc-per-node; 1 runs the console script directly, without torchrun
    threads: int  # OMP_NUM_THREADS of every process: torch's intra-op threads

    @property
    def name(self) -> str:
        return f"{self.processes}x{self.threads}"

    @property
    def cores(self) -> int:
        return self.processes * self.threads

    @classmethod
    def parse(cls, text: str) -> Config:
        processes, _, threads = text.partition("x")
        return cls(int(processes), int(threads))


def command(config: Config, checkpoint: Path, args: argparse.Namespace, num_images: int, out: Path) -> list[str]:
    """The command line a user would type for ``config``: ``vitlens attention-distance ...``, behind torchrun for
    more than one process (``--standalone``: a rendezvous on a free local port, so parallel jobs do not collide)."""
    vitlens_bin = str(Path(sys.executable).with_name("vitlens"))
    # A .pth state dict carries no preprocessing: give timm's ViT defaults so the run does not warn about guessing.
    analysis = [
        vitlens_bin,
        "attention-distance",
        str(checkpoint),
        "--arch",
        args.model,
        "--img-size",
        str(args.img_size),
        "--mean",
        "0.5,0.5,0.5",
        "--std",
        "0.5,0.5,0.5",
        "--device",
        "cpu",
        "--data",
        "digits",
        "--split",
        "all",
        "--num-images",
        str(num_images),
        *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
        "--out",
        str(out),
        "--json",
    ]
    if config.processes == 1:
        return analysis
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    return [*launcher, str(config.processes), *analysis]


def run_once(config: Config, checkpoint: Path, args: argparse.Namespace, num_images: int, out: Path) -> dict:
    """One run of ``config`` over ``num_images`` images: its wall time (process start to exit, what the user waits)
    and the JSON the command printed (rank 0's; the other ranks print nothing)."""
    threads = str(config.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "VITLENS_DIST_TIMEOUT": "300"}
    started = time.perf_counter()
    proc = subprocess.run(
        command(config, checkpoint, args, num_images, out), capture_output=True, text=True, env=env, timeout=3600
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{config.name} over {num_images} images failed (exit {proc.returncode})")
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if len(printed) != 1:
        raise SystemExit(f"{config.name}: expected one JSON line (rank 0's), got {len(printed)}")
    print(f"  {config.name:<4} {num_images:>5} images  {wall:7.1f} s", file=sys.stderr, flush=True)
    return {"wall_s": wall, "result": printed[0]}


def scaling(walls: dict[str, dict[int, float]], configs: list[Config], small: int, large: int) -> dict[str, dict]:
    """Per configuration, from its best wall times at ``small`` and ``large`` images (``walls[name][n]``):

    - ``steady_images_per_s``: ``(large - small) / (wall[large] - wall[small])``, the rate once started;
    - ``startup_s``: ``wall[small] - small / steady``, the fixed cost of a run;
    - ``end_to_end_images_per_s``: ``large / wall[large]``, start-up included;
    - ``speedup`` (steady) and ``end_to_end_speedup`` against the first configuration, and ``efficiency``:
      the steady speed-up per core used (``processes x threads``; for ``Px1`` that is per process).
    """
    out: dict[str, dict] = {}
    for config in configs:
        w = walls[config.name]
        steady = (large - small) / (w[large] - w[small])
        out[config.name] = {
            "processes": config.processes,
            "threads": config.threads,
            "steady_images_per_s": steady,
            "startup_s": w[small] - small / steady,
            "end_to_end_images_per_s": large / w[large],
        }
    base = out[configs[0].name]
    for config in configs:
        row = out[config.name]
        row["speedup"] = row["steady_images_per_s"] / base["steady_images_per_s"]
        row["end_to_end_speedup"] = row["end_to_end_images_per_s"] / base["end_to_end_images_per_s"]
        row["efficiency"] = row["speedup"] / config.cores
    return out


def differences(results: dict[str, dict], baseline: str) -> dict[str, dict]:
    """Per configuration, the largest absolute and relative difference of each :data:`COMPARED` array (and the image
    count) from ``baseline``'s run over the same images."""
    import numpy as np

    want = results[baseline]
    out: dict[str, dict] = {}
    for name, got in results.items():
        row: dict[str, Any] = {"num_images_equal": got["num_images"] == want["num_images"]}
        for key in COMPARED:
            a, b = np.asarray(got[key], dtype=np.float64), np.asarray(want[key], dtype=np.float64)  # [layers, heads]
            diff = np.abs(a - b)
            row[key] = {
                "max_abs": float(diff.max()),
                "max_rel": float((diff / np.maximum(np.abs(b), 1e-300)).max()),
            }
        out[name] = row
    return out


def equal_within(diff: dict[str, dict], tolerance: float, names: list[str]) -> bool:
    """True if the configurations ``names`` counted the baseline's images and their :data:`CHECKED` arrays are
    within ``tolerance`` of the baseline's, relative (the issue's 1e-6 for float64 reductions)."""
    return all(
        diff[name]["num_images_equal"] and all(diff[name][key]["max_rel"] <= tolerance for key in CHECKED)
        for name in names
    )


def markdown(report: dict[str, Any]) -> str:
    """The tables of ``report`` (what :func:`main` writes to ``distributed.md``)."""
    m, s = report["machine"], report["settings"]
    load = ", ".join(f"{x:.1f}" for x in m["load_average"])
    scaling = [
        [
            f"{r['processes']} × {r['threads']}",
            f"{r['steady_images_per_s']:.2f}",
            f"{r['speedup']:.2f}",
            f"{r['efficiency']:.2f}",
            f"{r['startup_s']:.1f}",
            f"{r['end_to_end_images_per_s']:.2f}",
            f"{r['end_to_end_speedup']:.2f}",
        ]
        for r in report["scaling"].values()
    ]
    base = next(iter(report["scaling"]))
    differences = [
        [
            name.replace("x", " × "),
            *(f"{d[key]['max_abs']:.1e} / {d[key]['max_rel']:.1e}" for key in COMPARED),
            "yes" if d["num_images_equal"] else "no",
        ]
        for name, d in report["differences"].items()
        if name != base
    ]
    lines = [
        f"# distributed: `vitlens attention-distance` {s['model']} at {s['img_size']} px, CPU, {m['when']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, load average {load} at start. torch {m['torch']}, timm "
        f"{m['timm']}. {s['num_images']} digits images (start-up from {s['startup_images']}), batch "
        f"{report['batch_size_ran']}, best of {s['rounds']} rounds. Total {report['total_s'] / 60:.1f} min.",
        "",
        markdown_table(
            [
                "processes × threads",
                "images/s (steady)",
                "speed-up",
                "efficiency (per core)",
                "start-up (s)",
                "images/s (end to end)",
                "speed-up (end to end)",
            ],
            scaling,
            align=[None, *["right"] * 6],
        ),
        "",
        f"Numbers against {base.replace('x', ' × ')} over {s['num_images']} images, largest absolute / relative "
        f"difference (multi-process runs: distance_px and prefix_mass within {s['tolerance']:g} relative): "
        f"{'equal' if report['equal'] else '**NOT EQUAL**'}.",
        "",
        markdown_table(
            ["processes × threads", *COMPARED, "same image count"],
            differences,
            align=[None, *["right"] * len(COMPARED), None],
        ),
        "",
    ]
    return "\n".join(lines)


def save_checkpoint(model: str, img_size: int, path: Path) -> None:
    """``model`` with random weights (seed 0) as a state dict at ``path``, for every run and every rank to load."""
    import timm
    import torch

    torch.manual_seed(0)
    net = timm.create_model(model, pretrained=False, img_size=img_size)
    torch.save(net.state_dict(), path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--startup-images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=None, help="default: vitlens's CPU default")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--configs", default="1x1,2x1,1x2", help="PxT, comma-separated; the first is the baseline")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    configs = [Config.parse(c) for c in args.configs.split(",")]
    sizes = (args.startup_images, args.num_images)
    if not 0 < sizes[0] < sizes[1]:
        raise SystemExit("--startup-images must be positive and smaller than --num-images")
    started = time.perf_counter()
    info = machine("cpu")  # the load average before the runs
    walls: dict[str, dict[int, list[float]]] = {c.name: {n: [] for n in sizes} for c in configs}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="vitlens-bench-dist-") as tmp:
        checkpoint = Path(tmp) / "model.pth"
        save_checkpoint(args.model, args.img_size, checkpoint)
        for round_ in range(args.rounds):
            print(f"round {round_ + 1} of {args.rounds}:", file=sys.stderr, flush=True)
            for config in configs:
                for n in sizes:
                    run = run_once(config, checkpoint, args, n, Path(tmp) / f"{config.name}-{n}")
                    walls[config.name][n].append(run["wall_s"])
                    if n == args.num_images:
                        results[config.name] = run["result"]
    best = {name: {n: min(t) for n, t in by_n.items()} for name, by_n in walls.items()}
    diff = differences(results, configs[0].name)
    report = {
        "machine": info,
        "settings": vars(args) | {"out": str(args.out), "configs": [c.name for c in configs]},
        "scaling": scaling(best, configs, *sizes),
        "differences": diff,
        # The claim under test: more processes, the same numbers. Other thread counts may round float32 differently.
        "equal": equal_within(diff, args.tolerance, [c.name for c in configs if c.processes > 1]),
        "wall_s": {name: {str(n): t for n, t in by_n.items()} for name, by_n in walls.items()},
        "command_s": {name: r["meta"]["seconds"] for name, r in results.items()},  # rank 0's, inside the command
        "batch_size_ran": results[configs[0].name]["meta"]["batch_size"],  # --batch-size, or the CPU default
        "total_s": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distributed.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (args.out / "distributed.md").write_text(md)
    print(md)
    if not report["equal"]:
        raise SystemExit(f"the runs' numbers differ from {configs[0].name}'s by more than {args.tolerance:g}")
    return report


if __name__ == "__main__":
    main()
