"""The chat tab and the ``/chat`` endpoint: one agent run per message, tool steps streamed as thoughts.

A person uploads a photo of a part in the chat (optionally with a question and a
product). The tool-calling agent (:class:`agent.agents.DefectAgent`) runs PatchCore
anomaly scoring, similar-defect search and manual retrieval; every tool call is
streamed into the chat as a collapsible "thought" message (title = the call, content =
the observation, with its duration), the anomaly overlay appears inline, the heat-map
comparison and the similar past defects appear beside the chat, and the run ends with
the response manual (markdown citing manual pages), stored in the history.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from agent.agents import get_default_agent, loaded_default_agent, reset_default_agent
from agent.ask import ask_json, record, start_run
from core.catalog import products
from core.errors import InputError
from core.imageio import InvalidImageError
from core.settings import get_settings
from services.container import get_services
from services.history import export_manual
from ui.common import public_json, require_ready, servable

log = logging.getLogger("dra.app")

AUTO_PRODUCT = "auto (infer)"
AGENT_CONCURRENCY_ID = "agent"  # the LLM is single: every agent run shares one slot
DEFAULT_AGENT_NAME = "Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF (llama.cpp)"


def get_agent():
    """The process's :class:`agent.agents.DefectAgent` (see :func:`agent.agents.get_default_agent`)."""
    return get_default_agent()


def reset_agent() -> None:
    """Drop the agent singleton (the next run builds it again from the current settings)."""
    reset_default_agent()


def _loaded_store(name: str):
    """A store of the process's services if it is already loaded, else None (never loads)."""
    try:
        return get_services().loaded(name)
    except Exception:  # noqa: BLE001 - the banner must never fail
        return None


def active_models(agent_model: str | None = None) -> dict[str, str]:
    """Names of the active model per role (JSON-friendly, for the banner and ``/models``).

    Stores already loaded report their own ``.model`` name; roles not loaded yet
    report the configured choice from :class:`core.settings.Settings`.
    """
    s = get_settings()
    if not agent_model:
        agent_model = Path(s.agent_model).name if s.agent_model else (
            DEFAULT_AGENT_NAME if s.agent_backend == "llamacpp" else s.agent_backend)
        current = loaded_default_agent()
        if current is not None:
            agent_model = str(getattr(current, "model_name", None) or getattr(current, "model_id", None) or agent_model)
    roles = {"agent": agent_model}
    for role, store, configured in (
        ("image_embedder", "image_index", s.image_embedder),
        ("patchcore_backbone", "banks", s.patchcore_backbone),
        ("text_embedder", "manuals", s.text_embedder),
    ):
        obj = _loaded_store(store)
        roles[role] = str(getattr(obj, "model", None) or configured)
    roles["profile"] = s.model_resolution.label(s.profile)  # e.g. "auto: agent=offline, image_embedder=hub, ..."
    return roles


def banner_markdown(agent_model: str | None = None) -> str:
    """The banner line naming the active models."""
    m = active_models(agent_model)
    return (
        "## Defect response agent\n"
        "Upload a photo of a part (optionally ask a question and pick the product). "
        "The agent scores it with PatchCore, searches similar past defects, reads the manuals "
        "and writes a response manual citing manual pages.\n\n"
        f"**Agent:** `{m['agent']}` · **Image embedder:** `{m['image_embedder']}` · "
        f"**PatchCore backbone:** `{m['patchcore_backbone']}` · **Text embedder:** `{m['text_embedder']}` · "
        f"**Profile:** `{m['profile']}`"
    )


def _fmt_args(arguments: dict | None) -> str:
    if not arguments:
        return ""
    return ", ".join(f"{k}={v!r}" for k, v in arguments.items() if v is not None)


def _hits(ctx) -> list[dict]:
    return list((ctx.search or {}).get("hits") or [])


def _gallery(ctx) -> list[tuple[str, str]]:
    out = []
    for h in _hits(ctx):
        img = h.get("image")
        if img and Path(img).is_file():
            out.append((str(img), f"{h.get('defect_type')} · {h.get('product')} · {float(h.get('score', 0)):.2f}"))
    return out


def export_files(run_id: str | None) -> tuple[str | None, str | None]:
    """``(markdown path, pdf path)`` of a stored run's response manual (None where it failed)."""
    if not run_id:
        return None, None
    out = []
    for fmt in ("md", "pdf"):
        try:
            out.append(str(export_manual(get_services(), run_id, fmt)))
        except Exception:  # noqa: BLE001
            log.exception("export of %s as %s failed", run_id, fmt)
            out.append(None)
    return out[0], out[1]


def chat_api(image: str | None, question: str | None = "", product: str | None = AUTO_PRODUCT):
    """Analyse one photo and return the response manual (endpoint ``/chat``).

    Args:
        image: server path of the uploaded file (send it with ``gradio_client.handle_file``).
        question: optional question ("" for none); a Korean question gets a Korean manual when available.
        product: a product id from the catalog, or ``"auto (infer)"`` / ``""`` to infer it.

    Returns:
        ``(result, overlay)``: ``result`` is a dict with ``answer`` (markdown), ``steps``
        [{tool, arguments, observation, duration_s, error}], ``citations`` [{source, page}],
        ``product``, ``defect_type``, ``model``, ``fallback``, ``fallback_reason``,
        ``elapsed_s``, ``score``, ``threshold``, ``is_anomalous``, ``regions``, ``similar``,
        ``overlay`` (server path), ``run_id``, ``history_id`` (the run's row in the history,
        see ``/history_run``); ``overlay`` is the overlay PNG as a file (None if absent).

    Raises:
        gr.Error: bad input (not an image, truncated, too large, unknown product) or a
            failed run, with a message that says what is wrong.
    """
    try:
        require_ready()
        ctx = start_run(image, question, product, max_bytes=get_settings().max_upload_mb * 2**20)
    except InputError as exc:
        raise gr.Error(f"Bad input: {exc}", print_exception=False) from None
    result = None
    try:
        for event in get_agent().stream(ctx):
            if not _is_step(event):
                result = event
    except Exception:  # noqa: BLE001 - the details stay in the server log, the server keeps serving
        ref = uuid.uuid4().hex[:8]
        log.exception("agent run failed (error id %s)", ref)
        raise gr.Error(f"The analysis failed (error id {ref}); the details are in the server log.",
                       print_exception=False) from None
    if result is None:
        raise gr.Error("The analysis ended without a result")
    models = active_models(result.model)
    out = public_json(ask_json(result, ctx, record(get_services(), result, ctx, "api", models), models))
    return out, servable((ctx.inspection or {}).get("overlay"))


def _is_step(event) -> bool:
    return hasattr(event, "tool") and hasattr(event, "observation")



def _user_messages(text: str, path: str | None) -> list[dict]:
    msgs = []
    if path:
        msgs.append({"role": "user", "content": {"path": path, "alt_text": Path(path).name}})
    if text:
        msgs.append({"role": "user", "content": text})
    return msgs


def _final_markdown(result, ctx) -> str:
    parts = [result.answer.strip() if result.answer else "_(empty answer)_"]
    notes = []
    if result.fallback:
        reason = f": {result.fallback_reason}" if result.fallback_reason else ""
        notes.append(f"ℹ️ This manual was written by the deterministic fallback from the tool results{reason}.")
    src = f" ({ctx.product_source})" if ctx.product_source and ctx.product_source != "user" else ""
    notes.append(
        f"Product: **{result.product or ctx.product}**{src} · defect type: **{result.defect_type or ctx.defect_type}**"
        f" · model `{result.model}` · {float(result.elapsed_s):.1f} s"
    )
    return "\n\n".join(parts) + "\n\n---\n" + "\n\n".join(notes)


def respond(message: dict | None, history: list, product: str, last_image: str | None) -> Iterator[tuple]:
    """Chat handler (streaming): yields ``(history, textbox, comparison, gallery, banner, last_image,
    markdown download, pdf download)``; a finished run is stored in the history and its
    response manual exported as Markdown and PDF for the two download buttons.

    ``message`` is the MultimodalTextbox value ``{"text": str, "files": [path]}``. A
    message without a photo re-analyses the session's last photo with the new question.
    """
    message = message or {}
    text = (message.get("text") or "").strip()
    files = message.get("files") or []
    new_path = None
    if files:
        f = files[-1]
        new_path = f if isinstance(f, str) else (f.get("path") if isinstance(f, dict) else getattr(f, "path", None))
    history = list(history or []) + _user_messages(text, new_path)
    path = new_path or last_image
    keep = gr.update()
    cleared = gr.update(value=None)

    if not path:
        history.append({"role": "assistant",
                        "content": "Please attach a photo of the part (📎 button or drag & drop), "
                                   "optionally with a question."})
        yield history, cleared, keep, keep, keep, last_image, keep, keep
        return
    try:
        require_ready()
        ctx = start_run(path, text, product, max_bytes=get_settings().max_upload_mb * 2**20)
    except InputError as exc:
        if new_path and isinstance(exc, InvalidImageError):  # show the name, not a broken picture
            history = [m for m in history if not (isinstance(m, dict) and isinstance(m.get("content"), dict)
                                                  and m["content"].get("path") == new_path)]
            history.insert(len(history) - (1 if text else 0),
                           {"role": "user", "content": f"📎 {Path(new_path).name}"})
        history.append({"role": "assistant", "content": f"⚠️ **Cannot analyse this upload.** {exc}"})
        yield history, cleared, keep, keep, keep, last_image, keep, keep
        return
    last_image = str(path)

    t0 = time.perf_counter()
    working = gr.ChatMessage(content="", metadata={"title": "⏳ Agent at work …", "status": "pending"})
    history.append(working)
    yield history, cleared, None, [], keep, last_image, keep, keep

    shown_overlay = shown_gallery = False
    comparison, gallery = keep, keep
    try:
        for event in get_agent().stream(ctx):
            if _is_step(event):
                body = event.observation or ""
                if event.error:
                    body = f"❌ {event.error}\n\n{body}".strip()
                history.insert(len(history) - 1, gr.ChatMessage(
                    content=body or "(no observation)",
                    metadata={"title": f"🛠️ {event.tool}({_fmt_args(event.arguments)})",
                              "status": "done", "duration": round(float(event.duration_s or 0.0), 2)},
                ))
                insp = ctx.inspection or {}
                if not shown_overlay and insp.get("overlay") and Path(insp["overlay"]).is_file():
                    shown_overlay = True
                    verdict = "ANOMALOUS" if insp.get("is_anomalous") else "NORMAL"
                    history.insert(len(history) - 1, {"role": "assistant", "content": {
                        "path": insp["overlay"],
                        "alt_text": f"anomaly overlay: score {insp.get('score')} / threshold "
                                    f"{insp.get('threshold')} ({verdict})"}})
                    comp = insp.get("comparison") or insp.get("heatmap")
                    comparison = comp if comp and Path(comp).is_file() else keep
                if not shown_gallery and _hits(ctx):
                    shown_gallery = True
                    gallery = _gallery(ctx)
                yield history, keep, comparison, gallery, keep, last_image, keep, keep
            else:
                result = event
                working.metadata = {"title": "✅ Agent finished", "status": "done",
                                    "duration": round(time.perf_counter() - t0, 2)}
                working.content = f"{len(result.steps)} tool call(s) · model `{result.model}`"
                history.append({"role": "assistant", "content": _final_markdown(result, ctx)})
                hid = record(get_services(), result, ctx, "app", active_models(result.model))
                md_path, pdf_path = export_files(hid)
                yield (history, keep, comparison, gallery, banner_markdown(result.model), last_image,
                       gr.update(value=md_path, interactive=md_path is not None),
                       gr.update(value=pdf_path, interactive=pdf_path is not None))
    except Exception:  # noqa: BLE001 - shown in the chat (an error id; details in the log), the app keeps running
        ref = uuid.uuid4().hex[:8]
        log.exception("agent run failed (error id %s)", ref)
        working.metadata = {"title": "❌ Agent failed", "status": "done",
                            "duration": round(time.perf_counter() - t0, 2)}
        history.append({"role": "assistant",
                        "content": f"❌ **The analysis failed** (error id {ref}; the details are in the server log)."})
        yield history, keep, comparison, gallery, keep, last_image, keep, keep


# ---------------------------------------------------------------------------
# layout (called inside the app's open gr.Blocks / gr.Tabs context)
# ---------------------------------------------------------------------------
def build_chat_tab(banner: gr.Markdown, writes: bool = True) -> dict:
    """The Chat tab and its events; returns ``{"product": the product dropdown}``.

    Args:
        banner: the app's banner (updated with the model name when a run ends).
        writes: the session may write (operator): events that change stores (e.g. registering
            a photo with a corrected label) are registered only then; the public app passes False.
    """
    last_image = gr.State(None)  # per session: the last photo, for follow-up questions
    with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    label="Defect response agent", elem_id="chat", height=680,
                    buttons=["copy_all"], feedback_options=None,
                    placeholder="Upload a photo of a part to get a response manual.",
                )
                textbox = gr.MultimodalTextbox(
                    file_types=["image"], file_count="single", elem_id="msg", show_label=False,
                    placeholder="Attach a photo and (optionally) ask a question, e.g. 'what should I do?'",
                )
            with gr.Column(scale=2):
                product = gr.Dropdown(
                    choices=[AUTO_PRODUCT] + products(), value=AUTO_PRODUCT, label="Product",
                    elem_id="product", allow_custom_value=False,
                )
                comparison = gr.Image(label="Input | anomaly heat map", type="filepath",
                                      interactive=False, elem_id="comparison", height=260)
                gallery = gr.Gallery(label="Similar past defects", columns=3, height=300,
                                     elem_id="similar", allow_preview=True)
                with gr.Row():
                    md_btn = gr.DownloadButton("Manual (.md)", value=None, interactive=False,
                                               elem_id="chat-md")
                    pdf_btn = gr.DownloadButton("Manual (.pdf)", value=None, interactive=False,
                                                elem_id="chat-pdf")
                clear = gr.Button("New conversation", variant="secondary")

    textbox.submit(
        respond, [textbox, chatbot, product, last_image],
        [chatbot, textbox, comparison, gallery, banner, last_image, md_btn, pdf_btn],
        api_visibility="private", concurrency_id=AGENT_CONCURRENCY_ID, concurrency_limit=1,
    )
    clear.click(lambda: ([], None, None, [], None, gr.update(value=None, interactive=False),
                         gr.update(value=None, interactive=False)), None,
                [chatbot, textbox, comparison, gallery, last_image, md_btn, pdf_btn],
                api_visibility="private", queue=False)
    return {"product": product}


def register_chat_api() -> None:
    """The ``/chat`` and ``/models`` endpoints on hidden components (inside the app's Blocks)."""
    with gr.Group(visible=False):
        api_image = gr.File(label="image", type="filepath")
        api_question = gr.Textbox(label="question")
        api_product = gr.Textbox(label="product", value=AUTO_PRODUCT)
        api_result = gr.JSON(label="result")
        api_overlay = gr.Image(label="overlay", type="filepath")
        api_models = gr.JSON(label="models")
        api_button = gr.Button("chat")
        models_button = gr.Button("models")
    api_button.click(
        chat_api, [api_image, api_question, api_product], [api_result, api_overlay], api_name="chat",
        concurrency_id=AGENT_CONCURRENCY_ID, concurrency_limit=1,
    )
    models_button.click(lambda: active_models(), None, api_models, api_name="models", queue=False,
                        api_visibility="undocumented")  # callable by clients; not an MCP tool
