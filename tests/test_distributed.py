"""vitlens under torch.distributed (gloo, CPU): 2 and 3 spawned ranks on a dataset whose size no rank count divides
give the single process's numbers; only rank 0 writes files; a rank that raises ends every rank within 60 s."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from vitlens.distributed import shard_indices, torchrun_env
from vitlens.errors import VitlensError

NUM_IMAGES = 11  # divisible by neither 2 nor 3; CKA minibatches of 4: 4 + 4 + 3 (the last dropped)
MINIBATCH = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, world: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        VITLENS_DIST_TIMEOUT="45",
    )


@contextmanager
def _in_group(rank: int, world: int, port: int) -> Iterator[None]:
    """Inside a spawned rank: one torch thread, the torchrun variables, and the gloo process group."""
    import torch

    from vitlens.distributed import distributed_context

    torch.set_num_threads(1)
    _rank_env(rank, world, port)
    with distributed_context(device="cpu"):
        yield


@contextmanager
def _one_thread() -> Iterator[None]:
    """The single-process reference with one torch thread, as each rank has."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _analyses(out: Path | None) -> dict[str, np.ndarray]:
    """Every distributed analysis on the demo model and NUM_IMAGES digits; saves results under ``out``."""
    import vitlens
    from vitlens.attention import rollout_for
    from vitlens.data import open_dataset
    from vitlens.models import load_vit

    vit = load_vit("demo", device="cpu")
    data = open_dataset("digits", vit.preprocess, split="test", num_images=NUM_IMAGES)
    att = vitlens.attention_distance(vit, data, batch_size=4)
    tok = vitlens.tokens(vit, data, batch_size=4)  # auto threshold: two passes, the second uses the first's result
    cka = vitlens.cka(vit, data, tokens="mean-patch", minibatch_size=MINIBATCH, batch_size=3)
    # batch 1: a float32 map depends (at 1e-7) on which images share its batch, and the shards cut other batches
    roll = rollout_for(vit, data, batch_size=1)
    if out is not None:
        att.save(out / "attention_distance")
    d, t, c = att.distance, tok.norms, cka.cka
    return {
        "distance_px": d.distance_px,
        "std_px": d.std_px,
        "prefix_mass": d.prefix_mass,
        "att_num_images": np.int64(d.num_images),
        "histograms": t.histograms,
        "norm_mean": t.norm_mean,
        "norm_quantiles": t.norm_quantiles,
        "threshold": np.float64(t.threshold),
        "outlier_map": t.outlier_map,
        "patch_attention_prefix": t.patch_attention_prefix,
        "neighbour_similarity_normal": t.neighbour_similarity_normal,
        "tok_num_images": np.int64(t.num_images),
        "cka": c.matrix,
        "hsic_ab": c.hsic_ab,
        "cka_num_images": np.int64(c.num_images),
        "cka_minibatches": np.int64(c.num_minibatches),
        "rollout": roll.maps,
        "patch_mass": roll.patch_mass,
    }


def _numbers_worker(rank: int, world: int, port: int, out: str) -> None:
    from vitlens.distributed import world_size

    with _in_group(rank, world, port):
        assert world_size() == world
        numbers = _analyses(Path(out) / f"files{rank}")
    np.savez(Path(out) / f"rank{rank}.npz", **numbers)


FEWSHOT_IMAGES = 31  # per split; divisible by neither 2 nor 3


def _fewshot(cache_dir: Path) -> dict[str, np.ndarray]:
    """fewshot twice on the demo model (a cache miss, then a hit); accuracies, the extracted features, the cache
    statuses and how often this process wrote the cache file."""
    import vitlens
    import vitlens.feature_cache as fc
    from vitlens.models import load_vit

    extracted: list[dict] = []
    saves: list[Path] = []
    extract, save = fc.extract_features, fc.save_cached_features

    def spy_extract(*args, **kwargs):
        extracted.append(extract(*args, **kwargs))
        return extracted[-1]

    def spy_save(path, *args, **kwargs):
        saves.append(path)
        return save(path, *args, **kwargs)

    fc.extract_features, fc.save_cached_features = spy_extract, spy_save
    try:
        vit = load_vit("demo", device="cpu")
        options = dict(shots="1,2", seeds=2, l2="auto", layers=[0, -1], feature="mean-patch", probe="both", knn_k="1,3")
        first = vitlens.fewshot(vit, "digits", num_images=FEWSHOT_IMAGES, batch_size=4, cache_dir=cache_dir, **options)
        again = vitlens.fewshot(vit, "digits", num_images=FEWSHOT_IMAGES, batch_size=4, cache_dir=cache_dir, **options)
    finally:
        fc.extract_features, fc.save_cached_features = extract, save
    assert len(extracted) == 2  # pool and test, once each: the second run read the cache
    assert np.array_equal(first.probe.accuracy, again.probe.accuracy)
    return {
        "lsr": first.probe.accuracy,
        "lsr_l2": first.probe.l2,
        "knn": first.knn.accuracy,
        "num_train": np.int64(first.probe.num_train),
        "num_test": np.int64(first.probe.num_test),
        "train_features": np.stack([f.numpy() for f in extracted[0].values()]),
        "test_features": np.stack([f.numpy() for f in extracted[1].values()]),
        "cache": np.array([first.cache["train"], first.cache["test"], again.cache["train"], again.cache["test"]]),
        "saves": np.int64(len(saves)),
    }


def _fewshot_worker(rank: int, world: int, port: int, out: str) -> None:
    with _in_group(rank, world, port):
        numbers = _fewshot(Path(out) / "cache")
    np.savez(Path(out) / f"fewshot{rank}.npz", **numbers)


EXPLAIN_IMAGES = 7  # divisible by neither 2 nor 3


def _explain() -> dict[str, np.ndarray]:
    """explain's per-image maps (a gradient method) and faithfulness curves on the demo model."""
    from vitlens.data import open_dataset
    from vitlens.definitions.explain import explain_faithfulness, explain_for
    from vitlens.models import load_vit

    vit = load_vit("demo", device="cpu")
    data = open_dataset("digits", vit.preprocess, split="test", num_images=EXPLAIN_IMAGES)
    # batch 1: a float32 map depends (at 1e-7) on which images share its batch, and the shards cut other batches
    maps = explain_for(vit, data, method="attribution", batch_size=1)
    faith = explain_faithfulness(vit, data, methods="attribution,rollout", steps=4, batch_size=1).faithfulness
    return {
        "maps": maps.maps,
        "classes": maps.classes,
        "scores": maps.scores,
        "probabilities": faith.probabilities,
        "correct": faith.correct,
        "faith_classes": faith.classes,
        "labels": faith.labels,
    }


def _explain_worker(rank: int, world: int, port: int, out: str) -> None:
    with _in_group(rank, world, port):
        numbers = _explain()
    np.savez(Path(out) / f"explain{rank}.npz", **numbers)


def _failing_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1 raises at once; rank 0 computes, then blocks in the reduction that rank 1 never joins."""
    import torch

    from vitlens.errors import VitlensError

    torch.set_num_threads(1)
    _rank_env(rank, world, port)
    from vitlens.distributed import distributed_context

    try:
        with distributed_context(device="cpu"):
            if rank == 1:
                raise VitlensError("rank 1: this rank failed on purpose")
            _analyses(None)
    except VitlensError as e:
        Path(out, f"error{rank}.txt").write_text(str(e))
        sys.exit(1)


def _teardown_worker(rank: int, world: int, port: int, out: str) -> None:
    """Import timm inside the group (as every command does), leave it, and count gloo's worker threads left."""
    with _in_group(rank, world, port):
        import timm  # noqa: F401

    names = [Path(task, "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
    Path(out, f"threads{rank}.json").write_text(json.dumps(sorted(n for n in names if "gloo" in n)))


def _spawn(target, world: int, out: Path, timeout: float = 90) -> tuple[list[int | None], float]:
    """Start ``world`` ranks (spawned, file-free TCP rendezvous on localhost); their exit codes and the wall time."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, str(out))) for r in range(world)]
    started = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(1.0, timeout - (time.monotonic() - started)))
    elapsed = time.monotonic() - started
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    return codes, elapsed


def _vitlens_json(args: list[str], ranks: int) -> dict:
    """``vitlens ARGS --device cpu --json`` in one process, or under torchrun with ``ranks`` processes of one thread
    each; the one JSON object printed, after checking the exit code and that no other rank printed one."""
    vitlens = shutil.which("vitlens")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
              str(_free_port()), vitlens] if ranks > 1 else [vitlens]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VITLENS_DIST_TIMEOUT": "45"}
    done = subprocess.run(
        [*launch, *args, "--device", "cpu", "--json"], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1, done.stdout[-3000:]  # the other ranks are silent
    return printed[0]


@pytest.mark.parametrize("n", [0, 1, 5, 11, 12])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("block", [1, 4])
def test_shards_cover_every_image_once_in_order(n, world, block):
    parts = [shard_indices(n, block=block, rank_=r, world=world) for r in range(world)]
    assert np.concatenate(parts).tolist() == list(range(n))  # contiguous, in rank order, nothing repeated
    units = [-(-len(p) // block) for p in parts]  # ceil: a partial unit counts as one
    assert max(units) - min(units) <= 1  # balanced to within one unit
    for p in parts[:-1]:  # every block boundary is a global one: only the last image run may be a partial unit
        if len(p) and p[-1] != n - 1:
            assert (p[-1] + 1) % block == 0


def test_torchrun_env():
    assert torchrun_env({}) is None and torchrun_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    env = torchrun_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "node7"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (3, 4, 1, "node7")


def test_more_ranks_than_gpus_on_a_node_stop_before_the_rendezvous(monkeypatch):
    """4 processes on a 2-GPU node: every rank of the node (rank 1 has a GPU) stops with the same line, before
    anything waits for the others; the process group is never created."""
    import torch
    import torch.distributed as dist

    from vitlens.distributed import distributed_context

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: pytest.fail("set_device reached"))
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("init_process_group reached"))
    for name, value in dict(WORLD_SIZE="4", RANK="1", LOCAL_RANK="1", LOCAL_WORLD_SIZE="4").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(VitlensError) as info, distributed_context(device="cuda"):
        pass
    assert str(info.value) == (
        "rank 1: 4 processes on this node but 2 GPU(s): NCCL needs one GPU per process; start at most 2 "
        "(torchrun --nproc-per-node 2), or run on the CPU with --device cpu"
    )
    # Not torchrun (no LOCAL_WORLD_SIZE): the launcher may give each process its own visible GPU; nothing checked.
    from vitlens.distributed import _check_one_gpu_per_rank

    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert _check_one_gpu_per_rank(torchrun_env(), 1) is None


def test_each_rank_takes_its_own_gpu_and_refuses_another(monkeypatch):
    """Local rank 1 of 2 on a 2-GPU node: auto and cuda give cuda:1, cuda:1 is accepted, cuda:0 (the same flag on
    every rank would stack them on one GPU) is refused in one line."""
    import torch

    from vitlens.device import resolve_device
    from vitlens.errors import UsageError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name, value in dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1").items():
        monkeypatch.setenv(name, value)
    assert [resolve_device(spec) for spec in ("auto", "cuda", "cuda:1")] == [torch.device("cuda", 1)] * 3
    with pytest.raises(UsageError) as info:
        resolve_device("cuda:0")
    assert str(info.value) == (
        "device 'cuda:0' under torchrun: each process uses its own GPU, cuda:LOCAL_RANK (here cuda:1); "
        "pass --device cuda"
    )
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: any GPU it names
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_lost_peer_names_a_lost_connection_and_passes_a_ranks_own_error():
    import torch.distributed as dist

    from vitlens.distributed import RankFailed, lost_peer

    gloo = "[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:4242"
    with pytest.raises(RuntimeError, match="Connection closed"), lost_peer("the step"):
        raise RuntimeError(gloo)  # no process group: nothing to translate
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(RankFailed) as info, lost_peer("the gradient all-reduce"):
            raise RuntimeError(gloo)
        assert str(info.value) == (
            "rank 0: the gradient all-reduce failed; another rank failed first (see its error line): "
            "Connection closed by peer [127.0.0.1]:4242"
        )
        with pytest.raises(RuntimeError, match="^CUDA out of memory"), lost_peer("the gradient all-reduce"):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")  # this rank's own
        with pytest.raises(ValueError), lost_peer("the gradient all-reduce"):
            raise ValueError("closed by peer")  # not a runtime or OS error: never a peer's
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single_process():
    with _one_thread():
        return _analyses(None)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_give_the_single_process_numbers(world, single_process, tmp_path):
    codes, _ = _spawn(_numbers_worker, world, tmp_path)
    assert codes == [0] * world
    for rank in range(world):
        with np.load(tmp_path / f"rank{rank}.npz") as got:
            assert set(got.files) == set(single_process)
            for name, want in single_process.items():
                if name in ("rollout", "patch_mass"):  # per-image maps: gathered in dataset order, bit for bit
                    assert np.array_equal(got[name], want), name
                else:  # reductions: sums of per-rank float64 sums
                    np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-12, err_msg=name)
    assert int(single_process["att_num_images"]) == NUM_IMAGES == int(single_process["tok_num_images"])
    assert int(single_process["cka_minibatches"]) == 2  # the last 3 images do not fill a minibatch
    # only rank 0 wrote files; the other ranks did not even create their output folder
    assert sorted(p.name for p in (tmp_path / "files0" / "attention_distance").iterdir()) == [
        "attention_distance.csv",
        "attention_distance.json",
        "attention_distance.npz",
        "attention_distance.png",
    ]
    assert not any((tmp_path / f"files{rank}").exists() for rank in range(1, world))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
def test_leaving_the_group_stops_gloos_threads(tmp_path):
    """A group kept alive past destroy_process_group (torch.distributed.fsdp binds the group as a default argument
    when first imported inside one) leaves gloo's threads to race the interpreter's shutdown: SIGABRT after a
    finished run. distributed_context imports it first; no gloo thread may survive the context."""
    codes, _ = _spawn(_teardown_worker, 2, tmp_path, timeout=60)
    assert codes == [0, 0]
    assert [json.loads((tmp_path / f"threads{rank}.json").read_text()) for rank in range(2)] == [[], []]


@pytest.mark.slow
def test_a_failing_rank_ends_every_rank(tmp_path):
    codes, elapsed = _spawn(_failing_worker, 2, tmp_path, timeout=60)
    assert codes == [1, 1] and elapsed < 60, (codes, elapsed)
    lines = [(tmp_path / f"error{rank}.txt").read_text() for rank in range(2)]
    assert lines[1] == "rank 1: this rank failed on purpose"
    assert lines[0].startswith("rank 0: ") and "another rank failed first" in lines[0] and "\n" not in lines[0]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("vitlens") is None, reason="the vitlens console script is not installed")
def test_cli_under_torchrun(tmp_path):
    out = tmp_path / "out"
    printed = _vitlens_json(["attention-distance", "demo", "--num-images", str(NUM_IMAGES), "--out", str(out)], 2)
    assert printed["num_images"] == NUM_IMAGES
    saved = json.loads((out / "attention_distance.json").read_text())
    assert saved["distance_px"] == printed["distance_px"]


@pytest.fixture(scope="module")
def single_process_fewshot(tmp_path_factory):
    with _one_thread():
        return _fewshot(tmp_path_factory.mktemp("cache"))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_fewshot_ranks_give_the_single_process_accuracies(world, single_process_fewshot, tmp_path):
    want = single_process_fewshot
    assert int(want["num_train"]) == FEWSHOT_IMAGES == int(want["num_test"])
    assert want["cache"].tolist() == ["miss", "miss", "hit", "hit"] and int(want["saves"]) == 2
    codes, _ = _spawn(_fewshot_worker, world, tmp_path, timeout=120)
    assert codes == [0] * world
    for rank in range(world):
        with np.load(tmp_path / f"fewshot{rank}.npz") as got:
            # every rank holds all rows, in dataset order (batches cut differently: float32 rounding only)
            for name in ("train_features", "test_features"):
                assert got[name].shape == want[name].shape, name
                np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6, err_msg=name)
            for name in ("lsr", "knn", "lsr_l2", "num_train", "num_test"):
                assert np.array_equal(got[name], want[name]), name
            assert got["cache"].tolist() == ["miss", "miss", "hit", "hit"]  # every rank agreed on the branch
            assert int(got["saves"]) == (2 if rank == 0 else 0)  # the cache files written by rank 0 alone
    assert len(list((tmp_path / "cache").iterdir())) == 2  # pool and test, and no stray temporary file


TRAIN_BATCH = 10  # the global batch: 5 + 5 on two ranks, 4 + 3 + 3 on three


def _train_config(data: Path):
    from vitlens.train import TrainConfig

    return TrainConfig(
        data=str(data),
        arch="vit_tiny_patch16_224",
        model_kwargs=dict(img_size=16, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0),
        epochs=3,
        batch_size=TRAIN_BATCH,
        lr=3e-3,
        warmup_epochs=0.5,
        augment="strong",  # crop, flip (a folder of images is mirrored) and erasing: every draw is sliced per rank
        device="cpu",
    )


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory) -> Path:
    """Three classes of 15 scikit-learn digits as 8x8 PNGs: 36 training images (3 global batches), 9 held out."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("train_data")
    for label in range(3):
        (root / str(label)).mkdir()
        for i, image in enumerate(digits.images[digits.target == label][:15]):
            Image.fromarray((image * 15).astype(np.uint8), "L").save(root / str(label) / f"{i:02d}.png")
    return root


def _weights(run: Path) -> dict[str, np.ndarray]:
    from vitlens.models.checkpoint import read_checkpoint

    return {k: v.numpy() for k, v in read_checkpoint(run / "model.safetensors").state_dict.items()}


def _train_worker(rank: int, world: int, port: int, out: str) -> None:
    """A straight run, and a run stopped after 4 steps then resumed, each rank with its own --out (only rank 0's
    may be written; the resume is read by rank 0 and sent to the others)."""
    from vitlens.errors import Interrupted
    from vitlens.train import TrainConfig, train

    config = _train_config(Path(out) / "data")
    with _in_group(rank, world, port):
        straight = train(config, Path(out) / f"straight{rank}")
        with pytest.raises(Interrupted):
            train(config, Path(out) / f"resumed{rank}", stop_after_steps=4)  # mid-way through epoch 2
        resumed = train(TrainConfig(epochs=0), Path(out) / f"resumed{rank}", resume=True)
    Path(out, f"train{rank}.json").write_text(
        json.dumps([[[h.train_loss, h.train_acc, h.test_acc] for h in r.history] for r in (straight, resumed)])
    )


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ddp_training_gives_the_single_process_weights(world, train_folder, tmp_path):
    from vitlens.train import train

    shutil.copytree(train_folder, tmp_path / "data")
    single = train(_train_config(tmp_path / "data"), tmp_path / "single")
    assert (single.num_train, single.num_test, len(single.history)) == (36, 9, 3)
    codes, _ = _spawn(_train_worker, world, tmp_path, timeout=150)
    assert codes == [0] * world
    want, straight, resumed = (_weights(tmp_path / name) for name in ("single", "straight0", "resumed0"))
    assert want.keys() == straight.keys() == resumed.keys()
    for name in want:  # the same global batches and draws: float rounding only (the ranks sum in other orders)
        np.testing.assert_allclose(straight[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)
        assert np.array_equal(resumed[name], straight[name]), name  # exact resume on the same number of ranks
    assert any(not np.array_equal(straight[n], want[n]) for n in want)  # really another process's run
    histories = [json.loads(Path(tmp_path, f"train{rank}.json").read_text()) for rank in range(world)]
    expected = [[h.train_loss, h.train_acc, h.test_acc] for h in single.history]
    for straight_history, resumed_history in histories:  # every rank holds the global epoch numbers
        np.testing.assert_allclose(straight_history, expected, rtol=1e-5)
        # the interrupted epoch's sums before the stop travel in resume.pt: its loss is the whole epoch's too
        np.testing.assert_allclose(resumed_history, straight_history, rtol=1e-12)
        assert [h[1:] for h in resumed_history] == [h[1:] for h in straight_history]  # counts: exact
    # rank 0 alone wrote its run folders; the others' were never created
    assert sorted(p.name for p in (tmp_path / "straight0").iterdir()) == [
        "curves.png",
        "metrics.csv",
        "model.safetensors",
        "resume.pt",
    ]
    others = [tmp_path / f"{kind}{rank}" for kind in ("straight", "resumed") for rank in range(1, world)]
    assert not any(folder.exists() for folder in others)


def _failing_train_worker(rank: int, world: int, port: int, out: str) -> None:
    """DDP training in which rank 1's model raises inside its third forward (step 3 of epoch 1), while rank 0 is
    in the gradient all-reduce of that step waiting for it."""
    import vitlens.train.loop as loop
    from vitlens.train import train

    build = loop._scratch_model

    def failing_model(config, num_classes):
        built = build(config, num_classes)
        calls = []

        def third_forward_fails(module, args):
            calls.append(1)
            if rank == 1 and len(calls) == 3:
                raise RuntimeError("rank 1's own bug")

        built.model.register_forward_pre_hook(third_forward_fails)
        return built

    loop._scratch_model = failing_model
    try:
        with _in_group(rank, world, port):
            train(_train_config(Path(out) / "data"), Path(out) / f"run{rank}")
    except Exception as e:
        Path(out, f"error{rank}.txt").write_text(f"{type(e).__name__}|{e}")
        sys.exit(1)


@pytest.mark.slow
def test_a_failing_rank_ends_ddp_training(train_folder, tmp_path):
    shutil.copytree(train_folder, tmp_path / "data")
    codes, elapsed = _spawn(_failing_train_worker, 2, tmp_path, timeout=60)
    assert codes == [1, 1] and elapsed < 60, (codes, elapsed)
    errors = [(tmp_path / f"error{rank}.txt").read_text().split("|", 1) for rank in range(2)]
    assert errors[1] == ["RuntimeError", "rank 1's own bug"]  # a rank's own error passes unchanged
    kind, line = errors[0]  # the peer blocked in the all-reduce inside backward: one line naming its rank
    assert kind == "RankFailed" and line.startswith("rank 0: the gradient all-reduce failed; another rank failed first")
    assert "\n" not in line
    assert not (tmp_path / "run0" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("vitlens") is None, reason="the vitlens console script is not installed")
def test_cli_train_under_torchrun(train_folder, tmp_path):
    """`torchrun vitlens train`: one summary (rank 0's), the global image counts, rank 0's files."""
    out = tmp_path / "run"
    args = [
        "train", "--data", str(train_folder), "--img-size", "16", "--patch-size", "4", "--embed-dim", "16",
        "--depth", "1", "--num-heads", "2", "--model-kwargs", '{"in_chans": 1}', "--epochs", "2", "--batch-size",
        "10", "--out", str(out),
    ]  # fmt: skip
    printed = _vitlens_json(args, 2)
    assert (printed["num_train"], printed["num_test"], printed["epochs"]) == (36, 9, 2)
    assert len((out / "metrics.csv").read_text().splitlines()) == 3 and (out / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_explain_ranks_give_the_single_process_maps_and_curves(world, tmp_path):
    with _one_thread():
        want = _explain()
    assert want["maps"].shape[0] == EXPLAIN_IMAGES == want["probabilities"].shape[2]
    codes, _ = _spawn(_explain_worker, world, tmp_path)
    assert codes == [0] * world
    for rank in range(world):
        with np.load(tmp_path / f"explain{rank}.npz") as got:
            for name, value in want.items():  # per image, gathered in dataset order: bit for bit
                assert np.array_equal(got[name], value), name


REPORT_SECTIONS = ["info", "attention-distance", "tokens", "rollout", "cka"]


def _report(out: Path) -> dict:
    """The report's summary numbers on the demo model and NUM_IMAGES digits (rank 0 writes ``out``)."""
    from vitlens.models import load_vit
    from vitlens.report import build_report

    vit = load_vit("demo", device="cpu")
    result = build_report(
        vit, sections=REPORT_SECTIONS, out=out, num_images=NUM_IMAGES, rollout_images=3, use_cache=False
    )
    assert result.ok, result.failed
    return {name: s["summary"] for name, s in result.summary["sections"].items()}


def _report_worker(rank: int, world: int, port: int, out: str) -> None:
    from vitlens import distributed

    with _in_group(rank, world, port):
        numbers = _report(Path(out) / "report")
        numbers["world_size"] = distributed.world_size()  # the sections ran sharded, not each on all images
    Path(out, f"report{rank}.json").write_text(json.dumps(numbers))


@pytest.mark.slow
def test_report_under_two_ranks_gives_the_single_process_summary(tmp_path):
    single = json.loads(json.dumps(_report(tmp_path / "single")))
    codes, _ = _spawn(_report_worker, 2, tmp_path, timeout=180)
    assert codes == [0, 0]
    for rank in (0, 1):  # every rank holds the whole report's numbers
        ranked = json.loads(Path(tmp_path, f"report{rank}.json").read_text())
        assert ranked.pop("world_size") == 2 and ranked.keys() == single.keys()
        for name in single:
            _assert_close_tree(ranked[name], single[name], name)
    assert (tmp_path / "report" / "index.html").is_file() and (tmp_path / "report" / "summary.json").is_file()


def _assert_close_tree(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_close_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9), where
    else:
        assert a == b, where


def _nccl_numbers(out: Path) -> dict[str, np.ndarray]:
    """attention-distance, tokens and rollout on the demo model on CUDA, and a short training run from ``out/data``."""
    import vitlens
    from vitlens.attention import rollout_for
    from vitlens.data import open_dataset
    from vitlens.models import load_vit
    from vitlens.models.checkpoint import read_checkpoint
    from vitlens.train import train

    vit = load_vit("demo", device="cuda")  # cuda:LOCAL_RANK under torchrun
    data = open_dataset("digits", vit.preprocess, split="test", num_images=NUM_IMAGES)
    att = vitlens.attention_distance(vit, data, batch_size=4).distance
    tok = vitlens.tokens(vit, data, batch_size=4, norm_threshold=10.0)
    roll = rollout_for(vit, data, batch_size=1)
    run = train(replace(_train_config(out / "data"), device="cuda", epochs=2), out / "gpu-run")
    weights = read_checkpoint(run.checkpoint).state_dict if run.checkpoint.exists() else {}
    return {
        "distance_px": att.distance_px,
        "histograms": tok.norms.histograms,
        "rollout": roll.maps,
        **{f"w.{k}": v.float().numpy() for k, v in weights.items()},
    }


def _nccl_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from vitlens.distributed import distributed_context

    _rank_env(rank, world, port)
    with distributed_context(device="cuda"):
        assert dist.get_backend() == "nccl"
        numbers = _nccl_numbers(Path(out) / f"rank{rank}")
    np.savez(Path(out) / f"nccl{rank}.npz", **numbers)


@pytest.mark.slow
@pytest.mark.skipif(
    not __import__("torch").cuda.is_available() or __import__("torch").cuda.device_count() < 2,
    reason="needs two CUDA GPUs (NCCL)",
)
def test_nccl_ranks_give_the_single_gpu_numbers(train_folder, tmp_path):
    """Two ranks on two GPUs (NCCL; run by scripts/gpu_check.sh): the single GPU's numbers and training weights."""
    for rank in ("single", 0, 1):
        shutil.copytree(train_folder, tmp_path / (f"rank{rank}" if rank != "single" else "single") / "data")
    want = _nccl_numbers(tmp_path / "single")
    codes, _ = _spawn(_nccl_worker, 2, tmp_path, timeout=240)
    assert codes == [0, 0]
    with np.load(tmp_path / "nccl0.npz") as got:
        assert set(got.files) == set(want)
        for name, value in want.items():  # GPU kernels differ with the batch composition: float32 rounding
            np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
