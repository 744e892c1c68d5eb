"""Filter PCA (ViT paper Fig. 7 left) against numpy's SVD and scikit-learn's PCA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from vitlens.analysis import PAPER_NUM_COMPONENTS, filter_pca
from vitlens.errors import ParameterError, VitlensError


def _weight(d: int = 40, c: int = 3, ph: int = 4, pw: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Unequal scales per input value so the spectrum has distinct singular values.
    scale = torch.linspace(0.2, 2.0, c * ph * pw).reshape(c, ph, pw)
    return torch.randn(d, c, ph, pw, generator=g, dtype=torch.float64) * scale + 0.3


def _centred(weight: torch.Tensor) -> np.ndarray:
    x = weight.numpy().reshape(weight.shape[0], -1)
    return x - x.mean(axis=0)


def test_shape_and_orthonormal_components():
    w = _weight()
    out = filter_pca(w, num_components=10)
    assert out.components.shape == (10, 3, 4, 5)
    flat = out.components.reshape(10, -1)
    np.testing.assert_allclose(flat @ flat.T, np.eye(10), atol=1e-12)
    np.testing.assert_allclose(out.mean_filter, w.numpy().mean(axis=0), atol=1e-12)


def test_explained_variance_matches_numpy_svd():
    w = _weight()
    out = filter_pca(w, num_components=12)
    s = np.linalg.svd(_centred(w), compute_uv=False)
    np.testing.assert_allclose(out.singular_values, s, rtol=1e-10, atol=1e-12)  # the last is 0: centring
    np.testing.assert_allclose(out.explained_variance_ratio, s[:12] ** 2 / (s**2).sum(), rtol=1e-10)


def test_matches_sklearn_pca():
    w = _weight()
    x = w.numpy().reshape(40, -1)
    pca = PCA(n_components=12, svd_solver="full").fit(x)
    out = filter_pca(w, num_components=12)
    np.testing.assert_allclose(out.explained_variance_ratio, pca.explained_variance_ratio_, rtol=1e-8)
    # Same directions up to sign.
    dots = np.abs(np.sum(out.components.reshape(12, -1) * pca.components_, axis=1))
    np.testing.assert_allclose(dots, np.ones(12), atol=1e-8)


def test_sign_is_deterministic():
    w = _weight()
    a = filter_pca(w, num_components=6)
    b = filter_pca(-w, num_components=6)  # negating every filter flips every singular vector's sign
    np.testing.assert_allclose(a.components, b.components, atol=1e-12)
    flat = a.components.reshape(6, -1)
    assert np.all(flat[np.arange(6), np.abs(flat).argmax(axis=1)] > 0)


def test_default_is_paper_count_or_all_there_are():
    assert filter_pca(_weight(d=40)).num_components == PAPER_NUM_COMPONENTS
    assert filter_pca(_weight(d=8, c=3, ph=2, pw=2)).num_components == 8  # min(8 filters, 12 values)
    assert filter_pca(_weight(d=64, c=1, ph=2, pw=3)).num_components == 6  # min(64 filters, 6 values)


@pytest.mark.parametrize("k", [0, -1, 13])
def test_bad_num_components(k):
    with pytest.raises(ParameterError, match="^num_components must be between 1 and 12") as info:
        filter_pca(_weight(d=20, c=3, ph=2, pw=2), num_components=k)  # at most min(20, 12) = 12
    assert info.value.param == "num_components"


def test_float32_input_and_json():
    out = filter_pca(_weight().float(), num_components=4)
    assert out.components.dtype == np.float64
    d = json.loads(json.dumps(out.to_dict()))
    assert d["num_components"] == 4 and len(d["explained_variance_ratio"]) == 4


def test_not_a_conv_weight():
    with pytest.raises(VitlensError, match=r"\[D, C, ph, pw\]"):
        filter_pca(torch.randn(10, 12))
