"""Few-shot linear probes by regularised least squares: the few-shot metric of the ViT paper (Dosovitskiy et al. 2020,
§4.1), following the protocol of big_vision's ``fewshot_lsr`` evaluator.

A frozen representation of ``shots`` training images per class is mapped to ``{-1, 1}^K`` targets by ridge regression
in closed form, and the probe's argmax is scored on a test split. Pure: features and labels in, accuracies out; the
features come from :mod:`vitlens.features` (cached by :mod:`vitlens.feature_cache`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from einops import rearrange

from vitlens import defaults
from vitlens.analysis._common import f64_device
from vitlens.errors import ParameterError, VitlensError

Method = Literal["auto", "primal", "dual"]

# --l2 auto searches powers of two from 2^-10 (almost no shrinkage: narrow or weak features at 10-25 shots chose the
# grid's bottom when it was 2^-2, and gained 2 points below it) up to 2^16, where the probe predicts almost only
# the class means. The fixed default (big_vision's 2**10) is vitlens.defaults.FEWSHOT_L2.
AUTO_L2_GRID: tuple[float, ...] = tuple(2.0**k for k in range(-10, 17))
# The bias is a constant feature rather than an intercept, so primal and dual are the same formula. At 100 against
# unit-variance features its weight costs λ / 100² per unit of bias: practically unregularised, as an intercept is.
BIAS_FEATURE = 100.0
# Added to the per-feature std, so that a feature constant over the shots becomes 0 rather than 0 / 0.
STD_EPS = 1e-5
_TEST_CHUNK = 8192  # test rows scored at a time: bounds the float64 copy of the test features


# --------------------------------------------------------------------------------------------------------------
# Shot selection


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Examples per class ``[K]``."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[:num_classes]


def check_shot_pool(
    labels: np.ndarray,
    *,
    shots: Sequence[int],
    num_classes: int,
    class_names: Sequence[str] | None = None,
    allow_fewer: bool = False,
) -> dict[str, int]:
    """Check that the few-shot pool has every class at least ``max(shots)`` times (before any forward pass).

    Returns:
        The classes with fewer examples than ``max(shots)``, name -> count (only when ``allow_fewer``).

    Raises:
        VitlensError: fewer than 2 classes; a class short of examples (unless ``allow_fewer``); fewer than 2 classes
            with any example.
    """
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if num_classes < 2:
        only = f" ({names[0]!r})" if names else ""
        raise VitlensError(f"few-shot probes need at least 2 classes; the data has {num_classes}{only}")
    counts = class_counts(labels, num_classes)
    most = max(shots)
    short = {names[c]: int(counts[c]) for c in np.argsort(counts, kind="stable") if counts[c] < most}
    if short and not allow_fewer:
        name, count = next(iter(short.items()))
        more = f" (and {len(short) - 1} more class{'es' if len(short) > 2 else ''})" if len(short) > 1 else ""
        raise VitlensError(
            f"class {name!r} has {count} training example{'s' if count != 1 else ''}, fewer than the {most} shots "
            f"asked for{more}; lower --shots or pass --allow-fewer"
        )
    if int((counts > 0).sum()) < 2:
        raise VitlensError("few-shot probes need training examples of at least 2 classes")
    return short


def shot_indices(labels: np.ndarray, *, shots: int, seed: int, num_classes: int) -> np.ndarray:
    """Pool indices of the few-shot training set for one seed: the first ``shots`` of each class's permutation.

    Each class's examples are permuted once per seed (``np.random.default_rng(seed)``, classes in label order), so
    for one seed the sets for growing ``shots`` are nested. A class with fewer examples gives all it has.

    Returns:
        ``[sum_c min(shots, n_c)]`` int64 indices, grouped by class.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.int64)
    parts = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in range(num_classes)]
    return np.concatenate(parts).astype(np.int64)


# --------------------------------------------------------------------------------------------------------------
# Ridge regression in closed form


@dataclass(frozen=True)
class RidgeEigen:
    """One eigendecomposition per system, from which the ridge solution for any λ is a rescaling.

    With ``X [n, d]`` and targets ``Y [n, K]`` the ridge weights are, with identical results,

        primal (n >= d):  W = (XᵀX + λI)⁻¹ XᵀY,   XᵀX = V diag(e) Vᵀ   ->  W = V diag(1/(e+λ)) VᵀXᵀY
        dual   (n <  d):  W = Xᵀ(XXᵀ + λI)⁻¹ Y,   XXᵀ = Q diag(e) Qᵀ   ->  W = XᵀQ diag(1/(e+λ)) QᵀY

    (push-through identity), so both are ``W(λ) = lhs diag(1/(e+λ)) rhs``: the ``min(n, d)``-sized decomposition is
    done once and every λ costs one matrix product. The hat matrix ``H(λ) = X (XᵀX + λI)⁻¹ Xᵀ``, needed for
    leave-one-out, has ``diag H = sum_j hat_left_ij · (X lhs)_ij / (e_j + λ)`` with ``hat_left = X V`` (primal) or
    ``Q`` (dual).
    """

    eigvals: torch.Tensor  # [B, r] eigenvalues of XᵀX or XXᵀ, clamped at 0 (r = d primal, n dual)
    lhs: torch.Tensor  # [B, d, r] V, or XᵀQ
    rhs: torch.Tensor  # [B, r, K] VᵀXᵀY, or QᵀY
    train_proj: torch.Tensor  # [B, n, r] X lhs
    hat_left: torch.Tensor  # [B, n, r] X V (= train_proj), or Q
    method: Literal["primal", "dual"]

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, *, method: Method = "auto") -> RidgeEigen:
        """Decompose systems ``x [B, n, d]``, ``y [B, n, K]`` (float64); ``auto`` is primal when ``n >= d``.

        Raises:
            ParameterError: ``method`` is not auto, primal or dual.
        """
        n, d = x.shape[-2:]
        if method == "auto":
            method = "primal" if n >= d else "dual"
        if method == "primal":
            e, v = torch.linalg.eigh(x.mT @ x)  # [B, d], [B, d, d]
            lhs, rhs = v, v.mT @ (x.mT @ y)  # [B, d, d], [B, d, K]
            train_proj = x @ v  # [B, n, d]
            hat_left = train_proj
        elif method == "dual":
            e, q = torch.linalg.eigh(x @ x.mT)  # [B, n], [B, n, n]
            lhs, rhs = x.mT @ q, q.mT @ y  # [B, d, n], [B, n, K]
            train_proj = x @ lhs  # [B, n, n] = Q diag(e)
            hat_left = q
        else:
            raise ParameterError("method", f"method must be auto, primal or dual, not {method!r}")
        return cls(e.clamp_min(0), lhs, rhs, train_proj, hat_left, method)

    def weights(self, l2: torch.Tensor) -> torch.Tensor:
        """Ridge weights ``[B, d, K]`` for one λ per system (``l2 [B]`` or a scalar)."""
        scale = 1.0 / (self.eigvals + l2.reshape(-1, 1))  # [B, r]
        return self.lhs @ (scale[..., None] * self.rhs)

    def loo(self, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Leave-one-out predictions ``[B, n, K]`` and squared errors ``[B]`` for one λ, without refitting.

        For ridge, ``ŷ₋ᵢ = (ŷᵢ - Hᵢᵢ yᵢ) / (1 - Hᵢᵢ)`` exactly, where ``ŷ = H y`` is the fit on all n.
        """
        scale = 1.0 / (self.eigvals + l2)  # [B, r]
        fitted = self.train_proj @ (scale[..., None] * self.rhs)  # [B, n, K]
        hat = (self.hat_left * self.train_proj * scale[:, None, :]).sum(-1)  # [B, n] diag of H
        pred = (fitted - hat[..., None] * y) / (1.0 - hat[..., None]).clamp_min(1e-12)
        return pred, ((pred - y) ** 2).mean(dim=(-2, -1))


def ridge_weights(
    x: torch.Tensor, y: torch.Tensor, l2: float | torch.Tensor, *, method: Method = "auto"
) -> torch.Tensor:
    """Ridge regression without intercept, ``argmin_W ||XW - Y||² + λ||W||²``, for one or a batch of systems.

    Args:
        x: ``[n, d]`` or ``[B, n, d]`` features (bias column included by the caller).
        y: ``[n, K]`` or ``[B, n, K]`` targets.
        l2: λ > 0, one for all systems or ``[B]``.
        method: ``primal``, ``dual`` or ``auto`` (primal when n >= d); the same solution up to rounding.

    Returns:
        ``[d, K]`` or ``[B, d, K]`` float64.
    """
    single = x.ndim == 2
    x64, y64 = x.to(torch.float64), y.to(torch.float64)
    if single:
        x64, y64 = x64[None], y64[None]
    lam = torch.as_tensor(l2, dtype=torch.float64, device=x64.device).expand(x64.shape[0])
    w = RidgeEigen.fit(x64, y64, method=method).weights(lam)
    return w[0] if single else w


def standardize_and_augment(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` with the constant :data:`BIAS_FEATURE` appended: ``[..., n, D] -> [..., n, D + 1]``."""
    z = (x - mean.unsqueeze(-2)) / std.unsqueeze(-2)
    return torch.cat([z, torch.full_like(z[..., :1], BIAS_FEATURE)], dim=-1)


def shot_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (ddof 0, plus :data:`STD_EPS`) over the examples of ``x [..., n, D]``: ``[..., D]`` each."""
    return x.mean(dim=-2), x.std(dim=-2, unbiased=False) + STD_EPS


# --------------------------------------------------------------------------------------------------------------
# The probe


class SeedAccuracies:
    """Mean, spread and chance level of an ``accuracy`` array with one axis of seeds (``seed_axis``): what the
    ridge probes' and the k-NN probes' results share."""

    accuracy: np.ndarray
    num_classes: int
    seed_axis = 2  # [S, L, seeds, ...]

    @property
    def mean(self) -> np.ndarray:
        """``accuracy`` averaged over seeds (the seed axis removed)."""
        return self.accuracy.mean(axis=self.seed_axis)

    @property
    def std(self) -> np.ndarray:
        """The standard deviation over seeds (ddof 0, so 0 with one seed)."""
        return self.accuracy.std(axis=self.seed_axis)

    @property
    def chance(self) -> float:
        return 1.0 / self.num_classes


@dataclass(frozen=True)
class FewShotResult(SeedAccuracies):
    """Test accuracy of ridge probes for every shots count, layer and seed (``mean`` and ``std``: ``[S, L]``)."""

    accuracy: np.ndarray  # [S, L, seeds] fraction of test images classified correctly
    shots: tuple[int, ...]  # S shots-per-class values, ascending
    layers: tuple[int, ...]  # L 0-based layers the features came from
    seeds: tuple[int, ...]  # the seeds of the shot draws (0 .. seeds-1)
    l2: np.ndarray  # [S, L] λ used; constant unless chosen by leave-one-out (l2_auto)
    l2_auto: bool  # λ chosen per (shots, layer) by leave-one-out on the training shots
    methods: tuple[str, ...]  # S: "primal" or "dual", the side the systems were solved on
    num_classes: int  # K
    num_train: int  # size of the pool the shots were drawn from
    num_test: int  # test images scored
    short_classes: dict[str, int] = field(default_factory=dict)  # classes with fewer than max(shots) examples
    feature: str = ""  # what the features are (pre-logits, cls, mean-patch), for titles and JSON

    def to_dict(self) -> dict[str, Any]:
        results = [
            {
                "shots": shots,
                "layer": layer,
                "mean": float(self.mean[i, j]),
                "std": float(self.std[i, j]),
                "per_seed": [float(a) for a in self.accuracy[i, j]],
                "l2": float(self.l2[i, j]),
                "method": self.methods[i],
            }
            for j, layer in enumerate(self.layers)
            for i, shots in enumerate(self.shots)
        ]
        return {
            "results": results,
            "shots": list(self.shots),
            "layers": list(self.layers),
            "seeds": list(self.seeds),
            "feature": self.feature,
            "l2": "auto" if self.l2_auto else float(self.l2.flat[0]),
            "l2_grid": list(AUTO_L2_GRID) if self.l2_auto else None,
            "num_classes": self.num_classes,
            "chance": self.chance,
            "num_train": self.num_train,
            "num_test": self.num_test,
            "short_classes": dict(self.short_classes),
        }


def _labels_numpy(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """``labels`` as a CPU int64 array, from numpy or from a tensor on any device."""
    if isinstance(labels, torch.Tensor):
        return labels.detach().cpu().numpy().astype(np.int64, copy=False)
    return np.asarray(labels, dtype=np.int64)


def _as_layers(feats: torch.Tensor | Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    if isinstance(feats, torch.Tensor):
        return {-1: feats}
    return dict(feats)


def _check_positive(name: str, values: Sequence[float]) -> None:
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ParameterError(name, f"{name} must be positive, got {list(values)}")


def fewshot_lsr(
    train_feats: torch.Tensor | Mapping[int, torch.Tensor],
    train_labels: np.ndarray | torch.Tensor,
    test_feats: torch.Tensor | Mapping[int, torch.Tensor],
    test_labels: np.ndarray | torch.Tensor,
    *,
    shots: Sequence[int] = defaults.FEWSHOT_SHOTS,
    seeds: int = defaults.FEWSHOT_SEEDS,
    l2: float | Literal["auto"] = defaults.FEWSHOT_L2,
    device: torch.device | str | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    allow_fewer: bool = False,
    feature: str = "",
) -> FewShotResult:
    """Few-shot accuracy of a ridge probe on frozen features (big_vision's ``fewshot_lsr`` protocol).

    For each seed and each shots count ``k``: the first ``k`` examples of each class's seeded permutation of the pool
    (:func:`shot_indices`, nested in ``k``); features standardised with those shots' mean and std; a constant bias
    feature appended; targets ``2 onehot - 1``; ridge weights in closed form (:class:`RidgeEigen`); accuracy of the
    argmax on the test set. All seeds and layers of one shots count are one batched eigendecomposition; with
    ``l2="auto"``, all λ of :data:`AUTO_L2_GRID` reuse it.

    Args:
        train_feats: the pool's features ``[N, D]``, or ``{layer: [N, D]}`` (a bare tensor is reported as layer -1).
        train_labels: ``[N]`` int class indices.
        test_feats: ``[M, D]`` or ``{layer: [M, D]}`` with the same layers.
        test_labels: ``[M]``.
        shots: examples per class.
        seeds: number of shot draws (seeds ``0 .. seeds-1``).
        l2: λ, or ``auto`` to choose it per (shots, layer) from :data:`AUTO_L2_GRID` by leave-one-out on the
            training shots (highest leave-one-out accuracy averaged over seeds, ties to the lowest squared error).
            The test set plays no part in the choice.
        device: where to solve, in float64 (default: the features' device; the CPU for MPS, which has no float64).
        num_classes: K (default: the largest label + 1).
        class_names: for error messages and ``short_classes``.
        allow_fewer: use all examples of classes with fewer than ``max(shots)`` instead of failing.
        feature: what the features are (``pre-logits``, ``cls``, ``mean-patch``), kept in the result for titles and
            JSON.

    Raises:
        ParameterError: non-positive ``shots``, ``seeds`` or ``l2``; features whose layers or shapes do not match
            each other or the labels.
        VitlensError: as :func:`check_shot_pool`; an empty test set.
    """
    shots = tuple(sorted({int(s) for s in shots}))
    _check_positive("shots", shots)
    if int(seeds) < 1:
        raise ParameterError("seeds", f"seeds must be at least 1, got {seeds}")
    l2_auto = isinstance(l2, str)
    if l2_auto and l2 != "auto":
        raise ParameterError("l2", f"l2 must be a positive number or 'auto', not {l2!r}")
    if not l2_auto:
        _check_positive("l2", [float(l2)])
    train, test = _as_layers(train_feats), _as_layers(test_feats)
    if list(train) != list(test):
        raise ParameterError("test_feats", f"test_feats has layers {list(test)}, train_feats {list(train)}")
    y_pool = _labels_numpy(train_labels)  # [N]
    y_test = torch.from_numpy(_labels_numpy(test_labels))  # [M], moved to the solve's device where it is used
    K = int(num_classes) if num_classes is not None else int(max(y_pool.max(initial=0), y_test.max().item()) + 1)
    layers = list(train)
    x_pool = [train[la].detach() for la in layers]  # L x [N, D]
    x_test = [test[la].detach() for la in layers]  # L x [M, D]
    D = x_pool[0].shape[-1]
    for a, b in zip(x_pool, x_test, strict=True):
        if a.shape != (len(y_pool), D):
            raise ParameterError(
                "train_feats",
                f"train_feats must be [{len(y_pool)}, {D}] (one row per label, one width in every layer), "
                f"not {list(a.shape)}",
            )
        if b.shape != (len(y_test), D):
            raise ParameterError(
                "test_feats",
                f"test_feats must be [{len(y_test)}, {D}] (one row per label, the width of train_feats), "
                f"not {list(b.shape)}",
            )
    if len(y_test) == 0:
        raise VitlensError("the test set is empty")
    if y_pool.min(initial=0) < 0 or y_pool.max(initial=0) >= K or y_test.min() < 0 or y_test.max() >= K:
        raise VitlensError(f"labels must be class indices 0..{K - 1}; the data has unlabelled or unknown classes")
    short = check_shot_pool(y_pool, shots=shots, num_classes=K, class_names=class_names, allow_fewer=allow_fewer)

    target = f64_device(torch.device(device) if device is not None else x_pool[0].device)
    L = len(layers)
    S = int(seeds)
    chosen_l2 = np.zeros((len(shots), L))
    methods: list[str] = []
    probes: list[tuple[torch.Tensor, torch.Tensor]] = []  # per shots count: weights [L, S, D, K], bias [L, S, K]
    grid = torch.tensor(AUTO_L2_GRID if l2_auto else [float(l2)], dtype=torch.float64, device=target)
    for i, k in enumerate(shots):
        idx = np.stack([shot_indices(y_pool, shots=k, seed=s, num_classes=K) for s in range(S)])
        # [S, n]: n = sum_c min(k, n_c) is the same for every seed, so the seeds stack without padding.
        x = torch.stack([f[torch.as_tensor(idx, device=f.device)] for f in x_pool]).to(target, torch.float64)
        # x: [L, S, n, D]
        mean, std = shot_statistics(x)  # [L, S, D] each: the training shots only
        x = standardize_and_augment(x, mean, std).flatten(0, 1)  # [L*S, n, D+1]
        labels = torch.as_tensor(y_pool[idx], device=target)  # [S, n]
        y = 2.0 * torch.nn.functional.one_hot(labels, K).to(torch.float64) - 1.0  # [S, n, K] in {-1, 1}
        y = y.repeat(L, 1, 1)  # [L*S, n, K], layer-major like x
        eig = RidgeEigen.fit(x, y)
        methods.append(eig.method)
        lam = _choose_l2(eig, y, labels.repeat(L, 1), grid, L, S) if l2_auto else grid.expand(L)  # [L]
        chosen_l2[i] = lam.cpu().numpy()
        w = eig.weights(lam.repeat_interleave(S))  # [L*S, D+1, K]
        w = w.unflatten(0, (L, S))  # [L, S, D+1, K]
        # Fold the standardisation into the weights, so that the test set is never copied per seed:
        # ((x - m) / s) W + c w_b  =  x (W / s) + (c w_b - (m / s) W).
        w_feat = w[..., :D, :] / std[..., None]  # [L, S, D, K]
        bias = BIAS_FEATURE * w[..., D, :] - ((mean / std)[..., None] * w[..., :D, :]).sum(-2)  # [L, S, K]
        probes.append((w_feat, bias))
    # Every probe of every shots count and seed is scored in one pass over the test set.
    w_all = torch.cat([w for w, _ in probes], dim=1)  # [L, len(shots) * S, D, K]
    b_all = torch.cat([b for _, b in probes], dim=1)  # [L, len(shots) * S, K]
    accuracy = _test_accuracy(x_test, y_test, w_all, b_all, target).reshape(L, len(shots), S).transpose(1, 0, 2)
    return FewShotResult(
        accuracy=accuracy,
        shots=shots,
        layers=tuple(int(la) for la in layers),
        seeds=tuple(range(S)),
        l2=chosen_l2,
        l2_auto=l2_auto,
        methods=tuple(methods),
        num_classes=K,
        num_train=len(y_pool),
        num_test=len(y_test),
        short_classes=short,
        feature=feature,
    )


def _choose_l2(
    eig: RidgeEigen, y: torch.Tensor, labels: torch.Tensor, grid: torch.Tensor, L: int, S: int
) -> torch.Tensor:
    """λ per layer from ``grid``: best leave-one-out accuracy on the training shots, averaged over seeds.

    Ties (common at few shots: at 1 shot the held-out class has no other example, so no λ gets it right) go to the
    lowest leave-one-out squared error. The standardisation statistics include the held-out example: a small
    optimism, the same for every λ, within the training set.
    """
    acc = torch.zeros(len(grid), L, dtype=torch.float64, device=grid.device)
    err = torch.zeros_like(acc)
    for g, lam in enumerate(grid.tolist()):
        pred, sq = eig.loo(y, lam)  # [L*S, n, K], [L*S]
        hits = (pred.argmax(-1) == labels).to(torch.float64).mean(-1)  # [L*S]
        acc[g] = hits.unflatten(0, (L, S)).mean(-1)
        err[g] = sq.unflatten(0, (L, S)).mean(-1)
    best = []
    for layer in range(L):
        a, e = acc[:, layer].cpu().numpy(), err[:, layer].cpu().numpy()
        best.append(int(np.lexsort((e, -a))[0]))
    return grid[torch.tensor(best, device=grid.device)]


def _test_accuracy(
    x_test: Sequence[torch.Tensor], y_test: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, device: torch.device
) -> np.ndarray:
    """Fraction of test rows whose argmax score is their label, ``[L, P]`` for ``P`` probes per layer.

    ``x_test`` (L x ``[M, D]``) stays where it is (float32, usually the CPU); one layer's chunk of rows at a time is
    moved and cast, so memory holds ``_TEST_CHUNK x D`` float64 values whatever the test set's size.
    """
    L, M = len(x_test), len(y_test)
    correct = torch.zeros(L, w.shape[1], dtype=torch.float64, device=device)
    y = y_test.to(device)
    for layer in range(L):
        flat_w = rearrange(w[layer], "p d k -> d (p k)")  # all probes of a layer in one matrix product
        for start in range(0, M, _TEST_CHUNK):
            xs = x_test[layer][start : start + _TEST_CHUNK].to(device, torch.float64)  # [m, D]
            scores = rearrange(xs @ flat_w, "m (p k) -> p m k", k=w.shape[-1]) + bias[layer, :, None, :]  # [P, m, K]
            correct[layer] += (scores.argmax(-1) == y[start : start + _TEST_CHUNK]).to(torch.float64).sum(-1)
    return (correct / M).cpu().numpy()
