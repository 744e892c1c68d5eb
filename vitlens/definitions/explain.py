"""explain: class-specific relevance maps of images (gradient-weighted rollout, Chefer et al. 2021 attribution)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitlens import defaults, distributed
from vitlens.definitions.rollout import _check_count, open_images, unique_stems
from vitlens.errors import NotApplicable, ParameterError, VitlensError
from vitlens.registry import Definition, register
from vitlens.result import Result, check_image_index, int_pair

if TYPE_CHECKING:
    import numpy as np
    import torch
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from PIL import Image
    from torch import nn

    from vitlens.analysis.explain import ExplainMethod, Explanation
    from vitlens.analysis.faithfulness import Faithfulness
    from vitlens.data import ImageDataset
    from vitlens.models.vit import ViT

Progress = Callable[[int, int], None]  # progress(done_images, total_images)
COSINE = "cosine:"


# ---------------------------------------------------------------------------------------------- options
def check_options(method: Any, discard_ratio: Any, class_: Any, score: Any) -> None:
    """Check the options that need no model (the CLI calls this before loading one).

    Raises:
        ParameterError: an unknown method, a discard ratio outside [0, 1) or given to a method without one, a class
            that is not ``pred``, an index or a name, a score that is not ``logit`` or ``cosine:IMAGE``, or a class
            with a cosine score.
    """
    from vitlens.analysis.explain import check_method

    check_method(method, discard_ratio)
    if not isinstance(score, str) or not (score == "logit" or (score.startswith(COSINE) and len(score) > len(COSINE))):
        raise ParameterError("score", f"score must be 'logit' or 'cosine:IMAGE', not {score!r}")
    if class_ is not None and (isinstance(class_, bool) or not isinstance(class_, int | str)):
        raise ParameterError("class_", f"class_ must be 'pred', a class index or a class name, not {class_!r}")
    if score != "logit" and class_ not in (None, "pred"):
        raise ParameterError(
            "class_", f"class_ {class_!r} applies to logit scores; with score {score!r} there is no class to pick"
        )


def class_indices(logits: torch.Tensor, class_: int | str | None, class_names: Sequence[str] | None) -> torch.Tensor:
    """The class explained per image ``[B]``: the predicted one (None or ``"pred"``), an index, or a class name.

    Raises:
        ParameterError: an index out of range, an unknown name, or a name for a model without class names.
    """
    import torch

    num_classes = logits.shape[-1]
    if class_ is None or class_ == "pred":
        return logits.detach().argmax(dim=-1)
    if isinstance(class_, str) and class_.isdigit():
        class_ = int(class_)
    if isinstance(class_, str):
        if not class_names:
            raise ParameterError(
                "class_", f"class_ {class_!r} is a name, but the model has no class names: give an index"
            )
        if class_ not in class_names:
            shown = ", ".join(class_names[:10]) + (", ..." if len(class_names) > 10 else "")
            raise ParameterError("class_", f"class_ {class_!r} is not one of the model's classes ({shown})")
        class_ = list(class_names).index(class_)
    if not 0 <= class_ < num_classes:
        raise ParameterError("class_", f"class_ {class_} is out of range: the model has {num_classes} classes")
    return torch.full((logits.shape[0],), class_, dtype=torch.int64, device=logits.device)


def _check_head(vit: ViT, class_: Any, score: str) -> None:
    """A logit score needs a classifier head; a backbone is explained along a reference image's feature instead."""
    if score != "logit" or vit.num_classes > 0:
        return
    if class_ in (None, "pred"):
        raise ParameterError(
            "score",
            "score must be 'cosine:IMAGE' for a model without a classifier head (num_classes 0): there is no class "
            "to explain, but the pooled feature's cosine similarity to a reference image's can be",
        )
    raise ParameterError(
        "class_",
        f"class_ {class_!r} needs a classifier head and this model has none (num_classes 0): explain it with score "
        "'cosine:IMAGE' instead",
    )


# ---------------------------------------------------------------------------------------------- driver
@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters' ``requires_grad`` off inside the block, restored after (also when it raises).

    Gradients are taken with respect to the input only, so the graph keeps no activations for weight gradients and
    no ``.grad`` is ever written to a parameter.
    """
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, saved, strict=True):
            p.requires_grad_(flag)


def reference_feature(vit: ViT, image: str | os.PathLike) -> torch.Tensor:
    """The pooled feature ``[1, embed_dim]`` (what a classifier head would see) of one reference image.

    Raises:
        VitlensError: the image cannot be read.
    """
    import torch

    from vitlens.data import open_dataset

    dataset = open_dataset([image], vit.preprocess)
    item = dataset[0]
    if item is None:
        raise VitlensError(f"the reference image {image} cannot be read as an image")
    dtype = next(vit.model.parameters()).dtype
    with torch.no_grad():
        return vit.pre_logits(vit.features(item[0][None].to(vit.device, dtype)))  # [1, D]


def explain_batch(
    vit: ViT,
    images: torch.Tensor,
    *,
    method: ExplainMethod,
    target: str,
    class_: int | str | None = None,
    reference: torch.Tensor | None = None,
    discard_ratio: float = 0.0,
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """One batch's maps ``[B, H, W]`` (max 1), classes ``[B]`` (-1 for a cosine score) and scores ``[B]``.

    The score of image ``b`` is its class logit (pre-softmax) or, with ``reference`` ``[1, D]``, the cosine similarity
    of its pooled feature to the reference's. Gradients come from one backward pass of ``sum_b score_b``: images do
    not interact in an eval-mode ViT (layer norm is per token), so each image's gradient is its own. Only the layers
    the method reads run the explicit attention path (all for the propagating methods, the last for
    ``last-layer``, none is differentiated for ``rollout``); the others keep the fused kernel.
    """
    import torch
    import torch.nn.functional as F

    from vitlens.analysis.explain import GRADIENT_METHODS, ExplainAccumulator

    gradient = method in GRADIENT_METHODS
    layers = [vit.depth - 1] if method == "last-layer" else list(range(vit.depth))
    acc = ExplainAccumulator(vit.layout, method=method, discard_ratio=discard_ratio)
    captured: list[torch.Tensor] = []  # [B, heads, N, N] per layer, still in the graph

    def on_attention(layer: int, attn: torch.Tensor) -> None:
        if gradient:
            captured.append(attn)
        else:
            acc.update(layer, attn, None)  # rollout: reduce at once, nothing to differentiate

    if method == "last-layer":  # the last block's attention gradient alone: no graph of the layers before it
        from vitlens.capture import graph_from

        grad_mode = graph_from(vit, layers[0])
    else:
        grad_mode = torch.enable_grad() if gradient else torch.no_grad()
    with frozen_parameters(vit.model), grad_mode, vit.hooks(attention=on_attention, layers=layers):
        # [B, C, H, W]: the only leaf that asks for a gradient (last-layer: the last block's input, graph_from)
        x = images.detach().requires_grad_(gradient and method != "last-layer")
        if reference is None:
            logits = vit.model(x)  # [B, num_classes]
            classes = class_indices(logits, class_, vit.class_names)  # [B]
            scores = logits.gather(1, classes[:, None])[:, 0]  # [B]
        else:
            pooled = vit.pre_logits(vit.features(x))  # [B, D]
            scores = F.cosine_similarity(pooled, reference.to(pooled.dtype), dim=-1)  # [B]
            classes = torch.full_like(scores, -1, dtype=torch.int64)
        if not bool(torch.isfinite(scores).all()):
            raise VitlensError("the model's scores are NaN/inf (NaN weights, or an overflow): nothing to explain")
        if gradient:
            grads = list(torch.autograd.grad(scores.sum(), captured, allow_unused=True))
            for i, layer in enumerate(layers):
                # A layer the score does not depend on has no gradient: its relevance is zero.
                grad = grads[i] if grads[i] is not None else torch.zeros_like(captured[i])
                acc.update(layer, captured[i].detach(), grad)
                grads[i] = captured[i] = None  # type: ignore[call-overload]  # free each layer once reduced
    return acc.maps(target), classes.detach(), scores.detach()


def explain_for(
    vit: ViT,
    dataset: ImageDataset,
    *,
    method: ExplainMethod = defaults.EXPLAIN_METHOD,  # type: ignore[assignment]
    target: str = "cls",
    class_: int | str | None = None,
    score: str = defaults.EXPLAIN_SCORE,
    discard_ratio: float = defaults.EXPLAIN_DISCARD_RATIO,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> Explanation:
    """Relevance maps of every image of ``dataset``, batch by batch (:func:`explain_batch`); see :func:`explain`.

    Memory: for the gradient methods the autograd graph keeps every captured layer's attention of one batch until
    the backward pass, so the batch is cut to keep ``depth`` maps under the attention budget of
    :func:`vitlens.attention.default_attention_budget`. The results do not depend on the batch size.
    """
    import numpy as np
    import torch

    from vitlens.analysis.explain import GRADIENT_METHODS, Explanation
    from vitlens.analysis.rollout import resolve_target
    from vitlens.attention import _require_all, capped_batch_size, default_attention_budget
    from vitlens.data import iterate_batches
    from vitlens.device import resolve_batch_size

    check_options(method, discard_ratio, class_, score)
    _check_head(vit, class_, score)
    resolve_target(target, vit.layout)
    reference = None if score == "logit" else reference_feature(vit, score[len(COSINE) :])
    dtype = next(vit.model.parameters()).dtype
    budget = default_attention_budget(vit.device)
    if method in GRADIENT_METHODS:
        budget = max(1, budget // (1 if method == "last-layer" else vit.depth))
    size = capped_batch_size(vit, resolve_batch_size(batch_size, vit.device), dtype=dtype, budget_bytes=budget)
    maps: list[np.ndarray] = []
    classes: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    full = dataset
    progress = distributed.global_progress(progress, len(full))  # None on ranks other than 0
    dataset = distributed.shard(full)  # this rank's contiguous block; the whole dataset in a single process
    total, seen = len(dataset), 0
    if progress is not None:
        progress(0, total)
    opts = {"method": method, "target": target, "class_": class_, "reference": reference}
    for batch in iterate_batches(dataset, batch_size=size, device=vit.device):
        part, cls, sc = explain_batch(vit, batch.images.to(dtype), discard_ratio=discard_ratio, **opts)
        maps.append(part)
        classes.append(cls.cpu())
        scores.append(sc.cpu())
        seen += batch.images.shape[0]
        if progress is not None:
            progress(int(batch.indices[-1]) + 1, total)
    _require_all(seen, dataset)
    # Under torchrun every rank's maps, classes and scores, gathered in dataset order to every rank (as rollout's).
    owned = distributed.shard_indices(len(full))  # [n_rank]; every index in a single process
    maps_all = distributed.gather_in_order(np.concatenate(maps) if maps else np.zeros(0, np.float32), owned)
    classes_all = distributed.gather_in_order(torch.cat(classes).numpy() if classes else np.zeros(0, np.int64), owned)
    scores_all = distributed.gather_in_order(
        torch.cat(scores).to(torch.float64).numpy() if scores else np.zeros(0), owned
    )
    return Explanation(
        maps=maps_all,  # [B, H, W]
        classes=classes_all.astype(np.int64),  # [B]
        scores=scores_all.astype(np.float64),  # [B]
        method=method,
        target=target,
        discard_ratio=float(discard_ratio),
        num_layers=1 if method == "last-layer" else vit.depth,
        grid_size=int_pair(vit.layout.grid_size),
    )


# ---------------------------------------------------------------------------------------------- result
def _label(explanation: Explanation, class_names: tuple[str, ...] | None, index: int) -> str:
    """Image ``index``'s class in words: its name (or index) and score, or the cosine similarity."""
    score = float(explanation.scores[index])
    if int(explanation.classes[index]) < 0:
        return f"cosine {score:.2f}"
    name = class_names[index] if class_names else str(int(explanation.classes[index]))
    return f"{name} ({score:.2f})"


@dataclass(frozen=True, eq=False, repr=False)
class ExplainResult(Result):
    """Class-specific relevance maps of a set of images, with the photos they are drawn over.

    Attributes:
        explanation: the maps ``[B, H, W]`` (each scaled to max 1), the class and score per image and the options
            (:class:`~vitlens.analysis.explain.Explanation`).
        images: each image's name, in the order of the maps.
        stems: each image's file stem under ``explain/``, unique case-insensitively.
        target_defaulted: whether the target was chosen for the model (``cls``, or ``mean-patch`` without a class
            token) rather than asked for.
        class_requested: the ``class_`` asked for: ``"pred"``, an index or a name as given (as text).
        class_names: the name of each image's class, when the model has class names and the score is a logit.
        score: ``"logit"`` or ``"cosine:<reference image>"``.
        source: the model it came from.
        data: the data spec of the images.
        patch_size: ``(ph, pw)`` in pixels.
        prefix_tokens: the prefix token kinds in sequence order (cls, dist, reg).
        photos: the images as the model sees them, for the overlays; None for a result read back by
            :func:`~vitlens.result.load_result` (an init-only argument, not a field, as for
            :class:`~vitlens.definitions.rollout.RolloutResult`).
    """

    explanation: Explanation
    images: tuple[str, ...]
    stems: tuple[str, ...]
    target_defaulted: bool
    class_requested: str
    class_names: tuple[str, ...] | None
    score: str
    source: str
    data: str
    patch_size: tuple[int, int]
    prefix_tokens: tuple[str, ...] = ()
    photos: InitVar[Sequence[Image.Image] | None] = None

    analysis = "explain"
    stem = "explain"

    def __post_init__(self, photos: Sequence[Image.Image] | None) -> None:
        object.__setattr__(self, "photos", None if photos is None else tuple(photos))

    # ---------------------------------------------------------------------------------------------- numbers
    def to_dict(self) -> dict[str, Any]:
        e = self.explanation.to_dict()
        return {
            "images": list(self.images),
            "stems": list(self.stems),
            "method": e.pop("method"),
            "classes": e.pop("classes"),
            "class_names": None if self.class_names is None else list(self.class_names),
            "scores": e.pop("scores"),
            "maps": e.pop("maps"),
            **e,
            "class_requested": self.class_requested,
            "score": self.score,
            "target_defaulted": self.target_defaulted,
            "source": self.source,
            "data": self.data,
            "patch_size": list(self.patch_size),
            "prefix_tokens": list(self.prefix_tokens),
        }

    def summary(self) -> str:
        e = self.explanation
        what = "cosine similarity" if self.score != "logit" else f"class {self.class_requested}"
        return f"{len(self.images)} images, {e.method}, {e.target} token, {what}, mean score {self._mean_score():.3f}"

    def key_numbers(self) -> dict[str, Any]:
        return {
            "num_images": len(self.images),
            "method": self.explanation.method,
            "target": self.explanation.target,
            "mean_score": self._mean_score(),
        }

    def _mean_score(self) -> float:
        import numpy as np

        return float(np.mean(self.explanation.scores))

    # ---------------------------------------------------------------------------------------------- drawing
    def _titles(self) -> list[str]:
        return [
            f"{Path(name).name}: {_label(self.explanation, self.class_names, i)}" for i, name in enumerate(self.images)
        ]

    def plot(self, ax: Axes | None = None, index: int = 0) -> Axes:
        """Draw image ``index``'s relevance map over its photo in grey, or the map alone without photos.

        Raises:
            ParameterError: ``index`` is not the position of one of the images.
        """
        check_image_index(index, len(self.images))
        from vitlens.plotting.explain import plot_explanation

        photo = None if self.photos is None else self.photos[index]
        return plot_explanation(photo, self.explanation.maps[index], ax=ax, title=self._titles()[index])

    def figure(self) -> Figure:
        """The figure the CLI saves as ``explain.<fmt>`` (every image, photo above map), or for one image its
        ``explain/<stem>.<fmt>``; without photos, the grid of maps alone."""
        from vitlens.plotting.explain import explain_figure, explain_grid_figure, explanation_settings

        title = explanation_settings(self.explanation)
        if self.photos is not None and len(self.photos) == 1:
            return explain_figure(self.photos[0], self.explanation.maps[0], self._titles()[0], self.explanation)
        return explain_grid_figure(self.photos, self.explanation.maps, self._titles(), title=title)

    # ---------------------------------------------------------------------------------------------- files
    def _write(self, out: Path, fmt: str, payload: dict[str, Any]) -> list[Path]:
        """explain/<stem>.<fmt> per image, explain.<fmt> (more than one image), explain.npz and explain.json."""
        import numpy as np

        from vitlens.io import ensure_out_dir, write_json, write_npz
        from vitlens.plotting.explain import explain_figure
        from vitlens.plotting.style import save_figure

        if self.photos is None:
            raise VitlensError(
                "this explanation has no photos (it was read back from its files), so its overlays cannot be drawn: "
                "compute it again with vitlens.explain to save it"
            )
        e, titles = self.explanation, self._titles()
        grid = self.figure() if len(self.photos) > 1 else None  # built first: a plotting error leaves no files
        out = ensure_out_dir(out)
        image_dir = ensure_out_dir(out / "explain")
        files = [
            save_figure(explain_figure(photo, m, title, e), image_dir / f"{stem}.{fmt}", fmt=fmt)  # type: ignore[arg-type]
            for photo, m, title, stem in zip(self.photos, e.maps, titles, self.stems, strict=True)
        ]
        if grid is not None:
            files.append(save_figure(grid, out / f"explain.{fmt}", fmt=fmt))  # type: ignore[arg-type]
        files.append(
            write_npz(
                out / "explain.npz",
                maps=e.maps,  # [B, H, W]
                classes=e.classes,  # [B]
                scores=e.scores,  # [B]
                images=np.asarray(list(self.images), dtype=str),
                grid_size=np.asarray(e.grid_size),
            )
        )
        files.append(write_json(out / "explain.json", payload))
        return files

    @classmethod
    def _read(cls, folder: Path, payload: dict[str, Any]) -> ExplainResult | FaithfulnessResult:  # type: ignore[override]
        import numpy as np

        if payload.get("run") == FAITHFULNESS_RUN:  # a faithfulness run shares explain.json (see FaithfulnessResult)
            return FaithfulnessResult._read(folder, payload)

        from vitlens.analysis.explain import Explanation

        with np.load(folder / "explain.npz", allow_pickle=False) as npz:
            maps, classes, scores = npz["maps"], npz["classes"], npz["scores"]
            images = tuple(str(name) for name in npz["images"])
            grid_size = int_pair(npz["grid_size"])
        explanation = Explanation(
            maps=maps,
            classes=classes,
            scores=scores,
            method=payload["method"],
            target=payload["target"],
            discard_ratio=float(payload["discard_ratio"]),
            num_layers=int(payload["num_layers"]),
            grid_size=grid_size,
        )
        names = payload.get("class_names")
        return cls(
            explanation,
            images,
            tuple(payload["stems"]),
            bool(payload["target_defaulted"]),
            str(payload["class_requested"]),
            None if names is None else tuple(names),
            payload["score"],
            payload["source"],
            payload["data"],
            int_pair(payload["patch_size"]),
            tuple(payload.get("prefix_tokens", ())),
        )


# ---------------------------------------------------------------------------------------------- public function
def explain(
    vit: ViT,
    images: ImageDataset | str | os.PathLike | Sequence[str | os.PathLike],
    *,
    method: ExplainMethod = defaults.EXPLAIN_METHOD,  # type: ignore[assignment]
    class_: int | str | None = defaults.EXPLAIN_CLASS,
    score: str = defaults.EXPLAIN_SCORE,
    target: str | None = None,
    discard_ratio: float = defaults.EXPLAIN_DISCARD_RATIO,
    split: str = "test",
    num_images: int | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> ExplainResult:
    """Class-specific relevance of each patch: which parts of the image made the model give this class its score.

    Methods (each on the post-softmax attention ``A_l`` and its gradient ``∇A_l = ∂score/∂A_l`` of every layer):

    - ``attribution`` (default): Chefer, Gur & Wolf 2021, "Generic Attention-model Explainability for Interpreting
      Bi-Modal and Encoder-Decoder Transformers" (ICCV), Eq. 5-6: ``R ← I``; ``R ← R + E_h((∇A_l ⊙ A_l)⁺) · R``;
    - ``grad-rollout``: jacobgil/vit-explain's gradient-weighted rollout, ``max(E_h(A_l ⊙ ∇A_l), 0)`` rolled out
      like attention (``discard_ratio``, ``+ I``, each row divided by its own sum, multiplied through the layers);
    - ``last-layer``: ``E_h((∇A ⊙ A)⁺)`` of the last layer alone;
    - ``rollout``: class-agnostic attention rollout (Abnar & Zuidema 2020), for comparison.

    The map is the ``target`` token's row on the patches, scaled to max 1.

    Args:
        vit: the model (:func:`vitlens.load`).
        images: an :class:`~vitlens.data.ImageDataset`, image files, a folder, or a data spec (as for
            :func:`vitlens.rollout`).
        method: ``attribution``, ``grad-rollout``, ``last-layer`` or ``rollout``.
        class_: the class whose logit is explained: ``"pred"`` (each image's predicted class), an index, or a class
            name (``vit.class_names``). Not with a cosine score.
        score: ``"logit"`` (the class logit before softmax), or ``"cosine:IMAGE"``: the cosine similarity of the
            pooled feature (``vit.pre_logits``) to that reference image's, which explains any backbone, head or not.
        target: the row the map is read from: ``cls``, ``dist``, ``reg:N`` or ``mean-patch``; default ``cls``, or
            ``mean-patch`` for models without a class token.
        discard_ratio: for ``rollout`` and ``grad-rollout``: fraction in [0, 1) of each layer's weakest
            patch-to-patch weights set to 0 (prefix rows and columns, hence the target's, kept).
        split, num_images: with a data spec, as for :func:`vitlens.rollout`.
        batch_size: images per forward pass; None for the device's default. Results do not depend on it.
        progress: called as ``progress(done, total)`` after every batch.

    Returns:
        The maps, classes and scores, with the photos for the overlays.

    Raises:
        ParameterError: a bad option; a class for a model without a head (use a cosine score) or out of range.
        VitlensError: the model has no ``target`` token, or an image cannot be read.
    """
    from vitlens.analysis.rollout import resolve_target
    from vitlens.attention import default_target
    from vitlens.data import ImageDataset

    check_options(method, discard_ratio, class_, score)
    _check_count("num_images", num_images, "be a positive number")
    _check_count("batch_size", batch_size, "be at least 1")
    if num_images is not None and isinstance(images, ImageDataset):
        raise ParameterError(
            "num_images", "num_images applies to a data spec; a dataset is used whole (open it with num_images=)"
        )
    _check_head(vit, class_, score)
    defaulted = target is None
    target = default_target(vit.layout) if target is None else target
    if not isinstance(target, str):
        raise ParameterError("target", f"target must be cls, dist, reg:N or mean-patch, not {target!r}")
    resolve_target(target, vit.layout)
    dataset = (
        images if isinstance(images, ImageDataset) else open_images(vit, images, split=split, num_images=num_images)
    )
    photos = tuple(dataset.load_pil(i) for i in range(len(dataset)))  # one-line error for a file that is no image
    explanation = explain_for(
        vit,
        dataset,
        method=method,
        target=target,
        class_=class_,
        score=score,
        discard_ratio=discard_ratio,
        batch_size=batch_size,
        progress=progress,
    )
    names = None
    if vit.class_names and score == "logit":
        names = tuple(str(vit.class_names[int(c)]) for c in explanation.classes)
    return ExplainResult(
        explanation,
        tuple(dataset.names),
        tuple(unique_stems(dataset.names)),
        defaulted,
        "pred" if class_ is None else str(class_),
        names,
        score,
        vit.source,
        dataset.spec,
        int_pair(vit.layout.patch_size),
        tuple(vit.layout.prefix_kinds),
        photos,
    )


# ---------------------------------------------------------------------------------------------- faithfulness
FAITHFULNESS_RUN = "faithfulness"  # explain.json's "run" for a faithfulness run


def check_methods(methods: Any) -> tuple[str, ...]:
    """The relevance methods of a faithfulness run, as a tuple: a sequence or ``"a,b,c"``, known, none twice.

    Raises:
        ParameterError: empty, an unknown method, or one given twice.
    """
    from vitlens.analysis.explain import METHODS

    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    if not isinstance(methods, list | tuple) or not methods:
        raise ParameterError("methods", f"methods must name at least one of {', '.join(METHODS)}, not {methods!r}")
    for m in methods:
        if m not in METHODS:
            raise ParameterError("methods", f"methods must be among {', '.join(METHODS)}, not {m!r}")
    if len(set(methods)) != len(methods):
        raise ParameterError("methods", f"methods names a method twice: {','.join(methods)}")
    return tuple(methods)


def check_faithfulness_options(methods: Any, removal: Any, steps: Any, seed: Any, class_: Any) -> tuple[str, ...]:
    """Check what needs no model (the CLI calls this before loading one); return the methods as a tuple.

    Raises:
        ParameterError: bad methods, removal, step count, seed or class.
    """
    from vitlens.analysis.faithfulness import check_removal, check_steps

    check_removal(removal)
    check_steps(steps)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ParameterError("seed", f"seed must be a non-negative whole number, not {seed!r}")
    check_options("attribution", 0.0, class_, "logit")
    return check_methods(methods)


def _check_faithfulness_model(vit: ViT, removal: str) -> None:
    """Probabilities need a head; dropping every patch needs a prefix token that the head reads."""
    if vit.num_classes == 0:
        raise ParameterError(
            "faithfulness",
            "faithfulness needs class probabilities and this model has no classifier head (num_classes 0); "
            "a cosine score has no probability to perturb",
        )
    if removal == "drop" and (vit.layout.num_prefix_tokens == 0 or vit.global_pool != "token"):
        raise ParameterError(
            "removal",
            f"removal 'drop' removes every patch at 100 % and this model pools patch tokens (global_pool "
            f"{vit.global_pool!r}), so it would have nothing to read: use removal mean or blur",
        )


def faithfulness_batch(
    vit: ViT,
    images: torch.Tensor,
    indices: torch.Tensor,
    *,
    methods: Sequence[str],
    target: str,
    labels: torch.Tensor | None = None,
    class_: int | str | None = None,
    removal: str = defaults.FAITHFULNESS_REMOVAL,
    steps: int = defaults.FAITHFULNESS_STEPS,
    seed: int = defaults.FAITHFULNESS_SEED,
    chunk_size: int = 64,
) -> Any:
    """One batch's perturbation curves (:func:`~vitlens.analysis.faithfulness.perturbation_curves`) for every
    method's map and a random order drawn from ``(seed, indices[b])`` (the images' positions in their dataset).

    The explained class is fixed per image: the prediction on the full image (``class_`` None or ``"pred"``) or the
    class asked for; each method's map (:func:`explain_batch`) explains that class, and the curves read its softmax
    probability. Perturbed images go through the model under ``no_grad``, ``chunk_size`` at a time.
    """
    import torch

    from vitlens.analysis.faithfulness import RANDOM, perturbation_curves, random_order, relevance_order

    with torch.no_grad():
        classes = class_indices(vit.model(images), class_, vit.class_names)  # [B]
    orders = {}
    for method in methods:
        maps, got, _ = explain_batch(vit, images, method=method, target=target, class_=class_)  # type: ignore[arg-type]
        if not torch.equal(got.cpu(), classes.cpu()):  # the same forward twice: only nondeterminism could differ
            raise VitlensError(f"{method} explained other classes than the full image's: nondeterministic model?")
        orders[method] = relevance_order(torch.as_tensor(maps))  # [B, HW]
    orders[RANDOM] = random_order(indices.cpu().numpy(), vit.layout.num_patches, seed)

    def forward(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            return vit.model(x) if keep is None else vit.forward_kept(x, keep)

    return perturbation_curves(
        forward,
        images,
        {m: o.to(images.device) for m, o in orders.items()},
        classes,
        vit.layout,
        labels=labels,
        removal=removal,  # type: ignore[arg-type]
        steps=steps,
        chunk_size=chunk_size,
        seed=seed,
        target=target,
    )


@dataclass(frozen=True, eq=False, repr=False)
class FaithfulnessResult(Result):
    """How faithful each relevance method is on a set of images: perturbation curves and their areas.

    A second result type of ``explain`` rather than a field of :class:`ExplainResult`: a faithfulness run has
    several methods and no single map, reads a dataset rather than a few photos, and writes other files (a table, a
    figure of curves), so an optional field would make every ``ExplainResult`` method branch on it. It shares
    ``explain.json`` (with ``"run": "faithfulness"``), which is how :func:`vitlens.load_result` finds it: the
    registry knows one result type per analysis, and :meth:`ExplainResult._read` hands this one over.

    Attributes:
        faithfulness: the curves per image (:class:`~vitlens.analysis.faithfulness.Faithfulness`).
        images: each image's name, in the order of the curves.
        class_requested: ``"pred"``, or the index or name asked for (as text).
        source: the model it came from.
        data: the data spec of the images.
        patch_size: ``(ph, pw)`` in pixels.
    """

    faithfulness: Faithfulness
    images: tuple[str, ...]
    class_requested: str
    source: str
    data: str
    patch_size: tuple[int, int]

    analysis = "explain"
    stem = "explain"

    # ---------------------------------------------------------------------------------------------- numbers
    def _by_method(self, values: np.ndarray | None) -> dict[str, Any] | None:
        """``[M, 3, ...]`` -> {method: {curve: value or list}}."""
        from vitlens.analysis.faithfulness import CURVES

        if values is None:
            return None
        return {
            m: {c: values[i, j].tolist() for j, c in enumerate(CURVES)} for i, m in enumerate(self.faithfulness.methods)
        }

    def to_dict(self) -> dict[str, Any]:
        from vitlens.analysis.faithfulness import CURVES

        f = self.faithfulness
        prob_areas, acc_areas = f.probability_areas(), f.accuracy_areas()
        areas = {
            m: {
                c: {
                    "probability": float(prob_areas[i, j]),
                    "accuracy": None if acc_areas is None else float(acc_areas[i, j]),
                }
                for j, c in enumerate(CURVES)
            }
            for i, m in enumerate(f.methods)
        }
        return {
            "run": FAITHFULNESS_RUN,
            "images": list(self.images),
            "methods": list(f.methods),
            "curves": list(CURVES),
            "removal": f.removal,
            "blur_sigma": None if f.blur_sigma is None else list(f.blur_sigma),
            "steps": f.steps,
            "seed": f.seed,
            "target": f.target,
            "class_requested": self.class_requested,
            "fractions": f.fractions.tolist(),
            "areas": areas,
            "probability": self._by_method(f.mean_probabilities()),
            "accuracy": self._by_method(f.accuracies()),
            "classes": f.classes.tolist(),
            "labels": None if f.labels is None else f.labels.tolist(),
            "source": self.source,
            "data": self.data,
            "patch_size": list(self.patch_size),
        }

    def best_method(self) -> str:
        """The method whose deletion curve falls fastest (smallest probability area); the random baseline too."""
        areas = self.faithfulness.probability_areas()[:, 0]
        return self.faithfulness.methods[int(areas.argmin())]

    def summary(self) -> str:
        f = self.faithfulness
        areas = f.probability_areas()[:, 0]
        each = ", ".join(f"{m} {a:.3f}" for m, a in zip(f.methods, areas, strict=True))
        return f"{len(self.images)} images, {f.removal} removal, deletion area (lower is faithful): {each}"

    def key_numbers(self) -> dict[str, Any]:
        f = self.faithfulness
        areas = f.probability_areas()
        return {
            "num_images": len(self.images),
            "removal": f.removal,
            "best_method": self.best_method(),
            **{f"deletion_area_{m}": float(areas[i, 0]) for i, m in enumerate(f.methods)},
            **{f"insertion_area_{m}": float(areas[i, 2]) for i, m in enumerate(f.methods)},
        }

    def table(self) -> list[str]:
        """``faithfulness.csv``: one row per method and curve: the areas, then the mean probability at each step."""
        from vitlens.analysis.faithfulness import CURVES

        f = self.faithfulness
        prob = f.mean_probabilities()
        prob_areas, acc_areas = f.probability_areas(), f.accuracy_areas()
        head = ["method", "curve", "probability_area", "accuracy_area", *(f"p@{x:.4g}" for x in f.fractions)]
        rows = [",".join(head)]
        for i, m in enumerate(f.methods):
            for j, c in enumerate(CURVES):
                acc_area = "" if acc_areas is None else f"{acc_areas[i, j]:.6g}"
                values = ",".join(f"{v:.6g}" for v in prob[i, j])
                rows.append(f"{m},{c},{prob_areas[i, j]:.6g},{acc_area},{values}")
        return rows

    # ---------------------------------------------------------------------------------------------- drawing
    def plot(self, ax: Axes | None = None, curve: str = "deletion") -> Axes:
        """Draw one curve kind (``deletion``, ``negative`` or ``insertion``) for every method and the random order.

        Raises:
            ParameterError: an unknown curve.
        """
        from vitlens.analysis.faithfulness import CURVES
        from vitlens.plotting.explain import plot_faithfulness

        if curve not in CURVES:
            raise ParameterError("curve", f"curve must be one of {', '.join(CURVES)}, not {curve!r}")
        return plot_faithfulness(self.faithfulness, curve, ax=ax)

    def figure(self) -> Figure:
        """The three curve kinds side by side (``faithfulness.<fmt>``)."""
        from vitlens.plotting.explain import faithfulness_figure

        return faithfulness_figure(self.faithfulness, title=f"{len(self.images)} images, {self.source}")

    # ---------------------------------------------------------------------------------------------- files
    def _write(self, out: Path, fmt: str, payload: dict[str, Any]) -> list[Path]:
        """faithfulness.<fmt>, faithfulness.csv, faithfulness.npz (the per-image curves) and explain.json."""
        import numpy as np

        from vitlens.io import ensure_out_dir, write_json, write_npz, write_text
        from vitlens.plotting.style import save_figure

        f = self.faithfulness
        fig = self.figure()  # built first: a plotting error leaves no files
        out = ensure_out_dir(out)
        arrays: dict[str, Any] = {
            "probabilities": f.probabilities,  # [M, 3, B, S + 1]
            "fractions": f.fractions,  # [S + 1]
            "classes": f.classes,  # [B]
            "images": np.asarray(list(self.images), dtype=str),
        }
        if f.correct is not None:
            arrays["correct"] = f.correct  # [M, 3, B, S + 1]
        if f.labels is not None:
            arrays["labels"] = f.labels  # [B]
        return [
            save_figure(fig, out / f"faithfulness.{fmt}", fmt=fmt),  # type: ignore[arg-type]
            write_text(out / "faithfulness.csv", "\n".join(self.table()) + "\n"),
            write_npz(out / "faithfulness.npz", **arrays),
            write_json(out / "explain.json", payload),
        ]

    @classmethod
    def _read(cls, folder: Path, payload: dict[str, Any]) -> FaithfulnessResult:
        import numpy as np

        from vitlens.analysis.faithfulness import Faithfulness

        with np.load(folder / "faithfulness.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        sigma = payload.get("blur_sigma")
        faithfulness = Faithfulness(
            methods=tuple(payload["methods"]),
            fractions=arrays["fractions"],
            probabilities=arrays["probabilities"],
            correct=arrays.get("correct"),
            classes=arrays["classes"],
            labels=arrays.get("labels"),
            removal=payload["removal"],
            blur_sigma=None if sigma is None else (float(sigma[0]), float(sigma[1])),
            seed=int(payload["seed"]),
            target=payload["target"],
        )
        return cls(
            faithfulness,
            tuple(str(name) for name in arrays["images"]),
            str(payload["class_requested"]),
            payload["source"],
            payload["data"],
            int_pair(payload["patch_size"]),
        )


def explain_faithfulness(
    vit: ViT,
    images: ImageDataset | str | os.PathLike | Sequence[str | os.PathLike],
    *,
    methods: Sequence[str] | str = defaults.FAITHFULNESS_METHODS,
    removal: str = defaults.FAITHFULNESS_REMOVAL,
    steps: int = defaults.FAITHFULNESS_STEPS,
    class_: int | str | None = defaults.EXPLAIN_CLASS,
    target: str | None = None,
    seed: int = defaults.FAITHFULNESS_SEED,
    split: str = "test",
    num_images: int | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> FaithfulnessResult:
    """Which relevance map to trust: remove patches in each method's order and watch the class probability.

    The perturbation tests of Chefer, Gur & Wolf 2021 (CVPR, Sec. 4): *positive* perturbation (``deletion``, most
    relevant first: a faithful map drops the probability fast, low area), *negative* perturbation (least relevant
    first: high area), and the insertion test of Petsiuk et al. 2018 (RISE; most relevant first into an empty
    image: high area); each at ``steps + 1`` points from 0 to 100 % of the patches, for every method and a random
    order (drawn from ``seed`` and each image's position in the data). The probability is the softmax of the
    explained class, fixed per image (the full image's prediction, or ``class_``); top-1 accuracy needs labels.

    Args:
        vit: a model with a classifier head.
        images: a dataset, image files, a folder, or a data spec (as for :func:`explain`).
        methods: the methods to judge (any of :data:`~vitlens.analysis.explain.METHODS`), or ``"a,b,c"``.
        removal: ``drop`` (the patch tokens leave the sequence, :meth:`~vitlens.models.vit.ViT.forward_kept`;
            needs a prefix token that the head reads), ``mean`` (pixels set to 0 after normalisation: the
            preprocessing's mean colour) or ``blur`` (pixels of a Gaussian-blurred copy, sigma one patch).
        steps: points per curve minus one (10: steps of 10 %).
        class_: ``"pred"``, an index or a class name.
        target: the token row the maps are read from (as for :func:`explain`).
        seed: the random baseline's seed (recorded).
        split, num_images: with a data spec; ``num_images`` defaults to ``FAITHFULNESS_NUM_IMAGES``.
        batch_size: images per batch (the maps' backward pass); perturbed copies run this many at a time.
        progress: called as ``progress(done, total)`` after every batch.

    Raises:
        ParameterError: a bad option, a model without a head, or ``drop`` on a model that pools patch tokens.
    """
    from vitlens.analysis.faithfulness import concat
    from vitlens.analysis.rollout import resolve_target
    from vitlens.attention import _require_all, capped_batch_size, default_attention_budget, default_target
    from vitlens.data import ImageDataset, iterate_batches
    from vitlens.device import resolve_batch_size

    methods = check_faithfulness_options(methods, removal, steps, seed, class_)
    _check_count("num_images", num_images, "be a positive number")
    _check_count("batch_size", batch_size, "be at least 1")
    if num_images is not None and isinstance(images, ImageDataset):
        raise ParameterError(
            "num_images", "num_images applies to a data spec; a dataset is used whole (open it with num_images=)"
        )
    _check_faithfulness_model(vit, removal)
    target = default_target(vit.layout) if target is None else target
    if not isinstance(target, str):
        raise ParameterError("target", f"target must be cls, dist, reg:N or mean-patch, not {target!r}")
    resolve_target(target, vit.layout)
    if not isinstance(images, ImageDataset):
        count = defaults.FAITHFULNESS_NUM_IMAGES if num_images is None else num_images
        images = open_images(vit, images, split=split, num_images=count)
    dataset = images
    dtype = next(vit.model.parameters()).dtype
    chunk = resolve_batch_size(batch_size, vit.device)
    budget = max(1, default_attention_budget(vit.device) // vit.depth)  # the maps keep every layer for backward
    size = capped_batch_size(vit, chunk, dtype=dtype, budget_bytes=budget)
    full = dataset
    progress = distributed.global_progress(progress, len(full))  # None on ranks other than 0
    dataset = distributed.shard(full)  # this rank's contiguous block; the whole dataset in a single process
    # the random order is seeded by the image's position in the whole dataset, not in this rank's block
    first = int(distributed.shard_indices(len(full))[0]) if dataset is not full and len(dataset) else 0
    parts, seen, total = [], 0, len(dataset)
    if progress is not None:
        progress(0, total)
    for batch in iterate_batches(dataset, batch_size=size, device=vit.device):
        labels = None if dataset.labels is None else batch.labels
        parts.append(
            faithfulness_batch(
                vit,
                batch.images.to(dtype),
                batch.indices + first,
                methods=methods,
                target=target,
                labels=labels,
                class_=class_,
                removal=removal,
                steps=steps,
                seed=seed,
                chunk_size=chunk,
            )
        )
        seen += batch.images.shape[0]
        if progress is not None:
            progress(int(batch.indices[-1]) + 1, total)
    _require_all(seen, dataset)
    # Contiguous shards in rank order: the ranks' curves joined in rank order are in dataset order.
    ranks = [part for part in distributed.gather_objects(concat(parts) if parts else None) if part is not None]
    return FaithfulnessResult(
        concat(ranks),
        tuple(full.names),
        "pred" if class_ is None else str(class_),
        vit.source,
        full.spec,
        int_pair(vit.layout.patch_size),
    )


def _section(run: Any) -> ExplainResult:
    if run.vit.num_classes == 0:
        raise NotApplicable("the model has no classifier head: explain it with vitlens explain --score cosine:IMAGE")
    return explain(run.vit, run.open_images(), batch_size=run.batch_size)


DEFINITION = register(
    Definition(
        name="explain",
        title="class relevance maps",
        paper="Chefer, Gur & Wolf 2021 (ICCV); gradient-weighted rollout (vit-explain)",
        result=ExplainResult,
        compute=explain,
        section=_section,
        needs_data=True,
        order=42,
        command="vitlens.cli.explain:explain",
    )
)
