"""Few-shot ridge probes: the solver against scikit-learn and explicit refits, the protocol, features, and the cache."""

from __future__ import annotations

import itertools
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import Ridge

from tests.conftest import make_vit, save_fixture
from vitlens.analysis.fewshot import (
    AUTO_L2_GRID,
    BIAS_FEATURE,
    RidgeEigen,
    check_shot_pool,
    fewshot_lsr,
    ridge_weights,
    shot_indices,
    shot_statistics,
    standardize_and_augment,
)
from vitlens.data import open_dataset
from vitlens.errors import ParameterError, VitlensError
from vitlens.feature_cache import cache_path, cached_features, feature_cache_key
from vitlens.features import extract_features
from vitlens.layout import Preprocess
from vitlens.models import ViT, load_vit


def _blobs(per_class: int, num_classes: int, dim: int, *, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs: class ``c`` around a random centre, ``spread`` its std; rows grouped by class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (num_classes, dim))
    labels = np.repeat(np.arange(num_classes), per_class)
    return (centres[labels] + spread * rng.normal(0, 1, (len(labels), dim))).astype(np.float32), labels


def _reference_fewshot(x_pool, y_pool, x_test, y_test, *, shots, seed, num_classes, l2):
    """The protocol written plainly with numpy and scikit-learn, for one shots count and seed."""
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.permutation(np.flatnonzero(y_pool == c))[:shots] for c in range(num_classes)])
    x = x_pool[idx].astype(np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-5
    augment = lambda a: np.hstack([(a - mean) / std, np.full((len(a), 1), 100.0)])  # noqa: E731
    targets = 2.0 * np.eye(num_classes)[y_pool[idx]] - 1.0
    ridge = Ridge(alpha=l2, fit_intercept=False, solver="svd").fit(augment(x), targets)
    return float((ridge.predict(augment(x_test.astype(np.float64))).argmax(1) == y_test).mean())


# --------------------------------------------------------------------------------------------------------------
# The solver


@pytest.mark.parametrize(("n", "d"), [(40, 9), (9, 40), (12, 12)])
@pytest.mark.parametrize("method", ["primal", "dual", "auto"])
def test_ridge_matches_sklearn_on_whitened_augmented_features(n, d, method):
    rng = np.random.default_rng(n * d)
    x = torch.tensor(rng.normal(3, 2, (n, d)))
    y = torch.tensor(2.0 * np.eye(4)[rng.integers(0, 4, n)] - 1.0)
    mean, std = shot_statistics(x)
    xa = standardize_and_augment(x, mean, std)  # [n, d + 1]
    assert xa.shape == (n, d + 1) and torch.all(xa[:, -1] == BIAS_FEATURE)
    np.testing.assert_allclose(xa[:, :d].mean(0), 0, atol=1e-12)
    for lam in (0.3, 1024.0):
        expected = Ridge(alpha=lam, fit_intercept=False, solver="svd").fit(xa.numpy(), y.numpy()).coef_.T
        np.testing.assert_allclose(ridge_weights(xa, y, lam, method=method).numpy(), expected, rtol=1e-7, atol=1e-9)


def test_primal_and_dual_agree_on_a_batch_and_auto_picks_the_smaller_side():
    g = torch.Generator().manual_seed(0)
    for n, d in [(30, 7), (7, 30)]:
        x = torch.randn(5, n, d, generator=g, dtype=torch.float64)
        y = torch.randn(5, n, 3, generator=g, dtype=torch.float64)
        lam = torch.tensor([0.25, 1.0, 4.0, 64.0, 4096.0], dtype=torch.float64)
        primal = ridge_weights(x, y, lam, method="primal")
        dual = ridge_weights(x, y, lam, method="dual")
        torch.testing.assert_close(primal, dual, rtol=1e-8, atol=1e-10)
        assert RidgeEigen.fit(x, y).method == ("primal" if n >= d else "dual")
        # The batch solves each system with its own λ.
        single = ridge_weights(x[3], y[3], 64.0)
        torch.testing.assert_close(primal[3], single, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(("n", "d"), [(20, 6), (8, 15)])
def test_leave_one_out_equals_refitting_without_each_example(n, d):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (n, d))
    y = 2.0 * np.eye(3)[rng.integers(0, 3, n)] - 1.0
    lam = 2.0
    eig = RidgeEigen.fit(torch.tensor(x)[None], torch.tensor(y)[None])
    pred, sq = eig.loo(torch.tensor(y)[None], lam)
    expected = np.stack(
        [
            x[i]
            @ Ridge(alpha=lam, fit_intercept=False, solver="svd").fit(np.delete(x, i, 0), np.delete(y, i, 0)).coef_.T
            for i in range(n)
        ]
    )
    np.testing.assert_allclose(pred[0].numpy(), expected, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(float(sq[0]), ((expected - y) ** 2).mean(), rtol=1e-7)


# --------------------------------------------------------------------------------------------------------------
# The protocol


def test_shots_are_seeded_nested_and_per_class():
    labels = np.repeat(np.arange(4), [30, 12, 25, 9])
    rng = np.random.default_rng(5)
    labels = labels[rng.permutation(len(labels))]
    for seed in range(3):
        sets = [shot_indices(labels, shots=k, seed=seed, num_classes=4) for k in (1, 5, 9)]
        np.testing.assert_array_equal(sets[1], shot_indices(labels, shots=5, seed=seed, num_classes=4))
        for small, big in itertools.pairwise(sets):
            assert set(small) < set(big)
        assert np.bincount(labels[sets[1]], minlength=4).tolist() == [5, 5, 5, 5]
        assert len(set(sets[2])) == len(sets[2]) == 36
    assert not np.array_equal(
        shot_indices(labels, shots=5, seed=0, num_classes=4), shot_indices(labels, shots=5, seed=1, num_classes=4)
    )
    # A class with fewer examples gives all it has.
    assert np.bincount(labels[shot_indices(labels, shots=20, seed=0, num_classes=4)]).tolist() == [20, 12, 20, 9]


def test_fewshot_matches_a_plain_sklearn_reference():
    x, y = _blobs(50, 5, 12, spread=1.2, seed=0)
    x_pool, y_pool, x_test, y_test = x[::2], y[::2], x[1::2], y[1::2]  # 25 and 25 per class, same centres
    shots, l2 = (1, 3, 10), 16.0
    result = fewshot_lsr(
        torch.tensor(x_pool), y_pool, torch.tensor(x_test), y_test, shots=shots, seeds=3, l2=l2, num_classes=5
    )
    assert result.accuracy.shape == (3, 1, 3) and result.layers == (-1,) and result.seeds == (0, 1, 2)
    assert result.methods == ("dual", "primal", "primal")  # 5, 15 and 50 examples against 13 features
    for i, k in enumerate(shots):
        for seed in range(3):
            expected = _reference_fewshot(x_pool, y_pool, x_test, y_test, shots=k, seed=seed, num_classes=5, l2=l2)
            assert result.accuracy[i, 0, seed] == pytest.approx(expected, abs=1e-12)
    assert 0.2 < result.mean[0, 0] < result.mean[-1, 0]  # more shots help on noisy blobs

    # Unequal classes (--allow-fewer): the bias now matters, as the targets' means differ between classes.
    keep = (y_pool != 0) | (np.cumsum(y_pool == 0) <= 2)
    short = fewshot_lsr(
        torch.tensor(x_pool[keep]), y_pool[keep], torch.tensor(x_test), y_test, shots=(10,), l2=l2, allow_fewer=True
    )
    assert short.short_classes == {"0": 2}
    for seed in range(3):
        expected = _reference_fewshot(
            x_pool[keep], y_pool[keep], x_test, y_test, shots=10, seed=seed, num_classes=5, l2=l2
        )
        assert short.accuracy[0, 0, seed] == pytest.approx(expected, abs=1e-12)


def test_separable_data_is_classified_perfectly_on_every_layer():
    x, y = _blobs(40, 6, 16, spread=0.01, seed=2)
    train = {0: torch.tensor(x[::2]), 3: torch.tensor(-x[::2])}
    test = {0: torch.tensor(x[1::2]), 3: torch.tensor(-x[1::2])}
    result = fewshot_lsr(train, y[::2], test, y[1::2], shots=(1, 5), seeds=2)
    assert result.layers == (0, 3)
    np.testing.assert_array_equal(result.accuracy, 1.0)
    assert result.chance == pytest.approx(1 / 6) and result.num_classes == 6
    d = result.to_dict()
    assert len(d["results"]) == 2 * 2 and d["l2"] == 1024.0 and d["chance"] == pytest.approx(1 / 6)
    assert {(r["shots"], r["layer"]) for r in d["results"]} == {(1, 0), (5, 0), (1, 3), (5, 3)}
    assert all(r["per_seed"] == [1.0, 1.0] and r["mean"] == 1.0 and r["std"] == 0.0 for r in d["results"])


def test_standardisation_uses_the_training_shots_only():
    # One feature: class 0 near 0, class 1 near 1 in the pool; the test set is the same two classes shifted by +10.
    # Standardised with the shots' statistics, every test point lies far on class 1's side (accuracy 1/2); with the
    # test set's own statistics it would be separated perfectly.
    rng = np.random.default_rng(0)
    y_pool = np.repeat([0, 1], 20)
    x_pool = (y_pool + 0.05 * rng.normal(size=40)).astype(np.float32)[:, None]
    y_test = np.repeat([0, 1], 10)
    x_test = (10.0 + y_test + 0.05 * rng.normal(size=20)).astype(np.float32)[:, None]
    result = fewshot_lsr(torch.tensor(x_pool), y_pool, torch.tensor(x_test), y_test, shots=(5,), seeds=3, l2=1.0)
    np.testing.assert_array_equal(result.accuracy, 0.5)
    centred = (x_test - x_test.mean()) / x_test.std()
    with_test_stats = fewshot_lsr(torch.tensor(x_pool), y_pool, torch.tensor(centred), y_test, shots=(5,), l2=1.0)
    assert with_test_stats.mean[0, 0] == 1.0  # the answer the test statistics would have given


def test_auto_l2_is_chosen_by_leave_one_out_on_the_shots_and_never_sees_the_test_set():
    x_pool, y_pool = _blobs(12, 3, 8, spread=1.5, seed=3)
    x_test, y_test = _blobs(10, 3, 8, spread=1.5, seed=4)
    shots, seeds = (2, 6), 3
    result = fewshot_lsr(
        torch.tensor(x_pool), y_pool, torch.tensor(x_test), y_test, shots=shots, seeds=seeds, l2="auto"
    )
    assert result.l2_auto and result.to_dict()["l2"] == "auto" and result.l2.shape == (2, 1)
    assert set(result.l2.ravel()) <= set(AUTO_L2_GRID)

    # Reference: refit without each training shot (statistics of all shots, as documented), for every λ.
    for i, k in enumerate(shots):
        acc = np.zeros(len(AUTO_L2_GRID))
        err = np.zeros(len(AUTO_L2_GRID))
        for seed in range(seeds):
            idx = shot_indices(y_pool, shots=k, seed=seed, num_classes=3)
            x = x_pool[idx].astype(np.float64)
            xa = np.hstack([(x - x.mean(0)) / (x.std(0) + 1e-5), np.full((len(x), 1), BIAS_FEATURE)])
            t = 2.0 * np.eye(3)[y_pool[idx]] - 1.0
            for g, lam in enumerate(AUTO_L2_GRID):
                pred = np.stack(
                    [
                        xa[j]
                        @ np.linalg.solve(
                            np.delete(xa, j, 0).T @ np.delete(xa, j, 0) + lam * np.eye(9),
                            np.delete(xa, j, 0).T @ np.delete(t, j, 0),
                        )
                        for j in range(len(idx))
                    ]
                )
                acc[g] += (pred.argmax(1) == y_pool[idx]).mean() / seeds
                err[g] += ((pred - t) ** 2).mean() / seeds
        best = np.lexsort((err, -np.round(acc, 12)))[0]
        assert result.l2[i, 0] == AUTO_L2_GRID[best]

    # Other test labels and other test features: other accuracies, the same λ.
    rng = np.random.default_rng(0)
    other = fewshot_lsr(
        torch.tensor(x_pool),
        y_pool,
        torch.tensor(rng.normal(size=x_test.shape).astype(np.float32)),
        rng.permutation(y_test),
        shots=shots,
        seeds=seeds,
        l2="auto",
    )
    np.testing.assert_array_equal(other.l2, result.l2)
    assert not np.array_equal(other.accuracy, result.accuracy)


def test_pool_checks_name_the_class_and_allow_fewer_uses_what_there_is():
    labels = np.repeat([0, 1, 2], [10, 3, 7])
    names = ["cat", "dog", "eel"]
    with pytest.raises(VitlensError, match=r"class 'dog' has 3 training examples, fewer than the 8 shots") as info:
        check_shot_pool(labels, shots=(1, 8), num_classes=3, class_names=names)
    assert "(and 1 more class)" in str(info.value) and "--allow-fewer" in str(info.value)
    assert check_shot_pool(labels, shots=(1, 8), num_classes=3, class_names=names, allow_fewer=True) == {
        "dog": 3,
        "eel": 7,
    }
    with pytest.raises(VitlensError, match="at least 2 classes; the data has 1 .'cat'."):
        check_shot_pool(np.zeros(5, dtype=int), shots=(1,), num_classes=1, class_names=["cat"])

    x, _ = _blobs(10, 3, 4, spread=0.1, seed=0)
    x = x[: len(labels)]
    with pytest.raises(VitlensError, match="class '1' has 3 training examples"):
        fewshot_lsr(torch.tensor(x), labels, torch.tensor(x), labels, shots=(8,))
    result = fewshot_lsr(torch.tensor(x), labels, torch.tensor(x), labels, shots=(1, 8), seeds=2, allow_fewer=True)
    assert result.short_classes == {"1": 3, "2": 7} and result.to_dict()["short_classes"] == {"1": 3, "2": 7}


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"shots": (0, 5)}, "shots must be positive"),
        ({"seeds": 0}, "seeds must be at least 1"),
        ({"l2": -1.0}, "l2 must be positive"),
        ({"l2": float("nan")}, "l2 must be positive"),
        ({"l2": "best"}, "l2 must be a positive number or 'auto'"),
    ],
)
def test_bad_options_are_parameter_errors(kwargs, needle):
    x, y = _blobs(6, 2, 3, spread=0.1, seed=0)
    with pytest.raises(ParameterError, match="^" + needle) as info:
        fewshot_lsr(torch.tensor(x), y, torch.tensor(x), y, **{"shots": (1,), **kwargs})
    assert info.value.param == next(iter(kwargs))


# --------------------------------------------------------------------------------------------------------------
# Features


@pytest.fixture
def loaded(tmp_path):
    """(ViT with a file identity, 24 digits images) for the reg fixture."""
    vit = load_vit(save_fixture(tmp_path, "reg"), num_heads=3, device="cpu")
    return vit, open_dataset("digits", vit.preprocess, split="train", num_images=24)


def _in_memory(name: str) -> ViT:
    """A fixture model wrapped directly, with no file behind it (so no identity)."""
    model = make_vit(name)
    return ViT(model, Preprocess(img_size=tuple(model.patch_embed.img_size)))


def _count_forward(vit: ViT) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    vit.model.patch_embed.register_forward_hook(hook)
    return calls


def _reference_tokens(vit: ViT, dataset):
    """The images and timm's own per-block outputs as (patch tokens, prefix tokens or None) per block."""
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        out = vit.model.forward_intermediates(
            images, indices=[0, 1], return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True
        )
    return images, [item if isinstance(item, tuple) else (item, None) for item in out]


@pytest.mark.parametrize("name", ["reg", "gap"])
def test_features_of_several_layers_come_from_one_forward_pass(tmp_path, name):
    vit = _in_memory(name)
    dataset = open_dataset("digits", vit.preprocess, num_images=20)
    calls = _count_forward(vit)
    images, intermediates = _reference_tokens(vit, dataset)  # timm's own per-block outputs, patches and prefix apart
    calls[0] = 0
    mean_patch = extract_features(vit, dataset, layers=[0, -1], feature="mean-patch", batch_size=8)
    assert calls[0] == 3  # ceil(20 / 8) batches, not one pass per layer
    assert list(mean_patch) == [0, 1] and mean_patch[0].shape == (20, 48) and mean_patch[0].dtype == torch.float32
    for layer, (patches, _prefix) in enumerate(intermediates):
        torch.testing.assert_close(mean_patch[layer], patches.mean(1), rtol=1e-5, atol=1e-5)
    if name == "reg":
        cls = extract_features(vit, dataset, layers=[1], feature="cls", batch_size=7)
        torch.testing.assert_close(cls[1], intermediates[1][1][:, 0], rtol=1e-5, atol=1e-5)
        pre = extract_features(vit, dataset, feature="pre-logits", batch_size=64)
        with torch.no_grad():  # token pooling: the class token after the final norm
            (_, prefix), *_ = vit.model.forward_intermediates(
                images, indices=[1], norm=True, return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True
            )
        assert list(pre) == [1]
        torch.testing.assert_close(pre[1], prefix[:, 0], rtol=1e-5, atol=1e-5)
    assert all(not block._forward_hooks for block in vit.blocks())


def test_feature_options_are_checked(loaded):
    vit, dataset = loaded
    gap_vit = _in_memory("gap")  # the model without a class token
    with pytest.raises(VitlensError, match="no class token .*; use --feature mean-patch"):
        extract_features(gap_vit, dataset, layers=[0], feature="cls")
    with pytest.raises(ParameterError, match=r"^layers \[0\] need feature cls or mean-patch: pre-logits exist") as e:
        extract_features(vit, dataset, layers=[0], feature="pre-logits")
    assert e.value.param == "layers"
    with pytest.raises(ParameterError, match="^layers: layer 5 is out of range") as e:
        extract_features(vit, dataset, layers=[5], feature="mean-patch")
    assert e.value.param == "layers"
    with pytest.raises(ParameterError, match="^feature must be one of pre-logits, cls, mean-patch, not 'mean'") as e:
        extract_features(vit, dataset, feature="mean")
    assert e.value.param == "feature"


def test_gap_is_a_deprecated_alias_of_mean_patch(loaded, tmp_path, vitlens_warnings):
    vit, dataset = loaded
    new = extract_features(vit, dataset, layers=[0], feature="mean-patch")
    assert vitlens_warnings == []
    old = extract_features(vit, dataset, layers=[0], feature="gap")
    assert vitlens_warnings == ["feature 'gap' is deprecated; use 'mean-patch' (the same features)"]  # once
    torch.testing.assert_close(old[0], new[0], rtol=0, atol=0)
    # One cache entry for both names, keyed by the new one.
    cache = tmp_path / "cache"
    assert cached_features(vit, dataset, layers=[0], feature="gap", cache_dir=cache)[1] == "miss"
    assert cached_features(vit, dataset, layers=[0], feature="mean-patch", cache_dir=cache)[1] == "hit"
    key = feature_cache_key(vit, dataset, layers=[0], feature="gap")
    assert key["feature"] == "mean-patch"
    assert key == feature_cache_key(vit, dataset, layers=[0], feature="mean-patch")


def test_hooks_are_removed_when_the_forward_raises(loaded):
    vit, dataset = loaded

    def boom(done, total):
        if done:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        extract_features(vit, dataset, layers=[0, 1], feature="mean-patch", batch_size=8, progress=boom)
    assert all(not block._forward_hooks for block in vit.blocks())


# --------------------------------------------------------------------------------------------------------------
# The cache


def test_cache_hit_does_no_forward_pass(tmp_path, loaded):
    vit, dataset = loaded
    calls = _count_forward(vit)
    opts = {"layers": [0, 1], "feature": "mean-patch", "cache_dir": tmp_path / "cache", "batch_size": 8}
    first, status = cached_features(vit, dataset, **opts)
    assert status == "miss" and calls[0] == 3
    second, status = cached_features(vit, dataset, **opts)
    assert status == "hit" and calls[0] == 3
    for layer in (0, 1):
        torch.testing.assert_close(first[layer], second[layer], rtol=0, atol=0)
    _, status = cached_features(vit, dataset, **opts, use_cache=False)
    assert status == "off" and calls[0] == 6
    assert len(list((tmp_path / "cache").iterdir())) == 1  # written atomically: no temporary files left


def test_cache_misses_when_the_model_data_or_layers_change(tmp_path, loaded):
    vit, dataset = loaded
    cache = tmp_path / "cache"
    cached_features(vit, dataset, layers=[1], feature="cls", cache_dir=cache)
    other_model = load_vit(save_fixture(tmp_path / "..", "reg", make_vit("reg", seed=1)), num_heads=3, device="cpu")
    other_data = open_dataset("digits", vit.preprocess, split="train", num_images=25)
    test_split = open_dataset("digits", vit.preprocess, split="test", num_images=24)
    assert cached_features(other_model, dataset, layers=[1], feature="cls", cache_dir=cache)[1] == "miss"
    assert cached_features(vit, other_data, layers=[1], feature="cls", cache_dir=cache)[1] == "miss"
    assert cached_features(vit, test_split, layers=[1], feature="cls", cache_dir=cache)[1] == "miss"
    assert cached_features(vit, dataset, layers=[0, 1], feature="cls", cache_dir=cache)[1] == "miss"
    assert cached_features(vit, dataset, layers=[1], feature="mean-patch", cache_dir=cache)[1] == "miss"
    assert cached_features(vit, dataset, layers=[1], feature="cls", cache_dir=cache)[1] == "hit"
    key = feature_cache_key(vit, dataset, layers=[1], feature="cls")
    assert key["model"].startswith("sha256:") and key["data"] == "digits:train#n=24,seed=0"
    assert key["preprocess"] == vit.preprocess.as_dict() and key["vitlens"]


def test_cache_misses_when_an_image_is_edited_in_place(tmp_path, loaded):
    vit, _ = loaded
    folder = tmp_path / "imgs"
    for cls, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), colour).save(folder / cls / f"{i}.png")
    cache = tmp_path / "cache"

    def run():
        return cached_features(vit, open_dataset(folder, vit.preprocess, split="all"), cache_dir=cache)

    assert run()[1] == "miss"
    assert run()[1] == "hit"
    edited = folder / "red" / "1.png"
    before = edited.stat()
    Image.new("RGB", (16, 16), (0, 255, 0)).save(edited)  # same name, new pixels
    os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))  # as a later edit, whatever the clock
    assert run()[1] == "miss"
    assert run()[1] == "hit"


def test_a_file_with_another_key_or_corrupt_is_not_used(tmp_path, loaded, caplog):
    vit, dataset = loaded
    cache = tmp_path / "cache"
    key = feature_cache_key(vit, dataset, layers=[1], feature="pre-logits")
    path = cache_path(cache, key)
    cache.mkdir()
    # A well-formed file at the right place, written for other inputs (as after a hash collision or a copy).
    fake = np.zeros((1, len(dataset), 48), dtype=np.float32)
    np.savez(path, key=np.array('{"model":"other"}'), layers=np.array([1]), features=fake)
    feats, status = cached_features(vit, dataset, cache_dir=cache)
    assert status == "miss" and float(feats[1].abs().sum()) > 0
    assert cached_features(vit, dataset, cache_dir=cache)[1] == "hit"  # overwritten with the right key

    path.write_bytes(b"PK\x03\x04 not really a zip file")
    calls = _count_forward(vit)
    with caplog.at_level(logging.WARNING, logger="vitlens"):
        again, status = cached_features(vit, dataset, cache_dir=cache, batch_size=8)
    assert status == "miss" and calls[0] == 3  # one pass: ceil(24 / 8) batches
    assert "ignoring unreadable feature cache" in caplog.text
    torch.testing.assert_close(again[1], feats[1])
    assert cached_features(vit, dataset, cache_dir=cache)[1] == "hit"


def test_models_without_identity_are_not_cached_and_unwritable_caches_only_warn(tmp_path, loaded, caplog):
    vit, dataset = loaded
    anonymous = _in_memory("reg")
    assert cached_features(anonymous, dataset, cache_dir=tmp_path / "c")[1] == "off"
    assert not (tmp_path / "c").exists()
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="vitlens"):
        feats, status = cached_features(vit, dataset, cache_dir=blocked)
    assert status == "miss" and feats[1].shape == (24, 48) and "could not write the feature cache" in caplog.text


def test_figures_draw_curves_and_heatmap():
    from vitlens.plotting.fewshot import fewshot_figure, plot_fewshot_curves, plot_fewshot_heatmap

    x, y = _blobs(20, 4, 6, spread=0.8, seed=1)
    layers = {la: torch.tensor(x * (la + 1)) for la in range(8)}
    result = fewshot_lsr(layers, y, layers, y, shots=(1, 2, 5), seeds=2)
    fig = fewshot_figure(result)  # 8 layers: a heat map
    ax, _colour_bar = fig.axes
    assert ax.get_ylabel().startswith("layer") and len(ax.texts) == 8 * 3
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "5"]
    ax = plot_fewshot_curves(result)
    assert len(ax.get_lines()) == 8 + 1  # one per layer and the chance line
    chance = ax.get_lines()[-1]
    assert chance.get_linestyle() == "--" and chance.get_ydata()[0] == pytest.approx(25.0)
    assert plot_fewshot_heatmap(result).images[0].get_array().shape == (8, 3)
