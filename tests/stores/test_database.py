"""The app's database on SQLite and on a real PostgreSQL server (stores/database.py, stores/history.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stores.history import ANY, HistoryStore
from tests.pg_server import PostgresServer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pg_url():
    try:
        server = PostgresServer()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    url = server.start()
    yield url
    server.stop()


def _exercise(store: HistoryStore) -> None:
    a = store.record({"source": "app", "owner": "session:a", "product": "brick", "defect_type": "crack",
                      "verdict": "ANOMALOUS", "question": "why? ![x](http://evil/x.png)", "answer": "manual A",
                      "tool_calls": [{"tool": "anomaly_scoring"}], "citations": [{"source": "m.pdf", "page": 2}]})
    b = store.record({"source": "app", "owner": "session:b", "product": "grass", "answer": "manual B"})
    c = store.record({"source": "cli", "product": "brick", "answer": "manual C"})
    assert {r["id"] for r in store.list(owner="session:a")} == {a}
    assert {r["id"] for r in store.list(owner=ANY)} >= {a, b, c}
    assert store.get(b, owner="session:a") is None and store.get(b, owner="session:b")["answer"] == "manual B"
    row = store.get(a)
    assert all(type(k) is str for k in row)  # plain keys: orjson (Gradio's JSON) refuses str subclasses
    assert row["tool_calls"] == [{"tool": "anomaly_scoring"}] and row["citations"][0]["page"] == 2
    assert store.list(text="MANUAL a", owner=ANY)[0]["id"] == a
    assert store.stats(owner="session:a")["total"] == 1 and store.stats()["by_product"]["brick"] >= 2
    assert store.count(owner=None) >= 1  # rows without an owner (the CLI)
    assert store.delete(a, owner="session:b") is False and store.delete(a, owner="session:a") is True


def test_history_on_sqlite(tmp_path):
    _exercise(HistoryStore(path=tmp_path / "h.sqlite3"))


def test_an_old_history_file_gains_the_new_columns(tmp_path):
    import sqlite3

    db = tmp_path / "old.sqlite3"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, created_at REAL NOT NULL, source TEXT NOT NULL, "
                "product TEXT, answer TEXT)")
    con.execute("INSERT INTO runs VALUES ('old-1', 1.0, 'cli', 'brick', 'kept')")
    con.commit()
    con.close()
    store = HistoryStore(path=db)
    assert store.get("old-1")["answer"] == "kept"
    store.record({"source": "app", "owner": "session:z", "answer": "new"})
    assert store.count(owner="session:z") == 1


def test_history_on_postgresql_shared_by_two_processes(pg_url):
    store = HistoryStore(url=pg_url)
    _exercise(store)
    # another process (a second app replica) writes; this one reads it, and the other way round
    code = ("import sys, json; sys.path.insert(0, %r)\n"
            "from stores.history import HistoryStore\n"
            "s = HistoryStore(url=%r)\n"
            "rid = s.record({'source': 'api', 'owner': 'session:replica', 'answer': 'from replica 2'})\n"
            "print(json.dumps({'id': rid, 'seen': [r['id'] for r in s.list(owner='session:mine')]}))") % (
        str(REPO), pg_url)
    mine = store.record({"source": "app", "owner": "session:mine", "answer": "from replica 1"})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["seen"] == [mine]
    assert store.get(res["id"], owner="session:replica")["answer"] == "from replica 2"
