"""One benchmark case per process: ``python -m benchmarks.cases '<json>'`` prints one JSON line of results.

Each case runs in a fresh interpreter because the only honest peak-memory number for torch on CPU is the process
high-water mark (``ru_maxrss``): tracemalloc does not see torch's allocator, and a high-water mark cannot be reset
inside a process. The first pass over the images is the memory pass (it is also the warm-up); the timed passes
follow and the best is kept.
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _plain_forward(vit, dataset, batch_size: int) -> Callable[[], None]:
    from vitlens.data import iterate_batches

    dtype = next(vit.model.parameters()).dtype

    def run() -> None:
        # The floor: timm's own forward, fused attention, nothing captured.
        with torch.inference_mode():
            for batch in iterate_batches(dataset, batch_size=batch_size, device=vit.device):
                vit.model(batch.images.to(dtype))

    return run


def _attention_distance(vit, dataset, batch_size: int) -> Callable[[], None]:
    from vitlens.attention import mean_attention_distance_for

    return lambda: mean_attention_distance_for(vit, dataset, batch_size=batch_size)


def _rollout(vit, dataset, batch_size: int) -> Callable[[], None]:
    from vitlens.attention import rollout_for

    return lambda: rollout_for(vit, dataset, batch_size=batch_size)


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


def _keep_every_map(vit, dataset, batch_size: int) -> Callable[[], None]:
    """How the existing notebooks do it: timm's ``AttentionExtract`` keeps every layer's maps of every image."""
    from vitlens.data import iterate_batches

    for block in vit.model.blocks:
        block.attn.fused_attn = False  # the hooked attn_drop only runs on the unfused path
    if hasattr(__import__("timm.utils", fromlist=["x"]), "AttentionExtract"):
        from timm.utils import AttentionExtract

        extractor = AttentionExtract(vit.model, method="hook")  # hooks on every *attn_drop
    else:  # older timm: plain forward hooks, kept for the life of this process
        outputs: dict[str, torch.Tensor] = {}
        for i, block in enumerate(vit.model.blocks):
            block.attn.attn_drop.register_forward_hook(lambda _m, _i, out, i=i: outputs.__setitem__(f"{i}", out))

        def extractor(x: torch.Tensor) -> dict[str, torch.Tensor]:
            vit.model(x)
            return dict(outputs)

    dtype = next(vit.model.parameters()).dtype

    def run() -> None:
        maps: dict[str, list[np.ndarray]] = {}
        with torch.inference_mode():
            for batch in iterate_batches(dataset, batch_size=batch_size, device=vit.device):
                for name, attn in extractor(batch.images.to(dtype)).items():
                    maps.setdefault(name, []).append(attn.float().cpu().numpy())  # [B, heads, N, N]
        attn = np.stack([np.concatenate(parts) for parts in maps.values()])  # [layers, images, heads, N, N]
        _numpy_mean_distance(attn, vit.layout)

    return run


KINDS: dict[str, Callable[..., Callable[[], None]]] = {
    "plain-forward": _plain_forward,
    "attention-distance": _attention_distance,
    "keep-every-map": _keep_every_map,
    "rollout": _rollout,
}


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Load the model, open ``num_images`` digits upsampled to the model's size, run ``kind`` once for memory and
    ``repeats`` times for time."""
    from vitlens.data import open_dataset
    from vitlens.models import load_vit

    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    if case["kind"] == "fewshot":
        return _fewshot(case)
    vit = load_vit(case["model"], pretrained=False, img_size=case["img_size"], device=case["device"])
    dataset = open_dataset("digits", vit.preprocess, split="all", num_images=case["num_images"])
    run = KINDS[case["kind"]](vit, dataset, case["batch_size"])
    device = vit.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _max_rss_mib()
    run()
    _sync(device)
    rss_after = _max_rss_mib()
    times = []
    for _ in range(case["repeats"]):
        started = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - started)
    best = min(times)
    out = {
        **case,
        "images": len(dataset),
        "seconds": best,
        "images_per_s": len(dataset) / best,
        "rss_mib": rss_after,
        "rss_growth_mib": rss_after - rss_before,
    }
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _fewshot(case: dict[str, Any]) -> dict[str, Any]:
    """The closed-form few-shot sweep (default shots and seeds) on the demo model's digits features."""
    from vitlens.data import open_dataset
    from vitlens.fewshot import cached_features, fewshot_lsr
    from vitlens.models import load_vit

    vit = load_vit("demo", device=case["device"])
    pool = open_dataset("digits", vit.preprocess, split="train", require_labels=True)
    test = open_dataset("digits", vit.preprocess, split="test", require_labels=True)
    train_feats, _ = cached_features(vit, pool, use_cache=False)
    test_feats, _ = cached_features(vit, test, use_cache=False)
    fewshot_lsr(train_feats, pool.labels, test_feats, test.labels)  # warm-up
    times = []
    for _ in range(case["repeats"]):
        started = time.perf_counter()
        fewshot_lsr(train_feats, pool.labels, test_feats, test.labels)
        times.append(time.perf_counter() - started)
    return {**case, "images": len(pool) + len(test), "seconds": min(times)}


if __name__ == "__main__":
    print(json.dumps(run_case(json.loads(sys.argv[1]))))
