"""`vitlens explain`: class-specific relevance maps of images (Chefer et al. 2021 attribution, gradient-weighted
rollout, the last layer's attention x gradient, and plain rollout to compare)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vitlens import defaults
from vitlens.cli.console import err_console, out_console, print_json, progress_bar, run_metadata
from vitlens.cli.options import (
    ArchOpt,
    BatchSizeOpt,
    CheckpointKeyOpt,
    CropPctOpt,
    DataRootOpt,
    DeviceOpt,
    DownloadOpt,
    FormatOpt,
    ImgSizeOpt,
    InterpolationOpt,
    JsonOpt,
    MeanOpt,
    ModelArg,
    ModelKwargsOpt,
    ModelOptions,
    NumHeadsOpt,
    NumImagesOpt,
    OutOpt,
    PretrainedOpt,
    QuietOpt,
    SplitOpt,
    StdOpt,
    check_format,
    check_num_images,
)
from vitlens.cli.rollout import DiscardRatioOpt, ImagesArg, SourceDataOpt, TargetOpt
from vitlens.device import resolve_batch_size
from vitlens.errors import UsageError

if TYPE_CHECKING:
    from vitlens.data import ImageDataset
    from vitlens.definitions.explain import ExplainResult

EXPLAIN_PANEL = "Explain"

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


def explain(
    model: ModelArg = None,
    images: ImagesArg = None,
    arch: ArchOpt = None,
    num_heads: NumHeadsOpt = None,
    model_kwargs: ModelKwargsOpt = None,
    img_size: ImgSizeOpt = None,
    device: DeviceOpt = "auto",
    pretrained: PretrainedOpt = True,
    checkpoint_key: CheckpointKeyOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    crop_pct: CropPctOpt = None,
    interpolation: InterpolationOpt = None,
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
    out: OutOpt = Path("vitlens-out"),
    fmt: FormatOpt = "png",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Class-specific relevance maps: which patches made the model give --class its score.

    Writes explain/<image>.png, explain.png (more than one image), explain.npz and explain.json to --out.
    """
    from vitlens.attention import default_target
    from vitlens.data import IMAGE_EXTENSIONS, open_dataset
    from vitlens.definitions.explain import check_options
    from vitlens.definitions.explain import explain as compute

    started = time.perf_counter()
    check_options(method, discard_ratio, class_, score)  # before loading anything
    check_num_images(num_images)
    fmt = check_format(fmt)
    images = list(images or [])
    if model is not None and (Path(model).suffix.lower() in IMAGE_EXTENSIONS or Path(model).expanduser().is_dir()):
        images, model = [model, *images], None  # `vitlens explain photo.jpg`: the default model on a photo
    if images and data is not None:
        raise UsageError("give IMAGE files or --data, not both")
    if not images and data is None:
        raise UsageError("no images: pass IMAGE files (or a folder), or --data SPEC [--num-images N]")

    vit = ModelOptions.of(locals()).load()
    batch_size = resolve_batch_size(batch_size, vit.device)
    source: ImageDataset | list[str] = images
    if data is not None:
        count = num_images or defaults.ROLLOUT_DATA_IMAGES
        source = open_dataset(
            data, vit.preprocess, split=split, num_images=count, data_root=data_root, download=download
        )
        num_images = None  # the dataset is that subset
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
    files = result.save(out, fmt, meta=meta)
    if json_:
        print_json({**result.to_dict(), "files": [str(f) for f in files], "meta": meta})
    elif not quiet:
        _summarise(result, out, files)


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
