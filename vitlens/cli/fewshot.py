"""`vitlens fewshot`: few-shot linear probes by regularised least squares (ViT paper §4.1; big_vision's fewshot_lsr)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vitlens.cli.console import out_console, print_json, progress_bar, run_metadata
from vitlens.cli.options import (
    DATA_PANEL,
    ArchOpt,
    BatchSizeOpt,
    CheckpointKeyOpt,
    CropPctOpt,
    DataOpt,
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
    StdOpt,
    check_format,
    check_num_images,
)
from vitlens.device import resolve_batch_size
from vitlens.errors import UsageError, VitlensError

if TYPE_CHECKING:
    from vitlens.fewshot import FewShotResult

FEWSHOT_PANEL = "Few-shot"
# Kept here rather than imported from vitlens.fewshot, which imports torch: `vitlens --help` must stay fast.
# big_vision's common few-shot config: shots 1, 5, 10, 25, three seeds, l2_reg 2**10 (see vitlens.fewshot).
DEFAULT_SHOTS = "1,5,10,25"
DEFAULT_SEEDS = 3
DEFAULT_L2 = "1024"

ShotsOpt = Annotated[
    str, typer.Option("--shots", help="Training examples per class, comma-separated.", rich_help_panel=FEWSHOT_PANEL)
]
SeedsOpt = Annotated[
    int,
    typer.Option("--seeds", help="Random shot draws per shots count (seeds 0..N-1).", rich_help_panel=FEWSHOT_PANEL),
]
L2Opt = Annotated[
    str,
    typer.Option(
        "--l2",
        help="Ridge penalty λ (> 0), or 'auto': chosen per shots and layer by leave-one-out on the training shots "
        "over 2^-10..2^16 (never on the test set).",
        rich_help_panel=FEWSHOT_PANEL,
    ),
]
LayerOpt = Annotated[
    str | None,
    typer.Option(
        "--layer",
        help="Block(s) to probe, 0-based: -1 (last), 'all', or i,j,... All come from one forward pass. "
        "Default: the pre-logits.",
        rich_help_panel=FEWSHOT_PANEL,
    ),
]
FeatureOpt = Annotated[
    str | None,
    typer.Option(
        "--feature",
        help="pre-logits (what the head sees; default without --layer) | cls (class token after the block) | "
        "gap (mean of patch tokens after the block). With --layer the default is cls, or gap without a class token.",
        rich_help_panel=FEWSHOT_PANEL,
    ),
]
AllowFewerOpt = Annotated[
    bool,
    typer.Option(
        "--allow-fewer",
        help="Use all examples of classes with fewer than the largest shot count, instead of failing.",
        rich_help_panel=FEWSHOT_PANEL,
    ),
]
TestDataOpt = Annotated[
    str | None,
    typer.Option(
        "--test-data",
        help="Score on this data spec, used whole (all its splits), instead of the test split of --data. "
        "Its classes must be those of --data.",
        rich_help_panel=DATA_PANEL,
    ),
]
CacheDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="Feature cache folder (default $VITLENS_CACHE_DIR or ~/.cache/vitlens/features; safe to delete).",
        rich_help_panel=DATA_PANEL,
        show_default=False,
    ),
]
NoCacheOpt = Annotated[
    bool,
    typer.Option("--no-cache", help="Neither read nor write the feature cache.", rich_help_panel=DATA_PANEL),
]


def fewshot(
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
    data: DataOpt = "digits",
    test_data: TestDataOpt = None,
    num_images: NumImagesOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    batch_size: BatchSizeOpt = None,
    shots: ShotsOpt = DEFAULT_SHOTS,
    seeds: SeedsOpt = DEFAULT_SEEDS,
    l2: L2Opt = DEFAULT_L2,
    layer: LayerOpt = None,
    feature: FeatureOpt = None,
    allow_fewer: AllowFewerOpt = False,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    out: OutOpt = Path("vitlens-out"),
    fmt: FormatOpt = "png",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Few-shot accuracy of linear probes on frozen features: ridge regression to ±1 targets (ViT paper §4.1).

    Shots come from the train split of --data (--seeds draws); accuracy is on its test split, or on --test-data.

    Writes fewshot.{png,csv,json} to --out. Features are cached: a second run does no forward pass.
    """
    from dataclasses import replace

    from vitlens.data import open_dataset
    from vitlens.fewshot import cached_features, check_shot_pool, fewshot_lsr, resolve_feature_layers
    from vitlens.log import logger
    from vitlens.outputs import save_fewshot

    started = time.perf_counter()
    shot_counts = parse_shots(shots)
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1, not {seeds}")
    l2_value = parse_l2(l2)
    check_num_images(num_images)
    fmt = check_format(fmt)
    feature_arg = check_feature(feature)

    vit = ModelOptions.of(locals()).load()
    batch_size = resolve_batch_size(batch_size, vit.device)
    layers, all_layers = parse_layers(layer, vit.depth)
    kind = feature_arg or ("pre-logits" if layers is None else "cls" if vit.layout.has_class_token else "gap")
    layers = resolve_feature_layers(vit, layers, kind)  # fails now on cls without a class token

    common = {"num_images": num_images, "data_root": data_root, "download": download, "require_labels": True}
    pool = open_dataset(data, vit.preprocess, split="train", **common)
    if test_data is None:
        test = open_dataset(data, vit.preprocess, split="test", **common)
    else:
        test = open_dataset(test_data, vit.preprocess, split="all", **common)
        if list(test.classes or []) != list(pool.classes or []):
            raise VitlensError(
                f"--test-data {test.spec} has classes {_brief(test.classes)} but {pool.spec} has "
                f"{_brief(pool.classes)}; they must be the same, in the same order"
            )
    classes = list(pool.classes or [])
    # Fails here, before any forward pass, on a single class or a class short of examples.
    short = check_shot_pool(
        pool.labels, shots=shot_counts, num_classes=len(classes), class_names=classes, allow_fewer=allow_fewer
    )
    if short:
        listed = ", ".join(f"{name!r} ({count})" for name, count in short.items())
        logger.warning(f"--allow-fewer: fewer than {max(shot_counts)} training examples in class {listed}; using all")

    cache_status = {}
    feats = {}
    for part, dataset in (("train", pool), ("test", test)):
        with progress_bar(f"features ({part})", enabled=not quiet) as progress:
            feats[part], cache_status[part] = cached_features(
                vit,
                dataset,
                layers=layers,
                feature=kind,
                batch_size=batch_size,
                cache_dir=cache_dir,
                use_cache=not no_cache,
                progress=progress,
            )
    solve_started = time.perf_counter()
    result = fewshot_lsr(
        feats["train"],
        pool.labels,
        feats["test"],
        test.labels,
        shots=shot_counts,
        seeds=seeds,
        l2=l2_value,
        device=vit.device,
        num_classes=len(classes),
        class_names=classes,
        allow_fewer=allow_fewer,
    )
    solve_seconds = time.perf_counter() - solve_started
    result = replace(result, feature=kind)

    payload = {
        **result.to_dict(),
        "allow_fewer": allow_fewer,
        "source": vit.source,
        "data": pool.spec,
        "test_data": test.spec,
        "classes": classes,
        "depth": vit.depth,
        "cache": cache_status,
    }
    meta = run_metadata(
        started,
        command="fewshot",
        device=str(vit.device),
        batch_size=batch_size,
        solve_seconds=round(solve_seconds, 4),
    )
    files = save_fewshot(result, out, payload={**payload, "meta": meta}, fmt=fmt, heatmap=all_layers)
    if json_:
        print_json({**payload, "files": [str(f) for f in files], "meta": meta})
    elif not quiet:
        _summarise(result, vit.source, pool.spec, test.spec, cache_status, out, files)


# --------------------------------------------------------------------------------------------------------------
# Option parsing


def parse_shots(text: str) -> tuple[int, ...]:
    """``"1,5,10"`` -> ``(1, 5, 10)``, sorted and de-duplicated; a UsageError unless all are positive integers."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise UsageError(f"--shots must be positive integers separated by commas (e.g. 1,5,10,25), not {text!r}")
    return tuple(sorted(set(values)))


def parse_l2(text: str) -> float | str:
    """A positive finite λ, or ``"auto"``."""
    value = str(text).strip().lower()
    if value == "auto":
        return "auto"
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise UsageError(f"--l2 must be a positive number or 'auto', not {text!r}")
    return number


def parse_layers(text: str | None, depth: int) -> tuple[list[int] | None, bool]:
    """``--layer`` as 0-based block indices (None when not given) and whether it was ``all``."""
    from vitlens.capture import resolve_layers

    if text is None:
        return None, False
    value = text.strip().lower()
    if value == "all":
        return list(range(depth)), True
    try:
        asked = [int(p) for p in value.split(",")]
    except ValueError:
        raise UsageError(f"--layer must be 'all' or 0-based layer indices separated by commas, not {text!r}")
    return resolve_layers(asked, depth), False


def check_feature(feature: str | None) -> str | None:
    """The ``--feature`` value, lower-cased, or None when not given."""
    from vitlens.fewshot import FEATURE_KINDS

    if feature is None:
        return None
    value = feature.strip().lower()
    if value not in FEATURE_KINDS:
        raise UsageError(f"--feature must be one of {', '.join(FEATURE_KINDS)}, not {feature!r}")
    return value


def _brief(classes: list[str] | None, limit: int = 4) -> str:
    names = list(classes or [])
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"[{shown}] ({len(names)})"


# --------------------------------------------------------------------------------------------------------------
# Output


def _summarise(
    result: FewShotResult,
    source: str,
    spec: str,
    test_spec: str,
    cache_status: dict[str, str],
    out: Path,
    files: list[Path],
) -> None:
    from rich.table import Table

    l2 = "λ by leave-one-out" if result.l2_auto else f"λ = {result.l2.flat[0]:g}"
    table = Table(title=f"few-shot accuracy (%): {source}, {result.feature}, {l2}", title_justify="left")
    multi = len(result.layers) > 1
    columns = (["layer"] if multi else []) + ["shots", "mean ± std", "per seed"]
    columns += ["λ"] if result.l2_auto else []
    for name in columns:
        table.add_column(name, justify="right")
    for j, layer in enumerate(result.layers):
        for i, shots in enumerate(result.shots):
            row = [str(layer)] if multi else []
            row += [
                str(shots),
                f"{100 * result.mean[i, j]:.1f} ± {100 * result.std[i, j]:.1f}",
                " ".join(f"{100 * a:.1f}" for a in result.accuracy[i, j]),
            ]
            row += [f"{result.l2[i, j]:g}"] if result.l2_auto else []
            table.add_row(*row)
        if multi and j < len(result.layers) - 1:
            table.add_section()
    console = out_console()
    console.print(table)
    seeds = len(result.seeds)
    console.print(
        f"chance (1/{result.num_classes}): {100 * result.chance:.1f}%. {seeds} seed{'s' if seeds != 1 else ''}; "
        f"shots from {spec} ({result.num_train} images), scored on {test_spec} ({result.num_test} images); "
        f"feature cache: train {cache_status['train']}, test {cache_status['test']}."
    )
    if result.short_classes:
        console.print(f"fewer than {max(result.shots)} examples (all used): {', '.join(result.short_classes)}")
    console.print(f"wrote {', '.join(f.name for f in files)} to {out}")
