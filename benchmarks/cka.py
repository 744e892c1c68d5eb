"""`vitlens cka` of a model with itself against the plain forward and against collecting every layer's features of
every image first (torch_cka's way), issue 19.

``python -m benchmarks.cka [--model vit_small_patch16_224] [--num-images 512] [--collect-images-all 16]`` runs one
fresh process per case (:func:`benchmarks.cases.cka`: one pass, images/s, growth of the RSS high-water mark) and
writes ``results/cka.json`` and ``results/cka.md``. ``collect-then-cka`` with ``all`` tokens keeps
``images x patches`` rows per layer and an ``rows x rows`` Gram matrix per pair: at 512 images of ViT-S/16 that is
100,352 rows (1.9 GB of features, 40 GB per Gram matrix), so it runs on ``--collect-images-all`` images only and the
table says so.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.__main__ import RESULTS, machine, run_case
from vitlens.page import markdown_table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cka", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--minibatch-size", type=int, default=256)
    parser.add_argument("--collect-images-all", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    base = {
        "kind": "cka",
        "device": args.device,
        "model": args.model,
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "minibatch_size": args.minibatch_size,
        "threads": args.threads,
    }
    started = time.perf_counter()
    cases = [
        ("plain-forward", "mean-patch", args.num_images),
        ("cka", "mean-patch", args.num_images),
        ("collect-then-cka", "mean-patch", args.num_images),
        ("cka", "all", args.num_images),
        ("cka", "all", args.collect_images_all),
        ("collect-then-cka", "all", args.collect_images_all),
    ]
    rows = [run_case({**base, "method": method, "tokens": tokens, "num_images": n}) for method, tokens, n in cases]
    plain = rows[0]["images_per_s"]
    report = {
        "machine": machine(args.device),
        "settings": vars(args) | {"out": str(args.out)},
        "rows": [
            {k: r[k] for k in ("method", "tokens", "images", "images_per_s", "rss_growth_mib", "seconds")}
            | {"vs_plain": r["images_per_s"] / plain}
            for r in rows
        ],
        "total_s": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cka.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# cka: {args.model} with itself at {args.img_size} px, {args.device}, batch {args.batch_size}, "
        f"minibatch {args.minibatch_size}",
        "",
        markdown_table(
            ["method", "tokens", "images", "images/s", "× plain forward", "peak memory growth (MiB)"],
            [
                [
                    r["method"],
                    r["tokens"],
                    r["images"],
                    f"{r['images_per_s']:.2f}",
                    f"{r['vs_plain']:.2f}",
                    f"{r['rss_growth_mib']:.0f}",
                ]
                for r in report["rows"]
            ],
            align=[None, None, "right", "right", "right", "right"],
        ),
        "",
    ]
    (args.out / "cka.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
