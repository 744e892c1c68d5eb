"""`vitlens explain`: class-specific relevance maps of images (Chefer et al. 2021 attribution, gradient-weighted
rollout, the last layer's attention x gradient, and plain rollout to compare), and with --faithfulness the
perturbation tests that say which map to trust."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vitlens import defaults
from vitlens.cli.console import err_console, out_console, progress_bar, run_metadata, save_and_print
from vitlens.cli.options import (
    BatchSizeOpt,
    DataRootOpt,
    DownloadOpt,
    FormatOpt,
    JsonOpt,
    ModelOptions,
    NumImagesOpt,
    OutOpt,
    QuietOpt,
    SplitOpt,
    check_format,
    check_num_images,
    with_model_options,
)
from vitlens.cli.rollout import DiscardRatioOpt, ImagesArg, SourceDataOpt, TargetOpt
from vitlens.device import resolve_batch_size
from vitlens.errors import UsageError

if TYPE_CHECKING:
    from vitlens.data import ImageDataset
    from vitlens.definitions.explain import ExplainResult, FaithfulnessResult

EXPLAIN_PANEL = "Explain"
FAITHFULNESS_PANEL = "Faithfulness"

MethodOpt = Annotated[
    str,
    typer.Option(
        "--method",
        help="attribution (Chefer et al. 2021) | grad-rollout | last-layer | rollout (class-agnostic).",
        rich_help_panel=EXPLAIN_PANEL,
    ),
]
ClassOpt = Annotated[
    str,
    typer.Option(
        "--class",
        help="Class to explain: pred (each image's prediction), an index, or a class name.",
        rich_help_panel=EXPLAIN_PANEL,
    ),
]
ScoreOpt = Annotated[
    str,
    typer.Option(
        "--score",
        help="logit (the class logit), or cosine:IMAGE: the pooled feature's cosine similarity to IMAGE's "
        "(explains a backbone without a head).",
        rich_help_panel=EXPLAIN_PANEL,
    ),
]

FaithfulnessOpt = Annotated[
    bool,
    typer.Option(
        "--faithfulness",
        help="Judge the maps instead of drawing them: remove patches in each method's order (deletion, negative "
        "perturbation, insertion) and record the class probability; areas per method and a random baseline.",
        rich_help_panel=FAITHFULNESS_PANEL,
    ),
]
MethodsOpt = Annotated[
    str | None,
    typer.Option(
        "--methods",
        help="With --faithfulness: the methods to judge, comma-separated (default: "
        + ",".join(defaults.FAITHFULNESS_METHODS)
        + ").",
        rich_help_panel=FAITHFULNESS_PANEL,
        show_default=False,
    ),
]
RemovalOpt = Annotated[
    str,
    typer.Option(
        "--removal",
        help="With --faithfulness: drop (patch tokens leave the sequence) | mean (pixels set to the normalisation "
        "mean) | blur (pixels from a copy blurred with sigma one patch).",
        rich_help_panel=FAITHFULNESS_PANEL,
    ),
]
StepsOpt = Annotated[
    int,
    typer.Option(
        "--steps",
        help="With --faithfulness: points per curve minus one (10: steps of 10 %).",
        rich_help_panel=FAITHFULNESS_PANEL,
    ),
]
SeedOpt = Annotated[
    int,
    typer.Option(
        "--seed", help="With --faithfulness: seed of the random-order baseline.", rich_help_panel=FAITHFULNESS_PANEL
    ),
]


@with_model_options
def explain(
    vit_options: ModelOptions,
    images: ImagesArg = None,
    data: SourceDataOpt = None,
    split: SplitOpt = "test",
    num_images: NumImagesOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    batch_size: BatchSizeOpt = None,
    method: MethodOpt = defaults.EXPLAIN_METHOD,
    class_: ClassOpt = defaults.EXPLAIN_CLASS,
    score: ScoreOpt = defaults.EXPLAIN_SCORE,
    target: TargetOpt = None,
    discard_ratio: DiscardRatioOpt = defaults.EXPLAIN_DISCARD_RATIO,
    faithfulness: FaithfulnessOpt = False,
    methods: MethodsOpt = None,
    removal: RemovalOpt = defaults.FAITHFULNESS_REMOVAL,
    steps: StepsOpt = defaults.FAITHFULNESS_STEPS,
    seed: SeedOpt = defaults.FAITHFULNESS_SEED,
    out: OutOpt = Path("vitlens-out"),
    fmt: FormatOpt = "png",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Class-specific relevance maps: which patches made the model give --class its score.

    Writes explain/<image>.png, explain.png (more than one image), explain.npz and explain.json to --out; with
    --faithfulness, faithfulness.png, faithfulness.csv, faithfulness.npz and explain.json.
    """
    from vitlens.attention import default_target
    from vitlens.data import open_dataset
    from vitlens.definitions.explain import check_faithfulness_options, check_options, explain_faithfulness
    from vitlens.definitions.explain import explain as compute

    started = time.perf_counter()
    if faithfulness:
        if method != defaults.EXPLAIN_METHOD:
            raise UsageError(
                "--method picks one map; with --faithfulness name the methods to judge with --methods a,b,c"
            )
        if score != defaults.EXPLAIN_SCORE:
            raise UsageError("--faithfulness reads class probabilities; --score cosine:IMAGE has none")
        if discard_ratio:
            raise UsageError("--discard-ratio does not apply to --faithfulness (the maps keep every weight)")
        methods = check_faithfulness_options(
            methods if methods is not None else defaults.FAITHFULNESS_METHODS, removal, steps, seed, class_
        )
    elif methods is not None:
        raise UsageError("--methods applies to --faithfulness; one map's method is --method")
    else:
        check_options(method, discard_ratio, class_, score)  # before loading anything
    check_num_images(num_images)
    fmt = check_format(fmt)
    vit_options, images = vit_options.images_first(images)
    if images and data is not None:
        raise UsageError("give IMAGE files or --data, not both")
    if not images and data is None:
        if faithfulness:
            raise UsageError("no images: pass --data SPEC [--num-images N] (or IMAGE files, without labels)")
        raise UsageError("no images: pass IMAGE files (or a folder), or --data SPEC [--num-images N]")

    vit = vit_options.load()
    batch_size = resolve_batch_size(batch_size, vit.device)
    source: ImageDataset | list[str] = images
    if data is not None:
        count = num_images or (defaults.FAITHFULNESS_NUM_IMAGES if faithfulness else defaults.ROLLOUT_DATA_IMAGES)
        source = open_dataset(
            data, vit.preprocess, split=split, num_images=count, data_root=data_root, download=download
        )
        num_images = None  # the dataset is that subset
    if faithfulness:
        with progress_bar("faithfulness", enabled=not quiet) as progress:
            judged = explain_faithfulness(
                vit,
                source,
                methods=methods,
                removal=removal,
                steps=steps,
                class_=class_,
                target=target,
                seed=seed,
                num_images=num_images,
                batch_size=batch_size,
                progress=progress,
            )
        meta = run_metadata(started, command="explain --faithfulness", device=str(vit.device), batch_size=batch_size)
        save_and_print(
            judged,
            out,
            fmt,
            meta,
            json_=json_,
            quiet=quiet,
            summarise=lambda files: _summarise_faithfulness(judged, out, files),
        )
        return
    if target is None and default_target(vit.layout) != "cls" and not quiet:
        err_console().print(
            f"[yellow]note:[/] the model has no class token; explain reads --target {default_target(vit.layout)}"
        )
    with progress_bar("explain", enabled=not quiet) as progress:
        result = compute(
            vit,
            source,
            method=method,  # type: ignore[arg-type]
            class_=class_,
            score=score,
            target=target,
            discard_ratio=discard_ratio,
            num_images=num_images,
            batch_size=batch_size,
            progress=progress,
        )
    meta = run_metadata(started, command="explain", device=str(vit.device), batch_size=batch_size)
    save_and_print(
        result, out, fmt, meta, json_=json_, quiet=quiet, summarise=lambda files: _summarise(result, out, files)
    )


def _summarise_faithfulness(result: FaithfulnessResult, out: Path, files: list[Path]) -> None:
    from rich.table import Table

    from vitlens.analysis.faithfulness import CURVES

    f = result.faithfulness
    prob, acc = f.probability_areas(), f.accuracy_areas()
    table = Table(title=f"faithfulness: area under the curves, {f.removal} removal", title_justify="left")
    table.add_column("method", justify="left")
    for curve, better in zip(CURVES, ("lower", "higher", "higher"), strict=True):
        table.add_column(f"{curve} ({better} is faithful)", justify="right")
    for i, m in enumerate(f.methods):
        cells = [f"{prob[i, j]:.3f}" + ("" if acc is None else f" / acc {acc[i, j]:.3f}") for j in range(len(CURVES))]
        table.add_row(m, *cells)
    console = out_console()
    console.print(table)
    console.print(f"wrote {len(files)} files to {out}")


def _summarise(result: ExplainResult, out: Path, files: list[Path]) -> None:
    import numpy as np
    from rich.table import Table

    from vitlens.plotting.explain import explanation_settings

    e = result.explanation
    table = Table(title=explanation_settings(e), title_justify="left")
    score = "score" if result.score == "logit" else "cosine"
    for name, justify in (("image", "left"), ("class", "left"), (score, "right"), ("peak patch (row, col)", "right")):
        table.add_column(name, justify=justify)
    for i, name in enumerate(result.images):
        row, col = np.unravel_index(int(np.argmax(e.maps[i])), e.maps[i].shape)
        label = "-" if e.classes[i] < 0 else result.class_names[i] if result.class_names else str(int(e.classes[i]))
        table.add_row(name, label, f"{e.scores[i]:.3f}", f"({row}, {col})")
    console = out_console()
    console.print(table)
    console.print(f"wrote {len(files)} files to {out}")
