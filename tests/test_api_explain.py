"""``vitlens.explain`` on the demo model and 4 digits: the numbers are the batch driver's, a spec string is opened as
the CLI opens it, bad options name their parameter, a backbone without a head needs a cosine score, and the result
draws, saves, reads back (without its photos) and is run by the report."""

from __future__ import annotations

import dataclasses
import json
from types import MethodType, SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import assert_one_line_error, make_vit
from vitlens.attention import rollout_for
from vitlens.cli.app import app
from vitlens.data import iterate_batches, open_dataset
from vitlens.definitions.explain import DEFINITION, ExplainResult, explain, explain_batch
from vitlens.errors import NotApplicable, ParameterError, VitlensError
from vitlens.layout import Preprocess
from vitlens.models.vit import ViT
from vitlens.registry import get
from vitlens.result import load_result

NUM_IMAGES = 4


@pytest.fixture(scope="module")
def dataset(demo):
    return open_dataset("digits", demo.preprocess, split="test", num_images=NUM_IMAGES)


@pytest.fixture(scope="module")
def result(demo, dataset):
    return explain(demo, dataset)


def test_the_numbers_are_the_batch_drivers(demo, dataset, result):
    images = next(iter(iterate_batches(dataset, batch_size=NUM_IMAGES))).images
    maps, classes, scores = explain_batch(demo, images, method="attribution", target="cls")
    e = result.explanation
    np.testing.assert_allclose(e.maps, maps, atol=1e-6)
    assert e.classes.tolist() == classes.tolist() and e.classes.dtype == np.int64
    np.testing.assert_allclose(e.scores, scores.double().numpy(), rtol=1e-6)
    logits = demo.model(images).detach()
    assert e.classes.tolist() == logits.argmax(-1).tolist()  # predicted by default
    assert (e.method, e.target, e.num_layers, result.class_requested) == ("attribution", "cls", demo.depth, "pred")
    assert result.images == tuple(dataset.names) and len(result.photos) == NUM_IMAGES
    assert result.score == "logit" and result.target_defaulted
    key = result.key_numbers()
    assert key["method"] == "attribution" and key["mean_score"] == pytest.approx(float(e.scores.mean()))


def test_batch_size_does_not_change_the_maps(demo, dataset, result):
    again = explain(demo, dataset, batch_size=3)
    np.testing.assert_allclose(again.explanation.maps, result.explanation.maps, atol=1e-6)


def test_rollout_method_is_rollout(demo, dataset):
    got = explain(demo, dataset, method="rollout", discard_ratio=0.2)
    np.testing.assert_allclose(got.explanation.maps, rollout_for(demo, dataset, discard_ratio=0.2).maps, atol=1e-6)


def test_a_spec_string_is_opened_as_the_cli_opens_it(demo, result):
    assert explain(demo, "digits", num_images=NUM_IMAGES) == result


def test_a_class_index_and_name(demo, dataset):
    got = explain(demo, dataset, class_=3, method="last-layer")
    assert got.explanation.classes.tolist() == [3] * NUM_IMAGES and got.class_requested == "3"
    if demo.class_names:
        name = demo.class_names[3]
        by_name = explain(demo, dataset, class_=name, method="last-layer")
        np.testing.assert_array_equal(by_name.explanation.maps, got.explanation.maps)
        assert by_name.class_names == (name,) * NUM_IMAGES


def backbone() -> ViT:
    model = make_vit("reg")
    model.reset_classifier(0)
    return ViT(model, Preprocess(img_size=tuple(model.patch_embed.img_size)))


def test_a_backbone_needs_a_cosine_score(tmp_path):
    from PIL import Image

    vit = backbone()
    rng = np.random.default_rng(0)
    paths = []
    for name in ("ref", "a", "b"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    with pytest.raises(ParameterError, match="score must be 'cosine:IMAGE' for a model without a classifier head") as e:
        explain(vit, paths[1:])
    assert e.value.param == "score"
    with pytest.raises(ParameterError, match="class_ 2 needs a classifier head") as e:
        explain(vit, paths[1:], class_=2)
    assert e.value.param == "class_"

    got = explain(vit, paths, score=f"cosine:{paths[0]}")
    e = got.explanation
    assert e.classes.tolist() == [-1, -1, -1] and got.class_names is None
    assert e.scores[0] == pytest.approx(1.0, abs=1e-5)  # the reference is its own best match
    ds = open_dataset(paths, vit.preprocess)
    x = torch.stack([ds[i][0] for i in range(3)])
    with torch.no_grad():
        feats = vit.pre_logits(vit.features(x))
    expected = torch.nn.functional.cosine_similarity(feats, feats[:1], dim=-1)
    np.testing.assert_allclose(e.scores, expected.double().numpy(), atol=1e-5)
    assert np.isfinite(e.maps).all() and e.maps.shape == (3, 4, 4)
    with pytest.raises(ParameterError, match="applies to logit scores") as info:
        explain(vit, paths, score=f"cosine:{paths[0]}", class_=1)
    assert info.value.param == "class_"
    with pytest.raises(NotApplicable):
        DEFINITION.section(SimpleNamespace(vit=vit))


def test_plot_figure_save_and_read_back(result, tmp_path):
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    assert isinstance(result.plot(), Axes) and isinstance(result.figure(), Figure)
    ax = Figure().add_subplot()
    assert result.plot(ax=ax, index=-1) is ax and len(ax.images) == 2
    with pytest.raises(ParameterError, match="index must be an image's position"):
        result.plot(index=NUM_IMAGES)

    files = result.save(tmp_path, meta={"command": "test"})
    written = sorted(f.relative_to(tmp_path).as_posix() for f in files)
    per_image = [f"explain/{stem}.png" for stem in result.stems]
    assert written == sorted([*per_image, "explain.json", "explain.npz", "explain.png"])
    saved = json.loads((tmp_path / "explain.json").read_text())
    assert saved.pop("meta") == {"command": "test"} and saved == result.to_dict()
    with np.load(tmp_path / "explain.npz") as npz:
        assert sorted(npz.files) == ["classes", "grid_size", "images", "maps", "scores"]
        np.testing.assert_array_equal(npz["maps"], result.explanation.maps)
    back = load_result(tmp_path)
    assert isinstance(back, ExplainResult) and back == result and back.photos is None
    assert back != dataclasses.replace(result, score="cosine:x")
    assert isinstance(back.figure(), Figure)
    with pytest.raises(VitlensError, match="no photos"):
        back.save(tmp_path / "again")


def test_repr_is_one_line(result):
    text = repr(result)
    assert "\n" not in text and text.startswith(f"<ExplainResult explain: {NUM_IMAGES} images, attribution, cls token")


@pytest.mark.parametrize(
    ("kwargs", "param", "needle"),
    [
        ({"method": "lrp"}, "method", "method must be one of"),
        ({"method": "attribution", "discard_ratio": 0.5}, "discard_ratio", "discard_ratio applies to rollout"),
        ({"discard_ratio": 1.5, "method": "rollout"}, "discard_ratio", r"discard_ratio must be in \[0, 1\)"),
        ({"class_": 10}, "class_", "class_ 10 is out of range: the model has 10 classes"),
        ({"class_": 1.5}, "class_", "class_ must be 'pred', a class index or a class name"),
        ({"score": "dot"}, "score", "score must be 'logit' or 'cosine:IMAGE'"),
        ({"target": "middle"}, "target", "target must be cls, dist, reg:N or mean-patch"),
        ({"num_images": 3}, "num_images", "num_images applies to a data spec"),
        ({"batch_size": 0}, "batch_size", "batch_size must be at least 1"),
    ],
)
def test_bad_options_name_their_parameter(demo, dataset, kwargs, param, needle):
    with pytest.raises(ParameterError, match=needle) as info:
        explain(demo, dataset, **kwargs)
    assert info.value.param == param


def test_the_cli_speaks_the_flag(tmp_path):
    out = tmp_path / "out"
    cli = CliRunner().invoke(
        app, ["explain", "--data", "digits", "--device", "cpu", "--class", "99", "--out", str(out)]
    )
    assert_one_line_error(cli, 2, "--class 99 is out of range")
    assert not out.exists()


def test_cli_json_and_files_are_the_results(result, tmp_path):
    args = ["explain", "--data", "digits", "--num-images", str(NUM_IMAGES), "--device", "cpu", "--out", str(tmp_path)]
    cli = CliRunner().invoke(app, [*args, "--json"])
    assert cli.exit_code == 0, cli.output
    printed = json.loads(cli.stdout)
    assert list(printed) == [*result.to_dict(), "files", "meta"]
    for key in ("images", "method", "classes", "scores", "maps"):
        assert printed[key] == result.to_dict()[key]
    assert load_result(tmp_path) == result


def test_registered_and_run_by_the_report(demo, result):
    assert get("explain") is DEFINITION and DEFINITION.compute is explain and DEFINITION.order == 42

    from vitlens.report import _Run

    run = SimpleNamespace(
        vit=demo, data="digits", split="test", rollout_images=NUM_IMAGES, batch_size=None, images=None
    )
    run.open = lambda spec, *, split, num_images: open_dataset(
        spec, demo.preprocess, split=split, num_images=num_images
    )
    run.open_images = MethodType(_Run.open_images, run)
    assert DEFINITION.section(run) == result


# ---------------------------------------------------------------------------------------------- faithfulness
@pytest.fixture(scope="module")
def faith(demo, dataset):
    from vitlens.definitions.explain import explain_faithfulness

    return explain_faithfulness(demo, dataset, methods="attribution,rollout", steps=4)


def test_faithfulness_is_the_batch_drivers_and_reads_back(demo, dataset, faith, tmp_path):
    from vitlens.definitions.explain import FaithfulnessResult, faithfulness_batch

    batch = next(iter(iterate_batches(dataset, batch_size=NUM_IMAGES)))
    expected = faithfulness_batch(
        demo,
        batch.images,
        batch.indices,
        methods=("attribution", "rollout"),
        target="cls",
        labels=batch.labels,
        steps=4,
    )
    f = faith.faithfulness
    np.testing.assert_allclose(f.probabilities, expected.probabilities, atol=1e-6)
    assert f.methods == ("attribution", "rollout", "random") and f.correct is not None
    assert f.labels.tolist() == dataset.labels.tolist() and f.removal == "drop" and f.seed == 0
    d = faith.to_dict()
    assert d["run"] == "faithfulness" and d["curves"] == ["deletion", "negative", "insertion"]
    area = d["areas"]["random"]["deletion"]["probability"]
    x, y = np.asarray(d["fractions"]), np.asarray(d["probability"]["random"]["deletion"])
    assert area == pytest.approx(sum((y[i] + y[i + 1]) / 2 * (x[i + 1] - x[i]) for i in range(4)))

    files = faith.save(tmp_path, meta={"command": "test"})
    names = sorted(p.name for p in files)
    assert names == ["explain.json", "faithfulness.csv", "faithfulness.npz", "faithfulness.png"]
    rows = (tmp_path / "faithfulness.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 3 and rows[0].startswith("method,curve,probability_area,accuracy_area,p@0,")
    back = load_result(tmp_path)
    assert isinstance(back, FaithfulnessResult) and back == faith
    assert "deletion area" in repr(faith) and faith.key_numbers()["removal"] == "drop"
    assert len(faith.plot(curve="insertion").lines) == 3


@pytest.mark.parametrize(
    ("kwargs", "param", "needle"),
    [
        ({"methods": "attribution,lrp"}, "methods", "methods must be among"),
        ({"methods": []}, "methods", "methods must name at least one"),
        ({"methods": "rollout,rollout"}, "methods", "names a method twice"),
        ({"removal": "paint"}, "removal", "removal must be one of drop, mean, blur"),
        ({"steps": 1}, "steps", "steps must be a whole number of at least 2"),
        ({"seed": -1}, "seed", "seed must be a non-negative"),
        ({"class_": 10}, "class_", "class_ 10 is out of range"),
    ],
)
def test_faithfulness_bad_options_name_their_parameter(demo, dataset, kwargs, param, needle):
    from vitlens.definitions.explain import explain_faithfulness

    with pytest.raises(ParameterError, match=needle) as info:
        explain_faithfulness(demo, dataset, **kwargs)
    assert info.value.param == param
