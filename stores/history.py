"""Analysis history: every agent run (app chat, ``/chat``, ``cli.py ask``) as one row of ``runs``.

The table lives in the app's database (:mod:`stores.database`: a SQLite file in the state
directory by default, PostgreSQL for several replicas). A row holds the image hash (sha256
of the decoded pixels, see :func:`core.imageio.content_hash`), the product and how it was
found, the defect type, the PatchCore verdict (score, threshold), the tool calls with their
arguments, observations and durations, the model names per role, the timings, the response
manual (markdown) with its citations, and its ``owner``: the visitor (app session) or
operator it belongs to, so that each visitor reads only their own runs.

Exports of a run's manual (Markdown, PDF) are :mod:`services.history`.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Float, Index, Integer, String, Table, Text, delete, func, insert, or_, select

from core.settings import Settings
from stores.database import METADATA, database_url, open_engine

RUNS = Table(
    "runs", METADATA,
    Column("id", String(64), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("source", String(16), nullable=False),
    Column("owner", String(128)),
    Column("session_id", String(64)),
    Column("image_sha256", String(64)),
    Column("image_name", Text),
    Column("question", Text),
    Column("lang", String(8)),
    Column("product", String(64)),
    Column("product_source", String(16)),
    Column("defect_type", String(32)),
    Column("verdict", String(16)),
    Column("score", Float),
    Column("threshold", Float),
    Column("agent_model", Text),
    Column("models_json", Text),
    Column("tool_calls_json", Text),
    Column("citations_json", Text),
    Column("timings_json", Text),
    Column("fallback", Integer),
    Column("fallback_reason", Text),
    Column("elapsed_s", Float),
    Column("answer", Text),
    Column("overlay", Text),
    Index("runs_created", "created_at"),
    Index("runs_product", "product", "defect_type"),
    Index("runs_owner", "owner", "created_at"),
)
_JSON_COLS = {"models_json": "models", "tool_calls_json": "tool_calls", "citations_json": "citations",
              "timings_json": "timings"}
_COLUMNS = {c.name for c in RUNS.columns}
#: ``owner=ANY`` reads every owner's runs (operators, the CLI); None reads runs without an owner
ANY = object()


class HistoryStore:
    """The ``runs`` table of the app's database (thread-safe; pooled connections).

    Args:
        settings: project settings (``database_url``, else ``<state_dir>/history.sqlite3``).
        path: an explicit SQLite file (overrides ``settings``).
        url: an explicit database URL (overrides both).

    Raises:
        ValueError: none of the three given.
    """

    def __init__(self, settings: Settings | None = None, path: str | Path | None = None, url: str | None = None):
        if url is None:
            if path is not None:
                url = f"sqlite:///{Path(path).resolve()}"
            elif settings is not None:
                url = database_url(settings)
            else:
                raise ValueError("give the settings, a database path or a URL")
        self.url = url
        self.engine = open_engine(url)

    # ------------------------------------------------------------------ writes
    def record(self, row: dict[str, Any]) -> str:
        """Store one analysis; returns its id.

        Args:
            row: keys of the ``runs`` table (``source`` required: ``"app"``, ``"api"`` or
                ``"cli"``); ``models``, ``tool_calls``, ``citations``, ``timings`` may be
                given as Python objects (stored as JSON). Unknown keys are ignored, missing
                ones are NULL. An existing id is replaced.

        Raises:
            ValueError: no ``source``.
        """
        if not row.get("source"):
            raise ValueError("a history row needs a source (app, api or cli)")
        data = {k: v for k, v in row.items() if k not in _JSON_COLS.values()}
        for col, key in _JSON_COLS.items():
            if key in row:
                data[col] = json.dumps(row[key], ensure_ascii=False, default=str)
        data.setdefault("id", time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8])
        data.setdefault("created_at", time.time())
        if data.get("fallback") is not None:
            data["fallback"] = int(bool(data["fallback"]))
        data = {k: v for k, v in data.items() if k in _COLUMNS}
        with self.engine.begin() as con:
            con.execute(delete(RUNS).where(RUNS.c.id == data["id"]))
            con.execute(insert(RUNS).values(**data))
        return str(data["id"])

    def record_run(self, result, ctx, *, source: str, models: dict | None = None,
                   image_name: str | None = None, owner: str | None = None, session_id: str | None = None) -> str:
        """Store an :class:`agent.types.AgentResult` with its :class:`tools.context.RunContext`.

        Returns:
            the history id (the run context's ``run_id``).
        """
        insp = ctx.inspection or {}
        verdict = None if not insp else ("ANOMALOUS" if insp.get("is_anomalous") else "NORMAL")
        steps = [{"tool": s.tool, "arguments": dict(s.arguments or {}), "observation": s.observation,
                  "duration_s": round(float(s.duration_s or 0.0), 3), "error": s.error} for s in result.steps]
        timings = {"total_s": round(float(result.elapsed_s), 3),
                   "tools_s": round(sum(s["duration_s"] for s in steps), 3)}
        if insp.get("elapsed_ms") is not None:
            timings["anomaly_scoring_ms"] = insp["elapsed_ms"]
        return self.record({
            "id": ctx.run_id, "source": source, "owner": owner, "session_id": session_id,
            "image_sha256": getattr(ctx, "image_sha256", None) or None,
            "image_name": image_name or (Path(ctx.image_path).name if getattr(ctx, "image_path", None) else None),
            "question": ctx.question, "lang": ctx.lang,
            "product": result.product or ctx.product, "product_source": ctx.product_source,
            "defect_type": result.defect_type or ctx.defect_type, "verdict": verdict,
            "score": insp.get("score"), "threshold": insp.get("threshold"),
            "agent_model": result.model, "models": models or {"agent": result.model},
            "tool_calls": steps, "citations": list(result.citations or []), "timings": timings,
            "fallback": result.fallback, "fallback_reason": result.fallback_reason,
            "elapsed_s": round(float(result.elapsed_s), 3), "answer": result.answer,
            "overlay": insp.get("overlay"),
        })

    def delete(self, run_id: str, owner=ANY) -> bool:
        """Remove one run (of ``owner`` unless ANY); False when there is no such run."""
        stmt = delete(RUNS).where(RUNS.c.id == run_id)
        if owner is not ANY:
            stmt = stmt.where(RUNS.c.owner.is_(None) if owner is None else RUNS.c.owner == owner)
        with self.engine.begin() as con:
            return con.execute(stmt).rowcount > 0

    # ------------------------------------------------------------------ reads
    @staticmethod
    def _decode(r) -> dict:
        d = {str(k): v for k, v in r._mapping.items()}  # plain str keys (SQLAlchemy's quoted_name is a subclass)
        for col, key in _JSON_COLS.items():
            raw = d.pop(col, None)
            d[key] = json.loads(raw) if raw else ([] if key in ("tool_calls", "citations") else {})
        if d.get("fallback") is not None:
            d["fallback"] = bool(d["fallback"])
        d["created"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["created_at"]))
        return d

    @staticmethod
    def _owned(stmt, owner):
        if owner is ANY:
            return stmt
        return stmt.where(RUNS.c.owner.is_(None) if owner is None else RUNS.c.owner == owner)

    def get(self, run_id: str, owner=ANY) -> dict | None:
        """One run as a dict (JSON columns decoded), or None (also when it belongs to another owner)."""
        with self.engine.connect() as con:
            r = con.execute(self._owned(select(RUNS).where(RUNS.c.id == run_id), owner)).first()
        return self._decode(r) if r else None

    def list(self, product: str | None = None, defect_type: str | None = None, verdict: str | None = None,
             text: str | None = None, limit: int = 100, owner=ANY) -> list[dict]:
        """Runs newest first, with exact filters; ``text`` matches the question or the manual (substring).

        Returns:
            up to ``limit`` dicts without the long fields (``answer``, ``tool_calls``):
            ``{"id", "created", "source", "product", "defect_type", "verdict", "score",
            "threshold", "agent_model", "fallback", "elapsed_s", "question", "image_sha256",
            "image_name", "n_tool_calls", "n_citations"}``.
        """
        stmt = self._owned(select(RUNS), owner)
        for col, val in (("product", product), ("defect_type", defect_type), ("verdict", verdict)):
            if val:
                stmt = stmt.where(RUNS.c[col] == val)
        if text and text.strip():
            needle = f"%{text.strip().lower()}%"
            stmt = stmt.where(or_(func.lower(func.coalesce(RUNS.c.question, "")).like(needle),
                                  func.lower(func.coalesce(RUNS.c.answer, "")).like(needle)))
        stmt = stmt.order_by(RUNS.c.created_at.desc()).limit(max(1, int(limit)))
        with self.engine.connect() as con:
            rows = [self._decode(r) for r in con.execute(stmt)]
        keep = ("id", "created", "source", "product", "defect_type", "verdict", "score", "threshold",
                "agent_model", "fallback", "elapsed_s", "question", "image_sha256", "image_name")
        return [{**{k: r.get(k) for k in keep}, "n_tool_calls": len(r["tool_calls"]),
                 "n_citations": len(r["citations"])} for r in rows]

    def count(self, owner=ANY) -> int:
        """Number of stored runs (of ``owner`` unless ANY)."""
        with self.engine.connect() as con:
            return int(con.execute(self._owned(select(func.count()).select_from(RUNS), owner)).scalar_one())

    def stats(self, owner=ANY) -> dict:
        """Counts by product, by defect type, by (product, defect type) and by verdict.

        Returns:
            ``{"total", "by_product": {p: n}, "by_defect_type": {d: n}, "by_verdict": {v: n},
            "by_product_defect": [{"product", "defect_type", "runs"}]}``; NULL shows as ``"unknown"``.
        """
        with self.engine.connect() as con:
            total = int(con.execute(self._owned(select(func.count()).select_from(RUNS), owner)).scalar_one())

            def group(col: str) -> dict:
                n = func.count().label("n")
                stmt = self._owned(select(RUNS.c[col], n), owner).group_by(RUNS.c[col]).order_by(n.desc())
                return {str(r[0] or "unknown"): int(r[1]) for r in con.execute(stmt)}

            stmt = self._owned(select(RUNS.c.product, RUNS.c.defect_type, func.count()), owner).group_by(
                RUNS.c.product, RUNS.c.defect_type).order_by(RUNS.c.product, RUNS.c.defect_type)
            pairs = [{"product": r[0] or "unknown", "defect_type": r[1] or "unknown", "runs": int(r[2])}
                     for r in con.execute(stmt)]
            return {"total": total, "by_product": group("product"), "by_defect_type": group("defect_type"),
                    "by_verdict": group("verdict"), "by_product_defect": pairs}
