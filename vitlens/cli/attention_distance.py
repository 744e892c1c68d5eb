"""`vitlens attention-distance`: mean attention distance per layer and head (ViT paper App. D.7, Fig. 7 right)."""

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

if TYPE_CHECKING:
    from vitlens.analysis.attention_distance import AttentionDistance
    from vitlens.models.vit import ViT

RenormalizeOpt = Annotated[
    bool,
    typer.Option(
        "--renormalize/--no-renormalize",
        help="Rescale each patch query's weights on patches to sum to 1, so attention to prefix tokens "
        "(class, registers) does not count as distance 0; that mass is reported as prefix_mass.",
        rich_help_panel="Attention distance",
    ),
]


@with_model_options
def attention_distance(
    vit_options: ModelOptions,
    data: DataOpt = "digits",
    split: SplitOpt = "test",
    num_images: NumImagesOpt = defaults.ATTENTION_DISTANCE_NUM_IMAGES,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    batch_size: BatchSizeOpt = None,
    renormalize: RenormalizeOpt = defaults.ATTENTION_DISTANCE_RENORMALIZE,
    out: OutOpt = Path("vitlens-out"),
    fmt: FormatOpt = "png",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Mean attention distance in pixels for every layer and head (ViT paper App. D.7, Fig. 7 right).

    Writes attention_distance.{png,csv,npz,json} to --out. The paper averaged over 128 images.
    """
    from vitlens.data import open_dataset
    from vitlens.definitions.attention_distance import attention_distance as compute

    started = time.perf_counter()
    fmt = check_format(fmt)
    vit = vit_options.load()
    batch_size = resolve_batch_size(batch_size, vit.device)
    dataset = open_dataset(
        data, vit.preprocess, split=split, num_images=num_images, data_root=data_root, download=download
    )
    with progress_bar("attention distance", enabled=not quiet) as progress:
        result = compute(vit, dataset, batch_size=batch_size, renormalize=renormalize, progress=progress)
    meta = run_metadata(started, command="attention-distance", device=str(vit.device), batch_size=batch_size)
    save_and_print(
        result,
        out,
        fmt,
        meta,
        json_=json_,
        quiet=quiet,
        summarise=lambda files: _summarise(result.distance, vit, result.data, out, files),
    )


def _summarise(result: AttentionDistance, vit: ViT, spec: str, out: Path, files: list[Path]) -> None:
    from rich.table import Table

    renorm = "renormalised to patches" if result.renormalized else "not renormalised"
    table = Table(
        title=f"mean attention distance (px): {vit.source}, {result.num_images} images of {spec}, {renorm}",
        title_justify="left",
    )
    for name in ("layer", "min", "mean", "max", "std over images", "prefix mass"):
        table.add_column(name, justify="right")
    for layer, (dist, std, mass) in enumerate(zip(result.distance_px, result.std_px, result.prefix_mass, strict=True)):
        table.add_row(
            str(layer),
            f"{dist.min():.1f}",
            f"{dist.mean():.1f}",
            f"{dist.max():.1f}",
            f"{std.mean():.1f}",
            f"{mass.mean():.3f}",
        )
    console = out_console()
    console.print(table)
    console.print(
        f"uniform attention over all patches: {result.uniform_px:.1f} px. "
        "min/mean/max are over heads; std and prefix mass are averaged over heads."
    )
    console.print(f"wrote {', '.join(f.name for f in files)} to {out}")
