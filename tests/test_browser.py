"""The app in a real headless browser (Playwright driving Debian's Chromium).

A conversation in the chat (a photo, tool steps, streamed answer, stop, the Korean UI and a
follow-up), every tab with one real action, screenshots in ``tests/artifacts/``. Skipped when
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


# records the text length of the last assistant message at every change of the chat (tokens arriving)
WATCH_JS = """() => {
  window.__lengths = [];
  const chat = document.querySelector('#chat');
  new MutationObserver(() => {
    const bots = chat.querySelectorAll('.bot-row .message:not(.thought)');
    if (bots.length) window.__lengths.push(bots[bots.length - 1].innerText.length);
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def _send(page, text: str, photo: Path | None = None) -> None:
    if photo is not None:
        page.locator("#msg input[type=file]").set_input_files(str(photo))
        page.locator("#msg img").first.wait_for()  # the attached photo's thumbnail
    page.locator("#msg textarea").fill(text)
    page.locator("#msg textarea").press("Enter")


def test_chat_streams_stops_and_follows_up_in_korean(browser, app_url, built_state):
    """A photo: tool steps nested under the run, tokens arriving, the manual; a second message stopped with the
    stop button; the UI switched to Korean and a follow-up answered in the same conversation."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    item = next(it for it in defect_items(built_state) if it["product"] == "brick")
    photo = built_state / "data" / item["image"]

    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.set_default_timeout(60_000)
    page.goto(app_url, wait_until="domcontentloaded")
    banner = page.locator("#banner")
    banner.get_by_text("PatchCore backbone").wait_for()
    assert "Text embedder" in banner.inner_text()
    chat = page.locator("#chat")
    chat.get_by_text("What can you do?", exact=False).first.wait_for()  # the examples
    page.evaluate(WATCH_JS)

    _send(page, "Analyse this part.", photo)
    chat.get_by_text("anomaly_scoring", exact=False).first.wait_for(timeout=RUN_TIMEOUT_MS)
    page.screenshot(path=str(ARTIFACTS / "browser_1_steps.png"), full_page=True)
    chat.get_by_text("Agent finished", exact=False).first.wait_for(timeout=RUN_TIMEOUT_MS)
    lengths = page.evaluate("window.__lengths")
    assert len(set(lengths)) >= 4, lengths  # the answer grew while it was written
    text = chat.inner_text()
    assert "brick" in text and ".pdf" in text  # product named, manual pages cited
    assert chat.locator(".thought-group").count() >= 1  # tool steps nested under the run
    assert chat.locator("img").count() >= 2  # the uploaded photo + the overlay
    page.locator("#similar img").first.wait_for()
    page.locator("#comparison img").first.wait_for()
    page.locator("#chat-pdf:not([disabled])").wait_for()
    page.screenshot(path=str(ARTIFACTS / "browser_2_manual.png"), full_page=True)

    _send(page, "Show me similar cases and explain each one in detail.")
    stop = page.locator("#msg button[aria-label='Stop']")
    stop.wait_for()
    stop.click()
    chat.get_by_text("Stopped", exact=False).first.wait_for(timeout=RUN_TIMEOUT_MS)
    assert "(stopped)" in chat.inner_text()

    page.locator("#chat-lang").get_by_text("한국어").click()
    page.locator("#chat-new").get_by_text("새 대화").wait_for()
    _send(page, "이 결함의 원인은 무엇인가요?")
    chat.get_by_text("에이전트 완료", exact=False).first.wait_for(timeout=RUN_TIMEOUT_MS)
    last = chat.locator(".bot-row .message:not(.thought)").last.inner_text()
    assert any("\uac00" <= ch <= "\ud7a3" for ch in last), last  # answered in Korean
    page.screenshot(path=str(ARTIFACTS / "browser_3_korean_followup.png"), full_page=True)
    page.close()


@pytest.mark.slow
def test_two_turn_conversation_with_the_offline_model(browser, built_state):
    """The real 1.5B model: a photo, then a follow-up; screenshot ``tests/artifacts/chat_two_turns.png``
    (the README's picture)."""
    import os

    from tests.test_app import free_port

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    import app
    from core.settings import get_settings
    from ui import chat as chat_ui

    old = os.environ.pop("DRA_AGENT_MODEL", None)
    get_settings.cache_clear()
    chat_ui.reset_agent()
    app.warm_up()
    demo = app.build_app()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **app.launch_kwargs())
    try:
        item = next(it for it in defect_items(built_state) if it["product"] == "gravel")
        page = browser.new_page(viewport={"width": 1400, "height": 1500})
        page.set_default_timeout(120_000)
        page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
        chat = page.locator("#chat")
        _send(page, "", built_state / "data" / item["image"])
        chat.get_by_text("Agent finished", exact=False).first.wait_for(timeout=900_000)
        _send(page, "Which action should I take first?")
        chat.get_by_text("Agent finished", exact=False).nth(1).wait_for(timeout=600_000)
        assert chat.locator(".bot-row .message:not(.thought)").last.inner_text().strip()
        page.screenshot(path=str(ARTIFACTS / "chat_two_turns.png"), full_page=True)
        page.close()
    finally:
        demo.close()
        chat_ui.reset_agent()
        if old is not None:
            os.environ["DRA_AGENT_MODEL"] = old
        get_settings.cache_clear()


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
    page.locator("#inspect-verdict").get_by_text("threshold", exact=False).first.wait_for()  # the heading says it too when uncertain
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
