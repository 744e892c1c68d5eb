"""Benchmark cases, one process each: ``python -m benchmarks.cases '<json>'`` prints one JSON line of results.

Two kinds of process:

- ``speed``: loads the model once and times every method on the same images in interleaved rounds (plain, unfused,
  attention-distance, ...; then again), keeping each method's best round. On a shared machine a slow spell then
  hits every method alike instead of one, so the ratios hold (a method timed alone, minutes after another, varied by
  more than 10 % here).
- ``memory``: one method, one pass, in a fresh interpreter, because the only honest peak-memory number for torch
  on the CPU is the process high-water mark (``ru_maxrss``): tracemalloc does not see torch's allocator, and a
  high-water mark cannot be reset inside a process. On CUDA also ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _rss_now_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward(vit, dataset, batch_size: int, *, fused: bool) -> Callable[[], None]:
    from vitlens.data import iterate_batches

    dtype = next(vit.model.parameters()).dtype

    def run() -> None:
        # fused=True is the floor: timm's own forward, SDPA, nothing captured. fused=False is timm's explicit
        # path, which materialises every layer's attention map: the floor of any method that reads the maps.
        with torch.inference_mode(), vit.fused_attention(fused):
            for batch in iterate_batches(dataset, batch_size=batch_size, device=vit.device):
                vit.model(batch.images.to(dtype))

    return run


def _attention_distance(vit, dataset, batch_size: int) -> Callable[[], None]:
    from vitlens.attention import mean_attention_distance_for

    return lambda: mean_attention_distance_for(vit, dataset, batch_size=batch_size)


def _rollout(vit, dataset, batch_size: int) -> Callable[[], None]:
    from vitlens.attention import rollout_for

    return lambda: rollout_for(vit, dataset, batch_size=batch_size)


def _features(vit, dataset, batch_size: int) -> Callable[[], None]:
    from vitlens.features import extract_features

    return lambda: extract_features(vit, dataset, batch_size=batch_size)


def _tokens(vit, dataset, batch_size: int, *, threshold: float | None) -> Callable[[], None]:
    from vitlens.definitions.tokens import token_norms_for

    # With a threshold: the counting pass (norms, attention of every layer, patch embeddings), the whole cost of
    # `vitlens tokens --norm-threshold X`; without: the norms-only first pass that `auto` adds.
    return lambda: token_norms_for(vit, dataset, batch_size=batch_size, threshold=threshold)


def _numpy_mean_distance(attn: np.ndarray, layout) -> np.ndarray:
    """Mean attention distance the notebook way: every map in memory, one NumPy expression. ``attn`` is
    ``[layers, B, heads, N, N]``; returns ``[layers, heads]`` in pixels."""
    H, W = layout.grid_size
    ph, pw = layout.patch_size
    ys, xs = np.meshgrid(np.arange(H) * ph, np.arange(W) * pw, indexing="ij")
    pos = np.stack([ys.ravel(), xs.ravel()], axis=1).astype(np.float32)  # [H*W, 2]
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)  # [H*W, H*W]
    s = layout.patch_slice
    p = attn[..., s, s]  # [layers, B, heads, H*W, H*W]
    p = p / p.sum(-1, keepdims=True)
    return (p * dist).sum(-1).mean(-1).mean(1)


class OverMemory(Exception):
    """keep-every-map passed its RSS cap; ``images`` says how far it got."""

    def __init__(self, images: int, rss_mib: float) -> None:
        super().__init__(f"over the RSS cap after {images} images ({rss_mib:.0f} MiB)")
        self.images, self.rss_mib = images, rss_mib


def _keep_every_map(vit, dataset, batch_size: int, rss_cap_mib: float | None = None) -> Callable[[], None]:
    """How the existing notebooks do it: forward hooks on every ``attn_drop`` (what timm's ``AttentionExtract``
    does with ``method="hook"``) keep every layer's maps of every image, then one NumPy expression.

    The hooks live for one pass only, so the other methods timed in the same process run unhooked. With
    ``rss_cap_mib`` the pass stops with :class:`OverMemory` once the process holds more than that.
    """
    from vitlens.data import iterate_batches

    dtype = next(vit.model.parameters()).dtype

    def run() -> None:
        maps: dict[int, list[np.ndarray]] = {}  # layer -> [B, heads, N, N] per batch
        handles = [
            site.softmax_output.register_forward_hook(
                lambda _m, _i, out, i=site.layer: maps.setdefault(i, []).append(out.float().cpu().numpy())
            )
            for site in vit.attention_sites()  # each block's attn_drop, right after the softmax
        ]
        done = 0
        try:
            with torch.inference_mode(), vit.fused_attention(False):
                for batch in iterate_batches(dataset, batch_size=batch_size, device=vit.device):
                    vit.model(batch.images.to(dtype))
                    done += batch.images.shape[0]
                    if rss_cap_mib is not None and _rss_now_mib() > rss_cap_mib:
                        raise OverMemory(done, _rss_now_mib())
        finally:
            for handle in handles:
                handle.remove()
        attn = np.stack([np.concatenate(maps[i]) for i in sorted(maps)])  # [layers, images, heads, N, N]
        _numpy_mean_distance(attn, vit.layout)

    return run


METHODS: dict[str, Callable[..., Callable[[], None]]] = {
    "plain-forward": lambda vit, ds, bs: _forward(vit, ds, bs, fused=True),
    "unfused-forward": lambda vit, ds, bs: _forward(vit, ds, bs, fused=False),
    "attention-distance": _attention_distance,
    "rollout": _rollout,
    "rollout-one-at-a-time": lambda vit, ds, _bs: _rollout(vit, ds, 1),
    "keep-every-map": _keep_every_map,
    "features": _features,
    "tokens": lambda vit, ds, bs: _tokens(vit, ds, bs, threshold=1e9),
    "tokens-norms-only": lambda vit, ds, bs: _tokens(vit, ds, bs, threshold=None),
}


def _method(name: str, vit, dataset, batch_size: int) -> Callable[[], None]:
    """``METHODS[name]``; ``"rollout@32"`` runs rollout at batch 32 instead of the case's batch size."""
    method, _, batch = name.partition("@")
    return METHODS[method](vit, dataset, int(batch) if batch else batch_size)


def _setup(case: dict[str, Any]):
    from vitlens.data import open_dataset
    from vitlens.models import load_vit

    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    vit = load_vit(case["model"], pretrained=False, img_size=case["img_size"], device=case["device"])
    if case.get("dtype"):  # e.g. "bfloat16": every method casts its images to the weights' dtype
        vit.model.to(getattr(torch, case["dtype"]))
    dataset = open_dataset("digits", vit.preprocess, split="all", num_images=case["num_images"])
    return vit, dataset


def speed(case: dict[str, Any]) -> dict[str, Any]:
    """Images/s of every method in ``case["methods"]``: one warm-up pass each, then ``rounds`` interleaved rounds;
    each method's best round."""
    vit, dataset = _setup(case)
    runs = {name: _method(name, vit, dataset, case["batch_size"]) for name in case["methods"]}
    for run in runs.values():
        run()
    _sync(vit.device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(case["rounds"]):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            _sync(vit.device)
            times[name].append(time.perf_counter() - started)
    n = len(dataset)
    return {
        **case,
        "images": n,
        "seconds": {name: min(t) for name, t in times.items()},
        "images_per_s": {name: n / min(t) for name, t in times.items()},
        "all_seconds": times,
    }


def memory(case: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one pass of ``case["method"]``: growth of the RSS high-water mark over the loaded model (and
    ``max_memory_allocated`` on CUDA), plus that pass's images/s."""
    from vitlens.attention import capped_batch_size

    vit, dataset = _setup(case)
    name = case["method"]
    if name == "keep-every-map":
        run = _keep_every_map(vit, dataset, case["batch_size"], rss_cap_mib=case.get("rss_cap_mib"))
    else:
        run = METHODS[name](vit, dataset, case["batch_size"])
    device = vit.device
    dtype = next(vit.model.parameters()).dtype
    # The streaming analyses lower the batch size to their attention-memory budget; record what they really ran.
    ran_batch = case["batch_size"]
    if name in ("attention-distance", "rollout", "tokens"):
        ran_batch = capped_batch_size(vit, ran_batch, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _max_rss_mib()
    out: dict[str, Any] = {
        **case,
        "images": len(dataset),
        "num_tokens": vit.layout.num_tokens,
        "depth": vit.depth,
        "num_heads": vit.num_heads,
        "ran_batch_size": ran_batch,
    }
    started = time.perf_counter()
    try:
        run()
    except OverMemory as e:
        out["stopped_after_images"] = e.images
    _sync(device)
    seconds = time.perf_counter() - started
    rss_after = _max_rss_mib()
    done = out.get("stopped_after_images", len(dataset))
    out |= {"seconds": seconds, "images_per_s": done / seconds, "rss_mib": rss_after}
    out["rss_growth_mib"] = rss_after - rss_before
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def fewshot(case: dict[str, Any]) -> dict[str, Any]:
    """The closed-form few-shot sweep on the demo model's digits features, against scikit-learn's
    LogisticRegression on the same features and shots (:mod:`benchmarks.fewshot_vs_logreg`)."""
    from benchmarks.fewshot_vs_logreg import compare
    from vitlens.data import open_dataset
    from vitlens.models import load_vit

    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    vit = load_vit("demo", device=case["device"])
    pool = open_dataset("digits", vit.preprocess, split="train", require_labels=True)
    test = open_dataset("digits", vit.preprocess, split="test", require_labels=True)
    return {**case, **compare(vit, pool, test, repeats=case["repeats"], use_cache=False)}


def _collect_then_cka(vit, dataset, batch_size: int, tokens: str) -> None:
    """torch_cka's way: every chosen layer's features of every image first, then one full-data CKA per pair."""
    from vitlens.analysis.cka import linear_cka
    from vitlens.data import iterate_batches

    kept: dict[int, list[torch.Tensor]] = {}
    layout = vit.layout

    def keep(layer: int, out: torch.Tensor) -> None:
        rows = out[:, layout.patch_slice]  # [B, H*W, D]
        rows = rows.mean(dim=1) if tokens == "mean-patch" else rows.reshape(-1, rows.shape[-1])
        kept.setdefault(layer, []).append(rows.float().cpu())

    with torch.inference_mode(), vit.hooks(blocks=keep):
        for batch in iterate_batches(dataset, batch_size=batch_size, device=vit.device):
            vit.features(batch.images)
    feats = [torch.cat(kept[layer]) for layer in sorted(kept)]  # [rows, D] per layer, all images
    for x in feats:
        for y in feats:
            linear_cka(x, y)  # the n x n Gram of all rows: what keeping everything leads to


def cka(case: dict[str, Any]) -> dict[str, Any]:
    """One pass of ``case["method"]`` (plain-forward, cka or collect-then-cka) with ``case["tokens"]``, in a fresh
    process: seconds, images/s and peak memory, as :func:`memory` measures them."""
    from vitlens.definitions.cka import cka as compute

    vit, dataset = _setup(case)
    name, tokens, bs = case["method"], case["tokens"], case["batch_size"]
    runs = {
        "plain-forward": _forward(vit, dataset, bs or 8, fused=True),
        "cka": lambda: compute(vit, dataset, tokens=tokens, minibatch_size=case["minibatch_size"], batch_size=bs),
        "collect-then-cka": lambda: _collect_then_cka(vit, dataset, bs or 8, tokens),
    }
    if vit.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(vit.device)
    rss_before = _max_rss_mib()
    started = time.perf_counter()
    runs[name]()
    _sync(vit.device)
    seconds = time.perf_counter() - started
    out = {**case, "images": len(dataset), "seconds": seconds, "images_per_s": len(dataset) / seconds}
    out["rss_growth_mib"] = _max_rss_mib() - rss_before
    if vit.device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(vit.device) / 2**20
    return out


KINDS = {"speed": speed, "memory": memory, "fewshot": fewshot, "cka": cka}


if __name__ == "__main__":
    case = json.loads(sys.argv[1])
    print(json.dumps(KINDS[case["kind"]](case)))
