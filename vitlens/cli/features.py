"""`vitlens features`: PCA of the patch tokens of images as RGB, with a foreground split (DINOv2 paper Fig. 1)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vitlens import defaults
from vitlens.cli.console import out_console, progress_bar, run_metadata, save_and_print
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
from vitlens.device import resolve_batch_size
from vitlens.errors import UsageError

if TYPE_CHECKING:
    from vitlens.data import ImageDataset
    from vitlens.definitions.features_pca import FeaturesPCAResult

FEATURES_PANEL = "Features"

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
LayerOpt = Annotated[
    int,
    typer.Option(
        "--layer",
        help="Block whose patch tokens are analysed (0-based, negative from the end). The last block reads the "
        "final norm's output; any other block its raw output.",
        rich_help_panel=FEATURES_PANEL,
    ),
]
ComponentsOpt = Annotated[
    int,
    typer.Option(
        "--components",
        help="Principal components kept (the first three are the RGB map).",
        rich_help_panel=FEATURES_PANEL,
    ),
]
ForegroundOpt = Annotated[
    str,
    typer.Option(
        "--foreground",
        help="auto | none | THRESHOLD: fit on the patches whose first-component score (oriented so that the "
        "side with fewer border patches is positive) is above 0 (auto) or THRESHOLD; none fits on all patches.",
        rich_help_panel=FEATURES_PANEL,
    ),
]


@with_model_options
def features(
    vit_options: ModelOptions,
    images: ImagesArg = None,
    data: SourceDataOpt = None,
    split: SplitOpt = "test",
    num_images: NumImagesOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    batch_size: BatchSizeOpt = None,
    layer: LayerOpt = defaults.FEATURES_LAYER,
    components: ComponentsOpt = defaults.FEATURES_NUM_COMPONENTS,
    foreground: ForegroundOpt = defaults.FEATURES_FOREGROUND,
    out: OutOpt = Path("vitlens-out"),
    fmt: FormatOpt = "png",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """PCA of the patch tokens of the images, fitted jointly, its first three components drawn as RGB (DINOv2 Fig. 1).

    Writes features.png (each photo beside its map), features.npz and features.json to --out.
    """
    from vitlens.analysis.features_pca import check_foreground, check_num_components
    from vitlens.data import open_dataset
    from vitlens.definitions.features_pca import features_pca

    started = time.perf_counter()
    # Validate the command line before loading anything.
    check_num_components(components)
    foreground_value = check_foreground(foreground)
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
    elif num_images is not None:
        raise UsageError("--num-images applies to --data; with IMAGE files every file is used")
    with progress_bar("features", enabled=not quiet) as progress:
        result = features_pca(
            vit,
            source,
            layer=layer,
            num_components=components,
            foreground=foreground_value,
            batch_size=batch_size,
            progress=progress,
        )
    meta = run_metadata(started, command="features", device=str(vit.device), batch_size=batch_size)
    save_and_print(
        result, out, fmt, meta, json_=json_, quiet=quiet, summarise=lambda files: _summarise(result, out, files)
    )


def _summarise(result: FeaturesPCAResult, out: Path, files: list[Path]) -> None:
    from rich.table import Table

    pca = result.pca
    table = Table(title=f"patch-token PCA, layer {result.layer} ({result.tokens})", title_justify="left")
    for name in ("component", "explained variance ratio"):
        table.add_column(name, justify="right")
    for k, ratio in enumerate(pca.explained_variance_ratio):
        table.add_row(str(k + 1), f"{ratio:.3f}")
    console = out_console()
    console.print(table)
    if pca.foreground == "none":
        console.print(f"fitted on all {pca.num_fit_patches} patches of {len(result.images)} images")
    else:
        console.print(
            f"foreground (first component > {pca.threshold:g}): {pca.num_fit_patches} patches, "
            f"{pca.foreground_fraction:.0%} of {len(result.images)} images' patches"
        )
    console.print(f"wrote {', '.join(f.name for f in files)} to {out}")
