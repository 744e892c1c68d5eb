"""Linear CKA between layers (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited"), with
the minibatch estimator of Nguyen, Raghu & Kornblith 2021 ("Do Wide and Deep Networks Learn the Same Things?",
Eq. 3) built on the unbiased HSIC of Song et al. 2012.

For the linear kernel ``K = X Xᵀ`` (``X`` one layer's rows, ``[n, d]``) and ``L = Y Yᵀ`` of ``n`` rows, with ``K̃``
and ``L̃`` the Gram matrices with their diagonals set to zero, the unbiased HSIC is

    HSIC_1(K, L) = [ tr(K̃ L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((n-1)(n-2)) - 2/(n-2) · 1ᵀK̃L̃1 ] / (n(n-3))

and minibatch CKA sums it over fixed-size minibatches ``i``:
``CKA = Σ_i HSIC_1(K_i, L_i) / sqrt(Σ_i HSIC_1(K_i, K_i) · Σ_i HSIC_1(L_i, L_i))``.

The four terms are computed in whichever space is cheaper (:func:`choose_space`): from the ``[n, n]`` Gram
matrices (few rows: class tokens), or from feature-space moments (many rows: every patch token), where
``tr(K̃ L̃) = ‖XᵀY‖²_F - Σ_i ‖x_i‖²‖y_i‖²`` and the others follow from the row sums ``s = Xᵀ1`` and the squared row
norms. Both give the same numbers; the feature-space moments are sums over rows, so a minibatch can arrive in
pieces and no row is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from einops import rearrange

from vitlens.errors import VitlensError

Space = Literal["auto", "gram", "features"]
MIN_ROWS = 4  # HSIC_1 divides by n(n-3) and (n-1)(n-2): it needs at least 4 rows


@dataclass(frozen=True)
class CKA:
    """Linear CKA between every chosen layer of model A and every chosen layer of model B (or A itself)."""

    matrix: np.ndarray  # [La, Lb] CKA of layer layers_a[p] of A with layer layers_b[q] of B
    layers_a: np.ndarray  # [La] int, 0-based blocks of A (their outputs, before the final norm)
    layers_b: np.ndarray  # [Lb] int, 0-based blocks of B
    hsic_ab: np.ndarray  # [La, Lb] mean over minibatches of HSIC_1(K_p, L_q)
    hsic_aa: np.ndarray  # [La] mean over minibatches of HSIC_1(K_p, K_p)
    hsic_bb: np.ndarray  # [Lb] mean over minibatches of HSIC_1(L_q, L_q)
    tokens: str  # "cls", "mean-patch" or "all"
    num_images: int  # images that entered a minibatch
    minibatch_size: int  # images per minibatch (each had exactly this many)
    num_minibatches: int


def hsic_from_terms(
    trace: torch.Tensor, sum_k: torch.Tensor, sum_l: torch.Tensor, cross: torch.Tensor, n: int
) -> torch.Tensor:
    """HSIC_1 from its four terms (broadcast): ``tr(K̃L̃)``, ``1ᵀK̃1``, ``1ᵀL̃1`` and ``1ᵀK̃L̃1`` of ``n`` rows."""
    if n < MIN_ROWS:
        raise VitlensError(f"the unbiased HSIC needs at least {MIN_ROWS} rows, got {n}")
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


def hsic_gram(x: torch.Tensor, y: torch.Tensor, *, diagonal: bool = False) -> torch.Tensor:
    """HSIC_1 of every layer pair in Gram space: ``x [La, n, da]``, ``y [Lb, n, db]`` -> ``[La, Lb]``.

    With ``diagonal`` (``La == Lb``) only the pairs ``(p, p)``, ``[La]``.
    """
    n = x.shape[1]
    k = torch.einsum("pid,pjd->pij", x, x)  # [La, n, n] linear kernel
    lg = torch.einsum("qid,qjd->qij", y, y)  # [Lb, n, n]
    k.diagonal(dim1=1, dim2=2).zero_()  # K̃
    lg.diagonal(dim1=1, dim2=2).zero_()  # L̃
    row_k, row_l = k.sum(dim=2), lg.sum(dim=2)  # [La, n], [Lb, n]: K̃1, L̃1
    sum_k, sum_l = row_k.sum(dim=1), row_l.sum(dim=1)  # [La], [Lb]
    if diagonal:
        trace = torch.einsum("pij,pij->p", k, lg)  # L̃ symmetric: tr(K̃L̃) = Σ_ij K̃_ij L̃_ij
        cross = torch.einsum("pi,pi->p", row_k, row_l)
        return hsic_from_terms(trace, sum_k, sum_l, cross, n)
    trace = torch.einsum("pij,qij->pq", k, lg)
    cross = row_k @ row_l.T  # [La, Lb] 1ᵀK̃L̃1 = (K̃1)·(L̃1)
    return hsic_from_terms(trace, sum_k[:, None], sum_l[None, :], cross, n)


class FeatureMoments:
    """Sums over rows from which HSIC_1 of every layer pair follows without a Gram matrix (fed in pieces).

    For rows ``x_i`` of layer ``p`` (of A) and ``y_i`` of layer ``q`` (of B), with ``k_i = ‖x_i‖²``,
    ``l_i = ‖y_i‖²``, ``s = Σ x_i``, ``t = Σ y_i``, ``C = Σ x_i y_iᵀ``:

    - ``tr(K̃L̃) = ‖C‖²_F - Σ k_i l_i``;
    - ``1ᵀK̃1 = ‖s‖² - Σ k_i`` (and likewise for L);
    - ``1ᵀK̃L̃1 = Σ_i (x_i·s - k_i)(y_i·t - l_i) = sᵀCt - (Σ k_i y_i)·t - (Σ l_i x_i)·s + Σ k_i l_i``.

    Memory: ``C`` is ``[La·da, Lb·db]`` (``diagonal``: ``[La, da, db]``), whatever the number of rows.
    """

    def __init__(self, num_a: int, dim_a: int, num_b: int, dim_b: int, *, diagonal: bool, device, dtype) -> None:
        self.diagonal = diagonal
        opts = dict(device=device, dtype=dtype)
        self.n = 0
        if diagonal:
            self.c = torch.zeros(num_a, dim_a, dim_b, **opts)  # [L, da, db]
            self.kl = torch.zeros(num_a, **opts)  # [L] Σ k_i l_i
            self.k_y = torch.zeros(num_a, dim_b, **opts)  # [L, db] Σ k_i y_i
            self.l_x = torch.zeros(num_a, dim_a, **opts)  # [L, da] Σ l_i x_i
        else:
            self.c = torch.zeros(num_a * dim_a, num_b * dim_b, **opts)  # [La·da, Lb·db]
            self.kl = torch.zeros(num_a, num_b, **opts)  # [La, Lb]
            self.k_y = torch.zeros(num_a, num_b, dim_b, **opts)  # [La, Lb, db]
            self.l_x = torch.zeros(num_b, num_a, dim_a, **opts)  # [Lb, La, da]
        self.s = torch.zeros(num_a, dim_a, **opts)  # [La, da] Σ x_i
        self.t = torch.zeros(num_b, dim_b, **opts)  # [Lb, db] Σ y_i
        self.sum_k = torch.zeros(num_a, **opts)  # [La] Σ k_i
        self.sum_l = torch.zeros(num_b, **opts)  # [Lb] Σ l_i

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows ``x [La, r, da]`` and ``y [Lb, r, db]`` (the same ``r`` rows seen by A and B)."""
        k = (x * x).sum(dim=2)  # [La, r]
        lv = (y * y).sum(dim=2)  # [Lb, r]
        if self.diagonal:
            self.c += torch.einsum("pid,pie->pde", x, y)
            self.kl += (k * lv).sum(dim=1)
            self.k_y += torch.einsum("pi,pie->pe", k, y)
            self.l_x += torch.einsum("pi,pid->pd", lv, x)
        else:
            za = rearrange(x, "p r d -> r (p d)")  # [r, La·da]
            zb = rearrange(y, "q r e -> r (q e)")  # [r, Lb·db]
            self.c += za.T @ zb
            self.kl += k @ lv.T
            self.k_y += torch.einsum("pi,qie->pqe", k, y)
            self.l_x += torch.einsum("qi,pid->qpd", lv, x)
        self.s += x.sum(dim=1)
        self.t += y.sum(dim=1)
        self.sum_k += k.sum(dim=1)
        self.sum_l += lv.sum(dim=1)
        self.n += x.shape[1]

    def hsic(self) -> torch.Tensor:
        """HSIC_1 of the rows added so far: ``[La, Lb]`` (``diagonal``: ``[L]``)."""
        sum_k = (self.s * self.s).sum(dim=1) - self.sum_k  # [La] 1ᵀK̃1
        sum_l = (self.t * self.t).sum(dim=1) - self.sum_l  # [Lb] 1ᵀL̃1
        if self.diagonal:
            trace = (self.c * self.c).sum(dim=(1, 2)) - self.kl
            s_c_t = torch.einsum("pd,pde,pe->p", self.s, self.c, self.t)
            cross = s_c_t - (self.k_y * self.t).sum(dim=1) - (self.l_x * self.s).sum(dim=1) + self.kl
            return hsic_from_terms(trace, sum_k, sum_l, cross, self.n)
        num_a, num_b = self.s.shape[0], self.t.shape[0]
        c = rearrange(self.c, "(p d) (q e) -> p d q e", p=num_a, q=num_b)  # [La, da, Lb, db]
        trace = (c * c).sum(dim=(1, 3)) - self.kl  # [La, Lb]
        s_c_t = torch.einsum("pd,pdqe,qe->pq", self.s, c, self.t)
        k_y_t = torch.einsum("pqe,qe->pq", self.k_y, self.t)
        l_x_s = torch.einsum("qpd,pd->pq", self.l_x, self.s)
        cross = s_c_t - k_y_t - l_x_s + self.kl
        return hsic_from_terms(trace, sum_k[:, None], sum_l[None, :], cross, self.n)


# Gram space holds every layer's [rows, rows] float64 kernel of a minibatch at once: ViT-S/16's 12 layers with every
# patch token of 16 images (3,136 rows) would take 0.9 GiB, where feature space takes a fixed 0.2 GiB.
GRAM_MAX_BYTES = 256 * 2**20


def choose_space(
    rows: int, num_a: int, dim_a: int, num_b: int, dim_b: int, *, same: bool, max_gram_bytes: int = GRAM_MAX_BYTES
) -> str:
    """``"gram"`` or ``"features"``, whichever needs fewer multiply-adds for one minibatch of ``rows`` rows, with
    Gram space only while its kernels fit ``max_gram_bytes``.

    Gram space: the kernels (``rows² · (La·da + Lb·db)``) and the pair traces (``rows² · La·Lb``); feature space:
    ``Xᵀ Y`` of every pair (``rows · La·da · Lb·db``) plus, for two models, each model's own blocks. ``same``: B is
    A (one model), whose kernels and blocks count once.
    """
    width_a, width_b = num_a * dim_a, num_b * dim_b
    gram = rows * rows * ((width_a if same else width_a + width_b) + num_a * num_b)
    features = rows * width_a * width_b + (0 if same else rows * (num_a * dim_a**2 + num_b * dim_b**2))
    kernels = 8 * rows * rows * (num_a if same else num_a + num_b)  # float64 [L, rows, rows]
    return "gram" if gram <= features and kernels <= max_gram_bytes else "features"


class CKAAccumulator:
    """Streams features of consecutive images into minibatches of ``minibatch_size`` images and sums HSIC_1.

    Call :meth:`update` with each loader batch's features, in dataset order; the loader's batch size does not
    matter (a batch is split at minibatch boundaries). A minibatch is reduced to its HSIC values as soon as it is
    complete, so memory holds one minibatch: in Gram space its rows (``[La, rows, da]``) and kernels
    (``[La, rows, rows]``), in feature space the moments (``[La·da, Lb·db]``), never all images' features.

    The last minibatch, if it has fewer than ``minibatch_size`` images, is dropped (:attr:`dropped` counts its
    images) so that every minibatch estimates HSIC at the same size, as in Nguyen et al.; when it is the only one
    (fewer images than ``minibatch_size`` in all), it is used whole: the full-data unbiased estimate.

    Args:
        num_a, dim_a: layers and width of model A's features.
        num_b, dim_b: the same for model B; None for one model (B is A, and :meth:`update` takes ``b=None``).
        minibatch_size: images per minibatch.
        rows_per_image: rows each image adds (1 for a class token or a mean, the patch count for every patch).
        space: ``"gram"``, ``"features"`` or ``"auto"`` (:func:`choose_space`).
    """

    def __init__(
        self,
        num_a: int,
        dim_a: int,
        num_b: int | None = None,
        dim_b: int | None = None,
        *,
        minibatch_size: int,
        rows_per_image: int = 1,
        space: Space = "auto",
    ) -> None:
        if minibatch_size < 1:
            raise VitlensError(f"minibatch_size must be at least 1, not {minibatch_size}")
        self.same = num_b is None
        self.num_a, self.dim_a = num_a, dim_a
        self.num_b, self.dim_b = (num_a, dim_a) if num_b is None or dim_b is None else (num_b, dim_b)
        self.minibatch_size = minibatch_size
        self.rows_per_image = rows_per_image
        rows = minibatch_size * rows_per_image
        self.space = (
            choose_space(rows, self.num_a, self.dim_a, self.num_b, self.dim_b, same=self.same)
            if space == "auto"
            else space
        )
        self.sum_ab = np.zeros((self.num_a, self.num_b))
        self.sum_aa = np.zeros(self.num_a)
        self.sum_bb = np.zeros(self.num_b)
        self.num_minibatches = 0
        self.dropped = 0
        self.last_size = 0  # images in the last minibatch used (minibatch_size, or fewer when it was the only one)
        self._reset()

    def _reset(self) -> None:
        self._images = 0
        self._chunks: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # gram: [L, r, d] pieces
        self._moments: list[FeatureMoments] | None = None  # features: (A, B) [, (A, A), (B, B)]

    @property
    def pending(self) -> int:
        """Images in the current, not yet complete minibatch."""
        return self._images

    def update(self, a: torch.Tensor, b: torch.Tensor | None = None) -> None:
        """Add one loader batch: ``a [La, B, R, da]`` (layer, image, row, feature) and ``b [Lb, B, R, db]``."""
        if a.ndim != 4 or a.shape[0] != self.num_a or a.shape[2] != self.rows_per_image or a.shape[3] != self.dim_a:
            want = [self.num_a, "B", self.rows_per_image, self.dim_a]
            raise VitlensError(f"expected model A features {want}, got {list(a.shape)}")
        if (b is None) != self.same:
            raise VitlensError("give model B's features exactly when the accumulator compares two models")
        if b is not None and (b.shape[0] != self.num_b or b.shape[1:3] != a.shape[1:3] or b.shape[3] != self.dim_b):
            want = [self.num_b, a.shape[1], self.rows_per_image, self.dim_b]
            raise VitlensError(f"expected model B features {want}, got {list(b.shape)}")
        a = a.detach().to(torch.float64)  # the HSIC terms cancel: sums of squares in float64
        b = None if b is None else b.detach().to(torch.float64)
        if not torch.isfinite(a).all() or (b is not None and not torch.isfinite(b).all()):
            raise VitlensError("the block outputs have NaN/inf values: CKA is undefined")
        start = 0
        while start < a.shape[1]:
            take = min(a.shape[1] - start, self.minibatch_size - self._images)
            part_a = a[:, start : start + take]
            part_b = None if b is None else b[:, start : start + take]
            self._add(part_a, part_b)
            start += take
            if self._images == self.minibatch_size:
                self._close()

    def _add(self, a: torch.Tensor, b: torch.Tensor | None) -> None:
        rows_a = rearrange(a, "l i r d -> l (i r) d")  # [La, images·R, da]
        rows_b = None if b is None else rearrange(b, "l i r d -> l (i r) d")
        self._images += a.shape[1]
        if self.space == "gram":
            self._chunks.append((rows_a, rows_b))
            return
        if self._moments is None:
            opts = dict(device=a.device, dtype=a.dtype)
            ab = FeatureMoments(self.num_a, self.dim_a, self.num_b, self.dim_b, diagonal=False, **opts)
            self._moments = [ab]
            if not self.same:
                self._moments.append(
                    FeatureMoments(self.num_a, self.dim_a, self.num_a, self.dim_a, diagonal=True, **opts)
                )
                self._moments.append(
                    FeatureMoments(self.num_b, self.dim_b, self.num_b, self.dim_b, diagonal=True, **opts)
                )
        other = rows_a if rows_b is None else rows_b
        self._moments[0].update(rows_a, other)
        if not self.same:
            self._moments[1].update(rows_a, rows_a)
            self._moments[2].update(other, other)

    def _close(self) -> None:
        """Reduce the current minibatch to HSIC values and add them to the sums."""
        if self.space == "gram":
            x = torch.cat([c[0] for c in self._chunks], dim=1)  # [La, n, da]
            y = x if self.same else torch.cat([c[1] for c in self._chunks], dim=1)  # type: ignore[misc]
            ab = hsic_gram(x, y)
            aa = ab.diagonal() if self.same else hsic_gram(x, x, diagonal=True)
            bb = ab.diagonal() if self.same else hsic_gram(y, y, diagonal=True)
        else:
            assert self._moments is not None
            ab = self._moments[0].hsic()
            aa = ab.diagonal() if self.same else self._moments[1].hsic()
            bb = ab.diagonal() if self.same else self._moments[2].hsic()
        self.sum_ab += ab.cpu().numpy()
        self.sum_aa += aa.cpu().numpy()
        self.sum_bb += bb.cpu().numpy()
        self.num_minibatches += 1
        self.last_size = self._images
        self._reset()

    def all_reduce(self) -> None:
        """Combine the minibatch sums of every rank of a torch.distributed job, in place.

        Each rank must have been fed whole minibatches of the global sequence (shard the data in blocks of
        ``minibatch_size`` images: :func:`vitlens.distributed.shard`), so that its minibatches are the single
        process's; the HSIC sums are then added (float64) and the estimate is the same. Images still pending belong
        to the global last, incomplete minibatch: they are dropped here, as :meth:`result` drops them (the
        sharding gives a rank an incomplete minibatch only when complete ones exist). A no-op in a single process.
        """
        from vitlens.distributed import all_reduce_max, all_reduce_sum, is_distributed

        if not is_distributed():
            return
        self.dropped += self._images
        self._reset()
        for name in ("sum_ab", "sum_aa", "sum_bb", "num_minibatches", "dropped"):
            setattr(self, name, all_reduce_sum(getattr(self, name)))
        self.last_size = all_reduce_max(self.last_size)

    def result(self, layers_a: Sequence[int], layers_b: Sequence[int], tokens: str) -> CKA:
        """The CKA matrix of the complete minibatches (see the class docstring for the last, incomplete one)."""
        if self._images:
            if self.num_minibatches == 0 and self._images * self.rows_per_image >= MIN_ROWS:
                self._close()  # the only minibatch: the whole data
            else:
                self.dropped += self._images
                self._reset()
        if self.num_minibatches == 0:
            raise VitlensError(
                f"CKA needs at least {MIN_ROWS} rows in a minibatch; got {self.dropped} image(s) of "
                f"{self.rows_per_image} row(s)"
            )
        k = self.num_minibatches
        # Σ_i HSIC(K_i, L_i) / sqrt(Σ_i HSIC(K_i, K_i) · Σ_i HSIC(L_i, L_i)) (Nguyen et al. 2021, Eq. 3)
        denom = np.sqrt(np.outer(self.sum_aa, self.sum_bb))
        with np.errstate(divide="ignore", invalid="ignore"):
            matrix = np.where(denom > 0, self.sum_ab / denom, np.nan)
        if self.same:
            matrix = (matrix + matrix.T) / 2  # symmetric up to rounding in the pair sums; made exact
        size = self.minibatch_size if k > 1 or self.last_size == self.minibatch_size else self.last_size
        return CKA(
            matrix=matrix,
            layers_a=np.asarray(layers_a, dtype=np.int64),
            layers_b=np.asarray(layers_b, dtype=np.int64),
            hsic_ab=self.sum_ab / k,
            hsic_aa=self.sum_aa / k,
            hsic_bb=self.sum_bb / k,
            tokens=tokens,
            num_images=k * size,
            minibatch_size=size,
            num_minibatches=k,
        )


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of one pair on all rows at once, with the unbiased HSIC (one minibatch): ``x [n, dx]``,
    ``y [n, dy]``."""
    x64, y64 = x.detach().to(torch.float64)[None], y.detach().to(torch.float64)[None]
    xy = hsic_gram(x64, y64)[0, 0]
    xx = hsic_gram(x64, x64)[0, 0]
    yy = hsic_gram(y64, y64)[0, 0]
    return float(xy / torch.sqrt(xx * yy))
