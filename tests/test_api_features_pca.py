"""``vitlens.features_pca`` on the demo model: the tokens are the ones documented (final norm for the last layer, the
block's raw output otherwise), and the result draws, saves, reads back and prints what the CLI command does."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import vitlens
from vitlens.analysis.features_pca import features_pca as pca_of_tokens
from vitlens.data import open_dataset
from vitlens.definitions.features_pca import DEFINITION, FeaturesPCAResult, features_pca
from vitlens.errors import ParameterError
from vitlens.registry import get
from vitlens.result import load_result


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for k, size in enumerate([(40, 40), (50, 70), (36, 30)]):
        pixels = np.full((*size, 3), 30, dtype=np.uint8)
        h, w = size
        pixels[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = rng.integers(150, 255, 3, dtype=np.uint8)  # an object
        paths.append(folder / f"img{k}.png")
        Image.fromarray(pixels).save(paths[-1])
    return [str(p) for p in paths]


@pytest.fixture(scope="module")
def result(demo, photos):
    return features_pca(demo, photos, batch_size=2)


def _model_tokens(demo, photos, layer: int | None) -> torch.Tensor:
    """Patch tokens ``[B, H*W, D]`` computed here, without vitlens' hooks: forward_features or a plain forward hook."""
    data = open_dataset(photos, demo.preprocess)
    x = torch.stack([data[i][0] for i in range(len(data))])
    kept = []
    handle = None if layer is None else demo.model.blocks[layer].register_forward_hook(lambda m, i, o: kept.append(o))
    try:
        with torch.no_grad():
            out = demo.model.forward_features(x)
    finally:
        if handle is not None:
            handle.remove()
    tokens = out if layer is None else kept[0]
    return tokens[:, demo.layout.patch_slice]


def test_last_layer_is_the_final_normed_output(demo, photos, result):
    expected = pca_of_tokens(_model_tokens(demo, photos, None), grid_size=demo.layout.grid_size)
    assert isinstance(result, FeaturesPCAResult)
    assert result.layer == demo.depth - 1 and result.tokens == "final-norm"
    np.testing.assert_allclose(result.pca.components, expected.components, atol=1e-5)
    np.testing.assert_allclose(result.pca.explained_variance_ratio, expected.explained_variance_ratio, atol=1e-6)
    np.testing.assert_array_equal(result.pca.foreground_mask, expected.foreground_mask)
    assert result.pca.rgb.shape == (3, *demo.layout.grid_size, 3) and result.photos is not None
    assert result.images == tuple(photos) and result.source == demo.source


def test_an_inner_layer_is_the_blocks_raw_output(demo, photos):
    ours = features_pca(demo, photos, layer=0, foreground="none", num_components=4, batch_size=3)
    expected = pca_of_tokens(
        _model_tokens(demo, photos, 0), grid_size=demo.layout.grid_size, num_components=4, foreground="none"
    )
    assert ours.layer == 0 and ours.tokens == "block-output"
    np.testing.assert_allclose(ours.pca.components, expected.components, atol=1e-5)
    np.testing.assert_allclose(ours.pca.scores, expected.scores, atol=1e-4)
    assert ours.layer != features_pca(demo, photos, layer=-2, foreground="none").layer


def test_batch_size_does_not_change_the_result_and_progress_counts_every_pass(demo, photos, result):
    calls = []
    one = features_pca(demo, photos, batch_size=1, progress=lambda done, total: calls.append((done, total)))
    np.testing.assert_allclose(one.pca.components, result.pca.components, atol=1e-5)
    assert calls[-1] == (9, 9) and len(calls) == 9  # three passes over three images, one image per batch


def test_plot_and_figure(result):
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    assert isinstance(result.plot(), Axes) and isinstance(result.figure(), Figure)
    fig = Figure()
    ax = fig.add_subplot()
    assert result.plot(ax=ax, index=2) is ax and ax.images
    assert ax.images[0].get_array().shape[:2] == (result.photos[2].height, result.photos[2].width)  # upsampled
    with pytest.raises(ParameterError, match="index must be"):
        result.plot(index=3)


def test_save_writes_the_cli_files_and_reads_back_equal(result, tmp_path):
    files = result.save(tmp_path, meta={"command": "test"})
    assert sorted(f.name for f in files) == ["features.json", "features.npz", "features.png"]
    saved = json.loads((tmp_path / "features.json").read_text())
    assert saved.pop("meta") == {"command": "test"} and saved == result.to_dict()
    assert len(saved["explained_variance_ratio"]) == 3 and saved["foreground"] == "auto"
    with np.load(tmp_path / "features.npz") as npz:
        np.testing.assert_array_equal(npz["rgb"], result.pca.rgb)
        assert npz["components"].shape == (3, result.pca.mean.shape[0])
    back = load_result(tmp_path)
    assert isinstance(back, FeaturesPCAResult) and back == result and back.photos is None
    assert back != dataclasses.replace(result, layer=0)
    back.save(tmp_path / "again")  # without photos: the maps alone


def test_repr_summary_registry_and_flat_name(result):
    text = repr(result)
    assert "\n" not in text and text.startswith("<FeaturesPCAResult features: 3 images, layer 3 (final-norm)")
    assert get("features") is DEFINITION and DEFINITION.order == 45 and DEFINITION.result is FeaturesPCAResult
    assert vitlens.features_pca is features_pca and vitlens.FeaturesPCAResult is FeaturesPCAResult
    assert result.key_numbers()["num_images"] == 3


@pytest.mark.parametrize(
    ("options", "param", "message"),
    [
        ({"layer": 4}, "layer", "layer 4 is out of range"),
        ({"layer": 1.0}, "layer", "layer must be a 0-based"),
        ({"num_components": 10_000}, "num_components", "at most"),
        ({"num_components": 0}, "num_components", "at least 1"),
        ({"foreground": "maybe"}, "foreground", "foreground must be auto, none"),
        ({"batch_size": 0}, "batch_size", "batch_size must be at least 1"),
    ],
)
def test_bad_options_name_their_parameter(demo, photos, options, param, message):
    with pytest.raises(ParameterError, match=message) as info:
        features_pca(demo, photos, **options)
    assert info.value.param == param
