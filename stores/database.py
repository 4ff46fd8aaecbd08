"""The app's relational database: the history of analyses and the conversation sessions.

SQLAlchemy Core over a database URL (``Settings.database_url``, env ``DRA_DATABASE_URL``):

* default: a SQLite file in the state directory, ``sqlite:///<state_dir>/history.sqlite3``
  (WAL journal, so readers never block the writer and a killed process keeps the last
  committed row);
* several app replicas behind a load balancer: one PostgreSQL server shared by all, e.g.
  ``postgresql+psycopg://user:password@db:5432/dra`` (driver: psycopg 3).

Each store defines its tables on :data:`METADATA` (``stores/history.py``: ``runs``;
``stores/sessions.py``: ``sessions`` and ``turns``); :func:`open_engine` creates the
tables that are missing and adds columns that an older file lacks (additive migrations only).
"""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import Engine, MetaData, create_engine, event, inspect, text

from core.settings import Settings

#: every table of the app's database
METADATA = MetaData()

_ENGINES: dict[str, Engine] = {}
_LOCK = threading.Lock()


def database_url(settings: Settings) -> str:
    """The database URL: ``settings.database_url``, else the SQLite file in the state directory."""
    url = getattr(settings, "database_url", "") or ""
    return url or f"sqlite:///{settings.state_dir / 'history.sqlite3'}"


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _add_missing_columns(engine: Engine) -> None:
    """Additive migration: columns defined in :data:`METADATA` but missing in an existing table."""
    insp = inspect(engine)
    existing = set(insp.get_table_names())
    with engine.begin() as con:
        for table in METADATA.sorted_tables:
            if table.name not in existing:
                continue
            have = {c["name"] for c in insp.get_columns(table.name)}
            for col in table.columns:
                if col.name not in have:
                    kind = col.type.compile(dialect=engine.dialect)
                    con.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{col.name}" {kind}'))


def open_engine(url: str) -> Engine:
    """A shared SQLAlchemy engine for ``url`` with every table of :data:`METADATA` present.

    SQLite files get their folder created and WAL mode; connections are pooled by
    SQLAlchemy (thread-safe use from Gradio's worker threads).

    Raises:
        sqlalchemy.exc.ArgumentError: a malformed URL. sqlalchemy.exc.OperationalError: the
            server cannot be reached.
    """
    with _LOCK:
        engine = _ENGINES.get(url)
        if engine is not None:
            return engine
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(url, pool_pre_ping=True)
        METADATA.create_all(engine)
        _add_missing_columns(engine)
        _ENGINES[url] = engine
        return engine
