"""SessionStore: chat sessions and turns in the app's database (real SQLite files, a real second process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.settings import Settings
from stores.sessions import ANY, SessionStore

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def store(tmp_path) -> SessionStore:
    return SessionStore(Settings.from_env({}, state_dir=tmp_path / "state"))


def _photo(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (32, 40, 3), dtype=np.uint8)


def test_create_get_latest_and_owners(store):
    a = store.create("alice", lang="ko")
    b = store.create("bob")
    assert a["id"] != b["id"] and a["n_turns"] == 0 and a["facts"] == {} and a["passages"] == []
    assert store.get(a["id"])["lang"] == "ko"
    assert store.get(a["id"], owner="bob") is None and store.get(a["id"], owner="alice")["id"] == a["id"]
    later = store.create("alice", session_id="alice-2")
    store.add_turn(later["id"], {"question": "hi", "answer": "hello"})
    assert store.latest("alice")["id"] == "alice-2"
    assert store.latest("nobody") is None
    assert {s["id"] for s in store.list(owner="alice")} == {a["id"], "alice-2"}
    assert store.count(ANY) == 3 and store.count("bob") == 1
    with pytest.raises(ValueError, match="exists already"):
        store.create("alice", session_id="alice-2")
    with pytest.raises(ValueError, match="session id"):
        store.create("alice", session_id="../etc/passwd")


def test_turns_state_undo_and_feedback(store):
    sid = store.create("cli", session_id="s1")["id"]
    path, sha = store.save_photo(sid, _photo(0))
    assert path.is_file() and path.parent.name == sid and len(sha) == 64
    assert store.save_photo(sid, _photo(0)) == (path, sha)  # the same pixels are stored once
    first = {"inspection": {"score": 3.0, "is_anomalous": True}, "defect_type": "crack"}
    passages = [{"label": "P1", "source": "brick_manual_en.pdf", "page": 4, "section": "cause", "text": "x"}]
    i0 = store.add_turn(sid, {"question": "analyse this", "answer": "## Defect summary ...", "kind": "manual",
                              "image_sha256": sha, "steps": [{"tool": "anomaly_scoring"}],
                              "citations": [{"source": "brick_manual_en.pdf", "page": 4}],
                              "messages": [{"role": "user", "content": "[photo attached]"}], "fallback": False},
                        {"photo_path": str(path), "photo_sha256": sha, "photo_name": "a.png", "product": "brick",
                         "product_source": "inferred", "product_confidence": 1.0, "facts": first,
                         "passages": passages})
    path2, sha2 = store.save_photo(sid, _photo(1))
    i1 = store.add_turn(sid, {"question": "and this one?", "answer": "normal", "kind": "verdict"},
                        {"photo_path": str(path2), "photo_sha256": sha2, "facts": {"inspection": {"score": 1.0}}})
    assert (i0, i1) == (0, 1)
    s = store.get(sid)
    assert s["n_turns"] == 2 and s["photo_sha256"] == sha2 and s["title"] == "analyse this"
    turns = store.turns(sid)
    assert [t["idx"] for t in turns] == [0, 1] and turns[0]["steps"] == [{"tool": "anomaly_scoring"}]
    assert turns[0]["citations"][0]["page"] == 4 and turns[0]["fallback"] is False
    assert turns[1]["before"]["photo_sha256"] == sha  # the state the second turn replaced

    assert store.set_feedback(sid, 0, "dislike") and store.turns(sid)[0]["feedback"] == "dislike"
    assert not store.set_feedback(sid, 7, "like")
    with pytest.raises(ValueError):
        store.set_feedback(sid, 0, "meh")

    popped = store.pop_turn(sid)  # undo: the first photo and its facts are back
    assert popped["question"] == "and this one?"
    s = store.get(sid)
    assert s["n_turns"] == 1 and s["photo_sha256"] == sha and s["facts"] == first and s["passages"] == passages
    assert store.pop_turn(sid)["idx"] == 0 and store.get(sid)["photo_path"] is None
    assert store.pop_turn(sid) is None

    assert store.delete(sid) and not path.parent.exists() and store.get(sid) is None
    with pytest.raises(KeyError):
        store.add_turn(sid, {"question": "x"})


def test_a_session_survives_a_new_process(tmp_path):
    """A conversation written by one process is read by another (CLI follow-ups, app restarts)."""
    state = tmp_path / "state"
    code = (
        "import sys, json; sys.path.insert(0, %r)\n"
        "from core.settings import Settings\n"
        "from stores.sessions import SessionStore\n"
        "s = SessionStore(Settings.from_env({}, state_dir=%r))\n"
        "sid = s.create('cli', session_id='persist')['id']\n"
        "s.add_turn(sid, {'question': 'What causes cracks?', 'answer': 'Thermal shock [brick_manual_en.pdf p.4]'},"
        " {'passages': [{'label': 'P1', 'source': 'brick_manual_en.pdf', 'page': 4}]})\n"
        "print(json.dumps(s.get(sid)['n_turns']))\n" % (str(REPO), str(state))
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == 1
    store = SessionStore(Settings.from_env({}, state_dir=state))
    s = store.get("persist", owner="cli")
    assert s["n_turns"] == 1 and s["passages"][0]["label"] == "P1"
    assert store.turns("persist")[0]["answer"].startswith("Thermal shock")
