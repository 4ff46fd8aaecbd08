"""The app in a real headless browser (Playwright driving Debian's Chromium).

Uploads a defect photo in the chat, waits for the tool-call messages and the
response manual, and saves screenshots to ``tests/artifacts/``. Skipped when
Playwright or ``/usr/bin/chromium`` is missing (install: ``apt-get install chromium``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.test_app import defect_items, serve_app

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
RUN_TIMEOUT_MS = 240_000


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                               args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def app_url(built_state):
    _, url, restore = serve_app(built_state)
    yield url
    restore()


def test_upload_photo_streams_tool_calls_and_manual(browser, app_url, built_state):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    item = next(it for it in defect_items(built_state) if it["product"] == "brick")
    photo = built_state / "data" / item["image"]

    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.set_default_timeout(60_000)
    page.goto(app_url, wait_until="domcontentloaded")
    banner = page.locator("#banner")
    banner.get_by_text("PatchCore backbone").wait_for()
    assert "Text embedder" in banner.inner_text()

    page.locator("#msg input[type=file]").set_input_files(str(photo))
    page.locator("#msg textarea").fill("What should I do with this part?")
    page.locator("#msg img").first.wait_for()  # the attached photo's thumbnail
    page.screenshot(path=str(ARTIFACTS / "browser_1_upload.png"), full_page=True)
    page.locator("#msg textarea").press("Enter")

    chat = page.locator("#chat")
    chat.get_by_text("anomaly_scoring(", exact=False).first.wait_for(timeout=RUN_TIMEOUT_MS)
    page.screenshot(path=str(ARTIFACTS / "browser_2_steps.png"), full_page=True)

    chat.get_by_text("Product:", exact=False).last.wait_for(timeout=RUN_TIMEOUT_MS)
    chat.get_by_text("Agent finished", exact=False).first.wait_for()
    text = chat.inner_text()
    assert "🛠️" in text and "anomaly_scoring(" in text
    assert "brick" in text and ".pdf" in text  # product named, manual pages cited
    # the overlay is shown inline in the chat and the similar cases beside it
    assert chat.locator("img").count() >= 2  # the uploaded photo + the overlay
    page.locator("#similar img").first.wait_for()
    page.locator("#comparison img").first.wait_for()
    # the run was stored and its manual can be downloaded (Markdown and PDF)
    page.locator("#chat-pdf:not([disabled])").wait_for()
    page.locator("#chat-md:not([disabled])").wait_for()

    # open the first tool call to show its observation
    chat.get_by_text("anomaly_scoring(", exact=False).first.click()
    observation = chat.get_by_text("threshold=", exact=False).first
    observation.wait_for()
    observation.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "browser_3_observation.png"), full_page=True)
    # the response manual at the end of the chat
    chat.get_by_text("Product:", exact=False).last.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "browser_4_manual.png"), full_page=True)
    page.close()


def test_non_image_upload_shows_error_in_chat(browser, app_url, tmp_path):
    bogus = tmp_path / "scan.png"
    bogus.write_bytes(b"definitely not a PNG" * 50)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(60_000)
    page.goto(app_url, wait_until="domcontentloaded")
    page.locator("#msg input[type=file]").set_input_files(str(bogus))
    page.locator("#msg textarea").press("Enter")
    page.locator("#chat").get_by_text("Cannot analyse this upload", exact=False).wait_for()
    assert "not a recognised image" in page.locator("#chat").inner_text()
    page.screenshot(path=str(ARTIFACTS / "browser_5_bad_upload.png"), full_page=True)
    page.close()


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def test_every_tab_works_in_the_browser(browser, app_url, built_state):
    """Inspect, Search, Manuals, Gallery, Products and History tabs: one real action each + screenshots."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    item = next(it for it in defect_items(built_state) if it["product"] == "gravel")
    photo = built_state / "data" / item["image"]
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.set_default_timeout(90_000)
    page.goto(app_url, wait_until="domcontentloaded")
    page.locator("#banner").get_by_text("PatchCore backbone").wait_for()

    _tab(page, "Inspect")
    page.locator("#inspect-image input[type=file]").set_input_files(str(photo))
    page.locator("#inspect-run").click()
    page.locator("#inspect-verdict").get_by_text("threshold", exact=False).wait_for()
    page.locator("#inspect-overlay img").first.wait_for()
    page.locator("#inspect-heatmap img").first.wait_for()
    assert "gravel" in page.locator("#inspect-verdict").inner_text()
    page.screenshot(path=str(ARTIFACTS / "tab_inspect.png"), full_page=True)

    _tab(page, "Search")
    page.locator("#search-text textarea").fill("crack on brick")
    page.locator("#search-run").click()
    page.locator("#search-hits img").first.wait_for()
    assert "hit(s)" in page.locator("#search-status").inner_text()
    page.screenshot(path=str(ARTIFACTS / "tab_search.png"), full_page=True)

    _tab(page, "Manuals")
    page.locator("#manual-list").get_by_text("brick_manual_en.pdf").first.wait_for()
    page.locator("#manual-query textarea").fill("crack cause and immediate action")
    page.locator("#manual-ask").click()
    page.locator("#manual-previews img").first.wait_for()
    assert ".pdf p." in page.locator("#manual-passages").inner_text()
    page.screenshot(path=str(ARTIFACTS / "tab_manuals.png"), full_page=True)

    _tab(page, "Gallery")
    page.locator("#gallery-show").click()
    page.locator("#gallery-thumbs img").first.wait_for()
    assert "item(s)" in page.locator("#gallery-status").inner_text()
    page.screenshot(path=str(ARTIFACTS / "tab_gallery.png"), full_page=True)

    _tab(page, "Products")
    page.locator("#product-list").get_by_text("brick").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "tab_products.png"), full_page=True)

    _tab(page, "History")
    page.locator("#history-stats").get_by_text("analyses", exact=False).or_(
        page.locator("#history-stats").get_by_text("No analyses yet", exact=False)).first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "tab_history.png"), full_page=True)
    page.close()
