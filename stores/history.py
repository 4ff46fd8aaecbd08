"""Analysis history: every agent run (app chat, ``/chat``, ``cli.py ask``) in a local SQLite file.

One row per run in ``<state_dir>/history.sqlite3`` (stdlib :mod:`sqlite3`, WAL journal so
readers never block the writer and a killed process leaves the last committed row
intact). A row holds the image hash (sha256 of the decoded pixels, see
:func:`core.imageio.content_hash`), the product and how it was found, the defect
type, the PatchCore verdict (score, threshold), the tool calls with their arguments,
observations and durations, the model names per role, the timings and the response
manual (markdown) with its citations.

Exports of a run's manual (Markdown, PDF) are :mod:`services.history`.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from core.settings import Settings

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    source TEXT NOT NULL,
    image_sha256 TEXT,
    image_name TEXT,
    question TEXT,
    lang TEXT,
    product TEXT,
    product_source TEXT,
    defect_type TEXT,
    verdict TEXT,
    score REAL,
    threshold REAL,
    agent_model TEXT,
    models_json TEXT,
    tool_calls_json TEXT,
    citations_json TEXT,
    timings_json TEXT,
    fallback INTEGER,
    fallback_reason TEXT,
    elapsed_s REAL,
    answer TEXT,
    overlay TEXT
);
CREATE INDEX IF NOT EXISTS runs_created ON runs(created_at);
CREATE INDEX IF NOT EXISTS runs_product ON runs(product, defect_type);
"""
_JSON_COLS = {"models_json": "models", "tool_calls_json": "tool_calls", "citations_json": "citations",
              "timings_json": "timings"}


class HistoryStore:
    """SQLite store of past analyses (thread-safe; one connection per call).

    Args:
        settings: project settings; the database is ``settings.state_dir / "history.sqlite3"``.
        path: explicit database path (overrides ``settings``).
    """

    def __init__(self, settings: Settings | None = None, path: str | Path | None = None):
        if path is None:
            if settings is None:
                raise ValueError("give the settings or the database path")
            path = Path(settings.state_dir) / "history.sqlite3"
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)
            con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA synchronous=NORMAL")
        return con

    # ------------------------------------------------------------------ writes
    def record(self, row: dict[str, Any]) -> str:
        """Store one analysis; returns its id.

        Args:
            row: keys of the ``runs`` table (``source`` required: ``"app"``, ``"api"`` or
                ``"cli"``); ``models``, ``tool_calls``, ``citations``, ``timings`` may be
                given as Python objects (stored as JSON). Missing keys are NULL.

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
        if "fallback" in data and data["fallback"] is not None:
            data["fallback"] = int(bool(data["fallback"]))
        cols = [c for c in data if re.fullmatch(r"[a-z_0-9]+", c)]
        with self._lock, self._connect() as con:
            known = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
            cols = [c for c in cols if c in known]
            con.execute(f"INSERT OR REPLACE INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                        [data[c] for c in cols])
        return str(data["id"])

    def record_run(self, result, ctx, *, source: str, models: dict | None = None,
                   image_name: str | None = None) -> str:
        """Store an :class:`agent.agents.AgentResult` with its :class:`tools.context.RunContext`.

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
            "id": ctx.run_id, "source": source, "image_sha256": ctx.image_sha256,
            "image_name": image_name or (Path(ctx.image_path).name if ctx.image_path else None),
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

    def delete(self, run_id: str) -> bool:
        """Remove one run; False when the id is unknown."""
        with self._lock, self._connect() as con:
            return con.execute("DELETE FROM runs WHERE id = ?", (run_id,)).rowcount > 0

    # ------------------------------------------------------------------ reads
    @staticmethod
    def _decode(r: sqlite3.Row) -> dict:
        d = dict(r)
        for col, key in _JSON_COLS.items():
            raw = d.pop(col, None)
            d[key] = json.loads(raw) if raw else ([] if key in ("tool_calls", "citations") else {})
        if d.get("fallback") is not None:
            d["fallback"] = bool(d["fallback"])
        d["created"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["created_at"]))
        return d

    def get(self, run_id: str) -> dict | None:
        """One run as a dict (JSON columns decoded), or None."""
        with self._connect() as con:
            r = con.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return self._decode(r) if r else None

    def list(self, product: str | None = None, defect_type: str | None = None, verdict: str | None = None,
             text: str | None = None, limit: int = 100) -> list[dict]:
        """Runs newest first, with exact filters; ``text`` matches the question or the manual (substring).

        Returns:
            up to ``limit`` dicts without the long fields (``answer``, ``tool_calls``):
            ``{"id", "created", "source", "product", "defect_type", "verdict", "score",
            "threshold", "agent_model", "fallback", "elapsed_s", "question", "image_sha256",
            "n_tool_calls", "n_citations"}``.
        """
        where, args = [], []
        for col, val in (("product", product), ("defect_type", defect_type), ("verdict", verdict)):
            if val:
                where.append(f"{col} = ?")
                args.append(val)
        if text and text.strip():
            where.append("(instr(lower(coalesce(question,'')), ?) > 0 OR instr(lower(coalesce(answer,'')), ?) > 0)")
            args += [text.strip().lower()] * 2
        sql = "SELECT * FROM runs" + (f" WHERE {' AND '.join(where)}" if where else "")
        sql += " ORDER BY created_at DESC LIMIT ?"
        args.append(max(1, int(limit)))
        with self._connect() as con:
            rows = [self._decode(r) for r in con.execute(sql, args)]
        keep = ("id", "created", "source", "product", "defect_type", "verdict", "score", "threshold",
                "agent_model", "fallback", "elapsed_s", "question", "image_sha256", "image_name")
        return [{**{k: r.get(k) for k in keep}, "n_tool_calls": len(r["tool_calls"]),
                 "n_citations": len(r["citations"])} for r in rows]

    def count(self) -> int:
        """Number of stored runs."""
        with self._connect() as con:
            return int(con.execute("SELECT count(*) FROM runs").fetchone()[0])

    def stats(self) -> dict:
        """Counts by product, by defect type and by (product, defect type), and by verdict.

        Returns:
            ``{"total", "by_product": {p: n}, "by_defect_type": {d: n}, "by_verdict": {v: n},
            "by_product_defect": [{"product", "defect_type", "runs"}]}``; NULL shows as ``"unknown"``.
        """
        with self._connect() as con:
            total = int(con.execute("SELECT count(*) FROM runs").fetchone()[0])

            def group(col: str) -> dict:
                return {str(r[0] or "unknown"): int(r[1]) for r in
                        con.execute(f"SELECT {col}, count(*) FROM runs GROUP BY {col} ORDER BY count(*) DESC")}

            pairs = [{"product": r[0] or "unknown", "defect_type": r[1] or "unknown", "runs": int(r[2])}
                     for r in con.execute("SELECT product, defect_type, count(*) FROM runs "
                                          "GROUP BY product, defect_type ORDER BY product, defect_type")]
            return {"total": total, "by_product": group("product"), "by_defect_type": group("defect_type"),
                    "by_verdict": group("verdict"), "by_product_defect": pairs}
