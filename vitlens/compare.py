"""`vitlens compare`: the same analyses on many checkpoints (a training run, or a list of models), cached per
checkpoint, as one table (``compare.csv``), trend figures and a report page in the folder conventions of
``vitlens report``.

Raghu et al. 2021 ("Do Vision Transformers See Like Convolutional Neural Networks?") follow mean attention
distance and CKA across models; this module does so across the checkpoints of one run, with the ViT paper's Fig. 7
quantities (filters, position-embedding structure, attention distance) beside few-shot accuracy.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitlens import defaults
from vitlens.errors import ParameterError, VitlensError
from vitlens.page import PLAIN_CSS, html_table, markdown_cell, markdown_table, png_figure, versions
from vitlens.result import finite

if TYPE_CHECKING:
    import os

    from vitlens.models.vit import ViT
    from vitlens.result import Result

ANALYSES: tuple[str, ...] = ("pos-sim", "filters", "attention-distance", "fewshot", "cka")
CACHE_FOLDER = "cache"
KEY_FILE = "compare_key.json"  # beside a cached analysis's own files: what it was computed from
CACHE_FORMAT = 1  # bump when a cached entry's meaning changes, so old entries are recomputed
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.safetensors$")  # what `vitlens train --save-every N` writes
_FINAL_FILE = "model.safetensors"
_RUN_MARKERS = ("checkpoints", "metrics.csv", "resume.pt", _FINAL_FILE)
CSV_HEADER = "model,epoch,analysis,quantity,layer,value"


# --------------------------------------------------------------------------------------------------------------
# Which checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """One model of the comparison.

    Attributes:
        spec: what :func:`vitlens.load` reads (a file, a folder, a timm name).
        name: its label in the table and on the x axis of a list (``epoch 3`` in a run folder).
        epoch: the training epoch (from the file name, or the final checkpoint's metadata); None outside a run.
    """

    spec: str
    name: str
    epoch: int | None = None


def find_checkpoints(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[tuple[Checkpoint, ...], bool]:
    """The checkpoints to compare, and whether they are a training run (x axis: epoch) or a list (x axis: name).

    One folder written by ``vitlens train`` (it holds ``checkpoints/``, ``metrics.csv``, ``resume.pt`` or
    ``model.safetensors``) is a run: ``checkpoints/epoch_NNN.safetensors`` (epoch from the name) and the final
    ``model.safetensors`` (epoch from its metadata), in epoch order. Anything else is a list of models kept in the
    given order and named by their file stem (or by the spec as given, where two stems are equal).

    Raises:
        ParameterError: nothing given, a run folder (or an empty folder) with no checkpoint, or a model listed twice.
        VitlensError: the final checkpoint's metadata cannot be read.
    """
    items = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    specs = [str(i) for i in items]
    if not specs:
        raise ParameterError("checkpoints", "checkpoints: give a training run folder or at least one checkpoint")
    if len(specs) == 1:
        folder = Path(specs[0]).expanduser()
        if folder.is_dir() and (any((folder / m).exists() for m in _RUN_MARKERS) or not any(folder.iterdir())):
            return _run_folder(folder), True
    if len(set(specs)) != len(specs):
        twice = sorted({s for s in specs if specs.count(s) > 1})
        raise ParameterError("checkpoints", f"checkpoints: {', '.join(twice)} listed twice")
    stems = [Path(s).stem if Path(s).expanduser().exists() else s for s in specs]
    names = [stem if stems.count(stem) == 1 else spec for stem, spec in zip(stems, specs, strict=True)]
    return tuple(Checkpoint(spec, name, _epoch_of(Path(spec))) for spec, name in zip(specs, names, strict=True)), False


def _run_folder(folder: Path) -> tuple[Checkpoint, ...]:
    by_epoch: dict[int, Path] = {}
    periodic = folder / "checkpoints"
    if periodic.is_dir():
        for path in sorted(periodic.iterdir()):
            match = _EPOCH_FILE.match(path.name)
            if match:
                by_epoch[int(match.group(1))] = path
    final = folder / _FINAL_FILE
    if final.is_file():
        epoch = _epoch_of(final)
        if epoch is None:
            raise VitlensError(f"{final}: its metadata has no epoch (not written by vitlens train?)")
        by_epoch[epoch] = final  # after `--resume --epochs`, the final weights replace an older file of that epoch
    if not by_epoch:
        raise ParameterError(
            "checkpoints",
            f"checkpoints: {folder} holds no checkpoints (checkpoints/epoch_NNN.safetensors or model.safetensors; "
            "train with --save-every N)",
        )
    return tuple(Checkpoint(str(by_epoch[e]), f"epoch {e}", e) for e in sorted(by_epoch))


def _epoch_of(path: Path) -> int | None:
    """The epoch a vitlens checkpoint carries (file name ``epoch_NNN``, else its metadata); None for other files."""
    match = _EPOCH_FILE.match(path.name)
    if match:
        return int(match.group(1))
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from vitlens.models.checkpoint import METADATA_KEY

    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:  # the header only, no tensor is read
            meta = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
    except Exception as e:  # a damaged header: one line, never a traceback
        raise VitlensError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    epoch = meta.get("epoch")
    return int(epoch) if isinstance(epoch, int | float) else None


def parse_analyses(value: str | Sequence[str] | None) -> tuple[tuple[str, ...], bool]:
    """``"pos-sim,cka"`` (or a list) as analysis names in :data:`ANALYSES` order, and whether they were chosen.

    Raises:
        ParameterError: an unknown name, or none (named ``analyses``).
    """
    if value is None:
        return ANALYSES, False
    parts = [value] if isinstance(value, str) else list(value)
    names = {p.strip().lower() for part in parts for p in part.split(",") if p.strip()}
    unknown = sorted(names - set(ANALYSES))
    if unknown or not names:
        shown = ", ".join(unknown) if unknown else "(none)"
        raise ParameterError("analyses", f"analyses: unknown analysis {shown}; choose from {', '.join(ANALYSES)}")
    return tuple(a for a in ANALYSES if a in names), True


# --------------------------------------------------------------------------------------------------------------
# The numbers of one analysis result: the rows of compare.csv


@dataclass(frozen=True)
class Row:
    """One number of one model: a row of ``compare.csv``."""

    model: str
    epoch: int | None
    analysis: str
    quantity: str
    layer: int | None
    value: float | None

    def csv(self) -> str:
        cells = [_csv_cell(self.model), "" if self.epoch is None else str(self.epoch), self.analysis, self.quantity]
        cells += ["" if self.layer is None else str(self.layer), "" if self.value is None else repr(self.value)]
        return ",".join(cells)


def _csv_cell(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def analysis_numbers(result: Result) -> list[tuple[str, int | None, float | None]]:
    """``(quantity, layer, value)`` of a result: the numbers the trend figures show.

    - pos-sim: ``row_col_score`` and ``neighbour_minus_far`` (the 2-D structure of the embedding, ViT Fig. 7 centre);
    - filters: ``cumulative_explained_variance`` of the kept components (the paper's 28, or all if fewer: then it
      is 1), ``first_component_share`` and ``components_for_90pct`` (how many components explain 90%);
    - attention-distance, per layer: ``mean_px`` (mean over heads) and the spread of the heads, ``head_std_px``
      (population standard deviation), ``head_min_px``, ``head_max_px``;
    - fewshot: ``accuracy_<k>shot``, the ridge probe's mean over seeds on the pre-logits;
    - cka, per layer: ``cka_to_last``, linear CKA of layer l with layer l of the last checkpoint (``mean-patch``).
    """
    import numpy as np

    name = result.analysis
    if name == "pos-sim":
        sim = result.sim  # type: ignore[attr-defined]
        return [("row_col_score", None, sim.row_col_score), ("neighbour_minus_far", None, sim.neighbour_minus_far)]
    if name == "filters":
        ratio = result.pca.explained_variance_ratio  # type: ignore[attr-defined]  # [K]
        cumulative = np.cumsum(ratio)  # [K]
        # How many components explain 90% of the variance: fewer means more structured filters (None: not in K).
        needed = int(np.searchsorted(cumulative, 0.9 - 1e-12) + 1) if cumulative[-1] >= 0.9 - 1e-12 else None
        return [
            ("cumulative_explained_variance", None, float(cumulative[-1])),
            ("first_component_share", None, ratio[0]),
            ("components_for_90pct", None, needed),
        ]
    if name == "attention-distance":
        px = result.distance.distance_px  # type: ignore[attr-defined]  # [depth, heads]
        rows: list[tuple[str, int | None, float | None]] = []
        for layer, heads in enumerate(px):
            rows += [("mean_px", layer, heads.mean()), ("head_std_px", layer, heads.std())]
            rows += [("head_min_px", layer, heads.min()), ("head_max_px", layer, heads.max())]
        return rows
    if name == "fewshot":
        probe = result.probe  # type: ignore[attr-defined]
        return [(f"accuracy_{s}shot", None, probe.mean[i, 0]) for i, s in enumerate(probe.shots)]
    if name == "cka":
        c = result.cka  # type: ignore[attr-defined]
        column = {int(q): j for j, q in enumerate(c.layers_b)}
        return [("cka_to_last", int(p), c.matrix[i, column[int(p)]]) for i, p in enumerate(c.layers_a)]
    raise ParameterError("analysis", f"analysis must be one of {', '.join(ANALYSES)}, not {name!r}")


# --------------------------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class CompareResult:
    """What :func:`compare` did.

    Attributes:
        out: the output folder.
        checkpoints: the models, in table order (epoch order for a run).
        run: whether they are a training run (x axis: epoch) or a list (x axis: name).
        analyses: the analyses that ran.
        rows: every number, model by model (the content of ``compare.csv``).
        computed: per model name, the analyses computed in this call (the others were read from the cache).
        summary: the content of ``summary.json``.
        files: the files written (cache entries excluded).
    """

    out: Path
    checkpoints: tuple[Checkpoint, ...]
    run: bool
    analyses: tuple[str, ...]
    rows: tuple[Row, ...]
    computed: Mapping[str, tuple[str, ...]]
    summary: dict[str, Any]
    files: tuple[Path, ...] = ()

    def value(self, model: str, analysis: str, quantity: str, layer: int | None = None) -> float | None:
        """One number of the table.

        Raises:
            KeyError: no such row.
        """
        for r in self.rows:
            if (r.model, r.analysis, r.quantity, r.layer) == (model, analysis, quantity, layer):
                return r.value
        raise KeyError(f"no row {model!r} {analysis} {quantity} layer {layer}")


@dataclass
class _Session:
    """What every checkpoint's analyses share: options, cache, staging folder, the loaded reference model."""

    out: Path
    staging: Path
    options: dict[str, Any]
    load_options: dict[str, Any]
    use_cache: bool
    cache_dir: Path | None
    batch_size: int | None
    identities: dict[str, str] = field(default_factory=dict)
    reference: ViT | None = None
    reference_spec: str = ""


def compare(
    checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    analyses: str | Sequence[str] | None = None,
    data: str = "digits",
    out: str | os.PathLike = "vitlens-compare",
    split: str = "test",
    num_images: int | None = defaults.COMPARE_NUM_IMAGES,
    fewshot_num_images: int | None = None,
    shots: Sequence[int] = defaults.REPORT_SHOTS,
    seeds: int = defaults.REPORT_SEEDS,
    l2: float | str = defaults.REPORT_L2,
    minibatch_size: int = defaults.CKA_MINIBATCH_SIZE,
    batch_size: int | None = None,
    load_options: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    on_step: Callable[[str, int, int], None] | None = None,
) -> CompareResult:
    """Run the chosen analyses on every checkpoint, write ``compare.csv``, trend figures and a report page.

    Each analysis result is saved with its own files (read back with :func:`vitlens.load_result`) under
    ``out/cache/<identity hash>/<analysis>/``, keyed by the checkpoint's identity (SHA-256 of the file) and the
    options and data spec that change it (``compare_key.json``); an entry whose key matches is read, not recomputed,
    so adding a checkpoint computes only that one. CKA compares each checkpoint with the last one, so its key also
    holds the last checkpoint's identity: when a new last checkpoint arrives, every CKA entry is recomputed (and
    only those). Everything is computed into a temporary folder first: an error leaves ``out`` as it was.

    Under torchrun the analyses with data (attention distance, few-shot, CKA) shard their images across the ranks,
    and every rank returns the single process's table; rank 0 alone reads and writes the cache and the files (the
    cache decision and each result are sent from rank 0, so the ranks never disagree on what to compute).

    Args:
        checkpoints: a ``vitlens train`` run folder, or checkpoint specs (files, folders, timm names) in order.
        analyses: names from :data:`ANALYSES`; None for all (few-shot is left out, with a warning, when ``data``
            has no labels).
        data: the data spec of attention distance, few-shot and CKA.
        split: the split attention distance and CKA read.
        num_images: images of ``split`` for attention distance and CKA (stratified subset); None for all.
        fewshot_num_images: a stratified subset of each few-shot split; None for all (as ``vitlens report``).
        shots, seeds, l2: the few-shot protocol (as ``vitlens report``).
        minibatch_size: CKA's minibatch (the estimate depends on it; see :func:`vitlens.cka`).
        batch_size: images per forward pass; None for the device's default.
        load_options: keyword arguments of :func:`vitlens.load` for every checkpoint (device, img_size, ...).
        cache_dir, use_cache: the few-shot feature cache (not the compare cache, which is always used).
        on_step: called as ``on_step(model name, done, total)`` before each checkpoint, and ``("", total, total)``.

    Raises:
        ParameterError: no checkpoints, an unknown analysis, an option out of range, or CKA across models of
            different depths.
        VitlensError: a checkpoint or the data cannot be read, or the output folder cannot be written.
    """
    from vitlens.io import ensure_out_dir

    started = time.perf_counter()
    found, run = find_checkpoints(checkpoints)
    chosen, explicit = parse_analyses(analyses)
    if num_images is not None and num_images < 1:
        raise ParameterError("num_images", f"num_images must be a positive number, not {num_images}")
    if fewshot_num_images is not None and fewshot_num_images < 1:
        raise ParameterError("fewshot_num_images", f"fewshot_num_images must be positive, not {fewshot_num_images}")
    out = Path(out).expanduser()
    load = {k: v for k, v in dict(load_options or {}).items() if v is not None}
    options = {
        "data": str(data),
        "split": split,
        "num_images": num_images,
        "fewshot_num_images": fewshot_num_images,
        "shots": [int(s) for s in shots],
        "seeds": int(seeds),
        "l2": l2,
        "minibatch_size": int(minibatch_size),
    }
    with tempfile.TemporaryDirectory(prefix="vitlens-compare-") as tmp:
        session = _Session(
            out=out,
            staging=Path(tmp),
            options=options,
            load_options=load,
            use_cache=use_cache,
            cache_dir=None if cache_dir is None else Path(cache_dir),
            batch_size=batch_size,
        )
        results: list[dict[str, Result]] = []
        computed: dict[str, tuple[str, ...]] = {}
        for i, ckpt in enumerate(found):
            if on_step is not None:
                on_step(ckpt.name, i, len(found))
            chosen, by_analysis, new = _checkpoint(session, ckpt, found[-1], chosen, explicit)
            results.append(by_analysis)
            computed[ckpt.name] = new
        if on_step is not None:
            on_step("", len(found), len(found))
        rows = tuple(
            Row(ckpt.name, ckpt.epoch, a, q, layer, None if v is None else float(v))
            for ckpt, by_analysis in zip(found, results, strict=True)
            for a in chosen
            for q, layer, v in analysis_numbers(by_analysis[a])
        )
        trends = trend_data(found, rows, run=run)
        figures = _figures(trends)  # built before anything is written: a plotting error leaves out untouched
        out = ensure_out_dir(out)
        _commit_cache(session)
    summary = {
        "status": "ok",
        "x": "epoch" if run else "model",
        "data": str(data),
        "analyses": list(chosen),
        "options": {k: v for k, v in options.items() if k != "data"},
        "load": {k: str(v) for k, v in load.items()},
        "models": [
            {
                "name": c.name,
                "epoch": c.epoch,
                "checkpoint": c.spec,
                "identity": session.identities.get(c.spec, ""),
                "computed": list(computed[c.name]),
                "cache": {a: _cache_rel(session, c.spec, a) for a in chosen},
            }
            for c in found
        ],
        "numbers": _numbers(found, rows),
        "seconds": round(time.perf_counter() - started, 3),
        "versions": versions(),
    }
    summary = finite(summary)
    files = _write_outputs(out, summary, rows, trends, figures)
    return CompareResult(out, found, run, chosen, rows, computed, summary, tuple(files))


def _checkpoint(
    session: _Session, ckpt: Checkpoint, last: Checkpoint, chosen: tuple[str, ...], explicit: bool
) -> tuple[tuple[str, ...], dict[str, Result], tuple[str, ...]]:
    """One checkpoint's results: read from the cache where the key matches, else computed into the staging folder.

    Under torchrun rank 0 alone reads the cache (``out`` need exist on its node only) and sends what it found to
    the others, so every rank skips the same analyses and joins the same sharded computations (a rank that
    computed alone would wait forever in a collective). After a computation rank 0 saves the result, reads it
    back and sends that to the others: every rank holds the numbers of the files, as one process does.
    """
    import gc

    from vitlens import distributed
    from vitlens.io import write_json
    from vitlens.result import load_result

    identity = _identity(session, ckpt.spec)
    keys = {analysis: _key(session, ckpt.spec, identity, analysis, last) for analysis in chosen}
    found = None
    if distributed.is_main():
        found = {a: _read_entry(_entry(session.out, identity, a), a, keys[a]) for a in chosen}
    found = distributed.broadcast_object(found)  # rank 0's hits, on every rank
    by_analysis: dict[str, Result] = {a: r for a, r in found.items() if r is not None}
    missing = [(a, keys[a]) for a in chosen if found[a] is None]
    if not missing:
        return chosen, by_analysis, ()
    vit = _load(session, ckpt.spec)
    if any(a == "fewshot" for a, _ in missing) and not explicit and not _labelled(vit, session.options):
        from vitlens.log import logger

        logger.warning(f"compare: {session.options['data']} has no labels; few-shot is left out")
        chosen = tuple(a for a in chosen if a != "fewshot")
        missing = [(a, k) for a, k in missing if a != "fewshot"]
    for analysis, key in missing:
        result = _compute(session, analysis, vit, ckpt, last)  # sharded under torchrun: every rank takes part
        back = None
        if distributed.is_main():
            folder = _entry(session.staging, identity, analysis)
            result.save(folder)
            write_json(folder / KEY_FILE, key)
            back = load_result(folder, analysis)  # what a later run reads back: one code path
        by_analysis[analysis] = distributed.broadcast_object(back)
    if vit is not session.reference:
        del vit
        gc.collect()
    return chosen, by_analysis, tuple(a for a, _ in missing)


def _compute(session: _Session, analysis: str, vit: ViT, ckpt: Checkpoint, last: Checkpoint) -> Result:
    import vitlens.definitions.attention_distance as ad
    import vitlens.definitions.cka as cka_def
    import vitlens.definitions.fewshot as fs
    import vitlens.definitions.filters as fl
    import vitlens.definitions.pos_sim as ps

    o = session.options
    if analysis == "pos-sim":
        return ps.pos_sim(vit)
    if analysis == "filters":
        return fl.filters(vit)
    if analysis == "attention-distance":
        return ad.attention_distance(
            vit, o["data"], num_images=o["num_images"], split=o["split"], batch_size=session.batch_size
        )
    if analysis == "fewshot":
        return fs.fewshot(
            vit,
            o["data"],
            shots=o["shots"],
            seeds=o["seeds"],
            l2=o["l2"],
            num_images=o["fewshot_num_images"],
            batch_size=session.batch_size,
            cache_dir=session.cache_dir,
            use_cache=session.use_cache,
        )
    reference = _reference(session, last)
    if reference.depth != vit.depth:
        raise ParameterError(
            "checkpoints",
            f"checkpoints: CKA per layer needs models of one depth, and {ckpt.name} has {vit.depth} layers while "
            f"the last, {last.name}, has {reference.depth}; leave cka out with --analyses",
        )
    return cka_def.cka(
        vit,
        o["data"],
        reference,
        tokens="mean-patch",
        num_images=o["num_images"] if o["num_images"] is not None else defaults.CKA_NUM_IMAGES,
        split=o["split"],  # type: ignore[arg-type]
        minibatch_size=o["minibatch_size"],
        batch_size=session.batch_size,
    )


def _labelled(vit: ViT, options: Mapping[str, Any]) -> bool:
    from vitlens.data import open_dataset

    return open_dataset(options["data"], vit.preprocess, split="train").labels is not None


def _load(session: _Session, spec: str) -> ViT:
    from vitlens.models.load import load_vit

    if session.reference is not None and spec == session.reference_spec:
        return session.reference
    return load_vit(spec, **session.load_options)


def _reference(session: _Session, last: Checkpoint) -> ViT:
    """The last checkpoint, loaded once and kept while CKA entries are computed."""
    if session.reference is None or session.reference_spec != last.spec:
        session.reference = _load(session, last.spec)
        session.reference_spec = last.spec
    return session.reference


def _identity(session: _Session, spec: str) -> str:
    """The checkpoint's identity: SHA-256 of a file (no model is built), else :attr:`ViT.identity`."""
    if spec not in session.identities:
        from vitlens.models.checkpoint import file_sha256

        path = Path(spec).expanduser()
        # A folder or a timm name: the loader knows the identity (a timm name without one: its spec).
        is_file = path.is_file()
        session.identities[spec] = (
            "sha256:" + file_sha256(path) if is_file else _load(session, spec).identity or f"spec:{spec}"
        )
    return session.identities[spec]


def _key(session: _Session, spec: str, identity: str, analysis: str, last: Checkpoint) -> dict[str, Any]:
    """What a cached entry was computed from: any difference means recomputing it."""
    o = session.options
    relevant: dict[str, Any] = {}
    if analysis in ("attention-distance", "cka"):
        relevant = {k: o[k] for k in ("data", "split", "num_images")}
    if analysis == "fewshot":
        relevant = {k: o[k] for k in ("data", "fewshot_num_images", "shots", "seeds", "l2")}
    if analysis == "cka":
        relevant["minibatch_size"] = o["minibatch_size"]
        relevant["tokens"] = "mean-patch"
        relevant["reference"] = _identity(session, last.spec)  # CKA is to the last checkpoint: a new last changes it
    load = {k: str(v) for k, v in session.load_options.items() if k != "device"}  # the device changes no number
    return finite(
        {"format": CACHE_FORMAT, "identity": identity, "analysis": analysis, "options": relevant, "load": load}
    )


def _entry(root: Path, identity: str, analysis: str) -> Path:
    return root / CACHE_FOLDER / hashlib.sha256(identity.encode()).hexdigest()[:16] / analysis


def _cache_rel(session: _Session, spec: str, analysis: str) -> str:
    return _entry(Path("."), session.identities.get(spec, ""), analysis).as_posix()


def _read_entry(folder: Path, analysis: str, key: dict[str, Any]) -> Result | None:
    """A cached result whose key matches ``key``; None when absent, stale or unreadable (it is then recomputed)."""
    from vitlens.result import load_result

    try:
        if json.loads((folder / KEY_FILE).read_text(encoding="utf-8")) != key:
            return None
        return load_result(folder, analysis)
    except (OSError, ValueError, KeyError, VitlensError):
        return None


def _commit_cache(session: _Session) -> None:
    """Move the entries computed in this call from the staging folder into ``out/cache`` (replacing stale ones)."""
    staged = session.staging / CACHE_FOLDER
    if not staged.is_dir():
        return
    for model_dir in sorted(staged.iterdir()):
        for entry in sorted(model_dir.iterdir()):
            target = session.out / CACHE_FOLDER / model_dir.name / entry.name
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(entry), str(target))


# --------------------------------------------------------------------------------------------------------------
# Figures' data


@dataclass(frozen=True)
class Trend:
    """One panel of a trend figure: numbers per model, in table order.

    Attributes:
        title: the panel's title.
        ylabel: its y axis.
        x: the epochs (a run) or the model names (a list).
        lines: label -> one value per model (None where missing).
        bands: label -> (low, high) per model, drawn around the line of the same label (the spread of the heads).
    """

    title: str
    ylabel: str
    x: tuple[int | str, ...]
    lines: Mapping[str, tuple[float | None, ...]]
    bands: Mapping[str, tuple[tuple[float | None, ...], tuple[float | None, ...]]] = field(default_factory=dict)

    @property
    def by_epoch(self) -> bool:
        return all(isinstance(v, int) for v in self.x)


def trend_data(checkpoints: Sequence[Checkpoint], rows: Sequence[Row], *, run: bool) -> dict[str, list[Trend]]:
    """The panels of each analysis's trend figure (``compare_<analysis>.png``), from the table's rows."""
    x: tuple[int | str, ...] = tuple(c.epoch if run and c.epoch is not None else c.name for c in checkpoints)
    names = [c.name for c in checkpoints]
    table = {(r.model, r.analysis, r.quantity, r.layer): r.value for r in rows}
    present = {(r.analysis, r.quantity, r.layer) for r in rows}

    def series(analysis: str, quantity: str, layer: int | None = None) -> tuple[float | None, ...]:
        return tuple(table.get((n, analysis, quantity, layer)) for n in names)

    def layers(analysis: str, quantity: str) -> list[int]:
        return sorted(layer for a, q, layer in present if a == analysis and q == quantity and layer is not None)

    def quantities(analysis: str) -> list[str]:
        seen = []
        for r in rows:
            if r.analysis == analysis and r.quantity not in seen:
                seen.append(r.quantity)
        return seen

    analyses = [a for a in ANALYSES if any(r.analysis == a for r in rows)]
    trends: dict[str, list[Trend]] = {}
    for analysis in analyses:
        if analysis == "attention-distance":
            ls = layers(analysis, "mean_px")
            mean = Trend(
                "mean attention distance (line: mean of the heads; band: min to max head)",
                "distance (px)",
                x,
                {f"layer {layer}": series(analysis, "mean_px", layer) for layer in ls},
                {
                    f"layer {layer}": (series(analysis, "head_min_px", layer), series(analysis, "head_max_px", layer))
                    for layer in ls
                },
            )
            spread = Trend(
                "spread of the heads (std over heads)",
                "std of head distances (px)",
                x,
                {f"layer {layer}": series(analysis, "head_std_px", layer) for layer in ls},
            )
            trends[analysis] = [mean, spread]
        elif analysis == "cka":
            ls = layers(analysis, "cka_to_last")
            lines = {f"layer {layer}": series(analysis, "cka_to_last", layer) for layer in ls}
            trends[analysis] = [Trend("linear CKA to the last checkpoint, layer by layer", "CKA", x, lines)]
        elif analysis == "fewshot":
            lines = {
                q.removeprefix("accuracy_").replace("shot", "-shot"): series(analysis, q) for q in quantities(analysis)
            }
            trends[analysis] = [Trend("few-shot accuracy (ridge probe, pre-logits)", "accuracy", x, lines)]
        elif analysis == "pos-sim":
            lines = {q.replace("_", " "): series(analysis, q) for q in quantities(analysis)}
            trends[analysis] = [Trend("position-embedding structure", "score", x, lines)]
        else:
            shares = {
                q.replace("_", " "): series(analysis, q) for q in quantities(analysis) if q != "components_for_90pct"
            }
            needed = {"components for 90%": series(analysis, "components_for_90pct")}
            trends[analysis] = [
                Trend("patch-embedding filters: explained variance", "share of variance", x, shares),
                Trend("patch-embedding filters: components for 90% of the variance", "components", x, needed),
            ]
    return trends


def _figures(trends: Mapping[str, list[Trend]]) -> dict[str, Any]:
    from vitlens.plotting.compare import trend_figure

    return {analysis: trend_figure(panels) for analysis, panels in trends.items()}


def _numbers(checkpoints: Sequence[Checkpoint], rows: Sequence[Row]) -> dict[str, dict[str, Any]]:
    """``summary.json``'s numbers: model -> analysis -> quantity -> value (or a list over layers)."""
    numbers: dict[str, dict[str, Any]] = {c.name: {} for c in checkpoints}
    for r in rows:
        slot = numbers[r.model].setdefault(r.analysis, {})
        if r.layer is None:
            slot[r.quantity] = r.value
        else:
            slot.setdefault(r.quantity, []).append(r.value)  # rows come layer by layer, from layer 0
    return numbers


# --------------------------------------------------------------------------------------------------------------
# Files


def _write_outputs(
    out: Path, summary: dict[str, Any], rows: Sequence[Row], trends: Mapping[str, list[Trend]], figures: Mapping
) -> list[Path]:
    from vitlens.io import write_json, write_text
    from vitlens.plotting.style import save_figure

    files = [save_figure(fig, out / f"compare_{a.replace('-', '_')}.png") for a, fig in figures.items()]
    files.append(write_text(out / "compare.csv", "\n".join([CSV_HEADER, *(r.csv() for r in rows)]) + "\n"))
    files.append(write_json(out / "summary.json", summary))
    files.append(write_text(out / "report.md", render_markdown(summary)))
    files.append(write_text(out / "index.html", render_html(summary, out)))
    return files


def _wide(summary: dict[str, Any], analysis: str) -> tuple[list[str], list[list[str]]]:
    """One analysis's numbers as a table: a row per model, a column per quantity (and layer)."""
    header = ["model"]
    rows = []
    for m in summary["models"]:
        numbers = summary["numbers"][m["name"]].get(analysis, {})
        cells = [m["name"] if m["epoch"] is None or summary["x"] == "model" else f"{m['epoch']}"]
        for quantity, value in numbers.items():
            values = value if isinstance(value, list) else [value]
            for i, v in enumerate(values):
                column = quantity if not isinstance(value, list) else f"{quantity}[{i}]"
                if column not in header:
                    header.append(column)
                cells.append("n/a" if v is None else f"{v:.4g}")
        rows.append(cells)
    if summary["x"] == "epoch":
        header[0] = "epoch"
    return header, rows


def _model_rows(summary: dict[str, Any]) -> list[list[str]]:
    """The models table of both pages: name, epoch (empty outside a run), checkpoint, analyses computed now."""
    return [
        [m["name"], "" if m["epoch"] is None else str(m["epoch"]), m["checkpoint"], ", ".join(m["computed"])]
        for m in summary["models"]
    ]


def render_html(summary: dict[str, Any], out: Path) -> str:
    """One self-contained page: the models, then each analysis's trend figure (PNG inlined) and its numbers."""
    import html

    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>vitlens compare: {len(summary['models'])} models</title><style>{PLAIN_CSS}</style></head><body>",
        f"<h1>vitlens compare: {len(summary['models'])} models</h1>",
        f"<p>x axis: {esc(summary['x'])} &middot; data {esc(summary['data'])} &middot; {summary['seconds']:.1f} s</p>",
        "<h2>Models</h2>",
        html_table(["model", "epoch", "checkpoint", "computed now (others cached)"], _model_rows(summary)),
    ]
    for analysis in summary["analyses"]:
        parts.append(f'<h2 id="{esc(analysis)}">{esc(analysis)}</h2>')
        png = out / f"compare_{analysis.replace('-', '_')}.png"
        if png.is_file():
            parts.append(png_figure(png.read_bytes(), png.name))
        header, rows = _wide(summary, analysis)
        parts.append(html_table(header, rows))
    parts += ["<h2>Versions</h2>", html_table(None, [[k, str(v)] for k, v in summary["versions"].items()])]
    parts.append('<p><a href="compare.csv">compare.csv</a> &middot; <a href="summary.json">summary.json</a> &middot; '
                 '<a href="report.md">report.md</a></p>')  # fmt: skip
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_markdown(summary: dict[str, Any]) -> str:
    """The comparison as Markdown, figures linked by relative path."""
    lines = [
        f"# vitlens compare: {len(summary['models'])} models",
        "",
        f"x axis: {summary['x']} · data `{markdown_cell(summary['data'])}` · {summary['seconds']:.1f} s",
        "",
        markdown_table(
            ["model", "epoch", "checkpoint", "computed now"], _model_rows(summary), align=[None, "right", None, None]
        ),
    ]
    for analysis in summary["analyses"]:
        header, rows = _wide(summary, analysis)
        lines += ["", f"## {analysis}", "", f"![{analysis}](compare_{analysis.replace('-', '_')}.png)", ""]
        lines.append(markdown_table(header, rows))
    lines += ["", "versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()), ""]
    return "\n".join(lines)
