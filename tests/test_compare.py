"""`vitlens.compare` on tiny runs: epoch order, numbers equal to each analysis run directly, the cache recomputes
only what changed, lists keep their order and names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vitlens.compare import compare, find_checkpoints
from vitlens.definitions.attention_distance import attention_distance
from vitlens.definitions.cka import cka
from vitlens.definitions.fewshot import fewshot
from vitlens.definitions.filters import filters
from vitlens.definitions.pos_sim import pos_sim
from vitlens.errors import ParameterError, VitlensError
from vitlens.models import load_vit
from vitlens.models.checkpoint import read_checkpoint, save_checkpoint
from vitlens.models.load import demo_checkpoint_path

# Small enough for seconds: 8 images for attention distance and CKA, 40 per few-shot split, 1 and 2 shots, 1 seed.
OPTIONS = dict(num_images=8, fewshot_num_images=40, shots=(1, 2), seeds=1, load_options={"device": "cpu"})


def save_epoch(path: Path, epoch: int) -> Path:
    """The demo model's weights, perturbed less at later epochs, saved as `vitlens train` saves an epoch."""
    raw = read_checkpoint(demo_checkpoint_path())
    g = torch.Generator().manual_seed(epoch)
    state = {
        k: v + 0.3 / epoch * v.std() * torch.randn(v.shape, generator=g) if v.numel() > 1 else v
        for k, v in raw.state_dict.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(path, state, {**raw.metadata, "epoch": epoch})


def make_run(folder: Path, epochs: tuple[int, ...], final: int | None) -> Path:
    for e in epochs:
        save_epoch(folder / "checkpoints" / f"epoch_{e:03d}.safetensors", e)
    if final is not None:
        save_epoch(folder / "model.safetensors", final)
    return folder


def test_run_folder_rows_in_epoch_order_equal_each_analysis(tmp_path):
    run = make_run(tmp_path / "run", (2, 1), final=3)  # written out of order on purpose
    result = compare(run, out=tmp_path / "out", use_cache=False, **OPTIONS)
    assert result.run and [c.epoch for c in result.checkpoints] == [1, 2, 3]
    assert [c.name for c in result.checkpoints] == ["epoch 1", "epoch 2", "epoch 3"]
    assert [p.name for p in map(Path, (c.spec for c in result.checkpoints))] == [
        "epoch_001.safetensors",
        "epoch_002.safetensors",
        "model.safetensors",
    ]
    # One row per model and number, models in epoch order (the csv is the same table).
    models = [r.model for r in result.rows]
    assert models == sorted(models, key=lambda m: int(m.split()[1]))
    csv_lines = (tmp_path / "out" / "compare.csv").read_text().splitlines()
    assert csv_lines[0] == "model,epoch,analysis,quantity,layer,value" and len(csv_lines) == len(result.rows) + 1

    last = load_vit(result.checkpoints[-1].spec, device="cpu")
    for ckpt in result.checkpoints:
        vit = load_vit(ckpt.spec, device="cpu")
        sim = pos_sim(vit).sim
        assert result.value(ckpt.name, "pos-sim", "row_col_score") == pytest.approx(sim.row_col_score, abs=1e-12)
        assert result.value(ckpt.name, "pos-sim", "neighbour_minus_far") == pytest.approx(sim.neighbour_minus_far)
        ratio = filters(vit).pca.explained_variance_ratio
        assert result.value(ckpt.name, "filters", "first_component_share") == pytest.approx(ratio[0], abs=1e-12)
        px = attention_distance(vit, "digits", num_images=8).distance.distance_px  # [depth, heads]
        for layer in range(vit.depth):
            heads = px[layer]
            assert result.value(ckpt.name, "attention-distance", "mean_px", layer) == pytest.approx(sum(heads) / 8)
            spread = np.sqrt(np.mean((heads - heads.mean()) ** 2))  # population std over the 8 heads
            assert result.value(ckpt.name, "attention-distance", "head_std_px", layer) == pytest.approx(spread)
            assert result.value(ckpt.name, "attention-distance", "head_max_px", layer) == pytest.approx(max(heads))
        acc = fewshot(vit, "digits", shots=(1, 2), seeds=1, num_images=40, use_cache=False).probe.mean  # [shots, 1]
        assert result.value(ckpt.name, "fewshot", "accuracy_1shot") == pytest.approx(acc[0, 0])
        assert result.value(ckpt.name, "fewshot", "accuracy_2shot") == pytest.approx(acc[1, 0])
        matrix = cka(vit, "digits", last, tokens="mean-patch", num_images=8).cka.matrix  # [L, L]
        for layer in range(vit.depth):
            got = result.value(ckpt.name, "cka", "cka_to_last", layer)
            assert got == pytest.approx(matrix[layer, layer], abs=1e-9)
    # CKA of the last checkpoint to itself is 1 at every layer; earlier epochs are further from it.
    ones = [result.value("epoch 3", "cka", "cka_to_last", layer) for layer in range(4)]
    np.testing.assert_allclose(ones, 1.0, atol=1e-9)
    assert result.value("epoch 1", "cka", "cka_to_last", 3) < 0.99

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["x"] == "epoch" and [m["epoch"] for m in summary["models"]] == [1, 2, 3]
    assert summary["numbers"]["epoch 2"]["cka"]["cka_to_last"] == [
        result.value("epoch 2", "cka", "cka_to_last", layer) for layer in range(4)
    ]


def _entries(out: Path) -> dict[str, float]:
    """Every cache entry and the time its key file was written (changes only when it was recomputed)."""
    return {p.parent.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.glob("cache/*/*/compare_key.json")}


def test_added_checkpoint_recomputes_only_itself(tmp_path, monkeypatch):
    import vitlens.compare as module

    calls: list[tuple[str, str]] = []
    real = module._compute

    def counting(session, analysis, vit, ckpt, last):
        calls.append((ckpt.name, analysis))
        return real(session, analysis, vit, ckpt, last)

    monkeypatch.setattr(module, "_compute", counting)
    options = {**OPTIONS, "analyses": "pos-sim,attention-distance,cka"}
    run = make_run(tmp_path / "run", (1, 3), final=4)
    out = tmp_path / "out"
    first = compare(run, out=out, **options)
    assert len(calls) == 9 and len(_entries(out)) == 9
    before = _entries(out)

    calls.clear()
    save_epoch(run / "checkpoints" / "epoch_002.safetensors", 2)  # the fourth: not the last one
    second = compare(run, out=out, **options)
    assert calls == [("epoch 2", "pos-sim"), ("epoch 2", "attention-distance"), ("epoch 2", "cka")]
    assert second.computed == {
        "epoch 1": (),
        "epoch 2": ("pos-sim", "attention-distance", "cka"),
        "epoch 3": (),
        "epoch 4": (),
    }
    after = _entries(out)
    assert {k: after[k] for k in before} == before  # the old entries were not rewritten
    assert len(after) == 12
    # Read back from the cache, the old models' numbers are unchanged.
    for r in first.rows:
        assert second.value(r.model, r.analysis, r.quantity, r.layer) == r.value

    # A new last checkpoint changes every CKA-to-last number: exactly the CKA entries are recomputed.
    calls.clear()
    save_epoch(run / "model.safetensors", 5)
    third = compare(run, out=out, **options)
    new_last = [("epoch 5", "pos-sim"), ("epoch 5", "attention-distance"), ("epoch 5", "cka")]
    assert sorted(calls) == sorted([("epoch 1", "cka"), ("epoch 2", "cka"), ("epoch 3", "cka"), *new_last])
    assert [c.name for c in third.checkpoints] == ["epoch 1", "epoch 2", "epoch 3", "epoch 5"]

    # Other options (here: fewer images) are another key: recomputed, never read stale.
    calls.clear()
    compare(run, out=out, **{**options, "num_images": 6, "analyses": "pos-sim"})
    assert calls == []  # pos-sim does not read images
    compare(run, out=out, **{**options, "num_images": 6, "analyses": "attention-distance"})
    assert len(calls) == 4


def test_list_keeps_order_and_names(tmp_path):
    b = save_epoch(tmp_path / "b" / "beta.safetensors", 2)
    a = save_epoch(tmp_path / "a" / "alpha.safetensors", 5)
    result = compare([b, a], analyses="pos-sim,cka", out=tmp_path / "out", **OPTIONS)
    assert not result.run and [c.name for c in result.checkpoints] == ["beta", "alpha"]
    assert [r.model for r in result.rows][:1] == ["beta"] and result.summary["x"] == "model"
    for layer in range(4):  # alpha is last: CKA to itself is 1
        assert result.value("alpha", "cka", "cka_to_last", layer) == pytest.approx(1.0, abs=1e-9)
    # Equal stems are told apart by the path as given.
    c = save_epoch(tmp_path / "c" / "beta.safetensors", 3)
    names = [ckpt.name for ckpt in find_checkpoints([str(b), str(c)])[0]]
    assert names == [str(b), str(c)]


def test_user_errors_write_nothing(tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(ParameterError, match="holds no checkpoints") as e:
        compare(empty, out=out, **OPTIONS)
    assert e.value.param == "checkpoints"
    run = make_run(tmp_path / "run", (1,), final=2)
    with pytest.raises(ParameterError, match="unknown analysis nope") as e:
        compare(run, analyses="pos-sim,nope", out=out, **OPTIONS)
    assert e.value.param == "analyses"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(VitlensError):
        compare([run / "model.safetensors", bad], analyses="pos-sim", out=out, **OPTIONS)
    # Mixed depths: CKA per layer is impossible (found after the first model was computed: still nothing written).
    raw = read_checkpoint(demo_checkpoint_path())
    shallow = {k: v for k, v in raw.state_dict.items() if not k.startswith("blocks.3.")}
    meta = {**raw.metadata, "model_kwargs": {**raw.metadata["model_kwargs"], "depth": 3}}
    save_checkpoint(tmp_path / "shallow.safetensors", shallow, meta)
    with pytest.raises(ParameterError, match="one depth"):
        compare([run / "model.safetensors", tmp_path / "shallow.safetensors"], analyses="cka", out=out, **OPTIONS)
    assert not out.exists()
