"""`vitlens cka`: linear CKA between the layers of one model or two (Kornblith et al. 2019; minibatch estimator of
Nguyen, Raghu & Kornblith 2021)."""

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
    from vitlens.definitions.cka import CKAResult

CKA_PANEL = "CKA"
ModelBArg = Annotated[
    str | None,
    typer.Argument(
        help="A second model to compare with MODEL (same forms as MODEL), loaded with the loader's defaults on "
        "--device (the model options apply to MODEL only). Omitted: MODEL with itself.",
        show_default=False,
    ),
]
TokensOpt = Annotated[
    str,
    typer.Option(
        "--tokens",
        help="Rows compared: cls (class token) | mean-patch (mean of the patch tokens) | all (every patch token; "
        "the same grid in both models).",
        rich_help_panel=CKA_PANEL,
    ),
]
LayersOpt = Annotated[
    str | None,
    typer.Option(
        "--layer",
        "--layers",
        help="Blocks of MODEL, 0-based (negative from the end): i,j,... or 'all' (default).",
        rich_help_panel=CKA_PANEL,
    ),
]
LayersBOpt = Annotated[
    str | None,
    typer.Option(
        "--layer-b",
        "--layers-b",
        help="Blocks of MODEL_B, as --layer (default all).",
        rich_help_panel=CKA_PANEL,
    ),
]
MinibatchOpt = Annotated[
    int,
    typer.Option(
        "--minibatch-size",
        help="Images per CKA minibatch (>= 4; the estimate depends on it and it is recorded). A last, smaller "
        "minibatch is left out unless it is the only one.",
        rich_help_panel=CKA_PANEL,
    ),
]


def _parse_layers(text: str | None, param: str) -> list[int] | None:
    if text is None or text.strip().lower() in ("", "all"):
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ParameterError(param, f"{param} must be comma-separated integers, not {text!r}") from None


@with_model_options
def cka(
    vit_options: ModelOptions,
    model_b: ModelBArg = None,
    data: DataOpt = "digits",
    split: SplitOpt = "test",
    num_images: NumImagesOpt = defaults.CKA_NUM_IMAGES,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    batch_size: BatchSizeOpt = None,
    tokens: TokensOpt = defaults.CKA_TOKENS,
    layers: LayersOpt = None,
    layers_b: LayersBOpt = None,
    minibatch_size: MinibatchOpt = defaults.CKA_MINIBATCH_SIZE,
    out: OutOpt = Path("vitlens-out"),
    fmt: FormatOpt = "png",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Linear CKA between every pair of layers of MODEL, or of MODEL and MODEL_B (minibatch CKA).

    Writes cka.{png,npz,json,csv} to --out.
    """
    from vitlens.data import open_dataset
    from vitlens.definitions.cka import check_tokens
    from vitlens.definitions.cka import cka as compute
    from vitlens.log import logger
    from vitlens.models.load import load_vit

    started = time.perf_counter()
    fmt = check_format(fmt)
    chosen = _parse_layers(layers, "layers")
    chosen_b = _parse_layers(layers_b, "layers_b")
    vit = vit_options.load()
    vit_b = None
    if model_b is not None:
        logger.info(f"model B {model_b}: loaded with the loader's defaults (the model options apply to MODEL only)")
        vit_b = load_vit(model_b, device=vit_options.device)
    check_tokens(vit, vit_b, tokens)  # before any image is read
    batch_size = resolve_batch_size(batch_size, vit.device)
    dataset = open_dataset(
        data, vit.preprocess, split=split, num_images=num_images, data_root=data_root, download=download
    )
    with progress_bar("CKA", enabled=not quiet) as progress:
        result = compute(
            vit,
            dataset,
            vit_b,
            tokens=tokens,  # type: ignore[arg-type]
            layers=chosen,
            layers_b=chosen_b,
            minibatch_size=minibatch_size,
            batch_size=batch_size,
            progress=progress,
        )
    meta = run_metadata(started, command="cka", device=str(vit.device), batch_size=batch_size)
    save_and_print(
        result, out, fmt, meta, json_=json_, quiet=quiet, summarise=lambda files: _summarise(result, out, files)
    )


def _summarise(result: CKAResult, out: Path, files: list[Path]) -> None:
    from rich.table import Table

    c = result.cka
    console = out_console()
    names = " vs ".join(result.sources)
    if max(len(c.layers_a), len(c.layers_b)) <= 16:
        table = Table(title=f"linear CKA: {names}, {c.num_images} images of {result.data}", title_justify="left")
        table.add_column("A \\ B", justify="right")
        for q in c.layers_b:
            table.add_column(str(int(q)), justify="right")
        for r, p in enumerate(c.layers_a):
            table.add_row(str(int(p)), *(f"{v:.2f}" for v in c.matrix[r]))
        console.print(table)
    console.print(result.summary())
    console.print(f"wrote {', '.join(f.name for f in files)} to {out}")
