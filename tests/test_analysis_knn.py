"""Weighted k-NN probes (DINO's eval_knn): the vote against loops written out and scikit-learn, ties, k capped at the
pool, the ridge probes' shot sets, and chunking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

import vitlens.analysis.fewshot as fewshot_module
import vitlens.analysis.knn as knn_module
from vitlens.analysis.fewshot import fewshot_lsr
from vitlens.analysis.knn import check_k, fewshot_knn, knn_predict
from vitlens.errors import ParameterError

T = 0.07


def _blobs(per_class: int, num_classes: int, dim: int, *, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (num_classes, dim))
    labels = np.repeat(np.arange(num_classes), per_class)
    return (centres[labels] + spread * rng.normal(0, 1, (len(labels), dim))).astype(np.float32), labels


def _plain_knn(pool: np.ndarray, labels: np.ndarray, queries: np.ndarray, *, k: int, T: float, K: int) -> list[int]:
    """DINO's vote written out: one query at a time, the k most similar, exp(sim / T) summed per class."""
    predictions = []
    for q in queries.astype(np.float64):
        qn = q / math.sqrt(float(q @ q))
        sims = [float(qn @ (x / math.sqrt(float(x @ x)))) for x in pool.astype(np.float64)]
        nearest = np.argsort(-np.asarray(sims), kind="stable")[: min(k, len(pool))]
        votes = [0.0] * K
        for i in nearest:
            votes[int(labels[i])] += math.exp(sims[i] / T)
        predictions.append(max(range(K), key=lambda c: (votes[c], -c)))  # ties to the lowest class
    return predictions


@pytest.mark.parametrize("k", [1, 3, 10, 40])
def test_knn_predict_equals_the_plain_vote_and_sklearn(k):
    x, y = _blobs(6, 4, 5, spread=1.2, seed=k)  # 24 pool rows: k = 40 is capped at 24
    q, _ = _blobs(5, 4, 5, spread=1.2, seed=100 + k)
    pred = knn_predict(
        torch.tensor(x, dtype=torch.float64)[None],
        torch.tensor(y)[None],
        torch.tensor(q, dtype=torch.float64),
        k=[k],
        temperature=T,
        num_classes=4,
    )  # [1, 1, m]
    plain = _plain_knn(x, y, q, k=k, T=T, K=4)
    assert pred[0, 0].tolist() == plain
    # scikit-learn with cosine distance d = 1 - sim, so DINO's weight exp(sim / T) is exp((1 - d) / T).
    sk = KNeighborsClassifier(n_neighbors=min(k, len(x)), metric="cosine", algorithm="brute")
    sk.set_params(weights=lambda d: np.exp((1.0 - d) / T))
    assert sk.fit(x.astype(np.float64), y).predict(q.astype(np.float64)).tolist() == plain
    assert len(set(plain)) > 1  # not a degenerate case


def test_a_batch_of_pools_and_several_k_are_each_their_own_vote():
    pools = [_blobs(5, 3, 4, spread=1.5, seed=s) for s in range(3)]
    q, _ = _blobs(4, 3, 4, spread=1.5, seed=9)
    x = torch.tensor(np.stack([p for p, _ in pools]), dtype=torch.float64)  # [3, 15, 4]
    y = torch.tensor(np.stack([lab for _, lab in pools]))  # [3, 15]
    pred = knn_predict(x, y, torch.tensor(q, dtype=torch.float64), k=[1, 5, 15, 200], temperature=T, num_classes=3)
    assert pred.shape == (3, 4, 12)
    for p, (px, py) in enumerate(pools):
        for c, kk in enumerate([1, 5, 15, 200]):
            assert pred[p, c].tolist() == _plain_knn(px, py, q, k=kk, T=T, K=3)
    np.testing.assert_array_equal(pred[:, 2], pred[:, 3])  # 200 is capped at the 15 pool rows


def test_ties_go_to_the_lowest_class_and_scale_does_not_matter():
    # The query is equally similar to a class-1 and a class-0 row: equal votes, class 0 wins whatever the order.
    for labels in ([1, 0], [0, 1]):
        pred = knn_predict(
            torch.tensor([[[3.0, 0.0], [0.0, 0.5]]], dtype=torch.float64),  # norms differ: cosine ignores them
            torch.tensor([labels]),
            torch.tensor([[1.0, 1.0]], dtype=torch.float64),
            k=[2],
            temperature=T,
            num_classes=2,
        )
        assert pred.item() == 0


def test_temperature_limits_are_one_nn_and_majority_vote():
    x, y = _blobs(8, 3, 6, spread=2.0, seed=3)
    q, _ = _blobs(10, 3, 6, spread=2.0, seed=4)
    args = (torch.tensor(x, dtype=torch.float64)[None], torch.tensor(y)[None], torch.tensor(q, dtype=torch.float64))
    # T -> 0: the nearest row alone decides (exp(sim / T) alone would overflow: the votes are shifted by the max).
    cold = knn_predict(*args, k=[10], temperature=1e-6, num_classes=3)
    one_nn = KNeighborsClassifier(n_neighbors=1, metric="cosine", algorithm="brute").fit(x, y).predict(q)
    assert cold[0, 0].tolist() == one_nn.tolist()
    # T -> infinity: every neighbour weighs the same, a plain majority vote of the k nearest (two classes and an
    # odd k, so that no vote is tied and left to rounding).
    two = y % 2
    hot = knn_predict(args[0], torch.tensor(two)[None], args[2], k=[7], temperature=1e9, num_classes=2)
    majority = KNeighborsClassifier(n_neighbors=7, metric="cosine", algorithm="brute").fit(x, two).predict(q)
    assert hot[0, 0].tolist() == majority.tolist()


def _two_layers(seed: int):
    x_pool, y_pool = _blobs(12, 4, 8, spread=1.5, seed=seed)
    x_test, y_test = _blobs(6, 4, 8, spread=1.5, seed=seed + 1)
    noisy = np.random.default_rng(seed).normal(0, 1, x_pool.shape[1:])  # a second "layer": shifted features
    train = {0: torch.tensor(x_pool), 3: torch.tensor(x_pool + noisy, dtype=torch.float32)}
    test = {0: torch.tensor(x_test), 3: torch.tensor(x_test + noisy, dtype=torch.float32)}
    return train, y_pool, test, y_test


def test_fewshot_knn_is_the_vote_on_each_seeds_shots():
    train, y_pool, test, y_test = _two_layers(0)
    result = fewshot_knn(train, y_pool, test, y_test, shots=(1, 3, 12), seeds=2, k=(1, 5, 20), num_classes=4)
    assert result.accuracy.shape == (3, 2, 2, 3) and result.layers == (0, 3) and result.k == (1, 5, 20)
    # 1 shot of 4 classes: a pool of 4, so k = 5 and 20 use 4; 3 shots: 12; 12 shots: the whole pool of 48.
    np.testing.assert_array_equal(result.k_used, [[1, 4, 4], [1, 5, 12], [1, 5, 20]])
    np.testing.assert_array_equal(result.accuracy[0, :, :, 1], result.accuracy[0, :, :, 2])
    for i, shots in enumerate(result.shots):
        for j, layer in enumerate(result.layers):
            for seed in result.seeds:
                rng = np.random.default_rng(seed)  # the ridge probes' draw, written out
                idx = np.concatenate([rng.permutation(np.flatnonzero(y_pool == c))[:shots] for c in range(4)])
                for c, kk in enumerate(result.k):
                    plain = _plain_knn(train[layer].numpy()[idx], y_pool[idx], test[layer].numpy(), k=kk, T=T, K=4)
                    expected = float(np.mean(np.asarray(plain) == y_test))
                    assert result.accuracy[i, j, seed, c] == pytest.approx(expected, abs=1e-12)
    entry = result.to_dict()
    assert entry["k"] == [1, 5, 20] and entry["temperature"] == T and len(entry["results"]) == 3 * 2 * 3
    first = entry["results"][1]
    assert (first["shots"], first["layer"], first["k"], first["k_used"]) == (1, 0, 5, 4)
    assert first["mean"] == pytest.approx(np.mean(first["per_seed"]))


def test_the_shot_sets_are_the_ridge_probes(monkeypatch):
    drawn: dict[str, list] = {"lsr": [], "knn": []}
    original = fewshot_module.shot_indices

    def recorder(name):
        def record(labels, *, shots, seed, num_classes):
            idx = original(labels, shots=shots, seed=seed, num_classes=num_classes)
            drawn[name].append((shots, seed, idx.tolist()))
            return idx

        return record

    monkeypatch.setattr(fewshot_module, "shot_indices", recorder("lsr"))
    monkeypatch.setattr(knn_module, "shot_indices", recorder("knn"))
    train, y_pool, test, y_test = _two_layers(5)
    options = {"shots": (2, 5), "seeds": 3, "num_classes": 4}
    fewshot_lsr(train, y_pool, test, y_test, **options)
    fewshot_knn(train, y_pool, test, y_test, **options)
    assert len(drawn["knn"]) == 2 * 3 and sorted(drawn["knn"]) == sorted(drawn["lsr"])


def test_chunks_of_test_rows_do_not_change_the_result(monkeypatch):
    train, y_pool, test, y_test = _two_layers(7)
    options = {"shots": (1, 4), "seeds": 2, "k": (3, 10), "num_classes": 4}
    whole = fewshot_knn(train, y_pool, test, y_test, **options)
    monkeypatch.setattr(knn_module, "_SIM_ELEMENTS", 5)  # one test row per chunk
    np.testing.assert_array_equal(fewshot_knn(train, y_pool, test, y_test, **options).accuracy, whole.accuracy)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [({"k": (0, 10)}, "k"), ({"k": "a"}, "k"), ({"k": ()}, "k"), ({"temperature": 0.0}, "temperature")],
)
def test_bad_options_name_their_parameter(kwargs, param):
    train, y_pool, test, y_test = _two_layers(1)
    with pytest.raises(ParameterError) as info:
        fewshot_knn(train, y_pool, test, y_test, shots=(1,), seeds=1, **kwargs)
    assert info.value.param == param


def test_check_k_parses_strings_and_sorts():
    assert check_k("20,10,20") == (10, 20) and check_k(5) == (5,) and check_k([200, 10]) == (10, 200)
    with pytest.raises(ParameterError, match="k must be positive integers"):
        check_k([True])
