"""Perturbation tests of relevance maps (Chefer, Gur & Wolf 2021, CVPR, Sec. 4 "positive and negative perturbation";
Petsiuk, Das & Saenko 2018, RISE, "deletion and insertion"): patches are removed in the order a map ranks them, and
the explained class's probability is read at every step.

Three curves per ordering, over the fraction of patches removed (or inserted) ``0, 1/S, ..., 1`` (``S = steps``):

- ``deletion`` (Chefer's *positive* perturbation): remove the most relevant patches first; a faithful map makes the
  probability fall fast (low area);
- ``negative``: remove the least relevant first; a faithful map keeps the probability up (high area);
- ``insertion``: start with every patch removed and put the most relevant back first (high area).

At step ``i`` the number of patches moved is ``floor(i * H*W / S)`` (Chefer's ``int(base_size * step)``), so 100 %
(every patch removed) is included: the curves are measured at both ends of ``[0, 1]`` and their areas are the
trapezoid rule over that interval. Negative perturbation at removed fraction ``f`` and insertion at ``1 - f`` both
keep the most relevant patches, so with the same removal they are one measurement read in opposite directions (the
counts differ by the rounding only); both are reported, as the perturbation literature reports them.

The model is a callable ``forward(images, keep) -> logits``: ``keep`` ``[n, K]`` holds the kept patch indices for
``removal="drop"`` (:meth:`vitlens.models.vit.ViT.forward_kept`) and is None for the pixel removals, whose images
already have the removed patches replaced. Nothing here runs gradients or reads timm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from vitlens.errors import ParameterError, VitlensError
from vitlens.layout import TokenLayout

Removal = Literal["drop", "mean", "blur"]
REMOVALS: tuple[str, ...] = ("drop", "mean", "blur")
CURVES: tuple[str, ...] = ("deletion", "negative", "insertion")
RANDOM = "random"  # the name of the random-order baseline among the methods
Forward = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]  # (images, keep [n, K] | None) -> logits


def check_removal(removal: object) -> None:
    """Raise a :class:`ParameterError` unless ``removal`` is ``drop``, ``mean`` or ``blur``."""
    if removal not in REMOVALS:
        raise ParameterError("removal", f"removal must be one of {', '.join(REMOVALS)}, not {removal!r}")


def check_steps(steps: object) -> None:
    """Raise a :class:`ParameterError` unless ``steps`` is a whole number of at least 2."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ParameterError("steps", f"steps must be a whole number of at least 2, not {steps!r}")


def removed_counts(num_patches: int, steps: int) -> np.ndarray:
    """Patches removed (or inserted) at each step ``[steps + 1]``: ``floor(i * num_patches / steps)``, 0 to all."""
    return np.asarray([i * num_patches // steps for i in range(steps + 1)], dtype=np.int64)


def relevance_order(relevance: torch.Tensor) -> torch.Tensor:
    """Patch indices ``[B, HW]`` from the most to the least relevant; ties keep grid order (a stable sort)."""
    return torch.argsort(-relevance.detach().reshape(relevance.shape[0], -1), dim=-1, stable=True)


def random_order(indices: np.ndarray, num_patches: int, seed: int) -> torch.Tensor:
    """A random order of the patches ``[B, HW]`` per image, drawn from ``(seed, index of the image in its dataset)``
    so that an image's order does not depend on the batch it came in."""
    rows = [np.random.default_rng([int(seed), int(i)]).permutation(num_patches) for i in indices]
    return torch.as_tensor(np.stack(rows), dtype=torch.int64)


def gaussian_blur(images: torch.Tensor, sigma: tuple[float, float]) -> torch.Tensor:
    """Each channel of ``images`` ``[B, C, H, W]`` blurred by a Gaussian of standard deviation ``sigma`` = (y, x)
    pixels, truncated at 3 sigma, edges replicated.

    The kernel sums to 1 and normalisation is a per-channel affine map, so blurring the normalised image equals
    normalising the blurred photo: the blur can run on the model's input as it is.
    """
    b, c, _, _ = images.shape
    out = images
    for axis, s in ((2, sigma[0]), (3, sigma[1])):
        radius = max(1, math.ceil(3 * s))
        t = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
        kernel = torch.exp(-0.5 * (t / s) ** 2)
        kernel = kernel / kernel.sum()  # [2r + 1]
        shape = (1, 1, 2 * radius + 1, 1) if axis == 2 else (1, 1, 1, 2 * radius + 1)
        pad = (0, 0, radius, radius) if axis == 2 else (radius, radius, 0, 0)
        weight = kernel.reshape(shape).expand(c, -1, -1, -1)  # [C, 1, k, 1] or [C, 1, 1, k]: each channel alone
        out = F.conv2d(F.pad(out, pad, mode="replicate"), weight, groups=c)
    return out.reshape(b, c, *images.shape[2:])


def pixel_mask(keep: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Patch keep-mask ``[n, H*W]`` (bool) -> pixel mask ``[n, 1, H*ph, W*pw]``."""
    (h, w), (ph, pw) = layout.grid_size, layout.patch_size
    return repeat(keep, "n (h w) -> n 1 (h ph) (w pw)", h=h, w=w, ph=ph, pw=pw)


@dataclass(frozen=True)
class Faithfulness:
    """Perturbation curves of several relevance orderings on the same images.

    ``probabilities[m, c, b, i]`` is image ``b``'s softmax probability of its explained class at step ``i`` of curve
    ``CURVES[c]`` for ordering ``methods[m]`` (the last is ``random``); ``correct`` says whether the top-1 class then
    equals the label (None without labels).
    """

    methods: tuple[str, ...]  # the relevance methods, then "random"
    fractions: np.ndarray  # [S + 1] fraction removed (inserted, for insertion) at each step, 0 to 1
    probabilities: np.ndarray  # [M, 3, B, S + 1] float64
    correct: np.ndarray | None  # [M, 3, B, S + 1] bool; None when the images have no labels
    classes: np.ndarray  # [B] int64 class explained per image (predicted on the full image, or the one asked for)
    labels: np.ndarray | None  # [B] int64 labels, None when unlabelled
    removal: str
    blur_sigma: tuple[float, float] | None  # (y, x) pixels, for removal "blur"
    seed: int  # of the random ordering
    target: str  # the token row the maps were read from

    @property
    def steps(self) -> int:
        return len(self.fractions) - 1

    def mean_probabilities(self) -> np.ndarray:
        """``[M, 3, S + 1]`` the curves averaged over images."""
        return self.probabilities.mean(axis=2)

    def accuracies(self) -> np.ndarray | None:
        """``[M, 3, S + 1]`` top-1 accuracy at each step, None without labels."""
        return None if self.correct is None else self.correct.mean(axis=2)

    def probability_areas(self) -> np.ndarray:
        """``[M, 3]`` area under each mean probability curve (trapezoid over ``fractions``)."""
        return trapezoid_area(self.mean_probabilities(), self.fractions)

    def accuracy_areas(self) -> np.ndarray | None:
        """``[M, 3]`` area under each accuracy curve, None without labels."""
        acc = self.accuracies()
        return None if acc is None else trapezoid_area(acc, self.fractions)


def trapezoid_area(curves: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Area under ``curves`` ``[..., S + 1]`` over ``fractions`` by the trapezoid rule."""
    return np.trapezoid(curves, fractions, axis=-1)


def _states(orders: torch.Tensor, counts: np.ndarray) -> tuple[list[tuple[int, str, int]], dict[tuple, int]]:
    """The distinct kept sets the curves need, as ``(ordering, kind, n)``: ``("top", n)`` keeps the ``n`` most
    relevant patches, ``("bottom", r)`` all but the ``r`` most relevant. Every patch kept and none kept are the same
    for every ordering and are listed once, as ordering -1."""
    hw = orders.shape[-1]
    keys: list[tuple[int, str, int]] = [(-1, "all", hw), (-1, "none", 0)]
    for o in range(orders.shape[0]):
        tops = sorted({int(hw - r) for r in counts} | {int(r) for r in counts})  # negative and insertion
        keys += [(o, "top", n) for n in tops if 0 < n < hw]
        keys += [(o, "bottom", int(r)) for r in sorted(set(counts.tolist())) if 0 < r < hw]  # deletion
    return keys, {k: i for i, k in enumerate(keys)}


def _keep_mask(key: tuple[int, str, int], orders: torch.Tensor) -> torch.Tensor:
    """``[B, HW]`` bool: which patches state ``key`` keeps, for every image."""
    o, kind, n = key
    b, hw = orders.shape[1:]
    mask = torch.zeros(b, hw, dtype=torch.bool, device=orders.device)
    if kind == "all":
        return mask | True
    if kind == "none":
        return mask
    chosen = orders[o, :, :n] if kind == "top" else orders[o, :, n:]  # [B, n] or [B, HW - n]
    return mask.scatter(1, chosen, True)


def _curve_key(curve: str, o: int, count: int, hw: int) -> tuple[int, str, int]:
    """The state of curve ``curve`` of ordering ``o`` after ``count`` patches moved."""
    kept = {"deletion": hw - count, "negative": hw - count, "insertion": count}[curve]
    if kept == hw:
        return (-1, "all", hw)
    if kept == 0:
        return (-1, "none", 0)
    return (o, "bottom", count) if curve == "deletion" else (o, "top", kept)


def perturbation_curves(
    forward: Forward,
    images: torch.Tensor,
    orders: Mapping[str, torch.Tensor],
    classes: torch.Tensor,
    layout: TokenLayout,
    *,
    labels: torch.Tensor | None = None,
    removal: Removal = "drop",
    steps: int = 10,
    chunk_size: int = 64,
    blur_sigma: tuple[float, float] | None = None,
    seed: int = 0,
    target: str = "cls",
) -> Faithfulness:
    """Deletion, negative-perturbation and insertion curves of one batch for each ordering in ``orders``.

    Every distinct kept set (a patch subset per image) is evaluated once; all of them go through ``forward`` in
    chunks of at most ``chunk_size`` images, so memory holds one chunk's activations and one batch's perturbed
    copies are never all built. For ``drop`` a chunk holds states of one size ``K`` only (a tensor of kept indices
    is rectangular; padding would add tokens that change the result), kept indices in grid order.

    Args:
        forward: ``forward(images [n, C, H, W], keep [n, K] | None) -> logits [n, classes]`` (run under
            ``no_grad``).
        images: the batch ``[B, C, H, W]``, normalised as the model expects.
        orders: method name -> patch order ``[B, H*W]``, most relevant first (the random baseline included).
        classes: the class explained per image ``[B]``.
        layout: the model's token layout (grid and patch size).
        labels: ``[B]`` true labels for top-1 accuracy (``-1`` or None: unlabelled).
        removal: ``drop`` (tokens left out of the sequence), ``mean`` (pixels set to 0 after normalisation, i.e.
            the preprocessing mean colour), or ``blur`` (pixels from a copy blurred by :func:`gaussian_blur`).
        steps: the curves have ``steps + 1`` points, ``0, 1/steps, ..., 1``.
        chunk_size: images per ``forward`` call.
        blur_sigma: ``(y, x)`` pixels for ``blur``; default one patch (``layout.patch_size``).
        seed, target: recorded in the result.

    Raises:
        ParameterError: an unknown removal or a bad step count.
        VitlensError: an order is not a permutation of ``[B, H*W]``, or the model returned NaN/inf.
    """
    check_removal(removal)
    check_steps(steps)
    b, hw = images.shape[0], layout.num_patches
    names = tuple(orders)
    stacked = torch.stack([orders[m].to(torch.int64) for m in names])  # [M, B, HW]
    if stacked.shape[1:] != (b, hw):
        raise VitlensError(f"each order must be [{b}, {hw}] patch indices, not {list(stacked.shape[1:])}")
    if not torch.equal(stacked.sort(dim=-1).values, torch.arange(hw).expand_as(stacked)):
        raise VitlensError("each order must hold every patch index once")
    if removal == "blur" and blur_sigma is None:
        blur_sigma = (float(layout.patch_size[0]), float(layout.patch_size[1]))
    counts = removed_counts(hw, steps)
    keys, where = _states(stacked, counts)
    fill = None
    if removal == "mean":
        fill = torch.zeros_like(images)  # normalised 0 = the preprocessing's mean colour
    elif removal == "blur":
        fill = gaussian_blur(images, blur_sigma)  # type: ignore[arg-type]
    probs = torch.empty(len(keys), b, dtype=torch.float64)  # [states, B]
    top1 = torch.empty(len(keys), b, dtype=torch.int64)  # [states, B]

    def run(pairs: list[tuple[int, int]], masks: list[torch.Tensor]) -> None:
        """Evaluate (state, image) pairs in chunks; ``masks[s]`` is state ``s``'s keep mask ``[B, HW]``."""
        for start in range(0, len(pairs), chunk_size):
            part = pairs[start : start + chunk_size]
            s_idx = torch.as_tensor([s for s, _ in part])
            b_idx = torch.as_tensor([i for _, i in part])
            keep = torch.stack([masks[s][i] for s, i in part])  # [n, HW] bool
            x = images[b_idx]  # [n, C, H, W]
            if removal == "drop":
                kept = repeat(torch.arange(hw), "k -> n k", n=len(part))[keep.cpu()]
                kept = kept.reshape(len(part), int(keep[0].sum()))  # [n, K] in grid order
                logits = forward(x, kept.to(images.device))  # [n, classes]
            else:
                x = torch.where(pixel_mask(keep, layout), x, fill[b_idx])  # type: ignore[index]
                logits = forward(x, None)
            if not bool(torch.isfinite(logits).all()):
                raise VitlensError("the model's logits are NaN/inf on a perturbed image: no probability to read")
            p = logits.double().softmax(dim=-1)  # [n, classes]
            probs[s_idx, b_idx] = p.gather(1, classes[b_idx].to(p.device)[:, None])[:, 0].cpu()
            top1[s_idx, b_idx] = logits.argmax(dim=-1).cpu()

    masks = [_keep_mask(k, stacked) for k in keys]
    sizes = [int(m[0].sum()) for m in masks]
    groups = sorted(set(sizes)) if removal == "drop" else [None]
    with torch.no_grad():  # values only: no graph is kept, whatever the caller's grad mode
        for size in groups:
            pairs = [(s, i) for s in range(len(keys)) if size is None or sizes[s] == size for i in range(b)]
            run(pairs, masks)

    labelled = labels is not None and bool((labels >= 0).all())
    prob_curves = np.empty((len(names), len(CURVES), b, steps + 1))
    correct = np.empty(prob_curves.shape, dtype=bool) if labelled else None
    for o in range(len(names)):
        for c, curve in enumerate(CURVES):
            rows = [where[_curve_key(curve, o, int(n), hw)] for n in counts]  # [S + 1] state per step
            prob_curves[o, c] = rearrange(probs[rows].numpy(), "s b -> b s")
            if correct is not None:
                hit = top1[rows] == labels.cpu()[None, :]  # type: ignore[union-attr]  # [S + 1, B]
                correct[o, c] = rearrange(hit.numpy(), "s b -> b s")
    return Faithfulness(
        methods=names,
        fractions=counts / hw,  # the exact fraction moved at each step
        probabilities=prob_curves,
        correct=correct,
        classes=classes.detach().cpu().numpy().astype(np.int64),
        labels=labels.detach().cpu().numpy().astype(np.int64) if labelled else None,  # type: ignore[union-attr]
        removal=removal,
        blur_sigma=blur_sigma if removal == "blur" else None,
        seed=int(seed),
        target=target,
    )


def concat(parts: list[Faithfulness]) -> Faithfulness:
    """Batches' curves joined along the image axis (same methods, steps and options)."""
    first = parts[0]
    cat = np.concatenate
    return Faithfulness(
        methods=first.methods,
        fractions=first.fractions,
        probabilities=cat([p.probabilities for p in parts], axis=2),
        correct=None if any(p.correct is None for p in parts) else cat([p.correct for p in parts], axis=2),  # type: ignore[misc]
        classes=cat([p.classes for p in parts]),
        labels=None if any(p.labels is None for p in parts) else cat([p.labels for p in parts]),  # type: ignore[misc]
        removal=first.removal,
        blur_sigma=first.blur_sigma,
        seed=first.seed,
        target=first.target,
    )
