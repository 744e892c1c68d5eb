"""PCA of patch tokens shown as RGB, with a foreground split on the first component (DINOv2 paper, Oquab et al.
2023, Fig. 1 and its "PCA of patch features" visualisations).

The PCA is fitted jointly over the patch tokens of every image, so one colour means one direction in feature space
in all of them. It is fitted from streamed moments (mean and scatter matrix, float64, combined batch by batch), so
memory is ``D x D`` whatever the number of images; a few passes over the tokens replace keeping them all. Under
torch.distributed each rank can stream its own shard of the images: the moments are then combined across ranks
exactly (:meth:`PatchMoments.all_reduce`) and the per-image maps gathered in dataset order, so that every rank
returns the PCA of the whole set.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from einops import rearrange

from vitlens.analysis._common import as_f64, to_numpy
from vitlens.errors import ParameterError, VitlensError

Foreground = Literal["auto", "none"] | float
TokenBatches = Callable[[], Iterable[torch.Tensor]]  # each call yields the same batches again, [b, H*W, D] each


def check_num_components(num_components: object) -> int:
    """``num_components`` as an int of at least 1 (the upper bound, the token width, is checked on the tokens)."""
    if isinstance(num_components, bool) or not isinstance(num_components, int) or num_components < 1:
        raise ParameterError(
            "num_components", f"num_components must be an integer of at least 1, not {num_components!r}"
        )
    return num_components


def check_foreground(foreground: object) -> str | float:
    """``auto``, ``none`` or a finite threshold; a numeric string (the CLI's ``--foreground 0.5``) becomes a float."""
    if isinstance(foreground, str):
        text = foreground.strip().lower()
        if text in ("auto", "none"):
            return text
        with contextlib.suppress(ValueError):
            foreground = float(text)
    number = isinstance(foreground, int | float) and not isinstance(foreground, bool)
    if not number or not math.isfinite(foreground):  # type: ignore[arg-type]
        raise ParameterError("foreground", f"foreground must be auto, none or a finite number, not {foreground!r}")
    return float(foreground)  # type: ignore[arg-type]


class PatchMoments:
    """Count, mean ``[D]`` and scatter matrix ``[D, D]`` (sum of centred outer products) of streamed rows, float64.

    Batches are merged with Chan et al.'s pairwise update: each batch is centred on its own mean before its outer
    products are summed, so there is no ``E[x x^T] - mean mean^T`` cancellation, whatever the tokens' offset.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None  # [D]
        self.scatter: torch.Tensor | None = None  # [D, D]

    def update(self, rows: torch.Tensor) -> None:
        """Add ``rows`` ``[n, D]`` (any float dtype; accumulated in float64)."""
        n = int(rows.shape[0])
        if n == 0:
            return
        x = as_f64(rows)  # [n, D]
        mean_b = x.mean(dim=0)  # [D]
        centred = x - mean_b
        scatter_b = centred.T @ centred  # [D, D]
        if self.mean is None or self.scatter is None:
            self.count, self.mean, self.scatter = n, mean_b, scatter_b
            return
        total = self.count + n
        delta = mean_b.to(self.mean.device) - self.mean  # [D]
        self.scatter = (
            self.scatter + scatter_b.to(self.scatter.device) + torch.outer(delta, delta) * (self.count * n / total)
        )
        self.mean = self.mean + delta * (n / total)
        self.count = total

    def all_reduce(self) -> None:
        """Combine the moments of every rank of a torch.distributed job, in place (a no-op in a single process).

        The parallel form of the pairwise update: the counts (int64) and the row sums ``n_r mean_r`` (float64) are
        added first, which gives the global mean; each rank then adds its scatter about that mean,
        ``scatter_r + n_r (mean_r - mean)(mean_r - mean)^T``, and those are added. Nothing is a mean of per-rank
        means (which would weigh uneven shards wrongly), and no ``E[x x^T] - mean mean^T`` cancellation appears.
        A rank that saw no rows takes part with zeros. Every rank ends with the moments of all rows.
        """
        from vitlens.distributed import all_reduce_max, all_reduce_sum, is_distributed

        if not is_distributed():
            return
        dim = all_reduce_max(0 if self.mean is None else int(self.mean.shape[0]))  # an empty rank learns D
        if dim == 0:  # no rows on any rank
            return
        device = torch.device("cpu") if self.mean is None else self.mean.device
        mean_r = torch.zeros(dim, dtype=torch.float64, device=device) if self.mean is None else self.mean  # [D]
        scatter_r = (
            torch.zeros(dim, dim, dtype=torch.float64, device=device) if self.scatter is None else self.scatter
        )  # [D, D]
        count = all_reduce_sum(self.count)
        if count == 0:
            return
        mean = all_reduce_sum(mean_r * self.count) / count  # [D]
        delta = mean_r - mean  # [D]
        self.scatter = all_reduce_sum(scatter_r + torch.outer(delta, delta) * self.count)  # [D, D]
        self.mean, self.count = mean, count


@dataclass(frozen=True)
class Components:
    """Principal components of a :class:`PatchMoments`, largest variance first."""

    components: torch.Tensor  # [K, D] orthonormal, float64; each one's largest-|value| loading made positive
    mean: torch.Tensor  # [D] float64, subtracted before projecting
    explained_variance: torch.Tensor  # [K] eigenvalues of the covariance (normalised by n - 1, as scikit-learn)
    explained_variance_ratio: torch.Tensor  # [K] each over the total variance (the covariance's trace)

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """Scores ``[..., K]`` of ``rows`` ``[..., D]`` (float64)."""
        x = as_f64(rows, self.mean.device)
        return (x - self.mean) @ self.components.T


def principal_components(moments: PatchMoments, num_components: int) -> Components:
    """The top ``num_components`` eigenvectors of the covariance of ``moments`` (float64 ``eigh``).

    Eigenvectors are defined up to sign; each is flipped so that its largest-magnitude loading is positive (as
    :func:`vitlens.analysis.filters.filter_pca` does), so repeated runs and other LAPACK backends give the same colours.

    Raises:
        VitlensError: fewer than 2 rows (no variance to fit).
    """
    if moments.count < 2 or moments.mean is None or moments.scatter is None:
        raise VitlensError(f"a PCA needs at least 2 patch tokens, got {moments.count}")
    cov = moments.scatter / (moments.count - 1)  # [D, D]
    cov = (cov + cov.T) / 2  # exactly symmetric for eigh, whatever the summation order left
    values, vectors = torch.linalg.eigh(cov)  # ascending; vectors [D, D], one per column
    order = torch.argsort(values, descending=True)[:num_components]
    comps = vectors[:, order].T  # [K, D]
    pivot = comps.abs().argmax(dim=1, keepdim=True)  # [K, 1]
    comps = comps * torch.sign(comps.gather(1, pivot))  # never 0: the pivot is the largest |value| of a unit vector
    variance = values[order].clamp_min(0.0)  # round-off can leave tiny negative eigenvalues
    total = torch.diagonal(cov).sum()
    ratio = variance / total if total > 0 else torch.zeros_like(variance)
    return Components(comps, moments.mean, variance, ratio)


def border_patches(grid_size: tuple[int, int]) -> torch.Tensor:
    """``[H*W]`` bool, row-major: True for the patches in the first or last row or column of the grid."""
    h, w = grid_size
    edge = torch.zeros(h, w, dtype=torch.bool)
    edge[0, :] = edge[-1, :] = True
    edge[:, 0] = edge[:, -1] = True
    return rearrange(edge, "h w -> (h w)")


@dataclass(frozen=True)
class FeaturesPCA:
    """Joint PCA of the patch tokens of ``B`` images, the first three components as RGB, and the foreground split."""

    components: np.ndarray  # [K, D] orthonormal principal directions, largest-|value| loading positive
    mean: np.ndarray  # [D] mean of the tokens the PCA was fitted on
    explained_variance: np.ndarray  # [K] variance along each component (n - 1 normalisation, as scikit-learn)
    explained_variance_ratio: np.ndarray  # [K] each over the fitted tokens' total variance
    scores: np.ndarray  # [B, H, W, K] every patch's coordinates on the components (background patches included)
    rgb: np.ndarray  # [B, H, W, 3] in [0, 1]: components 1-3 min-max scaled over the fitted patches; background 0
    foreground: str  # "none", "auto" or "threshold"
    threshold: float | None  # foreground = foreground_scores > threshold; None with foreground "none"
    foreground_mask: np.ndarray | None  # [B, H, W] bool, the patches the PCA was fitted on; None with "none"
    foreground_scores: np.ndarray | None  # [B, H, W] every patch's score on the oriented first component of all patches
    foreground_component: np.ndarray | None  # [D] that oriented first component (unit length)
    num_fit_patches: int  # how many patch tokens the PCA was fitted on
    grid_size: tuple[int, int]

    @property
    def num_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def foreground_fraction(self) -> float:
        """Share of all patches the PCA was fitted on (1.0 with foreground ``none``)."""
        return 1.0 if self.foreground_mask is None else float(self.foreground_mask.mean())


def features_pca(
    tokens: torch.Tensor,
    *,
    grid_size: tuple[int, int],
    num_components: int = 3,
    foreground: Foreground = "auto",
) -> FeaturesPCA:
    """Joint PCA of the patch tokens ``[B, H*W, D]`` of ``B`` images in memory (see :func:`features_pca_batches`)."""
    if tokens.ndim != 3:
        raise VitlensError(f"expected patch tokens [B, H*W, D], got shape {list(tokens.shape)}")
    return features_pca_batches(
        lambda: [tokens], grid_size=grid_size, num_components=num_components, foreground=foreground
    )


def features_pca_batches(
    batches: TokenBatches,
    *,
    grid_size: tuple[int, int],
    num_components: int = 3,
    foreground: Foreground = "auto",
    image_indices: np.ndarray | None = None,
) -> FeaturesPCA:
    """Joint PCA of the patch tokens of a set of images, streamed: memory ``D x D`` plus a few numbers per patch.

    With ``foreground="none"`` the PCA is fitted on every patch. Otherwise (DINOv2 paper, Fig. 1) a first PCA on every
    patch gives the first component; patches whose score on it is above a threshold are the foreground, and the
    PCA whose components are returned is fitted on those only. The first component's sign says nothing by itself, so
    it is oriented first: of the two sides of 0, the one with fewer patches on the grid's border (first or last row or
    column, counted over all images) is the positive one, since objects sit inside the frame and the background
    reaches its edges (a tie keeps the largest-|loading|-positive sign). ``auto`` then keeps scores above 0 (above
    the mean token); a number keeps scores above that number on the same oriented axis.

    The RGB map is the first three components, each min-max scaled to [0, 1] over the fitted patches of all images
    (so colours compare across images), clipped there; patches outside the foreground are black, and with fewer than
    three components the missing channels are 0.

    Args:
        batches: called once per pass (two passes with ``none``, three otherwise); each call yields the same token
            batches ``[b, H*W, D]`` in the same order, patch tokens only, row-major over the grid.
        grid_size: ``(H, W)``.
        num_components: components kept, 1 .. D.
        foreground: ``"auto"``, ``"none"`` or a threshold on the oriented first component.
        image_indices: ``[n_rank]``, only when the images are sharded across the ranks of a torch.distributed job:
            the dataset indices of the images ``batches`` yields on this rank, in that order
            (:func:`vitlens.distributed.shard_indices`). Each pass's moments and border counts are then combined
            across ranks, and the per-image maps gathered in dataset order, so every rank returns the PCA of the
            whole set (to float64 rounding: the moments are summed in another order). None: the batches are the
            whole set, and no collective runs even inside a process group.

    Raises:
        ParameterError: ``num_components`` or ``foreground`` out of range.
        VitlensError: token batches of the wrong shape or with NaN/inf, fewer than 2 patches to fit, or a foreground of
            fewer than 2 patches.
    """
    k = check_num_components(num_components)
    mode = check_foreground(foreground)
    h, w = grid_size
    hw = h * w

    def rows(x: torch.Tensor) -> torch.Tensor:  # [b, H*W, D] -> [b*H*W, D], checked
        if x.ndim != 3 or x.shape[1] != hw:
            raise VitlensError(f"expected patch tokens [b, {hw}, D] for a {h}x{w} grid, got shape {list(x.shape)}")
        if not torch.isfinite(x).all():
            raise VitlensError("the patch tokens hold NaN/inf values: their PCA is undefined")
        return rearrange(x, "b n d -> (b n) d")

    sharded = image_indices is not None

    def combined(moments: PatchMoments) -> PatchMoments:
        if sharded:
            moments.all_reduce()
        return moments

    def per_image(parts: list[torch.Tensor], tail: tuple[int, ...]) -> torch.Tensor:
        """This rank's per-patch rows ``[n_rank*H*W, *tail]``, then (sharded) every rank's in dataset order."""
        local = torch.cat(parts) if parts else torch.zeros(0, *tail, dtype=torch.float64)
        if not sharded:
            return local
        from vitlens.distributed import gather_in_order

        by_image = rearrange(local, "(b n) ... -> b n ...", n=hw).numpy()  # [n_rank, H*W, *tail]
        everyone = gather_in_order(by_image, image_indices)  # [B, H*W, *tail]
        return torch.from_numpy(everyone).reshape(-1, *tail)  # [B*H*W, *tail]

    # Pass 1: moments of every patch token.
    everything = PatchMoments()
    for x in batches():
        everything.update(rows(x))
    combined(everything)
    dim = 0 if everything.mean is None else int(everything.mean.shape[0])
    if dim and k > dim:
        raise ParameterError("num_components", f"num_components must be at most {dim} (the token width), not {k}")

    mask = fg_scores = fg_axis = None
    threshold: float | None = None
    if mode == "none":
        fit = everything
    else:
        # Pass 2: scores on the first component of all patches; the moments of both candidate foregrounds (scores
        # above t and below -t) are kept, since which side is the foreground is known only after the last image.
        first = principal_components(everything, 1)
        threshold = 0.0 if mode == "auto" else float(mode)
        border = border_patches(grid_size)  # [H*W]
        above, below = PatchMoments(), PatchMoments()
        parts = []
        border_pos = border_neg = 0
        for x in batches():
            flat = rows(x)
            s = first.project(flat)[:, 0]  # [b*H*W]
            on_border = border.to(s.device).repeat(x.shape[0])
            border_pos += int((on_border & (s > 0)).sum())
            border_neg += int((on_border & (s < 0)).sum())
            above.update(flat[(s > threshold).to(flat.device)])
            below.update(flat[(s < -threshold).to(flat.device)])
            parts.append(s.cpu())
        if sharded:  # counts over every rank's images, so every rank picks the same side
            from vitlens.distributed import all_reduce_sum

            border_pos, border_neg = (int(v) for v in all_reduce_sum(np.array([border_pos, border_neg])))
            combined(above)
            combined(below)
        sign = -1.0 if border_neg < border_pos else 1.0  # the side with fewer border patches becomes positive
        fit = below if sign < 0 else above
        scores_1 = per_image(parts, ()) * sign  # [B*H*W]
        mask = scores_1 > threshold
        if fit.count < 2:
            raise VitlensError(
                f"the foreground holds {fit.count} patch(es) of {scores_1.numel()} at threshold {threshold:g}: too few "
                "for a PCA; lower the threshold or use foreground none"
            )
        fg_scores, fg_axis = scores_1, first.components[0] * sign

    final = principal_components(fit, k)
    # Last pass: every patch's scores on the final components.
    scores = per_image([final.project(rows(x)).cpu() for x in batches()], (k,))  # [B*H*W, K]
    rgb = _rgb(scores, mask)  # [B*H*W, 3]

    def grid(t: torch.Tensor, pattern: str) -> np.ndarray:
        return to_numpy(rearrange(t, pattern, h=h, w=w))

    return FeaturesPCA(
        components=to_numpy(final.components),
        mean=to_numpy(final.mean),
        explained_variance=to_numpy(final.explained_variance),
        explained_variance_ratio=to_numpy(final.explained_variance_ratio),
        scores=grid(scores, "(b h w) k -> b h w k"),
        rgb=grid(rgb, "(b h w) c -> b h w c"),
        foreground=mode if isinstance(mode, str) else "threshold",
        threshold=threshold,
        foreground_mask=None if mask is None else grid(mask, "(b h w) -> b h w").astype(bool),
        foreground_scores=None if fg_scores is None else grid(fg_scores, "(b h w) -> b h w"),
        foreground_component=None if fg_axis is None else to_numpy(fg_axis),
        num_fit_patches=int(fit.count),
        grid_size=(h, w),
    )


def _rgb(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[n, 3]`` in [0, 1]: components 1-3 of ``scores`` ``[n, K]`` min-max scaled over the ``mask`` rows, clipped."""
    n = scores.shape[0]
    chosen = scores if mask is None else scores[mask]
    rgb = torch.zeros(n, 3, dtype=torch.float64)
    c = min(3, scores.shape[1])
    lo, hi = chosen[:, :c].min(dim=0).values, chosen[:, :c].max(dim=0).values  # [c]
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))  # a constant component maps to 0
    rgb[:, :c] = ((scores[:, :c] - lo) / span).clamp(0.0, 1.0)
    if mask is not None:
        rgb[~mask] = 0.0
    return rgb
