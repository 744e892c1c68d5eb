"""The report page's interactive parts: the attention explorer's 8-bit maps (computed at report time, stored in
``explorer.npz``) and the page's own CSS and JavaScript (package data under ``vitlens/assets/report/``).

The explorer shows, for each of the report's images, the head-mean attention of every query token over the patch
grid in every kept layer, each prefix token's attention per head, and attention rollout (Abnar & Zuidema 2020) of
each prefix token and of the mean of the patch tokens up to each layer. Per-head rows of every patch query would cost
``heads`` times more (ViT-B/16 at 224 px: 12 x 12 x 197 x 196 bytes = 5.6 MB per image), so only the prefix queries
keep their heads; the page says what was kept and how many bytes it took.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from importlib.resources import files as package_files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from vitlens.data import ImageDataset
    from vitlens.models.vit import ViT

EXPLORER_FILE = "explorer.npz"
# Raw bytes of maps and photos the page may carry; base64 adds a third, so 5 MiB stays under 7 MB in the page and
# leaves room for the figures within 10 MB. ViT-B/16 at 224 px with 6 images needs 3.9 MB (see `explorer_bytes`).
EXPLORER_MAX_BYTES = 5 * 2**20


def quantize_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of non-negative weights as 8 bits: ``round(255 * v / max(row))`` and each row's max.

    Each row is scaled to its own max because the overlay shows where a query looks, not how much mass lands on
    patches (the rest is on prefix tokens); the max is kept so that ``q / 255 * max`` recovers the weights to 0.2 %.
    A row with no weight on any patch stays all zero.

    Returns:
        ``(uint8 rows, float32 max per row)``, shapes ``rows.shape`` and ``rows.shape[:-1]``.
    """
    peak = rows.max(axis=-1, keepdims=True)  # [..., 1]
    scaled = np.divide(rows, peak, out=np.zeros_like(rows, dtype=np.float64), where=peak > 0)
    return np.rint(255.0 * scaled).astype(np.uint8), peak[..., 0].astype(np.float32)


def explorer_bytes(
    *, num_layers: int, num_heads: int, num_tokens: int, num_prefix: int, img_size: tuple[int, int]
) -> int:
    """Raw bytes one image takes in the explorer: head-mean rows of every query, per-head prefix rows, rollout rows
    of the prefix tokens and the patch mean (all over the ``HW`` patch keys), and the RGB photo."""
    hw = num_tokens - num_prefix
    maps = num_layers * hw * (num_tokens + num_heads * num_prefix + num_prefix + 1)
    return maps + 3 * img_size[0] * img_size[1]


@dataclass(frozen=True)
class Explorer:
    """The explorer's arrays for ``B`` images, ``L`` kept layers, ``N`` tokens of which ``P`` prefix, ``HW`` patches.

    Every map is over the patch keys only (``layout.patch_slice``), row-major over the grid, quantised by
    :func:`quantize_rows`; ``*_max`` is each row's max before quantising.

    Attributes:
        mean: head-mean attention of every query token, ``[B, L, N, HW]`` uint8.
        heads: each prefix query's attention per head, ``[B, L, heads, P, HW]`` uint8.
        rollout: rollout row of each prefix token and (last) the mean of the patch tokens, the product of layers
            ``0..layers[l]`` (head mean, no discard, ``(A + I) / 2`` per layer), ``[B, L, P + 1, HW]`` uint8.
        photos: the images as the model sees them, ``[B, img_h, img_w, 3]`` uint8.
        layers: the kept layers (0-based), ``[L]``.
        names: each image's name.
        prefix_tokens: the prefix token kinds in sequence order.
        grid_size: ``(H, W)``.
        depth: the model's layers (the kept ones may be fewer).
        dropped_images: images left out to stay within the byte budget.
    """

    mean: np.ndarray
    mean_max: np.ndarray
    heads: np.ndarray
    heads_max: np.ndarray
    rollout: np.ndarray
    rollout_max: np.ndarray
    photos: np.ndarray
    layers: np.ndarray
    names: tuple[str, ...]
    prefix_tokens: tuple[str, ...]
    grid_size: tuple[int, int]
    depth: int
    dropped_images: int = 0

    @property
    def num_bytes(self) -> int:
        """Raw bytes of the maps and photos (the page carries them base64-encoded, a third more)."""
        return sum(a.nbytes for a in (self.mean, self.heads, self.rollout, self.photos))

    def save(self, out: Path) -> Path:
        """``explorer.npz`` in ``out``: every array under its attribute name, names and settings as arrays too."""
        from vitlens.io import write_npz

        return write_npz(
            Path(out) / EXPLORER_FILE,
            mean=self.mean,
            mean_max=self.mean_max,
            heads=self.heads,
            heads_max=self.heads_max,
            rollout=self.rollout,
            rollout_max=self.rollout_max,
            photos=self.photos,
            layers=self.layers,
            names=np.array(self.names, dtype=str),
            prefix_tokens=np.array(self.prefix_tokens, dtype=str),
            grid_size=np.array(self.grid_size, dtype=np.int64),
            depth=np.array(self.depth, dtype=np.int64),
            dropped_images=np.array(self.dropped_images, dtype=np.int64),
        )

    @classmethod
    def load(cls, path: Path) -> Explorer:
        with np.load(path) as z:
            return cls(
                **{k: z[k] for k in ("mean", "mean_max", "heads", "heads_max", "rollout", "rollout_max", "photos")},
                layers=z["layers"],
                names=tuple(str(s) for s in z["names"]),
                prefix_tokens=tuple(str(s) for s in z["prefix_tokens"]),
                grid_size=(int(z["grid_size"][0]), int(z["grid_size"][1])),
                depth=int(z["depth"]),
                dropped_images=int(z["dropped_images"]),
            )


class _ExplorerAccumulator:
    """Per batch: quantised head-mean rows, per-head prefix rows and the rollout rows of each kept layer."""

    def __init__(self, vit: ViT, layers: list[int]) -> None:
        self.layout = vit.layout
        self.layers = set(layers)
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in ("mean", "heads", "rollout")}
        self._batch: dict[str, list[np.ndarray]] = {k: [] for k in self.parts}
        self._product: torch.Tensor | None = None

    def update(self, layer: int, attn: torch.Tensor) -> None:
        import torch

        from vitlens.analysis.rollout import rollout_layer_matrix

        ps, p = self.layout.patch_slice, self.layout.num_prefix_tokens
        # Rollout needs every layer's factor; float64 so the stored rows are the exact product up to rounding.
        factor = rollout_layer_matrix(attn.to(torch.float64), self.layout)  # [B, N, N]
        self._product = factor if self._product is None else factor @ self._product  # layers 0..layer
        if layer not in self.layers:
            return
        a = attn.to(torch.float64)
        self._batch["mean"].append(a.mean(dim=1)[..., ps].cpu().numpy())  # [B, N, HW]
        self._batch["heads"].append(a[:, :, :p, ps].cpu().numpy())  # [B, heads, P, HW]
        rows = torch.cat([self._product[:, :p], self._product[:, ps].mean(dim=1, keepdim=True)], dim=1)  # [B, P+1, N]
        self._batch["rollout"].append(rows[..., ps].cpu().numpy())  # [B, P + 1, HW]

    def end_batch(self, _batch: Any = None) -> None:
        for k, layers in self._batch.items():
            self.parts[k].append(np.stack(layers, axis=1))  # [B, L, ...]
            layers.clear()
        self._product = None


def explorer_data(
    vit: ViT, dataset: ImageDataset, *, max_bytes: int = EXPLORER_MAX_BYTES, batch_size: int | None = None
) -> Explorer:
    """The explorer's arrays for the images of ``dataset``, within ``max_bytes`` raw bytes.

    As many images as fit are kept with every layer; if not even one fits, every ``k``-th layer (the last always)
    of the first image. Rollout is always the product over all layers up to the kept one.
    """
    from vitlens.attention import stream_attention

    layout = vit.layout
    if layout.patch_slice.start != layout.num_prefix_tokens:
        raise ValueError("the explorer expects the prefix tokens before the patches")
    per_layer = explorer_bytes(
        num_layers=1,
        num_heads=vit.num_heads,
        num_tokens=layout.num_tokens,
        num_prefix=layout.num_prefix_tokens,
        img_size=(0, 0),
    )
    photo = 3 * layout.img_size[0] * layout.img_size[1]
    per_image = vit.depth * per_layer + photo
    keep_images = min(len(dataset), max(1, max_bytes // per_image))
    layers = list(range(vit.depth))
    if per_image > max_bytes:
        fit = max(1, (max_bytes - photo) // per_layer)
        step = -(-vit.depth // fit)  # ceil: at most `fit` layers
        layers = sorted({*range(vit.depth - 1, -1, -step)})
    subset = dataset.subset(range(keep_images), tag=f"explorer{keep_images}") if keep_images < len(dataset) else dataset
    acc = _ExplorerAccumulator(vit, layers)
    stream_attention(vit, subset, acc, batch_size=batch_size, on_batch=acc.end_batch)
    mean, mean_max = quantize_rows(np.concatenate(acc.parts["mean"]))
    heads, heads_max = quantize_rows(np.concatenate(acc.parts["heads"]))
    rollout, rollout_max = quantize_rows(np.concatenate(acc.parts["rollout"]))
    photos = np.stack([np.asarray(subset.load_pil(i).convert("RGB"), dtype=np.uint8) for i in range(len(subset))])
    return Explorer(
        mean=mean,
        mean_max=mean_max,
        heads=heads,
        heads_max=heads_max,
        rollout=rollout,
        rollout_max=rollout_max,
        photos=photos,
        layers=np.array(layers, dtype=np.int64),
        names=tuple(subset.names),
        prefix_tokens=tuple(layout.prefix_kinds),
        grid_size=tuple(layout.grid_size),
        depth=vit.depth,
        dropped_images=len(dataset) - keep_images,
    )


# --------------------------------------------------------------------------------------------------------------
# The page's assets and the explorer's markup


def asset(name: str) -> str:
    """A file of ``vitlens/assets/report/`` as text (shipped as package data)."""
    return package_files("vitlens").joinpath("assets", "report", name).read_text(encoding="utf-8")


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _png(photo: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")  # no timestamp chunk: the same photo gives the same bytes
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _query_names(prefix_tokens: tuple[str, ...]) -> list[str]:
    """``cls``, ``dist``, ``reg0``, ``reg1``, ... in sequence order."""
    names, regs = [], 0
    for kind in prefix_tokens:
        names.append(f"reg{regs}" if kind == "reg" else kind)
        regs += kind == "reg"
    return names


def explorer_html(ex: Explorer) -> str:
    """The explorer's section: controls, the photo with its overlay canvas, and the data as JSON for the script.

    Without JavaScript only the ``<noscript>`` note shows; the static rollout figures stay in their section.
    """
    b, num_layers, n, _ = ex.mean.shape
    gh, gw = ex.grid_size
    names = _query_names(ex.prefix_tokens)
    data = {
        "grid": [gh, gw],
        "num_tokens": n,
        "num_heads": int(ex.heads.shape[2]),
        "layers": [int(v) for v in ex.layers],
        "prefix": names,
        "images": [
            {
                "name": name,
                "photo": _png(ex.photos[i]),
                "mean": _b64(ex.mean[i]),
                "heads": _b64(ex.heads[i]),
                "rollout": _b64(ex.rollout[i]),
            }
            for i, name in enumerate(ex.names)
        ],
    }
    kept_layers = (
        f"all {ex.depth} layers"
        if num_layers == ex.depth
        else f"layers {', '.join(str(v) for v in ex.layers)} of {ex.depth}"
    )
    dropped = f"; {ex.dropped_images} more images left out to stay within the size budget" if ex.dropped_images else ""
    esc = html.escape
    buttons = "".join(
        f'<button type="button" class="ex-q" data-q="{i}">{esc(name)}</button>' for i, name in enumerate(names)
    )
    options = "".join(f'<option value="{i}">{esc(name)}</option>' for i, name in enumerate(ex.names))
    size = ex.num_bytes / 1e6
    # JSON inside <script>: "</" must not appear in it (names are user-provided), so "<" is escaped as \u003c.
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    return "\n".join(
        [
            '<section id="explorer" class="sec sec-ok"><h2>Attention explorer</h2>',
            '<noscript><p class="note">The explorer needs JavaScript; the static figures are in their sections.</p>'
            "</noscript>",
            '<div class="ex" hidden>',
            '<div class="ex-controls">',
            f'<label>image <select id="ex-image">{options}</select></label>',
            '<label>view <select id="ex-mode"><option value="attention">attention</option>'
            '<option value="rollout">rollout up to layer</option></select></label>',
            f'<label>layer <input id="ex-layer" type="range" min="0" max="{num_layers - 1}" value="{num_layers - 1}">'
            ' <output id="ex-layer-out"></output></label>',
            '<label>head <select id="ex-head"><option value="-1">mean</option></select></label>',
            f'<span class="ex-queries">query: {buttons}'
            '<button type="button" class="ex-q" data-q="patch">patch</button></span>',
            "</div>",
            '<div class="ex-stage" tabindex="0" aria-label="photo: click or hover a patch; arrow keys move the query">'
            '<img id="ex-photo" alt="photo"><canvas id="ex-overlay"></canvas><div id="ex-marker"></div></div>',
            '<p id="ex-status" aria-live="polite"></p>',
            "</div>",
            f'<p class="note">Kept: {kept_layers}, {b} images{dropped}; every query\'s head-mean attention, per-head '
            "attention of the prefix tokens only, rollout (head mean, no discard) of the prefix tokens and of the "
            f"patch mean. 8-bit maps, each row scaled to its max: {size:.2f} MB raw "
            f"(<code>{EXPLORER_FILE}</code> has the same arrays). Click or hover a patch; arrow keys move the "
            "query.</p>",
            f'<script type="application/json" id="explorer-data">{payload}</script>',
            "</section>",
        ]
    )
