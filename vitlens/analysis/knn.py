"""Weighted k-nearest-neighbour probes on frozen features, as DINO's ``eval_knn.py`` (Caron et al. 2021, §4.1 and
App. "k-NN classification"), on the same shot sets as the few-shot ridge probes of :mod:`vitlens.analysis.fewshot`.

Each test feature is L2-normalised and compared by cosine similarity with the L2-normalised training shots; its
``k`` most similar shots vote for their class with weight ``exp(sim / T)``; the class with the largest summed vote
is the prediction. Pure: features and labels in, accuracies out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vitlens import defaults
from vitlens.analysis._common import f64_device
from vitlens.analysis.fewshot import (
    SeedAccuracies,
    _as_layers,
    _check_positive,
    _labels_numpy,
    check_shot_pool,
    shot_indices,
)
from vitlens.errors import ParameterError, VitlensError

# Similarities held at once: a chunk of test rows against every seed's shots, [seeds, rows, n] float64 (128 MiB).
_SIM_ELEMENTS = 2**24


def check_k(k: Any, *, name: str = "k") -> tuple[int, ...]:
    """``k``, the numbers of neighbours, as sorted distinct positive integers (an int, a sequence, or ``"10,20"``).

    ``name`` is the parameter the error names (``knn_k`` in :func:`vitlens.fewshot`).

    Raises:
        ParameterError: anything else.
    """
    if isinstance(k, str):
        try:
            values = [int(p.strip()) for p in k.split(",")]
        except ValueError:
            values = []
    else:
        items = [k] if isinstance(k, int) else list(k) if isinstance(k, Sequence) else []
        values = items if all(isinstance(v, int) and not isinstance(v, bool) for v in items) else []
    if not values or any(v < 1 for v in values):
        raise ParameterError(name, f"{name} must be positive integers (e.g. 10,20,100,200), not {k!r}")
    return tuple(sorted(set(values)))


def knn_predict(
    pool: torch.Tensor,
    pool_labels: torch.Tensor,
    queries: torch.Tensor,
    *,
    k: Sequence[int],
    temperature: float,
    num_classes: int,
) -> torch.Tensor:
    """DINO's weighted k-NN vote for one or a batch of training pools (``knn_classifier`` in ``eval_knn.py``).

    ``pred(q) = argmax_c sum_{i in top-k(q)} exp(cos(q, x_i) / T) [y_i = c]``, where top-k are the ``k`` pool rows
    most similar to ``q``. Each ``k`` is capped at the pool size ``n``. The votes are computed as
    ``exp((sim - sim_max) / T)``, the same up to a positive factor per query (so the same argmax) and finite at any
    ``T``. Ties: equal votes go to the lowest class index (``argmax``); which of several rows with exactly the
    k-th largest similarity is counted is unspecified, as with DINO's ``topk``.

    Args:
        pool: ``[P, n, D]`` training features of ``P`` pools (e.g. seeds), any scale (normalised here).
        pool_labels: ``[P, n]`` int64 class indices.
        queries: ``[m, D]`` test features, shared by every pool (normalised here).
        k: numbers of neighbours; the top ``max(k)`` is found once and every smaller ``k`` is a prefix of it.
        temperature: ``T`` > 0 (DINO's 0.07).
        num_classes: ``K``.

    Returns:
        ``[P, len(k), m]`` int64 predicted classes.
    """
    n = pool.shape[-2]
    x = F.normalize(pool, dim=-1)  # [P, n, D]
    q = F.normalize(queries, dim=-1)  # [m, D]
    sim = q @ x.mT  # [P, m, n] cosine similarities
    top, idx = sim.topk(min(max(k), n), dim=-1)  # [P, m, k_max], most similar first
    weight = ((top - top[..., :1]) / temperature).exp()  # [P, m, k_max] exp(sim / T) / exp(sim_max / T)
    labels = torch.gather(pool_labels[:, None, :].expand(-1, q.shape[0], -1), -1, idx)  # [P, m, k_max]
    preds = []
    for kk in k:
        used = min(kk, n)
        votes = torch.zeros(*labels.shape[:-1], num_classes, dtype=weight.dtype, device=weight.device)  # [P, m, K]
        votes.scatter_add_(-1, labels[..., :used], weight[..., :used])
        preds.append(votes.argmax(-1))  # [P, m]
    return torch.stack(preds, dim=1)  # [P, len(k), m]


@dataclass(frozen=True)
class KnnResult(SeedAccuracies):
    """Test accuracy of weighted k-NN probes for every shots count, layer, seed and k (``mean`` and ``std``:
    ``[S, L, len(k)]``)."""

    accuracy: np.ndarray  # [S, L, seeds, len(k)] fraction of test images classified correctly
    k: tuple[int, ...]  # the numbers of neighbours asked for, ascending
    k_used: np.ndarray  # [S, len(k)] min(k, pool size of that shots count): the k actually used
    temperature: float  # T of the votes exp(sim / T)
    shots: tuple[int, ...]  # S shots-per-class values, ascending
    layers: tuple[int, ...]  # L 0-based layers the features came from
    seeds: tuple[int, ...]  # the seeds of the shot draws (0 .. seeds-1), the same draws as the ridge probes'
    num_classes: int  # K
    num_train: int  # size of the pool the shots were drawn from
    num_test: int  # test images scored
    short_classes: dict[str, int] = field(default_factory=dict)  # classes with fewer than max(shots) examples
    feature: str = ""  # what the features are (pre-logits, cls, mean-patch)

    def to_dict(self) -> dict[str, Any]:
        """The ``knn`` entry of the JSON: the settings and one result per (shots, layer, k)."""
        results = [
            {
                "shots": shots,
                "layer": layer,
                "k": kk,
                "k_used": int(self.k_used[i, c]),
                "mean": float(self.mean[i, j, c]),
                "std": float(self.std[i, j, c]),
                "per_seed": [float(a) for a in self.accuracy[i, j, :, c]],
            }
            for j, layer in enumerate(self.layers)
            for i, shots in enumerate(self.shots)
            for c, kk in enumerate(self.k)
        ]
        return {"k": list(self.k), "temperature": self.temperature, "results": results}


def fewshot_knn(
    train_feats: torch.Tensor | Mapping[int, torch.Tensor],
    train_labels: np.ndarray | torch.Tensor,
    test_feats: torch.Tensor | Mapping[int, torch.Tensor],
    test_labels: np.ndarray | torch.Tensor,
    *,
    shots: Sequence[int] = defaults.FEWSHOT_SHOTS,
    seeds: int = defaults.FEWSHOT_SEEDS,
    k: Sequence[int] = defaults.FEWSHOT_KNN_K,
    temperature: float = defaults.FEWSHOT_KNN_TEMPERATURE,
    device: torch.device | str | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    allow_fewer: bool = False,
    feature: str = "",
) -> KnnResult:
    """Few-shot accuracy of DINO's weighted k-NN classifier on frozen features (:func:`knn_predict`).

    The training set of each (shots, seed) is exactly the ridge probe's (:func:`~vitlens.analysis.fewshot.shot_indices`,
    the same seeds), so the two probes compare on the same examples. All seeds of a shots count are one batched
    matrix product per chunk of test rows (``[seeds, rows, n]`` similarities, at most ``_SIM_ELEMENTS`` at once), in
    float64 on ``device``; one ``topk`` serves every ``k``.

    Args:
        train_feats: the pool's features ``[N, D]``, or ``{layer: [N, D]}`` (a bare tensor is reported as layer -1).
        train_labels: ``[N]`` int class indices.
        test_feats: ``[M, D]`` or ``{layer: [M, D]}`` with the same layers.
        test_labels: ``[M]``.
        shots: examples per class.
        seeds: number of shot draws (seeds ``0 .. seeds-1``).
        k: numbers of neighbours (DINO's 10, 20, 100, 200), each capped at the shots' pool size (see ``k_used``).
        temperature: ``T`` of the votes ``exp(sim / T)`` (DINO's 0.07).
        device: where to compute (default: the features' device; the CPU for MPS, which has no float64).
        num_classes: K (default: the largest label + 1).
        class_names: for error messages and ``short_classes``.
        allow_fewer: use all examples of classes with fewer than ``max(shots)`` instead of failing.
        feature: what the features are, kept for titles and JSON.

    Raises:
        ParameterError: non-positive ``shots``, ``seeds``, ``k`` or ``temperature``; features whose layers or shapes
            do not match each other or the labels.
        VitlensError: as :func:`~vitlens.analysis.fewshot.check_shot_pool`; an empty test set.
    """
    shots = tuple(sorted({int(s) for s in shots}))
    _check_positive("shots", shots)
    if int(seeds) < 1:
        raise ParameterError("seeds", f"seeds must be at least 1, got {seeds}")
    ks = check_k(k)
    _check_positive("temperature", [float(temperature)])
    train, test = _as_layers(train_feats), _as_layers(test_feats)
    if list(train) != list(test):
        raise ParameterError("test_feats", f"test_feats has layers {list(test)}, train_feats {list(train)}")
    y_pool = _labels_numpy(train_labels)  # [N]
    y_test_np = _labels_numpy(test_labels)  # [M]
    if len(y_test_np) == 0:
        raise VitlensError("the test set is empty")
    K = int(num_classes) if num_classes is not None else int(max(y_pool.max(initial=0), y_test_np.max()) + 1)
    layers = list(train)
    for la in layers:
        a, b = train[la], test[la]
        if a.ndim != 2 or a.shape[0] != len(y_pool) or b.ndim != 2 or b.shape != (len(y_test_np), a.shape[1]):
            raise ParameterError(
                "train_feats",
                f"train_feats and test_feats must be [{len(y_pool)}, D] and [{len(y_test_np)}, D] (one row per "
                f"label, one width), not {list(a.shape)} and {list(b.shape)}",
            )
    if y_pool.min(initial=0) < 0 or y_pool.max(initial=0) >= K or y_test_np.min() < 0 or y_test_np.max() >= K:
        raise VitlensError(f"labels must be class indices 0..{K - 1}; the data has unlabelled or unknown classes")
    short = check_shot_pool(y_pool, shots=shots, num_classes=K, class_names=class_names, allow_fewer=allow_fewer)

    target = f64_device(torch.device(device) if device is not None else train[layers[0]].device)
    S, M = int(seeds), len(y_test_np)
    # [S, n_i] per shots count: the ridge probes' draws (n_i = sum_c min(shots_i, n_c), the same for every seed).
    draws = [np.stack([shot_indices(y_pool, shots=s, seed=seed, num_classes=K) for seed in range(S)]) for s in shots]
    k_used = np.array([[min(kk, idx.shape[1]) for kk in ks] for idx in draws], dtype=np.int64)  # [S, len(k)]
    y_test = torch.from_numpy(y_test_np).to(target)
    correct = torch.zeros(len(shots), len(layers), S, len(ks), dtype=torch.float64, device=target)
    rows = max(1, _SIM_ELEMENTS // (S * max(idx.shape[1] for idx in draws)))  # test rows per chunk
    for j, la in enumerate(layers):
        pools = [train[la][torch.from_numpy(idx).to(train[la].device)].to(target, torch.float64) for idx in draws]
        labels = [torch.from_numpy(y_pool[idx]).to(target) for idx in draws]  # [S, n_i] each
        for start in range(0, M, rows):
            q = test[la][start : start + rows].to(target, torch.float64)  # [m, D]
            truth = y_test[start : start + rows]  # [m]
            for i, (pool, lab) in enumerate(zip(pools, labels, strict=True)):
                pred = knn_predict(pool, lab, q, k=ks, temperature=float(temperature), num_classes=K)  # [S, k, m]
                correct[i, j] += (pred == truth).sum(-1).to(torch.float64)
    return KnnResult(
        accuracy=(correct / M).cpu().numpy(),
        k=ks,
        k_used=k_used,
        temperature=float(temperature),
        shots=shots,
        layers=tuple(int(la) for la in layers),
        seeds=tuple(range(S)),
        num_classes=K,
        num_train=len(y_pool),
        num_test=M,
        short_classes=short,
        feature=feature,
    )
