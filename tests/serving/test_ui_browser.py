"""The clinician page at /ui in a real headless Chromium, against a real `bentoml serve` of a registered model.

Debian's chromium is driven by Playwright (no browser download: ``playwright install`` needs the internet). The
page must show the served model and the disclaimer, classify and explain a real tile, show the server's message
for a bad file and keep working, handle several tiles at once, load nothing from outside the server, and fit a
narrow screen. The whole-slide page (/ui/assess, linked from the tile page) must upload a slide, follow the task
to its estimate and map, and show the server's message for a file that is not a slide.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Locator, Page, Request, expect, sync_playwright

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TILES = REPO / "data" / "sample" / "images"
VIABLE_TILE = TILES / "Viable-Tumor" / "Case-48-P5-C20-15162-19423.jpg"
CLASSES = ("Non-Tumor", "Non-Viable-Tumor", "Viable-Tumor")
CHROMIUM = Path("/usr/bin/chromium")
#: A result card is done when its label and its heatmap have both arrived; a real model on 2 cores needs seconds.
CARD_TIMEOUT_MS = 60_000

if not CHROMIUM.exists() and not os.environ.get("BONETUMOR_REQUIRE_BROWSER"):
    pytest.skip(
        f"{CHROMIUM} is missing (apt-get install chromium); set BONETUMOR_REQUIRE_BROWSER=1 to fail instead",
        allow_module_level=True,
    )


class Served(Protocol):
    """What the ``served`` fixture (tests/serving/conftest.py) yields: a running service and its model version."""

    url: str
    version: str


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's headless Chromium (``--no-sandbox``: CI containers run as root, where the sandbox cannot start)."""
    if not CHROMIUM.exists():
        pytest.fail(f"BONETUMOR_REQUIRE_BROWSER is set but {CHROMIUM} is missing: apt-get install -y chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser, served: Served) -> Iterator[Page]:
    """The page at {url}/ui/ at 1280 px, failing the test on a JavaScript error or a request off the server."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    outside: list[str] = []
    server = urlsplit(served.url).netloc
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def check_origin(request: Request) -> None:
        # Everything must come from the service itself: a clinic network may have no internet (no CDN, no fonts).
        if not request.url.startswith(("data:", "blob:")) and urlsplit(request.url).netloc != server:
            outside.append(request.url)

    page.on("request", check_origin)
    page.goto(f"{served.url}/ui/")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    assert not outside, f"the page fetched from outside the server: {outside}"


def upload(page: Page, *files: Path) -> None:
    """Choose files in the file picker, as a clinician does."""
    page.set_input_files("#file-input", [str(path) for path in files])


def wait_done(page: Page, count: int) -> Locator:
    """Wait until ``count`` cards have finished (label and heatmap, or an error); return the finished cards."""
    cards = page.locator(".result-card[data-state=done], .result-card[data-state=error]")
    expect(cards).to_have_count(count, timeout=CARD_TIMEOUT_MS)
    return cards


def check_result(card: Locator) -> str:
    """Check one classified tile's card (label, bars, heatmap, slider); return its label."""
    label = card.locator(".label").inner_text().strip()
    assert label in CLASSES
    rows = card.locator(".prob-row")
    expect(rows).to_have_count(3)
    # Rendered widths as fractions of the bar track: the label must be the class with the longest bar.
    widths = dict(
        rows.evaluate_all(
            """rows => rows.map(row => {
                const bar = row.querySelector('.prob-bar');
                const track = bar.parentElement.getBoundingClientRect().width;
                return [row.dataset.class, bar.getBoundingClientRect().width / track];
            })"""
        )
    )
    assert set(widths) == set(CLASSES)
    assert sum(widths.values()) == pytest.approx(1.0, abs=0.02)
    # A tolerance of half a percent of the track: an untrained model's near-equal classes are sub-pixel apart.
    assert widths[label] >= max(widths.values()) - 0.005, f"{label} has a shorter bar than another class: {widths}"
    for row in rows.all():
        assert row.locator(".prob-value").inner_text().strip().endswith("%")
    expect(card.locator(".confidence")).to_contain_text("%")

    heatmap = card.locator("img.heatmap")
    expect(heatmap).to_be_visible()
    heatmap.evaluate(
        """img => img.complete && img.naturalWidth > 0 ? true : new Promise((ok, fail) => {
                img.onload = () => ok(true);
                img.onerror = () => fail('heatmap not loaded');
            })"""
    )
    assert heatmap.evaluate("img => img.naturalWidth") > 0
    assert float(heatmap.evaluate("img => getComputedStyle(img).opacity")) == pytest.approx(0.5)
    card.locator("input.opacity").fill("0.9")
    assert float(heatmap.evaluate("img => getComputedStyle(img).opacity")) == pytest.approx(0.9)
    return label


def test_header_names_the_served_model_and_says_it_is_not_a_diagnosis(page: Page, served: Served) -> None:
    expect(page.locator("#model-version")).to_have_text(served.version)
    expect(page.locator("#model-gate")).to_be_hidden()  # the champion: no "not the champion" banner
    for field in ("#model-name", "#model-arch", "#model-trained", "#model-runtime"):
        expect(page.locator(field)).not_to_have_text("…")
    expect(page.locator("body")).to_contain_text("Decision support, not a diagnosis. A pathologist makes the call.")
    expect(page.locator("#model-info-error")).to_be_hidden()
    # The served version has a model card: the header links to it, and the link answers the card.
    link = page.locator("#model-card-link")
    expect(link).to_be_visible()
    card = page.request.get(str(link.evaluate("a => a.href")))
    assert card.ok
    assert card.text().startswith(f"# Model card: bone-tumor-classifier version {served.version} ")


def test_a_tile_gets_a_label_probability_bars_and_a_heatmap(page: Page, served: Served) -> None:
    upload(page, VIABLE_TILE)
    card = wait_done(page, 1).first
    expect(card).to_have_attribute("data-state", "done")
    expect(card.locator(".file-name")).to_have_text(VIABLE_TILE.name)
    check_result(card)
    expect(card.locator(".audit")).to_contain_text(f"v{served.version}")
    expect(card.locator(".request-id")).to_have_text(re.compile(r"Request [0-9a-f]+"))
    referral = card.locator(".referral")
    if referral.count():
        expect(referral).to_contain_text("Refer to a pathologist: ")


def test_a_bad_file_shows_the_server_message_and_the_page_keeps_working(page: Page, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("Patient notes: not an image at all.\n")
    upload(page, notes)
    card = wait_done(page, 1).first
    expect(card).to_have_attribute("data-state", "error")
    expect(card.locator(".error")).to_contain_text("not a recognised image")
    expect(card.locator(".label")).to_have_count(0)

    upload(page, VIABLE_TILE)
    cards = wait_done(page, 2)
    # The newest upload is on top.
    expect(cards.first).to_have_attribute("data-state", "done")
    check_result(cards.first)


def test_two_tiles_at_once_give_two_cards(page: Page, tmp_path: Path) -> None:
    other = sorted((TILES / "Non-Tumor").glob("*.jpg"))[0]
    upload(page, VIABLE_TILE, other)
    cards = wait_done(page, 2)
    expect(cards.nth(0).locator(".file-name")).to_have_text(VIABLE_TILE.name)
    expect(cards.nth(1).locator(".file-name")).to_have_text(other.name)
    for card in cards.all():
        expect(card).to_have_attribute("data-state", "done")
        expect(card.locator("img.heatmap")).to_be_visible()

    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    page.screenshot(path=str(artifacts / "ui.png"), full_page=True)
    page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)
    if os.environ.get("BONETUMOR_UPDATE_SCREENSHOT") == "1":
        (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(REPO / "docs" / "img" / "ui.png"), full_page=True)


def test_the_page_fits_a_narrow_screen(page: Page) -> None:
    page.set_viewport_size({"width": 375, "height": 812})
    upload(page, VIABLE_TILE)
    card = wait_done(page, 1).first
    check_result(card)
    overflow = page.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than a 375 px screen"


#: A whole slide is tiled, classified and summarised before the answer comes: allow for a slow 2-core machine.
ASSESS_TIMEOUT_MS = 120_000


def test_the_assess_page_uploads_a_slide_shows_progress_and_the_estimate(
    page: Page, served: Served, tmp_path: Path
) -> None:
    from bento_server import ASSESS_LAYOUT, write_test_slide

    from bonetumor.slide.demo import layout_counts

    slide = write_test_slide(tmp_path / "case-7.tif")
    tissue = sum(layout_counts(ASSESS_LAYOUT).values())
    expect(page.locator("#assess-link")).to_have_attribute("href", "assess")
    page.locator("#assess-link").click()
    expect(page).to_have_url(f"{served.url}/ui/assess")
    expect(page.locator("#model-version")).to_have_text(served.version)
    expect(page.locator("#assess-button")).to_be_disabled()
    page.set_input_files("#slide-input", str(slide))
    expect(page.locator("#chosen")).to_contain_text("case-7.tif")
    page.locator("#assess-button").click()
    expect(page.locator("#progress")).to_be_visible()
    expect(page.locator("body")).to_have_attribute("data-state", "done", timeout=ASSESS_TIMEOUT_MS)

    expect(page.locator("#result")).to_be_visible()
    expect(page.locator("#result-name")).to_have_text("case-7.tif")
    # The untrained test model calls no tile tumour, so the estimate is "n/a" with "no tumour found"; a real model
    # shows a percent. Either way the figure, the interval and the category are there, marked as an estimate.
    expect(page.locator("#necrosis-percent")).to_have_text(re.compile(r"^(\d+\.\d %|n/a)$"))
    expect(page.locator("#necrosis-interval")).not_to_be_empty()
    expect(page.locator("#response-category")).to_have_text(
        re.compile("^(good responder|poor responder|no tumour found)$")
    )
    expect(page.locator(".response-row")).to_contain_text("an estimate for a pathologist to confirm")
    expect(page.locator("#tiles-total")).to_have_text(str(tissue))
    rows = page.locator("#tiles-per-class tr")
    expect(rows).to_have_count(3)
    assert sum(int(n) for n in rows.locator("td:nth-child(2)").all_inner_texts()) == tissue
    expect(page.locator("#referred-share")).to_contain_text("%")
    expect(page.locator("#tumour-area")).to_contain_text("mm²")
    expect(page.locator("#assess-model")).to_contain_text(f"v{served.version}")
    for link in ("#download-geojson", "#download-csv"):
        expect(page.locator(link)).to_have_attribute("href", re.compile(r"^/ui/assess/results/[0-9a-f]{32}/tiles\."))
    overlay = page.locator("#overlay")
    expect(overlay).to_be_visible()
    overlay.evaluate(
        """img => img.complete && img.naturalWidth > 0 ? true : new Promise((ok, fail) => {
                img.onload = () => ok(true);
                img.onerror = () => fail('overlay not loaded');
            })"""
    )
    assert overlay.evaluate("img => img.naturalWidth") > 0
    expect(page.locator("#progress-text")).to_have_text("Done.")

    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    page.screenshot(path=str(artifacts / "ui-assess.png"), full_page=True)
    if os.environ.get("BONETUMOR_UPDATE_SCREENSHOT") == "1":
        (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(REPO / "docs" / "img" / "ui-assess.png"), full_page=True)

    page.set_viewport_size({"width": 375, "height": 812})
    overflow = page.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the assess page is {overflow} px wider than a 375 px screen"

    # A file that is not a slide: the server's message, and the page keeps working.
    notes = tmp_path / "notes.svs"
    notes.write_text("Patient notes: not a slide.\n")
    page.set_input_files("#slide-input", str(notes))
    page.locator("#assess-button").click()
    expect(page.locator("body")).to_have_attribute("data-state", "error", timeout=ASSESS_TIMEOUT_MS)
    expect(page.locator("#assess-error")).to_contain_text("Could not assess notes.svs: notes.svs")
    expect(page.locator("#assess-error")).to_contain_text("expected")
    expect(page.locator("#result")).to_be_hidden()
    expect(page.locator("#assess-button")).to_be_enabled()
