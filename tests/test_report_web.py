"""The report page in a real headless Chromium: the explorer's overlay is the stored attention row, rollout follows
the layer slider, arrow keys move the query, no console error or network request, every figure shows without JS.

The explorer's arrays themselves are checked against a plain computation (hooked attention, ``(A + I) / 2`` products)
without a browser.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import make_vit
from vitlens.cli.app import app
from vitlens.layout import Preprocess
from vitlens.models.vit import ViT

runner = CliRunner()
SECTIONS = "info,attention-distance,rollout"


# --------------------------------------------------------------------------------------------------------------
# Without a browser: the arrays against a plain computation


def _vit(name: str) -> ViT:
    model = make_vit(name)
    return ViT(model, Preprocess(img_size=tuple(model.patch_embed.img_size)))


def _plain_attention(vit, images: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's attention ``[B, heads, N, N]`` in float64, from vitlens's hooks."""
    maps: list[torch.Tensor] = []
    with torch.no_grad(), vit.hooks(attention=lambda _layer, a: maps.append(a.double().clone())):
        vit.features(images)
    return maps


@pytest.mark.parametrize("kind", ["cls", "reg", "gap"])
def test_explorer_arrays_equal_a_plain_computation(kind, tmp_path):
    from vitlens.data import open_dataset
    from vitlens.report_web import Explorer, explorer_data

    vit = _vit(kind)
    layout = vit.layout
    ds = open_dataset("digits", vit.preprocess, split="test", num_images=3)
    ex = explorer_data(vit, ds, batch_size=2)  # two batches: the rollout product restarts per batch
    ex = Explorer.load(ex.save(tmp_path))
    images = torch.stack([ds[i][0] for i in range(3)])
    maps = _plain_attention(vit, images)
    p, ps = layout.num_prefix_tokens, layout.patch_slice
    n = layout.num_tokens
    product = torch.eye(n, dtype=torch.float64).expand(3, n, n)
    assert ex.mean.shape == (3, vit.depth, n, layout.num_patches) and ex.mean.dtype == np.uint8
    for layer, a in enumerate(maps):
        fused = a.mean(dim=1) + torch.eye(n, dtype=torch.float64)
        product = (fused / fused.sum(dim=-1, keepdim=True)) @ product
        mean = a.mean(dim=1)[..., ps].numpy()  # [B, N, HW]
        expected = np.rint(255 * mean / mean.max(axis=-1, keepdims=True))
        np.testing.assert_array_equal(ex.mean[:, layer], expected)
        np.testing.assert_allclose(ex.mean_max[:, layer], mean.max(axis=-1), rtol=1e-6)
        heads = a[:, :, :p, ps].numpy()
        np.testing.assert_array_equal(ex.heads[:, layer], np.rint(255 * heads / heads.max(axis=-1, keepdims=True)))
        rows = torch.cat([product[:, :p], product[:, ps].mean(dim=1, keepdim=True)], dim=1)[..., ps].numpy()
        np.testing.assert_array_equal(ex.rollout[:, layer], np.rint(255 * rows / rows.max(axis=-1, keepdims=True)))
    assert ex.photos.shape == (3, *layout.img_size, 3)


def test_byte_budget_drops_images_then_layers():
    from vitlens.data import open_dataset
    from vitlens.report_web import explorer_bytes, explorer_data

    vit = _vit("cls")
    layout = vit.layout
    ds = open_dataset("digits", vit.preprocess, split="test", num_images=3)
    one = explorer_bytes(
        num_layers=vit.depth,
        num_heads=vit.num_heads,
        num_tokens=layout.num_tokens,
        num_prefix=layout.num_prefix_tokens,
        img_size=layout.img_size,
    )
    two = explorer_data(vit, ds, max_bytes=2 * one + 1)
    assert len(two.names) == 2 and two.dropped_images == 1 and two.num_bytes == 2 * one
    thin = explorer_data(vit, ds, max_bytes=one - 1)
    assert len(thin.names) == 1 and len(thin.layers) < vit.depth and thin.layers[-1] == vit.depth - 1
    assert thin.num_bytes <= one - 1
    # ViT-B/16 at 224 px, 6 images: what the page carries by design, under 10 MB with base64's third
    vit_b = explorer_bytes(num_layers=12, num_heads=12, num_tokens=197, num_prefix=1, img_size=(224, 224))
    assert 6 * vit_b * 4 / 3 < 6e6


# --------------------------------------------------------------------------------------------------------------
# In the browser


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def _driver(*, javascript: bool = True):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    found = _chromium()
    if found is None:
        pytest.skip("no chromium + chromedriver on PATH (.ci/run installs Debian's chromium and chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    if not javascript:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    return webdriver.Chrome(service=Service(found[1]), options=options)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """One demo report with the sections the page's interactive parts need (two images)."""
    out = tmp_path_factory.mktemp("web") / "r"
    cache = tmp_path_factory.mktemp("cache")
    args = ["report", "--device", "cpu", "--out", str(out), "--sections", SECTIONS, "--num-images", "8"]
    result = runner.invoke(app, [*args, "--rollout-images", "2", "--quiet"], env={"VITLENS_CACHE_DIR": str(cache)})
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def browser(report):
    driver = _driver()
    driver.get((report / "index.html").as_uri())
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def stored(report) -> dict[str, np.ndarray]:
    with np.load(report / "explorer.npz") as z:
        return {k: z[k] for k in z.files}


def _overlay_red(driver) -> np.ndarray:
    """The overlay canvas read back: its red channel is the stored 8-bit value, row-major over the grid."""
    data = driver.execute_script(
        "const c = document.getElementById('ex-overlay');"
        "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);"
    )
    return np.asarray(data, dtype=np.uint8)[0::4]


def _state(driver) -> dict[str, str]:
    stage = driver.find_element("css selector", ".ex-stage")
    return {k: stage.get_attribute(f"data-{k}") for k in ("query", "layer", "mode")}


def _click_patch(driver, row: int, col: int, grid: tuple[int, int]) -> None:
    from selenium.webdriver import ActionChains

    stage = driver.find_element("css selector", ".ex-stage")
    w, h = stage.size["width"], stage.size["height"]
    # offsets are from the element's centre (Selenium 4)
    dx = int((col + 0.5) * w / grid[1] - w / 2)
    dy = int((row + 0.5) * h / grid[0] - h / 2)
    ActionChains(driver).move_to_element_with_offset(stage, dx, dy).click().perform()


def test_page_loads_from_file_without_errors_or_network(browser, report):
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    urls = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    page = (report / "index.html").as_uri()
    assert page in urls
    assert all(u == page or u.startswith("data:") for u in urls), [u for u in urls if not u.startswith("data:")]
    assert browser.find_element("id", "explorer").is_displayed()
    # the attention-distance plot: one dot per layer and head, hovering one names it
    from selenium.webdriver import ActionChains

    numbers = json.loads((report / "attention_distance.json").read_text())
    dots = browser.find_elements("css selector", "#ad-live circle")
    assert len(dots) == len(numbers["distance_px"]) * len(numbers["distance_px"][0])
    h = len(numbers["distance_px"][0]) - 1  # the last head's dots are drawn on top of the others
    dot = browser.find_element("css selector", f'#ad-live circle[data-layer="2"][data-head="{h}"]')
    ActionChains(browser).move_to_element(dot).perform()
    tip = browser.find_element("id", "ad-tip").text
    assert tip.startswith(f"layer 2, head {h}: distance ") and f"{numbers['distance_px'][2][h]:.2f} px" in tip
    assert f"spread {numbers['std_px'][2][h]:.2f} px" in tip
    assert browser.find_element("css selector", f'polyline[data-head="{h}"]').get_attribute("class") == "hl"


def test_clicking_a_patch_shows_its_stored_row(browser, stored):
    grid = tuple(int(v) for v in stored["grid_size"])
    p = len(stored["prefix_tokens"])
    _click_patch(browser, 2, 5, grid)
    state = _state(browser)
    query, layer = int(state["query"]), int(state["layer"])
    assert query == p + 2 * grid[1] + 5 and layer == len(stored["layers"]) - 1
    np.testing.assert_array_equal(_overlay_red(browser), stored["mean"][0, layer, query])
    # a prefix query with one head: the per-head row
    from selenium.webdriver.support.ui import Select

    browser.find_element("css selector", '.ex-q[data-q="0"]').click()
    Select(browser.find_element("id", "ex-head")).select_by_value("3")
    np.testing.assert_array_equal(_overlay_red(browser), stored["heads"][0, layer, 3, 0])
    Select(browser.find_element("id", "ex-head")).select_by_value("-1")
    # another image
    Select(browser.find_element("id", "ex-image")).select_by_value("1")
    np.testing.assert_array_equal(_overlay_red(browser), stored["mean"][1, layer, 0])
    Select(browser.find_element("id", "ex-image")).select_by_value("0")


def test_layer_slider_shows_rollout_up_to_that_layer(browser, stored):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    browser.find_element("css selector", '.ex-q[data-q="0"]').click()
    Select(browser.find_element("id", "ex-mode")).select_by_value("rollout")
    slider = browser.find_element("id", "ex-layer")
    slider.send_keys(Keys.HOME)
    seen = []
    for layer in range(len(stored["layers"])):
        if layer:
            slider.send_keys(Keys.ARROW_RIGHT)
        assert _state(browser) == {"query": "0", "layer": str(layer), "mode": "rollout"}
        red = _overlay_red(browser)
        np.testing.assert_array_equal(red, stored["rollout"][0, layer, 0])
        seen.append(red)
    assert any((a != b).any() for a, b in itertools.pairwise(seen))  # the product changes with depth
    Select(browser.find_element("id", "ex-mode")).select_by_value("attention")


def test_arrow_keys_move_the_query(browser, stored):
    from selenium.webdriver.common.keys import Keys

    grid = tuple(int(v) for v in stored["grid_size"])
    p = len(stored["prefix_tokens"])
    _click_patch(browser, 3, 3, grid)
    start = int(_state(browser)["query"])
    assert start == p + 3 * grid[1] + 3
    stage = browser.find_element("css selector", ".ex-stage")
    # the pointer must not hover the stage, or mousemove would take the query back
    from selenium.webdriver import ActionChains

    ActionChains(browser).move_to_element(browser.find_element("id", "ex-status")).perform()
    stage.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_DOWN)
    query = int(_state(browser)["query"])
    assert query == start + 2 + grid[1]
    layer = int(_state(browser)["layer"])
    np.testing.assert_array_equal(_overlay_red(browser), stored["mean"][0, layer, query])
    stage.send_keys(*[Keys.ARROW_LEFT] * (grid[1] + 3))  # stops at the edge
    assert int(_state(browser)["query"]) == p + 4 * grid[1]


def test_without_javascript_every_figure_shows(report):
    driver = _driver(javascript=False)
    try:
        driver.get((report / "index.html").as_uri())
        images = driver.find_elements("css selector", "figure img")
        pngs = [p for p in report.rglob("*.png")]
        assert len(images) == len(pngs) >= 4
        for img in images:
            assert img.is_displayed()
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0
        assert not driver.find_element("css selector", "#explorer .ex").is_displayed()
        assert "needs JavaScript" in driver.find_element("id", "explorer").text
        assert driver.find_elements("css selector", "#ad-live circle") == []
    finally:
        driver.quit()


def test_page_is_byte_identical_and_self_contained(report, tmp_path):
    from vitlens.report import render_html

    summary = json.loads((report / "summary.json").read_text())
    card = json.loads((report / "info.json").read_text())
    page = (report / "index.html").read_text()
    assert render_html(summary, card, report) == page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
    assert os.path.getsize(report / "index.html") < 10e6
