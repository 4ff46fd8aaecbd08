"""Chat sessions: one row per conversation in ``sessions``, one row per exchange in ``turns``.

The tables live in the app's database (:mod:`stores.database`: the SQLite file in the state
directory with the history by default, PostgreSQL for replicas), so a conversation survives a
restart and a ``cli.py ask --session ID`` follow-up continues it from another process.

A session holds what the agent needs to continue the conversation:

* the current photo (a PNG copy under ``<state_dir>/sessions/<session id>/``, kept until a new
  photo is attached; Gradio's upload cache is purged hourly, so the upload path is not kept),
  its product and how the product was found;
* ``facts``: the tool results about the current photo (anomaly scoring, similar-defect search),
  so a follow-up does not compute them again;
* ``passages``: every manual passage retrieved in the conversation, labelled ``P1``, ``P2``, ...
  (the pages an answer may cite);
* per turn: the question, the model's view of the exchange (its tool calls, the short
  observations, its answer), the tool steps, the final answer with its citations, the history
  run id, the user's feedback, and the session state before the turn (so undo and retry can
  drop the last turn and restore the photo and facts it replaced).

``owner`` is the visitor the conversation belongs to (the Gradio ``session_hash`` in the app,
``"cli"`` for the command line); reads can be restricted to one owner.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Column, Float, Index, Integer, String, Table, Text, delete, func, insert, select, update

from core.imageio import content_hash, save_png
from core.settings import Settings
from stores.database import METADATA, database_url, open_engine

SESSIONS = Table(
    "sessions", METADATA,
    Column("id", String(64), primary_key=True),
    Column("owner", String(128)),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("title", Text),
    Column("lang", String(8)),
    Column("photo_path", Text),
    Column("photo_sha256", String(64)),
    Column("photo_name", Text),
    Column("product", String(64)),
    Column("product_source", String(16)),
    Column("product_confidence", Float),
    Column("facts_json", Text),
    Column("passages_json", Text),
    Column("n_turns", Integer),
    Index("sessions_owner", "owner", "updated_at"),
)

TURNS = Table(
    "turns", METADATA,
    Column("session_id", String(64), primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("question", Text),
    Column("lang", String(8)),
    Column("image_sha256", String(64)),
    Column("image_name", Text),
    Column("kind", String(32)),
    Column("messages_json", Text),
    Column("steps_json", Text),
    Column("answer", Text),
    Column("citations_json", Text),
    Column("product", String(64)),
    Column("defect_type", String(32)),
    Column("model", Text),
    Column("fallback", Integer),
    Column("fallback_reason", Text),
    Column("elapsed_s", Float),
    Column("run_id", String(64)),
    Column("feedback", String(16)),
    Column("before_json", Text),
)

#: ``owner=ANY`` reads sessions of every owner (the CLI, operators)
ANY = object()
#: session columns a turn may change (saved with the turn, restored by :meth:`SessionStore.pop_turn`)
STATE_FIELDS = ("lang", "photo_path", "photo_sha256", "photo_name", "product", "product_source",
                "product_confidence", "facts", "passages")
_SESSION_JSON = {"facts_json": "facts", "passages_json": "passages"}
_TURN_JSON = {"messages_json": "messages", "steps_json": "steps", "citations_json": "citations",
              "before_json": "before"}
FEEDBACK = ("like", "dislike")


def new_session_id() -> str:
    """A fresh session id: ``<yyyymmdd-HHMMSS>-<12 hex>``."""
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:12]


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


class SessionStore:
    """The ``sessions`` and ``turns`` tables of the app's database, and the session photos.

    Args:
        settings: project settings (database URL, state directory for the photos).
        url: an explicit database URL (default :func:`stores.database.database_url`).
        photos_dir: where session photos go (default ``<state_dir>/sessions``).

    Thread-safe (pooled SQLAlchemy connections); every write is one transaction.
    """

    def __init__(self, settings: Settings, url: str | None = None, photos_dir: Path | None = None):
        self.url = url or database_url(settings)
        self.engine = open_engine(self.url)
        self.photos_dir = Path(photos_dir) if photos_dir else Path(settings.state_dir) / "sessions"

    # ------------------------------------------------------------------ sessions
    @staticmethod
    def _decode_session(r) -> dict:
        d = {str(k): v for k, v in r._mapping.items()}  # plain str keys (SQLAlchemy quoted_name)
        for col, key in _SESSION_JSON.items():
            raw = d.pop(col, None)
            d[key] = json.loads(raw) if raw else ({} if key == "facts" else [])
        d["n_turns"] = int(d.get("n_turns") or 0)
        return d

    @staticmethod
    def _owned(stmt, table, owner):
        if owner is ANY:
            return stmt
        return stmt.where(table.c.owner.is_(None) if owner is None else table.c.owner == owner)

    def create(self, owner: str | None, session_id: str | None = None, lang: str = "en",
               title: str | None = None) -> dict:
        """Start an empty conversation; returns the session dict (see :meth:`get`).

        Raises:
            ValueError: ``session_id`` exists already or is not 1..64 characters of ``[A-Za-z0-9_.-]``.
        """
        sid = session_id or new_session_id()
        if not (0 < len(sid) <= 64) or not all(c.isalnum() or c in "-_." for c in sid):
            raise ValueError("a session id is 1..64 characters: letters, digits, '-', '_' or '.'")
        now = time.time()
        with self.engine.begin() as con:
            if con.execute(select(SESSIONS.c.id).where(SESSIONS.c.id == sid)).first() is not None:
                raise ValueError(f"session {sid!r} exists already")
            con.execute(insert(SESSIONS).values(id=sid, owner=owner, created_at=now, updated_at=now,
                                                title=title, lang=lang, facts_json="{}", passages_json="[]",
                                                n_turns=0))
        return self.get(sid)

    def get(self, session_id: str, owner=ANY) -> dict | None:
        """A session ``{"id", "owner", "created_at", "updated_at", "title", "lang", "photo_path",
        "photo_sha256", "photo_name", "product", "product_source", "product_confidence", "facts",
        "passages", "n_turns"}``, or None (also when it belongs to another owner)."""
        with self.engine.connect() as con:
            r = con.execute(self._owned(select(SESSIONS).where(SESSIONS.c.id == session_id), SESSIONS,
                                        owner)).first()
        return self._decode_session(r) if r else None

    def latest(self, owner: str | None) -> dict | None:
        """The owner's most recently updated session, or None."""
        stmt = self._owned(select(SESSIONS), SESSIONS, owner).order_by(SESSIONS.c.updated_at.desc()).limit(1)
        with self.engine.connect() as con:
            r = con.execute(stmt).first()
        return self._decode_session(r) if r else None

    def list(self, owner=ANY, limit: int = 50) -> list[dict]:
        """Sessions newest first (without facts and passages): ``{"id", "owner", "title", "updated_at", "n_turns"}``."""
        stmt = self._owned(select(SESSIONS.c.id, SESSIONS.c.owner, SESSIONS.c.title, SESSIONS.c.updated_at,
                                  SESSIONS.c.n_turns), SESSIONS, owner)
        stmt = stmt.order_by(SESSIONS.c.updated_at.desc()).limit(max(1, int(limit)))
        with self.engine.connect() as con:
            return [{str(k): v for k, v in r._mapping.items()} for r in con.execute(stmt)]

    def update(self, session_id: str, **fields) -> None:
        """Set session fields (any of :data:`STATE_FIELDS` and ``title``); ``facts`` / ``passages`` as objects.

        Raises:
            KeyError: no such session. ValueError: an unknown field.
        """
        values = self._state_values(fields)
        values["updated_at"] = time.time()
        with self.engine.begin() as con:
            if con.execute(update(SESSIONS).where(SESSIONS.c.id == session_id).values(**values)).rowcount == 0:
                raise KeyError(f"no session {session_id!r}")

    @staticmethod
    def _state_values(fields: dict) -> dict:
        values = {}
        for key, value in fields.items():
            if key in ("facts", "passages"):
                values[f"{key}_json"] = _dumps(value if value is not None else ({} if key == "facts" else []))
            elif key in STATE_FIELDS or key == "title":
                values[key] = value
            else:
                raise ValueError(f"unknown session field {key!r}")
        return values

    def delete(self, session_id: str) -> bool:
        """Remove a session, its turns and its photos; False when there was no such session."""
        with self.engine.begin() as con:
            con.execute(delete(TURNS).where(TURNS.c.session_id == session_id))
            gone = con.execute(delete(SESSIONS).where(SESSIONS.c.id == session_id)).rowcount > 0
        shutil.rmtree(self.photos_dir / session_id, ignore_errors=True)
        return gone

    def save_photo(self, session_id: str, rgb: np.ndarray) -> tuple[Path, str]:
        """Keep a copy of a photo for the session: ``(path of the PNG, sha256 of the pixels)``.

        The file is ``<photos_dir>/<session id>/<sha256[:16]>.png`` (the same photo is stored once).
        """
        sha = content_hash(rgb)
        path = self.photos_dir / session_id / f"{sha[:16]}.png"
        if not path.is_file():
            save_png(rgb, path)
        return path, sha

    # ------------------------------------------------------------------ turns
    @staticmethod
    def _decode_turn(r) -> dict:
        d = {str(k): v for k, v in r._mapping.items()}  # plain str keys (SQLAlchemy quoted_name)
        for col, key in _TURN_JSON.items():
            raw = d.pop(col, None)
            d[key] = json.loads(raw) if raw else ({} if key == "before" else [])
        if d.get("fallback") is not None:
            d["fallback"] = bool(d["fallback"])
        return d

    def add_turn(self, session_id: str, turn: dict, state: dict | None = None) -> int:
        """Append one exchange and update the session state in one transaction; returns its index (0-based).

        Args:
            turn: keys of ``turns`` (``question``, ``answer``, ``messages``, ``steps``, ``citations``,
                ``kind``, ...; JSON ones as objects). The session state before the turn is saved with it.
            state: new values of :data:`STATE_FIELDS` (e.g. a new photo, facts, passages).

        Raises:
            KeyError: no such session.
        """
        now = time.time()
        with self.engine.begin() as con:
            r = con.execute(select(SESSIONS).where(SESSIONS.c.id == session_id)).first()
            if r is None:
                raise KeyError(f"no session {session_id!r}")
            current = self._decode_session(r)
            idx = current["n_turns"]
            row = {"session_id": session_id, "idx": idx, "created_at": now,
                   "before_json": _dumps({k: current.get(k) for k in STATE_FIELDS})}
            for key, value in turn.items():
                col = next((c for c, k in _TURN_JSON.items() if k == key), None)
                if col:
                    row[col] = _dumps(value)
                elif key in TURNS.c and key not in ("session_id", "idx", "created_at"):
                    row[key] = int(bool(value)) if key == "fallback" and value is not None else value
            con.execute(insert(TURNS).values(**row))
            values = self._state_values(state or {})
            values.update(n_turns=idx + 1, updated_at=now)
            if not current.get("title") and turn.get("question"):
                values.setdefault("title", str(turn["question"])[:80])
            con.execute(update(SESSIONS).where(SESSIONS.c.id == session_id).values(**values))
        return idx

    def turns(self, session_id: str) -> list[dict]:
        """The session's turns in order (JSON columns decoded)."""
        with self.engine.connect() as con:
            rows = con.execute(select(TURNS).where(TURNS.c.session_id == session_id).order_by(TURNS.c.idx))
            return [self._decode_turn(r) for r in rows]

    def pop_turn(self, session_id: str) -> dict | None:
        """Remove the last turn and restore the session state saved before it; returns the turn (None if none)."""
        with self.engine.begin() as con:
            r = con.execute(select(TURNS).where(TURNS.c.session_id == session_id)
                            .order_by(TURNS.c.idx.desc()).limit(1)).first()
            if r is None:
                return None
            last = self._decode_turn(r)
            con.execute(delete(TURNS).where(TURNS.c.session_id == session_id, TURNS.c.idx == last["idx"]))
            values = self._state_values({k: v for k, v in (last.get("before") or {}).items() if k in STATE_FIELDS})
            values.update(n_turns=last["idx"], updated_at=time.time())
            con.execute(update(SESSIONS).where(SESSIONS.c.id == session_id).values(**values))
        return last

    def set_feedback(self, session_id: str, idx: int, value: str | None) -> bool:
        """Store the user's feedback on a turn's answer (``"like"``, ``"dislike"`` or None); False if no such turn.

        Raises:
            ValueError: another value.
        """
        if value is not None and value not in FEEDBACK:
            raise ValueError(f"feedback is one of {FEEDBACK} or None")
        with self.engine.begin() as con:
            res = con.execute(update(TURNS).where(TURNS.c.session_id == session_id, TURNS.c.idx == int(idx))
                              .values(feedback=value))
            return res.rowcount > 0

    def count(self, owner=ANY) -> int:
        """Number of sessions (of ``owner`` unless ANY)."""
        with self.engine.connect() as con:
            return int(con.execute(self._owned(select(func.count()).select_from(SESSIONS), SESSIONS,
                                               owner)).scalar_one())
