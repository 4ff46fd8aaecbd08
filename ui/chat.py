"""The chat tab and the ``/chat`` endpoint: a conversation with the defect response agent.

A person sends a photo of a part, a question, or both (English or Korean). The agent
(:class:`agent.agents.DefectAgent`) keeps the conversation (:class:`agent.memory.Conversation`,
stored in the state directory's database) and decides which tools to call. In the chat:

* the run is a collapsible "thought"; each tool call is a thought nested under it (pending
  while it runs, then its observation and duration); the anomaly overlay appears inline, the
  heat-map comparison and the similar past defects beside the chat;
* the answer streams token by token; a response manual starts with its code-written summary;
  a warning shows when the product was inferred with low confidence or the fallback wrote it;
* stop (the textbox's stop button) cancels the run within a token; retry and undo act on the
  last exchange (also in the stored conversation); every message can be copied;
* examples with sample photos of each product (built by ``cli.py build``) to start from;
* thumbs up / down on an answer are stored with the turn; where the session may write
  (``writes=True``, an operator), thumbs-down offers to register the photo in the gallery with the
  corrected defect type. The public app passes ``writes=False``: that event is not registered;
* a language switch English / 한국어 (texts from :data:`I18N`, a ``gr.I18n``): labels change, and
  the answer's language follows the question, or the UI language when there is none.

``/chat`` (``gradio_client``) takes the same message (image optional) and continues the caller's
conversation across calls of one client (keyed by its session hash).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from agent.agents import get_default_agent, loaded_default_agent, reset_default_agent
from agent.ask import ask_json, open_conversation, start_turn, stream_turn
from agent.types import AgentResult, AgentStep, AnswerDelta, ToolStarted
from core.catalog import defect_types, products
from core.errors import InputError
from core.imageio import InvalidImageError
from core.reasons import localize_reason
from core.settings import get_settings
from services.container import get_services
from services.gallery import register_defect
from services.history import export_manual
from ui.common import not_an_mcp_tool, public_json, require_ready, servable

log = logging.getLogger("dra.app")

AUTO_PRODUCT = "auto (infer)"
AGENT_CONCURRENCY_ID = "agent"  # the LLM is single: every agent run shares one slot
DEFAULT_AGENT_NAME = "Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF (llama.cpp)"
LANGUAGES = {"English": "en", "한국어": "ko"}
#: an inferred product below this vote share gets a visible warning
LOW_CONFIDENCE = 0.6

#: the chat's texts in English and Korean (the UI switch reads them; app.py may pass it to ``launch(i18n=...)``)
I18N = gr.I18n(
    en={
        "chat.label": "Defect response agent",
        "chat.placeholder": "Send a photo of a part, a question, or both. Try an example below.",
        "chat.msg": "Attach a photo and / or ask, e.g. 'Is this part OK?' or 'What causes cracks on brick?'",
        "chat.product": "Product",
        "chat.comparison": "Input | anomaly heat map",
        "chat.similar": "Similar past defects",
        "chat.new": "New conversation",
        "chat.language": "Language",
        "chat.md": "Manual (.md)",
        "chat.pdf": "Manual (.pdf)",
        "chat.correct.title": "Register this photo with the corrected defect type",
        "chat.correct.defect": "Correct defect type",
        "chat.correct.product": "Product",
        "chat.correct.button": "Register in the gallery",
        "chat.working": "⏳ Agent at work …",
        "chat.finished": "✅ Agent finished",
        "chat.stopped": "⏹️ Stopped",
        "chat.failed": "❌ Agent failed",
        "chat.low_conf": "⚠️ The product was inferred with low confidence ({conf}): pick the product in the menu "
                         "if **{product}** is wrong.",
        "chat.fallback": "ℹ️ The deterministic fallback wrote this answer from the tool results ({reason}).",
        "chat.stopped_note": "_(stopped)_",
        "chat.bad_upload": "⚠️ **Cannot analyse this upload.**",
        "chat.empty": "Send a photo of the part (📎 or drag & drop) or type a question.",
        "chat.registered": "✅ Registered in the gallery as **{product} / {defect}** (id `{id}`).",
        "chat.register_failed": "❌ Not registered: {error}",
        "chat.feedback": "Thanks, your feedback is stored with this answer.",
        "ex.analyse": "Analyse a brick photo",
        "ex.ok": "Is this gravel part OK?",
        "ex.similar": "Similar cases of a grass defect",
        "ex.text": "What causes cracks in brick panels?",
        "ex.ko": "이 사진을 분석해 주세요 (brick)",
        "ex.help": "What can you do?",
    },
    ko={
        "chat.label": "결함 대응 에이전트",
        "chat.placeholder": "부품 사진이나 질문, 또는 둘 다 보내 주세요. 아래 예시로 시작할 수 있습니다.",
        "chat.msg": "사진을 첨부하거나 질문하세요. 예: '이 부품 괜찮나요?', '벽돌 균열의 원인은?'",
        "chat.product": "제품",
        "chat.comparison": "입력 | 이상 히트맵",
        "chat.similar": "유사한 과거 결함",
        "chat.new": "새 대화",
        "chat.language": "언어",
        "chat.md": "매뉴얼 (.md)",
        "chat.pdf": "매뉴얼 (.pdf)",
        "chat.correct.title": "이 사진을 올바른 결함 유형으로 갤러리에 등록",
        "chat.correct.defect": "올바른 결함 유형",
        "chat.correct.product": "제품",
        "chat.correct.button": "갤러리에 등록",
        "chat.working": "⏳ 에이전트 작업 중 …",
        "chat.finished": "✅ 에이전트 완료",
        "chat.stopped": "⏹️ 중지됨",
        "chat.failed": "❌ 에이전트 실패",
        "chat.low_conf": "⚠️ 제품을 낮은 신뢰도({conf})로 추정했습니다: **{product}**가 아니면 메뉴에서 제품을 선택하세요.",
        "chat.fallback": "ℹ️ 언어 모델 대신 결정론적 대체 경로가 도구 결과로 이 답변을 작성했습니다 ({reason}).",
        "chat.stopped_note": "_(중지됨)_",
        "chat.bad_upload": "⚠️ **이 파일은 분석할 수 없습니다.**",
        "chat.empty": "부품 사진(📎 또는 끌어 놓기)을 보내거나 질문을 입력하세요.",
        "chat.registered": "✅ 갤러리에 **{product} / {defect}**(으)로 등록했습니다 (id `{id}`).",
        "chat.register_failed": "❌ 등록하지 못했습니다: {error}",
        "chat.feedback": "감사합니다. 피드백을 이 답변과 함께 저장했습니다.",
        "ex.analyse": "벽돌 사진 분석",
        "ex.ok": "이 자갈 부품 괜찮나요?",
        "ex.similar": "잔디 결함의 유사 사례",
        "ex.text": "벽돌 패널 균열의 원인은?",
        "ex.ko": "이 사진을 분석해 주세요 (벽돌)",
        "ex.help": "무엇을 할 수 있나요?",
    },
)
#: examples: (i18n key of the label, text, sample photo under the state's data/ or None)
EXAMPLES = (
    ("ex.analyse", "", "brick/val/crack/001.png"),
    ("ex.ok", "Is this part OK?", "gravel/val/good/004.png"),
    ("ex.similar", "Show me similar cases.", "grass/val/stain/002.png"),
    ("ex.text", "What causes cracks in brick panels?", None),
    ("ex.ko", "이 사진을 분석해 주세요.", "brick/val/scratch/002.png"),
    ("ex.help", "What can you do?", None),
)
_CANCELS: dict[str, threading.Event] = {}
_CANCELS_LOCK = threading.Lock()


def t(key: str, lang: str = "en", **fmt) -> str:
    """The text of ``key`` in ``lang`` (English when missing), formatted with ``fmt``."""
    table = I18N.translations_dict
    text = table.get(lang, {}).get(key) or table["en"].get(key, key)
    return text.format(**fmt) if fmt else text


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
        if current is not None and current.model_name:
            agent_model = current.model_name
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
        "Chat about a part: send a photo, a question, or both. The agent decides which tools to use "
        "(PatchCore scoring, similar past defects, the manuals) and answers with cited manual pages.\n\n"
        f"**Agent:** `{m['agent']}` · **Image embedder:** `{m['image_embedder']}` · "
        f"**PatchCore backbone:** `{m['patchcore_backbone']}` · **Text embedder:** `{m['text_embedder']}` · "
        f"**Profile:** `{m['profile']}`"
    )


def _fmt_args(arguments: dict | None) -> str:
    if not arguments:
        return ""
    return ", ".join(f"{k}={v!r}" for k, v in arguments.items() if v is not None)


def _gallery(ctx) -> list[tuple[str, str]]:
    out = []
    for h in list((ctx.search or {}).get("hits") or []):
        img = servable(h.get("image"))
        if img:
            out.append((img, f"{h.get('defect_type')} · {h.get('product')} · {float(h.get('score', 0)):.2f}"))
    return out


def export_files(run_id: str | None) -> tuple[str | None, str | None]:
    """``(markdown path, pdf path)`` of a stored run's answer (None where it failed)."""
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


def _owner(request: gr.Request | None) -> str | None:
    """Whose conversation (and history rows): ``session:<Gradio session hash>`` (the History tab's owner)."""
    hash_ = getattr(request, "session_hash", None) if request is not None else None
    return f"session:{hash_}" if hash_ else None


def _cancel_event(key: str | None, fresh: bool = False) -> threading.Event:
    key = key or "local"
    with _CANCELS_LOCK:
        if fresh or key not in _CANCELS:
            _CANCELS[key] = threading.Event()
        return _CANCELS[key]


def stop_run(request: gr.Request = None) -> None:
    """Stop button: cancel the caller's running turn (the model stops within a token)."""
    with _CANCELS_LOCK:
        ev = _CANCELS.get(_owner(request) or "local")
    if ev is not None:
        ev.set()


def warnings_for(result: AgentResult, ctx, lang: str) -> list[str]:
    """Visible warnings of an answer: low-confidence product inference, fallback answer."""
    out = []
    conf = ctx.product_confidence
    if ctx.product_source == "inferred" and conf is not None and conf < LOW_CONFIDENCE:
        out.append(t("chat.low_conf", lang, conf=f"{conf:.0%}", product=ctx.product))
    if result.fallback:
        out.append(t("chat.fallback", lang, reason=localize_reason(result.fallback_reason, lang)))
    return out


def chat_api(image: str | None, question: str | None = "", product: str | None = AUTO_PRODUCT,
             new_conversation: bool = False, request: gr.Request = None):
    """One turn of the caller's conversation (endpoint ``/chat``).

    Args:
        image: server path of an uploaded photo (``gradio_client.handle_file``), or None: optional when
            a question is given or the conversation already has a photo.
        question: the message ("" for none); a Korean question gets a Korean answer.
        product: a product id from the catalog, or ``"auto (infer)"`` / ``""`` to infer it.
        new_conversation: start a new conversation instead of continuing the caller's.

    Returns:
        ``(result, overlay)``: ``result`` is :func:`agent.ask.ask_json` (``session``, ``turn``, ``kind``,
        ``answer`` (markdown), ``steps`` [{tool, arguments, observation, duration_s, error}],
        ``citations`` [{source, page}], ``product``, ``defect_type``, ``model``, ``fallback``,
        ``elapsed_s``, ``score``, ``threshold``, ``is_anomalous``, ``regions``, ``similar``, ``run_id``,
        ``history_id``, ...); ``overlay`` is the anomaly overlay PNG as a file (None if absent).

    Raises:
        gr.Error: bad input (neither photo nor question, not an image, truncated, too large, unknown
            product) or a failed run, with a message that says what is wrong.
    """
    services = get_services()
    owner = _owner(request)
    try:
        require_ready()
        conv = open_conversation(services, None, owner, new=bool(new_conversation))
        ctx = start_turn(conv, image or None, question, product,
                         max_bytes=get_settings().max_upload_mb * 2**20, writes=False)
    except InputError as exc:
        raise gr.Error(f"Bad input: {exc}", print_exception=False) from None
    result, stored = None, {}
    try:
        models = active_models()
        for event in stream_turn(services, conv, ctx, source="api", models=models, owner=owner):
            if isinstance(event, AgentResult):
                result = event
            elif isinstance(event, dict):
                stored = event
    except Exception:  # noqa: BLE001 - the details stay in the server log, the server keeps serving
        ref = uuid.uuid4().hex[:8]
        log.exception("agent run failed (error id %s)", ref)
        raise gr.Error(f"The analysis failed (error id {ref}); the details are in the server log.",
                       print_exception=False) from None
    if result is None:
        raise gr.Error("The analysis ended without a result")
    models = active_models(result.model)
    out = public_json(ask_json(result, ctx, stored.get("history_id"), models, session=conv.id,
                               turn=stored.get("turn")))
    return out, servable((ctx.inspection or {}).get("overlay"))


# ---------------------------------------------------------------------------
# the chat tab's handlers
# ---------------------------------------------------------------------------
def _meta(m) -> dict:
    return (m.metadata if isinstance(m, gr.ChatMessage) else (m.get("metadata") if isinstance(m, dict) else None)) or {}


def _message_path(message: dict | None) -> tuple[str, str | None]:
    message = message or {}
    text = (message.get("text") or "").strip()
    files = message.get("files") or []
    path = None
    if files:
        f = files[-1]
        path = f if isinstance(f, str) else (f.get("path") if isinstance(f, dict) else getattr(f, "path", None))
    return text, path


def _is_file_message(m, path: str) -> bool:
    """A chat message showing the file ``path`` (as built here, or as Gradio hands it back)."""
    content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
    items = content if isinstance(content, list) else [content]
    for c in items:
        if isinstance(c, dict):
            f = c.get("file") if isinstance(c.get("file"), dict) else c
            if f.get("path") == path:
                return True
    return False


def _user_messages(text: str, path: str | None) -> list[dict]:
    msgs = []
    if path:
        msgs.append({"role": "user", "content": {"path": path, "alt_text": Path(path).name}})
    if text:
        msgs.append({"role": "user", "content": text})
    return msgs


def new_ui_state() -> dict:
    """Per-tab chat state: the conversation id and, per stored turn, where its messages are in the chatbot."""
    return {"session": None, "turns": []}


def submit_message(message: dict | None, history: list, ui: dict | None, request: gr.Request = None):
    """First part of sending: show the user's message at once, clear the textbox, arm the stop button.

    Returns ``(history, textbox update, pending message, ui)``.
    """
    ui = dict(ui or new_ui_state())
    text, path = _message_path(message)
    history = list(history or [])
    ui["start"] = len(history)
    history += _user_messages(text, path)
    _cancel_event(_owner(request), fresh=True)
    return history, gr.update(value=None, submit_btn=False, stop_btn=True), {"text": text, "path": path}, ui


def respond(pending: dict | None, history: list, product: str, ui: dict | None, lang_label: str = "English",
            writes: bool = False, request: gr.Request = None) -> Iterator[tuple]:
    """Chat handler (streaming) for the message shown by :func:`submit_message`.

    Yields ``(history, comparison, gallery, banner, ui, markdown download, pdf download, textbox)``.
    The turn is stored in the conversation and the history; its answer is exported as Markdown
    and PDF for the download buttons.
    """
    lang = LANGUAGES.get(lang_label, "en") if lang_label in LANGUAGES else (lang_label or "en")
    ui = dict(ui or new_ui_state())
    ui.setdefault("turns", [])
    history = list(history or [])
    pending = pending or {}
    text, path = pending.get("text") or "", pending.get("path")
    keep = gr.update()
    done_box = gr.update(submit_btn=True, stop_btn=False)
    owner = _owner(request)
    services = get_services()
    if not text and not path:
        history.append({"role": "assistant", "content": t("chat.empty", lang)})
        yield history, keep, keep, keep, ui, keep, keep, done_box
        return
    try:
        require_ready()
        conv = open_conversation(services, ui.get("session"), owner, new=ui.get("session") is None, lang=lang)
        ui["session"] = conv.id
        ctx = start_turn(conv, path, text, product, max_bytes=get_settings().max_upload_mb * 2**20, ui_lang=lang,
                         writes=writes)
    except InputError as exc:
        if path and isinstance(exc, InvalidImageError):  # show the name, not a broken picture
            history = [m for m in history if not _is_file_message(m, path)]
            history.insert(len(history) - (1 if text else 0), {"role": "user", "content": f"📎 {Path(path).name}"})
        history.append({"role": "assistant", "content": f"{t('chat.bad_upload', lang)} {exc}"})
        yield history, keep, keep, keep, ui, keep, keep, done_box
        return

    t0 = time.perf_counter()
    run_id = f"run-{len(ui['turns'])}-{int(time.time() * 1000) % 100000}"
    run_msg = gr.ChatMessage(content="", metadata={"title": t("chat.working", lang), "id": run_id,
                                                   "status": "pending"})
    history.append(run_msg)
    children: list[gr.ChatMessage] = []
    yield history, None if ctx.new_photo else keep, [] if ctx.new_photo else keep, keep, ui, keep, keep, keep

    comparison, gallery = keep, keep
    shown_overlay = False
    answer_msg: dict | None = None
    result: AgentResult | None = None
    stored: dict = {}
    last_yield = 0.0
    cancel = _cancel_event(owner)
    try:
        for event in stream_turn(services, conv, ctx, source="app", models=active_models(), owner=owner,
                                 cancel=cancel):
            if isinstance(event, ToolStarted):
                child = gr.ChatMessage(content="", metadata={"title": f"🛠️ {event.tool} …", "parent_id": run_id,
                                                             "status": "pending"})
                children.append(child)
                history.insert(history.index(run_msg) + len(children), child)
            elif isinstance(event, AgentStep):
                body = event.observation or ""
                if event.error:
                    body = f"❌ {event.error}\n\n{body}".strip()
                child = next((c for c in children if c.metadata.get("status") == "pending"
                              and c.metadata.get("title", "").startswith(f"🛠️ {event.tool} ")), None)
                if child is None:
                    child = gr.ChatMessage(content="", metadata={"parent_id": run_id})
                    children.append(child)
                    history.insert(history.index(run_msg) + len(children), child)
                icon = "🔁" if event.tool == "answer_check" else "🛠️"
                child.content = body or "(no observation)"
                child.metadata = {"title": f"{icon} {event.tool}({_fmt_args(event.arguments)})", "parent_id": run_id,
                                  "status": "done", "duration": round(float(event.duration_s or 0.0), 2)}
                insp = ctx.inspection or {}
                overlay = servable(insp.get("overlay")) if event.tool == "anomaly_scoring" else None
                if not shown_overlay and overlay:
                    shown_overlay = True
                    verdict = "ANOMALOUS" if insp.get("is_anomalous") else "NORMAL"
                    history.append({"role": "assistant", "content": {
                        "path": overlay,
                        "alt_text": f"anomaly overlay: score {insp.get('score')} / threshold "
                                    f"{insp.get('threshold')} ({verdict})"}})
                    comp = servable(insp.get("comparison") or insp.get("heatmap"))
                    comparison = comp if comp else keep
                if event.tool == "similar_defect_search" and ctx.search:
                    gallery = _gallery(ctx)
            elif isinstance(event, AnswerDelta):
                if answer_msg is None:
                    answer_msg = {"role": "assistant", "content": ""}
                    history.append(answer_msg)
                answer_msg["content"] = event.text
                now = time.perf_counter()
                if now - last_yield < 0.08:
                    continue  # at most ~12 updates a second: the browser keeps up, tokens still flow
                last_yield = now
            elif isinstance(event, AgentResult):
                result = event
                continue
            elif isinstance(event, dict):
                stored = event
                continue
            yield history, comparison, gallery, keep, ui, keep, keep, keep
    except Exception:  # noqa: BLE001 - shown in the chat (an error id; details in the log), the app keeps running
        ref = uuid.uuid4().hex[:8]
        log.exception("agent run failed (error id %s)", ref)
        run_msg.metadata = {"title": t("chat.failed", lang), "id": run_id, "status": "done",
                            "duration": round(time.perf_counter() - t0, 2)}
        history.append({"role": "assistant",
                        "content": f"❌ **The analysis failed** (error id {ref}; the details are in the server log)."})
        yield history, comparison, gallery, keep, ui, keep, keep, done_box
        return
    if result is None:
        return
    duration = round(time.perf_counter() - t0, 2)
    if answer_msg is None:
        answer_msg = {"role": "assistant", "content": ""}
        history.append(answer_msg)
    if result.cancelled:
        run_msg.metadata = {"title": t("chat.stopped", lang), "id": run_id, "status": "done", "duration": duration}
        answer_msg["content"] = f"{result.answer}\n\n{t('chat.stopped_note', lang)}".strip()
        yield history, comparison, gallery, keep, ui, keep, keep, done_box
        return
    run_msg.metadata = {"title": t("chat.finished", lang), "id": run_id, "status": "done", "duration": duration}
    run_msg.content = f"{len(result.steps)} tool call(s) · model `{result.model}` · {result.kind}"
    notes = warnings_for(result, ctx, lang)
    answer_msg["content"] = "\n\n".join([*notes, result.answer.strip() or "_(empty answer)_"])
    ui["turns"] = [*ui["turns"], {"turn": stored.get("turn"), "start": ui.get("start", 0),
                                  "answer": history.index(answer_msg), "history_id": stored.get("history_id")}]
    md_path, pdf_path = (servable(p) for p in export_files(stored.get("history_id")))
    yield (history, comparison, gallery, banner_markdown(result.model), ui,
           gr.update(value=md_path, interactive=md_path is not None),
           gr.update(value=pdf_path, interactive=pdf_path is not None), done_box)


def undo_turn(history: list, ui: dict | None, request: gr.Request = None):
    """Undo: drop the last exchange from the chat and from the stored conversation; its text goes back
    into the textbox. Returns ``(history, textbox, ui)``."""
    ui = dict(ui or new_ui_state())
    turns = list(ui.get("turns") or [])
    if not turns or not ui.get("session"):
        return history, gr.update(), ui
    last = turns.pop()
    conv = open_conversation(get_services(), ui["session"], _owner(request))
    popped = conv.undo()
    ui["turns"] = turns
    return list(history or [])[: last["start"]], gr.update(value={"text": (popped or {}).get("question") or "",
                                                                  "files": []}), ui


def retry_turn(history: list, ui: dict | None, request: gr.Request = None):
    """Retry: drop the last exchange (chat and stored conversation) and send its message again.

    Returns ``(history, pending message, ui)``; the caller then runs :func:`respond`.
    """
    ui = dict(ui or new_ui_state())
    turns = list(ui.get("turns") or [])
    history = list(history or [])
    if not turns or not ui.get("session"):
        return history, {"text": "", "path": None}, ui
    last = turns.pop()
    services = get_services()
    conv = open_conversation(services, ui["session"], _owner(request))
    popped = conv.undo() or {}
    photo = None
    if popped.get("image_sha256"):
        photo = servable(services.sessions.photos_dir / conv.id / f"{popped['image_sha256'][:16]}.png")
    ui["turns"] = turns
    ui["start"] = last["start"]
    kept = history[: last["start"]]
    kept += _user_messages(popped.get("question") or "", photo)
    _cancel_event(_owner(request), fresh=True)
    return kept, {"text": popped.get("question") or "", "path": photo}, ui


def turn_of_message(ui: dict | None, index) -> dict | None:
    """The stored turn whose answer is the chatbot message at ``index`` (None when it is not an answer)."""
    idx = index[0] if isinstance(index, (list, tuple)) else index
    for turn in (ui or {}).get("turns") or []:
        if turn.get("answer") == idx:
            return turn
    return None


def _turn_photo(services, session_id: str, turn_idx: int) -> str | None:
    """The photo the conversation had at a turn (its stored copy), or None."""
    photo = None
    for turn in services.sessions.turns(session_id)[: turn_idx + 1]:
        if turn.get("image_sha256"):
            photo = services.sessions.photos_dir / session_id / f"{turn['image_sha256'][:16]}.png"
    return str(photo) if photo is not None and Path(photo).is_file() else None


def record_feedback(data: gr.LikeData, ui: dict | None, lang_label: str = "English", writes: bool = False):
    """Thumbs up / down on an answer: stored with its turn. With ``writes``, thumbs-down on an answer about a
    photo opens the correction panel. Returns ``(ui, panel update, defect update, product update, status)``."""
    lang = LANGUAGES.get(lang_label, "en")
    ui = dict(ui or new_ui_state())
    turn = turn_of_message(ui, data.index)
    hidden = gr.update(visible=False)
    if turn is None or turn.get("turn") is None or not ui.get("session"):
        return ui, hidden, gr.update(), gr.update(), ""
    value = "like" if data.liked is True else ("dislike" if data.liked is False else None)
    services = get_services()
    services.sessions.set_feedback(ui["session"], turn["turn"], value)
    if not (writes and value == "dislike"):
        return ui, hidden, gr.update(), gr.update(), t("chat.feedback", lang)
    photo = _turn_photo(services, ui["session"], turn["turn"])
    if photo is None:
        return ui, hidden, gr.update(), gr.update(), t("chat.feedback", lang)
    row = next((r for r in services.sessions.turns(ui["session"]) if r["idx"] == turn["turn"]), {})
    ui["correct"] = {"turn": turn["turn"], "photo": photo}
    return (ui, gr.update(visible=True), gr.update(value=row.get("defect_type") or None),
            gr.update(value=row.get("product") or None), "")


def register_correction(defect: str | None, product: str | None, ui: dict | None, lang_label: str = "English"):
    """Register the disliked answer's photo in the gallery with the corrected defect type (writes only).

    Returns ``(status markdown, panel update)``.
    """
    lang = LANGUAGES.get(lang_label, "en")
    target = (ui or {}).get("correct") or {}
    if not target.get("photo"):
        return t("chat.register_failed", lang, error="no photo"), gr.update()
    try:
        row = register_defect(get_services(), target["photo"], product, defect,
                              note=f"chat correction (session {(ui or {}).get('session')}, turn {target.get('turn')})")
    except InputError as exc:
        return t("chat.register_failed", lang, error=str(exc)), gr.update()
    return t("chat.registered", lang, product=row["product"], defect=row["defect_type"], id=row["id"]), \
        gr.update(visible=False)


def new_conversation(lang_label: str = "English", request: gr.Request = None):
    """Start a clean conversation: ``(history, textbox, comparison, gallery, ui, md, pdf)``."""
    ui = new_ui_state()
    conv = open_conversation(get_services(), None, _owner(request), new=True, lang=LANGUAGES.get(lang_label, "en"))
    ui["session"] = conv.id
    return ([], None, None, [], ui, gr.update(value=None, interactive=False),
            gr.update(value=None, interactive=False))


def examples(lang: str = "en") -> list[dict]:
    """Chat examples (``gr.Chatbot(examples=...)``): sample photos of each product under the state's data/."""
    data = get_settings().data_dir
    out = []
    for key, text, photo in EXAMPLES:
        ex: dict = {"display_text": t(key, lang), "text": text}
        if photo:
            p = servable(data / photo)
            if p is None:
                continue
            ex["files"] = [p]
            ex["icon"] = p
        out.append(ex)
    return out


def pick_example(data: gr.SelectData, history: list, ui: dict | None, request: gr.Request = None):
    """An example was clicked: send it like a typed message (same outputs as :func:`submit_message`)."""
    value = data.value if isinstance(data.value, dict) else {}
    files = [f.get("path") if isinstance(f, dict) else f for f in value.get("files") or []]
    return submit_message({"text": value.get("text") or "", "files": files}, history, ui, request)


def switch_language(lang_label: str):
    """The language switch: the chat's labels in English or Korean (the answer language follows too)."""
    lang = LANGUAGES.get(lang_label, "en")
    return (gr.update(label=t("chat.label", lang), placeholder=t("chat.placeholder", lang), examples=examples(lang)),
            gr.update(placeholder=t("chat.msg", lang)), gr.update(label=t("chat.product", lang)),
            gr.update(label=t("chat.comparison", lang)), gr.update(label=t("chat.similar", lang)),
            gr.update(value=t("chat.new", lang)), gr.update(label=t("chat.md", lang)),
            gr.update(label=t("chat.pdf", lang)))


# ---------------------------------------------------------------------------
# layout (called inside the app's open gr.Blocks / gr.Tabs context)
# ---------------------------------------------------------------------------
def build_chat_tab(banner: gr.Markdown, writes: bool = True) -> dict:
    """The Chat tab and its events; returns ``{"product": the product dropdown, "chatbot", "textbox", ...}``.

    Args:
        banner: the app's banner (updated with the model name when a run ends).
        writes: the session may write (operator): events that change stores (registering a photo with a
            corrected label after a thumbs-down) are registered only then; the public app passes False.
    """
    with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
        # the states live inside the tab: a child of gr.Tabs other than a Tab shifts the tab indices
        # (the tab bar then shows the selected tab's label in place of another tab's)
        ui = gr.State(new_ui_state())
        pending = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                lang = gr.Radio(list(LANGUAGES), value="English", label=t("chat.language"), elem_id="chat-lang",
                                container=False)
                chatbot = gr.Chatbot(
                    label=t("chat.label"), elem_id="chat", height=680, buttons=["copy", "copy_all"],
                    feedback_options=("Like", "Dislike"), placeholder=t("chat.placeholder"),
                    examples=examples(), autoscroll=True,
                )
                textbox = gr.MultimodalTextbox(
                    file_types=["image"], file_count="single", elem_id="msg", show_label=False,
                    placeholder=t("chat.msg"), stop_btn=False,
                )
            with gr.Column(scale=2):
                product = gr.Dropdown(
                    choices=[AUTO_PRODUCT] + products(), value=AUTO_PRODUCT, label=t("chat.product"),
                    elem_id="product", allow_custom_value=False,
                )
                comparison = gr.Image(label=t("chat.comparison"), type="filepath",
                                      interactive=False, elem_id="comparison", height=260)
                gallery = gr.Gallery(label=t("chat.similar"), columns=3, height=300,
                                     elem_id="similar", allow_preview=True)
                with gr.Row():
                    md_btn = gr.DownloadButton(t("chat.md"), value=None, interactive=False, elem_id="chat-md")
                    pdf_btn = gr.DownloadButton(t("chat.pdf"), value=None, interactive=False, elem_id="chat-pdf")
                clear = gr.Button(t("chat.new"), variant="secondary", elem_id="chat-new")
                status = gr.Markdown("", elem_id="chat-status")
                with gr.Group(visible=False, elem_id="chat-correct") as correct_panel:
                    gr.Markdown(t("chat.correct.title"))
                    correct_defect = gr.Dropdown(choices=defect_types(), label=t("chat.correct.defect"),
                                                 elem_id="chat-correct-defect")
                    correct_product = gr.Dropdown(choices=products(), label=t("chat.correct.product"),
                                                  elem_id="chat-correct-product")
                    correct_btn = gr.Button(t("chat.correct.button"), variant="primary", elem_id="chat-correct-go")

    def run(pending_msg, history, prod, state, lang_label, request: gr.Request):
        yield from respond(pending_msg, history, prod, state, lang_label, writes=writes, request=request)

    outputs = [chatbot, comparison, gallery, banner, ui, md_btn, pdf_btn, textbox]
    run_kwargs = dict(api_visibility="private", concurrency_id=AGENT_CONCURRENCY_ID, concurrency_limit=1)
    textbox.submit(submit_message, [textbox, chatbot, ui], [chatbot, textbox, pending, ui],
                   api_visibility="private", queue=False
                   ).then(run, [pending, chatbot, product, ui, lang], outputs, **run_kwargs)
    chatbot.example_select(pick_example, [chatbot, ui], [chatbot, textbox, pending, ui],
                           api_visibility="private", queue=False
                           ).then(run, [pending, chatbot, product, ui, lang], outputs, **run_kwargs)
    chatbot.retry(retry_turn, [chatbot, ui], [chatbot, pending, ui], api_visibility="private", queue=False
                  ).then(lambda: gr.update(submit_btn=False, stop_btn=True), None, textbox,
                         api_visibility="private", queue=False
                         ).then(run, [pending, chatbot, product, ui, lang], outputs, **run_kwargs)
    chatbot.undo(undo_turn, [chatbot, ui], [chatbot, textbox, ui], api_visibility="private", queue=False)
    textbox.stop(stop_run, None, None, api_visibility="private", queue=False)
    clear.click(new_conversation, [lang], [chatbot, textbox, comparison, gallery, ui, md_btn, pdf_btn],
                api_visibility="private", queue=False)
    lang.change(switch_language, [lang], [chatbot, textbox, product, comparison, gallery, clear, md_btn, pdf_btn],
                api_visibility="private", queue=False)

    def feedback(data: gr.LikeData, state, lang_label):
        return record_feedback(data, state, lang_label, writes=writes)

    chatbot.like(feedback, [ui, lang], [ui, correct_panel, correct_defect, correct_product, status],
                 api_visibility="private", queue=False)
    if writes:  # an operator session: the correction loop writes to the gallery
        correct_btn.click(register_correction, [correct_defect, correct_product, ui, lang], [status, correct_panel],
                          api_visibility="private", concurrency_id="vision")
    return {"product": product, "chatbot": chatbot, "textbox": textbox, "lang": lang, "ui": ui}


def register_chat_api() -> None:
    """The ``/chat`` and ``/models`` endpoints on hidden components (inside the app's Blocks)."""
    with gr.Group(visible=False):
        api_image = gr.File(label="image", type="filepath")
        api_question = gr.Textbox(label="question")
        api_product = gr.Textbox(label="product", value=AUTO_PRODUCT)
        api_new = gr.Checkbox(label="new_conversation", value=False)
        api_result = gr.JSON(label="result")
        api_overlay = gr.Image(label="overlay", type="filepath")
        api_models = gr.JSON(label="models")
        api_button = gr.Button("chat")
        models_button = gr.Button("models")
    def chat(image: str | None = None, question: str = "", product: str = AUTO_PRODUCT,
             new_conversation: bool = False, request: gr.Request = None):
        """Ask the defect response agent: send a photo of a part and / or a question; it decides which tools
        it needs (PatchCore anomaly scoring, similar past defects, the product manuals) and answers, citing
        manual pages. Follow-up calls from the same client continue the conversation.

        Args:
            image: a photo of the part (optional when a question is given or the conversation has a photo).
            question: the message, English or Korean ("" for none: a photo alone gets a full response manual).
            product: product id (brick, gravel, grass, ...) or "auto (infer)".
            new_conversation: start a new conversation instead of continuing this client's.

        Returns:
            the answer as JSON (answer markdown, steps, citations, product, defect_type, verdict fields) and
            the anomaly overlay picture when a photo was scored.
        """
        return chat_api(image, question, product, new_conversation, request=request)

    api_button.click(
        chat, [api_image, api_question, api_product, api_new], [api_result, api_overlay], api_name="chat",
        concurrency_id=AGENT_CONCURRENCY_ID, concurrency_limit=1,
    )
    models_button.click(not_an_mcp_tool(lambda: active_models()), None, api_models, api_name="models",
                        queue=False)  # documented for clients; not an MCP tool
