"""The benchmark runner: every case in one run (so ratios hold on a noisy machine), one subprocess per case.

    python -m benchmarks [--quick] [--device auto|cpu|cuda] [--models vit_small_patch16_224,vit_base_patch16_224]
                         [--gpu-models vit_large_patch16_224] [--gpu-dtypes bfloat16,float16] [--threads 1]

Writes ``benchmarks/results/latest.json`` (every measurement, the machine, the settings) and ``latest.md`` (the
tables and the issue-8 targets). Speed comes from one process per model that interleaves every method round by
round (best round kept), so a slow spell on a shared machine hits all methods alike; memory from one fresh process
per method and pass (the growth of its RSS high-water mark over the loaded model, plus
``torch.cuda.max_memory_allocated`` on CUDA). Every method runs at vitlens's default batch size for the device; the
first model is also measured at ``compare_batch_sizes``. On CUDA ViT-L/16 joins, and every model runs again in
bfloat16 and float16."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from vitlens.page import markdown_table

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]  # timm names, random weights
    img_size: int  # input side for the per-model tables
    speed_images: int  # images per timed round (all methods interleaved)
    rounds: int  # timed rounds after one warm-up pass of each method; each method's best round is kept
    memory_images: int  # images per memory process (one pass)
    batch_size: int | None  # None: vitlens's default for the device (vitlens.device.default_batch_size)
    compare_batch_sizes: tuple[int, ...]  # first model only: the speed and memory of the analyses at these too
    scale_images: tuple[int, ...]  # attention-distance memory vs the number of images (first model only)
    scale_sizes: tuple[int, ...]  # ... and vs resolution, at scale_images[0] images
    hires_model: str  # the high-resolution case: many tokens, where keeping every map runs out of memory
    hires_size: int
    hires_images: int
    rss_cap_mib: float  # keep-every-map stops once its process holds more than this (it would only swap or die)
    device: str
    threads: int | None = None  # torch CPU threads per process; None for torch's default
    gpu_models: tuple[str, ...] = ("vit_large_patch16_224",)  # added on CUDA, where ViT-L/16 takes minutes, not hours
    gpu_dtypes: tuple[str, ...] = ("bfloat16", "float16")  # on CUDA every model again with its weights in these


FULL = Settings(
    models=("vit_small_patch16_224", "vit_base_patch16_224"),
    img_size=224,
    speed_images=32,
    rounds=5,
    memory_images=128,
    batch_size=None,
    compare_batch_sizes=(32,),
    scale_images=(32, 128, 512),
    scale_sizes=(224, 384),
    hires_model="vit_small_patch14_dinov2",  # ViT-S/14 at 518 px: 37 x 37 patches + 1 = 1370 tokens
    hires_size=518,
    hires_images=16,
    rss_cap_mib=4096,
    device="auto",
)
QUICK = Settings(
    models=("vit_tiny_patch16_224",),
    img_size=64,
    speed_images=16,
    rounds=2,
    memory_images=32,
    batch_size=None,
    compare_batch_sizes=(32,),
    scale_images=(8, 32),
    scale_sizes=(64, 128),
    hires_model="vit_tiny_patch16_224",
    hires_size=256,
    hires_images=8,
    rss_cap_mib=512,
    device="auto",
    gpu_models=(),
    gpu_dtypes=("bfloat16",),
)
SPEED_METHODS = (
    "plain-forward",
    "unfused-forward",
    "attention-distance",
    "rollout",
    "rollout-one-at-a-time",
    "keep-every-map",
    "features",
)
MEMORY_METHODS = ("plain-forward", "unfused-forward", "attention-distance", "rollout", "keep-every-map")
BATCH_METHODS = ("plain-forward", "unfused-forward", "attention-distance", "rollout")  # compare_batch_sizes

# Issue 8's targets: (key, description, predicate on the measured value).
TARGETS = [
    ("attention_distance_vs_plain", "attention-distance images/s ≥ 0.85× plain forward", lambda v: v >= 0.85),
    ("rollout_vs_plain", "rollout (batched) images/s ≥ 0.8× plain forward", lambda v: v >= 0.8),
    ("memory_growth_in_images", "attention-distance peak memory flat in #images (largest/smallest ≤ 1.25)", None),
    ("memory_vs_plain", "attention-distance peak memory ≤ 1.5× plain forward", lambda v: v <= 1.5),
    ("rollout_memory_vs_plain", "rollout peak memory ≤ 1.5× plain forward", lambda v: v <= 1.5),
    ("keep_every_map_vs_streaming", "≥ 3× less memory than keep-every-map (first model)", lambda v: v >= 3),
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
    what = case.get("method", case["kind"])
    _log(
        f"  {what:<22} {case.get('model', '')} {case.get('img_size', '')} px n={case.get('num_images')} "
        f"{time.perf_counter() - started:.1f} s"
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

    import vitlens

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
        "vitlens": vitlens.__version__,  # also when run from a checkout that is not installed (a GPU machine)
        "platform": platform.platform(),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def measure(settings: Settings) -> dict[str, Any]:
    base = {"device": settings.device, "batch_size": settings.batch_size, "threads": settings.threads}
    models: dict[str, dict[str, Any]] = {}
    entries: list[tuple[str, str | None]] = [(m, None) for m in settings.models]
    if settings.device.startswith("cuda"):
        float32 = [*settings.models, *settings.gpu_models]
        entries = [(m, None) for m in float32] + [(m, dt) for dt in settings.gpu_dtypes for m in float32]
    for i, (model, dtype) in enumerate(entries):
        key = model if dtype is None else f"{model} {dtype}"
        _log(f"{key}:")
        case = {**base, "model": model, "img_size": settings.img_size, "dtype": dtype}
        # First model: the analyses at other batch sizes too, interleaved in the same rounds ("rollout@32").
        others = [f"{m}@{b}" for b in settings.compare_batch_sizes for m in BATCH_METHODS] if i == 0 else []
        speed = run_case(
            {
                **case,
                "kind": "speed",
                "num_images": settings.speed_images,
                "rounds": settings.rounds,
                "methods": [*SPEED_METHODS, *others],
            }
        )
        mem_case = {**case, "kind": "memory", "num_images": settings.memory_images}
        memory = {m: run_case({**mem_case, "method": m}) for m in MEMORY_METHODS}
        if i == 0:
            for b in settings.compare_batch_sizes:
                memory |= {f"{m}@{b}": run_case({**mem_case, "method": m, "batch_size": b}) for m in BATCH_METHODS}
        scaling = []
        if i == 0:  # attention-distance memory vs images and resolution, first model only (minutes per case)
            for n, size in [(n, settings.img_size) for n in settings.scale_images] + [
                (settings.scale_images[0], size) for size in settings.scale_sizes[1:]
            ]:
                same = n == settings.memory_images and size == settings.img_size
                scaling.append(
                    memory["attention-distance"]
                    if same
                    else run_case({**mem_case, "method": "attention-distance", "num_images": n, "img_size": size})
                )
        models[key] = {"speed": speed, "memory": memory, "scaling": scaling}
    _log(f"high resolution, {settings.hires_model} at {settings.hires_size} px:")
    hires_case = {
        **base,
        "kind": "memory",
        "model": settings.hires_model,
        "img_size": settings.hires_size,
        "num_images": settings.hires_images,
        "rss_cap_mib": settings.rss_cap_mib,
    }
    hires = {m: run_case({**hires_case, "method": m}) for m in MEMORY_METHODS}
    _log("few-shot, CLI start-up:")
    fewshot = run_case({**base, "kind": "fewshot", "repeats": 5})
    vitlens_bin = str(Path(sys.executable).with_name("vitlens"))
    startup = {
        "help_s": best_wall([vitlens_bin, "--help"]),
        "import_analysis_s": best_wall([sys.executable, "-c", "import vitlens.analysis"]),
        "python_startup_s": best_wall([sys.executable, "-c", "pass"]),
    }
    return {"models": models, "hires": hires, "fewshot": fewshot, "startup": startup}


def _growth(r: dict[str, Any]) -> float:
    # On CUDA the device allocator's peak is the number that matters; on CPU the RSS high-water growth.
    return r.get("cuda_peak_mib", r["rss_growth_mib"])


def _per_round(speed: dict[str, Any], name: str) -> float:
    """Median over rounds of ``name``'s speed relative to the plain forward in the same round: the methods of a round
    run back to back, so a slow spell that spans a round cancels in its ratio (best-of-rounds cannot do that)."""
    plain = speed["all_seconds"]["plain-forward"]
    return statistics.median(p / t for p, t in zip(plain, speed["all_seconds"][name], strict=True))


def ratios(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The issue-8 target quantities, per model (plus the model-free ones under ``"all"``)."""
    out: dict[str, dict[str, float]] = {}
    first = next(iter(results["models"]))
    for model, m in results["models"].items():
        ips, mem = m["speed"]["images_per_s"], m["memory"]
        plain = ips["plain-forward"]
        out[model] = {
            "attention_distance_vs_plain": ips["attention-distance"] / plain,
            "rollout_vs_plain": ips["rollout"] / plain,
            "unfused_vs_plain": ips["unfused-forward"] / plain,
            "attention_distance_vs_unfused": ips["attention-distance"] / ips["unfused-forward"],
            "rollout_vs_unfused": ips["rollout"] / ips["unfused-forward"],
            "rollout_batched_vs_one_at_a_time": ips["rollout"] / ips["rollout-one-at-a-time"],
            "features_vs_plain": ips["features"] / plain,
            "memory_vs_plain": _growth(mem["attention-distance"]) / max(_growth(mem["plain-forward"]), 1e-9),
            "unfused_memory_vs_plain": _growth(mem["unfused-forward"]) / max(_growth(mem["plain-forward"]), 1e-9),
            "rollout_memory_vs_plain": _growth(mem["rollout"]) / max(_growth(mem["plain-forward"]), 1e-9),
            "attention_distance_vs_keep_every_map_speed": ips["attention-distance"] / ips["keep-every-map"],
            "attention_distance_vs_plain_per_round": _per_round(m["speed"], "attention-distance"),
            "rollout_vs_plain_per_round": _per_round(m["speed"], "rollout"),
        }
        for name in ips:
            if name.startswith("plain-forward@"):
                b = name.partition("@")[2]
                out[model] |= {
                    f"attention_distance_vs_plain@{b}": ips[f"attention-distance@{b}"] / ips[name],
                    f"rollout_vs_plain@{b}": ips[f"rollout@{b}"] / ips[name],
                    f"memory_vs_plain@{b}": _growth(mem[f"attention-distance@{b}"]) / max(_growth(mem[name]), 1e-9),
                    f"rollout_memory_vs_plain@{b}": _growth(mem[f"rollout@{b}"]) / max(_growth(mem[name]), 1e-9),
                    f"plain_default_vs@{b}": plain / ips[name],
                    f"attention_distance_default_vs@{b}": ips["attention-distance"] / ips[f"attention-distance@{b}"],
                }
        if model == first:
            out[model]["keep_every_map_vs_streaming"] = _growth(mem["keep-every-map"]) / max(
                _growth(mem["attention-distance"]), 1e-9
            )
            sizes = {s["img_size"] for s in m["scaling"]}
            by_n = sorted((s for s in m["scaling"] if s["img_size"] == min(sizes)), key=lambda s: s["num_images"])
            out[model]["memory_growth_in_images"] = _growth(by_n[-1]) / max(_growth(by_n[0]), 1e-9)
    hires = results["hires"]
    out["all"] = {
        "fewshot_sweep_s": results["fewshot"]["ridge_s"],
        "help_s": results["startup"]["help_s"],
        "hires_memory_vs_plain": _growth(hires["attention-distance"]) / max(_growth(hires["plain-forward"]), 1e-9),
        "hires_speed_vs_plain": hires["attention-distance"]["images_per_s"] / hires["plain-forward"]["images_per_s"],
        "hires_speed_vs_unfused": (
            hires["attention-distance"]["images_per_s"] / hires["unfused-forward"]["images_per_s"]
        ),
    }
    return out


def _maps_gib(r: dict[str, Any], images: int) -> float:
    """GiB that keeping every layer's float32 maps of ``images`` images needs, the maps alone."""
    return r["depth"] * images * r["num_heads"] * r["num_tokens"] ** 2 * 4 / 2**30


def markdown(report: dict[str, Any]) -> str:
    m, s, res = report["machine"], report["settings"], report["results"]
    gpu = m["gpu"] or "none"
    lines = [
        f"# vitlens benchmarks ({'quick' if report['quick'] else 'full'} run, {m['when']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, load average {', '.join(f'{x:.1f}' for x in m['load_average'])} "
        f"at start; GPU: {gpu}; device `{m['device']}`. Python {m['python']}, torch {m['torch']}, timm {m['timm']}, "
        f"vitlens {m['vitlens']}. Total {report['total_s'] / 60:.0f} min.",
        "",
        f"Settings: {s['img_size']} px, batch {s['batch_size']}, torch threads {s['threads'] or 'default'}, random "
        "weights, scikit-learn's digits upsampled to the model's input. Speed: "
        f"{s['speed_images']} images per round, all methods interleaved in one process, best of {s['rounds']} rounds "
        f"after a warm-up pass. Memory: {s['memory_images']} images, one pass per fresh process; the growth of its RSS "
        "high-water mark over the loaded model (CUDA: `max_memory_allocated`).",
        "",
    ]
    for model, mr in res["models"].items():
        ips = mr["speed"]["images_per_s"]
        plain, unfused = ips["plain-forward"], ips["unfused-forward"]
        speed = []
        for name, v in ips.items():
            if "@" in name:
                continue
            mem = mr["memory"].get(name)
            cell = f"{_growth(mem):.0f}" if mem else "–"
            speed.append([name, f"{v:.2f}", f"{v / plain:.2f}", f"{v / unfused:.2f}", cell])
        lines += [
            f"## {model}",
            "",
            markdown_table(
                ["method", "images/s", "× plain", "× unfused", "peak memory (MiB)"], speed, align=[None, *["right"] * 4]
            ),
        ]
        others = sorted({int(n.partition("@")[2]) for n in ips if "@" in n})
        if others:
            bs = [s["batch_size"], *others]
            batch = []
            for name in BATCH_METHODS:
                keys = [name, *(f"{name}@{b}" for b in others)]
                speeds = [f"{ips[k]:.2f}" for k in keys]
                mems = [f"{_growth(mr['memory'][k]):.0f}" if k in mr["memory"] else "–" for k in keys]
                batch.append([name, *speeds, *mems])
            lines += [
                "",
                "Batch size (images/s and peak memory in MiB; the analyses' rows are the batch they were asked for):",
                "",
                markdown_table(
                    ["method", *(f"images/s @{b}" for b in bs), *(f"memory @{b}" for b in bs)],
                    batch,
                    align=[None, *["right"] * (2 * len(bs))],
                ),
            ]
        if mr["scaling"]:
            scaling = [
                [r["img_size"], r["num_tokens"], r["num_images"], f"{r['images_per_s']:.2f}", f"{_growth(r):.0f}"]
                for r in mr["scaling"]
            ]
            lines += [
                "",
                "attention-distance, scaling:",
                "",
                markdown_table(
                    ["px", "tokens", "images", "images/s", "peak memory (MiB)"], scaling, align=["right"] * 5
                ),
            ]
        lines.append("")
    hires = res["hires"]
    any_r = next(iter(hires.values()))
    high = []
    for name, r in hires.items():
        note = (
            ""
            if r.get("ran_batch_size", s["batch_size"]) == s["batch_size"]
            else (f"batch lowered to {r['ran_batch_size']} by the attention-memory budget")
        )
        if "stopped_after_images" in r:
            note = (
                f"stopped at the {s['rss_cap_mib'] / 1024:.1f} GiB cap after {r['stopped_after_images']} images; "
                f"the maps alone of 128 images would take {_maps_gib(r, 128):.0f} GiB"
            )
        elif name == "keep-every-map":
            note = f"the maps alone of 128 images would take {_maps_gib(r, 128):.0f} GiB"
        high.append([name, f"{r['images_per_s']:.2f}", f"{_growth(r):.0f}", note])
    st, fs = res["startup"], res["fewshot"]
    acc = fs["accuracy"]
    fewshot = [
        [k, *(f"{100 * a[i]['mean']:.1f} ± {100 * a[i]['std']:.1f}" for a in acc.values())]
        for i, k in enumerate(fs["shots"])
    ]
    lines += [
        f"## High resolution: {any_r['model']} at {any_r['img_size']} px ({any_r['num_tokens']} tokens), "
        f"{any_r['num_images']} images, batch {any_r['batch_size']}",
        "",
        markdown_table(["method", "images/s", "peak memory (MiB)", "note"], high, align=[None, "right", "right", None]),
        "",
        "## Few-shot and start-up",
        "",
        f"- Few-shot on the {fs['model']} model, digits ({fs['pool_images']} pool / {fs['test_images']} test images, "
        f"{fs['features']} features, {fs['classes']} classes): feature extraction {fs['images_per_s']:.0f} images/s; "
        f"the ridge sweep ({len(fs['shots'])} shot counts × {fs['seeds']} seeds) {1000 * fs['ridge_s']:.1f} ms, with "
        f"`--l2 auto` {1000 * fs['auto_s']:.1f} ms; scikit-learn LogisticRegression on the same shots "
        f"{1000 * fs['logreg_s']:.1f} ms ({fs['logreg_s'] / fs['ridge_s']:.0f}× the ridge sweep).",
        "",
        # Indented: the table belongs to the list item above it.
        textwrap.indent(
            markdown_table(["shots", "ridge λ=1024", "ridge auto λ", "logistic (C=1)"], fewshot, align=["right"] * 4),
            "  ",
        ),
        "",
        f"- `vitlens --help`: {st['help_s']:.3f} s (best of 5); `python -c 'import vitlens.analysis'`: "
        f"{st['import_analysis_s']:.3f} s; bare `python -c pass`: {st['python_startup_s']:.3f} s.",
        "",
        "## Issue-8 targets",
        "",
    ]
    targets = []
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
        targets.append([text, *cells])
    ratio_align = [None, *["right"] * len(report["ratios"])]
    lines.append(markdown_table(["target", *report["ratios"]], targets, align=ratio_align))
    extra = [
        ("unfused_vs_plain", "timm's explicit attention path (the floor of any map capture) × plain"),
        ("attention_distance_vs_plain_per_round", "attention-distance × plain, median of the per-round ratios"),
        ("rollout_vs_plain_per_round", "rollout × plain, median of the per-round ratios"),
        ("attention_distance_vs_unfused", "attention-distance × the explicit path"),
        ("rollout_vs_unfused", "rollout × the explicit path"),
        ("rollout_batched_vs_one_at_a_time", "batched rollout × one image at a time"),
        ("attention_distance_vs_keep_every_map_speed", "attention-distance × keep-every-map, speed"),
        ("features_vs_plain", "few-shot feature extraction × plain"),
        ("unfused_memory_vs_plain", "timm's explicit attention path, peak memory × plain"),
        ("hires_memory_vs_plain", "high resolution: attention-distance memory × plain"),
        ("hires_speed_vs_plain", "high resolution: attention-distance images/s × plain"),
        ("hires_speed_vs_unfused", "high resolution: attention-distance images/s × the explicit path"),
    ]
    for b in s["compare_batch_sizes"]:
        extra += [
            (f"plain_default_vs@{b}", f"plain forward at batch {s['batch_size']} × at batch {b}, images/s"),
            (f"attention_distance_default_vs@{b}", f"attention-distance at batch {s['batch_size']} × at {b}"),
            (f"attention_distance_vs_plain@{b}", f"at batch {b}: attention-distance images/s × plain"),
            (f"rollout_vs_plain@{b}", f"at batch {b}: rollout images/s × plain"),
            (f"memory_vs_plain@{b}", f"at batch {b}: attention-distance memory × plain"),
            (f"rollout_memory_vs_plain@{b}", f"at batch {b}: rollout memory × plain"),
        ]
    context = [
        [text, *(f"{r[key]:.2f}" if key in r else "–" for r in report["ratios"].values())] for key, text in extra
    ]
    lines += ["", "Context:", "", markdown_table(["quantity", *report["ratios"]], context, align=ratio_align), ""]
    return "\n".join(lines)


def parse_settings(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    """The run's :class:`Settings` from the command line, the device resolved."""
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
    parser.add_argument(
        "--gpu-models", default=None, help="comma-separated timm names added on CUDA (default: ViT-L/16; '' for none)"
    )
    parser.add_argument(
        "--gpu-dtypes", default=None, help="comma-separated dtypes run again on CUDA (default: bfloat16,float16)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for latest.json and latest.md")
    args = parser.parse_args(argv)

    settings = QUICK if args.quick else FULL
    settings = dataclasses.replace(settings, device=args.device)
    if args.models:
        settings = dataclasses.replace(settings, models=tuple(args.models.split(",")))
    for flag, field in ((args.gpu_models, "gpu_models"), (args.gpu_dtypes, "gpu_dtypes")):
        if flag is not None:
            settings = dataclasses.replace(settings, **{field: tuple(x for x in flag.split(",") if x)})
    from vitlens.device import default_batch_size, resolve_device

    device = resolve_device(args.device)
    batch_size = settings.batch_size or default_batch_size(device)
    settings = dataclasses.replace(settings, device=str(device), threads=args.threads, batch_size=batch_size)
    return settings, args


def main(argv: list[str] | None = None) -> None:
    settings, args = parse_settings(argv)
    started = time.perf_counter()
    report = {"quick": args.quick, "machine": machine(settings.device), "settings": dataclasses.asdict(settings)}
    report["results"] = measure(settings)
    report["ratios"] = ratios(report["results"])
    report["total_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "latest.md").write_text(markdown(report))
    _log(f"done in {report['total_s']:.0f} s: {args.out / 'latest.md'}")


if __name__ == "__main__":
    main()
