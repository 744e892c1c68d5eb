"""Class-specific relevance maps from attention and its gradient: gradient-weighted rollout (vit-explain), Chefer,
Gur & Wolf 2021 (ICCV) attribution, the last layer's gradient-weighted attention, and plain rollout to compare.

Every method reads, per layer ``l``, the post-softmax attention ``A_l`` ``[B, heads, N, N]`` and its gradient
``∇A_l = ∂score/∂A_l`` (the same shape), where the score is one number per image (a class logit, or a cosine
similarity). The functions here take those tensors; running the model with gradients and capturing the pairs is
``vitlens.definitions.explain.explain_for``'s job.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from einops import rearrange

from vitlens.analysis._common import check_attention, compute_dtype, to_numpy
from vitlens.analysis.rollout import (
    ROW_PATH_MAX_BYTES,
    LayerProduct,
    RolloutAccumulator,
    resolve_target,
    target_vector,
)
from vitlens.errors import ParameterError, VitlensError
from vitlens.layout import TokenLayout

ExplainMethod = Literal["rollout", "grad-rollout", "attribution", "last-layer"]
METHODS: tuple[str, ...] = ("rollout", "grad-rollout", "attribution", "last-layer")
GRADIENT_METHODS: tuple[str, ...] = ("grad-rollout", "attribution", "last-layer")
DISCARD_METHODS: tuple[str, ...] = ("rollout", "grad-rollout")  # the methods that thin each layer's matrix


def check_method(method: object, discard_ratio: object = 0.0) -> None:
    """Raise a :class:`ParameterError` unless ``method`` is known and ``discard_ratio`` fits it.

    ``discard_ratio`` applies to the rollout methods only: attribution and last-layer have no per-layer matrix to
    thin, and silently ignoring it would make two runs that differ only in it look different.
    """
    if method not in METHODS:
        raise ParameterError("method", f"method must be one of {', '.join(METHODS)}, not {method!r}")
    number = isinstance(discard_ratio, int | float) and not isinstance(discard_ratio, bool)
    if not number or not 0.0 <= discard_ratio < 1.0:  # type: ignore[operator]
        raise ParameterError("discard_ratio", f"discard_ratio must be in [0, 1), not {discard_ratio!r}")
    if discard_ratio and method not in DISCARD_METHODS:
        raise ParameterError(
            "discard_ratio", f"discard_ratio applies to rollout and grad-rollout, not {method} (leave it at 0)"
        )


@dataclass(frozen=True)
class Explanation:
    """Relevance maps at patch resolution for a batch of images, with the class and score they explain."""

    maps: np.ndarray  # [B, H, W] the target row's relevance on each patch, scaled so each map's max is 1 (0 kept)
    classes: np.ndarray  # [B] int64 class explained per image; -1 when the score is a cosine similarity
    scores: np.ndarray  # [B] the score per image (the class logit before softmax, or the cosine similarity)
    method: str
    target: str
    discard_ratio: float
    num_layers: int  # layers that entered the map (1 for last-layer)
    grid_size: tuple[int, int]

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "classes": self.classes.tolist(),
            "scores": self.scores.tolist(),
            "maps": self.maps.tolist(),
            "target": self.target,
            "discard_ratio": self.discard_ratio,
            "num_layers": self.num_layers,
            "grid_size": list(self.grid_size),
        }


# ---------------------------------------------------------------------------------------------- per-layer factors
def _check_pair(attn: torch.Tensor, grad: torch.Tensor, layout: TokenLayout) -> torch.dtype:
    check_attention(attn, layout)
    if grad.shape != attn.shape:
        raise VitlensError(f"attention {list(attn.shape)} and its gradient {list(grad.shape)} differ in shape")
    return compute_dtype(attn.dtype, attn.device)


def grad_weighted_head_mean(attn: torch.Tensor, grad: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """vit-explain's gradient-weighted attention ``[B, N, N]``: ``max(mean_h(A ⊙ ∇A), 0)``.

    jacobgil/vit-explain ``vit_grad_rollout.py`` averages the product over heads first and then sets negative
    entries to 0 (``attention_heads_fused[attention_heads_fused < 0] = 0``): a head that votes against the class
    can cancel one that votes for it. Compare :func:`relevance_head_mean`, which clamps before averaging.
    """
    dtype = _check_pair(attn, grad, layout)
    return (attn.detach().to(dtype) * grad.detach().to(dtype)).mean(dim=1).clamp_min(0.0)  # [B, N, N]


def relevance_head_mean(attn: torch.Tensor, grad: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Chefer, Gur & Wolf 2021 (ICCV) Eq. 5, ``Ā = E_h((∇A ⊙ A)⁺)`` ``[B, N, N]``: negatives clamped per head, then
    the mean over heads, so only positive evidence is averaged."""
    dtype = _check_pair(attn, grad, layout)
    return (attn.detach().to(dtype) * grad.detach().to(dtype)).clamp_min(0.0).mean(dim=1)  # [B, N, N]


def target_rows(matrix: torch.Tensor, index: int | None, layout: TokenLayout) -> torch.Tensor:
    """The target token's row of ``matrix`` ``[B, N, N]`` on the patch columns ``[B, HW]``; for ``index`` None
    (``mean-patch``) the mean of the patch tokens' rows."""
    ps = layout.patch_slice
    return matrix[:, ps, ps].mean(dim=1) if index is None else matrix[:, index, ps]


def scale_maps(weights: torch.Tensor, layout: TokenLayout) -> np.ndarray:
    """``[B, HW]`` non-negative relevance -> ``[B, H, W]`` maps divided by their maximum (an all-zero map stays 0),
    as rollout scales its maps, so that the methods share one colour scale."""
    peak = weights.amax(dim=-1, keepdim=True)  # [B, 1]
    scaled = torch.where(peak > 0, weights / peak.clamp_min(torch.finfo(weights.dtype).tiny), 0.0)
    h, w = layout.grid_size
    return to_numpy(rearrange(scaled, "b (h w) -> b h w", h=h, w=w))  # [B, H, W]


class ExplainAccumulator:
    """One batch's relevance, layer by layer: ``update(layer, attn, grad)`` for every layer in depth order.

    Each layer is reduced at once to the method's ``[B, N, N]`` factor, so memory holds the running product, not the
    heads (``grad`` is unused by ``rollout``; pass None). Use a new accumulator for each batch.

    - ``rollout``: the existing :class:`~vitlens.analysis.RolloutAccumulator` (mean over heads, discard, ``(A + I)``
      with rows renormalised, multiplied through the layers): class-agnostic, for comparison.
    - ``grad-rollout``: the same accumulator fed :func:`grad_weighted_head_mean` as a single head, i.e. vit-explain's
      ``grad_rollout`` with the discard confined to patch-to-patch weights and each row divided by its own sum.
    - ``attribution``: Chefer et al. 2021 (ICCV) Eq. 6: ``R ← I``, then ``R ← R + Ā_l · R`` for each layer.
    - ``last-layer``: ``Ā`` of the last layer given (Eq. 5 without propagation), a cheap baseline.
    """

    def __init__(
        self,
        layout: TokenLayout,
        *,
        method: ExplainMethod = "attribution",
        discard_ratio: float = 0.0,
        max_bytes: int = ROW_PATH_MAX_BYTES,
    ):
        check_method(method, discard_ratio)
        self.layout, self.method, self.discard_ratio = layout, method, float(discard_ratio)
        # vit-explain and the ViT paper fuse heads by their mean; a one-head tensor's mean is itself.
        rolls = method in DISCARD_METHODS
        self._rollout = (
            RolloutAccumulator(layout, discard_ratio=self.discard_ratio, max_bytes=max_bytes) if rolls else None
        )
        # Attribution's R = (I + Ā_L) ... (I + Ā_1) is a product of layer factors too: read by rows, O(N²) per layer.
        self._relevance = LayerProduct(max_bytes=max_bytes) if method == "attribution" else None
        self._last_layer: torch.Tensor | None = None  # [B, N, N] last-layer's Ā
        self.num_layers = 0
        self._last = -1

    def update(self, layer: int, attn: torch.Tensor, grad: torch.Tensor | None) -> None:
        """Add layer ``layer`` (0-based): post-softmax ``attn`` and ``grad = ∂score/∂attn``, ``[B, heads, N, N]``."""
        if layer <= self._last:
            raise VitlensError(f"explain needs layers in depth order: got layer {layer} after layer {self._last}")
        self._last = layer
        if self.method != "rollout" and grad is None:
            raise VitlensError(f"{self.method} needs the attention's gradient; got none for layer {layer}")
        if self.method == "rollout":
            self._rollout.update(self.num_layers, attn)  # type: ignore[union-attr]
        elif self.method == "grad-rollout":
            weighted = grad_weighted_head_mean(attn, grad, self.layout)  # [B, N, N]
            self._rollout.update(self.num_layers, weighted[:, None])  # type: ignore[union-attr]
        elif self.method == "attribution":
            a_bar = relevance_head_mean(attn, grad, self.layout)  # [B, N, N]
            # Eq. 6: R ← R + Ā · R = (I + Ā) · R, starting from R = I
            a_bar.diagonal(dim1=-2, dim2=-1).add_(1.0)
            self._relevance.push(a_bar)  # type: ignore[union-attr]
        else:  # last-layer: only the last layer given counts
            self._last_layer = relevance_head_mean(attn, grad, self.layout)
        self.num_layers += 1

    def weights(self, target: str) -> torch.Tensor:
        """The target row's relevance on the patches ``[B, HW]``, unscaled."""
        index = resolve_target(target, self.layout)
        if self.num_layers == 0:
            raise VitlensError("no layer was given: nothing to explain")
        if self._rollout is not None:
            return self._rollout.target_weights(target)[:, self.layout.patch_slice]
        if self._relevance is not None:
            batch = self._relevance.batch_size
            v = target_vector(index, self.layout, batch, dtype=self._relevance.dtype, device=self._relevance.device)
            return self._relevance.rows(v)[:, self.layout.patch_slice]
        return target_rows(self._last_layer, index, self.layout)  # type: ignore[arg-type]

    def maps(self, target: str) -> np.ndarray:
        """``[B, H, W]`` maps scaled to max 1 (see :func:`scale_maps`)."""
        return scale_maps(self.weights(target), self.layout)


def relevance_maps(
    attentions: Iterable[torch.Tensor],
    gradients: Iterable[torch.Tensor | None],
    layout: TokenLayout,
    *,
    method: ExplainMethod = "attribution",
    target: str = "cls",
    discard_ratio: float = 0.0,
) -> np.ndarray:
    """Relevance maps ``[B, H, W]`` (max 1) from per-layer attentions and their gradients, layer 0 first.

    For ``last-layer`` only the last pair counts. ``gradients`` may hold None for ``rollout``.

    Raises:
        ParameterError: an unknown method or target form, or a discard ratio the method does not take.
        VitlensError: the model has no ``target`` token, or no layer was given.
    """
    check_method(method, discard_ratio)
    resolve_target(target, layout)
    pairs = list(zip(attentions, gradients, strict=True))
    if method == "last-layer":
        pairs = pairs[-1:]
    acc = ExplainAccumulator(layout, method=method, discard_ratio=discard_ratio)
    for layer, (attn, grad) in enumerate(pairs):
        acc.update(layer, attn, grad)
    return acc.maps(target)
