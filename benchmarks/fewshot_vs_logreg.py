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

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from vitlens.data import open_dataset
    from vitlens.fewshot import cached_features, fewshot_lsr, shot_indices
    from vitlens.models import load_vit

    shots = tuple(int(s) for s in args.shots.split(","))
    vit = load_vit(args.model, num_heads=args.num_heads, device=args.device)
    pool = open_dataset(args.data, vit.preprocess, split="train", require_labels=True)
    test = open_dataset(args.data, vit.preprocess, split="test", require_labels=True)
    started = time.perf_counter()
    (train_feats, train_status), (test_feats, test_status) = (cached_features(vit, d) for d in (pool, test))
    extract_s = time.perf_counter() - started
    (layer,) = train_feats
    x_pool, x_test = train_feats[layer].numpy(), test_feats[layer].numpy()
    K = len(pool.classes)
    print(
        f"{vit.source} on {args.data}: {len(pool)} pool / {len(test)} test images, {x_pool.shape[1]} features, "
        f"{K} classes; features {extract_s:.2f} s (cache: train {train_status}, test {test_status})"
    )

    fewshot_lsr(train_feats, pool.labels, test_feats, test.labels, shots=shots, seeds=args.seeds)  # warm-up
    ridge_s = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        ridge = fewshot_lsr(train_feats, pool.labels, test_feats, test.labels, shots=shots, seeds=args.seeds)
        ridge_s.append(time.perf_counter() - t)
    t = time.perf_counter()
    auto = fewshot_lsr(train_feats, pool.labels, test_feats, test.labels, shots=shots, seeds=args.seeds, l2="auto")
    auto_s = time.perf_counter() - t

    logreg = np.zeros((len(shots), args.seeds))
    t = time.perf_counter()
    for i, k in enumerate(shots):
        for seed in range(args.seeds):
            idx = shot_indices(pool.labels, shots=k, seed=seed, num_classes=K)
            scaler = StandardScaler().fit(x_pool[idx])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf = LogisticRegression(max_iter=1000).fit(scaler.transform(x_pool[idx]), pool.labels[idx])
            logreg[i, seed] = clf.score(scaler.transform(x_test), test.labels)
    logreg_s = time.perf_counter() - t

    print(f"{'shots':>5}  {'ridge λ=1024':>14}  {'ridge auto λ':>14}  {'logistic (C=1)':>14}")
    for i, k in enumerate(shots):
        cells = [
            f"{100 * a.mean():5.1f} ± {100 * a.std():4.1f}"
            for a in (ridge.accuracy[i, 0], auto.accuracy[i, 0], logreg[i])
        ]
        print(f"{k:>5}  " + "  ".join(f"{c:>14}" for c in cells))
    runs = len(shots) * args.seeds
    print(
        f"time for {len(shots)} shot counts x {args.seeds} seeds ({runs} probes): "
        f"ridge {1000 * min(ridge_s):.1f} ms (best of {args.repeats}), ridge auto-λ {1000 * auto_s:.1f} ms, "
        f"LogisticRegression {1000 * logreg_s:.1f} ms ({logreg_s / min(ridge_s):.0f}x the ridge sweep)"
    )


if __name__ == "__main__":
    main()
