"""Time the closed-form few-shot sweep against scikit-learn's LogisticRegression on the same frozen features.

Not a test: it asserts nothing and prints accuracy and wall time. Features are extracted once (and cached), then the
same shot sets (seeds 0..2, nested in shots) are given to both probes:

    python benchmarks/fewshot_vs_logreg.py [MODEL] [--data digits] [--num-heads 3] [--device cpu]

MODEL defaults to the embedded demo model; any checkpoint works (a fixture saved by ``tests.conftest.save_fixture``
needs ``--num-heads 3``).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np


def compare(
    vit, pool, test, *, shots: tuple[int, ...] = (1, 5, 10, 25), seeds: int = 3, repeats: int = 5, use_cache=True
) -> dict:
    """Feature extraction, the ridge sweep (λ=1024 and auto) and LogisticRegression on the same shot sets.

    Returns:
        Times in seconds (``extract_s``, ``images_per_s`` of the extraction, ``ridge_s`` best of ``repeats``,
        ``auto_s``, ``logreg_s``), the features' shape, and mean/std accuracy per shot count for each probe.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from vitlens.analysis.fewshot import fewshot_lsr, shot_indices
    from vitlens.feature_cache import cached_features

    started = time.perf_counter()
    (train_feats, train_status), (test_feats, test_status) = (
        cached_features(vit, d, use_cache=use_cache) for d in (pool, test)
    )
    extract_s = time.perf_counter() - started
    (layer,) = train_feats
    x_pool, x_test = train_feats[layer].numpy(), test_feats[layer].numpy()
    K = len(pool.classes)

    fewshot_lsr(train_feats, pool.labels, test_feats, test.labels, shots=shots, seeds=seeds)  # warm-up
    ridge_s = []
    for _ in range(repeats):
        t = time.perf_counter()
        ridge = fewshot_lsr(train_feats, pool.labels, test_feats, test.labels, shots=shots, seeds=seeds)
        ridge_s.append(time.perf_counter() - t)
    t = time.perf_counter()
    auto = fewshot_lsr(train_feats, pool.labels, test_feats, test.labels, shots=shots, seeds=seeds, l2="auto")
    auto_s = time.perf_counter() - t

    logreg = np.zeros((len(shots), seeds))
    t = time.perf_counter()
    for i, k in enumerate(shots):
        for seed in range(seeds):
            idx = shot_indices(pool.labels, shots=k, seed=seed, num_classes=K)
            scaler = StandardScaler().fit(x_pool[idx])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf = LogisticRegression(max_iter=1000).fit(scaler.transform(x_pool[idx]), pool.labels[idx])
            logreg[i, seed] = clf.score(scaler.transform(x_test), test.labels)
    logreg_s = time.perf_counter() - t

    def summary(acc: np.ndarray) -> list[dict]:
        return [{"shots": k, "mean": float(a.mean()), "std": float(a.std())} for k, a in zip(shots, acc, strict=True)]

    return {
        "model": vit.source,
        "pool_images": len(pool),
        "test_images": len(test),
        "features": int(x_pool.shape[1]),
        "classes": K,
        "cache": [train_status, test_status],
        "extract_s": extract_s,
        "images_per_s": (len(pool) + len(test)) / extract_s,
        "shots": list(shots),
        "seeds": seeds,
        "ridge_s": min(ridge_s),
        "auto_s": auto_s,
        "logreg_s": logreg_s,
        "accuracy": {
            "ridge": summary(ridge.accuracy[:, 0]),
            "ridge_auto": summary(auto.accuracy[:, 0]),
            "logistic": summary(logreg),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="demo")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--num-heads", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--shots", default="1,5,10,25")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions of the ridge sweep (best is shown)")
    args = parser.parse_args()

    from vitlens.data import open_dataset
    from vitlens.models import load_vit

    shots = tuple(int(s) for s in args.shots.split(","))
    vit = load_vit(args.model, num_heads=args.num_heads, device=args.device)
    pool = open_dataset(args.data, vit.preprocess, split="train", require_labels=True)
    test = open_dataset(args.data, vit.preprocess, split="test", require_labels=True)
    r = compare(vit, pool, test, shots=shots, seeds=args.seeds, repeats=args.repeats)
    print(
        f"{r['model']} on {args.data}: {r['pool_images']} pool / {r['test_images']} test images, {r['features']} "
        f"features, {r['classes']} classes; features {r['extract_s']:.2f} s (cache: train {r['cache'][0]}, "
        f"test {r['cache'][1]})"
    )
    print(f"{'shots':>5}  {'ridge λ=1024':>14}  {'ridge auto λ':>14}  {'logistic (C=1)':>14}")
    acc = r["accuracy"]
    for i, k in enumerate(shots):
        cells = [f"{100 * a[i]['mean']:5.1f} ± {100 * a[i]['std']:4.1f}" for a in acc.values()]
        print(f"{k:>5}  " + "  ".join(f"{c:>14}" for c in cells))
    runs = len(shots) * args.seeds
    print(
        f"time for {len(shots)} shot counts x {args.seeds} seeds ({runs} probes): "
        f"ridge {1000 * r['ridge_s']:.1f} ms (best of {args.repeats}), ridge auto-λ {1000 * r['auto_s']:.1f} ms, "
        f"LogisticRegression {1000 * r['logreg_s']:.1f} ms ({r['logreg_s'] / r['ridge_s']:.0f}x the ridge sweep)"
    )


if __name__ == "__main__":
    main()
