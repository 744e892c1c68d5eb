"""`vitlens filters`: principal components of the patch-embedding filters (ViT paper Fig. 7 left)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from vitlens.cli.console import out_console, print_json, run_metadata
from vitlens.cli.options import (
    OUTPUT_PANEL,
    ArchOpt,
    CheckpointKeyOpt,
    CropPctOpt,
    DeviceOpt,
    FormatOpt,
    ImgSizeOpt,
    InterpolationOpt,
    JsonOpt,
    MeanOpt,
    ModelArg,
    ModelKwargsOpt,
    ModelOptions,
    NumHeadsOpt,
    OutOpt,
    PretrainedOpt,
    QuietOpt,
    StdOpt,
    check_format,
)
from vitlens.errors import UsageError, VitlensError

if TYPE_CHECKING:
    from vitlens.analysis.filters import FilterPCA

ComponentsOpt = Annotated[
    int | None,
    typer.Option(
        "--components",
        "-k",
        help="How many principal components to show (default 28 as in the paper, or all there are if fewer).",
        show_default=False,
        rich_help_panel=OUTPUT_PANEL,
    ),
]
SUMMARY_ROWS = 5  # components listed in the terminal summary; the rest are in filters.json


def filters(
    model: ModelArg = None,
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
    components: ComponentsOpt = None,
    out: OutOpt = Path("vitlens-out"),
    fmt: FormatOpt = "png",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """PCA of the linear patch projection's filters, shown as images (ViT paper Fig. 7 left).

    Writes filters.{png,npz,json} to --out. Each component's sign is arbitrary: inverted colours are the same component.
    """
    import torch

    from vitlens.analysis.filters import filter_pca
    from vitlens.log import logger
    from vitlens.outputs import save_filters

    started = time.perf_counter()
    fmt = check_format(fmt)
    if components is not None and components < 1:
        raise UsageError(f"--components must be at least 1, got {components}")
    vit = ModelOptions.of(locals()).load()
    weight = vit.patch_projection()  # [D, C, ph, pw]; raises for hybrid / conv-stem patch embeddings
    if not torch.isfinite(weight).all():
        raise VitlensError("the patch projection has NaN/inf weights: its principal components are undefined")
    d, c, ph, pw = weight.shape
    available = min(d, c * ph * pw)  # a centred D x (C*ph*pw) matrix has at most this many components
    if components is not None and components > available:
        if not quiet:
            logger.warning(
                "--components %d: only %d components exist (%d filters of %d values); showing all of them",
                components,
                available,
                d,
                c * ph * pw,
            )
        components = available
    result = filter_pca(weight, num_components=components)

    ratio = result.explained_variance_ratio  # [K]
    payload: dict[str, Any] = {
        "source": vit.source,
        "arch": vit.arch,
        "embed_dim": int(d),
        "in_chans": int(c),
        "patch_size": [int(ph), int(pw)],
        "num_components": result.num_components,
        "available_components": int(available),
        "components_shape": list(result.components.shape),
        "explained_variance_ratio": [float(r) for r in ratio],
        "cumulative_explained_variance": float(ratio.sum()),
    }
    meta = run_metadata(started, command="filters", device=str(vit.device))
    files = save_filters(result, out, payload={**payload, "meta": meta}, fmt=fmt)
    if json_:
        print_json({**payload, "files": [str(f) for f in files], "meta": meta})
    elif not quiet:
        _summarise(result, payload, out, files)


def _summarise(result: FilterPCA, payload: dict[str, Any], out: Path, files: list[Path]) -> None:
    from rich.table import Table

    ph, pw = payload["patch_size"]
    table = Table()
    for name in ("component", "explained", "cumulative"):
        table.add_column(name, justify="right")
    cumulative = 0.0
    for i, ratio in enumerate(result.explained_variance_ratio[:SUMMARY_ROWS]):
        cumulative += float(ratio)
        table.add_row(str(i), f"{100 * ratio:.2f}%", f"{100 * cumulative:.2f}%")
    console = out_console()
    console.print(
        f"[bold]patch-embedding filter PCA[/] of {payload['source']}: "
        f"{payload['embed_dim']} filters of {payload['in_chans']}x{ph}x{pw}"
    )
    console.print(table)
    k = result.num_components
    console.print(
        f"the first {k} of {payload['available_components']} components explain "
        f"{100 * payload['cumulative_explained_variance']:.1f}% of the filters' variance (signs are arbitrary)"
    )
    console.print(f"wrote {', '.join(f.name for f in files)} to {out}")
