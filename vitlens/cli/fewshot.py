"""`vitlens fewshot`: few-shot linear probes by regularised least squares (ViT paper §4.1; big_vision's fewshot_lsr)."""

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
    DataOpt,
    DataRootOpt,
    DownloadOpt,
    FormatOpt,
    JsonOpt,
    ModelOptions,
    NumImagesOpt,
    OutOpt,
    QuietOpt,
    check_format,
    check_num_images,
    with_model_options,
)
from vitlens.device import resolve_batch_size
from vitlens.errors import UsageError, spec_named

if TYPE_CHECKING:
    from rich.console import Console

    from vitlens.definitions.fewshot import FewShotProbeResult

FEWSHOT_PANEL = "Few-shot"
# As the command line writes them, for --help (vitlens.defaults: big_vision's shots, seeds and l2_reg).
DEFAULT_SHOTS = ",".join(str(s) for s in defaults.FEWSHOT_SHOTS)
DEFAULT_SEEDS = defaults.FEWSHOT_SEEDS
DEFAULT_L2 = f"{defaults.FEWSHOT_L2:g}"

DEFAULT_KNN_K = ",".join(str(k) for k in defaults.FEWSHOT_KNN_K)  # DINO's eval_knn --nb_knn

ShotsOpt = Annotated[
    str,
    typer.Option(
        "--shots",
        help="Training examples per class, comma-separated; or 'all': the whole training pool, one draw.",
        rich_help_panel=FEWSHOT_PANEL,
    ),
]
ProbeOpt = Annotated[
    str,
    typer.Option(
        "--probe",
        help="lsr (ridge regression, the ViT paper's) | knn (DINO's weighted k-NN on the same shots) | both.",
        rich_help_panel=FEWSHOT_PANEL,
    ),
]
KnnKOpt = Annotated[
    str,
    typer.Option(
        "--knn-k",
        help="Neighbours of the k-NN probe, comma-separated; each capped at the shots' pool size.",
        rich_help_panel=FEWSHOT_PANEL,
    ),
]
KnnTemperatureOpt = Annotated[
    float,
    typer.Option(
        "--knn-temperature", help="T of the k-NN votes exp(cos / T) (DINO's 0.07).", rich_help_panel=FEWSHOT_PANEL
    ),
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
        "mean-patch (mean of patch tokens after the block). With --layer the default is cls, or mean-patch without "
        "a class token.",
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
        help="Score on this data spec, used whole (all its splits), instead of the test split of --data; then all "
        "of --data is the shot pool (see --split). Its classes must be those of --data.",
        rich_help_panel=DATA_PANEL,
    ),
]
PoolSplitOpt = Annotated[
    str | None,
    typer.Option(
        "--split",
        help="The part of --data that is the shot pool: train | all. Default: train without --test-data (its test "
        "split is scored), all with --test-data (nothing of --data is scored, so nothing is held out).",
        rich_help_panel=DATA_PANEL,
        show_default=False,
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


@with_model_options
def fewshot(
    vit_options: ModelOptions,
    data: DataOpt = "digits",
    test_data: TestDataOpt = None,
    split: PoolSplitOpt = None,
    num_images: NumImagesOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    batch_size: BatchSizeOpt = None,
    shots: ShotsOpt = DEFAULT_SHOTS,
    seeds: SeedsOpt = DEFAULT_SEEDS,
    l2: L2Opt = DEFAULT_L2,
    layer: LayerOpt = None,
    feature: FeatureOpt = None,
    probe: ProbeOpt = defaults.FEWSHOT_PROBE,
    knn_k: KnnKOpt = DEFAULT_KNN_K,
    knn_temperature: KnnTemperatureOpt = defaults.FEWSHOT_KNN_TEMPERATURE,
    allow_fewer: AllowFewerOpt = False,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    out: OutOpt = Path("vitlens-out"),
    fmt: FormatOpt = "png",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Few-shot accuracy of linear probes on frozen features: ridge regression to ±1 targets (ViT paper §4.1).

    Shots come from the train split of --data (--seeds draws) and accuracy is on its test split. With --test-data,
    all of --data is the shot pool and accuracy is on all of --test-data (--split train keeps the train split only).

    --probe knn (or both) adds DINO's weighted k-NN on the same shot sets, from the same features.

    Writes fewshot.{png,csv,json} to --out (fewshot-knn.csv for the k-NN probe). Features are cached: a second run
    does no forward pass.
    """
    from vitlens.analysis.knn import check_k
    from vitlens.data import open_dataset
    from vitlens.definitions.fewshot import (
        check_feature,
        check_knn_temperature,
        check_probe,
        check_seeds,
        check_split,
        is_full_pool,
        pool_split,
    )
    from vitlens.definitions.fewshot import fewshot as compute

    started = time.perf_counter()
    # Validate the command line before loading anything (the library checks again, for its own callers).
    shot_counts, l2_value = "all" if is_full_pool(shots) else parse_shots(shots), parse_l2(l2)
    check_seeds(seeds)
    probe = check_probe(probe)
    ks = check_k(knn_k, name="knn_k")
    check_knn_temperature(knn_temperature)
    feature = check_feature(feature)  # the current name, so that a deprecated one warns once
    if check_split(split) == "all" and test_data is None:
        raise UsageError(
            "--split all leaves nothing to score (all of --data is the shot pool): give --test-data, or use "
            "--split train, whose test split is scored"
        )
    part = pool_split(split, has_test_data=test_data is not None)
    check_num_images(num_images)
    fmt = check_format(fmt)

    vit = vit_options.load()
    batch_size = resolve_batch_size(batch_size, vit.device)
    common = {"num_images": num_images, "data_root": data_root, "download": download, "require_labels": True}
    pool = open_dataset(data, vit.preprocess, split=part, **common)
    if test_data is None:
        test = open_dataset(data, vit.preprocess, split="test", **common)
    else:
        with spec_named("test_data"):
            test = open_dataset(test_data, vit.preprocess, split="all", **common)
    with progress_bar("features", enabled=not quiet) as progress:
        result = compute(
            vit,
            pool,
            test_data=test,
            shots=shot_counts,
            seeds=seeds,
            l2=l2_value,
            layers=layer,
            feature=feature,
            probe=probe,  # type: ignore[arg-type]
            knn_k=ks,
            knn_temperature=knn_temperature,
            allow_fewer=allow_fewer,
            batch_size=batch_size,
            cache_dir=cache_dir,
            use_cache=not no_cache,
            progress=progress,
        )
    meta = run_metadata(
        started,
        command="fewshot",
        device=str(vit.device),
        batch_size=batch_size,
        solve_seconds=round(result.solve_seconds, 4),
    )
    save_and_print(
        result, out, fmt, meta, json_=json_, quiet=quiet, summarise=lambda files: _summarise(result, out, files)
    )


# --------------------------------------------------------------------------------------------------------------
# Option parsing, shared with `vitlens report`


def parse_shots(text: str) -> tuple[int, ...]:
    """``--shots "1,5,10"`` -> ``(1, 5, 10)``, sorted and de-duplicated (the library's check)."""
    from vitlens.definitions.fewshot import check_shots

    return check_shots(text)


def parse_l2(text: str) -> float | str:
    """``--l2``: a positive finite λ, or ``"auto"`` (the library's check)."""
    from vitlens.definitions.fewshot import check_l2

    return check_l2(text)


# --------------------------------------------------------------------------------------------------------------
# Output


def _summarise(result: FewShotProbeResult, out: Path, files: list[Path]) -> None:
    console = out_console()
    if result.probe is not None:
        _lsr_table(result, console)
    if result.knn is not None:
        _knn_table(result, console)
    base = result.probe if result.probe is not None else result.knn
    assert base is not None
    seeds, cache = len(base.seeds), result.cache
    console.print(
        f"chance (1/{base.num_classes}): {100 * base.chance:.1f}%. {seeds} seed{'s' if seeds != 1 else ''}; "
        f"shots from {result.data} ({base.num_train} images), scored on {result.test_data} ({base.num_test} images); "
        f"feature cache: train {cache['train']}, test {cache['test']}."
    )
    if base.short_classes:
        console.print(f"fewer than {max(base.shots)} examples (all used): {', '.join(base.short_classes)}")
    console.print(f"wrote {', '.join(f.name for f in files)} to {out}")


def _lsr_table(result: FewShotProbeResult, console: Console) -> None:
    from rich.table import Table

    probe = result.probe
    assert probe is not None
    l2 = "λ by leave-one-out" if probe.l2_auto else f"λ = {probe.l2.flat[0]:g}"
    table = Table(title=f"few-shot accuracy (%): {result.source}, {probe.feature}, {l2}", title_justify="left")
    multi = len(probe.layers) > 1
    columns = (["layer"] if multi else []) + ["shots", "mean ± std", "per seed"]
    columns += ["λ"] if probe.l2_auto else []
    for name in columns:
        table.add_column(name, justify="right")
    for j, layer in enumerate(probe.layers):
        for i, shots in enumerate(probe.shots):
            row = [str(layer)] if multi else []
            row += [
                f"all ({shots})" if result.full_pool else str(shots),
                f"{100 * probe.mean[i, j]:.1f} ± {100 * probe.std[i, j]:.1f}",
                " ".join(f"{100 * a:.1f}" for a in probe.accuracy[i, j]),
            ]
            row += [f"{probe.l2[i, j]:g}"] if probe.l2_auto else []
            table.add_row(*row)
        if multi and j < len(probe.layers) - 1:
            table.add_section()
    console.print(table)


def _knn_table(result: FewShotProbeResult, console: Console) -> None:
    """Mean ± std k-NN accuracy (%), one row per (layer,) shots count, one column per k; ``k→n`` where capped."""
    from rich.table import Table

    knn = result.knn
    assert knn is not None
    title = f"k-NN accuracy (%): {result.source}, {knn.feature}, T = {knn.temperature:g} (DINO's weighted vote)"
    table = Table(title=title, title_justify="left")
    multi = len(knn.layers) > 1
    for name in (["layer"] if multi else []) + ["shots"] + [f"k={k}" for k in knn.k]:
        table.add_column(name, justify="right")
    for j, layer in enumerate(knn.layers):
        for i, shots in enumerate(knn.shots):
            row = ([str(layer)] if multi else []) + [f"all ({shots})" if result.full_pool else str(shots)]
            for c, k in enumerate(knn.k):
                used = int(knn.k_used[i, c])
                capped = "" if used == k else f" (k={used})"
                row.append(f"{100 * knn.mean[i, j, c]:.1f} ± {100 * knn.std[i, j, c]:.1f}{capped}")
            table.add_row(*row)
        if multi and j < len(knn.layers) - 1:
            table.add_section()
    console.print(table)
