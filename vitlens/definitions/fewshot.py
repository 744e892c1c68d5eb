"""fewshot: few-shot linear probes on frozen features by regularised least squares (ViT paper §4.1; big_vision's
``fewshot_lsr`` evaluator)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from vitlens import defaults
from vitlens.errors import NotApplicable, ParameterError, VitlensError, spec_named
from vitlens.registry import Definition, register
from vitlens.result import Result

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from vitlens.analysis.fewshot import FewShotResult
    from vitlens.analysis.knn import KnnResult
    from vitlens.data import ImageDataset
    from vitlens.models.vit import ViT

Progress = Callable[[int, int], None]  # progress(done_images, total_images)
Probe = Literal["lsr", "knn", "both"]
PROBES: tuple[str, ...] = ("lsr", "knn", "both")


@dataclass(frozen=True, eq=False, repr=False)
class FewShotProbeResult(Result):
    """Few-shot accuracy of ridge (and k-NN) probes on a model's frozen features, per shots count, layer and seed.

    Attributes:
        probe: the ridge probes' accuracies, λ and solver facts (:class:`~vitlens.analysis.fewshot.FewShotResult`);
            None when only the k-NN probe ran (``probe="knn"``).
        allow_fewer: whether classes with fewer than ``max(shots)`` examples were allowed (all of theirs used).
        source: the model it came from.
        data: the data spec of the pool the shots were drawn from.
        test_data: the data spec of the images scored.
        classes: the class names, index = label.
        depth: the model's number of blocks.
        cache: where the features came from, per part (``train``, ``test``): ``hit``, ``miss`` or ``off``.
        solve_seconds: the time of the probe sweep alone (not the feature extraction), for the CLI's run metadata;
            None for a result read back by :func:`~vitlens.result.load_result`. An init-only argument kept as an
            attribute, not a field: a timing is not part of the result, so ``==`` and the files leave it out.
        knn: DINO's weighted k-NN accuracies on the same shot sets (:class:`~vitlens.analysis.knn.KnnResult`); None
            unless asked for (``probe="knn"`` or ``"both"``).
        full_pool: the shots were the whole training pool (``shots="all"``, one draw), not a few per class.
    """

    probe: FewShotResult | None
    allow_fewer: bool
    source: str
    data: str
    test_data: str
    classes: tuple[str, ...]
    depth: int
    cache: Mapping[str, str]
    prefix_tokens: tuple[str, ...] = ()  # the prefix token kinds in sequence order (cls, dist, reg)
    knn: KnnResult | None = None
    full_pool: bool = False
    solve_seconds: InitVar[float | None] = None

    analysis = "fewshot"
    stem = "fewshot"

    def __post_init__(self, solve_seconds: float | None) -> None:
        object.__setattr__(self, "solve_seconds", solve_seconds)

    @property
    def probe_kind(self) -> Probe:
        """Which probes ran: ``lsr``, ``knn`` or ``both``."""
        return "lsr" if self.knn is None else "knn" if self.probe is None else "both"

    @property
    def _base(self) -> FewShotResult | KnnResult:
        """The probe result that carries the shared facts (shots, layers, seeds, classes, pool and test sizes)."""
        base = self.probe if self.probe is not None else self.knn
        assert base is not None, "a FewShotProbeResult holds at least one probe"
        return base

    @property
    def heatmap(self) -> bool:
        """Whether the figure is the layer-by-shots heat map: every layer of the model probed (``layers="all"``)."""
        return self._base.feature != "pre-logits" and self._base.layers == tuple(range(self.depth))

    # ---------------------------------------------------------------------------------------------- numbers
    def to_dict(self) -> dict[str, Any]:
        if self.probe is not None:
            head = self.probe.to_dict()
        else:  # k-NN only: the facts the ridge probe's dict would have given
            base = self._base
            head = {
                "shots": list(base.shots),
                "layers": list(base.layers),
                "seeds": list(base.seeds),
                "feature": base.feature,
                "num_classes": base.num_classes,
                "chance": base.chance,
                "num_train": base.num_train,
                "num_test": base.num_test,
                "short_classes": dict(base.short_classes),
            }
        # Keys are added only when the k-NN probe or the full pool was asked for: --probe lsr files stay as they were.
        extra: dict[str, Any] = {"probe": self.probe_kind, "knn": self.knn.to_dict()} if self.knn is not None else {}
        if self.full_pool:
            extra["full_pool"] = True
        return {
            **head,
            "allow_fewer": self.allow_fewer,
            "source": self.source,
            "data": self.data,
            "test_data": self.test_data,
            "classes": list(self.classes),
            "depth": self.depth,
            "cache": dict(self.cache),
            "prefix_tokens": list(self.prefix_tokens),
            **extra,
        }

    def _shown_layer(self) -> int:
        """The column of ``layers`` the headline reads: the only one, or the best at the most shots (the ridge
        probe's best when it ran, else the k-NN's best over every k)."""
        if self.probe is not None:
            return int(self.probe.mean[-1].argmax())
        assert self.knn is not None
        return int(self.knn.mean[-1].max(axis=-1).argmax())

    def _shown_k(self, j: int) -> int:
        """The column of ``knn.k`` the headline reads: the best k at the most shots in layer column ``j``."""
        assert self.knn is not None
        return int(self.knn.mean[-1, j].argmax())

    def _shots_text(self) -> str:
        return "full-pool" if self.full_pool else f"{self._base.shots[-1]}-shot"

    def summary(self) -> str:
        j, base = self._shown_layer(), self._base
        shots, chance = self._shots_text(), 100 * base.chance
        where = "" if len(base.layers) == 1 else f"layer {base.layers[j]}, best of {len(base.layers)} layers; "
        knn = ""
        if self.knn is not None:
            c = self._shown_k(j)
            k, used = self.knn.k[c], int(self.knn.k_used[-1, c])
            k_text = f"k={k}" if used == k else f"k={k}, capped at the pool's {used}"
            knn = f"{100 * float(self.knn.mean[-1, j, c]):.1f}% (best {k_text})"
        if self.probe is None:
            return f"{shots} k-NN accuracy {knn} ({where}chance {chance:.1f}%)"
        accuracy = 100 * float(self.probe.mean[-1, j])
        line = f"{shots} accuracy {accuracy:.1f}% ({where}chance {chance:.1f}%)"
        return line if self.knn is None else f"{line}; k-NN {knn}"

    def key_numbers(self) -> dict[str, Any]:
        j, base = self._shown_layer(), self._base
        numbers: dict[str, Any] = {"data": self.data, "seeds": len(base.seeds), "chance": float(base.chance)}
        if len(base.layers) > 1:
            numbers["layer"] = base.layers[j]
        if self.probe is not None:
            numbers["mean_accuracy"] = {str(s): float(self.probe.mean[i, j]) for i, s in enumerate(self.probe.shots)}
        if self.knn is not None:
            c = self._shown_k(j)
            numbers["knn_k"] = self.knn.k[c]
            numbers["knn_mean_accuracy"] = {str(s): float(self.knn.mean[i, j, c]) for i, s in enumerate(base.shots)}
        return numbers

    # ---------------------------------------------------------------------------------------------- drawing
    def _kind(self) -> Literal["heatmap"] | None:
        return "heatmap" if self.heatmap else None

    def plot(self, ax: Axes | None = None) -> Axes:
        """The ridge probe's panel (accuracy against shots, one line per layer; the layer-by-shots heat map for every
        layer or many); the k-NN panel when only the k-NN probe ran."""
        from vitlens.plotting.fewshot import plot_fewshot, plot_knn

        if self.probe is None:
            assert self.knn is not None
            return plot_knn(self.knn, ax=ax, layer=self._shown_layer(), full_pool=self.full_pool)
        return plot_fewshot(self.probe, ax=ax, kind=self._kind())

    def figure(self) -> Figure:
        from vitlens.plotting.fewshot import fewshot_figure, fewshot_knn_figure

        if self.knn is None:
            assert self.probe is not None
            return fewshot_figure(self.probe, kind=self._kind())
        layer, kind = self._shown_layer(), self._kind()
        return fewshot_knn_figure(self.probe, self.knn, layer=layer, kind=kind, full_pool=self.full_pool)

    # ---------------------------------------------------------------------------------------------- files
    def _write(self, out: Path, fmt: str, payload: dict[str, Any]) -> list[Path]:
        """fewshot.csv (ridge: one row per shots, layer and seed), fewshot-knn.csv (k-NN: one row per shots, layer,
        seed and k), fewshot.json and fewshot.<fmt>; each CSV only for the probe that ran."""
        from vitlens.io import ensure_out_dir, write_json, write_text
        from vitlens.plotting.style import save_figure

        probe, knn = self.probe, self.knn
        fig = self.figure()
        tables: dict[str, list[str]] = {}
        if probe is not None:
            rows = tables["fewshot.csv"] = ["shots,layer,seed,accuracy,l2"]
            for i, shots in enumerate(probe.shots):
                for j, layer in enumerate(probe.layers):
                    for s, seed in enumerate(probe.seeds):
                        rows.append(f"{shots},{layer},{seed},{probe.accuracy[i, j, s]:.6g},{probe.l2[i, j]:g}")
        if knn is not None:
            rows = tables["fewshot-knn.csv"] = ["shots,layer,seed,k,k_used,accuracy"]
            for i, shots in enumerate(knn.shots):
                for j, layer in enumerate(knn.layers):
                    for s, seed in enumerate(knn.seeds):
                        for c, k in enumerate(knn.k):
                            used, accuracy = knn.k_used[i, c], knn.accuracy[i, j, s, c]
                            rows.append(f"{shots},{layer},{seed},{k},{used},{accuracy:.6g}")
        out = ensure_out_dir(out)
        return [
            *(write_text(out / name, "\n".join(rows) + "\n") for name, rows in tables.items()),
            write_json(out / "fewshot.json", payload),
            save_figure(fig, out / f"fewshot.{fmt}", fmt=fmt),  # type: ignore[arg-type]
        ]

    @classmethod
    def _read(cls, folder: Path, payload: dict[str, Any]) -> FewShotProbeResult:
        import numpy as np

        from vitlens.analysis.fewshot import FewShotResult
        from vitlens.features import DEPRECATED_FEATURES

        # fewshot.json holds every number exactly (JSON floats round-trip); the CSV rounds to 6 digits.
        shots, layers = tuple(payload["shots"]), tuple(payload["layers"])
        seeds = tuple(payload["seeds"])
        feature = DEPRECATED_FEATURES.get(payload["feature"], payload["feature"])  # files written before a rename
        facts = (bool(payload["allow_fewer"]), payload["source"], payload["data"], payload["test_data"])
        rest = (tuple(payload["classes"]), int(payload["depth"]), dict(payload["cache"]))
        prefix = tuple(payload.get("prefix_tokens", ()))
        knn = _read_knn(payload, shots, layers, seeds, feature) if "knn" in payload else None
        full_pool = bool(payload.get("full_pool", False))
        if payload.get("probe") == "knn":
            return cls(None, *facts, *rest, prefix, knn=knn, full_pool=full_pool)
        accuracy = np.zeros((len(shots), len(layers), len(seeds)))  # [S, L, seeds]
        l2 = np.zeros((len(shots), len(layers)))  # [S, L]
        methods = [""] * len(shots)
        for row in payload["results"]:
            i, j = shots.index(row["shots"]), layers.index(row["layer"])
            accuracy[i, j] = row["per_seed"]
            l2[i, j] = row["l2"]
            methods[i] = row["method"]
        probe = FewShotResult(
            accuracy=accuracy,
            shots=shots,
            layers=layers,
            seeds=seeds,
            l2=l2,
            l2_auto=payload["l2"] == "auto",
            methods=tuple(methods),
            num_classes=int(payload["num_classes"]),
            num_train=int(payload["num_train"]),
            num_test=int(payload["num_test"]),
            short_classes=dict(payload["short_classes"]),
            feature=feature,
        )
        return cls(probe, *facts, *rest, prefix, knn=knn, full_pool=full_pool)


def _read_knn(
    payload: dict[str, Any], shots: tuple[int, ...], layers: tuple[int, ...], seeds: tuple[int, ...], feature: str
) -> KnnResult:
    """The k-NN probe's result from the ``knn`` entry of fewshot.json."""
    from vitlens.analysis.knn import KnnResult

    entry = payload["knn"]
    k = tuple(entry["k"])
    accuracy = np.zeros((len(shots), len(layers), len(seeds), len(k)))  # [S, L, seeds, len(k)]
    k_used = np.zeros((len(shots), len(k)), dtype=np.int64)  # [S, len(k)]
    for row in entry["results"]:
        i, j, c = shots.index(row["shots"]), layers.index(row["layer"]), k.index(row["k"])
        accuracy[i, j, :, c] = row["per_seed"]
        k_used[i, c] = row["k_used"]
    return KnnResult(
        accuracy=accuracy,
        k=k,
        k_used=k_used,
        temperature=float(entry["temperature"]),
        shots=shots,
        layers=layers,
        seeds=seeds,
        num_classes=int(payload["num_classes"]),
        num_train=int(payload["num_train"]),
        num_test=int(payload["num_test"]),
        short_classes=dict(payload["short_classes"]),
        feature=feature,
    )


# --------------------------------------------------------------------------------------------------------------
# Options: each check raises a ParameterError that names the parameter (the CLI turns it into the flag)


def check_shots(shots: Any) -> tuple[int, ...]:
    """``shots`` as sorted, distinct counts: positive integers, or a string of them such as ``"1,5,10"``."""
    if isinstance(shots, str):
        try:
            values = [int(p.strip()) for p in shots.split(",")]
        except ValueError:
            values = []
        example = "separated by commas (e.g. 1,5,10,25)"
    else:
        items = [shots] if isinstance(shots, int) else list(shots) if isinstance(shots, Sequence) else []
        values = items if all(isinstance(v, int) and not isinstance(v, bool) for v in items) else []
        example = "(e.g. (1, 5, 10, 25))"
    if not values or any(v < 1 for v in values):
        raise ParameterError("shots", f"shots must be positive integers {example}, not {shots!r}")
    return tuple(sorted(set(values)))


def check_seeds(seeds: Any) -> int:
    """``seeds``, the number of shot draws: an integer of at least 1."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ParameterError("seeds", f"seeds must be at least 1, not {seeds!r}")
    return seeds


def check_l2(l2: Any) -> float | Literal["auto"]:
    """``l2``, the ridge penalty: a positive finite number (or a string of one), or ``"auto"``."""
    if isinstance(l2, str) and l2.strip().lower() == "auto":
        return "auto"
    try:
        number = math.nan if isinstance(l2, bool) else float(l2)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise ParameterError("l2", f"l2 must be a positive number or 'auto', not {l2!r}")
    return number


def check_feature(feature: Any) -> str | None:
    """``feature``, lower-cased: ``pre-logits``, ``cls`` or ``mean-patch``; None when not given.

    The deprecated ``gap`` is taken as ``mean-patch``, with a warning.
    """
    from vitlens.features import FEATURE_KINDS, canonical_feature

    if feature is None:
        return None
    value = canonical_feature(feature.strip().lower()) if isinstance(feature, str) else feature
    if value not in FEATURE_KINDS:
        raise ParameterError("feature", f"feature must be one of {', '.join(FEATURE_KINDS)}, not {feature!r}")
    return value


def check_probe(probe: Any) -> Probe:
    """``probe``, lower-cased: ``lsr`` (ridge regression), ``knn`` (DINO's weighted k-NN) or ``both``."""
    value = probe.strip().lower() if isinstance(probe, str) else probe
    if value not in PROBES:
        raise ParameterError("probe", f"probe must be one of {', '.join(PROBES)}, not {probe!r}")
    return value  # type: ignore[return-value]


def is_full_pool(shots: Any) -> bool:
    """Whether ``shots`` is ``"all"``: the whole training pool, one draw, instead of a few examples per class."""
    return isinstance(shots, str) and shots.strip().lower() == "all"


def check_knn_temperature(temperature: Any) -> float:
    """``knn_temperature``, ``T`` of the k-NN votes ``exp(sim / T)``: a positive finite number."""
    try:
        value = math.nan if isinstance(temperature, bool) else float(temperature)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ParameterError("knn_temperature", f"knn_temperature must be a positive number, not {temperature!r}")
    return value


POOL_SPLITS: tuple[str, ...] = ("train", "all")


def check_split(split: Any) -> Literal["train", "all"] | None:
    """``split``, lower-cased: the part of ``data`` that is the shot pool, ``train`` or ``all``; None when not given.

    There is no ``test``: the test split is what a ``train`` pool is scored on.
    """
    value = split.strip().lower() if isinstance(split, str) else split
    if value is not None and value not in POOL_SPLITS:
        raise ParameterError("split", f"split must be {' or '.join(POOL_SPLITS)}, not {split!r}")
    return value


def pool_split(split: Any, *, has_test_data: bool) -> Literal["train", "all"]:
    """The part of ``data`` the shots are drawn from: ``split``, else ``all`` with test data and ``train`` without.

    Without test data the test split of ``data`` is scored, so its pool can only be the train split.
    """
    value = check_split(split)
    if value is None:
        return "all" if has_test_data else "train"
    if value == "all" and not has_test_data:
        raise ParameterError(
            "split",
            "split 'all' leaves nothing to score (all of data is the shot pool): give test_data, or use split "
            "'train', whose test split is scored",
        )
    return value


def check_layers(layers: Any, depth: int) -> list[int] | None:
    """``layers`` as sorted 0-based block indices of a ``depth``-block model; None when not given.

    Accepts ``"all"``, an index, a sequence of indices, or a string of them such as ``"0,5,-1"`` (negative from the
    end).
    """
    from vitlens.capture import resolve_layers

    if layers is None:
        return None
    if isinstance(layers, str):
        if layers.strip().lower() == "all":
            return list(range(depth))
        try:
            asked = [int(p) for p in layers.split(",")]
        except ValueError:
            asked = []
    else:
        items = [layers] if isinstance(layers, int) else list(layers) if isinstance(layers, Sequence) else []
        asked = items if all(isinstance(v, int) and not isinstance(v, bool) for v in items) else []
    if not asked:
        raise ParameterError(
            "layers", f"layers must be 'all' or 0-based layer indices separated by commas, not {layers!r}"
        )
    return resolve_layers(asked, depth)  # a ParameterError on "layers" for an index out of range


def _check_count(name: str, value: Any, rule: str) -> None:
    """``value`` is None or an integer of at least 1; else a ParameterError saying ``name`` must ``rule``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ParameterError(name, f"{name} must {rule}, not {value!r}")


def _brief(classes: Sequence[str] | None, limit: int = 4) -> str:
    names = list(classes or [])
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"[{shown}] ({len(names)})"


def _labelled(dataset: ImageDataset) -> ImageDataset:
    if dataset.labels is None or not dataset.classes:
        raise VitlensError(
            f"{dataset.spec} has no labels; few-shot probes need them: use an ImageFolder layout "
            "(one subfolder per class) or a named dataset such as digits"
        )
    return dataset


def _pool_and_test(
    vit: ViT, data: Any, test_data: Any, split: Any, num_images: int | None
) -> tuple[ImageDataset, ImageDataset]:
    """The pool the shots are drawn from and the images scored, opened from specs where given as such."""
    from vitlens.data import ImageDataset, open_dataset

    def open_split(spec: Any, split: str, param: str = "data") -> ImageDataset:
        with spec_named(param):
            return open_dataset(spec, vit.preprocess, split=split, num_images=num_images, require_labels=True)  # type: ignore[arg-type]

    if num_images is not None and isinstance(data, ImageDataset) and not isinstance(test_data, str | os.PathLike):
        raise ParameterError(
            "num_images", "num_images applies to a data spec; a dataset is used whole (open it with num_images=)"
        )
    part = pool_split(split, has_test_data=test_data is not None)
    if isinstance(data, ImageDataset) and split is not None and part != "all":
        raise ParameterError("split", "split applies to a data spec; a dataset is the shot pool whole")
    if isinstance(data, ImageDataset) and test_data is None:
        # A dataset alone is split as a folder without official splits is: 80/20, stratified, fixed seed.
        from vitlens.data.subsets import _holdout_is_test

        labelled = _labelled(data)
        is_test = _holdout_is_test(labelled.labels)  # [N] bool
        if not is_test.any():
            raise ParameterError(
                "test_data",
                f"test_data is needed: {labelled.spec} has too few images per class ({len(labelled)} in all) to hold "
                "out a fifth of each class for scoring; pass the images to score, or a larger dataset",
            )
        return labelled.subset(np.flatnonzero(~is_test), tag="train"), labelled.subset(
            np.flatnonzero(is_test), tag="test"
        )
    pool = _labelled(data) if isinstance(data, ImageDataset) else open_split(data, part)
    if test_data is None:
        test = open_split(data, "test")
    else:
        if isinstance(test_data, ImageDataset):
            test = _labelled(test_data)
        else:
            test = open_split(test_data, "all", "test_data")
        if list(test.classes or []) != list(pool.classes or []):
            raise VitlensError(
                f"the test data {test.spec} has classes {_brief(test.classes)} but {pool.spec} has "
                f"{_brief(pool.classes)}; they must be the same, in the same order"
            )
    return pool, test


def fewshot(
    vit: ViT,
    data: ImageDataset | str | os.PathLike,
    *,
    test_data: ImageDataset | str | os.PathLike | None = None,
    split: Literal["train", "all"] | None = None,
    shots: Sequence[int] | str = defaults.FEWSHOT_SHOTS,
    seeds: int = defaults.FEWSHOT_SEEDS,
    l2: float | Literal["auto"] = defaults.FEWSHOT_L2,
    layers: Sequence[int] | int | str | None = None,
    feature: Literal["pre-logits", "cls", "mean-patch"] | None = None,
    probe: Probe = defaults.FEWSHOT_PROBE,  # type: ignore[assignment]
    knn_k: Sequence[int] | str = defaults.FEWSHOT_KNN_K,
    knn_temperature: float = defaults.FEWSHOT_KNN_TEMPERATURE,
    num_images: int | None = None,
    allow_fewer: bool = False,
    batch_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: Progress | None = None,
) -> FewShotProbeResult:
    """Few-shot accuracy of linear probes on frozen features: ridge regression to ±1 targets (ViT paper §4.1).

    The protocol of big_vision's ``fewshot_lsr`` evaluator: for each seed and shots count ``k``, the first ``k``
    images of each class's seeded permutation of the pool; features standardised with those shots' statistics and a
    bias feature appended; targets ``2 onehot - 1``; ridge weights ``W = (XᵀX + λI)⁻¹ XᵀY`` in closed form
    (:func:`vitlens.analysis.fewshot.fewshot_lsr`); accuracy of the argmax on the test images. Features come from one
    forward pass per part, for every layer at once, and are cached on disk.

    Args:
        vit: the model (:func:`vitlens.load`).
        data: a data spec (``digits``, ``cifar10``, a folder), whose train split is the pool of shots and test split
            the images scored (with ``test_data``: all of it is the pool, see ``split``); or a labelled
            :class:`~vitlens.data.ImageDataset`: with ``test_data`` the pool, used whole; alone, split 80/20 into
            pool and scored images (stratified by class, fixed seed, as a folder without official splits is).
        test_data: the images to score instead of the test split of ``data``: a spec (used whole, all splits) or a
            dataset; its classes must be those of ``data``, in the same order.
        split: the part of a ``data`` spec that is the pool of shots: ``train`` or ``all``. None: ``train`` without
            ``test_data`` (its test split is scored), ``all`` with it (nothing of ``data`` is scored, so none of it is
            held out; a plain folder or digits would otherwise lose its 20% test split).
        shots: training examples per class, e.g. ``(1, 5, 10, 25)`` (big_vision's) or ``"1,5,10"``; or ``"all"``:
            the whole pool, one draw (``seeds`` is then 1), reported as one shots count, the largest class's size.
        seeds: random shot draws per shots count (seeds ``0 .. seeds-1``).
        l2: the ridge penalty λ (big_vision's 2¹⁰), or ``"auto"``: chosen per shots count and layer by leave-one-out
            on the training shots (never on the test images).
        layers: blocks to probe, 0-based (negative from the end): an index, several, or ``"all"``; None for the
            pre-logits after the last block. Probing every layer draws a layer-by-shots heat map.
        feature: ``pre-logits`` (what the head sees; the default without ``layers``), ``cls`` (the class token after
            the block) or ``mean-patch`` (the mean of the patch tokens after the block; ``gap``, its old name, still
            works with a warning); with ``layers`` the default is ``cls``, or ``mean-patch`` for models without a
            class token.
        probe: ``lsr`` (the ridge probe), ``knn`` (DINO's weighted k-NN, :func:`vitlens.analysis.knn.fewshot_knn`,
            on the same shot sets) or ``both``; every probe reads the same features (one extraction, one cache entry).
        knn_k: numbers of neighbours of the k-NN probe (DINO's 10, 20, 100, 200), each capped at the shots' pool.
        knn_temperature: ``T`` of the k-NN votes ``exp(sim / T)`` (DINO's 0.07).
        num_images: a stratified subset of this many images of each split opened from a spec; None for all.
        allow_fewer: use all examples of classes with fewer than ``max(shots)`` instead of failing.
        batch_size: images per forward pass; None for the device's default.
        cache_dir: the feature cache folder (default ``$VITLENS_CACHE_DIR`` or ``~/.cache/vitlens/features``).
        use_cache: read and write the feature cache.
        progress: called as ``progress(done, total)`` while features are extracted (pool, then test images).

    Returns:
        The accuracies, with the data and cache facts of the run.

    Raises:
        ParameterError: a bad option, a layer outside the model, pre-logits asked for at an inner layer, a dataset
            as ``data`` without ``test_data``, ``split="all"`` without ``test_data`` (nothing left to score),
            ``split="train"`` of a dataset, or ``num_images`` with no spec to open.
        VitlensError: unlabelled data, test classes unlike the pool's, a class short of shots (unless
            ``allow_fewer``), ``cls`` on a model without a class token, or an image that cannot be read.
    """
    import dataclasses
    import time

    from vitlens.analysis.fewshot import check_shot_pool, class_counts, fewshot_lsr
    from vitlens.analysis.knn import check_k, fewshot_knn
    from vitlens.feature_cache import cached_features
    from vitlens.features import resolve_feature_layers
    from vitlens.log import logger

    full_pool = is_full_pool(shots)
    shot_counts, seeds, l2 = (1,) if full_pool else check_shots(shots), check_seeds(seeds), check_l2(l2)
    probe = check_probe(probe)
    ks, temperature = check_k(knn_k, name="knn_k"), check_knn_temperature(knn_temperature)
    kind = check_feature(feature)
    check_split(split)
    _check_count("num_images", num_images, "be a positive number")
    _check_count("batch_size", batch_size, "be at least 1")
    chosen = check_layers(layers, vit.depth)
    kind = kind or ("pre-logits" if chosen is None else "cls" if vit.layout.has_class_token else "mean-patch")
    if kind == "pre-logits" and chosen not in (None, [vit.depth - 1]):
        raise ParameterError(
            "layers",
            f"layers {chosen} need feature cls or mean-patch: pre-logits exist after the last block only",
        )
    chosen = resolve_feature_layers(vit, chosen, kind)  # a VitlensError for cls on a model without a class token

    pool, test = _pool_and_test(vit, data, test_data, split, num_images)
    classes = list(pool.classes or [])
    if full_pool:  # every class gives all its examples: one draw of the whole pool (the probes ignore the order)
        shot_counts, seeds, allow_fewer = (int(class_counts(pool.labels, len(classes)).max()),), 1, True
    # Fails here, before any forward pass, on a single class or a class short of examples.
    short = check_shot_pool(
        pool.labels, shots=shot_counts, num_classes=len(classes), class_names=classes, allow_fewer=allow_fewer
    )
    if short and not full_pool:
        listed = ", ".join(f"{name!r} ({count})" for name, count in short.items())
        logger.warning(f"fewer than {max(shot_counts)} training examples in class {listed}: using all (allow_fewer)")

    total = len(pool) + len(test)
    feats, cache = {}, {}
    for part, dataset, offset in (("train", pool, 0), ("test", test, len(pool))):
        # One progress count over both parts; a part read from the cache reports nothing.
        report = None if progress is None else (lambda done, _n, _offset=offset: progress(_offset + done, total))
        feats[part], cache[part] = cached_features(
            vit,
            dataset,
            layers=chosen,
            feature=kind,  # type: ignore[arg-type]
            batch_size=batch_size,
            cache_dir=cache_dir,
            use_cache=use_cache,
            progress=report,
        )
    started = time.perf_counter()
    # Both probes read the same features and draw the same shots (same seeds, shot_indices).
    common = {
        "shots": shot_counts,
        "seeds": seeds,
        "device": vit.device,
        "num_classes": len(classes),
        "class_names": classes,
        "allow_fewer": allow_fewer,
        "feature": kind,
    }
    lsr = None
    if probe in ("lsr", "both"):
        lsr = fewshot_lsr(feats["train"], pool.labels, feats["test"], test.labels, l2=l2, **common)  # type: ignore[arg-type]
    knn = None
    if probe in ("knn", "both"):
        knn = fewshot_knn(
            feats["train"],
            pool.labels,
            feats["test"],
            test.labels,
            k=ks,
            temperature=temperature,
            **common,  # type: ignore[arg-type]
        )
    if full_pool:  # every class short of the largest is expected, not worth listing
        lsr = None if lsr is None else dataclasses.replace(lsr, short_classes={})
        knn = None if knn is None else dataclasses.replace(knn, short_classes={})
    solve_seconds = time.perf_counter() - started
    facts = (bool(allow_fewer), vit.source, pool.spec, test.spec, tuple(classes), vit.depth, cache)
    prefix = tuple(vit.layout.prefix_kinds)
    return FewShotProbeResult(lsr, *facts, prefix, knn=knn, full_pool=full_pool, solve_seconds=solve_seconds)


def _section(run: Any) -> FewShotProbeResult:
    pool = run.open(run.data, split="train", num_images=None)
    if pool.labels is None or not pool.classes:
        raise NotApplicable(f"{pool.spec} has no labels")
    test = run.open(run.data, split="test", num_images=None, require_labels=True)
    options = {"shots": run.shots, "seeds": run.seeds, "l2": run.l2, "batch_size": run.batch_size}
    return fewshot(run.vit, pool, test_data=test, cache_dir=run.cache_dir, use_cache=run.use_cache, **options)


DEFINITION = register(
    Definition(
        name="fewshot",
        title="few-shot linear probes",
        paper="ViT paper §4.1 (big_vision's fewshot_lsr)",
        result=FewShotProbeResult,
        compute=fewshot,
        section=_section,
        needs_data=True,
        order=50,
        command="vitlens.cli.fewshot:fewshot",
    )
)
