"""Attention rollout (Abnar & Zuidema 2020; ViT paper App. D.8) against the formula written out with numpy loops."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from vitlens.analysis import RolloutAccumulator, attention_rollout, cls_attention_per_head, rollout_layer_matrix
from vitlens.analysis.rollout import threshold_masks
from vitlens.errors import ParameterError, VitlensError
from vitlens.layout import TokenLayout

# cls + 2 registers in front of a 3 x 4 patch grid.
LAYOUT = TokenLayout(grid_size=(3, 4), patch_size=(16, 16), prefix_kinds=("cls", "reg", "reg"))
P, HW, N = 3, 12, 15


def random_layers(num_layers: int = 4, b: int = 2, heads: int = 3, n: int = N, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, heads, n, n, generator=g, dtype=torch.float64) * 2).softmax(-1) for _ in range(num_layers)]


def reference_rollout(layers, head_fusion, discard_ratio, start_layer, target_row):
    """The rollout formula, one image at a time: fuse, discard, A + I, divide each row by its sum, R = A @ R."""
    b = layers[0].shape[0]
    maps = []
    for img in range(b):
        r = np.eye(N)
        for attn in layers[start_layer:]:
            a_heads = attn[img].numpy()  # [heads, N, N]
            fused = {"mean": np.mean, "max": np.max, "min": np.min}[head_fusion](a_heads, axis=0)
            k = int(discard_ratio * HW * HW)
            if k:
                block = fused[P:, P:].copy().ravel()
                block[np.argsort(block)[:k]] = 0.0
                fused[P:, P:] = block.reshape(HW, HW)
            a = fused + np.eye(N)
            for i in range(N):
                a[i] = a[i] / a[i].sum()
            r = a @ r
        row = r[P:, P:].mean(axis=0) if target_row is None else r[target_row, P:]
        maps.append((row / row.max()).reshape(3, 4))
    return np.stack(maps)


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.5, 0.9])
@pytest.mark.parametrize(("target", "row"), [("cls", 0), ("reg:1", 2), ("mean-patch", None)])
@pytest.mark.parametrize("start_layer", [0, 2])
def test_matches_plain_formula(head_fusion, discard_ratio, target, row, start_layer):
    layers = random_layers()
    out = attention_rollout(
        layers, LAYOUT, target=target, head_fusion=head_fusion, discard_ratio=discard_ratio, start_layer=start_layer
    )
    expected = reference_rollout(layers, head_fusion, discard_ratio, start_layer, row)
    assert out.maps.shape == (2, 3, 4)
    np.testing.assert_allclose(out.maps, expected, rtol=1e-10, atol=1e-12)
    assert out.num_layers == 4 - start_layer and out.target == target


def test_rows_are_normalised_over_keys():
    layers = random_layers(num_layers=3)
    acc = RolloutAccumulator(LAYOUT, discard_ratio=0.7)
    for layer, attn in enumerate(layers):
        acc.update(layer, attn)
    np.testing.assert_allclose(acc.running.sum(-1).numpy(), 1.0, atol=1e-12)
    a = rollout_layer_matrix(layers[0], LAYOUT)
    expected = (layers[0].mean(1) + torch.eye(N)) / 2  # (A + I) / 2 for row-stochastic A, no discard
    torch.testing.assert_close(a, expected)


def test_discard_never_touches_prefix_rows_or_columns():
    attn = random_layers(num_layers=1)[0]
    kept = rollout_layer_matrix(attn, LAYOUT, discard_ratio=0.99)
    full = rollout_layer_matrix(attn, LAYOUT, discard_ratio=0.0)
    torch.testing.assert_close(kept[:, :P], full[:, :P])  # prefix rows: nothing discarded, same normalisation
    # Patch rows lost patch weights, so they are rescaled, but their prefix columns keep their proportions.
    to_prefix = kept[:, P:, :P]
    assert torch.all(to_prefix > 0)
    torch.testing.assert_close(
        to_prefix / to_prefix.sum(-1, keepdim=True), full[:, P:, :P] / full[:, P:, :P].sum(-1, keepdim=True)
    )
    assert (kept[:, P:, P:] == 0).sum() >= 2 * (int(0.99 * HW * HW) - HW)  # most patch weights are gone


def test_identity_attention():
    eye = torch.eye(N, dtype=torch.float64).expand(2, 3, N, N)
    cls = attention_rollout([eye, eye], LAYOUT, target="cls")
    # The running product stays the identity: the class row has no weight on any patch, and the map stays all zero
    # instead of being divided by its zero maximum.
    assert np.all(cls.maps == 0) and np.all(cls.patch_mass == 0)
    mean_patch = attention_rollout([eye, eye], LAYOUT, target="mean-patch")
    np.testing.assert_allclose(mean_patch.maps, 1.0)
    np.testing.assert_allclose(mean_patch.patch_mass, 1.0)  # patch rows of the identity keep all their weight


def test_maps_scaled_to_max_one_and_json():
    out = attention_rollout(random_layers(), LAYOUT)
    np.testing.assert_allclose(out.maps.reshape(2, -1).max(axis=1), 1.0)
    assert np.all((out.maps >= 0) & (out.maps <= 1))
    d = json.loads(json.dumps(out.to_dict()))
    assert d["head_fusion"] == "mean" and d["discard_ratio"] == 0.0 and d["grid_size"] == [3, 4]


def test_streaming_equals_wrapper_and_skips_early_layers():
    layers = random_layers()
    acc = RolloutAccumulator(LAYOUT, head_fusion="max", start_layer=1)
    for layer, attn in enumerate(layers):
        acc.update(layer, attn)
    wrapped = attention_rollout(layers, LAYOUT, head_fusion="max", start_layer=1, target="reg:0")
    np.testing.assert_allclose(acc.result(target="reg:0").maps, wrapped.maps)
    acc.reset()
    with pytest.raises(VitlensError, match="nothing to roll out"):
        acc.result()


def test_cls_attention_per_head():
    attn = random_layers(num_layers=1)[0]
    out = cls_attention_per_head(attn, LAYOUT)
    assert out.shape == (2, 3, 3, 4)
    np.testing.assert_allclose(out, attn[:, :, 0, P:].numpy().reshape(2, 3, 3, 4))
    reg = cls_attention_per_head(attn, LAYOUT, target="reg:1")
    np.testing.assert_allclose(reg, attn[:, :, 2, P:].numpy().reshape(2, 3, 3, 4))
    mean_patch = cls_attention_per_head(attn, LAYOUT, target="mean-patch")
    np.testing.assert_allclose(mean_patch, attn[:, :, P:, P:].numpy().mean(axis=2).reshape(2, 3, 3, 4))


def test_dist_token_and_no_prefix_layouts():
    dist_layout = TokenLayout(grid_size=(2, 2), patch_size=(16, 16), prefix_kinds=("cls", "dist"))
    attn = random_layers(num_layers=2, n=6)
    out = attention_rollout(attn, dist_layout, target="dist")
    assert out.maps.shape == (2, 2, 2)
    gap_layout = TokenLayout(grid_size=(2, 3), patch_size=(16, 16), prefix_kinds=())
    out = attention_rollout(random_layers(num_layers=2, n=6), gap_layout, target="mean-patch")
    assert out.maps.shape == (2, 2, 3)
    with pytest.raises(VitlensError, match="no 'cls' token; its targets are: mean-patch"):
        attention_rollout(random_layers(num_layers=2, n=6), gap_layout)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_discard_ratio_outside_range(ratio):
    with pytest.raises(ParameterError, match="discard_ratio"):
        attention_rollout(random_layers(), LAYOUT, discard_ratio=ratio)
    with pytest.raises(ParameterError, match="discard_ratio"):
        RolloutAccumulator(LAYOUT, discard_ratio=ratio)


def test_target_errors():
    layers = random_layers()
    with pytest.raises(VitlensError, match="no 'dist' token; its targets are: cls, reg:0, reg:1, mean-patch"):
        attention_rollout(layers, LAYOUT, target="dist")
    with pytest.raises(VitlensError, match="no 'reg:2' token"):
        attention_rollout(layers, LAYOUT, target="reg:2")
    with pytest.raises(ParameterError, match="target must be cls, dist"):
        attention_rollout(layers, LAYOUT, target="register")


def test_option_and_order_errors():
    layers = random_layers()
    with pytest.raises(ParameterError, match="head_fusion"):
        attention_rollout(layers, LAYOUT, head_fusion="median")
    with pytest.raises(ParameterError, match="start_layer"):
        attention_rollout(layers, LAYOUT, start_layer=4)
    with pytest.raises(ParameterError, match="start_layer"):
        RolloutAccumulator(LAYOUT, start_layer=-1)
    acc = RolloutAccumulator(LAYOUT)
    acc.update(0, layers[0])
    with pytest.raises(VitlensError, match="expected layer 1, got 2"):
        acc.update(2, layers[2])
    with pytest.raises(VitlensError, match="batch size"):
        acc.update(1, layers[1][:1])


# ---------------------------------------------------------------------------------------------- threshold masks
def dino_masks(weights: torch.Tensor, threshold: float) -> np.ndarray:
    """DINO's visualize_attention.py rule written plainly: ascending sort, divide by the sum, keep where the
    cumulative sum is > 1 - threshold, put back in patch order. ``weights`` [maps, HW] without ties."""
    out = np.zeros(weights.shape, dtype=bool)
    for m, row in enumerate(weights.double()):
        values, order = torch.sort(row)
        cum = torch.cumsum(values / values.sum(), dim=0)
        for value, index in zip(cum.tolist(), order.tolist(), strict=True):
            out[m, index] = value > 1 - threshold
    return out


def smallest_holding(row: np.ndarray, mass: float) -> int:
    """Size of the smallest subset of ``row`` holding ``mass`` of its sum, by trying every subset."""
    share = row / row.sum()
    for size in range(1, len(row) + 1):
        if any(share[list(c)].sum() >= mass for c in itertools.combinations(range(len(row)), size)):
            return size
    raise AssertionError("unreachable: the whole row holds all of it")


@pytest.mark.parametrize(
    ("row", "mass", "kept"),
    [
        ([0.5, 0.25, 0.125, 0.125], 0.5, [1, 0, 0, 0]),  # reached exactly by the first patch: it alone suffices
        ([0.5, 0.25, 0.125, 0.125], 0.6, [1, 1, 0, 0]),
        ([0.5, 0.25, 0.125, 0.125], 0.75, [1, 1, 0, 0]),
        ([0.5, 0.25, 0.125, 0.125], 0.8, [1, 1, 1, 0]),  # tie of the last two: the lower patch index is kept
        ([0.125, 0.125, 0.25, 0.5], 0.8, [1, 0, 1, 1]),
        ([0.125, 0.125, 0.25, 0.5], 1.0, [1, 1, 1, 1]),
        ([0.25, 0.25, 0.25, 0.25], 0.5, [1, 1, 0, 0]),  # all tied: the first two
        ([0.0, 0.5, 0.0, 0.5], 1.0, [0, 1, 0, 1]),  # zero weight adds no mass, never kept
        ([0.0, 0.25, 0.0, 0.25], 0.6, [0, 1, 0, 1]),  # half the row on prefix tokens: renormalised over patches
        ([0.0, 0.0, 0.0, 0.0], 0.6, [0, 0, 0, 0]),  # no weight on patches: nothing to keep
    ],
)
def test_threshold_masks_known_answers(row, mass, kept):
    got = threshold_masks(np.asarray([row]), mass=mass, patch_axes=1)
    np.testing.assert_array_equal(got, np.asarray([kept], dtype=bool))


@pytest.mark.parametrize("mass", [0.1, 0.6, 0.9, 1.0])
def test_threshold_masks_are_the_smallest_sets_holding_the_mass(mass):
    g = torch.Generator().manual_seed(3)
    attn = torch.rand(2, 3, 2, 3, generator=g) ** 3  # [B, heads, H, W] skewed weights, six patches per map
    masks = threshold_masks(attn, mass=mass)
    assert masks.shape == (2, 3, 2, 3) and masks.dtype == bool
    rows, flat = attn.reshape(6, 6).double().numpy(), masks.reshape(6, 6)
    np.testing.assert_array_equal(
        threshold_masks(attn.reshape(2, 3, 6), mass=mass, patch_axes=1), masks.reshape(2, 3, 6)
    )
    np.testing.assert_array_equal(flat, dino_masks(attn.reshape(6, 6), mass))  # DINO's own rule agrees
    for row, keep in zip(rows, flat, strict=True):
        share = row / row.sum()
        assert share[keep].sum() >= mass  # holds the mass ...
        assert share[keep].sum() - share[keep].min() < mass  # ... and without its weakest patch it would not
        assert share[keep].min() >= share[~keep].max(initial=0.0)  # the strongest patches
        assert keep.sum() == smallest_holding(row, mass)  # no smaller subset of any patches holds it


def test_threshold_masks_errors():
    for mass in (0.0, -0.1, 1.5, True, "0.6"):
        with pytest.raises(ParameterError, match=r"mass must be in \(0, 1\]"):
            threshold_masks(np.ones((2, 2)), mass=mass)
    with pytest.raises(ParameterError, match="non-negative"):
        threshold_masks(-np.ones((2, 2)), mass=0.5)
    with pytest.raises(ParameterError, match="patch_axes must be 1 or 2"):
        threshold_masks(np.ones((2, 2)), mass=0.5, patch_axes=3)


@pytest.mark.parametrize(("target", "row"), [("cls", 0), ("reg:1", 2), ("mean-patch", None)])
@pytest.mark.parametrize("max_bytes", [0, 2 * 2 * N * N * 8, 2**30])
def test_row_path_equals_the_running_product(target, row, max_bytes):
    # max_bytes 0: every layer folded at once (the running-product path); a budget of two factors folds twice on
    # the way; 1 GiB keeps every factor and multiplies the target row back through them.
    layers = random_layers(num_layers=6)
    kept = RolloutAccumulator(LAYOUT, discard_ratio=0.3, max_bytes=max_bytes)
    product = RolloutAccumulator(LAYOUT, discard_ratio=0.3, max_bytes=0)
    for i, attn in enumerate(layers):
        kept.update(i, attn)
        product.update(i, attn)
    assert kept.num_layers == 6
    np.testing.assert_allclose(kept.target_weights(target), product.target_weights(target), rtol=1e-12)
    np.testing.assert_allclose(kept.result(target=target).maps, product.result(target=target).maps, rtol=1e-12)
    ref = reference_rollout(layers, "mean", 0.3, 0, row)
    np.testing.assert_allclose(kept.result(target=target).maps, ref, atol=1e-12)
    np.testing.assert_allclose(kept.running, product.running, rtol=1e-12)  # the whole matrix on request


@pytest.mark.parametrize("max_bytes", [0, 2**30])  # after a fold and with every factor kept
def test_a_layer_of_another_batch_size_is_refused(max_bytes):
    acc = RolloutAccumulator(LAYOUT, max_bytes=max_bytes)
    acc.update(0, random_layers(num_layers=1, b=2)[0])
    with pytest.raises(VitlensError, match="layer 1 has batch size 3, earlier layers 2: use a new accumulator"):
        acc.update(1, random_layers(num_layers=1, b=3)[0])
