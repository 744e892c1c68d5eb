"""`vitlens report`: every analysis of one model in one folder, with an HTML page, a Markdown summary and a JSON file.

The model is loaded once by the caller and each section calls the library (never the CLI commands), so a failing
section is recorded and the others still run. Each section writes the files its single command would.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from vitlens import defaults
from vitlens.errors import NotApplicable, ParameterError, VitlensError
from vitlens.page import html_table, markdown_cell, markdown_table, png_figure, versions
from vitlens.result import finite

if TYPE_CHECKING:
    from vitlens.data import ImageDataset
    from vitlens.models.vit import ViT

Status = Literal["ok", "failed", "skipped"]


def section_names() -> tuple[str, ...]:
    """The report's sections in order: ``info``, then every registered analysis."""
    from vitlens.registry import definitions

    return ("info", *(d.name for d in definitions()))


@dataclass(frozen=True)
class SectionResult:
    """One section's outcome.

    Attributes:
        status: ``ok``, ``failed`` (``error`` says why, in one line) or ``skipped`` (``error`` says why).
        summary: the section's key numbers, JSON-ready.
        files: what the section wrote, relative to the report folder.
        key: one line with the section's headline number, for tables.
    """

    name: str
    status: Status
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    error: str | None = None
    key: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "key": self.key,
            "summary": self.summary,
            "files": list(self.files),
        }


@dataclass(frozen=True)
class ReportResult:
    """What :func:`build_report` did: per-section results, ``summary.json``'s content, and the files written."""

    out: Path
    sections: tuple[SectionResult, ...]
    summary: dict[str, Any]
    files: tuple[Path, ...]

    @property
    def failed(self) -> list[str]:
        return [s.name for s in self.sections if s.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed


def parse_sections(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"info,filters"`` (or a list of such) as section names in report order; None for all.

    Raises:
        ParameterError: an unknown name, or none (named ``sections``, as in :func:`build_report`).
    """
    sections = section_names()
    if value is None:
        return sections
    parts = [value] if isinstance(value, str) else list(value)
    names = {p.strip().lower() for part in parts for p in part.split(",") if p.strip()}
    unknown = sorted(names - set(sections))
    if unknown or not names:
        shown = ", ".join(unknown) if unknown else "(none)"
        raise ParameterError("sections", f"sections: unknown section {shown}; choose from {', '.join(sections)}")
    return tuple(s for s in sections if s in names)


@dataclass
class _Run:
    """Everything the sections share: the model, the data options, the output folder."""

    vit: ViT
    out: Path
    data: str
    images: list[str] | None
    split: str
    num_images: int | None
    rollout_images: int
    shots: tuple[int, ...]
    seeds: int
    l2: float | str
    batch_size: int | None
    data_root: Path | None
    download: bool
    cache_dir: Path | None
    use_cache: bool

    def open(self, spec: Any, *, split: str, num_images: int | None, require_labels: bool = False) -> ImageDataset:
        from vitlens.data import open_dataset

        return open_dataset(
            spec,
            self.vit.preprocess,
            split=split,  # type: ignore[arg-type]
            num_images=num_images,
            data_root=self.data_root,
            download=self.download,
            require_labels=require_labels,
        )

    def open_images(self) -> ImageDataset:
        """The report's images for the per-image sections: ``images`` (files, or all of one folder), else
        ``rollout_images`` images of ``data``."""
        if self.images:
            folder = len(self.images) == 1 and Path(self.images[0]).expanduser().is_dir()
            return self.open(self.images[0] if folder else self.images, split="all", num_images=None)
        return self.open(self.data, split=self.split, num_images=self.rollout_images)

    def rel(self, paths: Sequence[Path]) -> tuple[str, ...]:
        return tuple(Path(p).relative_to(self.out).as_posix() for p in paths)


def build_report(
    vit: ViT,
    *,
    data: str = "digits",
    images: Sequence[str] | None = None,
    sections: Sequence[str] | None = None,
    out: str | Path = "vitlens-report",
    split: str = "test",
    num_images: int | None = defaults.REPORT_NUM_IMAGES,
    rollout_images: int = defaults.REPORT_ROLLOUT_IMAGES,
    shots: Sequence[int] = defaults.REPORT_SHOTS,
    seeds: int = defaults.REPORT_SEEDS,
    l2: float | str = defaults.REPORT_L2,
    batch_size: int | None = None,
    data_root: str | Path | None = None,
    download: bool = False,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    on_section: Callable[[str, int, int], None] | None = None,
) -> ReportResult:
    """Run the chosen sections on ``vit`` and write their files, ``summary.json``, ``report.md`` and ``index.html``.

    A section that raises is recorded as failed (one-line error) and the others still run; only Ctrl-C stops it.

    Args:
        data: data spec for attention distance, rollout (unless ``images``) and few-shot (if labelled).
        images: image files (or one folder) for rollout instead of ``rollout_images`` images of ``data``.
        sections: names from :func:`section_names`; None for all.
        num_images: attention-distance images (stratified subset of ``split``); None for all.
        shots, seeds, l2: the few-shot protocol (shots from the train split of ``data``, scored on its test split).
        on_section: called as ``on_section(name, done, total)`` before each section, and ``("", total, total)`` last.

    Raises:
        ParameterError: an unknown section name, or ``images`` naming a file or folder that does not exist.
        VitlensError: the output folder cannot be written.
    """
    from vitlens.io import ensure_out_dir, write_json, write_text

    chosen = parse_sections(sections)
    missing = [str(i) for i in images or () if not Path(i).expanduser().exists()]
    if missing:  # a typo is the caller's error: say so before any section runs or anything is written
        raise ParameterError("images", f"images: no such file or folder: {', '.join(missing)}")
    started = time.perf_counter()
    out = ensure_out_dir(out)
    run = _Run(
        vit=vit,
        out=out,
        data=str(data),
        images=[str(i) for i in images] if images else None,
        split=split,
        num_images=num_images,
        rollout_images=rollout_images,
        shots=tuple(shots),
        seeds=seeds,
        l2=l2,
        batch_size=batch_size,
        data_root=None if data_root is None else Path(data_root),
        download=download,
        cache_dir=None if cache_dir is None else Path(cache_dir),
        use_cache=use_cache,
    )
    results: list[SectionResult] = []
    for i, name in enumerate(chosen):
        if on_section is not None:
            on_section(name, i, len(chosen))
        results.append(_run_section(name, run))
    if on_section is not None:
        on_section("", len(chosen), len(chosen))
    order = section_names()
    for name in order:
        if name not in chosen:
            results.append(SectionResult(name, "skipped", error="not selected with --sections"))
    results.sort(key=lambda r: order.index(r.name))
    explorer = _explorer(run) if "rollout" in chosen else None

    card = _describe(vit)
    summary = {
        "status": "failed" if any(r.status == "failed" for r in results) else "ok",
        "failed": [r.name for r in results if r.status == "failed"],
        "source": vit.source,
        "arch": vit.arch,
        "device": str(vit.device),
        "data": run.data,
        "images": run.images,
        "seconds": round(time.perf_counter() - started, 3),
        "versions": versions(),
        "sections": {r.name: r.to_dict() for r in results},
    }
    if explorer is not None:
        summary["explorer"] = explorer
    summary = finite(summary)
    files = [
        write_json(out / "summary.json", summary),
        write_text(out / "report.md", render_markdown(summary, card)),
    ]
    files.append(write_text(out / "index.html", render_html(summary, card, out)))
    written = [out / f for r in results for f in r.files] + files
    if explorer is not None and explorer["status"] == "ok":
        written.append(out / explorer["file"])
    return ReportResult(out=out, sections=tuple(results), summary=summary, files=tuple(written))


def _run_section(name: str, run: _Run) -> SectionResult:
    started = time.perf_counter()
    try:
        summary, files, key = _info(run) if name == "info" else _analysis(name, run)
    except NotApplicable as e:
        return SectionResult(name, "skipped", time.perf_counter() - started, error=str(e))
    except VitlensError as e:
        return SectionResult(name, "failed", time.perf_counter() - started, error=_one_line(str(e)))
    except Exception as e:  # a bug in one section must not cost the user the other five
        from vitlens.log import logger

        logger.debug("section %s failed", name, exc_info=True)
        message = f"{type(e).__name__}: {_one_line(str(e))}" if str(e).strip() else type(e).__name__
        return SectionResult(name, "failed", time.perf_counter() - started, error=message)
    return SectionResult(name, "ok", time.perf_counter() - started, finite(summary), run.rel(files), key=key)


def _explorer(run: _Run) -> dict[str, Any]:
    """The attention explorer's maps of the report's images in ``explorer.npz``, with the rollout section (its images).

    A failure is recorded (status and one-line error) and costs only the explorer.
    """
    from vitlens.report_web import explorer_data

    started = time.perf_counter()
    try:
        ex = explorer_data(run.vit, run.open_images(), batch_size=run.batch_size)
        path = ex.save(run.out)
    except Exception as e:  # like a section: the rest of the report stands
        from vitlens.log import logger

        logger.debug("explorer failed", exc_info=True)
        message = f"{type(e).__name__}: {_one_line(str(e))}" if str(e).strip() else type(e).__name__
        return {"status": "failed", "error": message, "seconds": round(time.perf_counter() - started, 3)}
    return {
        "status": "ok",
        "seconds": round(time.perf_counter() - started, 3),
        "file": run.rel([path])[0],
        "images": len(ex.names),
        "dropped_images": ex.dropped_images,
        "layers": [int(v) for v in ex.layers],
        "bytes": ex.num_bytes,
    }


def _one_line(message: str) -> str:
    lines = message.strip().splitlines()
    return lines[0] if lines else "failed"


# --------------------------------------------------------------------------------------------------------------
# Sections: each returns (key numbers, files written, headline)

SectionOutput = tuple[dict[str, Any], list[Path], str]


def _info(run: _Run) -> SectionOutput:
    from vitlens.io import write_json

    facts = run.vit.describe()
    summary = {
        k: facts[k] for k in ("arch", "num_params", "depth", "num_heads", "embed_dim", "grid_size", "patch_size")
    }
    key = f"{facts['arch']}: {facts['num_params'] / 1e6:.2f} M parameters, {facts['depth']} layers"
    return summary, [write_json(run.out / "info.json", finite(facts))], key


def _analysis(name: str, run: _Run) -> SectionOutput:
    """A registered analysis as its definition runs it for the report, saved as its command saves it."""
    from vitlens.registry import get

    result = get(name).section(run)
    files = result.save(run.out)
    return finite(result.key_numbers()), files, result.summary()


# --------------------------------------------------------------------------------------------------------------
# Helpers


def _describe(vit: ViT) -> dict[str, Any]:
    try:
        return finite(vit.describe())
    except Exception:  # the model card is decoration; the info section reports a real failure
        return {"source": vit.source}


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_short(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_short(v) for v in value)
    return "" if value is None else str(value)


# --------------------------------------------------------------------------------------------------------------
# Rendering: plain string templates, everything user-provided escaped


def _cards(items: Sequence[tuple[str, str]]) -> str:
    """Key numbers as small cards: value in bold, its name under it."""
    esc = html.escape
    return (
        '<div class="card-grid">'
        + "".join(f'<div class="card"><b>{esc(v)}</b><span>{esc(k)}</span></div>' for k, v in items)
        + "</div>"
    )


_CARD_FACTS = ("arch", "num_params", "img_size", "patch_size", "grid_size", "depth", "num_heads", "embed_dim")


def _attention_distance_live(out: Path) -> str:
    """The attention-distance plot drawn by the page's script from ``attention_distance.json`` (hover a dot for
    layer, head, distance and spread; a head's dots are joined across layers); nothing without the file."""
    path = out / "attention_distance.json"
    try:
        numbers = json.loads(path.read_text())
        payload = {"distance_px": numbers["distance_px"], "std_px": numbers["std_px"]}
    except (OSError, ValueError, KeyError):
        return ""
    data = json.dumps(payload, separators=(",", ":"))
    return (
        '<div class="ad-live"><div id="ad-live"></div><p id="ad-tip" class="note">hover a dot: layer, head, '
        f'distance and spread</p><script type="application/json" id="ad-data">{data}</script></div>'
    )


def render_html(summary: dict[str, Any], card: dict[str, Any], out: Path) -> str:
    """One self-contained page: header with the model card, navigation, each section's key numbers as cards above
    its figures (PNG inlined as base64), the attention explorer when ``explorer.npz`` was written, and versions.

    The CSS and the script are vitlens's own (``vitlens/assets/report/``), written into the page: no network request,
    and with JavaScript off every figure and table still shows. Links go only to files of ``out`` that exist, by
    relative path. The same inputs give the same bytes.
    """
    from vitlens.report_web import EXPLORER_FILE, Explorer, asset, explorer_html

    esc = html.escape
    sections = summary["sections"]
    nav = "".join(
        f'<a class="{s["status"]}" href="#{name}" title="{esc(s["status"])}">{esc(name)}</a>'
        for name, s in sections.items()
    )
    explorer = summary.get("explorer") or {}
    has_explorer = explorer.get("status") == "ok" and (out / EXPLORER_FILE).is_file()
    if has_explorer:
        nav += '<a class="ok" href="#explorer">explorer</a>'
    overview = []
    for name, s in sections.items():
        status = f'<span class="{s["status"]}">{esc(s["status"])}</span>'
        detail = esc(s["error"] or "") if s["status"] != "ok" else esc(s["key"])
        overview.append([f'<a href="#{name}">{esc(name)}</a>', status, f"{s['seconds']:.2f}", detail])
    facts = [(k, _short(card[k])) for k in _CARD_FACTS if k in card]
    rest = [[k, _short(v)] for k, v in card.items() if k not in _CARD_FACTS and k != "guessed"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>vitlens report: {esc(str(summary['source']))}</title>",
        f"<style>{asset('report.css')}</style></head><body>",
        '<header class="top">',
        f"<h1>vitlens report: <code>{esc(str(summary['source']))}</code></h1>",
        f'<p class="status-line"><span class="{summary["status"]}">status: {esc(summary["status"])}</span>'
        f" &middot; {summary['seconds']:.1f} s on {esc(summary['device'])} &middot; data {esc(summary['data'])}"
        + (f" &middot; failed: {esc(', '.join(summary['failed']))}" if summary["failed"] else "")
        + "</p>",
        _cards(facts),
        "<details><summary>model card</summary>" + html_table(["fact", "value"], rest),
    ]
    guessed = card.get("guessed") or {}
    if guessed:
        parts.append("<p>guessed: " + "; ".join(f"{esc(k)}: {esc(str(v))}" for k, v in guessed.items()) + "</p>")
    parts += [
        "</details></header>",
        f'<nav class="sections" aria-label="sections">{nav}</nav>',
        "<main>",
        '<section id="overview" class="sec"><h2>Sections</h2>',
        html_table(["section", "status", "seconds", "key number / error"], overview, escape=False),
        "</section>",
    ]
    for name, s in sections.items():
        parts.append(f'<section id="{name}" class="sec sec-{s["status"]}">')
        parts.append(f'<h2>{esc(name)} <small class="{s["status"]}">{esc(s["status"])}</small></h2>')
        if s["status"] != "ok":
            parts.append(f"<p>{esc(s['error'] or '')}</p></section>")
            continue
        parts.append(f"<p>{esc(s['key'])}</p>")
        if name == "info":
            parts.append('<p class="note">The model card is in the header.</p>')
        else:
            parts.append(_cards([(k, _short(v)) for k, v in s["summary"].items()]))
        if name == "attention-distance":
            parts.append(_attention_distance_live(out))
        for rel in s["files"]:
            if rel.endswith(".png") and (out / rel).is_file():
                parts.append(png_figure((out / rel).read_bytes(), rel))
        links = [f'<a href="{esc(rel)}">{esc(rel)}</a>' for rel in s["files"] if (out / rel).is_file()]
        parts.append('<p class="note">files: ' + ", ".join(links) + "</p></section>")
    if has_explorer:
        parts.append(explorer_html(Explorer.load(out / EXPLORER_FILE)))
    elif explorer.get("status") == "failed":
        parts.append(
            '<section id="explorer" class="sec sec-failed"><h2>Attention explorer <small class="failed">failed</small>'
            f"</h2><p>{esc(explorer.get('error') or '')}</p></section>"
        )
    versions_row = [[k, str(v)] for k, v in summary["versions"].items()]
    parts += ['<section id="versions" class="sec"><h2>Versions</h2>', html_table(["package", "version"], versions_row)]
    parts += ['<p><a href="summary.json">summary.json</a> &middot; <a href="report.md">report.md</a></p></section>']
    parts.append(f"</main><script>{asset('explorer.js')}</script></body></html>")
    return "\n".join(parts) + "\n"


def render_markdown(summary: dict[str, Any], card: dict[str, Any]) -> str:
    """The report as Markdown, figures linked by relative path (fit for a CI job summary)."""
    overview = [
        [name, s["status"], f"{s['seconds']:.2f}", s["key"] if s["status"] == "ok" else (s["error"] or "")]
        for name, s in summary["sections"].items()
    ]
    lines = [
        f"# vitlens report: `{markdown_cell(summary['source'])}`",
        "",
        f"**status: {summary['status']}** · {summary['seconds']:.1f} s on {markdown_cell(summary['device'])} "
        f"· data `{markdown_cell(summary['data'])}`",
        "",
        markdown_table(
            ["section", "status", "seconds", "key number / error"], overview, align=[None, None, "right", None]
        ),
        "",
        "## Model",
        "",
        markdown_table(["fact", "value"], [[k, _short(v)] for k, v in card.items() if k != "guessed"]),
    ]
    for name, s in summary["sections"].items():
        if s["status"] != "ok":
            continue
        lines += ["", f"## {name}", "", s["key"], ""]
        lines.append(markdown_table(["number", "value"], [[k, _short(v)] for k, v in s["summary"].items()]))
        pngs = [f for f in s["files"] if f.endswith(".png")]
        figures = [f for f in pngs if "/" not in f] or pngs  # rollout of one image has only rollout/<image>.png
        lines += [""] + [f"![{name}]({f})" for f in figures]
    lines += ["", "versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()), ""]
    return "\n".join(lines)
