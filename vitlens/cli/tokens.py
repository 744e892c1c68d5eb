"""`vitlens tokens`: residual-stream token norms, high-norm outlier tokens and attention sinks (Darcet et al. 2023)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vitlens import defaults
from vitlens.cli.console import out_console, progress_bar, run_metadata, save_and_print
from vitlens.cli.options import (
    BatchSizeOpt,
    DataOpt,
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
    with_model_options,
)
from vitlens.device import resolve_batch_size
from vitlens.errors import ParameterError

if TYPE_CHECKING:
    from vitlens.definitions.tokens import TokensResult

LayersOpt = Annotated[
    str | None,
    typer.Option(
        "--layer",
        help="Block(s) whose outputs are measured, 0-based (negative from the end): i,j,... or 'all' (default).",
        rich_help_panel="Tokens",
    ),
]
NormThresholdOpt = Annotated[
    str,
    typer.Option(
        "--norm-threshold",
        help="Patch tokens with a larger L2 norm are outliers: a number, or 'auto' (the valley of the last layer's "
        "log-norm histogram; two passes over the images).",
        rich_help_panel="Tokens",
    ),
]

ImagesOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--images",
        help="Also show these images one by one (repeat the flag; image files, a folder or a data spec): the token "
        "norms of --image-layer beside the photo and the class-token attention with and without the outlier keys. "
        "Writes tokens_images.<fmt>.",
        rich_help_panel="Tokens",
    ),
]
ImageLayerOpt = Annotated[
    int,
    typer.Option(
        "--image-layer",
        help="Block of the per-image maps of --images, 0-based (negative from the end).",
        rich_help_panel="Tokens",
    ),
]


def _parse_layers(text: str | None) -> list[int] | None:
    if text is None or text.strip().lower() in ("", "all"):
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ParameterError("layers", f"layers must be comma-separated integers, not {text!r}") from None


@with_model_options
def tokens(
    vit_options: ModelOptions,
    data: DataOpt = "digits",
    split: SplitOpt = "test",
    num_images: NumImagesOpt = defaults.TOKENS_NUM_IMAGES,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    batch_size: BatchSizeOpt = None,
    layers: LayersOpt = None,
    norm_threshold: NormThresholdOpt = defaults.TOKENS_NORM_THRESHOLD,
    images: ImagesOpt = None,
    image_layer: ImageLayerOpt = defaults.TOKENS_IMAGE_LAYER,
    out: OutOpt = Path("vitlens-out"),
    fmt: FormatOpt = "png",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Token norms per layer, high-norm outlier tokens and attention sinks (Darcet et al. 2023).

    Writes tokens.{png,npz,json} to --out, and with --images tokens_images.png.
    """
    from vitlens.data import open_dataset
    from vitlens.definitions.tokens import tokens as compute

    started = time.perf_counter()
    fmt = check_format(fmt)
    chosen = _parse_layers(layers)
    vit = vit_options.load()
    batch_size = resolve_batch_size(batch_size, vit.device)
    dataset = open_dataset(
        data, vit.preprocess, split=split, num_images=num_images, data_root=data_root, download=download
    )
    with progress_bar("token norms", enabled=not quiet) as progress:
        result = compute(
            vit,
            dataset,
            layers=chosen,
            norm_threshold=norm_threshold,
            images=(images[0] if len(images) == 1 else images) if images else None,
            image_layer=image_layer,
            batch_size=batch_size,
            progress=progress,
        )
    meta = run_metadata(started, command="tokens", device=str(vit.device), batch_size=batch_size)
    save_and_print(
        result, out, fmt, meta, json_=json_, quiet=quiet, summarise=lambda files: _summarise(result, out, files)
    )


def _summarise(result: TokensResult, out: Path, files: list[Path]) -> None:
    from rich.table import Table

    t = result.norms
    p = t.kind("patch")
    table = Table(title=f"token norms: {result.source}, {t.num_images} images of {result.data}", title_justify="left")
    for name in ("layer", "patch mean", "median", "0.99", "max", "outliers", "images", "cls->outliers"):
        table.add_column(name, justify="right")
    sinks = t.sink_shares("cls")["outliers"]
    for r, layer in enumerate(t.layers):
        q = t.norm_quantiles[p, r]
        table.add_row(
            str(int(layer)),
            f"{t.norm_mean[p, r]:.3g}",
            f"{q[0]:.3g}",
            f"{q[2]:.3g}",
            f"{q[3]:.3g}",
            f"{100 * t.outlier_fraction[r]:.2f}%",
            f"{100 * t.images_with_outliers[r]:.0f}%",
            "n/a" if sinks[r] != sinks[r] else f"{sinks[r]:.3f}",
        )
    console = out_console()
    console.print(table)
    console.print(result.summary())
    sim = [t.neighbour_similarity_outliers[-1], t.neighbour_similarity_normal[-1]]
    out_sim, normal_sim = ("n/a" if v != v else f"{v:.3f}" for v in sim)
    console.print(
        f"input patch similarity to grid neighbours, layer {int(t.layers[-1])}: "
        f"outliers {out_sim}, normal patches {normal_sim}"
    )
    console.print(f"wrote {', '.join(f.name for f in files)} to {out}")
