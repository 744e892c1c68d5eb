"""The remaining dataset-wide commands under torch.distributed (gloo, CPU): ``features`` (patch-feature PCA),
``tokens --images`` (the per-image maps) and ``compare`` on 2 and 3 spawned ranks give the single process's
numbers, really ran sharded, and only rank 0 wrote files.

The independent answer is the same computation in one process (no process group). A run that did not shard would
give the same numbers too, so every worker also counts the images its model saw: each rank must have seen its own
shard only. Helpers for spawning ranks come from ``tests/test_distributed.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_distributed import _assert_close_tree, _in_group, _one_thread, _spawn
from vitlens.distributed import shard_indices

NUM_IMAGES = 7  # divisible by neither 2 nor 3
FEW_IMAGES = 2  # on 3 ranks the last rank owns none: the collectives must still line up
NORM_THRESHOLD = 4.0  # below the largest last-layer norms of the first two digits: their maps have outliers


def _counting(vit) -> list[int]:
    """Make ``vit.features`` count the images it is given (this instance only); the list of batch sizes."""
    seen: list[int] = []
    features = vit.features

    def counted(images, *args, **kwargs):
        seen.append(int(images.shape[0]))
        return features(images, *args, **kwargs)

    vit.features = counted
    return seen


def _per_image(out: Path | None) -> dict[str, np.ndarray]:
    """features (three passes, and two on FEW_IMAGES) and tokens with per-image maps on the demo model, batch 1 (a
    float32 token then does not depend on which images share its batch); saves under ``out``."""
    import vitlens
    from vitlens.data import open_dataset
    from vitlens.models import load_vit

    vit = load_vit("demo", device="cpu")
    seen = _counting(vit)
    data = open_dataset("digits", vit.preprocess, split="test", num_images=NUM_IMAGES)
    few = data.subset(list(range(FEW_IMAGES)), tag="few")
    feats = vitlens.features_pca(vit, data, foreground="auto", batch_size=1)
    feats_seen = sum(seen)
    feats_few = vitlens.features_pca(vit, few, foreground="none", num_components=4, batch_size=1)
    few_seen = sum(seen) - feats_seen
    tok = vitlens.tokens(vit, data, images=few, norm_threshold=NORM_THRESHOLD, batch_size=1)
    tok_seen = sum(seen) - feats_seen - few_seen
    if out is not None:
        feats.save(out / "features")
        tok.save(out / "tokens")
    numbers: dict[str, np.ndarray] = {"seen": np.array([feats_seen, few_seen, tok_seen])}
    for prefix, result in (("features", feats), ("few", feats_few)):
        pca = result.pca
        for name in ("components", "mean", "explained_variance", "explained_variance_ratio", "scores", "rgb"):
            numbers[f"{prefix}_{name}"] = getattr(pca, name)
        numbers[f"{prefix}_num_fit_patches"] = np.int64(pca.num_fit_patches)
        if pca.foreground_mask is not None:
            numbers[f"{prefix}_foreground_mask"] = pca.foreground_mask
            numbers[f"{prefix}_foreground_scores"] = pca.foreground_scores
            numbers[f"{prefix}_foreground_component"] = pca.foreground_component
    maps = tok.image_maps
    for name in ("norms", "outliers", "attention", "attention_without_outliers"):
        numbers[f"tokens_{name}"] = getattr(maps, name)
    numbers["tokens_query"] = np.asarray(maps.query)
    numbers["tokens_outlier_fraction"] = tok.norms.outlier_fraction
    return numbers


def _per_image_worker(rank: int, world: int, port: int, out: str) -> None:
    from vitlens.distributed import world_size

    with _in_group(rank, world, port):
        assert world_size() == world
        numbers = _per_image(Path(out) / f"files{rank}")
    np.savez(Path(out) / f"rank{rank}.npz", **numbers)


@pytest.fixture(scope="module")
def single_process():
    with _one_thread():
        return _per_image(None)


EXACT = ("tokens_norms", "tokens_outliers", "tokens_attention", "tokens_attention_without_outliers", "tokens_query")


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_features_and_token_maps_give_the_single_process_numbers(world, single_process, tmp_path):
    want = single_process
    assert want["features_scores"].shape[0] == NUM_IMAGES and want["few_scores"].shape[0] == FEW_IMAGES
    assert want["seen"].tolist() == [3 * NUM_IMAGES, 2 * FEW_IMAGES, NUM_IMAGES + FEW_IMAGES]
    assert want["tokens_outliers"].any() and not want["features_foreground_mask"].all()  # non-trivial maps
    codes, _ = _spawn(_per_image_worker, world, tmp_path)
    assert codes == [0] * world
    for rank in range(world):
        with np.load(tmp_path / f"rank{rank}.npz") as got:
            assert set(got.files) == set(want)
            # each rank ran its own shard only: three passes, two passes, one pass plus the shown images
            mine, mine_few = (len(shard_indices(n, rank_=rank, world=world)) for n in (NUM_IMAGES, FEW_IMAGES))
            assert got["seen"].tolist() == [3 * mine, 2 * mine_few, mine + mine_few], rank
            for name, value in want.items():
                if name == "seen":
                    continue
                if name in EXACT or name.endswith(("foreground_mask", "num_fit_patches")):
                    # token maps: gathered in dataset order, bit for bit; the foreground split: the same patches
                    assert np.array_equal(got[name], value, equal_nan=name != "tokens_query"), name
                else:  # the PCA of moments summed in another order: float64 rounding (maps follow the components)
                    np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-9, err_msg=name)
    # only rank 0 wrote files; the other ranks did not even create their output folder
    assert sorted(p.name for p in (tmp_path / "files0" / "features").iterdir()) == [
        "features.json",
        "features.npz",
        "features.png",
    ]
    assert (tmp_path / "files0" / "tokens" / "tokens_images.png").is_file()
    assert not any((tmp_path / f"files{rank}").exists() for rank in range(1, world))


COMPARE_OPTIONS = dict(
    analyses="attention-distance,fewshot,cka,pos-sim",
    num_images=11,  # 2 CKA minibatches of 4 (the last 3 images dropped); 11 is divisible by neither 2 nor 3
    minibatch_size=4,
    fewshot_num_images=23,
    shots=(1,),
    seeds=1,
    batch_size=4,
    use_cache=False,
    load_options={"device": "cpu"},
)


def _compare(run: Path, out: Path) -> dict:
    """compare on a two-epoch run, then again (every entry read from rank 0's cache); the table and what ran."""
    from vitlens.compare import compare

    first = compare(run, out=out, **COMPARE_OPTIONS)
    again = compare(run, out=out, **COMPARE_OPTIONS)
    rows = [[r.model, r.analysis, r.quantity, r.layer, r.value] for r in first.rows]
    assert [[r.model, r.analysis, r.quantity, r.layer, r.value] for r in again.rows] == rows  # the cache's numbers
    return {
        "rows": rows,
        "computed": [dict(first.computed), dict(again.computed)],
        "numbers": first.summary["numbers"],
    }


def _compare_worker(rank: int, world: int, port: int, out: str) -> None:
    from vitlens import distributed

    with _in_group(rank, world, port):
        shards = []
        original = distributed.shard

        def spy(dataset, **kwargs):  # the datasets this rank was given a part of, and the part's size
            part = original(dataset, **kwargs)
            shards.append([len(dataset), len(part)])
            return part

        distributed.shard = spy
        numbers = _compare(Path(out) / "run", Path(out) / f"out{rank}")
        numbers["shards"] = shards
    Path(out, f"compare{rank}.json").write_text(json.dumps(numbers))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_compare_gives_the_single_process_table_and_rank_0_alone_keeps_the_cache(world, tmp_path):

    from tests.test_compare import make_run

    make_run(tmp_path / "run", (1,), final=2)
    with _one_thread():
        want = json.loads(json.dumps(_compare(tmp_path / "run", tmp_path / "single")))
    everything = ["pos-sim", "attention-distance", "fewshot", "cka"]
    assert want["computed"] == [{"epoch 1": everything, "epoch 2": everything}, {"epoch 1": [], "epoch 2": []}]
    codes, _ = _spawn(_compare_worker, world, tmp_path, timeout=150)
    assert codes == [0] * world
    for rank in range(world):
        got = json.loads(Path(tmp_path, f"compare{rank}.json").read_text())
        # every rank computed the same analyses, then read all of them from rank 0's cache (its own out has none)
        assert got["computed"] == want["computed"], rank
        _assert_close_tree(got["rows"], want["rows"], f"rank {rank} rows")  # floats: 1e-6 relative
        _assert_close_tree(got["numbers"], want["numbers"], f"rank {rank} numbers")
        # the data analyses ran on shards: attention distance, few-shot pool and test, CKA, for each checkpoint
        assert len(got["shards"]) >= 8 and all(part < whole for whole, part in got["shards"] if whole >= world), rank
    # only rank 0 wrote: its table, figures, page and cache; the other ranks' --out was never created
    written = sorted(p.name for p in (tmp_path / "out0").iterdir())
    assert written == sorted(
        [
            "cache",
            "compare.csv",
            "compare_attention_distance.png",
            "compare_cka.png",
            "compare_fewshot.png",
            "compare_pos_sim.png",
            "index.html",
            "report.md",
            "summary.json",
        ]
    )
    assert not any((tmp_path / f"out{rank}").exists() for rank in range(1, world))
