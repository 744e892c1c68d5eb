"""`vitlens tokens` against the plain forward (issue 17): images/s and peak memory over many images.

``python -m benchmarks.tokens [--model vit_small_patch16_224] [--img-size 224] [--speed-images 128]
[--memory-images 128,512]`` runs each case in its own process (:mod:`benchmarks.cases`) and writes
``results/tokens.json`` and ``results/tokens.md``. Speed: the plain forward (timm's fused path), the explicit
attention path, the counting pass of ``vitlens tokens`` (norms, every layer's attention, patch embeddings: all of
``--norm-threshold X``) and the norms-only pass that ``auto`` adds first, interleaved in rounds (best round kept).
Memory: the process high-water mark growth of one pass of the counting pass and of the plain forward, at each
number of images (flat in the number of images means streaming).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.__main__ import RESULTS, machine, run_case
from vitlens.page import markdown_table

METHODS = ("plain-forward", "unfused-forward", "tokens", "tokens-norms-only")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tokens", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--speed-images", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-images", default="128,512")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    base = {"device": args.device, "model": args.model, "img_size": args.img_size, "batch_size": args.batch_size}
    started = time.perf_counter()
    speed = run_case(
        {**base, "kind": "speed", "num_images": args.speed_images, "rounds": args.rounds, "methods": list(METHODS)}
    )
    memory = [
        run_case({**base, "kind": "memory", "num_images": int(n), "method": method})
        for n in args.memory_images.split(",")
        for method in ("plain-forward", "tokens")
    ]
    ips = speed["images_per_s"]
    report = {
        "machine": machine(args.device),
        "settings": vars(args) | {"out": str(args.out)},
        "images_per_s": ips,
        "tokens_vs_plain": ips["tokens"] / ips["plain-forward"],
        "tokens_vs_unfused": ips["tokens"] / ips["unfused-forward"],
        "auto_vs_plain": 1 / (1 / ips["tokens"] + 1 / ips["tokens-norms-only"]) / ips["plain-forward"],
        "memory": [
            {k: m[k] for k in ("method", "images", "rss_growth_mib", "images_per_s", "ran_batch_size")} for m in memory
        ],
        "total_s": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tokens.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# tokens: {args.model} at {args.img_size} px, {args.device}, batch {args.batch_size}",
        "",
        f"Speed ({args.speed_images} images, best of {args.rounds} interleaved rounds):",
        "",
        markdown_table(
            ["method", "images/s", "× plain forward"],
            [
                *([m, f"{ips[m]:.2f}", f"{ips[m] / ips['plain-forward']:.2f}"] for m in METHODS),
                ["`auto` (both passes)", "–", f"{report['auto_vs_plain']:.2f}"],
            ],
            align=[None, "right", "right"],
        ),
        "",
        "Peak memory (RSS high-water growth over the loaded model, one pass):",
        "",
        markdown_table(
            ["method", "images", "MiB", "images/s"],
            [
                [m["method"], m["images"], f"{m['rss_growth_mib']:.0f}", f"{m['images_per_s']:.2f}"]
                for m in report["memory"]
            ],
            align=[None, "right", "right", "right"],
        ),
        "",
    ]
    (args.out / "tokens.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
