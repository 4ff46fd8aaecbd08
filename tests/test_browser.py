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
