"""The ask use case: one agent run on a photo (and a question), recorded in the history.

``cli.py ask`` and the app's ``/chat`` endpoint and chat tab call :func:`start_run` and
:func:`ask` (or :meth:`agent.agents.DefectAgent.stream` for live steps) and return
:func:`ask_json`, so both edges give the same fields for the same input.
"""

from __future__ import annotations

import logging
from pathlib import Path

from agent.agents import DefectAgent, get_default_agent
from agent.types import AgentResult
from core.catalog import parse_product
from core.imageio import InvalidImageError
from services.container import Services
from tools.context import RunContext

log = logging.getLogger("dra.agent")


def start_run(image, question: str | None = None, product: str | None = None, *,
              image_name: str | None = None, max_bytes: float | None = None) -> RunContext:
    """Validate the inputs and build the run context of one analysis.

    Args:
        image: path of the photo (or an array).
        question: optional question ("" for none).
        product: product id, or None / ``auto`` to infer it.
        image_name: the photo's display name (default: the file name).
        max_bytes: refuse files larger than this (the app's upload limit).

    Returns:
        :class:`tools.context.RunContext` with the decoded photo (RGB uint8 ``(H, W, 3)``).

    Raises:
        InvalidImageError: missing, oversized, non-image or truncated file.
        UnknownProductError: a product id that is not in the catalog.
    """
    if image is None or (isinstance(image, str) and not image):
        raise InvalidImageError("no image was attached: upload a photo of the part (PNG, JPEG, ...)")
    if isinstance(image, (str, Path)):
        p = Path(image)
        if not p.is_file():
            raise InvalidImageError(f"the uploaded file {p.name} could not be found on the server")
        if max_bytes is not None and p.stat().st_size > max_bytes:
            raise InvalidImageError(f"{p.name} is larger than the upload limit of {max_bytes / 2**20:g} MB "
                                    "(DRA_MAX_UPLOAD_MB)")
    prod = parse_product(product)
    q = (question or "").strip() or None
    if isinstance(image, (str, Path)):
        ctx = RunContext.from_path(image, product=prod, question=q)
    else:
        ctx = RunContext(image=image, product=prod, question=q)
    if image_name:
        ctx.image_path = image_name
    return ctx


def record(services: Services, result: AgentResult, ctx: RunContext, source: str,
           models: dict | None = None) -> str | None:
    """Store the run in the SQLite history; returns its id (None when storing failed: the answer is kept)."""
    try:
        return services.history.record_run(result, ctx, source=source, models=models)
    except Exception:  # noqa: BLE001 - a history failure must not lose the answer
        log.exception("could not record the run in the history")
        return None


def ask(services: Services, ctx: RunContext, *, source: str, agent: DefectAgent | None = None,
        models: dict | None = None) -> tuple[AgentResult, str | None]:
    """Run the agent to the end on ``ctx`` and record it; returns ``(result, history id)``."""
    result = (agent or get_default_agent()).run(ctx)
    return result, record(services, result, ctx, source, models)


def ask_json(result: AgentResult, ctx: RunContext, history_id: str | None, models: dict | None = None) -> dict:
    """The JSON of ``cli.py ask`` and the app's ``/chat``.

    Returns:
        ``{"answer" (markdown), "steps" [{tool, arguments, observation, duration_s, error}],
        "citations" [{source, page}], "product", "product_source", "defect_type", "model",
        "models", "fallback", "fallback_reason", "elapsed_s", "inspection" (the inspect JSON
        or None), "score", "threshold", "is_anomalous", "regions", "similar" [{id, product,
        defect_type, score}], "run_id", "history_id"}``.
    """
    insp = ctx.inspection or {}
    hits = list((ctx.search or {}).get("hits") or [])
    return {
        "answer": result.answer,
        "steps": [s.to_json() for s in result.steps],
        "citations": [dict(c) for c in (result.citations or [])],
        "product": result.product or ctx.product,
        "product_source": ctx.product_source,
        "defect_type": result.defect_type or ctx.defect_type,
        "model": result.model,
        "models": models or {"agent": result.model},
        "fallback": bool(result.fallback),
        "fallback_reason": result.fallback_reason,
        "elapsed_s": round(float(result.elapsed_s), 2),
        "inspection": ctx.inspection,
        "score": insp.get("score"),
        "threshold": insp.get("threshold"),
        "is_anomalous": insp.get("is_anomalous"),
        "regions": insp.get("regions", []),
        "similar": [{k: h.get(k) for k in ("id", "product", "defect_type", "score")} for h in hits],
        "run_id": ctx.run_id,
        "history_id": history_id,
    }
