"""Perturbation tests against plain re-computations: ``ViT.forward_kept`` equals timm's forward with every patch and
timm's own ``PatchDropout`` on a subset, on every fixture layout; the curves equal a loop that perturbs one image and
one step at a time; areas are the trapezoid written out; scipy's Gaussian filter is the blur; a model whose class
score reads one known patch loses it at the first deletion step for every gradient method and not for a random
order; a batch equals its images one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from timm.layers.patch_dropout import patch_dropout_forward
from torch import nn

from tests.conftest import input_for, make_vit
from tests.test_analysis_explain import GRADIENT, one_patch_model, wrap
from vitlens.analysis.faithfulness import (
    CURVES,
    RANDOM,
    gaussian_blur,
    perturbation_curves,
    random_order,
    relevance_order,
    removed_counts,
    trapezoid_area,
)
from vitlens.definitions.explain import explain_faithfulness, faithfulness_batch
from vitlens.errors import ParameterError
from vitlens.models.vit import ViT


# ---------------------------------------------------------------------------------------------- token dropping
def test_every_patch_kept_is_timms_forward(tiny_vit):
    _, model = tiny_vit
    vit = wrap(model)
    x = input_for(model, batch=3)
    hw = vit.layout.num_patches
    with torch.no_grad():
        got = vit.forward_kept(x, torch.arange(hw).expand(3, hw))
        torch.testing.assert_close(got, model(x), atol=1e-5, rtol=0)


class _RecordingPatchDropout(nn.Module):
    """timm's own patch dropout, switched on in an eval model, remembering which patches it kept."""

    def __init__(self, num_prefix_tokens: int):
        super().__init__()
        self.num_prefix_tokens, self.keep = num_prefix_tokens, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, self.keep = patch_dropout_forward(x, 0.5, self.num_prefix_tokens, ordered=False, training=True)
        return out


def test_a_subset_is_timms_patch_dropout(tiny_vit):
    """timm gathers the kept tokens after position embedding (``patch_drop`` in ``forward_features``); so do we."""
    _, model = tiny_vit
    vit = wrap(model)
    x = input_for(model, batch=3)
    drop = _RecordingPatchDropout(vit.layout.num_prefix_tokens)
    model.patch_drop = drop
    with torch.no_grad():
        expected = model(x)
        model.patch_drop = nn.Identity()
        assert drop.keep.shape == (3, vit.layout.num_patches // 2)  # a real subset, in random order
        torch.testing.assert_close(vit.forward_kept(x, drop.keep), expected, atol=1e-5, rtol=0)
        assert not torch.allclose(vit.forward_kept(x, drop.keep[:, :1]), expected, atol=1e-3)


def test_only_the_prefix_is_the_prefix_tokens_alone():
    """With no patch kept, the class token sees itself only: the head reads it after one pass without patches."""
    model = make_vit("cls")
    vit = wrap(model)
    x = input_for(model, batch=2)
    with torch.no_grad():
        tokens = model.cls_token + model.pos_embed[:, :1]  # [1, 1, D]: timm's _pos_embed for the class token
        expected = model.forward_head(model.norm(model.blocks(tokens.expand(2, -1, -1))))
        torch.testing.assert_close(vit.forward_kept(x, torch.zeros(2, 0, dtype=torch.int64)), expected)


# ---------------------------------------------------------------------------------------------- the curves
def curves_by_hand(model, images, order, classes, layout, removal, steps):
    """One image and one step at a time: pixels of the moved patches set to 0 (mean) or tokens left out (drop)."""
    (gh, gw), (ph, pw) = layout.grid_size, layout.patch_size
    hw = gh * gw
    out = np.zeros((len(CURVES), images.shape[0], steps + 1))
    vit = wrap(model)
    for b in range(images.shape[0]):
        for c, curve in enumerate(CURVES):
            for i in range(steps + 1):
                moved = i * hw // steps
                ranked = order[b].tolist()
                if curve == "deletion":
                    kept = ranked[moved:]
                elif curve == "negative":
                    kept = ranked[: hw - moved]
                else:
                    kept = ranked[:moved]
                x = images[b : b + 1].clone()
                with torch.no_grad():
                    if removal == "mean":
                        for p in set(range(hw)) - set(kept):
                            r, q = divmod(p, gw)
                            x[:, :, r * ph : (r + 1) * ph, q * pw : (q + 1) * pw] = 0.0
                        logits = model(x)
                    else:
                        logits = vit.forward_kept(x, torch.tensor([sorted(kept)], dtype=torch.int64))
                out[c, b, i] = torch.softmax(logits.double(), -1)[0, classes[b]].item()
    return out


@pytest.mark.parametrize(("name", "removal"), [("reg", "drop"), ("nonsquare", "mean"), ("distilled", "drop")])
def test_curves_are_the_loop(name, removal):
    model = make_vit(name)
    vit = wrap(model)
    x = input_for(model, batch=2)
    hw = vit.layout.num_patches
    torch.manual_seed(3)
    order = torch.stack([torch.randperm(hw) for _ in range(2)])
    classes = torch.tensor([1, 3])

    def forward(images, keep):
        with torch.no_grad():
            return model(images) if keep is None else vit.forward_kept(images, keep)

    got = perturbation_curves(forward, x, {"m": order}, classes, vit.layout, removal=removal, steps=5, chunk_size=7)
    expected = curves_by_hand(model, x, order, classes, vit.layout, removal, steps=5)
    np.testing.assert_allclose(got.probabilities[0], expected, atol=1e-6)
    np.testing.assert_allclose(got.fractions, [i * hw // 5 / hw for i in range(6)])
    assert got.correct is None and got.labels is None  # no labels given


def test_accuracy_reads_the_labels():
    model = make_vit("cls")
    vit = wrap(model)
    x = input_for(model, batch=3)
    with torch.no_grad():
        pred = model(x).argmax(-1)
    labels = torch.tensor([int(pred[0]), (int(pred[1]) + 1) % 5, int(pred[2])])
    order = relevance_order(torch.rand(3, vit.layout.num_patches, generator=torch.Generator().manual_seed(0)))
    got = perturbation_curves(lambda i, k: model(i), x, {"m": order}, pred, vit.layout, labels=labels, removal="mean")
    assert got.correct[0, :, :, 0].tolist() == [[True, False, True]] * 3  # nothing removed: the prediction
    assert got.accuracies()[0, 0, 0] == pytest.approx(2 / 3)


def test_areas_are_the_trapezoid_written_out():
    rng = np.random.default_rng(0)
    x = removed_counts(16, 10) / 16
    y = rng.random((2, 3, 11))
    by_hand = np.zeros((2, 3))
    for i in range(10):
        by_hand += (y[..., i] + y[..., i + 1]) / 2 * (x[i + 1] - x[i])
    np.testing.assert_allclose(trapezoid_area(y, x), by_hand, atol=1e-12)
    assert removed_counts(16, 10).tolist() == [0, 1, 3, 4, 6, 8, 9, 11, 12, 14, 16]


@pytest.mark.parametrize("sigma", [(8.0, 8.0), (2.5, 4.0)])
def test_blur_is_scipys_gaussian_filter(sigma):
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = gaussian_filter(x.numpy(), sigma=(0, 0, *sigma), mode="nearest", truncate=3.0)
    np.testing.assert_allclose(gaussian_blur(x, sigma).numpy(), expected, atol=1e-10)


def test_random_order_depends_on_the_image_not_the_batch():
    both = random_order(np.array([4, 7]), 16, seed=0)
    assert torch.equal(both[1], random_order(np.array([7]), 16, seed=0)[0])
    assert not torch.equal(both[0], random_order(np.array([4]), 16, seed=1)[0])


# ---------------------------------------------------------------------------------------------- the driver
@pytest.mark.parametrize("patch", [5, 10])
def test_deleting_the_one_patch_removes_the_score_and_random_does_not(patch):
    vit = wrap(one_patch_model(patch))
    x = input_for(vit.model, batch=2)
    f = faithfulness_batch(vit, x, torch.arange(2), methods=GRADIENT, target="cls", removal="drop", seed=0)
    assert f.methods == (*GRADIENT, RANDOM)
    deletion = f.probabilities[:, 0]  # [M, B, S + 1]
    assert (deletion[:, :, 0] > 0.99).all()  # class 0 (logit ~10 against 0, 0) on the full image
    for m in range(len(GRADIENT)):  # step 1 removes floor(16 / 10) = 1 patch: the one the score reads
        # the logit falls from ~10 to the others' level: the probability from ~1 to near chance (1/3)
        assert (deletion[m, :, 1] < 0.6).all(), (f.methods[m], deletion[m])
    first = random_order(np.arange(2), 16, seed=0)[:, 0]
    assert (first != patch).all()  # the fixed seed's first patch is another one ...
    assert (deletion[-1, :, 1] > 0.99).all()  # ... so the random order keeps the score


def test_a_batch_equals_its_images_one_by_one():
    vit = wrap(make_vit("reg"))
    x = input_for(vit.model, batch=3)
    opts = {"methods": ("attribution", "rollout"), "target": "cls", "removal": "blur", "steps": 4, "seed": 5}
    whole = faithfulness_batch(vit, x, torch.tensor([0, 1, 2]), **opts, chunk_size=5)
    for b in range(3):
        one = faithfulness_batch(vit, x[b : b + 1], torch.tensor([b]), **opts)
        np.testing.assert_allclose(one.probabilities[:, :, 0], whole.probabilities[:, :, b], atol=1e-6)
    assert whole.blur_sigma == (8.0, 8.0)


def test_models_it_cannot_judge():
    gap = wrap(make_vit("gap"))
    with pytest.raises(ParameterError, match="removal 'drop' removes every patch at 100 %") as info:
        explain_faithfulness(gap, [])
    assert info.value.param == "removal"
    backbone = make_vit("reg")
    backbone.reset_classifier(0)
    with pytest.raises(ParameterError, match="faithfulness needs class probabilities") as info:
        explain_faithfulness(ViT(backbone, wrap(backbone).preprocess), [])
    assert info.value.param == "faithfulness"
