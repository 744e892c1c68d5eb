"""Writes each analysis's files: the same names and contents whether from a single command or the report.

Each function builds its figures first, so a plotting error leaves no files, then writes atomically. The JSON
payload is the caller's (commands add run metadata, the report does not). Plotting is imported inside the functions
so that importing this module pulls in neither matplotlib nor the CLI.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from vitlens.analysis.attention_distance import AttentionDistance
    from vitlens.analysis.filters import FilterPCA
    from vitlens.analysis.pos_sim import PositionSimilarity
    from vitlens.analysis.rollout import Rollout
    from vitlens.fewshot import FewShotResult


def save_filters(result: FilterPCA, out: str | Path, *, payload: dict[str, Any], fmt: str = "png") -> list[Path]:
    """Write filters.npz, filters.json (``payload``) and filters.<fmt>."""
    from vitlens.io import ensure_out_dir, write_json, write_npz
    from vitlens.plotting.filters import filters_figure
    from vitlens.plotting.style import save_figure

    fig = filters_figure(result)
    out = ensure_out_dir(out)
    return [
        write_npz(
            out / "filters.npz",
            components=result.components,  # [K, C, ph, pw]
            explained_variance_ratio=result.explained_variance_ratio,  # [K]
            singular_values=result.singular_values,  # [min(D, C*ph*pw)]
            mean_filter=result.mean_filter,  # [C, ph, pw]
        ),
        write_json(out / "filters.json", payload),
        save_figure(fig, out / f"filters.{fmt}", fmt=fmt),  # type: ignore[arg-type]
    ]


def save_pos_sim(
    result: PositionSimilarity, out: str | Path, *, payload: dict[str, Any], fmt: str = "png"
) -> list[Path]:
    """Write pos_sim.npz (with the [H, W, H, W] similarity), pos_sim.json (``payload``) and pos_sim.<fmt>."""
    import numpy as np

    from vitlens.io import ensure_out_dir, write_json, write_npz
    from vitlens.plotting.pos_sim import pos_sim_figure
    from vitlens.plotting.style import save_figure

    fig = pos_sim_figure(result)
    out = ensure_out_dir(out)
    return [
        write_npz(
            out / "pos_sim.npz",
            similarity=result.similarity,  # [H, W, H, W]
            distances=result.distances,  # [M]
            similarity_by_distance=result.similarity_by_distance,  # [M]
            pairs_by_distance=result.pairs_by_distance,  # [M]
            grid_size=np.asarray(result.grid_size),
        ),
        write_json(out / "pos_sim.json", payload),
        save_figure(fig, out / f"pos_sim.{fmt}", fmt=fmt),  # type: ignore[arg-type]
    ]


def save_attention_distance(
    result: AttentionDistance, out: str | Path, *, payload: dict[str, Any], fmt: str = "png"
) -> list[Path]:
    """Write attention_distance.csv (one row per layer and head), .npz, .json (``payload``) and .<fmt>."""
    import numpy as np

    from vitlens.io import ensure_out_dir, write_json, write_npz, write_text
    from vitlens.plotting.attention_distance import attention_distance_figure
    from vitlens.plotting.style import save_figure

    fig = attention_distance_figure(result)
    rows = ["layer,head,mean_px,std_px,prefix_mass"]
    depth, heads = result.distance_px.shape
    for layer in range(depth):
        for head in range(heads):
            values = (result.distance_px[layer, head], result.std_px[layer, head], result.prefix_mass[layer, head])
            rows.append(f"{layer},{head}," + ",".join(f"{float(v):.6g}" for v in values))
    out = ensure_out_dir(out)
    return [
        write_text(out / "attention_distance.csv", "\n".join(rows) + "\n"),
        write_npz(
            out / "attention_distance.npz",
            distance_px=result.distance_px,  # [depth, heads]
            std_px=result.std_px,
            prefix_mass=result.prefix_mass,
            uniform_px=np.float64(result.uniform_px),
            num_images=np.int64(result.num_images),
            renormalized=np.bool_(result.renormalized),
            patch_size=np.asarray(result.patch_size),
            grid_size=np.asarray(result.grid_size),
        ),
        write_json(out / "attention_distance.json", payload),
        save_figure(fig, out / f"attention_distance.{fmt}", fmt=fmt),  # type: ignore[arg-type]
    ]


def unique_stems(names: Sequence[str]) -> list[str]:
    """File stems for ``names``, made unique (``a``, ``a-1``, ...) case-insensitively, for case-blind filesystems."""
    used: set[str] = set()
    stems = []
    for name in names:
        base = Path(name).stem or "image"
        stem, k = base, 1
        while stem.lower() in used:
            stem, k = f"{base}-{k}", k + 1
        used.add(stem.lower())
        stems.append(stem)
    return stems


def rollout_settings(result: Rollout) -> str:
    """The rollout's options in words, for titles: target, head fusion, discard ratio, layers."""
    first, last = result.start_layer, result.start_layer + result.num_layers - 1
    target = "mean of patch tokens" if result.target == "mean-patch" else f"{result.target} token"
    return f"{target}, {result.head_fusion} over heads, discard {result.discard_ratio:g}, layers {first}-{last}"


def save_rollout(
    result: Rollout,
    out: str | Path,
    *,
    photos: Sequence[Image.Image],
    names: Sequence[str],
    stems: Sequence[str],
    payload: dict[str, Any],
    fmt: str = "png",
    grid_title: str | None = None,
    heads: np.ndarray | None = None,
    heads_layer: int | None = None,
) -> list[Path]:
    """Write rollout/<stem>.<fmt> per image, rollout.<fmt> (more than one image), rollout.npz and rollout.json.

    Args:
        photos, names, stems: the images as loaded, their names (stored in the NPZ) and file stems.
        payload: rollout.json's content.
        grid_title: the title of rollout.<fmt>; default "attention rollout: " and :func:`rollout_settings`.
        heads, heads_layer: per-head attention of one layer (``[B, heads, H, W]``) for rollout_heads_L<layer>.<fmt>
            and the NPZ, or None.
    """
    import numpy as np

    from vitlens.io import ensure_out_dir, write_json, write_npz
    from vitlens.plotting.rollout import head_attention_figure, rollout_figure, rollout_grid_figure
    from vitlens.plotting.style import save_figure

    titles = [Path(name).name for name in names]
    # The summary figures are built first (a plotting error then leaves no files); the per-image figures are
    # built and written one at a time below, so memory holds one of them, however many images there are.
    grid = None
    if len(photos) > 1:
        title = f"attention rollout: {rollout_settings(result)}" if grid_title is None else grid_title
        grid = rollout_grid_figure(photos, result.maps, titles, title=title)
    heads_fig = None
    if heads is not None:
        heads_fig = head_attention_figure(photos, heads, titles, layer=int(heads_layer), target=result.target)

    out = ensure_out_dir(out)
    image_dir = ensure_out_dir(out / "rollout")
    files = [
        save_figure(rollout_figure(photo, rollout_map, title=title), image_dir / f"{stem}.{fmt}", fmt=fmt)  # type: ignore[arg-type]
        for photo, rollout_map, title, stem in zip(photos, result.maps, titles, stems, strict=True)
    ]
    if grid is not None:
        files.append(save_figure(grid, out / f"rollout.{fmt}", fmt=fmt))  # type: ignore[arg-type]
    arrays: dict[str, Any] = {
        "maps": result.maps,  # [B, H, W]
        "patch_mass": result.patch_mass,  # [B]
        "images": np.asarray(list(names), dtype=str),
        "grid_size": np.asarray(result.grid_size),
    }
    if heads_fig is not None:
        files.append(save_figure(heads_fig, out / f"rollout_heads_L{heads_layer}.{fmt}", fmt=fmt))  # type: ignore[arg-type]
        arrays["heads"] = heads
        arrays["heads_layer"] = np.int64(heads_layer)
    files.append(write_npz(out / "rollout.npz", **arrays))
    files.append(write_json(out / "rollout.json", payload))
    return files


def save_fewshot(
    result: FewShotResult, out: str | Path, *, payload: dict[str, Any], fmt: str = "png", heatmap: bool = False
) -> list[Path]:
    """Write fewshot.csv (one row per shots, layer and seed), fewshot.json (``payload``) and fewshot.<fmt>.

    Args:
        heatmap: draw accuracy as a layer-by-shots heatmap (for ``--layer all``) instead of the default figure.
    """
    from vitlens.io import ensure_out_dir, write_json, write_text
    from vitlens.plotting.fewshot import fewshot_figure
    from vitlens.plotting.style import save_figure

    fig = fewshot_figure(result, kind="heatmap" if heatmap else None)
    rows = ["shots,layer,seed,accuracy,l2"]
    for i, shots in enumerate(result.shots):
        for j, layer in enumerate(result.layers):
            for s, seed in enumerate(result.seeds):
                rows.append(f"{shots},{layer},{seed},{result.accuracy[i, j, s]:.6g},{result.l2[i, j]:g}")
    out = ensure_out_dir(out)
    return [
        write_text(out / "fewshot.csv", "\n".join(rows) + "\n"),
        write_json(out / "fewshot.json", payload),
        save_figure(fig, out / f"fewshot.{fmt}", fmt=fmt),  # type: ignore[arg-type]
    ]
