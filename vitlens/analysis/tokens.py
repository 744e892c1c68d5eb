"""Token norms of the residual stream and high-norm outlier tokens ("Vision Transformers Need Registers", Darcet
et al. 2023): streaming histograms of every token's L2 norm after each block, outliers above a threshold, and how
much attention lands on them, on the registers and on the class token, and whether their input patches are
redundant (similar to their grid neighbours).

Memory does not grow with the number of images: every statistic is a sum or a count on a fixed grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange

from vitlens.analysis._common import check_attention
from vitlens.errors import VitlensError
from vitlens.layout import TokenLayout

# Fixed log-spaced norm bins: 64 per decade (each bin spans a factor 10**(1/64) = 1.037, so a quantile read from
# the histogram is within 3.7 % of the exact one) from 1e-3 to 1e6, plus [0, 1e-3) and [1e6, inf) at the ends.
BINS_PER_DECADE = 64
LOG10_MIN, LOG10_MAX = -3, 6
QUANTILES = (0.5, 0.9, 0.99)  # from the histogram; the maximum is exact
# auto threshold: a run of (nearly) empty bins at least this wide, in decades, above the median norm of the last
# layer's patch tokens separates the high-norm tokens (Darcet et al. see ~10x the typical norm) from the rest.
AUTO_MIN_GAP_DECADES = 0.5
AUTO_SPARSE_FRACTION = 1e-4  # a bin holding at most this fraction of the tokens counts as empty (stray tokens)


def norm_bin_edges() -> np.ndarray:
    """The fixed bin edges ``[E + 1]``: 0, then ``10**k / 64`` for k from -3 to 6 decades, then infinity."""
    inner = np.logspace(LOG10_MIN, LOG10_MAX, (LOG10_MAX - LOG10_MIN) * BINS_PER_DECADE + 1)
    return np.concatenate([[0.0], inner, [np.inf]])


def token_kinds(layout: TokenLayout) -> tuple[str, ...]:
    """``patch``, then each prefix kind present once, in sequence order (all registers are one kind)."""
    return ("patch", *dict.fromkeys(layout.prefix_kinds))


@dataclass(frozen=True)
class TokenNorms:
    """Token norm statistics, outliers and attention sinks per layer, over a set of images."""

    layers: np.ndarray  # [L] int, 0-based block indices (output of that block, before the final norm)
    kinds: tuple[str, ...]  # K token kinds: "patch", then "cls" / "dist" / "reg" as the model has them
    bin_edges: np.ndarray  # [E + 1] the fixed norm bin edges (norm_bin_edges())
    histograms: np.ndarray  # [K, L, E] int, tokens per norm bin
    num_tokens: np.ndarray  # [K] int, tokens of each kind counted per layer (images x tokens of that kind)
    norm_mean: np.ndarray  # [K, L] exact mean norm
    norm_quantiles: np.ndarray  # [K, L, 4] median, 0.9, 0.99 (histogram, log-interpolated) and the exact maximum
    threshold: float  # patch tokens with norm > threshold are outliers; inf when auto found no outlier population
    threshold_auto: bool  # True when picked by auto_threshold
    outlier_fraction: np.ndarray  # [L] fraction of patch tokens that are outliers
    images_with_outliers: np.ndarray  # [L] fraction of images with at least one outlier patch token
    outlier_map: np.ndarray  # [L, H, W] fraction of images in which that patch position is an outlier
    prefix_kinds: tuple[str, ...]  # P prefix tokens in sequence order
    cls_attention_prefix: np.ndarray  # [L, P] class query's attention on each prefix token (NaN without cls)
    cls_attention_outliers: np.ndarray  # [L] class query's attention on outlier patch tokens (NaN without cls)
    patch_attention_prefix: np.ndarray  # [L, P] mean patch query's attention on each prefix token
    patch_attention_outliers: np.ndarray  # [L] mean patch query's attention on outlier patch tokens
    neighbour_similarity_outliers: np.ndarray  # [L] mean neighbour similarity of the outlier patches (NaN: none)
    neighbour_similarity_normal: np.ndarray  # [L] mean neighbour similarity of the other patches (NaN: none)
    num_images: int
    grid_size: tuple[int, int]

    def kind(self, name: str) -> int:
        """Row of ``name`` in the ``[K, ...]`` arrays."""
        return self.kinds.index(name)

    def sink_shares(self, query: str) -> dict[str, np.ndarray]:
        """Attention of the ``cls`` or mean ``patch`` query per layer on outliers, on all registers and on cls."""
        prefix = self.cls_attention_prefix if query == "cls" else self.patch_attention_prefix  # [L, P]
        outliers = self.cls_attention_outliers if query == "cls" else self.patch_attention_outliers
        regs = [i for i, k in enumerate(self.prefix_kinds) if k == "reg"]
        cls = [i for i, k in enumerate(self.prefix_kinds) if k == "cls"]
        return {
            "outliers": outliers,
            "registers": prefix[:, regs].sum(axis=1) if regs else np.zeros(len(self.layers)),
            "cls": prefix[:, cls[0]] if cls else np.full(len(self.layers), np.nan),
        }


def histogram_quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """The ``q`` quantile of the values counted in ``counts`` on ``edges``, interpolated in log space in its bin."""
    total = counts.sum()
    if total == 0:
        return float("nan")
    cum = np.cumsum(counts)
    b = int(np.searchsorted(cum, q * total, side="left"))
    lo, hi = edges[b], edges[b + 1]
    before = cum[b - 1] if b > 0 else 0
    frac = (q * total - before) / counts[b]
    if lo <= 0 or not np.isfinite(hi):  # the open end bins: their finite edge
        return float(hi if lo <= 0 else lo)
    return float(np.exp(np.log(lo) + frac * (np.log(hi) - np.log(lo))))


def neighbour_similarity(embeddings: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Each patch's mean cosine similarity to its 4-neighbours on the grid, ``[B, H*W]`` (float64).

    ``embeddings [B, H*W, D]`` are the input patch embeddings in row-major grid order (or ``[B, H, W, D]``). Only
    the neighbours that exist count: 2 at a corner, 3 on an edge, 4 inside; NaN on a 1 x 1 grid (none).
    """
    h, w = grid_size
    b, d = embeddings.shape[0], embeddings.shape[-1]
    if embeddings.numel() != b * h * w * d:
        raise VitlensError(f"expected patch embeddings [B, {h * w}, D], got {list(embeddings.shape)}")
    e = torch.nn.functional.normalize(embeddings.detach().to(torch.float64).reshape(b, h, w, d), dim=-1)
    total = torch.zeros(b, h, w, dtype=torch.float64, device=e.device)
    count = torch.zeros(h, w, dtype=torch.float64, device=e.device)
    across = (e[:, :, :-1] * e[:, :, 1:]).sum(dim=-1)  # [B, H, W-1] left-right pairs
    down = (e[:, :-1] * e[:, 1:]).sum(dim=-1)  # [B, H-1, W] up-down pairs
    total[:, :, :-1] += across
    total[:, :, 1:] += across
    total[:, :-1] += down
    total[:, 1:] += down
    count[:, :-1] += 1
    count[:, 1:] += 1
    count[:-1] += 1
    count[1:] += 1
    return (total / count).reshape(b, h * w)  # 0 / 0 = NaN without neighbours


def auto_threshold(counts: np.ndarray, edges: np.ndarray) -> float:
    """The outlier threshold from the last layer's patch-token norm histogram (``counts`` on ``edges``).

    Rule: above the median norm, find the widest run of (nearly) empty bins (at most AUTO_SPARSE_FRACTION of the
    tokens each) that has tokens beyond it; if it spans at least AUTO_MIN_GAP_DECADES, the threshold is its
    geometric middle (the valley of the log-norm histogram). Otherwise there is no separate high-norm population
    and the threshold is infinite (no outliers).
    """
    total = int(counts.sum())
    if total == 0:
        return float("inf")
    median = histogram_quantile(counts, edges, 0.5)
    sparse = counts <= AUTO_SPARSE_FRACTION * total
    occupied = np.flatnonzero(counts > 0)
    last = int(occupied[-1])
    start_bin = int(np.searchsorted(edges, median, side="right"))  # first bin wholly above the median's bin
    best, best_width = None, 0
    b = start_bin
    while b < last:
        if sparse[b]:
            run_end = b
            while run_end + 1 < last and sparse[run_end + 1]:
                run_end += 1
            if run_end - b + 1 > best_width:
                best, best_width = (b, run_end), run_end - b + 1
            b = run_end + 1
        else:
            b += 1
    if best is None or best_width < AUTO_MIN_GAP_DECADES * BINS_PER_DECADE:
        return float("inf")
    lo, hi = edges[best[0]], edges[best[1] + 1]
    return float(np.sqrt(lo * hi))


class TokenNormAccumulator:
    """Streams block outputs (and, with a threshold, attention) of chosen layers into :class:`TokenNorms`.

    Call :meth:`update_attention` (optional) and then :meth:`update_block` for each layer of each batch, the order
    in which a forward pass reaches them (attention inside the block, the block's output after it). Outliers are
    flagged on the block's output; the attention of that same block is then split between them and the rest, so the
    sink shares of layer ``l`` say how much of layer ``l``'s attention goes to the tokens that are outliers after
    layer ``l`` (high-norm tokens, once they appear, stay high-norm in the following layers).

    Args:
        layout: the model's token layout.
        layers: the 0-based layers that will be fed, in any order.
        threshold: patch tokens with norm above it are outliers; None to collect the norm statistics only (the
            first pass of the auto threshold).
    """

    def __init__(self, layout: TokenLayout, layers: Sequence[int], *, threshold: float | None = None) -> None:
        self.layout = layout
        self.layers = [int(x) for x in layers]
        self.row = {layer: i for i, layer in enumerate(self.layers)}
        self.threshold = threshold
        self.kinds = token_kinds(layout)
        self.edges = norm_bin_edges()
        n_l, n_k, n_e = len(self.layers), len(self.kinds), len(self.edges) - 1
        p, (h, w) = layout.num_prefix_tokens, layout.grid_size
        self.kind_index = {
            kind: [i for i, k in enumerate(layout.prefix_kinds) if k == kind] for kind in self.kinds[1:]
        }  # sequence indices of each prefix kind
        self.hist = np.zeros((n_k, n_l, n_e), dtype=np.int64)
        self.norm_sum = np.zeros((n_k, n_l))
        self.norm_max = np.full((n_k, n_l), -np.inf)
        self.count = np.zeros(n_k, dtype=np.int64)
        self.outliers = np.zeros(n_l, dtype=np.int64)
        self.images_with = np.zeros(n_l, dtype=np.int64)
        self.position = np.zeros((n_l, h * w), dtype=np.int64)
        self.cls_prefix = np.zeros((n_l, p))
        self.cls_outliers = np.zeros(n_l)
        self.patch_prefix = np.zeros((n_l, p))
        self.patch_outliers = np.zeros(n_l)
        self.similarity_sum = np.zeros((2, n_l))  # [outliers, normal] sums of the neighbour similarity
        self.similarity_count = np.zeros((2, n_l), dtype=np.int64)
        self._similarity: torch.Tensor | None = None  # [B, HW] neighbour similarity of the current batch
        self.num_images = 0
        self._attn: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self._attn_seen = np.zeros(n_l, dtype=bool)

    def update_attention(self, layer: int, attn: torch.Tensor) -> None:
        """Keep the class query's and the mean patch query's attention rows ``[B, N]`` (head mean) of ``layer``."""
        check_attention(attn, self.layout)
        a = attn.detach()
        patch = self.layout.patch_slice
        heads, patches = a.shape[1], patch.stop - patch.start
        cls_row = None
        if self.layout.has_class_token:
            cls_row = a[:, :, self.layout.token_index("cls"), :].to(torch.float64).mean(dim=1)  # [B, N] head mean
        # Summing the heads in the map's dtype first and only the [B, HW, N] rest in float64 keeps the error of a
        # float32 map near 1e-10 on the mean while never copying the whole map to float64 (that copy alone cost 15 %
        # of a ViT-S forward pass).
        per_query = a[:, :, patch, :].sum(dim=1).to(torch.float64)  # [B, HW, N]
        patch_row = per_query.sum(dim=1) / (heads * patches)  # [B, N] mean patch query, head mean
        self._attn[layer] = (cls_row, patch_row)

    def update_embeddings(self, embeddings: torch.Tensor) -> None:
        """Keep the neighbour similarity of this batch's input patch embeddings (the patch projection's output
        ``[B, H*W, D]``, before position embeddings); call it before the batch's :meth:`update_block` calls."""
        self._similarity = neighbour_similarity(embeddings, self.layout.grid_size)

    def update_block(self, layer: int, tokens: torch.Tensor) -> None:
        """Count the norms of ``tokens [B, N, D]`` (output of block ``layer``); with a threshold, its outliers."""
        layout, r = self.layout, self.row[layer]
        if tokens.ndim != 3 or tokens.shape[1] != layout.num_tokens:
            raise VitlensError(f"expected block output [B, {layout.num_tokens}, D], got {list(tokens.shape)}")
        norms = torch.linalg.vector_norm(tokens.detach().to(torch.float64), dim=-1)  # [B, N]
        if not torch.isfinite(norms).all():
            raise VitlensError(f"the output of block {layer} has NaN/inf values: its token norms are undefined")
        batch = norms.shape[0]
        if r == 0:
            self.num_images += batch
        groups = {"patch": norms[:, layout.patch_slice]}  # [B, HW]
        for kind, idx in self.kind_index.items():
            groups[kind] = norms[:, idx]  # [B, n_kind]
        for k, kind in enumerate(self.kinds):
            values = groups[kind].reshape(-1).cpu().numpy()
            self.hist[k, r] += np.histogram(values, bins=self.edges)[0]
            self.norm_sum[k, r] += values.sum()
            self.norm_max[k, r] = max(self.norm_max[k, r], values.max())
            if r == 0:
                self.count[k] += values.size
        if self.threshold is None:
            return
        mask = groups["patch"] > self.threshold  # [B, HW]
        self.outliers[r] += int(mask.sum())
        self.images_with[r] += int(mask.any(dim=1).sum())
        self.position[r] += mask.sum(dim=0).cpu().numpy()
        if self._similarity is not None:
            if self._similarity.shape != mask.shape:
                raise VitlensError(f"patch embeddings of {self._similarity.shape[0]} images, block output of {batch}")
            sim = self._similarity.to(mask.device)
            valid = ~torch.isnan(sim)  # patches with at least one neighbour
            for i, chosen in enumerate((mask & valid, ~mask & valid)):
                self.similarity_sum[i, r] += float(sim[chosen].sum())
                self.similarity_count[i, r] += int(chosen.sum())
        if layer in self._attn:
            cls_row, patch_row = self._attn.pop(layer)
            self._attn_seen[r] = True
            prefix, patches = layout.prefix_slice, layout.patch_slice
            self.patch_prefix[r] += patch_row[:, prefix].sum(dim=0).cpu().numpy()
            self.patch_outliers[r] += float((patch_row[:, patches] * mask).sum())
            if cls_row is not None:
                self.cls_prefix[r] += cls_row[:, prefix].sum(dim=0).cpu().numpy()
                self.cls_outliers[r] += float((cls_row[:, patches] * mask).sum())

    # Which attributes are sums (and counts) and which are maxima: all of the state, so that after all_reduce
    # every rank holds what one process that saw all images would hold.
    _SUMS = (
        "hist",
        "norm_sum",
        "count",
        "outliers",
        "images_with",
        "position",
        "cls_prefix",
        "cls_outliers",
        "patch_prefix",
        "patch_outliers",
        "similarity_sum",
        "similarity_count",
        "num_images",
    )
    _MAXIMA = ("norm_max", "_attn_seen")

    def all_reduce(self) -> None:
        """Combine the state of every rank of a torch.distributed job (sums added, maxima taken), in place.

        Histograms and counts travel as int64 (exact), the sums as float64; the quantiles are read from the summed
        histograms afterwards, never averaged. A no-op in a single process; call it after the local pass, before
        :meth:`result`.
        """
        from vitlens.distributed import all_reduce_max, all_reduce_sum, is_distributed

        if not is_distributed():
            return
        for name in self._SUMS:
            setattr(self, name, all_reduce_sum(getattr(self, name)))
        for name in self._MAXIMA:
            setattr(self, name, all_reduce_max(getattr(self, name)))

    def result(self) -> TokenNorms:
        """The statistics so far.

        Raises:
            VitlensError: no image was fed.
        """
        if self.num_images == 0:
            raise VitlensError("no images were seen: token norms are undefined")
        n, (h, w) = self.num_images, self.layout.grid_size
        quantiles = np.zeros((*self.norm_sum.shape, len(QUANTILES) + 1))
        for k in range(len(self.kinds)):
            for r in range(len(self.layers)):
                qs = [histogram_quantile(self.hist[k, r], self.edges, q) for q in QUANTILES]
                quantiles[k, r] = [*np.minimum(qs, self.norm_max[k, r]), self.norm_max[k, r]]  # max is exact
        no_attn = ~self._attn_seen
        threshold = float("inf") if self.threshold is None else float(self.threshold)
        cls_prefix, cls_out = self.cls_prefix / n, self.cls_outliers / n
        patch_prefix, patch_out = self.patch_prefix / n, self.patch_outliers / n
        if not self.layout.has_class_token:
            cls_prefix, cls_out = np.full_like(cls_prefix, np.nan), np.full_like(cls_out, np.nan)
        for arr in (cls_prefix, cls_out, patch_prefix, patch_out):
            arr[no_attn] = np.nan  # layers whose attention was not captured
        counts = self.similarity_count
        similarity = np.divide(self.similarity_sum, counts, out=np.full(counts.shape, np.nan), where=counts > 0)
        return TokenNorms(
            layers=np.asarray(self.layers, dtype=np.int64),
            kinds=self.kinds,
            bin_edges=self.edges,
            histograms=self.hist.copy(),
            num_tokens=self.count.copy(),
            norm_mean=self.norm_sum / self.count[:, None],
            norm_quantiles=quantiles,
            threshold=threshold,
            threshold_auto=False,
            outlier_fraction=self.outliers / (n * h * w),
            images_with_outliers=self.images_with / n,
            outlier_map=(self.position / n).reshape(len(self.layers), h, w),  # row-major patch order -> [L, H, W]
            prefix_kinds=tuple(self.layout.prefix_kinds),
            cls_attention_prefix=cls_prefix,
            cls_attention_outliers=cls_out,
            patch_attention_prefix=patch_prefix,
            patch_attention_outliers=patch_out,
            neighbour_similarity_outliers=similarity[0],
            neighbour_similarity_normal=similarity[1],
            num_images=n,
            grid_size=(h, w),
        )


@dataclass(frozen=True)
class TokenImageMaps:
    """Per-image views of one layer: where the high-norm tokens are, and what the query attends to with and without
    them (after Darcet et al. 2023, Figs. 1 and 2)."""

    layer: int  # 0-based block: norms of its output, attention of its softmax
    query: str  # "cls", or "mean-patch" for models without a class token
    norms: np.ndarray  # [B, H, W] L2 norm of each patch token after block `layer`
    outliers: np.ndarray  # [B, H, W] bool, norm above the threshold
    attention: np.ndarray  # [B, H, W] the query's head-mean attention on each patch key
    attention_without_outliers: np.ndarray  # [B, H, W] the same with the outlier keys removed; NaN on outliers


def token_image_maps(
    tokens: torch.Tensor, attn: torch.Tensor, layout: TokenLayout, *, threshold: float, layer: int
) -> TokenImageMaps:
    """Token-norm map, outliers and the query's attention with and without the outlier keys, per image.

    Removing a key from a softmax row and renormalising the rest is exactly the attention the head would compute with
    that key's logit set to ``-inf``, so "without outliers" is done per head on the captured weights
    (``a_ij / sum_{k not outlier} a_ik``) before the head mean: it shows where the query would look if the sinks
    were not there. Prefix keys (cls, registers) stay. The query is the class token, or for models without one the
    mean of the patch queries' rows (each renormalised first).

    Args:
        tokens: block ``layer``'s output ``[B, N, D]``.
        attn: block ``layer``'s post-softmax attention ``[B, heads, N, N]``.
        layout: the model's token layout.
        threshold: patch tokens with a larger norm are outliers (inf: none).
        layer: the block index, recorded in the result.
    """
    check_attention(attn, layout)
    if tokens.ndim != 3 or tokens.shape[1] != layout.num_tokens:
        raise VitlensError(f"expected block output [B, {layout.num_tokens}, D], got {list(tokens.shape)}")
    h, w = layout.grid_size
    patches = layout.patch_slice
    norms = torch.linalg.vector_norm(tokens.detach().to(torch.float64), dim=-1)[:, patches]  # [B, HW]
    outliers = norms > threshold  # [B, HW]
    a = attn.detach().to(torch.float64)
    if layout.has_class_token:
        query = "cls"
        rows = a[:, :, layout.token_index("cls") : layout.token_index("cls") + 1, :]  # [B, heads, 1, N]
    else:
        query = "mean-patch"
        rows = a[:, :, patches, :]  # [B, heads, HW, N]
    keep = torch.ones(a.shape[0], a.shape[-1], dtype=torch.bool, device=a.device)  # [B, N] keys that stay
    keep[:, patches] = ~outliers
    kept = rows * keep[:, None, None, :]
    kept = kept / kept.sum(dim=-1, keepdim=True)  # renormalised over the remaining keys (0/0 = NaN: none remain)
    attention = rows.mean(dim=(1, 2))[:, patches]  # [B, HW] head and query mean
    without = kept.mean(dim=(1, 2))[:, patches]
    without = without.masked_fill(outliers, float("nan"))

    def grid(x: torch.Tensor) -> np.ndarray:
        return rearrange(x, "b (h w) -> b h w", h=h, w=w).cpu().numpy()  # row-major patch order

    return TokenImageMaps(
        layer=int(layer),
        query=query,
        norms=grid(norms),
        outliers=grid(outliers),
        attention=grid(attention),
        attention_without_outliers=grid(without),
    )
