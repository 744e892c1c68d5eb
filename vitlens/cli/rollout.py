"""`vitlens rollout`: attention rollout maps of images (Abnar & Zuidema 2020; ViT paper Fig. 6, App. D.8)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vitlens import defaults
from vitlens.cli.console import err_console, out_console, progress_bar, run_metadata, save_and_print
from vitlens.cli.options import (
    DATA_PANEL,
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
from vitlens.definitions.rollout import rollout_settings
from vitlens.device import resolve_batch_size
from vitlens.errors import UsageError

if TYPE_CHECKING:
    from vitlens.data import ImageDataset
    from vitlens.definitions.rollout import RolloutResult

ROLLOUT_PANEL = "Rollout"

ImagesArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="Image files, or one folder of images. MODEL may be left out: a first argument that is an image "
        "or a folder is taken as an image.",
        show_default=False,
        metavar="IMAGE",
    ),
]
SourceDataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Take the images from this data spec instead of IMAGE... (digits, cifar10, ..., DIR); "
        f"{defaults.ROLLOUT_DATA_IMAGES} images unless --num-images.",
        rich_help_panel=DATA_PANEL,
    ),
]
HeadFusionOpt = Annotated[
    str,
    typer.Option("--head-fusion", help="mean | max | min over heads.", rich_help_panel=ROLLOUT_PANEL),
]
DiscardRatioOpt = Annotated[
    float,
    typer.Option(
        "--discard-ratio",
        help="Fraction in [0, 1) of each layer's weakest patch-to-patch weights set to 0 (prefix rows/columns kept).",
        rich_help_panel=ROLLOUT_PANEL,
    ),
]
StartLayerOpt = Annotated[
    int, typer.Option("--start-layer", help="First layer multiplied in (0-based).", rich_help_panel=ROLLOUT_PANEL)
]
TargetOpt = Annotated[
    str | None,
    typer.Option(
        "--target",
        help="Row the map is read from: cls | dist | reg:N | mean-patch. Default cls, or mean-patch for models "
        "without a class token.",
        show_default=False,
        rich_help_panel=ROLLOUT_PANEL,
    ),
]
PerHeadOpt = Annotated[
    bool,
    typer.Option(
        "--per-head", help="Also draw the target's attention in --layer for every head.", rich_help_panel=ROLLOUT_PANEL
    ),
]
LayerOpt = Annotated[
    int | None,
    typer.Option(
        "--layer",
        help="Layer of --per-head (0-based, negative from the end; default the last).",
        show_default=False,
        rich_help_panel=ROLLOUT_PANEL,
    ),
]
ThresholdOpt = Annotated[
    float | None,
    typer.Option(
        "--threshold",
        help="With --per-head, also draw per head the smallest set of patches holding this share in (0, 1] of its "
        "attention on patches (prefix tokens and registers left out), as DINO's masks; e.g. 0.6.",
        show_default=False,
        rich_help_panel=ROLLOUT_PANEL,
    ),
]


@with_model_options
def rollout(
    vit_options: ModelOptions,
    images: ImagesArg = None,
    data: SourceDataOpt = None,
    split: SplitOpt = "test",
    num_images: NumImagesOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    batch_size: BatchSizeOpt = None,
    head_fusion: HeadFusionOpt = defaults.ROLLOUT_HEAD_FUSION,
    discard_ratio: DiscardRatioOpt = defaults.ROLLOUT_DISCARD_RATIO,
    start_layer: StartLayerOpt = defaults.ROLLOUT_START_LAYER,
    target: TargetOpt = None,
    per_head: PerHeadOpt = False,
    layer: LayerOpt = None,
    threshold: ThresholdOpt = None,
    out: OutOpt = Path("vitlens-out"),
    fmt: FormatOpt = "png",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Attention rollout of each image: where the class token (or --target) draws its information from.

    Writes rollout/<image>.png, rollout.png (more than one image), rollout.npz and rollout.json to --out (with
    --per-head also rollout_heads_L<l>.png, and with --threshold rollout_heads_L<l>_masks.png).
    """
    from vitlens.attention import default_target
    from vitlens.data import open_dataset
    from vitlens.definitions.rollout import check_options, check_threshold
    from vitlens.definitions.rollout import rollout as compute

    started = time.perf_counter()
    # Validate the command line before loading anything.
    check_options(head_fusion, discard_ratio, start_layer)
    if layer is not None and not per_head:
        raise UsageError("--layer chooses the layer of --per-head; add --per-head")
    if threshold is not None and not per_head:
        raise UsageError("--threshold cuts masks from the --per-head maps; add --per-head")
    check_threshold(threshold)
    check_num_images(num_images)
    fmt = check_format(fmt)
    vit_options, images = vit_options.images_first(images)
    if images and data is not None:
        raise UsageError("give IMAGE files or --data, not both")
    if not images and data is None:
        raise UsageError("no images: pass IMAGE files (or a folder), or --data SPEC [--num-images N]")

    vit = vit_options.load()
    batch_size = resolve_batch_size(batch_size, vit.device)
    source: ImageDataset | list[str] = images
    if data is not None:
        source = open_dataset(
            data,
            vit.preprocess,
            split=split,
            num_images=num_images or defaults.ROLLOUT_DATA_IMAGES,
            data_root=data_root,
            download=download,
        )
        num_images = None  # the dataset is that subset
    if target is None and default_target(vit.layout) != "cls" and not quiet:
        err_console().print(
            f"[yellow]note:[/] the model has no class token; rollout reads --target {default_target(vit.layout)}"
        )
    per_head_layer = (-1 if layer is None else layer) if per_head else None
    with progress_bar("rollout", enabled=not quiet) as progress:
        result = compute(
            vit,
            source,
            head_fusion=head_fusion,
            discard_ratio=discard_ratio,
            start_layer=start_layer,
            target=target,
            per_head_layer=per_head_layer,
            threshold=threshold,
            num_images=num_images,
            batch_size=batch_size,
            progress=progress,
        )
    meta = run_metadata(started, command="rollout", device=str(vit.device), batch_size=batch_size)
    save_and_print(
        result, out, fmt, meta, json_=json_, quiet=quiet, summarise=lambda files: _summarise(result, out, files)
    )


def _summarise(result: RolloutResult, out: Path, files: list[Path]) -> None:
    import numpy as np
    from rich.table import Table

    table = Table(title=f"attention rollout: {rollout_settings(result.rollout)}", title_justify="left")
    for name, justify in (("image", "left"), ("peak patch (row, col)", "right"), ("mass on patches", "right")):
        table.add_column(name, justify=justify)
    maps, masses = result.rollout.maps, result.rollout.patch_mass
    for name, rollout_map, mass in zip(result.images, maps, masses, strict=True):
        row, col = np.unravel_index(int(np.argmax(rollout_map)), rollout_map.shape)
        table.add_row(name, f"({row}, {col})", f"{mass:.3f}")
    console = out_console()
    console.print(table)
    console.print(f"wrote {len(files)} files to {out}")
