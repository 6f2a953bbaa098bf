"""The page at ``/`` in a real browser: Debian's chromium driven by playwright (``executable_path``; playwright's
own browser download is never used). .ci/run installs chromium, so CI runs this; it skips only where
chromium or playwright is missing."""

from __future__ import annotations

import io
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uniref.pipeline import EditPipeline
from uniref.serve import ServeConfig, ServerThread, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:  # the dev extra brings it; a bare install may not have it
    sync_playwright = None  # type: ignore[assignment]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or sync_playwright is None, reason="needs Debian's chromium and playwright (.ci/run installs both)"
)
# The flags a sandboxed root CI needs, and none of Chromium's calls home (this machine's network is closed).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000


def _png(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> Path:
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[...] = colour
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    pipe = EditPipeline.from_pretrained("tiny-random")
    with ServerThread(create_app(pipe, ServeConfig(model_name="tiny-random"))) as running:
        yield running


@pytest.fixture
def page(server: ServerThread) -> Iterator[Page]:
    assert sync_playwright is not None
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(server.url + "/")
            yield page
        finally:
            browser.close()


def test_page_uploads_two_references_shows_the_plan_runs_and_shows_the_result(
    page: Page, server: ServerThread, tmp_path: Path
) -> None:
    spec = server.app.state.pipe.model.spec
    expect(page.locator("#model-name")).to_contain_text("tiny-random")
    wide = _png(tmp_path / "background.png", (60, 30), (40, 120, 200))
    small = _png(tmp_path / "circle.png", (20, 20), (220, 30, 30))
    page.set_input_files("#file-input", [str(wide), str(small)])
    refs = page.locator("[data-testid=ref]")
    expect(refs).to_have_count(2)
    expect(refs.nth(0)).to_contain_text("picture 1")
    expect(refs.nth(0)).to_contain_text("background.png")
    rows = page.locator("[data-testid=plan-row]")
    expect(rows).to_have_count(2)  # the SELF plan, before running
    expect(page.locator("#plan")).to_contain_text(f"of {spec.ref_budget // spec.token_pixels**2} tokens")

    refs.nth(1).get_by_title("move up").click()  # reorder: the circle becomes picture 1
    expect(refs.nth(0)).to_contain_text("circle.png")
    expect(rows.nth(0)).to_contain_text("20×20")

    page.fill("#prompt", "put the red circle from picture 1 on the background of picture 2")
    page.locator("details summary").click()
    page.fill("#steps", "2")
    page.click("#run")
    result = page.locator("#result-img")
    expect(result).to_be_visible()
    width = page.evaluate("document.getElementById('result-img').naturalWidth")
    assert width > 0
    expect(page.locator("#download")).to_have_attribute("href", re.compile(r"^data:image/png;base64,"))
    expect(page.locator("[data-testid=attention-summary]")).to_contain_text("picture 1 got")
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#progress")).to_be_hidden()
    shot = page.screenshot()
    assert Image.open(io.BytesIO(shot)).size == (1100, 800)


def test_page_shows_the_servers_message_for_a_bad_file(page: Page, tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    page.set_input_files("#file-input", [str(bad)])
    expect(page.locator("#error")).to_contain_text("image #1 'broken.png': not an image PIL can read")
