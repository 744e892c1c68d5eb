"""The patch-token PCA of `vitlens features` against scikit-learn, and its foreground split on a synthetic image whose
foreground is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from vitlens.analysis.features_pca import PatchMoments, border_patches, features_pca, features_pca_batches
from vitlens.errors import ParameterError, VitlensError

GRID = (6, 7)  # non-square on purpose: a row-major mix-up would show


def _tokens(seed: int = 0, b: int = 3, d: int = 12, offset: float = 0.0) -> torch.Tensor:
    """Anisotropic Gaussian tokens ``[b, H*W, d]`` (distinct variances, so the components are well defined)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(4.0, 0.2, d, dtype=torch.float64)
    mix = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]  # a random rotation
    return (torch.randn(b, GRID[0] * GRID[1], d, generator=g, dtype=torch.float64) * scale) @ mix + offset


def _same_up_to_sign(ours: np.ndarray, theirs: np.ndarray, atol: float) -> np.ndarray:
    """Assert that the rows of ``ours`` equal those of ``theirs`` up to one sign per row; return the signs."""
    signs = np.sign(np.sum(ours * theirs, axis=1))
    np.testing.assert_allclose(ours, theirs * signs[:, None], atol=atol)
    return signs


@pytest.mark.parametrize("offset", [0.0, 1e4])  # a large offset: the streamed moments must not cancel
def test_pca_on_all_patches_equals_scikit_learn(offset):
    tokens = _tokens(offset=offset)
    flat = tokens.reshape(-1, tokens.shape[-1]).numpy()
    ours = features_pca(tokens, grid_size=GRID, num_components=4, foreground="none")
    sk = PCA(n_components=4, svd_solver="full").fit(flat)
    signs = _same_up_to_sign(ours.components, sk.components_, atol=1e-9)
    np.testing.assert_allclose(ours.explained_variance, sk.explained_variance_, rtol=1e-9)
    np.testing.assert_allclose(ours.explained_variance_ratio, sk.explained_variance_ratio_, rtol=1e-9)
    np.testing.assert_allclose(ours.mean, sk.mean_, rtol=1e-12)
    # Every patch's scores are scikit-learn's transform, laid out [B, H, W, K] row-major over the grid.
    expected = (sk.transform(flat) * signs).reshape(3, *GRID, 4)
    np.testing.assert_allclose(ours.scores, expected, atol=1e-7 * max(1.0, offset))
    assert ours.foreground == "none" and ours.foreground_mask is None and ours.num_fit_patches == flat.shape[0]
    assert ours.foreground_fraction == 1.0


def test_signs_are_fixed_by_the_largest_loading():
    ours = features_pca(-_tokens(seed=3), grid_size=GRID, num_components=5, foreground="none")
    pivot = np.abs(ours.components).argmax(axis=1)
    assert (ours.components[np.arange(5), pivot] > 0).all()
    np.testing.assert_allclose(ours.components @ ours.components.T, np.eye(5), atol=1e-12)


def test_streamed_batches_of_any_size_give_the_in_memory_result():
    tokens = _tokens(seed=1, b=5, offset=50.0)
    whole = features_pca(tokens, grid_size=GRID, num_components=3)
    parts = [tokens[:1], tokens[1:4], tokens[4:]]
    calls = []

    def batches():
        calls.append(1)
        return iter(parts)

    streamed = features_pca_batches(batches, grid_size=GRID, num_components=3)
    assert len(calls) == 3  # all patches, foreground, projection
    np.testing.assert_allclose(streamed.components, whole.components, atol=1e-10)
    np.testing.assert_allclose(streamed.scores, whole.scores, atol=1e-8)
    np.testing.assert_array_equal(streamed.foreground_mask, whole.foreground_mask)


def test_moments_match_numpy():
    x = torch.randn(50, 4, dtype=torch.float64) + 3
    m = PatchMoments()
    for chunk in (x[:7], x[7:8], x[8:]):
        m.update(chunk)
    np.testing.assert_allclose((m.scatter / (m.count - 1)).numpy(), np.cov(x.numpy().T), rtol=1e-12)
    np.testing.assert_allclose(m.mean.numpy(), x.numpy().mean(axis=0), rtol=1e-12)


def _object_scene(foreground_high: bool, seed: int = 0, b: int = 2, d: int = 10) -> tuple[torch.Tensor, np.ndarray]:
    """Tokens of ``b`` images whose foreground is a known block inside the grid (never touching its border): object
    tokens near one vector, background near another, plus small noise. Returns tokens and the true mask."""
    g = torch.Generator().manual_seed(seed)
    h, w = GRID
    truth = np.zeros((b, h, w), dtype=bool)
    truth[0, 1:4, 2:5] = True  # 9 of 42 patches
    truth[1, 2:5, 1:6] = True  # 15 of 42
    obj = torch.zeros(d, dtype=torch.float64)
    back = torch.zeros(d, dtype=torch.float64)
    # The object's direction has the largest loading: with foreground_high False it is negative, so the PC1 sign
    # chosen by the largest-|loading| rule points at the background and the border rule must flip it.
    obj[0], back[1] = (5.0, 1.0) if foreground_high else (-5.0, -1.0)
    base = torch.where(torch.from_numpy(truth.reshape(b, h * w, 1)), obj, back)  # [b, H*W, d]
    return base + 0.05 * torch.randn(b, h * w, d, generator=g, dtype=torch.float64), truth


@pytest.mark.parametrize("foreground_high", [True, False])
def test_auto_foreground_finds_the_object_whatever_the_sign(foreground_high):
    tokens, truth = _object_scene(foreground_high)
    ours = features_pca(tokens, grid_size=GRID, num_components=3, foreground="auto")
    np.testing.assert_array_equal(ours.foreground_mask, truth)
    assert ours.foreground == "auto" and ours.threshold == 0.0 and ours.num_fit_patches == truth.sum()
    # The final PCA is scikit-learn's on the object's tokens only.
    d = tokens.shape[-1]
    fg = tokens.reshape(-1, d).numpy()[truth.reshape(-1)]
    sk = PCA(n_components=3, svd_solver="full").fit(fg)
    _same_up_to_sign(ours.components, sk.components_, atol=1e-8)
    np.testing.assert_allclose(ours.explained_variance_ratio, sk.explained_variance_ratio_, rtol=1e-8)
    # foreground_scores: the first component of all patches, oriented so that the object is positive.
    first = PCA(n_components=1, svd_solver="full").fit(tokens.reshape(-1, d).numpy())
    raw = first.transform(tokens.reshape(-1, d).numpy())[:, 0].reshape(truth.shape)
    oriented = raw if raw[truth].mean() > 0 else -raw
    np.testing.assert_allclose(ours.foreground_scores, oriented, atol=1e-9)
    # RGB: min-max over the object's patches (0 and 1 reached in every channel), background black.
    fg_rgb = ours.rgb[truth]
    np.testing.assert_allclose(fg_rgb.min(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(fg_rgb.max(axis=0), 1.0, atol=1e-12)
    assert (ours.rgb[~truth] == 0).all() and ours.rgb.shape == (*truth.shape, 3)


def test_a_threshold_is_used_as_given_on_the_oriented_first_component():
    tokens, truth = _object_scene(False)
    auto = features_pca(tokens, grid_size=GRID, foreground="auto")
    scores = auto.foreground_scores
    cut = float(np.quantile(scores[truth], 0.5))  # half of the object's patches
    given = features_pca(tokens, grid_size=GRID, foreground=cut)
    assert given.foreground == "threshold" and given.threshold == cut
    np.testing.assert_array_equal(given.foreground_mask, scores > cut)
    assert 2 <= given.num_fit_patches < truth.sum()
    assert features_pca(tokens, grid_size=GRID, foreground="-1e9").foreground_fraction == 1.0  # a numeric string


def test_rgb_with_all_patches_spans_zero_to_one_and_pads_missing_channels():
    ours = features_pca(_tokens(), grid_size=GRID, num_components=2, foreground="none")
    rgb = ours.rgb.reshape(-1, 3)
    np.testing.assert_allclose(rgb[:, :2].min(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(rgb[:, :2].max(axis=0), 1.0, atol=1e-12)
    assert (rgb[:, 2] == 0).all()
    s = ours.scores[..., 0]
    np.testing.assert_allclose(ours.rgb[..., 0], (s - s.min()) / (s.max() - s.min()), atol=1e-12)


def test_border_patches():
    edge = border_patches((3, 4)).reshape(3, 4).numpy()
    assert edge.sum() == 10 and not edge[1, 1] and not edge[1, 2] and edge[0].all() and edge[:, -1].all()


def test_bad_options_and_inputs():
    tokens = _tokens(d=6)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ParameterError, match="num_components must be an integer") as info:
            features_pca(tokens, grid_size=GRID, num_components=bad)
        assert info.value.param == "num_components"
    with pytest.raises(ParameterError, match="at most 6"):
        features_pca(tokens, grid_size=GRID, num_components=7)
    for bad in ("some", float("nan"), None, True):
        with pytest.raises(ParameterError, match="foreground must be auto, none or a finite number"):
            features_pca(tokens, grid_size=GRID, foreground=bad)
    with pytest.raises(VitlensError, match="too few for a PCA"):
        features_pca(tokens, grid_size=GRID, foreground=1e9)
    with pytest.raises(VitlensError, match=r"\[b, 36, D\] for a 6x6 grid"):
        features_pca(tokens, grid_size=(6, 6))
    with pytest.raises(VitlensError, match="NaN"):
        features_pca(tokens * float("nan"), grid_size=GRID)
