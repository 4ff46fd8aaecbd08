"""The ask use case: one turn of a conversation with the agent, stored in the session and the history.

``cli.py ask``, the app's ``/chat`` endpoint and the chat tab call :func:`open_conversation`,
:func:`start_turn` and :func:`ask` (or :func:`stream_turn` for live events) and return
:func:`ask_json`, so every edge gives the same fields for the same input.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from agent.agents import DefectAgent, get_default_agent
from agent.memory import Conversation
from agent.types import AgentResult, AgentStep, AnswerDelta, ToolStarted
from core.catalog import parse_product
from core.imageio import InvalidImageError
from core.uploads import check_photo_file
from services.container import Services
from tools.context import RunContext

log = logging.getLogger("dra.agent")


def open_conversation(services: Services, session_id: str | None = None, owner: str | None = None, *,
                      new: bool = False, lang: str = "en") -> Conversation:
    """The conversation to continue (or a new one).

    Args:
        session_id: a session id (CLI ``--session``); created when it does not exist yet.
        owner: whose conversation (app: the Gradio session hash; CLI: ``"cli"``).
        new: start a new conversation even if the owner has one.

    Raises:
        InputError: the session belongs to another owner, or a malformed session id.
    """
    if new and not session_id:
        return Conversation.new(services, owner, lang=lang)
    return Conversation.open(services, session_id, owner, lang=lang)


def start_turn(conv: Conversation, image=None, question: str | None = None, product: str | None = None, *,
               image_name: str | None = None, max_bytes: float | None = None, ui_lang: str = "en",
               writes: bool = False) -> RunContext:
    """Validate a message and build its turn context (see :meth:`agent.memory.Conversation.start_turn`).

    Raises:
        InputError: neither a photo nor a question; InvalidImageError: a bad photo;
        UnknownProductError: an unknown product.
    """
    return conv.start_turn(question, image, image_name=image_name, product=product, ui_lang=ui_lang,
                           writes=writes, max_bytes=max_bytes)


def start_run(image, question: str | None = None, product: str | None = None, *,
              image_name: str | None = None, max_bytes: float | None = None) -> RunContext:
    """A one-shot turn context for a photo without a conversation (kept for callers of the single analysis).

    Raises:
        InvalidImageError: missing, oversized, non-image or truncated file.
        UnknownProductError: a product id that is not in the catalog.
    """
    if image is None or (isinstance(image, str) and not image):
        raise InvalidImageError("no image was attached: upload a photo of the part (PNG, JPEG, ...)")
    if isinstance(image, (str, Path)):
        check_photo_file(image, max_bytes)
    prod = parse_product(product)
    q = (question or "").strip() or None
    if isinstance(image, (str, Path)):
        ctx = RunContext.from_path(image, product=prod, question=q)
    else:
        ctx = RunContext(image=image, product=prod, question=q, new_photo=True)
    if image_name:
        ctx.image_path = image_name
    return ctx


def record(services: Services, result: AgentResult, ctx: RunContext, source: str,
           models: dict | None = None, *, owner: str | None = None, session_id: str | None = None) -> str | None:
    """Store the turn in the history (with its owner and session); returns its id (None when storing failed)."""
    try:
        return services.history.record_run(result, ctx, source=source, models=models, owner=owner,
                                           session_id=session_id)
    except Exception:  # noqa: BLE001 - a history failure must not lose the answer
        log.exception("could not record the run in the history")
        return None


def stream_turn(services: Services, conv: Conversation, ctx: RunContext, *, source: str,
                agent: DefectAgent | None = None, models: dict | None = None, owner: str | None = None,
                cancel: threading.Event | None = None
                ) -> Iterator[ToolStarted | AgentStep | AnswerDelta | AgentResult | dict]:
    """Run one turn with live events; the last two items are the :class:`AgentResult` and a dict
    ``{"history_id", "turn"}`` once the turn is stored (a stopped turn is not stored)."""
    agent = agent or get_default_agent()
    history = conv.history_messages()
    turn_text = agent.turn_text(ctx)
    result = None
    for event in agent.stream(ctx, history=history, turn_text=turn_text, cancel=cancel):
        if isinstance(event, AgentResult):
            result = event
        yield event
    if result is None or result.cancelled:
        return
    hid = record(services, result, ctx, source, models, owner=owner, session_id=conv.id)
    idx = conv.commit(ctx, result, turn_text, run_id=hid)
    yield {"history_id": hid, "turn": idx}


def ask(services: Services, conv: Conversation | RunContext, ctx: RunContext | None = None, *, source: str,
        agent: DefectAgent | None = None, models: dict | None = None, owner: str | None = None
        ) -> tuple[AgentResult, str | None]:
    """Run one turn to the end and store it; returns ``(result, history id)``.

    ``ask(services, ctx, source=...)`` (no conversation) runs a one-shot turn in a new conversation.
    """
    if ctx is None:
        ctx, conv = conv, Conversation.new(services, owner)
    result, hid = None, None
    for event in stream_turn(services, conv, ctx, source=source, agent=agent, models=models, owner=owner):
        if isinstance(event, AgentResult):
            result = event
        elif isinstance(event, dict):
            hid = event.get("history_id")
    assert result is not None
    return result, hid


def ask_json(result: AgentResult, ctx: RunContext, history_id: str | None, models: dict | None = None,
             session: str | None = None, turn: int | None = None) -> dict:
    """The JSON of ``cli.py ask`` and the app's ``/chat``.

    Returns:
        ``{"session", "turn", "kind", "answer" (markdown), "steps" [{tool, arguments, observation,
        duration_s, error}], "citations" [{source, page}], "product", "product_source",
        "product_confidence", "defect_type", "model", "models", "fallback", "fallback_reason",
        "elapsed_s", "timings", "inspection" (the inspect JSON of the conversation's photo or None),
        "score", "threshold", "is_anomalous", "regions", "similar" [{id, product, defect_type, score}],
        "run_id", "history_id"}``.
    """
    insp = ctx.inspection or {}
    hits = list((ctx.search or {}).get("hits") or [])
    return {
        "session": session,
        "turn": turn,
        "kind": result.kind,
        "answer": result.answer,
        "steps": [s.to_json() for s in result.steps],
        "citations": [dict(c) for c in (result.citations or [])],
        "product": result.product or ctx.product,
        "product_source": ctx.product_source,
        "product_confidence": ctx.product_confidence,
        "defect_type": result.defect_type or ctx.reported_defect_type,  # None for a photo scored NORMAL
        "model": result.model,
        "models": models or {"agent": result.model},
        "fallback": bool(result.fallback),
        "fallback_reason": result.fallback_reason,
        "elapsed_s": round(float(result.elapsed_s), 2),
        "timings": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in (result.timings or {}).items()},
        "inspection": ctx.inspection,
        "score": insp.get("score"),
        "threshold": insp.get("threshold"),
        "is_anomalous": insp.get("is_anomalous"),
        "regions": insp.get("regions", []),
        "similar": [{k: h.get(k) for k in ("id", "product", "defect_type", "score")} for h in hits],
        "run_id": ctx.run_id,
        "history_id": history_id,
    }
