"""Render the figures of the analysis pages (``docs/figures/*.png``) with vitlens itself, on the demo model.

Run ``OMP_NUM_THREADS=1 python scripts/render_doc_figures.py`` after a change to an analysis or a plot; the demo
model, the digits data and every seed are fixed, so the figures only change when vitlens does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from vitlens.analysis import filter_pca, position_similarity
from vitlens.analysis.fewshot import fewshot_lsr
from vitlens.attention import mean_attention_distance_for, rollout_for
from vitlens.data import open_dataset
from vitlens.definitions.features_pca import features_pca
from vitlens.features import extract_features
from vitlens.models import load_vit
from vitlens.plotting.attention_distance import attention_distance_figure
from vitlens.plotting.fewshot import fewshot_figure
from vitlens.plotting.filters import filters_figure
from vitlens.plotting.pos_sim import pos_sim_figure
from vitlens.plotting.rollout import rollout_grid_figure
from vitlens.plotting.style import save_figure

OUT = Path(__file__).resolve().parent.parent / "docs" / "figures"
NUM_IMAGES = 200  # attention distance: enough digits for stable per-head means, seconds on a CPU
ROLLOUT_IMAGES = 8
COMPARE_EPOCHS = 8  # the demo preset for 8 epochs, a checkpoint each: the fewest that show the structure emerge
COMPARE_FIGURES = ("pos_sim", "attention_distance", "fewshot", "filters", "cka")


def render_compare() -> None:
    """docs/compare.md's worked example: `vitlens train --preset demo --save-every 1`, then `vitlens compare`."""
    import tempfile

    from vitlens.compare import compare
    from vitlens.train import preset_config, train

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        train(preset_config("demo", epochs=COMPARE_EPOCHS, save_every=1, device="cpu"), run)
        result = compare(run, out=Path(tmp) / "compare", load_options={"device": "cpu"}, use_cache=False)
        for row in result.rows:  # the numbers docs/compare.md quotes
            if row.quantity in ("row_col_score", "neighbour_minus_far", "head_std_px", "mean_px", "accuracy_10shot"):
                sys.stderr.write(f"{row.model},{row.analysis},{row.quantity},{row.layer},{row.value:.4f}\n")
        for name in COMPARE_FIGURES:
            path = OUT / f"compare_{name}.png"
            path.write_bytes((result.out / f"compare_{name}.png").read_bytes())
            sys.stderr.write(f"wrote {path} ({path.stat().st_size // 1024} KB)\n")


def render_report_screenshot() -> None:
    """docs/report.md's screenshot: the demo report's attention explorer in headless Chromium (skipped without it)."""
    import shutil
    import tempfile

    from vitlens.report import build_report

    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        browser = None
    if not browser or not driver_path:
        sys.stderr.write("no chromium + chromedriver + selenium: report screenshot not rendered\n")
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report"
        build_report(load_vit("demo", device="cpu"), sections=["info", "attention-distance", "rollout"], out=out)
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,900", "--hide-scrollbars"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            driver.get((out / "index.html").as_uri())
            section = driver.find_element("id", "explorer")
            driver.execute_script("document.querySelector('nav.sections').style.position = 'static'")
            path = OUT / "report_explorer.png"
            path.write_bytes(section.screenshot_as_png)
            sys.stderr.write(f"wrote {path} ({path.stat().st_size // 1024} KB)\n")
        finally:
            driver.quit()


def main() -> None:
    if sys.argv[1:] == ["report"]:  # only the report page's screenshot (needs chromium and chromedriver)
        OUT.mkdir(parents=True, exist_ok=True)
        render_report_screenshot()
        return
    if sys.argv[1:] == ["compare"]:  # only the compare example (it trains a model: about a minute on a CPU)
        OUT.mkdir(parents=True, exist_ok=True)
        render_compare()
        return
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    vit = load_vit("demo", device="cpu")
    test = open_dataset("digits", vit.preprocess, split="test", num_images=NUM_IMAGES, seed=0)
    figures = {
        "filters": filters_figure(filter_pca(vit.patch_projection())),
        "pos_sim": pos_sim_figure(position_similarity(vit.position_embedding(), vit.layout)),
        "attention_distance": attention_distance_figure(mean_attention_distance_for(vit, test, batch_size=50)),
    }

    few = open_dataset("digits", vit.preprocess, split="test", num_images=ROLLOUT_IMAGES, seed=0)
    rollout = rollout_for(vit, few)
    photos = [few.load_pil(i) for i in range(len(few))]
    figures["rollout"] = rollout_grid_figure(photos, rollout.maps, few.names, title="attention rollout (cls token)")
    figures["features"] = features_pca(vit, few).figure()  # the command's figure: photos beside their PCA maps

    pool = open_dataset("digits", vit.preprocess, split="train")
    full_test = open_dataset("digits", vit.preprocess, split="test")
    result = fewshot_lsr(
        extract_features(vit, pool),
        pool.labels,
        extract_features(vit, full_test),
        full_test.labels,
        shots=[1, 2, 5, 10, 25],
        seeds=5,
        num_classes=len(pool.classes),
        class_names=list(pool.classes),
    )
    figures["fewshot"] = fewshot_figure(result)

    for name, fig in figures.items():
        path = save_figure(fig, OUT / f"{name}.png")
        sys.stderr.write(f"wrote {path} ({path.stat().st_size // 1024} KB)\n")
    render_compare()
    render_report_screenshot()


if __name__ == "__main__":
    main()
