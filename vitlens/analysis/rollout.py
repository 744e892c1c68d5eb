"""Attention rollout (Abnar & Zuidema 2020), as used for Fig. 6 and App. D.8 of the ViT paper (Dosovitskiy et al. 2020).

Each layer's heads are fused into one ``[N, N]`` matrix, optionally its weakest patch-to-patch weights are discarded,
the residual connection is modelled by adding the identity and renormalising rows, and the layers are multiplied:
``R = A_L @ ... @ A_start``. Row ``t`` of ``R`` says how much each input token contributes to token ``t`` at the top.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from einops import rearrange

from vitlens.analysis._common import check_attention, compute_dtype, to_numpy
from vitlens.errors import ParameterError, VitlensError
from vitlens.layout import TokenLayout

HeadFusion = Literal["mean", "max", "min"]
# What a map is read from: a prefix token's row ("cls", "dist", or "reg:N" for the N-th register, 0-based), or
# "mean-patch", the mean of all patch tokens' rows (for models that pool patches instead of using a class token).
RolloutTarget = Literal["cls", "dist", "mean-patch"] | str

_REG = re.compile(r"reg:(\d+)")


def _available_targets(layout: TokenLayout) -> str:
    names = [
        k if k != "reg" else f"reg:{layout.prefix_kinds[:i].count('reg')}" for i, k in enumerate(layout.prefix_kinds)
    ]
    return ", ".join([*names, "mean-patch"])


def resolve_target(target: str, layout: TokenLayout) -> int | None:
    """Sequence index of ``target``'s row, or ``None`` for ``"mean-patch"``.

    Raises:
        ParameterError: ``target`` is not one of the accepted forms.
        VitlensError: the model has no such token.
    """
    if target == "mean-patch":
        return None
    if target in ("cls", "dist"):
        kind, n = target, 0
    elif m := _REG.fullmatch(target):
        kind, n = "reg", int(m.group(1))
    else:
        raise ParameterError("target", f"target must be cls, dist, reg:N or mean-patch, not {target!r}")
    try:
        return layout.token_index(kind, n)
    except KeyError:
        raise VitlensError(f"model has no '{target}' token; its targets are: {_available_targets(layout)}") from None


def _check_options(head_fusion: str, discard_ratio: float, start_layer: int) -> None:
    if head_fusion not in ("mean", "max", "min"):
        raise ParameterError("head_fusion", f"unknown head_fusion '{head_fusion}': use mean, max or min")
    if not 0.0 <= discard_ratio < 1.0:
        raise ParameterError("discard_ratio", f"discard_ratio must be in [0, 1), got {discard_ratio}")
    if start_layer < 0:
        raise ParameterError("start_layer", f"start_layer must be 0 or more (0-based), got {start_layer}")


@dataclass(frozen=True)
class Rollout:
    """Rollout maps at patch resolution for a batch of images."""

    maps: np.ndarray  # [B, H, W] the target row's weight on each patch, scaled so each map's max is 1 (all-zero kept)
    patch_mass: np.ndarray  # [B] the target row's total weight on patch tokens before scaling (the rest is on prefix)
    head_fusion: str
    discard_ratio: float
    start_layer: int  # first layer multiplied in (0-based)
    num_layers: int  # how many layers were multiplied in
    target: str
    grid_size: tuple[int, int]

    def to_dict(self) -> dict:
        return {
            "maps": self.maps.tolist(),
            "patch_mass": self.patch_mass.tolist(),
            "head_fusion": self.head_fusion,
            "discard_ratio": self.discard_ratio,
            "start_layer": self.start_layer,
            "num_layers": self.num_layers,
            "target": self.target,
            "grid_size": list(self.grid_size),
        }


def fuse_heads(attn: torch.Tensor, head_fusion: HeadFusion, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[B, heads, N, N]`` -> ``[B, N, N]`` by the mean, max or min over heads, in ``dtype`` (default: ``attn``'s).

    The mean accumulates in ``dtype``; max and min are exact in any dtype, so they are cast afterwards.
    """
    dtype = attn.dtype if dtype is None else dtype
    if head_fusion == "mean":
        return attn.mean(dim=1, dtype=dtype)
    if head_fusion == "max":
        return attn.amax(dim=1).to(dtype)
    if head_fusion == "min":
        return attn.amin(dim=1).to(dtype)
    raise ParameterError("head_fusion", f"unknown head_fusion '{head_fusion}': use mean, max or min")


def rollout_layer_matrix(
    attn: torch.Tensor, layout: TokenLayout, *, head_fusion: HeadFusion = "mean", discard_ratio: float = 0.0
) -> torch.Tensor:
    """One layer's rollout factor ``[B, N, N]``: fused heads, discard, plus identity, rows renormalised to sum to 1.

    The ``floor(discard_ratio * HW^2)`` smallest patch-to-patch weights of each image are set to 0; rows and columns
    of prefix tokens are never discarded (the popular ``vit-explain`` script drops from the whole flattened matrix,
    sparing only its first entry, so the class row's weights can be dropped too).
    """
    _check_options(head_fusion, discard_ratio, 0)
    check_attention(attn, layout)
    # Heads are fused first and only the fused [B, N, N] is cast: casting the [B, heads, N, N] map cost more than
    # the whole rollout. float32 is plenty: every factor is row-stochastic, so the running product's entries stay in
    # [0, 1] and its rows sum to 1 (error about depth x 1e-7, far below what a heat map shows); float64 input stays
    # float64.
    dtype = compute_dtype(attn.dtype, attn.device)
    fused = fuse_heads(attn.detach(), head_fusion, dtype=dtype)  # [B, N, N]
    n = fused.shape[-1]
    hw = layout.num_patches
    k = int(discard_ratio * hw * hw)
    if k > 0:
        ps = layout.patch_slice
        block = rearrange(fused[:, ps, ps], "b i j -> b (i j)")  # [B, HW*HW] patch-to-patch weights
        lowest = block.topk(k, dim=-1, largest=False).indices  # [B, k]
        block = block.scatter(-1, lowest, 0.0)
        fused = fused.clone()
        fused[:, ps, ps] = rearrange(block, "b (i j) -> b i j", i=hw)
    # The residual stream carries each token to itself: (A + I), rows renormalised, which is (A + I) / 2 for a
    # row-stochastic A. The sum is over the last axis (the keys) with keepdim, so each *row* is divided by its own
    # sum; dividing by a bare ``.sum(-1)`` broadcasts over columns instead, a bug in widespread rollout scripts.
    a = fused + torch.eye(n, dtype=dtype, device=fused.device)  # [B, N, N]
    return a / a.sum(dim=-1, keepdim=True)


# Factors kept for the row path before they are folded into a running product: ViT-S/14 at 518 px keeps its 12
# layers of one image (12 x 1370^2 x 4 bytes = 86 MiB) and ViT-B/16 at 224 px those of a batch of 64 (114 MiB).
ROW_PATH_MAX_BYTES = 256 * 2**20


class LayerProduct:
    """The product ``P = M_L @ ... @ M_1`` of per-layer factors ``[B, N, N]`` fed in depth order, read by rows.

    Rollout (and Chefer et al.'s attribution, ``R = (I + Ā_L) ... (I + Ā_1)``) only ever read one row of ``P`` per
    image: ``vᵀ P`` for the target token's one-hot ``v`` (or the mean of the patch tokens' one-hots). Multiplying the
    running product costs ``O(N³)`` per layer; keeping the factors and multiplying ``v`` back through them at the
    end, ``vᵀ M_L``, then ``· M_{L-1}``, ..., costs ``O(N²)`` per layer and ``L N²`` memory. The two give the same
    numbers up to float rounding (tested to 1e-6). This class keeps factors while they take at most ``max_bytes``
    and then folds them into the running product (paying ``O(N³)`` for those layers once), so memory stays bounded
    for any depth and batch; at 518 px (N = 1370) the product path was the whole cost of rollout beyond the forward.
    ``max_bytes=0`` is the running-product path itself.
    """

    def __init__(self, *, max_bytes: int = ROW_PATH_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._folded: torch.Tensor | None = None  # [B, N, N] product of the factors folded so far
        self._factors: list[torch.Tensor] = []  # [B, N, N] each, the layers after _folded, in depth order
        self.num_layers = 0

    def push(self, factor: torch.Tensor) -> None:
        """Multiply in the next layer's factor ``[B, N, N]`` (from the left)."""
        if self.num_layers and factor.shape[0] != self.batch_size:
            raise VitlensError(
                f"layer {self.num_layers} has batch size {factor.shape[0]}, earlier layers {self.batch_size}: "
                "use a new accumulator (or reset()) for each batch"
            )
        self._factors.append(factor)
        self.num_layers += 1
        if sum(f.numel() * f.element_size() for f in self._factors) > self.max_bytes:
            self._fold()

    def _fold(self) -> None:
        for factor in self._factors:
            self._folded = factor if self._folded is None else factor @ self._folded.to(factor.device)
        self._factors = []

    def _first(self) -> torch.Tensor:
        if self.num_layers == 0:
            raise VitlensError("no layer was given: the product is empty")
        return self._folded if self._folded is not None else self._factors[0]

    @property
    def batch_size(self) -> int:
        return self._first().shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self._first().dtype

    @property
    def device(self) -> torch.device:
        return self._first().device

    def rows(self, v: torch.Tensor) -> torch.Tensor:
        """``vᵀ P`` for one row vector per image, ``v [B, N]`` -> ``[B, N]``."""
        if self.num_layers == 0:
            raise VitlensError("no layer was given: the product is empty")
        out = v[:, None, :]  # [B, 1, N]
        for factor in reversed(self._factors):  # the last layer is the leftmost factor
            out = out.to(factor.dtype) @ factor
        if self._folded is not None:
            out = out.to(self._folded.dtype) @ self._folded
        return out[:, 0]

    @property
    def matrix(self) -> torch.Tensor:
        """The whole product ``[B, N, N]`` (folds every kept factor: the ``O(N³)`` path)."""
        if self.num_layers == 0:
            raise VitlensError("no layer was given: the product is empty")
        self._fold()
        return self._folded  # type: ignore[return-value]


def target_vector(index: int | None, layout: TokenLayout, batch: int, *, dtype: torch.dtype, device) -> torch.Tensor:
    """``[B, N]``: the one-hot of token ``index``, or for None (``mean-patch``) the mean of the patch tokens' one-hots,
    so that ``vᵀ P`` is the target's row of ``P`` (or the mean of the patch tokens' rows)."""
    v = torch.zeros(batch, layout.num_tokens, dtype=dtype, device=device)
    if index is None:
        v[:, layout.patch_slice] = 1.0 / layout.num_patches
    else:
        v[:, index] = 1.0
    return v


class RolloutAccumulator:
    """Streaming rollout over the layers of one batch: keeps only the running product ``[B, N, N]``.

    Call ``update(layer, attn)`` for layers in order; layers before ``start_layer`` are ignored. Use a new
    accumulator (or ``reset()``) for each batch. The product is a :class:`LayerProduct`: the maps are read by
    multiplying the target row back through the kept layer factors (``O(N²)`` per layer) unless they outgrow
    ``max_bytes``.
    """

    def __init__(
        self,
        layout: TokenLayout,
        *,
        head_fusion: HeadFusion = "mean",  # ViT paper App. D.8: "averaged attention weights ... across all heads"
        discard_ratio: float = 0.0,  # ViT paper App. D.8 and Abnar & Zuidema 2020 discard nothing
        start_layer: int = 0,
        max_bytes: int = ROW_PATH_MAX_BYTES,
    ) -> None:
        _check_options(head_fusion, discard_ratio, start_layer)
        self.layout = layout
        self.head_fusion = head_fusion
        self.discard_ratio = float(discard_ratio)
        self.start_layer = start_layer
        self.max_bytes = max_bytes
        self.reset()

    def reset(self) -> None:
        """Forget the product, ready for the next batch."""
        self._product = LayerProduct(max_bytes=self.max_bytes)  # A_l @ ... @ A_start

    @property
    def num_layers(self) -> int:
        """Layers multiplied in so far."""
        return self._product.num_layers

    def update(self, layer: int, attn: torch.Tensor) -> None:
        """Multiply in layer ``layer``'s (0-based) post-softmax attention ``[B, heads, N, N]``."""
        if layer < self.start_layer:
            return
        expected = self.start_layer + self.num_layers
        if layer != expected:
            raise VitlensError(f"rollout needs consecutive layers: expected layer {expected}, got {layer}")
        a = rollout_layer_matrix(attn, self.layout, head_fusion=self.head_fusion, discard_ratio=self.discard_ratio)
        self._product.push(a)  # each new layer multiplies from the left

    def _check_any(self) -> None:
        if self.num_layers == 0:
            raise VitlensError(f"no layer from start_layer {self.start_layer} on was given: nothing to roll out")

    @property
    def running(self) -> torch.Tensor:
        """The whole product ``[B, N, N]`` so far (rows sum to 1); ``O(N³)`` per kept layer, where the maps need
        only :meth:`target_weights`."""
        self._check_any()
        return self._product.matrix

    def target_weights(self, target: RolloutTarget = "cls") -> torch.Tensor:
        """``[B, N]``: the target token's row of the product (or the mean of the patch tokens' rows)."""
        index = resolve_target(target, self.layout)
        self._check_any()
        p = self._product
        return p.rows(target_vector(index, self.layout, p.batch_size, dtype=p.dtype, device=p.device))

    def result(self, *, target: RolloutTarget = "cls") -> Rollout:
        """Rollout maps read from ``target``'s row (see :data:`RolloutTarget`).

        A map whose target row has no weight on any patch (e.g. identity attention, where the class token only ever
        attends to itself) stays all zero instead of being scaled.
        """
        weights = self.target_weights(target)[:, self.layout.patch_slice]  # [B, HW]
        peak = weights.amax(dim=-1, keepdim=True)  # [B, 1]
        scaled = torch.where(peak > 0, weights / peak.clamp_min(torch.finfo(weights.dtype).tiny), 0.0)
        h, w = self.layout.grid_size
        return Rollout(
            maps=to_numpy(rearrange(scaled, "b (h w) -> b h w", h=h, w=w)),  # [B, H, W]
            patch_mass=to_numpy(weights.sum(dim=-1)),
            head_fusion=self.head_fusion,
            discard_ratio=self.discard_ratio,
            start_layer=self.start_layer,
            num_layers=self.num_layers,
            target=target,
            grid_size=(h, w),
        )


def attention_rollout(
    attentions: Iterable[torch.Tensor],
    layout: TokenLayout,
    *,
    target: RolloutTarget = "cls",
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    start_layer: int = 0,
) -> Rollout:
    """Attention rollout of a list of per-layer attentions ``[B, heads, N, N]``, layer 0 first.

    Raises:
        ParameterError: bad option, or ``start_layer`` past the last layer.
        VitlensError: the model has no ``target`` token.
    """
    _check_options(head_fusion, discard_ratio, start_layer)
    resolve_target(target, layout)  # fail before any work
    attentions = list(attentions)
    if start_layer >= len(attentions):
        raise ParameterError(
            "start_layer", f"start_layer {start_layer} is past the last of {len(attentions)} layers (0-based)"
        )
    acc = RolloutAccumulator(layout, head_fusion=head_fusion, discard_ratio=discard_ratio, start_layer=start_layer)
    for layer, attn in enumerate(attentions):
        acc.update(layer, attn)
    return acc.result(target=target)


def cls_attention_per_head(attn: torch.Tensor, layout: TokenLayout, *, target: RolloutTarget = "cls") -> np.ndarray:
    """One layer's attention from ``target`` to each patch, per head: ``[B, heads, H, W]`` raw weights (DINO's view).

    ``"mean-patch"`` averages the rows of all patch queries.
    """
    check_attention(attn, layout)
    index = resolve_target(target, layout)
    ps = layout.patch_slice
    a, dtype = attn.detach(), compute_dtype(attn.dtype, attn.device)
    rows = a[:, :, ps, ps].mean(dim=2, dtype=dtype) if index is None else a[:, :, index, ps].to(dtype)  # [B, heads, HW]
    h, w = layout.grid_size
    return to_numpy(rearrange(rows, "b heads (h w) -> b heads h w", h=h, w=w))


def threshold_masks(weights: np.ndarray | torch.Tensor, *, mass: float, patch_axes: Literal[1, 2] = 2) -> np.ndarray:
    """Per map, the smallest set of patches holding ``mass`` of the map's weight on patches (DINO's threshold masks).

    DINO's ``visualize_attention.py`` (Caron et al. 2021) sorts each head's class-token weights on the patches in
    ascending order, divides them by their sum, and keeps a patch where the cumulative sum is ``> 1 - threshold``.
    Read from the strongest patch down, that keeps a patch exactly when the patches stronger than it hold less than
    ``mass``: the shortest prefix of the descending order whose sum reaches ``mass``, i.e. a smallest set holding at
    least ``mass``. This is that rule, written on the descending order, with three things pinned down:

    - the sum is over patches only: the caller passes the weights on patch tokens (``layout.patch_slice``), so weight
      on the class token and on registers counts neither in the total nor in the kept mass (DINO's ``[0, :, 0, 1:]``
      would count registers as patches);
    - ties are broken by the lower patch index (row-major) first, so the mask is deterministic (DINO's
      ``torch.sort`` leaves the order of equal weights unspecified);
    - a patch of weight 0 is never kept (it adds no mass; with ``mass=1`` float rounding could otherwise keep it),
      so a map with no weight on any patch gives an empty mask.

    Args:
        weights: non-negative weights ``[..., H, W]`` (``patch_axes=2``) or ``[..., HW]`` (``patch_axes=1``); each map
            is one head of one image. Computed in float64.
        mass: fraction in (0, 1] of each map's patch weight the kept set must hold.
        patch_axes: how many trailing axes index the patches.

    Returns:
        Boolean masks of ``weights``' shape, True on the kept patches.

    Raises:
        ParameterError: ``mass`` outside (0, 1], ``patch_axes`` not 1 or 2, or a negative weight.
    """
    if isinstance(mass, bool) or not isinstance(mass, int | float) or not 0.0 < mass <= 1.0:
        raise ParameterError("mass", f"mass must be in (0, 1], got {mass!r}")
    if patch_axes not in (1, 2):
        raise ParameterError("patch_axes", f"patch_axes must be 1 or 2, got {patch_axes!r}")
    w = weights.detach().cpu().numpy() if isinstance(weights, torch.Tensor) else np.asarray(weights)
    shape = w.shape
    if len(shape) < patch_axes:
        raise ParameterError("patch_axes", f"weights need {patch_axes} patch axes, got shape {tuple(shape)}")
    w = w.astype(np.float64).reshape(-1, math.prod(shape[len(shape) - patch_axes :]))  # [maps, HW]
    if (w < 0).any():
        raise ParameterError("weights", "weights must be non-negative (post-softmax attention)")
    order = np.argsort(-w, axis=-1, kind="stable")  # [maps, HW] strongest first; equal weights by patch index
    ranked = np.take_along_axis(w, order, axis=-1)  # [maps, HW] descending
    total = ranked.sum(axis=-1, keepdims=True)  # [maps, 1]
    share = np.divide(ranked, total, out=np.zeros_like(ranked), where=total > 0)  # renormalised over patches
    # [maps, HW] mass of the patches ranked above each one (an exclusive cumulative sum)
    stronger = np.concatenate([np.zeros_like(share[:, :1]), np.cumsum(share, axis=-1)[:, :-1]], axis=-1)
    keep = (stronger < mass) & (ranked > 0)  # DINO's cumsum_ascending > 1 - mass, from the top
    masks = np.zeros_like(keep)
    np.put_along_axis(masks, order, keep, axis=-1)
    return masks.reshape(shape)
