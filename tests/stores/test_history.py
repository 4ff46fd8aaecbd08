"""HistoryStore on a real SQLite file; Markdown and PDF export read back with pymupdf."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from services.history import manual_markdown, manual_pdf
from stores.history import HistoryStore

pymupdf = pytest.importorskip("pymupdf")

KO_ANSWER = ("## 결함 요약\n제품: brick. 결함 유형: crack. 판정: ANOMALOUS, 점수 31.2 / 임계값 25.0.\n"
             "## 즉시 조치\n- 해당 팔레트를 격리한다 [brick_manual_ko.pdf p.4]\n")


def _row(**kw) -> dict:
    base = {"source": "app", "image_sha256": "ab" * 32, "product": "brick", "product_source": "inferred",
            "defect_type": "crack", "verdict": "ANOMALOUS", "score": 31.2, "threshold": 25.0,
            "agent_model": "llamacpp:test.gguf", "models": {"agent": "llamacpp:test.gguf", "image_embedder": "x"},
            "tool_calls": [{"tool": "anomaly_scoring", "arguments": {}, "observation": "score=31.2",
                            "duration_s": 0.4, "error": None}],
            "citations": [{"source": "brick_manual_ko.pdf", "page": 4}], "timings": {"total_s": 3.5},
            "fallback": True, "fallback_reason": "no final answer", "elapsed_s": 3.5, "answer": KO_ANSWER,
            "question": "어떻게 해야 하나요?", "lang": "ko"}
    base.update(kw)
    return base


def test_record_get_list_filters_and_persistence(tmp_path):
    db = tmp_path / "history.sqlite3"
    store = HistoryStore(path=db)
    a = store.record(_row())
    b = store.record(_row(product="gravel", defect_type="stain", verdict="NORMAL", question="why?",
                          answer="## Defect summary\nnothing"))
    row = store.get(a)
    assert row["tool_calls"][0]["tool"] == "anomaly_scoring" and row["citations"] == [{"source": "brick_manual_ko.pdf",
                                                                                       "page": 4}]
    assert row["models"]["image_embedder"] == "x" and row["fallback"] is True and row["answer"] == KO_ANSWER
    assert [r["id"] for r in store.list()] == [b, a]  # newest first
    assert [r["id"] for r in store.list(product="brick")] == [a]
    assert [r["id"] for r in store.list(verdict="NORMAL")] == [b]
    assert [r["id"] for r in store.list(text="격리")] == [a]  # matches inside the manual
    assert store.list(product="brick", defect_type="stain") == []
    assert store.list()[1]["n_tool_calls"] == 1 and store.list()[1]["n_citations"] == 1
    # WAL journal, and a new object (a restarted app) sees the same rows
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = HistoryStore(path=db)
    assert again.count() == 2 and again.get(b)["product"] == "gravel"
    assert again.delete(b) and not again.delete(b) and again.count() == 1
    assert again.get("nope") is None


def test_stats_by_product_and_defect_type(tmp_path):
    store = HistoryStore(path=tmp_path / "h.sqlite3")
    for product, defect in [("brick", "crack"), ("brick", "crack"), ("brick", "stain"), ("grass", None)]:
        store.record(_row(product=product, defect_type=defect))
    s = store.stats()
    assert s["total"] == 4
    assert s["by_product"] == {"brick": 3, "grass": 1}
    assert s["by_defect_type"]["crack"] == 2 and s["by_defect_type"]["unknown"] == 1
    assert {"product": "brick", "defect_type": "crack", "runs": 2} in s["by_product_defect"]


def test_record_needs_source_and_ignores_unknown_columns(tmp_path):
    store = HistoryStore(path=tmp_path / "h.sqlite3")
    with pytest.raises(ValueError, match="source"):
        store.record({"product": "brick"})
    rid = store.record({"source": "cli", "product": "brick", "no_such_column": 1, "x; DROP TABLE runs": 2})
    assert store.get(rid)["product"] == "brick" and store.count() == 1


def test_concurrent_writers(tmp_path):
    store = HistoryStore(path=tmp_path / "h.sqlite3")
    errors = []

    def work(i):
        try:
            for j in range(10):
                store.record(_row(product=f"p{i}", question=f"q{j}"))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and store.count() == 60


def test_markdown_and_pdf_export_render_korean(tmp_path):
    store = HistoryStore(path=tmp_path / "h.sqlite3")
    run = store.get(store.record(_row()))
    md = manual_markdown(run)
    assert md.startswith("# Response manual") and "해당 팔레트를 격리한다 [brick_manual_ko.pdf p.4]" in md
    assert "ANOMALOUS" in md and "anomaly_scoring" in md and run["image_sha256"] in md
    pdf = manual_pdf(run, tmp_path / "out" / "manual.pdf")
    with pymupdf.open(pdf) as doc:
        text = "".join(page.get_text() for page in doc)
        fonts = {f[3] for page in doc for f in page.get_fonts()}
    # Korean and digits both come back from the PDF's text layer
    assert "해당 팔레트를 격리한다" in text and "brick_manual_ko.pdf p.4" in text and "31.2" in text
    assert any("CJK" in f or "Fallback" in f for f in fonts), fonts
    assert not list((tmp_path / "out").glob("*.tmp"))
