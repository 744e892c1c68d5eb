"""Tests of the data layer: sources, splits, subsets, mode conversion, geometry and skipping bad images.

Folders without images, unreadable images, odd names, symlink loops and empty classes: test_reliability_data.py.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlens.data import Batch, ImageDataset, iterate_batches, known_datasets, open_dataset
from vitlens.errors import ParameterError, UsageError, VitlensError
from vitlens.layout import Preprocess

SHARED = Path(__file__).resolve().parents[2] / "shared"


def identity(in_chans: int = 3, size: tuple[int, int] = (4, 4), **kw) -> Preprocess:
    """Preprocess whose output times 255 is the 8-bit pixel value (mean 0, std 1), no resampling blur."""
    return Preprocess(img_size=size, in_chans=in_chans, mean=(0.0,) * in_chans, std=(1.0,) * in_chans, **kw)


def pixels(dataset: ImageDataset, index: int = 0) -> np.ndarray:
    """8-bit values the model sees for ``index``, ``[C, H, W]``."""
    item = dataset[index]
    assert item is not None
    return (item[0] * 255).round().numpy()


def save(path: Path, img: Image.Image | None = None, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (img if img is not None else Image.new("RGB", (6, 6), (value, value, value))).save(path)
    return path


def make_folder(root: Path, counts: dict[str, int]) -> Path:
    """ImageFolder with ``counts[cls]`` tiny PNGs per class; pixel value encodes the class order."""
    for c, (cls, n) in enumerate(counts.items()):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            save(root / cls / f"{i:03d}.png", value=10 * c)
    return root


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vitlens" and r.levelno == logging.WARNING]


def collect(dataset: ImageDataset, **kw) -> list[Batch]:
    return list(iterate_batches(dataset, **kw))


# ---------------------------------------------------------------- digits and the hold-out split


def test_digits_split_is_disjoint_stratified_and_complete():
    from sklearn.datasets import load_digits

    target = load_digits().target
    pre = identity(1, (8, 8))
    train = open_dataset("digits", pre, split="train")
    test = open_dataset("digits", pre, split="test")
    everything = open_dataset("digits", pre, split="all")
    assert len(train) + len(test) == len(everything) == 1797
    assert set(train.names).isdisjoint(test.names)
    assert set(train.names) | set(test.names) == set(everything.names)
    assert train.classes == test.classes == [str(d) for d in range(10)]
    assert train.labels.dtype == np.int64
    per_class = np.bincount(target, minlength=10)
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), np.round(0.2 * per_class))
    np.testing.assert_array_equal(np.bincount(train.labels, minlength=10) + np.bincount(test.labels), per_class)
    assert test.spec == "digits:test" and train.spec == "digits:train"
    # Deterministic: a second opening gives the same hold-out.
    assert open_dataset("digits", pre, split="test").names == test.names


def test_digits_pixels_are_scaled_to_8_bits_and_labels_match():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    ds = open_dataset("digits", identity(1, (8, 8)), split="all")
    i = 7
    assert ds.names[i].endswith(f"/{i:04d}")
    expected = np.rint(bunch.images[i] * 255 / 16)
    np.testing.assert_array_equal(pixels(ds, i)[0], expected)
    np.testing.assert_array_equal(np.asarray(ds.load_pil(i, cropped=False)), expected)
    assert ds[i][1] == bunch.target[i] and ds[i][2] == i


def test_digits_upsampled_to_model_size_rgb():
    ds = open_dataset("digits", Preprocess(img_size=(32, 32), in_chans=3), split="test")
    image, label, index = ds[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label == ds.labels[3] and index == 3
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # grey replicated
    assert ds.load_pil(3).size == (32, 32) and ds.load_pil(3).mode == "RGB"


# ---------------------------------------------------------------- normalisation and geometry


def test_constant_image_gets_mean_and_std_applied(tmp_path):
    path = save(tmp_path / "c.png", Image.new("RGB", (10, 10), (255, 0, 51)))
    pre = Preprocess(img_size=(8, 8), mean=(0.5, 0.25, 0.1), std=(0.5, 0.25, 0.2))
    image = open_dataset(str(path), pre)[0][0]
    expected = [(1.0 - 0.5) / 0.5, (0.0 - 0.25) / 0.25, (0.2 - 0.1) / 0.2]
    for c in range(3):
        torch.testing.assert_close(image[c], torch.full((8, 8), expected[c]))


def test_grey_model_with_rgb_default_stats_uses_their_average(tmp_path):
    path = save(tmp_path / "g.png", Image.new("L", (4, 4), 255))
    pre = Preprocess(img_size=(4, 4), in_chans=1, mean=(0.2, 0.4, 0.6), std=(0.5, 0.5, 0.5))
    image = open_dataset(str(path), pre)[0][0]
    assert image.shape == (1, 4, 4)
    torch.testing.assert_close(image, torch.full((1, 4, 4), (1.0 - 0.4) / 0.5))


def striped(width: int, height: int) -> Image.Image:
    """Red channel = 6 * column index, so a crop's columns say where it came from."""
    row = (np.arange(width) * 6).astype(np.uint8)
    red = np.tile(row, (height, 1))
    return Image.fromarray(np.stack([red, red, red], axis=-1), "RGB")


def test_square_input_resizes_shorter_side_and_centre_crops(tmp_path):
    path = save(tmp_path / "wide.png", striped(40, 20))
    # crop_pct 0.5: shorter side to floor(10 / 0.5) = 20, i.e. no resize; centre crop starts at column 15.
    ds = open_dataset(str(path), identity(3, (10, 10), crop_pct=0.5, interpolation="nearest"))
    np.testing.assert_array_equal(pixels(ds)[0, 0], np.arange(15, 25) * 6)
    # crop_pct 1: 40x20 -> 20x10 (nearest keeps source column 2j + 1), crop starts at column 5.
    ds = open_dataset(str(path), identity(3, (10, 10), interpolation="nearest"))
    np.testing.assert_array_equal(pixels(ds)[0, 0], (2 * np.arange(5, 15) + 1) * 6)


def test_non_square_input_resizes_both_sides(tmp_path):
    # A 2:1 image into a 16x32 model: resized to exactly (16, 32), left half dark, right half bright.
    half = np.zeros((10, 20), dtype=np.uint8)
    half[:, 10:] = 255
    path = save(tmp_path / "half.png", Image.fromarray(half, "L"))
    ds = open_dataset(str(path), identity(3, (16, 32), interpolation="nearest"))
    values = pixels(ds)
    assert values.shape == (3, 16, 32)
    assert (values[:, :, :16] == 0).all() and (values[:, :, 16:] == 255).all()
    # A square image into the same model is stretched, not cropped to a square: every column survives.
    path = save(tmp_path / "sq.png", striped(32, 32))
    ds = open_dataset(str(path), identity(3, (16, 32), interpolation="nearest"))
    np.testing.assert_array_equal(pixels(ds)[0, 0], np.arange(32) * 6)


def _sample_photo(name: str) -> Image.Image:
    from sklearn.datasets import load_sample_image

    if name == "tall":  # 427 x 263 (H x W): portrait, and 256 * 427 / 263 = 415.6 is far from a whole number
        return Image.fromarray(load_sample_image("flower.jpg")[:, 150:413])
    return Image.fromarray(load_sample_image(name))  # 427 x 640, landscape


@pytest.mark.parametrize("size", [(224, 224), (160, 224), (224, 160)])
@pytest.mark.parametrize("crop_pct", [0.875, 0.9, 1.0])
@pytest.mark.parametrize(
    ("photo", "interpolation"), [("china.jpg", "bicubic"), ("flower.jpg", "bilinear"), ("tall", "bicubic")]
)
def test_centre_crop_equals_timms_eval_transform_on_non_square_photos(tmp_path, photo, interpolation, crop_pct, size):
    # Non-square photos resize their shorter side to floor(224 / crop_pct) and their longer side in proportion:
    # 383.7 px for china.jpg at 0.875, which torchvision's Resize (under timm) truncates; rounding would give 384 and a
    # different centre crop. Real photos, so that a shift or a rescale of the crop changes the pixels.
    from timm.data import create_transform

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    image = _sample_photo(photo)
    path = save(tmp_path / "photo.png", image)  # lossless: both sides read the same pixels
    # Non-square model inputs keep the photo's aspect too (timm's ResizeKeepRatio), then crop the centre.
    pre = Preprocess(img_size=size, mean=mean, std=std, interpolation=interpolation, crop_pct=crop_pct)
    ours = open_dataset(str(path), pre)[0][0]  # [3, H, W]
    timm_eval = create_transform(
        input_size=(3, *size), interpolation=interpolation, mean=mean, std=std, crop_pct=crop_pct, crop_mode="center"
    )
    theirs = timm_eval(image)  # [3, H, W]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- mode conversion


def luma(r: int, g: int, b: int) -> float:
    return 0.299 * r + 0.587 * g + 0.114 * b


def palette_image() -> Image.Image:
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
    return img


@pytest.mark.parametrize(
    ("name", "img", "rgb"),
    [
        ("transparent.png", Image.new("RGBA", (4, 4), (255, 0, 0, 0)), (255, 255, 255)),
        ("opaque.png", Image.new("RGBA", (4, 4), (0, 0, 255, 255)), (0, 0, 255)),
        ("half.png", Image.new("RGBA", (4, 4), (0, 0, 0, 128)), (127, 127, 127)),
        ("palette.png", palette_image(), (10, 200, 30)),
        ("cmyk.tif", Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
        ("la.png", Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
        ("bw.png", Image.new("1", (4, 4), 1), (255, 255, 255)),
        ("mid16.png", Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)), (128, 128, 128)),
        ("white16.png", Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)), (255, 255, 255)),
        ("dark16.png", Image.fromarray(np.full((4, 4), 2570, dtype=np.uint16)), (10, 10, 10)),
    ],
)
def test_modes_convert_to_rgb_and_grey(tmp_path, name, img, rgb):
    path = save(tmp_path / name, img)
    colour = pixels(open_dataset(str(path), identity(3)))
    grey = pixels(open_dataset(str(path), identity(1)))
    assert colour.shape == (3, 4, 4) and grey.shape == (1, 4, 4)
    for c in range(3):
        assert np.abs(colour[c] - rgb[c]).max() <= 1, (name, colour[:, 0, 0])
    assert np.abs(grey[0] - luma(*rgb)).max() <= 1, (name, grey[0, 0, 0])


def test_16_bit_gradient_keeps_its_range(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (4, 1))
    path = save(tmp_path / "ramp.png", Image.fromarray(ramp))
    assert Image.open(path).mode.startswith("I")  # really a 16-bit file
    values = pixels(open_dataset(str(path), identity(1, (4, 16))))[0, 0]
    np.testing.assert_array_equal(values, np.rint(ramp[0] / 257))


# ---------------------------------------------------------------- folders and files


def test_image_folder_labelled_with_sorted_classes_and_holdout(tmp_path):
    root = make_folder(tmp_path / "data", {"zebra": 10, "ant": 5, "moth": 20})
    pre = identity(3)
    train = open_dataset(str(root), pre, split="train")
    test = open_dataset(str(root), pre, split="test")
    everything = open_dataset(root, pre, split="all")
    assert everything.classes == ["ant", "moth", "zebra"]
    assert len(everything) == 35
    assert Counter(test.labels.tolist()) == {0: 1, 1: 4, 2: 2}  # round(0.2 * n) per class
    assert set(train.names).isdisjoint(test.names)
    assert sorted(train.names + test.names) == sorted(everything.names)
    for i, name in enumerate(everything.names):
        assert name.split("/")[0] == everything.classes[everything.labels[i]]
    assert everything.names[0] == "ant/000.png"
    assert test.spec == f"{root.resolve()}:test"


def test_train_test_subfolders_pick_the_split(tmp_path, caplog):
    root = tmp_path / "data"
    make_folder(root / "train", {"cat": 3, "dog": 4, "eel": 2})
    make_folder(root / "test", {"cat": 2, "dog": 1})
    with caplog.at_level(logging.WARNING, logger="vitlens"):
        test = open_dataset(str(root), identity(3), split="test")
    assert test.classes == ["cat", "dog", "eel"]
    assert test.names == ["test/cat/000.png", "test/cat/001.png", "test/dog/000.png"]
    assert test.labels.tolist() == [0, 0, 1]
    assert any("'eel'" in m for m in warnings_of(caplog))
    train = open_dataset(str(root), identity(3), split="train")
    assert len(train) == 9 and all(n.startswith("train/") for n in train.names)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert len(open_dataset(str(root), identity(3), split="all")) == 12


def test_unlabelled_folder_ignores_split(tmp_path):
    for name in ("b.png", "a.jpg", "c.PNG"):
        save(tmp_path / "imgs" / name)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    train = open_dataset(str(tmp_path / "imgs"), identity(3), split="train")
    test = open_dataset(str(tmp_path / "imgs"), identity(3), split="test")
    assert train.names == test.names == ["a.jpg", "b.png", "c.PNG"]
    assert train.labels is None and train.classes is None
    assert train[0][1] == -1
    batches = collect(train, batch_size=2)
    assert [b.labels.tolist() for b in batches] == [[-1, -1], [-1]]


def test_explicit_files_keep_their_order(tmp_path):
    paths = [save(tmp_path / f"{n}.png", value=v) for n, v in (("z", 30), ("a", 60), ("m", 90))]
    ds = open_dataset([str(p) for p in paths], identity(3))
    assert ds.names == [str(p) for p in paths]
    assert [pixels(ds, i)[0, 0, 0] for i in range(3)] == [30, 60, 90]
    assert ds.labels is None and ds.spec.startswith("files:3:")
    assert open_dataset(list(reversed(paths)), identity(3)).spec != ds.spec


def test_single_file_spec(tmp_path):
    path = save(tmp_path / "one.png", value=200)
    ds = open_dataset(str(path), identity(3))
    assert len(ds) == 1 and ds.spec == str(path.resolve())
    assert pixels(ds)[0, 0, 0] == 200


# ---------------------------------------------------------------- unreadable images


def test_zero_size_image_is_unreadable():
    # PIL refuses to write or open a 0x0 file, so a reader hands one over directly.
    ds = ImageDataset(
        keys=[0, 1],
        reader=lambda key: Image.new("L", (0, 0) if key == 0 else (3, 3), 7),
        names=["empty", "fine"],
        labels=None,
        classes=None,
        spec="test",
        preprocess=identity(3),
    )
    assert ds[0] is None
    assert pixels(ds, 1)[:, 0, 0].tolist() == [7, 7, 7]


def test_non_image_file_given_explicitly_is_unreadable(tmp_path, caplog):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    good = save(tmp_path / "ok.png")
    ds = open_dataset([text, good], identity(3))
    with caplog.at_level(logging.WARNING, logger="vitlens"):
        batches = collect(ds, batch_size=4)
    assert batches[0].indices.tolist() == [1]
    assert "skipped 1 unreadable image (e.g." in warnings_of(caplog)[0]
    with pytest.raises(VitlensError, match="none of the 1 images"):
        collect(open_dataset(str(text), identity(3)), batch_size=1)


# ---------------------------------------------------------------- subsets


def test_num_images_is_stratified_and_deterministic(tmp_path):
    root = make_folder(tmp_path / "data", {"a": 30, "b": 10})
    ds = open_dataset(str(root), identity(3), split="all", num_images=8, seed=3)
    assert Counter(ds.labels.tolist()) == {0: 6, 1: 2}  # proportional: 8 * 30/40 and 8 * 10/40
    assert ds.names == sorted(ds.names)  # original order kept
    again = open_dataset(str(root), identity(3), split="all", num_images=8, seed=3)
    assert again.names == ds.names and again.spec == ds.spec
    # A rare class keeps one image where strict proportion (4 * 2/32 = 0.25) would drop it.
    rare = make_folder(tmp_path / "rare", {"common": 30, "rare": 2})
    assert Counter(open_dataset(str(rare), identity(3), split="all", num_images=4).labels.tolist()) == {0: 3, 1: 1}
    others = {tuple(open_dataset(str(root), identity(3), split="all", num_images=8, seed=s).names) for s in range(5)}
    assert len(others) > 1


def test_num_images_on_digits_keeps_every_class():
    full = open_dataset("digits", identity(1, (8, 8)), split="test")
    sub = open_dataset("digits", identity(1, (8, 8)), split="test", num_images=50, seed=1)
    counts = np.bincount(sub.labels, minlength=10)
    assert counts.sum() == 50 and counts.min() >= 4 and counts.max() <= 6
    assert set(sub.names) <= set(full.names)
    assert sub.spec == "digits:test#n=50,seed=1"
    # Fewer images than classes: no class twice, all distinct images.
    tiny = open_dataset("digits", identity(1, (8, 8)), split="test", num_images=7)
    assert len(set(tiny.labels.tolist())) == 7


def test_num_images_unlabelled_is_a_seeded_subset(tmp_path):
    for i in range(10):
        save(tmp_path / "imgs" / f"{i}.png")
    a = open_dataset(str(tmp_path / "imgs"), identity(3), num_images=4, seed=0)
    b = open_dataset(str(tmp_path / "imgs"), identity(3), num_images=4, seed=0)
    assert len(a) == 4 and a.names == b.names and a.names == sorted(a.names)


def test_num_images_more_than_available_uses_all(tmp_path, caplog):
    root = make_folder(tmp_path / "data", {"a": 2})
    with caplog.at_level(logging.WARNING, logger="vitlens"):
        ds = open_dataset(str(root), identity(3), split="all", num_images=100)
    assert len(ds) == 2 and ds.spec == f"{root.resolve()}:all"
    assert any("asked for 100 images" in m for m in warnings_of(caplog))


@pytest.mark.parametrize("n", [0, -3])
def test_num_images_must_be_positive(n):
    with pytest.raises(ParameterError, match="num_images must be a positive number") as info:
        open_dataset("digits", identity(1), num_images=n)
    assert info.value.param == "num_images" and isinstance(info.value, ValueError)


# ---------------------------------------------------------------- errors


def test_require_labels_on_unlabelled_data(tmp_path):
    path = save(tmp_path / "one.png")
    with pytest.raises(VitlensError, match="has no labels; .*ImageFolder"):
        open_dataset(str(path), identity(3), require_labels=True)
    assert open_dataset("digits", identity(1), require_labels=True).labels is not None


def test_unknown_spec_lists_known_names(tmp_path):
    with pytest.raises(ParameterError, match="^spec '.*no-such-thing' is neither a known dataset") as info:
        open_dataset(str(tmp_path / "no-such-thing"), identity(3))
    assert info.value.param == "spec"
    message = str(info.value)
    assert "\n" not in message
    assert all(name in message for name in known_datasets())


@pytest.mark.parametrize("name", [n for n in known_datasets() if n != "digits"])
def test_absent_torchvision_dataset_says_how_to_get_it(tmp_path, name):
    with pytest.raises(VitlensError, match="--download") as info:
        open_dataset(name, identity(3), data_root=tmp_path / "empty")
    assert "--data-root" in str(info.value) and "\n" not in str(info.value)
    assert not isinstance(info.value, UsageError)


def test_bad_options_are_parameter_errors():
    ds = open_dataset("digits", identity(1, (8, 8)), num_images=5)
    with pytest.raises(ParameterError, match="^batch_size must be at least 1") as batch:
        iterate_batches(ds, batch_size=0)
    with pytest.raises(ParameterError, match="split must be one of") as split:
        open_dataset("digits", identity(1), split="validation")
    with pytest.raises(ParameterError, match="^spec is an empty list") as spec:
        open_dataset([], identity(3))
    assert (batch.value.param, split.value.param, spec.value.param) == ("batch_size", "split", "spec")


def test_missing_file_in_list(tmp_path):
    good = save(tmp_path / "ok.png")
    with pytest.raises(VitlensError, match="not found: .*gone.png"):
        open_dataset([good, tmp_path / "gone.png"], identity(3))


def test_batches_cover_the_dataset_in_order():
    ds = open_dataset("digits", Preprocess(img_size=(16, 16), in_chans=1), split="test", num_images=23)
    batches = collect(ds, batch_size=10)
    assert [len(b.indices) for b in batches] == [10, 10, 3]
    assert torch.cat([b.indices for b in batches]).tolist() == list(range(23))
    assert torch.cat([b.labels for b in batches]).tolist() == ds.labels.tolist()
    assert batches[0].images.shape == (10, 1, 16, 16) and batches[0].labels.dtype == torch.int64


def test_shared_cifar10_small():
    root = SHARED / "data" / "cifar10-small"
    if not (root / "test").is_dir():
        pytest.skip(f"{root} is not here (the shared data folder of the project checkout)")
    pre = Preprocess(img_size=(32, 32))
    test = open_dataset(str(root), pre, split="test")
    train = open_dataset(str(root), pre, split="train")
    assert test.classes == sorted(test.classes) and len(test.classes) == 10 and "airplane" in test.classes
    assert Counter(test.labels.tolist()) == dict.fromkeys(range(10), 100)
    assert len(train) == 1000 and all(n.startswith("train/") for n in train.names)
    batch = collect(open_dataset(str(root), pre, num_images=20), batch_size=20)[0]
    assert batch.images.shape == (20, 3, 32, 32)
    assert sorted(Counter(batch.labels.tolist()).values()) == [2] * 10


def test_an_empty_subset_iterates_to_nothing():
    ds = open_dataset("digits", identity(1, (8, 8)), num_images=10)
    empty = ds.subset([], tag="none")
    assert len(empty) == 0 and empty.spec.endswith("#none")
    assert list(iterate_batches(empty, batch_size=4)) == []  # not an error about unreadable images
    picked = ds.subset([3, 1], tag="two")
    assert picked.names == [ds.names[3], ds.names[1]] and list(picked.labels) == [ds.labels[3], ds.labels[1]]
