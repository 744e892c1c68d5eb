"""Minibatch linear CKA (vitlens.analysis.cka) against the unbiased HSIC written out plainly with explicit n x n
Gram matrices, and the properties linear CKA must have (Kornblith et al. 2019, Nguyen et al. 2021)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitlens.analysis.cka import CKAAccumulator, choose_space, hsic_gram, linear_cka
from vitlens.errors import VitlensError


def plain_unbiased_hsic(x: np.ndarray, y: np.ndarray) -> float:
    """Song et al. 2012 / Nguyen et al. 2021 Eq. 3, term by term, with the explicit n x n Gram matrices."""
    n = x.shape[0]
    k_tilde = x @ x.T - np.diag(np.diag(x @ x.T))  # K with its diagonal set to zero
    l_tilde = y @ y.T - np.diag(np.diag(y @ y.T))
    ones = np.ones(n)
    return float(
        (
            np.trace(k_tilde @ l_tilde)
            + (ones @ k_tilde @ ones) * (ones @ l_tilde @ ones) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (ones @ k_tilde @ l_tilde @ ones)
        )
        / (n * (n - 3))
    )


def plain_minibatch_cka(xs: list[np.ndarray], ys: list[np.ndarray]) -> float:
    """Σ_i HSIC(K_i, L_i) / sqrt(Σ_i HSIC(K_i, K_i) Σ_i HSIC(L_i, L_i)) over the minibatches ``xs[i]``, ``ys[i]``."""
    kl = sum(plain_unbiased_hsic(x, y) for x, y in zip(xs, ys, strict=True))
    kk = sum(plain_unbiased_hsic(x, x) for x in xs)
    ll = sum(plain_unbiased_hsic(y, y) for y in ys)
    return kl / np.sqrt(kk * ll)


def plain_centred_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s (biased) linear CKA with the centring matrix H = I - 11ᵀ/n, for the large-n limit."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, lg = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float(np.sum(k * lg) / np.sqrt(np.sum(k * k) * np.sum(lg * lg)))


def _features(seed: int, layers: int, images: int, rows: int, dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(images, rows, dim, generator=g, dtype=torch.float64)
    # Layers that share structure (so CKA is far from 0 and from 1) plus an offset (HSIC must not see the mean).
    out = [base @ torch.randn(dim, dim, generator=g, dtype=torch.float64) + 0.5 * k for k in range(layers)]
    return torch.stack([o + torch.randn(o.shape, generator=g, dtype=torch.float64) for o in out])  # [L, B, R, d]


def _run(a, b, *, minibatch_size, chunk, space, rows=1):
    acc = CKAAccumulator(
        a.shape[0],
        a.shape[3],
        None if b is None else b.shape[0],
        None if b is None else b.shape[3],
        minibatch_size=minibatch_size,
        rows_per_image=rows,
        space=space,
    )
    for start in range(0, a.shape[1], chunk):
        acc.update(a[:, start : start + chunk], None if b is None else b[:, start : start + chunk])
    return acc.result(list(range(a.shape[0])), list(range((a if b is None else b).shape[0])), "cls")


@pytest.mark.parametrize("space", ["gram", "features"])
def test_minibatch_estimator_equals_the_plain_formula(space):
    a, b = _features(0, 3, 20, 1, 6), _features(1, 2, 20, 1, 4)
    got = _run(a, b, minibatch_size=5, chunk=3, space=space)  # loader batches of 3 straddle minibatches of 5
    assert got.num_minibatches == 4 and got.minibatch_size == 5 and got.num_images == 20
    for p in range(3):
        for q in range(2):
            xs = [a[p, i : i + 5, 0].numpy() for i in range(0, 20, 5)]
            ys = [b[q, i : i + 5, 0].numpy() for i in range(0, 20, 5)]
            assert got.matrix[p, q] == pytest.approx(plain_minibatch_cka(xs, ys), abs=1e-10)
            assert got.hsic_ab[p, q] == pytest.approx(
                np.mean([plain_unbiased_hsic(x, y) for x, y in zip(xs, ys, strict=True)])
            )


def test_one_big_minibatch_is_the_full_data_estimate_and_near_the_centred_cka():
    a = _features(2, 2, 400, 1, 5)
    got = _run(a, None, minibatch_size=400, chunk=64, space="gram")
    full = plain_unbiased_hsic(a[0, :, 0].numpy(), a[1, :, 0].numpy()) / np.sqrt(
        plain_unbiased_hsic(a[0, :, 0].numpy(), a[0, :, 0].numpy())
        * plain_unbiased_hsic(a[1, :, 0].numpy(), a[1, :, 0].numpy())
    )
    assert got.matrix[0, 1] == pytest.approx(full, abs=1e-10)
    # The unbiased and the biased (H-centred) estimates differ by O(d/n) here: the same number to 2 decimals.
    assert got.matrix[0, 1] == pytest.approx(plain_centred_cka(a[0, :, 0].numpy(), a[1, :, 0].numpy()), abs=0.02)


def test_feature_space_and_gram_space_agree_with_many_rows():
    a, b = _features(3, 3, 12, 9, 8), _features(4, 2, 12, 9, 5)  # tokens=all: 9 rows per image
    gram = _run(a, b, minibatch_size=4, chunk=5, space="gram", rows=9)
    feat = _run(a, b, minibatch_size=4, chunk=5, space="features", rows=9)
    np.testing.assert_allclose(feat.matrix, gram.matrix, atol=1e-10)
    np.testing.assert_allclose(feat.hsic_aa, gram.hsic_aa, rtol=1e-9)
    np.testing.assert_allclose(feat.hsic_bb, gram.hsic_bb, rtol=1e-9)
    one_a = _run(a, None, minibatch_size=4, chunk=7, space="gram", rows=9)
    one_b = _run(a, None, minibatch_size=4, chunk=7, space="features", rows=9)
    np.testing.assert_allclose(one_b.matrix, one_a.matrix, atol=1e-10)


def test_cka_of_x_with_itself_is_one_and_invariant_to_rotation_and_scale():
    x = _features(5, 1, 50, 1, 7)[0, :, 0]  # [50, 7]
    g = torch.Generator().manual_seed(6)
    y = x @ torch.randn(7, 5, generator=g, dtype=torch.float64) + 2 * torch.randn(
        50, 5, generator=g, dtype=torch.float64
    )
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    base = linear_cka(x, y)
    assert 0.05 < abs(base) < 0.95
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(3.7 * x, 0.2 * y) == pytest.approx(base, abs=1e-12)
    # A non-isotropic scaling is not an invariance of linear CKA: it changes the number.
    assert linear_cka(x * torch.linspace(0.1, 5, 7, dtype=torch.float64), y) != pytest.approx(base, abs=1e-3)


def test_self_matrix_is_symmetric_with_ones_on_the_diagonal():
    a = _features(7, 4, 16, 1, 6)
    got = _run(a, None, minibatch_size=8, chunk=5, space="gram")
    np.testing.assert_allclose(got.matrix, got.matrix.T, atol=0)
    np.testing.assert_allclose(np.diagonal(got.matrix), 1.0, atol=1e-12)
    two = _run(a, a.clone(), minibatch_size=8, chunk=5, space="gram")  # two models with the same features
    np.testing.assert_allclose(two.matrix, got.matrix, atol=1e-12)


@pytest.mark.parametrize("space", ["gram", "features"])
def test_results_do_not_depend_on_minibatch_order_or_loader_batches(space):
    a, b = _features(8, 2, 24, 2, 5), _features(9, 3, 24, 2, 4)
    base = _run(a, b, minibatch_size=6, chunk=24, space=space, rows=2)
    order = torch.cat([torch.arange(6 * i, 6 * i + 6) for i in (2, 0, 3, 1)])  # whole minibatches permuted
    permuted = _run(a[:, order], b[:, order], minibatch_size=6, chunk=5, space=space, rows=2)
    np.testing.assert_allclose(permuted.matrix, base.matrix, atol=1e-12)
    within = torch.randperm(24, generator=torch.Generator().manual_seed(1))  # across minibatches: it changes
    mixed = _run(a[:, within], b[:, within], minibatch_size=6, chunk=5, space=space, rows=2)
    assert not np.allclose(mixed.matrix, base.matrix, atol=1e-6)


def test_a_short_last_minibatch_is_left_out_unless_it_is_the_only_one():
    a = _features(10, 2, 23, 1, 4)
    got = _run(a, None, minibatch_size=5, chunk=4, space="gram")
    assert got.num_minibatches == 4 and got.num_images == 20 and got.minibatch_size == 5
    np.testing.assert_allclose(got.matrix, _run(a[:, :20], None, minibatch_size=5, chunk=4, space="gram").matrix)
    only = _run(a[:, :7], None, minibatch_size=10, chunk=3, space="gram")
    assert only.num_minibatches == 1 and only.num_images == 7 and only.minibatch_size == 7
    x, y = a[0, :7, 0].numpy(), a[1, :7, 0].numpy()
    assert only.matrix[0, 1] == pytest.approx(plain_minibatch_cka([x], [y]), abs=1e-10)
    with pytest.raises(VitlensError, match="at least 4 rows"):
        _run(a[:, :3], None, minibatch_size=10, chunk=3, space="gram")


def test_the_cheaper_space_is_chosen():
    # ViT-S/16 with itself: 256 mean-patch rows -> Gram; 256 images x 196 patches -> feature space.
    assert choose_space(256, 12, 384, 12, 384, same=True) == "gram"
    assert choose_space(256 * 196, 12, 384, 12, 384, same=True) == "features"
    # fewer multiply-adds in Gram space, but 12 kernels of 3,136² float64 (0.9 GiB) are over the memory cap
    assert choose_space(16 * 196, 12, 384, 12, 384, same=True) == "features"
    assert choose_space(16 * 196, 12, 384, 12, 384, same=True, max_gram_bytes=2**30) == "gram"
    assert CKAAccumulator(2, 8, minibatch_size=4, rows_per_image=100).space == "features"


def test_hsic_gram_diagonal_is_the_diagonal_of_all_pairs():
    x = _features(11, 3, 9, 1, 4)[:, :, 0]  # [3, 9, 4]
    np.testing.assert_allclose(hsic_gram(x, x, diagonal=True), torch.diagonal(hsic_gram(x, x)), rtol=1e-12)


def test_bad_feature_shapes_raise():
    acc = CKAAccumulator(2, 4, 3, 5, minibatch_size=4)
    with pytest.raises(VitlensError, match="model A features"):
        acc.update(torch.zeros(2, 3, 1, 6), torch.zeros(3, 3, 1, 5))
    with pytest.raises(VitlensError, match="model B features"):
        acc.update(torch.zeros(2, 3, 1, 4), torch.zeros(3, 2, 1, 5))
    with pytest.raises(VitlensError, match="NaN"):
        acc.update(torch.full((2, 3, 1, 4), float("nan")), torch.zeros(3, 3, 1, 5))
