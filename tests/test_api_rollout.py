"""``vitlens.rollout`` on the demo model and 8 digits: the numbers are the driver's, specs, folders and files are
opened as the CLI opens them, bad options name their parameter, and the result draws, saves, reads back (without
its photos) and prints what the CLI command does."""

from __future__ import annotations

import dataclasses
import json
from types import MethodType, SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import assert_one_line_error, make_vit
from vitlens.attention import head_attention_for, rollout_for
from vitlens.capture import attention_capture
from vitlens.cli.app import app
from vitlens.data import open_dataset
from vitlens.definitions.rollout import DEFINITION, RolloutResult, rollout, rollout_settings, unique_stems
from vitlens.errors import ParameterError, VitlensError
from vitlens.layout import Preprocess
from vitlens.models.vit import ViT
from vitlens.registry import get
from vitlens.result import load_result

NUM_IMAGES = 8  # also defaults.ROLLOUT_DATA_IMAGES, what a bare spec string gives


@pytest.fixture(scope="module")
def dataset(demo):
    return open_dataset("digits", demo.preprocess, split="test", num_images=NUM_IMAGES)


@pytest.fixture(scope="module")
def result(demo, dataset):
    return rollout(demo, dataset)


@pytest.fixture(scope="module")
def per_head(demo, dataset):
    small = open_dataset("digits", demo.preprocess, split="test", num_images=3)
    return rollout(demo, small, head_fusion="max", discard_ratio=0.5, start_layer=1, per_head_layer=-1)


@pytest.fixture(scope="module")
def thresholded(demo):
    small = open_dataset("digits", demo.preprocess, split="test", num_images=3)
    return rollout(demo, small, per_head_layer=-1, threshold=0.6)


def kept_by_hand(row: np.ndarray, mass: float) -> np.ndarray:
    """The smallest set holding ``mass`` of ``row`` [HW]: strongest patches first (lower index on ties) until the
    running share reaches ``mass``."""
    keep = np.zeros(row.shape, dtype=bool)
    share = row.astype(np.float64) / row.sum()
    held = 0.0
    for index in sorted(range(len(row)), key=lambda i: (-share[i], i)):
        if held >= mass:
            break
        keep[index], held = True, held + share[index]
    return keep


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / "cat.png")
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8), "L").save(folder / "dog.jpg")
    return folder


def test_the_numbers_are_the_drivers(demo, dataset, result):
    expected = rollout_for(demo, dataset)
    assert isinstance(result, RolloutResult)
    np.testing.assert_array_equal(result.rollout.maps, expected.maps)
    np.testing.assert_array_equal(result.rollout.patch_mass, expected.patch_mass)
    assert result.rollout.target == "cls" and result.target_defaulted is True and result.heads is None
    assert result.images == tuple(dataset.names) and result.stems == tuple(unique_stems(dataset.names))
    assert (result.source, result.data, result.patch_size) == (demo.source, dataset.spec, demo.layout.patch_size)
    assert len(result.photos) == NUM_IMAGES
    assert np.array_equal(np.asarray(result.photos[3]), np.asarray(dataset.load_pil(3)))
    key = result.key_numbers()
    assert key == {"num_images": NUM_IMAGES, "target": "cls", "mean_patch_mass": float(expected.patch_mass.mean())}


def test_a_spec_string_a_folder_and_files_are_opened_as_the_cli_opens_them(demo, result, photos):
    assert rollout(demo, "digits") == result  # the test split, defaults.ROLLOUT_DATA_IMAGES images
    assert rollout(demo, "digits", split="test", num_images=NUM_IMAGES) == result
    folder = rollout(demo, str(photos))  # every image of a folder: no train/test hold-out
    assert (
        sorted(folder.images) == ["cat.png", "dog.jpg"] and folder.data == open_dataset(photos, demo, split="all").spec
    )
    assert rollout(demo, [photos]) == folder
    files = [str(photos / "dog.jpg"), str(photos / "cat.png")]
    assert rollout(demo, files).images == tuple(files)
    assert rollout(demo, files[0]).images == (files[0],)


def test_options_and_per_head_maps_reach_the_drivers(demo, per_head):
    small = open_dataset("digits", demo.preprocess, split="test", num_images=3)
    expected = rollout_for(demo, small, head_fusion="max", discard_ratio=0.5, start_layer=1)
    np.testing.assert_array_equal(per_head.rollout.maps, expected.maps)
    r = per_head.rollout
    assert (r.head_fusion, r.discard_ratio, r.start_layer, r.num_layers) == ("max", 0.5, 1, demo.depth - 1)
    assert per_head.heads_layer == demo.depth - 1  # -1 resolved
    np.testing.assert_array_equal(per_head.heads, head_attention_for(demo, small, layer=-1))
    assert rollout_settings(r) == f"cls token, max over heads, discard 0.5, layers 1-{demo.depth - 1}"

    calls = []
    rollout(demo, small, per_head_layer=0, batch_size=2, progress=lambda *a: calls.append(a))
    assert calls[-1] == (6, 6) and all(total == 6 for _, total in calls)  # both passes on one count


def test_plot_and_figure(result):
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    assert isinstance(result.plot(), Axes) and isinstance(result.figure(), Figure)
    fig = Figure()
    ax = fig.add_subplot()
    assert result.plot(ax=ax, index=-1) is ax and len(ax.images) == 2  # the photo in grey, the map over it
    assert ax.get_title() == result.images[-1].rsplit("/", 1)[-1]
    with pytest.raises(ParameterError, match="index must be an image's position, 0..7, not 8") as info:
        result.plot(index=NUM_IMAGES)
    assert info.value.param == "index"


def test_save_writes_the_cli_files_and_reads_back_equal_without_photos(result, tmp_path):
    from matplotlib.figure import Figure

    files = result.save(tmp_path, meta={"command": "test"})
    per_image = sorted(f"rollout/{stem}.png" for stem in result.stems)
    written = sorted(f.relative_to(tmp_path).as_posix() for f in files)
    assert written == sorted([*per_image, "rollout.json", "rollout.npz", "rollout.png"])
    saved = json.loads((tmp_path / "rollout.json").read_text())
    assert saved.pop("meta") == {"command": "test"}
    assert list(saved) == list(result.to_dict()) and saved == result.to_dict()

    back = load_result(tmp_path)
    assert isinstance(back, RolloutResult) and back == result and back.photos is None
    assert back != dataclasses.replace(result, source="other")
    ax = back.plot(index=2)  # the map alone, one square per patch
    assert len(ax.images) == 1 and ax.images[0].get_array().shape == result.rollout.grid_size
    assert isinstance(back.figure(), Figure) and "<img" in back._repr_html_()
    with pytest.raises(VitlensError, match="no photos"):
        back.save(tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_per_head_maps_are_saved_and_read_back(per_head, tmp_path):
    files = per_head.save(tmp_path, fmt="svg")
    layer = per_head.heads_layer
    assert {f.name for f in files} >= {f"rollout_heads_L{layer}.svg", "rollout.svg", "rollout.npz"}
    assert json.loads((tmp_path / "rollout.json").read_text())["heads_layer"] == layer
    back = load_result(tmp_path)
    assert back == per_head and back.heads.shape == per_head.heads.shape
    assert back != dataclasses.replace(per_head, heads=None, heads_layer=None)


def test_threshold_masks_hold_the_mass_and_are_saved_and_read_back(demo, per_head, thresholded, tmp_path):
    heads, masks = thresholded.heads, thresholded.heads_masks  # [B, heads, H, W]
    assert thresholded.threshold == 0.6 and masks.shape == heads.shape and masks.dtype == bool
    np.testing.assert_array_equal(heads, per_head.heads)  # the per-head maps themselves do not change
    rows, keep = heads.reshape(-1, heads[0, 0].size), masks.reshape(-1, heads[0, 0].size)
    for row, kept in zip(rows, keep, strict=True):
        np.testing.assert_array_equal(kept, kept_by_hand(row, 0.6))
        assert row[kept].sum() >= 0.6 * row.sum() > row[kept].sum() - row[kept].min()
    assert 0 < keep.sum() < keep.size  # neither empty nor everything: the masks are informative

    files = thresholded.save(tmp_path)
    layer = demo.depth - 1
    assert {f.name for f in files} >= {f"rollout_heads_L{layer}.png", f"rollout_heads_L{layer}_masks.png"}
    saved = json.loads((tmp_path / "rollout.json").read_text())
    assert saved["threshold"] == 0.6 and saved["heads_masks"] == masks.tolist()
    with np.load(tmp_path / "rollout.npz") as npz:
        assert npz["heads_masks"].dtype == bool
        np.testing.assert_array_equal(npz["heads_masks"], masks)
    back = load_result(tmp_path)
    assert back == thresholded and back.threshold == 0.6
    assert back != dataclasses.replace(thresholded, heads_masks=~masks)

    # Without a threshold nothing about the masks is written: the files stay those of --per-head alone.
    per_head.save(tmp_path / "plain")
    assert "threshold" not in json.loads((tmp_path / "plain" / "rollout.json").read_text())
    with np.load(tmp_path / "plain" / "rollout.npz") as npz:
        assert set(npz.files) == {"maps", "patch_mass", "images", "grid_size", "heads", "heads_layer"}
    assert not list((tmp_path / "plain").glob("*_masks.*"))


def test_registers_are_left_out_of_the_mass():
    model = make_vit("reg")
    vit = ViT(model, Preprocess(img_size=tuple(model.patch_embed.img_size)))
    small = open_dataset("digits", vit.preprocess, split="test", num_images=3)
    result = rollout(vit, small, per_head_layer=1, threshold=0.6)

    images = torch.stack([small[i][0] for i in range(len(small))])  # [B, C, h, w]
    kept: dict[int, torch.Tensor] = {}
    with torch.no_grad(), attention_capture(vit, lambda i, a: kept.__setitem__(i, a.clone()), layers=[1]):
        model(images)
    cls_row = kept[1][:, :, 0].double().numpy()  # [B, heads, N]: class token (index 0) to every token
    first_patch = model.num_prefix_tokens  # timm's own count: class token + 4 registers
    assert first_patch == 5 and (cls_row[..., 1:first_patch].sum(-1) > 0.01).all()  # registers hold real mass
    patches = cls_row[..., first_patch:].reshape(-1, 16)  # [B * heads, HW]
    expected = np.stack([kept_by_hand(row, 0.6) for row in patches])
    np.testing.assert_array_equal(result.heads_masks.reshape(-1, 16), expected)
    # Counting the registers as patches (DINO's [:, 1:] on a model with registers) gives other masks.
    with_registers = np.stack([kept_by_hand(row, 0.6)[first_patch - 1 :] for row in cls_row[..., 1:].reshape(-1, 20)])
    assert (with_registers != expected).any()


def test_one_image_has_no_grid_and_its_figure_is_the_per_image_one(demo, photos, tmp_path):
    one = rollout(demo, str(photos / "cat.png"))
    files = one.save(tmp_path)
    assert sorted(f.relative_to(tmp_path).as_posix() for f in files) == [
        "rollout.json",
        "rollout.npz",
        "rollout/cat.png",
    ]
    assert len(one.figure().axes) == 3  # photo, overlay, colour bar


def test_repr_summary_and_html(result):
    text = repr(result)
    assert "\n" not in text
    assert text.startswith(f"<RolloutResult rollout: {NUM_IMAGES} images, cls token, mean mass on patches 0.")
    assert "<img" in result._repr_html_()


@pytest.mark.parametrize(
    ("kwargs", "param", "needle"),
    [
        ({"head_fusion": "sum"}, "head_fusion", "head_fusion must be mean, max or min, not 'sum'"),
        ({"discard_ratio": 1.0}, "discard_ratio", r"discard_ratio must be in \[0, 1\), not 1.0"),
        ({"discard_ratio": "0.1"}, "discard_ratio", r"discard_ratio must be in \[0, 1\)"),
        ({"start_layer": -1}, "start_layer", r"start_layer must be 0 or more \(0-based\), not -1"),
        ({"start_layer": 4}, "start_layer", r"start_layer 4 is out of range: the model has 4 layers \(0..3\)"),
        ({"per_head_layer": -5}, "per_head_layer", "per_head_layer -5 is out of range"),
        ({"target": "middle"}, "target", "target must be cls, dist, reg:N or mean-patch, not 'middle'"),
        ({"target": 0}, "target", "target must be cls, dist, reg:N or mean-patch, not 0"),
        ({"num_images": 3}, "num_images", "num_images applies to a data spec"),
        ({"images": "digits", "num_images": 0}, "num_images", "num_images must be a positive number, not 0"),
        ({"images": "digits", "split": "val"}, "split", "split must be one of"),
        ({"images": []}, "images", "images must name at least one image"),
        ({"batch_size": 0}, "batch_size", "batch_size must be at least 1, not 0"),
        ({"threshold": 0.6}, "threshold", "threshold needs per_head_layer"),
        ({"per_head_layer": -1, "threshold": 0.0}, "threshold", r"threshold must be in \(0, 1\], not 0.0"),
        ({"per_head_layer": -1, "threshold": 1.5}, "threshold", r"threshold must be in \(0, 1\], not 1.5"),
        ({"per_head_layer": -1, "threshold": "0.6"}, "threshold", r"threshold must be in \(0, 1\]"),
    ],
)
def test_bad_options_name_their_parameter(demo, dataset, kwargs, param, needle):
    kwargs = {"images": dataset, **kwargs}
    with pytest.raises(ParameterError, match=needle) as info:
        rollout(demo, **kwargs)
    assert isinstance(info.value, ValueError) and info.value.param == param


def test_a_token_the_model_lacks_is_not_a_parameter_error(demo, dataset):
    with pytest.raises(VitlensError, match="no 'dist' token") as info:
        rollout(demo, dataset, target="dist")
    assert not isinstance(info.value, ParameterError)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--head-fusion", "sum"], "--head-fusion must be mean, max or min"),
        (["--start-layer", "9"], "--start-layer 9 is out of range"),
        (["--per-head", "--layer", "9"], "--layer 9 is out of range"),
        (["--target", "middle"], "--target must be cls, dist, reg:N or mean-patch"),
        (["--per-head", "--threshold", "0"], "--threshold must be in (0, 1], not 0.0"),
    ],
)
def test_the_cli_speaks_the_flag(tmp_path, args, needle):
    out = tmp_path / "out"
    cli = CliRunner().invoke(app, ["rollout", "--data", "digits", "--device", "cpu", *args, "--out", str(out)])
    assert_one_line_error(cli, 2, needle)
    assert not out.exists()


def test_cli_json_and_files_are_the_results(result, tmp_path):
    args = ["rollout", "--data", "digits", "--num-images", str(NUM_IMAGES), "--device", "cpu", "--out", str(tmp_path)]
    cli = CliRunner().invoke(app, [*args, "--json"])
    assert cli.exit_code == 0, cli.output
    printed = json.loads(cli.stdout)
    assert list(printed) == [*result.to_dict(), "files", "meta"]
    assert printed["meta"]["command"] == "rollout" and printed["meta"]["batch_size"] >= 1
    assert {k: printed[k] for k in result.to_dict()} == result.to_dict()
    assert load_result(tmp_path) == result


def test_registered_and_run_by_the_report(demo, result, photos):
    assert get("rollout") is DEFINITION and DEFINITION.compute is rollout
    assert DEFINITION.result is RolloutResult and DEFINITION.needs_data
    opened = []

    def run_open(spec, *, split, num_images):
        opened.append((spec, split, num_images))
        return open_dataset(spec, demo.preprocess, split=split, num_images=num_images)

    from vitlens.report import _Run

    def fake_run(images):  # the report's run, with its real choice of images and a recording opener
        run = SimpleNamespace(**common, images=images, open=run_open)
        run.open_images = MethodType(_Run.open_images, run)
        return run

    common = {"vit": demo, "data": "digits", "split": "test", "rollout_images": NUM_IMAGES, "batch_size": None}
    run = fake_run(None)
    assert DEFINITION.section(run) == result and opened == [("digits", "test", NUM_IMAGES)]
    run = fake_run([str(photos)])
    assert sorted(DEFINITION.section(run).images) == ["cat.png", "dog.jpg"]
    assert opened[-1] == (str(photos), "all", None)
