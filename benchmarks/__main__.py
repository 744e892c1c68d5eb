"""The benchmark runner: every case in one run (so ratios hold on a noisy machine), one subprocess per case.

    python -m benchmarks [--quick] [--device auto|cpu|cuda] [--models vit_small_patch16_224,vit_base_patch16_224]

Writes ``benchmarks/results/latest.json`` (every measurement, the machine, the settings) and ``latest.md`` (the
tables and the issue-8 targets). Times are best-of-``repeats``; memory is the growth of the case process's RSS
high-water mark over the model-loaded baseline (plus ``torch.cuda.max_memory_allocated`` on CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]  # timm names, random weights
    img_size: int  # input side for the per-model table
    num_images: int  # images per measurement in the per-model table
    batch_size: int
    scale_images: tuple[int, ...]  # attention-distance scaling in the number of images
    scale_sizes: tuple[int, ...]  # ... and in resolution (at scale_images[0] images)
    repeats: int  # timed passes after the memory/warm-up pass; the best is kept
    device: str
    threads: int | None = None  # torch CPU threads per case; None for torch's default


FULL = Settings(
    models=("vit_small_patch16_224", "vit_base_patch16_224"),
    img_size=224,
    num_images=128,
    batch_size=32,
    scale_images=(32, 128, 512),
    scale_sizes=(224, 384),
    repeats=3,
    device="auto",
)
QUICK = Settings(
    models=("vit_tiny_patch16_224",),
    img_size=64,
    num_images=32,
    batch_size=8,
    scale_images=(8, 32),
    scale_sizes=(64, 128),
    repeats=2,
    device="auto",
)

# Issue 8's targets: (key, description, predicate on the measured value).
TARGETS = [
    ("attention_distance_vs_plain", "attention-distance images/s ≥ 0.85× plain forward", lambda v: v >= 0.85),
    ("rollout_vs_plain", "rollout (batched) images/s ≥ 0.8× plain forward", lambda v: v >= 0.8),
    ("memory_growth_in_images", "attention-distance peak memory flat in #images (largest/smallest ≤ 1.25)", None),
    ("memory_vs_plain", "attention-distance peak memory ≤ 1.5× plain forward", lambda v: v <= 1.5),
    ("keep_every_map_vs_streaming", "≥ 3× less memory than keep-every-map (128 images, ViT-S/16)", lambda v: v >= 3),
    ("fewshot_sweep_s", "few-shot sweep < 1 s", lambda v: v < 1.0),
    ("help_s", "`vitlens --help` < 0.5 s", lambda v: v < 0.5),
]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.cases", json.dumps(case)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    if proc.returncode != 0:
        _log(proc.stderr)
        raise SystemExit(f"benchmark case {case} failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    _log(
        f"  {case['kind']:<20} {case.get('model', '')} n={case.get('num_images')} {time.perf_counter() - started:.1f} s"
    )
    return result


def best_wall(cmd: list[str], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return min(times)


def machine(device: str) -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "gpu": gpu,
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": metadata.version("timm"),
        "vitlens": metadata.version("vitlens"),
        "platform": platform.platform(),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def measure(settings: Settings) -> dict[str, Any]:
    base = {
        "device": settings.device,
        "batch_size": settings.batch_size,
        "repeats": settings.repeats,
        "threads": settings.threads,
    }
    models: dict[str, dict[str, Any]] = {}
    for model in settings.models:
        _log(f"{model}:")
        case = {**base, "model": model, "img_size": settings.img_size, "num_images": settings.num_images}
        per = {kind: run_case({**case, "kind": kind}) for kind in ("plain-forward", "attention-distance", "rollout")}
        ad = per["attention-distance"]
        per["rollout-one-at-a-time"] = run_case({**case, "kind": "rollout", "batch_size": 1})
        per["keep-every-map"] = run_case({**case, "kind": "keep-every-map"})
        # Attention-distance only; the per-model case above is reused where the settings coincide, since every
        # case is a fresh process with a model load (about 10 s on a loaded 2-core CPU).
        scaling = []
        for n, size in [(n, settings.img_size) for n in settings.scale_images] + [
            (settings.scale_images[0], size) for size in settings.scale_sizes[1:]
        ]:
            same = n == settings.num_images and size == settings.img_size
            scaling.append(
                ad if same else run_case({**case, "kind": "attention-distance", "num_images": n, "img_size": size})
            )
        models[model] = {"cases": per, "scaling": scaling}
    _log("few-shot sweep, CLI start-up:")
    fewshot = run_case({**base, "kind": "fewshot", "repeats": 5})
    vitlens_bin = str(Path(sys.executable).with_name("vitlens"))
    startup = {
        "help_s": best_wall([vitlens_bin, "--help"]),
        "import_analysis_s": best_wall([sys.executable, "-c", "import vitlens.analysis"]),
        "python_startup_s": best_wall([sys.executable, "-c", "pass"]),
    }
    return {"models": models, "fewshot": fewshot, "startup": startup}


def _growth(r: dict[str, Any]) -> float:
    # On CUDA the device allocator's peak is the number that matters; on CPU the RSS high-water growth.
    return r.get("cuda_peak_mib", r["rss_growth_mib"])


def ratios(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The issue-8 target quantities, per model (plus the model-free ones under ``"all"``)."""
    out: dict[str, dict[str, float]] = {}
    for model, m in results["models"].items():
        c = m["cases"]
        plain, ad = c["plain-forward"], c["attention-distance"]
        sizes = {s["img_size"] for s in m["scaling"]}
        by_n = [s for s in m["scaling"] if s["kind"] == "attention-distance" and s["img_size"] == min(sizes)]
        by_n.sort(key=lambda s: s["num_images"])
        out[model] = {
            "attention_distance_vs_plain": ad["images_per_s"] / plain["images_per_s"],
            "rollout_vs_plain": c["rollout"]["images_per_s"] / plain["images_per_s"],
            "rollout_batched_vs_one_at_a_time": c["rollout"]["images_per_s"]
            / c["rollout-one-at-a-time"]["images_per_s"],
            "memory_growth_in_images": _growth(by_n[-1]) / max(_growth(by_n[0]), 1e-9),
            "memory_vs_plain": _growth(ad) / max(_growth(plain), 1e-9),
            "keep_every_map_vs_streaming": _growth(c["keep-every-map"]) / max(_growth(ad), 1e-9),
            "attention_distance_vs_keep_every_map_speed": ad["images_per_s"] / c["keep-every-map"]["images_per_s"],
        }
    out["all"] = {"fewshot_sweep_s": results["fewshot"]["seconds"], "help_s": results["startup"]["help_s"]}
    return out


def markdown(report: dict[str, Any]) -> str:
    m, s, res = report["machine"], report["settings"], report["results"]
    gpu = m["gpu"] or "none"
    lines = [
        f"# vitlens benchmarks ({'quick' if report['quick'] else 'full'} run, {m['when']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, load average {', '.join(f'{x:.1f}' for x in m['load_average'])} "
        f"at start; GPU: {gpu}; device `{m['device']}`. Python {m['python']}, torch {m['torch']}, timm {m['timm']}, "
        f"vitlens {m['vitlens']}.",
        "",
        f"Settings: {s['img_size']} px, {s['num_images']} images (digits, upsampled), batch {s['batch_size']}, "
        f"best of {s['repeats']}, torch threads {s['threads'] or 'default'}, random weights. "
        "Memory = growth of the case process's RSS high-water mark over "
        "the loaded model (CUDA: `max_memory_allocated`).",
        "",
    ]
    for model, mr in res["models"].items():
        lines += [f"## {model}", "", "| case | images/s | × plain | peak memory (MiB) |", "|---|---:|---:|---:|"]
        plain = mr["cases"]["plain-forward"]["images_per_s"]
        for name, r in mr["cases"].items():
            lines.append(f"| {name} | {r['images_per_s']:.1f} | {r['images_per_s'] / plain:.2f} | {_growth(r):.1f} |")
        lines += [
            "",
            "Scaling:",
            "",
            "| case | px | images | images/s | peak memory (MiB) |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in mr["scaling"]:
            lines.append(
                f"| {r['kind']} | {r['img_size']} | {r['num_images']} | {r['images_per_s']:.1f} | {_growth(r):.1f} |"
            )
        lines.append("")
    st = res["startup"]
    lines += [
        "## Start-up and few-shot",
        "",
        f"- `vitlens --help`: {st['help_s']:.3f} s (best of 5); `python -c 'import vitlens.analysis'`: "
        f"{st['import_analysis_s']:.3f} s; bare `python -c pass`: {st['python_startup_s']:.3f} s.",
        f"- few-shot sweep (demo model, digits, default shots and seeds): {res['fewshot']['seconds']:.3f} s.",
        "",
        "## Issue-8 targets",
        "",
        "| target | " + " | ".join(report["ratios"]) + " |",
        "|---|" + "---:|" * len(report["ratios"]),
    ]
    for key, text, ok in TARGETS:
        cells = []
        for r in report["ratios"].values():
            if key not in r:
                cells.append("–")
                continue
            verdict = "" if ok is None else (" ✅" if ok(r[key]) else " ❌")
            if key == "memory_growth_in_images":
                verdict = " ✅" if r[key] <= 1.25 else " ❌"
            cells.append(f"{r[key]:.2f}{verdict}")
        lines.append(f"| {text} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny ViT at 64 px and few images (minutes on a CPU)")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N")
    parser.add_argument("--models", default=None, help="comma-separated timm names (random weights)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per case; 1 on a shared machine, where a descheduled worker thread stalls every op",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for latest.json and latest.md")
    args = parser.parse_args(argv)

    settings = QUICK if args.quick else FULL
    settings = dataclasses.replace(settings, device=args.device)
    if args.models:
        settings = dataclasses.replace(settings, models=tuple(args.models.split(",")))
    from vitlens.device import resolve_device

    device = str(resolve_device(args.device))
    settings = dataclasses.replace(settings, device=device, threads=args.threads)
    started = time.perf_counter()
    report = {"quick": args.quick, "machine": machine(device), "settings": dataclasses.asdict(settings)}
    report["results"] = measure(settings)
    report["ratios"] = ratios(report["results"])
    report["total_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "latest.md").write_text(markdown(report))
    _log(f"done in {report['total_s']:.0f} s: {args.out / 'latest.md'}")


if __name__ == "__main__":
    main()
