"""Mean attention distance per layer and head: App. D.7 and Fig. 7 (right) of the ViT paper (Dosovitskiy et al. 2020).

For one image, layer and head, the distance is ``mean_i sum_j a_ij * ||p_i - p_j||`` over patch queries ``i`` and patch
keys ``j``, with ``p`` the patch centres in pixels: the paper's "attention distance", analogous to a CNN's receptive
field size. Prefix tokens (class, distillation, registers) have no position, so they are neither queries nor keys; the
mass patch queries give them is reported separately as ``prefix_mass``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange

from vitlens.analysis._common import as_f64, check_attention, compute_dtype, f64_device, to_numpy
from vitlens.errors import ParameterError, VitlensError
from vitlens.layout import TokenLayout


@dataclass(frozen=True)
class AttentionDistance:
    """Mean attention distance in pixels for every layer and head, averaged over images."""

    distance_px: np.ndarray  # [L, heads] mean over images of the per-image mean attention distance
    std_px: np.ndarray  # [L, heads] std over images (ddof=0) of the per-image mean attention distance
    prefix_mass: np.ndarray  # [L, heads] mean attention weight patch queries give to all prefix tokens together
    num_images: int  # images averaged over
    renormalized: bool  # whether patch->patch weights were rescaled to sum to 1 per query
    uniform_px: float  # distance uniform attention over all patches would give: the "no locality" reference
    patch_size: tuple[int, int]  # (ph, pw) in pixels
    grid_size: tuple[int, int]  # (H, W) in patches

    def to_dict(self) -> dict:
        return {
            "distance_px": self.distance_px.tolist(),
            "std_px": self.std_px.tolist(),
            "prefix_mass": self.prefix_mass.tolist(),
            "num_images": self.num_images,
            "renormalized": self.renormalized,
            "uniform_px": self.uniform_px,
            "patch_size": list(self.patch_size),
            "grid_size": list(self.grid_size),
        }


def patch_centres_px(layout: TokenLayout, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Pixel centre ``(y, x) = ((row + 0.5) ph, (col + 0.5) pw)`` of every patch in token order, ``[HW, 2]`` float64."""
    (h, w), (ph, pw) = layout.grid_size, layout.patch_size
    ys = (torch.arange(h, dtype=torch.float64, device=device) + 0.5) * ph  # [H]
    xs = (torch.arange(w, dtype=torch.float64, device=device) + 0.5) * pw  # [W]
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # [H, W] each
    return rearrange(torch.stack([yy, xx], dim=-1), "h w yx -> (h w) yx")  # [HW, 2], row-major like the tokens


def patch_distances_px(
    layout: TokenLayout, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Euclidean distance in pixels between the centres of every pair of patches, ``[HW, HW]`` in token order."""
    centres = patch_centres_px(layout, device=f64_device(torch.device(device or "cpu")))
    diff = centres[:, None, :] - centres[None, :, :]  # [HW, HW, 2]
    return diff.square().sum(-1).sqrt().to(dtype).to(device)  # [HW, HW], cast on the CPU for MPS


def uniform_attention_distance_px(layout: TokenLayout) -> float:
    """Mean distance when every patch query attends uniformly to all patches (itself included)."""
    return float(patch_distances_px(layout).mean())


def key_distances_px(
    layout: TokenLayout, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Distance in pixels from every patch query to every key token, ``[HW, N]``, 0 in the prefix tokens' columns.

    Multiplying a patch query's whole attention row by this row gives its patch-to-patch distance sum without
    slicing the keys, so the reduction reads the contiguous rows in place instead of copying a strided block.
    """
    dist = torch.zeros(layout.num_patches, layout.num_tokens, dtype=dtype, device=device)  # [HW, N]
    dist[:, layout.patch_slice] = patch_distances_px(layout, device=device, dtype=dtype)
    return dist


CPU_CHUNK_BYTES = 4 * 2**20
"""On the CPU the per-image reduction walks the ``[B * heads]`` query blocks in chunks of about this many bytes,
through one reused buffer: the whole-batch product would be a fresh tensor as large as the map (43 MiB per image
of ViT-S/14 at 518 px), whose page faults and cache misses cost more than the arithmetic (measured: see "Numbers
quoted in the code" in docs/benchmarks.md). Other devices take the batch whole."""


def attention_distance_per_image(
    attn: torch.Tensor,
    layout: TokenLayout,
    *,
    renormalize: bool = True,
    key_distances: torch.Tensor | None = None,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean attention distance and prefix mass of one layer, on the attention's device.

    Args:
        attn: one layer's post-softmax attention ``[B, heads, N, N]`` (rows are queries).
        layout: the model's token layout.
        renormalize: rescale each patch query's weights on patch keys to sum to 1 before averaging distances (see
            :class:`AttentionDistanceAccumulator` for why this is the default). A query with no weight on any patch
            contributes distance 0.
        key_distances: :func:`key_distances_px` on the attention's device in the compute dtype, when the caller
            keeps one (it is built here otherwise).
        chunk_bytes: bytes of attention reduced per step; None for :data:`CPU_CHUNK_BYTES` on the CPU and the whole
            batch elsewhere. The result does not depend on it.

    Returns:
        ``(distance_px, prefix_mass)``, each ``[B, heads]``: distance averaged over patch queries, and the weight
        patch queries give to prefix tokens, averaged over patch queries. At least float32 (float64 for float64
        input).
    """
    check_attention(attn, layout)
    dtype = compute_dtype(attn.dtype, attn.device)
    if key_distances is None:
        key_distances = key_distances_px(layout, device=attn.device, dtype=dtype)  # [HW, N]
    b, heads, n, _ = attn.shape
    hw = layout.num_patches
    rows = attn.detach()[:, :, layout.patch_slice].reshape(b * heads, hw, n)  # [B*heads, HW, N]: a view
    if chunk_bytes is None:
        chunk_bytes = CPU_CHUNK_BYTES if attn.device.type == "cpu" else rows.numel() * rows.element_size()
    step = max(1, chunk_bytes // max(1, hw * n * torch.finfo(dtype).bits // 8))
    per_query = torch.empty(b * heads, hw, dtype=dtype, device=attn.device)  # [B*heads, HW] distance sums
    to_patches = torch.empty_like(per_query)  # [B*heads, HW] weight on patch keys
    to_prefix = torch.empty_like(per_query)  # [B*heads, HW] weight on prefix keys
    buffer = torch.empty(min(step, b * heads), hw, n, dtype=dtype, device=attn.device)  # reused product
    for start in range(0, b * heads, step):
        block = rows[start : start + step].to(dtype)  # [c, HW, N]; a view unless upcast
        product = buffer[: block.shape[0]]
        torch.mul(block, key_distances, out=product)  # prefix keys weigh 0
        torch.sum(product, dim=-1, out=per_query[start : start + step])
        torch.sum(block[..., layout.patch_slice], dim=-1, out=to_patches[start : start + step])
        torch.sum(block[..., layout.prefix_slice], dim=-1, out=to_prefix[start : start + step])
    if renormalize:
        per_query = per_query / to_patches.clamp_min(torch.finfo(dtype).tiny)
    distance = per_query.mean(-1).view(b, heads)
    return distance, to_prefix.mean(-1).view(b, heads)


class AttentionDistanceAccumulator:
    """Streaming mean attention distance: feed it each layer's attention as batches go by, then ask for the result.

    Each ``update`` reduces a batch at once to per-head sums, sums of squares and prefix-mass sums (float64, on the
    attention's device; on the CPU for MPS), so the state is ``O(depth * heads)`` whatever the number of images and
    no attention map is kept.

    ``renormalize=True`` by default: models with registers or attention sinks put much of a patch query's weight on
    prefix tokens, and without renormalisation that mass counts as distance 0, so the distance would shrink with sink
    usage and confound "how far a head looks" with "how much it looks at the prefix" (reported separately as
    ``prefix_mass``). The ViT paper's models have one class token that takes little weight, so the two choices give
    nearly the same numbers there.
    """

    def __init__(self, layout: TokenLayout, *, depth: int, num_heads: int, renormalize: bool = True) -> None:
        for name, value in (("depth", depth), ("num_heads", num_heads)):
            if value < 1:
                raise ParameterError(name, f"{name} must be positive, not {value}")
        self.layout = layout
        self.depth = depth
        self.num_heads = num_heads
        self.renormalize = renormalize
        self._state: dict[str, torch.Tensor] | None = None  # created on the first update's device
        self._key_distances: torch.Tensor | None = None  # [HW, N] on the attention's device and compute dtype

    def _init_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        shape = (self.depth, self.num_heads)
        dev = f64_device(device)
        return {
            "distance_sum": torch.zeros(shape, dtype=torch.float64, device=dev),  # [L, heads] sum of per-image means
            "distance_sq_sum": torch.zeros(shape, dtype=torch.float64, device=dev),  # [L, heads] sum of their squares
            "prefix_mass_sum": torch.zeros(shape, dtype=torch.float64, device=dev),  # [L, heads]
            "count": torch.zeros(self.depth, dtype=torch.int64, device=dev),  # [L] images seen by each layer
        }

    def update(self, layer: int, attn: torch.Tensor) -> None:
        """Add one batch of layer ``layer``'s (0-based) post-softmax attention ``[B, heads, N, N]``."""
        if not 0 <= layer < self.depth:
            raise VitlensError(f"layer {layer} is outside the {self.depth} layers (0-based) this accumulator expects")
        if attn.ndim == 4 and attn.shape[1] != self.num_heads:
            raise VitlensError(f"layer {layer} has {attn.shape[1]} heads, expected {self.num_heads}")
        dtype = compute_dtype(attn.dtype, attn.device)
        dist = self._key_distances
        if dist is None or dist.device != attn.device or dist.dtype != dtype:
            dist = self._key_distances = key_distances_px(self.layout, device=attn.device, dtype=dtype)
        distance, prefix_mass = attention_distance_per_image(
            attn, self.layout, renormalize=self.renormalize, key_distances=dist
        )
        if self._state is None:
            self._state = self._init_state(attn.device)
        state = self._state
        distance = as_f64(distance, state["count"].device)  # [B, heads]
        prefix_mass = as_f64(prefix_mass, state["count"].device)  # [B, heads]
        state["distance_sum"][layer] += distance.sum(0)
        state["distance_sq_sum"][layer] += distance.square().sum(0)
        state["prefix_mass_sum"][layer] += prefix_mass.sum(0)
        state["count"][layer] += distance.shape[0]

    @property
    def images_per_layer(self) -> tuple[int, ...]:
        """How many images each layer has seen so far."""
        if self._state is None:
            return (0,) * self.depth
        return tuple(int(c) for c in self._state["count"].tolist())

    @property
    def num_images(self) -> int:
        """Images seen by every layer (a forward pass in progress has updated only the first layers)."""
        return min(self.images_per_layer)

    def state(self) -> dict[str, torch.Tensor]:
        """The accumulator's whole state (empty before the first update); its size never depends on the images seen."""
        return {} if self._state is None else dict(self._state)

    def all_reduce(self) -> None:
        """Add up the state of every rank of a torch.distributed job, so that each holds the sums of all images.

        Every entry of the state is a sum or a count, so the sums of the per-rank sums are the single process's
        (to float64 rounding); the moments, not the means, cross the network: ``3 * depth * heads`` floats and
        ``depth`` counts. A no-op in a single process; a rank that saw no image contributes zeros.
        """
        from vitlens.distributed import all_reduce_sum, is_distributed

        if not is_distributed():
            return
        if self._state is None:
            self._state = self._init_state(torch.device("cpu"))
        self._state = {name: all_reduce_sum(value) for name, value in self._state.items()}

    def result(self) -> AttentionDistance:
        """Averages over the images seen so far.

        Raises:
            VitlensError: no images were seen, or the layers saw different numbers of images.
        """
        counts = self.images_per_layer
        if max(counts) == 0:
            raise VitlensError("no attention was recorded: run at least one image through the model")
        if min(counts) != max(counts):
            raise VitlensError(f"layers saw different numbers of images ({', '.join(map(str, counts))})")
        assert self._state is not None
        n = counts[0]
        mean = self._state["distance_sum"] / n
        var = (self._state["distance_sq_sum"] / n - mean.square()).clamp_min(0.0)
        return AttentionDistance(
            distance_px=to_numpy(mean),
            std_px=to_numpy(var.sqrt()),
            prefix_mass=to_numpy(self._state["prefix_mass_sum"] / n),
            num_images=n,
            renormalized=self.renormalize,
            uniform_px=uniform_attention_distance_px(self.layout),
            patch_size=tuple(self.layout.patch_size),
            grid_size=tuple(self.layout.grid_size),
        )


def mean_attention_distance(
    attentions: Iterable[torch.Tensor], layout: TokenLayout, *, renormalize: bool = True
) -> AttentionDistance:
    """Mean attention distance of every layer from a list of per-layer attentions ``[B, heads, N, N]``, layer 0 first.

    See :class:`AttentionDistanceAccumulator` for the definition and the ``renormalize`` default.
    """
    attentions = list(attentions)
    if not attentions:
        raise VitlensError("no attention was given: pass one [B, heads, N, N] tensor per layer")
    for attn in attentions:
        check_attention(attn, layout)
    acc = AttentionDistanceAccumulator(
        layout, depth=len(attentions), num_heads=attentions[0].shape[1], renormalize=renormalize
    )
    for layer, attn in enumerate(attentions):
        acc.update(layer, attn)
    return acc.result()
