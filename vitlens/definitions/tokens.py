"""tokens: residual-stream token norms, high-norm outlier tokens and attention sinks (Darcet et al. 2023)."""

from __future__ import annotations

from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitlens import defaults
from vitlens.errors import ParameterError
from vitlens.registry import Definition, register
from vitlens.result import Result

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from PIL import Image

    from vitlens.analysis.tokens import TokenImageMaps, TokenNorms
    from vitlens.attention import Progress
    from vitlens.data import ImageDataset, Split
    from vitlens.models.vit import ViT

_QUANTILE_KEYS = ("0.5", "0.9", "0.99", "max")
_ARRAYS = (
    "layers",
    "bin_edges",
    "histograms",
    "num_tokens",
    "norm_mean",
    "norm_quantiles",
    "outlier_fraction",
    "images_with_outliers",
    "outlier_map",
    "cls_attention_prefix",
    "cls_attention_outliers",
    "patch_attention_prefix",
    "patch_attention_outliers",
    "neighbour_similarity_outliers",
    "neighbour_similarity_normal",
)
_IMAGE_ARRAYS = ("norms", "outliers", "attention", "attention_without_outliers")  # TokenImageMaps, [B, H, W] each


def _num(value: Any) -> float | None:
    import math

    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True, eq=False, repr=False)
class TokensResult(Result):
    """Token norms per layer and kind, outlier tokens and attention sinks, over a set of images.

    Attributes:
        norms: the statistics (:class:`~vitlens.analysis.tokens.TokenNorms`).
        source: the model it came from.
        data: the data spec of the images (:attr:`vitlens.data.ImageDataset.spec`).
        prefix_tokens: the kinds of the prefix tokens in sequence order (``cls``, ``dist``, ``reg``).
        images: the names of the images shown one by one (``images=``), in the order of ``image_maps``.
        image_maps: their token-norm maps and query attention with and without the outlier keys in one layer
            (:class:`~vitlens.analysis.tokens.TokenImageMaps`); None without ``images=``.
        photos: the images as the model sees them, for the per-image figure; init-only, not compared or saved.
    """

    norms: TokenNorms
    source: str
    data: str
    prefix_tokens: tuple[str, ...]
    images: tuple[str, ...] = ()
    image_maps: TokenImageMaps | None = None
    photos: InitVar[Sequence[Image.Image] | None] = None

    analysis = "tokens"
    stem = "tokens"

    def __post_init__(self, photos: Sequence[Image.Image] | None) -> None:
        # As in RolloutResult: the photos are what the maps are drawn over, not part of the result (not compared,
        # not saved); a result read back from its files has none and draws the maps alone.
        object.__setattr__(self, "photos", None if photos is None else tuple(photos))

    def to_dict(self) -> dict[str, Any]:
        t = self.norms
        per_layer = []
        for r, layer in enumerate(t.layers):
            entry: dict[str, Any] = {
                "layer": int(layer),
                "norm_mean": {kind: _num(t.norm_mean[k, r]) for k, kind in enumerate(t.kinds)},
                "norm_quantiles": {
                    kind: dict(zip(_QUANTILE_KEYS, (_num(v) for v in t.norm_quantiles[k, r]), strict=True))
                    for k, kind in enumerate(t.kinds)
                },
                "outlier_fraction": float(t.outlier_fraction[r]),
                "images_with_outliers": float(t.images_with_outliers[r]),
            }
            for query in ("cls", "patch"):
                shares = t.sink_shares(query)
                entry[f"sink_share_{query}"] = {name: _num(v[r]) for name, v in shares.items()}
            regs = [i for i, k in enumerate(t.prefix_kinds) if k == "reg"]
            entry["register_attention"] = [_num(t.patch_attention_prefix[r, i]) for i in regs]
            entry["neighbour_similarity_outliers"] = _num(t.neighbour_similarity_outliers[r])
            entry["neighbour_similarity_normal"] = _num(t.neighbour_similarity_normal[r])
            per_layer.append(entry)
        return {
            "source": self.source,
            "data": self.data,
            "num_images": t.num_images,
            "grid_size": list(t.grid_size),
            "threshold": _num(t.threshold),
            "threshold_auto": t.threshold_auto,
            "kinds": list(t.kinds),
            "num_tokens": {kind: int(t.num_tokens[k]) for k, kind in enumerate(t.kinds)},
            "layers": per_layer,
            "histograms_file": f"{self.stem}.npz",
            "prefix_tokens": list(self.prefix_tokens),
            **self._images_dict(),
        }

    def _images_dict(self) -> dict[str, Any]:
        """The per-image numbers (maps in the NPZ); empty without ``images=``, so those files stay as they were."""
        m = self.image_maps
        if m is None:
            return {}
        entries = []
        for i, name in enumerate(self.images):
            outliers = m.outliers[i]
            entries.append(
                {
                    "name": name,
                    "outliers": int(outliers.sum()),
                    "norm_max": _num(m.norms[i].max()),
                    f"{m.query}_attention_on_outliers": float(m.attention[i][outliers].sum()),
                }
            )
        return {"image_layer": m.layer, "image_query": m.query, "images": entries}

    def summary(self) -> str:
        t = self.norms
        thr = "none found" if t.threshold == float("inf") else f"{t.threshold:.3g}"
        return (
            f"threshold {thr}{' (auto)' if t.threshold_auto else ''}; layer {int(t.layers[-1])}: "
            f"{100 * t.outlier_fraction[-1]:.2f}% outlier patches, in {100 * t.images_with_outliers[-1]:.0f}% of "
            f"{t.num_images} images"
        )

    def key_numbers(self) -> dict[str, Any]:
        t = self.norms
        return {
            "data": self.data,
            "num_images": t.num_images,
            "threshold": _num(t.threshold),
            "outlier_fraction_by_layer": [float(v) for v in t.outlier_fraction],
        }

    def plot(self, ax: Axes | None = None) -> Axes:
        from vitlens.plotting.tokens import plot_token_norms

        return plot_token_norms(self.norms, ax=ax)

    def figure(self) -> Figure:
        from vitlens.plotting.tokens import tokens_figure

        return tokens_figure(self.norms)

    def images_figure(self) -> Figure:
        """The per-image figure the CLI saves as ``tokens_images.<fmt>``: a row per image with the photo, its
        token-norm map and the query's attention with and without the outlier keys (the maps alone without photos).

        Raises:
            ParameterError: the result has no per-image maps (computed without ``images=``).
        """
        from vitlens.plotting.tokens import tokens_images_figure

        if self.image_maps is None:
            raise ParameterError("images", "this result has no per-image maps: compute it with images=")
        return tokens_images_figure(self.image_maps, self.photos, self.images)

    def _write(self, out: Path, fmt: str, payload: dict[str, Any]) -> list[Path]:
        import numpy as np

        from vitlens.io import ensure_out_dir, write_json, write_npz
        from vitlens.plotting.style import save_figure

        t = self.norms
        fig = self.figure()
        images_fig = None if self.image_maps is None else self.images_figure()
        out = ensure_out_dir(out)
        arrays = {name: getattr(t, name) for name in _ARRAYS}
        m = self.image_maps
        if m is not None:  # without images the NPZ keeps its old keys
            arrays.update(
                image_names=np.asarray(list(self.images), dtype=str),
                image_layer=np.int64(m.layer),
                image_query=np.asarray(m.query),
                **{f"image_{name}": getattr(m, name) for name in _IMAGE_ARRAYS},
            )
        files = [
            write_npz(
                out / "tokens.npz",
                **arrays,
                threshold=np.float64(t.threshold),
                threshold_auto=np.bool_(t.threshold_auto),
                num_images=np.int64(t.num_images),
                grid_size=np.asarray(t.grid_size),
            ),
            write_json(out / "tokens.json", payload),
            save_figure(fig, out / f"tokens.{fmt}", fmt=fmt),  # type: ignore[arg-type]
        ]
        if images_fig is not None:
            files.append(save_figure(images_fig, out / f"tokens_images.{fmt}", fmt=fmt))  # type: ignore[arg-type]
        return files

    @classmethod
    def _read(cls, folder: Path, payload: dict[str, Any]) -> TokensResult:
        import numpy as np

        from vitlens.analysis.tokens import TokenImageMaps, TokenNorms

        with np.load(folder / "tokens.npz", allow_pickle=False) as npz:
            h, w = (int(v) for v in npz["grid_size"])
            norms = TokenNorms(
                **{name: npz[name] for name in _ARRAYS},
                kinds=tuple(payload["kinds"]),
                threshold=float(npz["threshold"]),
                threshold_auto=bool(npz["threshold_auto"]),
                prefix_kinds=tuple(payload["prefix_tokens"]),
                num_images=int(npz["num_images"]),
                grid_size=(h, w),
            )
            images, maps = (), None
            if "image_names" in npz:
                images = tuple(str(name) for name in npz["image_names"])
                maps = TokenImageMaps(
                    layer=int(npz["image_layer"]),
                    query=str(npz["image_query"]),
                    **{name: npz[f"image_{name}"] for name in _IMAGE_ARRAYS},
                )
        return cls(norms, payload["source"], payload["data"], tuple(payload["prefix_tokens"]), images, maps)


def token_norms_for(
    vit: ViT,
    dataset: ImageDataset,
    *,
    layers: Sequence[int] | None = None,
    threshold: float | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
    total: int | None = None,
    offset: int = 0,
) -> TokenNorms:
    """One pass over ``dataset``: block outputs (and, with a threshold, attention and the input patch embeddings
    ``vit.model.patch_embed(x)``) of ``layers`` into TokenNorms. Under torchrun each rank streams its shard and the
    accumulators are all-reduced before the result, so every rank returns the single process's numbers."""
    import contextlib

    import torch

    from vitlens import distributed
    from vitlens.analysis.tokens import TokenNormAccumulator
    from vitlens.attention import capped_batch_size
    from vitlens.data import iterate_batches
    from vitlens.device import resolve_batch_size

    chosen = sorted(set(vit_layers(vit, layers)))
    acc = TokenNormAccumulator(vit.layout, chosen, threshold=threshold)
    dtype = next(vit.model.parameters()).dtype
    batch_size = resolve_batch_size(batch_size, vit.device)
    if threshold is not None:
        batch_size = capped_batch_size(vit, batch_size, dtype=dtype)
    total = len(dataset) if total is None else total
    local = distributed.shard(dataset)  # the whole dataset in a single process
    if local is not dataset and progress is not None:
        progress = distributed.global_progress(progress, len(dataset), offset=offset, grand_total=total)
        offset = 0
    attention = acc.update_attention if threshold is not None else None
    with contextlib.ExitStack() as stack:
        if threshold is not None:  # the patch projection's output, before position embeddings
            handle = vit.model.patch_embed.register_forward_hook(lambda _m, _i, out: acc.update_embeddings(out))
            stack.callback(handle.remove)
        stack.enter_context(torch.inference_mode())
        stack.enter_context(vit.hooks(attention=attention, blocks=acc.update_block, layers=chosen))
        for batch in iterate_batches(local, batch_size=batch_size, device=vit.device):
            vit.features(batch.images.to(dtype))
            if progress is not None:
                progress(offset + int(batch.indices[-1]) + 1, total)
    acc.all_reduce()
    return acc.result()


def token_image_maps_for(
    vit: ViT, dataset: ImageDataset, *, layer: int, threshold: float, batch_size: int | None = None
) -> TokenImageMaps:
    """Per-image token-norm maps and query attention of block ``layer`` (one hooked forward per batch), stacked in
    dataset order; for the few images a user names, so all their ``[B, H, W]`` maps are kept. Under torchrun each
    rank runs its contiguous block of the images and the maps are gathered in dataset order to every rank (the
    threshold is already the whole dataset's), so every rank returns the single process's maps."""
    import dataclasses

    import numpy as np
    import torch

    from vitlens import distributed
    from vitlens.analysis.tokens import TokenImageMaps, token_image_maps
    from vitlens.attention import capped_batch_size
    from vitlens.data import iterate_batches
    from vitlens.device import resolve_batch_size

    dtype = next(vit.model.parameters()).dtype
    batch_size = capped_batch_size(vit, resolve_batch_size(batch_size, vit.device), dtype=dtype)
    captured: dict[str, torch.Tensor] = {}
    parts: list[TokenImageMaps] = []

    def keep_attention(_layer: int, attn: torch.Tensor) -> None:
        captured["attn"] = attn.detach()

    def on_block(_layer: int, tokens: torch.Tensor) -> None:
        maps = token_image_maps(tokens, captured.pop("attn"), vit.layout, threshold=threshold, layer=layer)
        parts.append(maps)

    local = distributed.shard(dataset)  # the whole dataset in a single process
    with torch.inference_mode(), vit.hooks(attention=keep_attention, blocks=on_block, layers=[layer]):
        for batch in iterate_batches(local, batch_size=batch_size, device=vit.device):
            vit.features(batch.images.to(dtype))
    sharded = local is not dataset
    owned = distributed.shard_indices(len(dataset)) if sharded else None  # [n_rank]
    arrays: dict[str, np.ndarray] = {}
    for f in dataclasses.fields(TokenImageMaps):
        if f.name in ("layer", "query"):
            continue
        mine = np.concatenate([getattr(p, f.name) for p in parts]) if parts else np.zeros(0)  # [n_rank, H, W]
        arrays[f.name] = distributed.gather_in_order(mine, owned) if sharded else mine  # [B, H, W]
    # A rank that owned no image has no part to read the query from: name it as token_image_maps does.
    query = parts[0].query if parts else ("cls" if vit.layout.has_class_token else "mean-patch")
    return TokenImageMaps(layer=int(layer), query=query, **arrays)


def vit_layers(vit: ViT, layers: Sequence[int] | None) -> list[int]:
    from vitlens.capture import resolve_layers

    return resolve_layers(layers, vit.depth)


def tokens(
    vit: ViT,
    data: ImageDataset | str | os.PathLike | Sequence[str | os.PathLike],
    *,
    layers: Sequence[int] | None = None,
    norm_threshold: float | str = defaults.TOKENS_NORM_THRESHOLD,
    num_images: int | None = None,
    split: Split = "test",
    images: ImageDataset | str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    image_layer: int = defaults.TOKENS_IMAGE_LAYER,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> TokensResult:
    """Token norms of the residual stream, high-norm outlier tokens and attention sinks (Darcet et al. 2023).

    For every image and chosen layer, the L2 norm of every token after the block (before the final norm) is counted
    on fixed log-spaced bins (64 per decade, so quantiles are within 3.7 %; mean and maximum are exact), separately
    for patch tokens and each prefix kind. Patch tokens above the threshold are outliers: per layer the fraction
    of them, the fraction of images with one, and how often each grid position is one. Sink shares: the share of
    the class query's (and of the mean patch query's) attention, head-averaged, that lands on outliers, registers
    and the class token. Redundant patches: per layer, the mean over its outlier patches (and over its other
    patches) of a patch's mean cosine similarity, in the input patch embedding ``vit.model.patch_embed(x)``, to its
    4-neighbours on the grid (NaN where there are none). Streaming: memory does not grow with the number of
    images; results do not depend on ``batch_size``.

    ``norm_threshold="auto"`` needs the last layer's distribution first, so it costs two passes over the images
    (the first collects norms only); a number takes one. The auto rule
    (:func:`vitlens.analysis.tokens.auto_threshold`): the geometric middle of the widest run of empty bins
    (under 1e-4 of the tokens each), at least half a decade wide, above the median patch norm of the last chosen
    layer; no such gap means no outliers (threshold infinite, ``null`` in JSON).

    Args:
        vit: the model (:func:`vitlens.load`).
        data: an :class:`~vitlens.data.ImageDataset`, used whole, or a data spec opened with ``split`` and
            ``num_images``.
        layers: 0-based layers (negative from the end); all when None.
        norm_threshold: ``"auto"`` or a positive number.
        num_images: with a data spec, a stratified subset of this many images (default 128).
        split: with a data spec, ``train``, ``test`` or ``all``.
        images: also show these images one by one (files, a folder, a data spec or a dataset, as
            :func:`vitlens.rollout` takes them): in block ``image_layer``, each patch token's norm (outliers by the
            threshold found over ``data``) and the query's attention with and without the outlier keys
            (:func:`~vitlens.analysis.tokens.token_image_maps`). None for none. Under torchrun, like ``data``, they
            are sharded across the ranks and their maps gathered in dataset order to every rank.
        image_layer: the block of the per-image maps, 0-based (negative from the end); default the last.
        batch_size: images per forward pass; None for the device's default.
        progress: called as ``progress(done, total)``; with ``auto`` ``total`` counts both passes.

    Raises:
        ParameterError: a bad ``norm_threshold``, ``layers``, ``num_images``, ``split``, ``images``, ``image_layer``
            or ``batch_size``.
        VitlensError: an unknown data spec, no image could be read, or NaN/inf block outputs.
    """
    import dataclasses

    from vitlens.analysis.tokens import auto_threshold
    from vitlens.data import ImageDataset, open_dataset

    threshold = _check_threshold(norm_threshold)
    if num_images is not None and num_images < 1:
        raise ParameterError("num_images", f"num_images must be a positive number, not {num_images}")
    if batch_size is not None and batch_size < 1:
        raise ParameterError("batch_size", f"batch_size must be at least 1, not {batch_size}")
    vit_layers(vit, layers)  # ParameterError before any image is read
    if isinstance(image_layer, bool) or not isinstance(image_layer, int) or not -vit.depth <= image_layer < vit.depth:
        raise ParameterError(
            "image_layer",
            f"image_layer must be a layer of the model (-{vit.depth}..{vit.depth - 1}), not {image_layer!r}",
        )
    shown = None
    if images is not None:
        from vitlens.definitions.rollout import open_images

        shown = images if isinstance(images, ImageDataset) else open_images(vit, images)
        photos = tuple(shown.load_pil(i) for i in range(len(shown)))  # one-line error for a file that is no image
    if not isinstance(data, ImageDataset):
        if num_images is None:
            num_images = defaults.TOKENS_NUM_IMAGES
        data = open_dataset(data, vit.preprocess, split=split, num_images=num_images)
    elif num_images is not None:
        raise ParameterError(
            "num_images", "num_images applies to a data spec; a dataset is used whole (open it with num_images=)"
        )
    n = len(data)
    opts = dict(layers=layers, batch_size=batch_size, progress=progress)
    if threshold is None:  # auto: first pass for the last layer's distribution
        if progress is not None:
            progress(0, 2 * n)
        first = token_norms_for(vit, data, **opts, total=2 * n)
        picked = auto_threshold(first.histograms[first.kind("patch"), -1], first.bin_edges)
        norms = token_norms_for(vit, data, **opts, threshold=picked, total=2 * n, offset=n)
        norms = dataclasses.replace(norms, threshold_auto=True)
    else:
        if progress is not None:
            progress(0, n)
        norms = token_norms_for(vit, data, **opts, threshold=threshold)
    if shown is None:
        return TokensResult(norms, vit.source, data.spec, tuple(vit.layout.prefix_kinds))
    layer = image_layer % vit.depth
    maps = token_image_maps_for(vit, shown, layer=layer, threshold=norms.threshold, batch_size=batch_size)
    return TokensResult(norms, vit.source, data.spec, tuple(vit.layout.prefix_kinds), tuple(shown.names), maps, photos)


def _check_threshold(value: float | str) -> float | None:
    """None for auto, else the positive finite number."""
    import math

    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return None
        try:
            value = float(text)
        except ValueError:
            raise ParameterError(
                "norm_threshold", f"norm_threshold must be 'auto' or a positive number, not {value!r}"
            ) from None
    if isinstance(value, bool) or not math.isfinite(float(value)) or float(value) <= 0:
        raise ParameterError("norm_threshold", f"norm_threshold must be 'auto' or a positive number, not {value!r}")
    return float(value)


def _section(run: Any) -> TokensResult:
    dataset = run.open(run.data, split=run.split, num_images=run.num_images)
    return tokens(run.vit, dataset, images=run.open_images(), batch_size=run.batch_size)


DEFINITION = register(
    Definition(
        name="tokens",
        title="token norms and outliers",
        paper="Darcet et al. 2023, Vision Transformers Need Registers",
        result=TokensResult,
        compute=tokens,
        section=_section,
        needs_data=True,
        order=35,
        command="vitlens.cli.tokens:tokens",
    )
)
