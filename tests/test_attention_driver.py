"""The streaming driver: same answer as maps captured the plain way, any batch size, and no maps kept."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_vit
from vitlens import attention as driver
from vitlens.analysis import RolloutAccumulator, attention_distance_per_image, attention_rollout, cls_attention_per_head
from vitlens.attention import (
    default_target,
    head_attention_for,
    mean_attention_distance_for,
    rollout_for,
    stream_attention,
)
from vitlens.capture import attention_capture
from vitlens.data import open_dataset
from vitlens.errors import ParameterError, VitlensError
from vitlens.layout import Preprocess
from vitlens.models.vit import ViT

NUM_IMAGES = 12


def _vit(name: str) -> ViT:
    model = make_vit(name)
    return ViT(model, Preprocess(img_size=tuple(model.patch_embed.img_size)))


def _digits(vit: ViT, n: int = NUM_IMAGES):
    return open_dataset("digits", vit.preprocess, num_images=n)


def _plain_maps(vit: ViT, dataset) -> list[torch.Tensor]:
    """Every layer's attention [B, heads, N, N] for the whole dataset in one forward pass, kept (the plain way)."""
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])  # [B, C, H, W]
    kept: dict[int, torch.Tensor] = {}
    with torch.no_grad(), attention_capture(vit, lambda i, a: kept.__setitem__(i, a.clone())):
        vit.model(images)
    return [kept[i] for i in range(vit.depth)]


@pytest.mark.parametrize("name", ["reg", "nonsquare", "gap"])
def test_distance_does_not_depend_on_batch_size(name):
    vit = _vit(name)
    dataset = _digits(vit)
    results = [mean_attention_distance_for(vit, dataset, batch_size=b) for b in (1, 7, NUM_IMAGES)]
    for other in results[1:]:
        np.testing.assert_allclose(other.distance_px, results[0].distance_px, rtol=1e-9, atol=1e-6)
        np.testing.assert_allclose(other.std_px, results[0].std_px, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(other.prefix_mass, results[0].prefix_mass, rtol=1e-9, atol=1e-7)
        assert other.num_images == NUM_IMAGES
    assert results[0].distance_px.shape == (2, 3)
    assert (results[0].std_px > 0).all()  # the images differ, so the std is no accident of one batch


@pytest.mark.parametrize("name", ["reg", "distilled", "gap"])
def test_rollout_does_not_depend_on_batch_size(name):
    vit = _vit(name)
    dataset = _digits(vit)
    results = [rollout_for(vit, dataset, batch_size=b, discard_ratio=0.3) for b in (1, 7, NUM_IMAGES)]
    for other in results[1:]:
        np.testing.assert_allclose(other.maps, results[0].maps, atol=1e-6)
        np.testing.assert_allclose(other.patch_mass, results[0].patch_mass, atol=1e-6)
    assert results[0].maps.shape == (NUM_IMAGES, 4, 4)
    np.testing.assert_allclose(results[0].maps.max(axis=(1, 2)), 1.0)
    assert not np.allclose(results[0].maps[0], results[0].maps[1])  # each image has its own map


@pytest.mark.parametrize("name", ["reg_no_embed_class", "nonsquare"])
def test_distance_equals_per_image_analysis_of_plainly_captured_maps(name):
    vit = _vit(name)
    dataset = _digits(vit, 3)
    maps = _plain_maps(vit, dataset)
    per_image = [attention_distance_per_image(a.double(), vit.layout) for a in maps]  # [B, heads] each
    distance = torch.stack([d for d, _ in per_image]).numpy()  # [L, B, heads]
    prefix = torch.stack([p for _, p in per_image]).numpy()

    got = mean_attention_distance_for(vit, dataset, batch_size=2)
    np.testing.assert_allclose(got.distance_px, distance.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(got.std_px, distance.std(axis=1), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(got.prefix_mass, prefix.mean(axis=1), rtol=1e-5, atol=1e-7)
    assert got.num_images == 3 and got.renormalized

    unnormalised = mean_attention_distance_for(vit, dataset, batch_size=2, renormalize=False)
    assert not unnormalised.renormalized
    assert (unnormalised.distance_px < got.distance_px).all()  # prefix mass counts as distance 0


def test_rollout_and_heads_equal_analysis_of_plainly_captured_maps():
    vit = _vit("reg")
    dataset = _digits(vit, 3)
    maps = _plain_maps(vit, dataset)
    for kwargs in ({}, {"head_fusion": "max", "discard_ratio": 0.5, "start_layer": 1, "target": "reg:2"}):
        expected = attention_rollout(maps, vit.layout, **{"target": "cls", **kwargs})
        got = rollout_for(vit, dataset, batch_size=2, **kwargs)
        np.testing.assert_allclose(got.maps, expected.maps, atol=1e-5)
        np.testing.assert_allclose(got.patch_mass, expected.patch_mass, atol=1e-5)
        assert (got.target, got.num_layers) == (expected.target, expected.num_layers)
    heads = head_attention_for(vit, dataset, layer=-1, target="reg:1", batch_size=2)
    np.testing.assert_allclose(heads, cls_attention_per_head(maps[1], vit.layout, target="reg:1"), atol=1e-6)
    assert heads.shape == (3, 3, 4, 4)


class _Spy:
    """Keeps only weak references to the attention tensors it is handed, and their shapes."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref] = []
        self.shapes: list[tuple[int, ...]] = []
        self.layers: list[int] = []

    def update(self, layer: int, attn: torch.Tensor) -> None:
        self.refs.append(weakref.ref(attn))
        self.shapes.append(tuple(attn.shape))
        self.layers.append(layer)


def test_driver_keeps_no_attention_map_and_reports_progress():
    vit = _vit("reg")
    dataset = _digits(vit)
    spy = _Spy()
    calls: list[tuple[int, int]] = []
    seen = stream_attention(vit, dataset, spy, batch_size=5, progress=lambda d, t: calls.append((d, t)))
    gc.collect()
    assert seen == NUM_IMAGES
    assert spy.layers == [0, 1] * 3  # layer by layer, batch by batch
    assert [s[0] for s in spy.shapes] == [5, 5, 5, 5, 2, 2]
    assert all(ref() is None for ref in spy.refs)  # the driver dropped every map
    assert calls == [(0, 12), (5, 12), (10, 12), (12, 12)]


def test_state_does_not_grow_with_the_number_of_images(monkeypatch):
    vit = _vit("reg")
    small, large = _digits(vit, 2), _digits(vit, NUM_IMAGES)

    sizes = []
    for dataset in (small, large):
        acc = driver.AttentionDistanceAccumulator(vit.layout, depth=vit.depth, num_heads=3)
        stream_attention(vit, dataset, acc, batch_size=2)
        sizes.append({k: tuple(v.shape) for k, v in acc.state().items()})
    assert sizes[0] == sizes[1] and sizes[0]

    # Rollout: the running product [B, N, N] lives for one batch; it never covers more than batch_size images.
    batch_rows: list[int] = []

    class Recording(RolloutAccumulator):
        def update(self, layer, attn):
            super().update(layer, attn)
            batch_rows.append(self.running.shape[0])

    monkeypatch.setattr(driver, "RolloutAccumulator", Recording)
    rollout_for(vit, large, batch_size=5)
    assert batch_rows == [5, 5, 5, 5, 2, 2]


def test_batches_are_cut_to_the_attention_budget(caplog):
    vit = _vit("reg")
    dataset = _digits(vit)
    n = vit.layout.num_tokens
    per_image = vit.num_heads * n * n * 4  # one layer's float32 map of one image, in bytes
    assert driver.capped_batch_size(vit, 64, dtype=torch.float32, budget_bytes=3 * per_image + 1) == 3
    assert driver.capped_batch_size(vit, 2, dtype=torch.float32, budget_bytes=3 * per_image + 1) == 2
    assert driver.capped_batch_size(vit, 64, dtype=torch.bfloat16, budget_bytes=3 * per_image + 1) == 6
    assert driver.capped_batch_size(vit, 64, dtype=torch.float32, budget_bytes=1) == 1  # one image still runs

    spy = _Spy()
    with caplog.at_level("INFO", logger="vitlens"):
        seen = stream_attention(vit, dataset, spy, batch_size=5, attention_budget_bytes=2 * per_image)
    assert seen == NUM_IMAGES
    assert {s[0] for s in spy.shapes} == {2}
    assert "batch size 5 -> 2" in caplog.text
    # The result is the same as with whole batches.
    capped = driver.AttentionDistanceAccumulator(vit.layout, depth=vit.depth, num_heads=vit.num_heads)
    stream_attention(vit, dataset, capped, batch_size=5, attention_budget_bytes=2 * per_image)
    whole = mean_attention_distance_for(vit, dataset, batch_size=NUM_IMAGES)
    np.testing.assert_allclose(capped.result().distance_px, whole.distance_px, rtol=1e-9, atol=1e-6)


def test_the_default_budget_depends_on_the_device():
    assert driver.default_attention_budget(torch.device("cpu")) == 64 * 2**20
    assert driver.default_attention_budget(torch.device("cuda", 1)) == 256 * 2**20
    assert driver.default_attention_budget(torch.device("mps")) == 256 * 2**20
    vit = _vit("reg")  # on the CPU
    per_image = vit.num_heads * vit.layout.num_tokens**2 * 4
    expected = min(10**9, 64 * 2**20 // per_image)
    assert driver.capped_batch_size(vit, 10**9, dtype=torch.float32) == expected


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_attention_is_one_error(bad):
    vit = _vit("reg")
    dataset = _digits(vit, 4)

    class Poison:
        def update(self, layer, attn):
            pass

    # One entry of layer 1's map, set in place by a hook registered before the capture's, so it runs first.
    def poison(module, _inputs, output):
        output[1, 0, 2, 3] = bad

    handle = vit.model.blocks[1].attn.attn_drop.register_forward_hook(poison)
    try:
        with pytest.raises(VitlensError, match="attention of layer 1 has NaN/inf"):
            stream_attention(vit, dataset, Poison(), batch_size=4)
    finally:
        handle.remove()


def test_default_target_and_errors(tmp_path):
    gap, reg = _vit("gap"), _vit("reg")
    assert default_target(gap.layout) == "mean-patch" and default_target(reg.layout) == "cls"
    assert rollout_for(gap, _digits(gap, 2), batch_size=2).target == "mean-patch"
    dataset = _digits(reg, 2)
    with pytest.raises(ParameterError, match="^start_layer 2 is out of range") as info:
        rollout_for(reg, dataset, start_layer=2)
    assert info.value.param == "start_layer"
    with pytest.raises(VitlensError, match="no 'dist' token"):
        rollout_for(reg, dataset, target="dist")
    with pytest.raises(ParameterError, match="^layer 2 is out of range") as info:
        head_attention_for(reg, dataset, layer=2)
    assert info.value.param == "layer"
    # A skipped image would shift every later map onto the wrong image: per-image results refuse it.
    Image.new("RGB", (40, 40), "red").save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    files = open_dataset([tmp_path / "good.png", tmp_path / "bad.png"], reg.preprocess)
    with pytest.raises(VitlensError, match="1 of 2 images"):
        rollout_for(reg, files, batch_size=2)
    assert mean_attention_distance_for(reg, files, batch_size=2).num_images == 1  # an average may skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    vit = _vit("reg")
    dataset = _digits(vit)
    cpu_d, cpu_r = mean_attention_distance_for(vit, dataset, batch_size=5), rollout_for(vit, dataset, batch_size=5)
    vit.model.to("cuda")
    gpu_d, gpu_r = mean_attention_distance_for(vit, dataset, batch_size=5), rollout_for(vit, dataset, batch_size=5)
    np.testing.assert_allclose(gpu_d.distance_px, cpu_d.distance_px, rtol=1e-4)
    np.testing.assert_allclose(gpu_r.maps, cpu_r.maps, atol=1e-4)
