"""`vitlens rollout`: attention rollout maps of images (Abnar & Zuidema 2020; ViT paper Fig. 6, App. D.8)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from vitlens.cli.console import err_console, out_console, print_json, progress_bar, run_metadata
from vitlens.cli.options import (
    DATA_PANEL,
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
from vitlens.device import resolve_batch_size
from vitlens.errors import UsageError
from vitlens.outputs import rollout_settings, unique_stems

if TYPE_CHECKING:
    from vitlens.analysis.rollout import Rollout
    from vitlens.data import ImageDataset

ROLLOUT_PANEL = "Rollout"
DEFAULT_DATA_IMAGES = 8  # with --data and no --num-images: a handful of figures, not one per test image

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
        f"{DEFAULT_DATA_IMAGES} images unless --num-images.",
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


def rollout(
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
    head_fusion: HeadFusionOpt = "mean",
    discard_ratio: DiscardRatioOpt = 0.0,
    start_layer: StartLayerOpt = 0,
    target: TargetOpt = None,
    per_head: PerHeadOpt = False,
    layer: LayerOpt = None,
    out: OutOpt = Path("vitlens-out"),
    fmt: FormatOpt = "png",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Attention rollout of each image: where the class token (or --target) draws its information from.

    Writes rollout/<image>.png, rollout.png (more than one image), rollout.npz and rollout.json to --out.
    """
    from vitlens.analysis.rollout import resolve_target
    from vitlens.attention import default_target, head_attention_for, rollout_for
    from vitlens.capture import resolve_layers
    from vitlens.data import IMAGE_EXTENSIONS, open_dataset
    from vitlens.outputs import save_rollout

    started = time.perf_counter()
    # Validate the command line before loading anything.
    if head_fusion not in ("mean", "max", "min"):
        raise UsageError(f"--head-fusion must be mean, max or min, not {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise UsageError(f"--discard-ratio must be in [0, 1), not {discard_ratio}")
    if start_layer < 0:
        raise UsageError(f"--start-layer must be 0 or more (0-based), not {start_layer}")
    if layer is not None and not per_head:
        raise UsageError("--layer chooses the layer of --per-head; add --per-head")
    check_num_images(num_images)
    fmt = check_format(fmt)
    images = list(images or [])
    if model is not None and (Path(model).suffix.lower() in IMAGE_EXTENSIONS or Path(model).expanduser().is_dir()):
        images, model = [model, *images], None  # `vitlens rollout photo.jpg`: the default model on a photo
    if images and data is not None:
        raise UsageError("give IMAGE files or --data, not both")
    if not images and data is None:
        raise UsageError("no images: pass IMAGE files (or a folder), or --data SPEC [--num-images N]")

    vit = ModelOptions.of(locals()).load()
    batch_size = resolve_batch_size(batch_size, vit.device)
    defaulted = target is None
    target = default_target(vit.layout) if target is None else target
    resolve_target(target, vit.layout)
    if start_layer >= vit.depth:
        raise UsageError(
            f"--start-layer {start_layer} is out of range: the model has {vit.depth} layers (0..{vit.depth - 1})"
        )
    heads_layer = None
    if per_head:
        if layer is not None and not -vit.depth <= layer < vit.depth:
            raise UsageError(f"--layer {layer} is out of range: the model has {vit.depth} layers (0..{vit.depth - 1})")
        heads_layer = resolve_layers([-1 if layer is None else layer], vit.depth)[0]

    if data is not None:
        dataset = open_dataset(
            data,
            vit.preprocess,
            split=split,
            num_images=num_images or DEFAULT_DATA_IMAGES,
            data_root=data_root,
            download=download,
        )
    elif len(images) == 1 and Path(images[0]).expanduser().is_dir():
        # A folder given as IMAGE is the images to look at, all of them (no train/test hold-out).
        dataset = open_dataset(images[0], vit.preprocess, split="all", num_images=num_images)
    else:
        dataset = open_dataset(images, vit.preprocess, num_images=num_images)
    photos = [dataset.load_pil(i) for i in range(len(dataset))]  # one-line error for a file that is no image
    if defaulted and target != "cls" and not quiet:
        err_console().print(f"[yellow]note:[/] the model has no class token; rollout reads --target {target}")

    with progress_bar("rollout", enabled=not quiet) as progress:
        result = rollout_for(
            vit,
            dataset,
            batch_size=batch_size,
            head_fusion=head_fusion,
            discard_ratio=discard_ratio,
            start_layer=start_layer,
            target=target,
            progress=progress,
        )
    heads = None
    if heads_layer is not None:
        with progress_bar(f"layer {heads_layer} heads", enabled=not quiet) as progress:
            heads = head_attention_for(
                vit, dataset, layer=heads_layer, target=target, batch_size=batch_size, progress=progress
            )

    stems = unique_stems(dataset.names)
    payload: dict[str, Any] = {
        "images": list(dataset.names),
        "stems": stems,
        **result.to_dict(),
        "target_defaulted": defaulted,
        "source": vit.source,
        "data": dataset.spec,
        "patch_size": list(vit.layout.patch_size),
    }
    if heads is not None:
        payload["heads_layer"] = heads_layer
        payload["heads"] = heads.tolist()
    meta = run_metadata(started, command="rollout", device=str(vit.device), batch_size=batch_size)
    files = save_rollout(
        result,
        out,
        photos=photos,
        names=dataset.names,
        stems=stems,
        payload={**payload, "meta": meta},
        fmt=fmt,
        heads=heads,
        heads_layer=heads_layer,
    )
    if json_:
        print_json({**payload, "files": [str(f) for f in files], "meta": meta})
    elif not quiet:
        _summarise(result, dataset, out, files)


def _summarise(result: Rollout, dataset: ImageDataset, out: Path, files: list[Path]) -> None:
    import numpy as np
    from rich.table import Table

    table = Table(title=f"attention rollout: {rollout_settings(result)}", title_justify="left")
    for name, justify in (("image", "left"), ("peak patch (row, col)", "right"), ("mass on patches", "right")):
        table.add_column(name, justify=justify)
    for name, rollout_map, mass in zip(dataset.names, result.maps, result.patch_mass, strict=True):
        row, col = np.unravel_index(int(np.argmax(rollout_map)), rollout_map.shape)
        table.add_row(name, f"({row}, {col})", f"{mass:.3f}")
    console = out_console()
    console.print(table)
    console.print(f"wrote {len(files)} files to {out}")
