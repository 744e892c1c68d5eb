"""cka: linear CKA between the layers of one model or of two (Kornblith et al. 2019; minibatch estimator of Nguyen,
Raghu & Kornblith 2021)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from vitlens import defaults
from vitlens.errors import ParameterError, VitlensError
from vitlens.registry import Definition, register
from vitlens.result import Result

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    import torch
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from vitlens.analysis.cka import CKA
    from vitlens.attention import Progress
    from vitlens.data import ImageDataset, Split
    from vitlens.models.vit import ViT

CKATokens = Literal["cls", "mean-patch", "all"]
TOKENS: tuple[str, ...] = ("cls", "mean-patch", "all")
_ARRAYS = ("matrix", "layers_a", "layers_b", "hsic_ab", "hsic_aa", "hsic_bb")


@dataclass(frozen=True, eq=False, repr=False)
class CKAResult(Result):
    """Linear CKA between every chosen layer of model A and every chosen layer of model B (or of A with itself).

    Attributes:
        cka: the numbers (:class:`~vitlens.analysis.cka.CKA`): ``cka.matrix [La, Lb]``.
        sources: the model(s) it came from: one, or A then B.
        data: the data spec of the images (:attr:`vitlens.data.ImageDataset.spec`, as model A opened it).
        prefix_tokens: the kinds of the prefix tokens of each model in sequence order (one tuple per source).
    """

    cka: CKA
    sources: tuple[str, ...]
    data: str
    prefix_tokens: tuple[tuple[str, ...], ...] = ()

    analysis = "cka"
    stem = "cka"

    def to_dict(self) -> dict[str, Any]:
        c = self.cka
        return {
            "sources": list(self.sources),
            "data": self.data,
            "tokens": c.tokens,
            "num_images": c.num_images,
            "minibatch_size": c.minibatch_size,
            "num_minibatches": c.num_minibatches,
            "layers_a": [int(v) for v in c.layers_a],
            "layers_b": [int(v) for v in c.layers_b],
            "cka": [[float(v) for v in row] for row in c.matrix],
            "matrix_file": f"{self.stem}.npz",
            "prefix_tokens": list(self.prefix_tokens[0]) if self.prefix_tokens else [],
            **({"prefix_tokens_b": list(self.prefix_tokens[1])} if len(self.prefix_tokens) > 1 else {}),
        }

    def summary(self) -> str:
        import numpy as np

        c = self.cka
        if len(self.sources) == 2:
            n = min(len(c.layers_a), len(c.layers_b))
            head = f"mean diagonal CKA {float(np.mean(np.diagonal(c.matrix)[:n])):.3f} (layer i of A with layer i of B)"
        elif len(c.layers_a) > 1:
            head = f"mean CKA of adjacent layers {float(np.mean(np.diagonal(c.matrix, offset=1))):.3f}"
        else:
            head = "one layer: CKA 1"
        return (
            f"{head}; {len(c.layers_a)} x {len(c.layers_b)} layers, {c.tokens} tokens, {c.num_images} images in "
            f"{c.num_minibatches} minibatch{'es' if c.num_minibatches > 1 else ''} of {c.minibatch_size}"
        )

    def key_numbers(self) -> dict[str, Any]:
        import numpy as np

        c = self.cka
        return {
            "data": self.data,
            "num_images": c.num_images,
            "tokens": c.tokens,
            "cka_first_last": float(c.matrix[0, -1]),
            "cka_adjacent_mean": float(np.mean(np.diagonal(c.matrix, offset=1))) if len(c.layers_b) > 1 else 1.0,
        }

    def plot(self, ax: Axes | None = None) -> Axes:
        from vitlens.plotting.cka import plot_cka

        return plot_cka(self.cka, ax=ax, labels=self._labels())

    def figure(self) -> Figure:
        from vitlens.plotting.cka import cka_figure

        return cka_figure(self.cka, labels=self._labels())

    def _labels(self) -> tuple[str, str]:
        if len(self.sources) == 1:
            return f"layer of {self.sources[0]}", f"layer of {self.sources[0]}"
        return f"layer of {self.sources[0]} (A)", f"layer of {self.sources[1]} (B)"

    def _write(self, out: Path, fmt: str, payload: dict[str, Any]) -> list[Path]:
        import numpy as np

        from vitlens.io import ensure_out_dir, write_json, write_npz, write_text
        from vitlens.plotting.style import save_figure

        c = self.cka
        fig = self.figure()
        out = ensure_out_dir(out)
        header = "layer_a," + ",".join(f"layer_b_{int(q)}" for q in c.layers_b)
        rows = [header] + [
            f"{int(p)}," + ",".join(repr(float(v)) for v in c.matrix[r]) for r, p in enumerate(c.layers_a)
        ]
        return [
            write_npz(
                out / "cka.npz",
                **{name: getattr(c, name) for name in _ARRAYS},
                num_images=np.int64(c.num_images),
                minibatch_size=np.int64(c.minibatch_size),
                num_minibatches=np.int64(c.num_minibatches),
            ),
            write_json(out / "cka.json", payload),
            write_text(out / "cka.csv", "\n".join(rows) + "\n"),
            save_figure(fig, out / f"cka.{fmt}", fmt=fmt),  # type: ignore[arg-type]
        ]

    @classmethod
    def _read(cls, folder: Path, payload: dict[str, Any]) -> CKAResult:
        import numpy as np

        from vitlens.analysis.cka import CKA

        with np.load(folder / "cka.npz", allow_pickle=False) as npz:
            cka = CKA(
                **{name: npz[name] for name in _ARRAYS},
                tokens=str(payload["tokens"]),
                num_images=int(npz["num_images"]),
                minibatch_size=int(npz["minibatch_size"]),
                num_minibatches=int(npz["num_minibatches"]),
            )
        prefix = [tuple(payload["prefix_tokens"])]
        if "prefix_tokens_b" in payload:
            prefix.append(tuple(payload["prefix_tokens_b"]))
        return cls(cka, tuple(payload["sources"]), payload["data"], tuple(prefix))


def _pick(vit: ViT, tokens: str) -> Any:
    """The function that turns a block output ``[B, N, D]`` into the rows CKA compares, ``[B, R, D]``."""
    layout = vit.layout
    if tokens == "cls":
        cls_index = layout.token_index("cls")
        return lambda x: x[:, cls_index : cls_index + 1]  # [B, 1, D]
    if tokens == "mean-patch":
        return lambda x: x[:, layout.patch_slice].mean(dim=1, keepdim=True)  # [B, 1, D]
    return lambda x: x[:, layout.patch_slice]  # [B, H*W, D], row-major grid order


def _rows_per_image(vit: ViT, tokens: str) -> int:
    return vit.layout.num_patches if tokens == "all" else 1


class _BlockRows:
    """Hooked forwards of one model: each batch's chosen block outputs, reduced to rows, stacked ``[L, B, R, D]``."""

    def __init__(self, vit: ViT, layers: list[int], tokens: str) -> None:
        self.vit, self.layers, self.pick = vit, layers, _pick(vit, tokens)
        self.dtype = next(vit.model.parameters()).dtype
        self._rows: dict[int, torch.Tensor] = {}

    def on_block(self, layer: int, out: torch.Tensor) -> None:
        self._rows[layer] = self.pick(out)  # reduced at once: the full [B, N, D] output is not kept

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        self._rows.clear()
        self.vit.features(images.to(self.vit.device, self.dtype))
        return torch.stack([self._rows[layer] for layer in self.layers])  # [L, B, R, D]


def cka_for(
    vit: ViT,
    dataset: ImageDataset,
    vit_b: ViT | None = None,
    dataset_b: ImageDataset | None = None,
    *,
    tokens: CKATokens,
    layers: Sequence[int] | None = None,
    layers_b: Sequence[int] | None = None,
    minibatch_size: int,
    batch_size: int | None = None,
    progress: Progress | None = None,
    space: str = "auto",
) -> CKA:
    """One pass over the images: ``vit`` (and ``vit_b``, in lockstep on ``dataset_b``, the same images by index)
    hooked at the chosen blocks, their rows streamed into a :class:`~vitlens.analysis.cka.CKAAccumulator`.

    Under torchrun each rank takes whole minibatches (contiguous blocks of ``minibatch_size`` images, the
    incomplete last one with the last of them), so its minibatches are the single process's, and the HSIC sums
    are all-reduced: every rank returns the single process's matrix."""
    import contextlib

    import torch

    from vitlens import distributed
    from vitlens.analysis.cka import CKAAccumulator
    from vitlens.capture import resolve_layers
    from vitlens.data import iterate_batches
    from vitlens.device import resolve_batch_size
    from vitlens.log import logger

    chosen_a = resolve_layers(layers, vit.depth)
    chosen_b = chosen_a if vit_b is None else _layers_b(vit_b, layers_b)
    rows = _rows_per_image(vit, tokens)
    acc = CKAAccumulator(
        len(chosen_a),
        vit.embed_dim,
        None if vit_b is None else len(chosen_b),
        None if vit_b is None else vit_b.embed_dim,
        minibatch_size=min(minibatch_size, len(dataset)),
        rows_per_image=rows,
        space=space,  # type: ignore[arg-type]
    )
    batch_size = resolve_batch_size(batch_size, vit.device)
    total = len(dataset)
    dataset = distributed.shard(dataset, block=acc.minibatch_size)  # itself in a single process
    if dataset_b is not None:
        dataset_b = distributed.shard(dataset_b, block=acc.minibatch_size)
    progress = distributed.global_progress(progress, total)
    shared = vit_b is not None and vit_b.model is vit.model  # one module: hook it once, for both layer lists
    hooked_a = sorted(set(chosen_a) | set(chosen_b)) if shared else chosen_a
    model_a = _BlockRows(vit, hooked_a, tokens)
    model_b = None if vit_b is None else model_a if shared else _BlockRows(vit_b, chosen_b, tokens)
    pick_a = [hooked_a.index(p) for p in chosen_a]
    pick_b = [hooked_a.index(q) for q in chosen_b] if shared else list(range(len(chosen_b)))
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        stack.enter_context(vit.hooks(blocks=model_a.on_block, layers=hooked_a))
        batches_b: Any = None
        if vit_b is not None and dataset_b is not None:
            if not shared:
                stack.enter_context(vit_b.hooks(blocks=model_b.on_block, layers=chosen_b))  # type: ignore[union-attr]
            batches_b = iterate_batches(dataset_b, batch_size=batch_size, device=vit_b.device)
        for batch in iterate_batches(dataset, batch_size=batch_size, device=vit.device):
            rows_a = model_a(batch.images)[pick_a]  # [La, B, R, D]
            rows_b = None
            if batches_b is not None and model_b is not None:
                batch_b = next(batches_b, None)
                if batch_b is None or not torch.equal(batch_b.indices.cpu(), batch.indices.cpu()):
                    raise VitlensError("model B's images are not model A's (an image was read for one model only)")
                rows_b = model_b(batch_b.images)[pick_b].to(rows_a.device)  # [Lb, B, R, D]
            acc.update(rows_a, rows_b)
            if progress is not None:
                progress(int(batch.indices[-1]) + 1, len(dataset))
    pending = distributed.all_reduce_sum(acc.pending)  # the incomplete last minibatch is on one rank only
    acc.all_reduce()
    if pending and acc.num_minibatches and distributed.is_main():
        logger.warning(
            f"CKA: the last {pending} image(s) do not fill a minibatch of {acc.minibatch_size} and are left out "
            "(choose num_images as a multiple of minibatch_size to use them all)"
        )
    return acc.result(chosen_a, chosen_b, tokens)


def _layers_b(vit_b: ViT, layers_b: Sequence[int] | None) -> list[int]:
    from vitlens.capture import resolve_layers

    try:
        return resolve_layers(layers_b, vit_b.depth)
    except ParameterError as e:
        raise ParameterError("layers_b", str(e).replace("layers:", "layers_b:", 1)) from None


def _for_model(dataset: ImageDataset, vit: ViT) -> ImageDataset:
    """The same images as ``dataset``, in the same order, with ``vit``'s preprocessing."""
    return dataset.with_preprocess(vit.preprocess)


def check_tokens(vit: ViT, vit_b: ViT | None, tokens: str) -> None:
    """ParameterError for a ``tokens`` choice the model(s) cannot give."""
    if tokens not in TOKENS:
        raise ParameterError("tokens", f"tokens must be one of {', '.join(TOKENS)}, not {tokens!r}")
    for name, model in (("model A", vit), ("model B", vit_b)):
        if model is not None and tokens == "cls" and not model.layout.has_class_token:
            raise ParameterError(
                "tokens", f"tokens 'cls' needs a class token and {name} ({model.source}) has none: use mean-patch"
            )
    if vit_b is not None and tokens == "all" and vit.layout.grid_size != vit_b.layout.grid_size:
        (ha, wa), (hb, wb) = vit.layout.grid_size, vit_b.layout.grid_size
        raise ParameterError(
            "tokens",
            f"tokens 'all' pairs patches by grid position, and the grids differ ({ha}x{wa} and {hb}x{wb}): "
            "use cls or mean-patch",
        )


def cka(
    vit: ViT,
    data: ImageDataset | str | os.PathLike | Sequence[str | os.PathLike],
    vit_b: ViT | None = None,
    *,
    tokens: CKATokens = defaults.CKA_TOKENS,  # type: ignore[assignment]
    layers: Sequence[int] | None = None,
    layers_b: Sequence[int] | None = None,
    minibatch_size: int = defaults.CKA_MINIBATCH_SIZE,
    num_images: int | None = None,
    split: Split = "test",
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> CKAResult:
    """Linear CKA between every pair of layers (block outputs) of one model, or of ``vit`` and ``vit_b``.

    Linear CKA (Kornblith et al. 2019) compares two representations of the same images through their linear
    kernels; it is invariant to orthogonal transforms and isotropic scaling of either. vitlens uses the minibatch
    estimator of Nguyen, Raghu & Kornblith 2021 (Eq. 3): the images, in dataset order, are cut into consecutive
    minibatches of ``minibatch_size``; in each, the unbiased HSIC (Song et al. 2012) of every (layer of A, layer of
    B) pair and of every layer with itself; CKA is the ratio of their sums. The estimate therefore depends on the
    minibatch size (it is recorded); one minibatch as large as the data gives the full-data unbiased estimate. A
    last minibatch smaller than ``minibatch_size`` is left out (with a warning), unless it is the only one. Memory
    is one minibatch's worth (Gram matrices or ``d x d`` feature moments, whichever is cheaper), never all images'
    features; results do not depend on ``batch_size``.

    Both models see the same images in the same order, each with its own preprocessing (a spec is opened once
    per model; a dataset is re-read with model B's preprocessing), and every batch is checked to hold the same
    image indices. Without ``vit_b`` the matrix is the model with itself: symmetric, with ones on the diagonal.

    Args:
        vit: model A (:func:`vitlens.load`).
        data: an :class:`~vitlens.data.ImageDataset`, used whole, or a data spec opened with ``split`` and
            ``num_images``.
        vit_b: model B; None compares ``vit`` with itself.
        tokens: the rows compared: ``cls`` (the class token), ``mean-patch`` (the mean of the patch tokens) or
            ``all`` (every patch token of every image is a row; needs the same grid in both models).
        layers: 0-based blocks of A (negative from the end); all when None.
        layers_b: the same for B (all when None); ignored without ``vit_b``.
        minibatch_size: images per minibatch, at least 4 (the unbiased HSIC needs 4 rows).
        num_images: with a data spec, a stratified subset of this many images (default 256).
        split: with a data spec, ``train``, ``test`` or ``all``.
        batch_size: images per forward pass; None for the device's default.
        progress: called as ``progress(done, total)``.

    Raises:
        ParameterError: a bad ``tokens`` (also ``cls`` on a model without a class token, ``all`` across different
            grids), ``layers``, ``layers_b``, ``minibatch_size``, ``num_images``, ``split`` or ``batch_size``.
        VitlensError: an unknown data spec, no image could be read, or NaN/inf block outputs.
    """
    from vitlens.capture import resolve_layers
    from vitlens.data import ImageDataset, open_dataset

    check_tokens(vit, vit_b, tokens)
    if isinstance(minibatch_size, bool) or not isinstance(minibatch_size, int) or minibatch_size < 4:
        raise ParameterError(
            "minibatch_size",
            f"minibatch_size must be an integer of at least 4 (the unbiased HSIC needs 4 rows), not {minibatch_size}",
        )
    if num_images is not None and num_images < 1:
        raise ParameterError("num_images", f"num_images must be a positive number, not {num_images}")
    if batch_size is not None and batch_size < 1:
        raise ParameterError("batch_size", f"batch_size must be at least 1, not {batch_size}")
    resolve_layers(layers, vit.depth)  # ParameterErrors before any image is read
    if vit_b is not None:
        _layers_b(vit_b, layers_b)
    if not isinstance(data, ImageDataset):
        if num_images is None:
            num_images = defaults.CKA_NUM_IMAGES
        dataset = open_dataset(data, vit.preprocess, split=split, num_images=num_images)
        dataset_b = None if vit_b is None else open_dataset(data, vit_b.preprocess, split=split, num_images=num_images)
    elif num_images is not None:
        raise ParameterError(
            "num_images", "num_images applies to a data spec; a dataset is used whole (open it with num_images=)"
        )
    else:
        dataset = data
        dataset_b = None if vit_b is None else _for_model(data, vit_b)
    if dataset_b is not None and dataset_b.names != dataset.names:
        raise VitlensError("model B's data spec opened other images than model A's")
    if progress is not None:
        progress(0, len(dataset))
    result = cka_for(
        vit,
        dataset,
        vit_b,
        dataset_b,
        tokens=tokens,
        layers=layers,
        layers_b=layers_b,
        minibatch_size=minibatch_size,
        batch_size=batch_size,
        progress=progress,
    )
    models = (vit,) if vit_b is None else (vit, vit_b)
    prefix = tuple(tuple(m.layout.prefix_kinds) for m in models)
    return CKAResult(result, tuple(m.source for m in models), dataset.spec, prefix)


def _section(run: Any) -> CKAResult:
    dataset = run.open(run.data, split=run.split, num_images=run.num_images)
    return cka(run.vit, dataset, tokens="mean-patch", batch_size=run.batch_size)


DEFINITION = register(
    Definition(
        name="cka",
        title="layer similarity (CKA)",
        paper="Kornblith et al. 2019; minibatch CKA of Nguyen, Raghu & Kornblith 2021",
        result=CKAResult,
        compute=cka,
        section=_section,
        needs_data=True,
        order=55,
        command="vitlens.cli.cka:cka",
    )
)
