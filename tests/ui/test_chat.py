"""The chat tab and ``/chat``: conversations through gradio_client on a real server, the streaming handler,
stop, undo / retry, feedback and the thumbs-down correction (operators only). Agent model: SmolLM2 fixture."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest

from tests.test_app import defect_items, serve_app, smollm2_path


@pytest.fixture(scope="module")
def server(built_state):
    _, url, restore = serve_app(built_state)
    yield url
    restore()


@pytest.fixture()
def smol_agent(monkeypatch):
    """The process's agent on the SmolLM2 fixture (settings re-read)."""
    from core.settings import get_settings
    from ui import chat

    monkeypatch.setenv("DRA_AGENT_MODEL", smollm2_path())
    get_settings.cache_clear()
    chat.reset_agent()
    yield
    chat.reset_agent()
    get_settings.cache_clear()


def _val(state: Path, product: str) -> str:
    item = next(it for it in defect_items(state) if it["product"] == product)
    return str(state / "data" / item["image"])


def test_write_events_only_for_operators():
    """writes=False (the public app) registers no correction event at all; writes=True does."""
    from ui import chat

    names = {}
    for writes in (False, True):
        with gr.Blocks() as demo:
            banner = gr.Markdown()
            with gr.Tabs():
                chat.build_chat_tab(banner, writes=writes)
        names[writes] = {getattr(fn.fn, "__name__", "") for fn in demo.fns.values()}
    assert "register_correction" not in names[False] and "register_correction" in names[True]
    assert {"submit_message", "stop_run", "undo_turn", "retry_turn", "feedback"} <= names[False]


def test_chat_endpoint_continues_the_callers_conversation(server, built_state):
    """Two calls on one gradio_client.Client are one conversation; a new client starts its own."""
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    photo = _val(built_state, "brick")
    first, overlay = client.predict(handle_file(photo), "Is this part OK?", "auto (infer)", api_name="/chat")
    assert first["session"] and first["turn"] == 0 and first["kind"] == "verdict"
    assert first["product"] == "brick" and first["score"] is not None and overlay and Path(overlay).is_file()
    assert not any(str(v).startswith(str(built_state)) for v in (first["inspection"] or {}).values())  # no paths
    second, _ = client.predict(None, "What should I do about it?", "auto (infer)", api_name="/chat")
    assert second["session"] == first["session"] and second["turn"] == 1
    assert second["product"] == "brick" and second["score"] == first["score"]  # the photo is kept
    assert all(s["tool"] != "anomaly_scoring" or "score" in s["observation"] for s in second["steps"])
    text_only = Client(server, verbose=False).predict(None, "What causes cracks in brick panels?", "",
                                                       api_name="/chat")[0]
    assert text_only["session"] != first["session"] and text_only["turn"] == 0 and text_only["citations"]
    assert text_only["kind"] == "manual_question" and text_only["score"] is None
    fresh = client.predict(None, "Hello", "", True, api_name="/chat")[0]
    assert fresh["session"] != first["session"] and fresh["turn"] == 0
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="photo of the part or a question"):
        Client(server, verbose=False).predict(None, "", "", api_name="/chat")


def _run(message: dict, history: list, ui: dict, product: str = "auto (infer)", lang: str = "English",
         writes: bool = True, stop_after_first: bool = False):
    from ui import chat

    history, _, pending, ui = chat.submit_message(message, history, ui)
    updates = []
    for update in chat.respond(pending, history, product, ui, lang, writes=writes):
        updates.append(update)
        if stop_after_first and len(updates) == 2:
            chat.stop_run()
    return updates


def test_streaming_handler_thoughts_answer_undo_retry(built_state, smol_agent):
    from services.container import get_services
    from ui import chat

    photo = _val(built_state, "grass")
    updates = _run({"text": "", "files": [photo]}, [], chat.new_ui_state())
    history, comparison, gallery, _, ui = updates[-1][:5]
    meta = [(m.metadata if isinstance(m, gr.ChatMessage) else m.get("metadata") or {}) for m in history]
    run = next(m for m in meta if m.get("id", "").startswith("run-"))
    tools = [m for m in meta if m.get("parent_id") == run["id"]]
    assert tools and all(m["status"] == "done" for m in tools)  # tool steps nested under the run
    assert any(m["title"].startswith("🛠️ anomaly_scoring(") for m in tools)
    assert run["title"].startswith("✅")
    answer = history[-1]
    assert answer["role"] == "assistant" and "grass" in answer["content"]
    assert len(updates) >= 4 and comparison and Path(comparison).is_file()
    sessions = get_services().sessions
    sid = ui["session"]
    assert sessions.get(sid)["n_turns"] == 1 and ui["turns"][0]["answer"] == len(history) - 1

    # a follow-up without a photo keeps the conversation's photo
    updates = _run({"text": "Why?", "files": []}, history, ui)
    history2, ui2 = updates[-1][0], updates[-1][4]
    assert sessions.get(sid)["n_turns"] == 2 and len(ui2["turns"]) == 2

    # undo drops the last exchange in the chat and in the stored conversation
    history3, box, ui3 = chat.undo_turn(history2, ui2)
    assert len(history3) == len(history) and sessions.get(sid)["n_turns"] == 1 and box["value"]["text"] == "Why?"
    # retry sends the last message again
    history4, pending, ui4 = chat.retry_turn(history3, ui3)
    assert pending["path"] and Path(pending["path"]).is_file() and sessions.get(sid)["n_turns"] == 0
    final = list(chat.respond(pending, history4, "auto (infer)", ui4, "English"))[-1]
    assert sessions.get(sid)["n_turns"] == 1 and final[0][-1]["role"] == "assistant"


def test_stop_button_cancels_the_run(built_state, smol_agent):
    from services.container import get_services
    from ui import chat

    updates = _run({"text": "Analyse this part.", "files": [_val(built_state, "gravel")]}, [], chat.new_ui_state(),
                   stop_after_first=True)
    history, ui = updates[-1][0], updates[-1][4]
    meta = [(m.metadata if isinstance(m, gr.ChatMessage) else m.get("metadata") or {}) for m in history]
    assert any(m.get("title", "").startswith("⏹️") for m in meta)
    assert "stopped" in history[-1]["content"]
    assert get_services().sessions.get(ui["session"])["n_turns"] == 0  # a stopped turn is not stored


def test_thumbs_down_registers_the_corrected_label(writable_state, smol_agent):
    from services.container import get_services
    from ui import chat

    services = get_services()
    before = len(services.image_index)
    updates = _run({"text": "Is this part OK?", "files": [_val(writable_state, "brick")]}, [], chat.new_ui_state())
    history, ui = updates[-1][0], updates[-1][4]
    idx = ui["turns"][0]["answer"]
    like = gr.LikeData(None, {"index": idx, "value": history[idx]["content"], "liked": True})
    ui, panel, *_ , status = chat.record_feedback(like, ui, "English", writes=True)
    assert panel["visible"] is False and "feedback" in status
    assert services.sessions.turns(ui["session"])[0]["feedback"] == "like"
    # public sessions: thumbs-down is stored, no correction offered
    dislike = gr.LikeData(None, {"index": idx, "value": history[idx]["content"], "liked": False})
    _, panel, *_ = chat.record_feedback(dislike, ui, "English", writes=False)
    assert panel["visible"] is False
    ui, panel, defect, product, _ = chat.record_feedback(dislike, ui, "한국어", writes=True)
    assert panel["visible"] is True and services.sessions.turns(ui["session"])[0]["feedback"] == "dislike"
    status, panel = chat.register_correction("stain", "brick", ui, "English")
    assert "Registered" in status and panel["visible"] is False
    assert len(services.image_index) == before + 1
    item = services.image_index.items()[-1]
    assert item["defect_type"] == "stain" and item["product"] == "brick" and "chat correction" in item["note"]


def test_language_switch_and_examples(built_state):
    from ui import chat

    en, ko = chat.examples("en"), chat.examples("ko")
    assert len(en) == len(ko) == len(chat.EXAMPLES)
    photos = [e for e in en if e.get("files")]
    assert len(photos) >= 3 and all(Path(e["files"][0]).is_file() for e in photos)
    assert {photo.split("/")[0] for _, _, photo in chat.EXAMPLES if photo} == {"brick", "gravel", "grass"}
    assert en[0]["display_text"] != ko[0]["display_text"]
    updates = chat.switch_language("한국어")
    assert updates[0]["label"] == "결함 대응 에이전트" and updates[2]["label"] == "제품"
    assert chat.t("chat.new", "ko") == "새 대화" and chat.t("chat.new", "xx") == "New conversation"
