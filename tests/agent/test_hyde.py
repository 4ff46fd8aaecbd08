"""HyDE for manual retrieval (agent/hyde.py) with a real GGUF (SmolLM2-135M) and a real manual store."""

from __future__ import annotations

import dataclasses

import pytest

from tests.pdfs import text_pdf

from agent.hyde import MAX_TOKENS, PassageWriter, hyde_prompt
from agent.models import LlamaCppModel, smollm2_gguf_path
from core.settings import Settings
from services.container import Services
from services.manuals import ingest_manual, query_manual

pytest.importorskip("llama_cpp")

VALVE_PAGES = [
    "Valve manual. Scope: gate valves of the cooling line.\n\nSafety: close the line before any work.",
    "Packing leaks. When the stem packing leaks, tighten the gland nuts a quarter turn.\n\n"
    "If it still leaks, replace the packing rings.",
    "Stem lubrication. Grease the stem thread every 500 operating hours with lithium grease.",
]


@pytest.fixture(scope="module")
def writer() -> PassageWriter:
    return PassageWriter(model=LlamaCppModel(smollm2_gguf_path(), n_ctx=2048, n_threads=2, max_tokens=MAX_TOKENS))


class Recording:
    """Wraps a real writer and records what it was asked and wrote."""

    def __init__(self, inner: PassageWriter):
        self.inner, self.calls, self.name = inner, [], inner.name

    def __call__(self, question: str, product: str) -> str:
        out = self.inner(question, product)
        self.calls.append((question, product, out))
        return out


def test_prompt_names_the_product_manual():
    assert "the valve manual" in hyde_prompt("How do I stop a leak?", "valve")
    assert "How do I stop a leak?" in hyde_prompt("  How do I stop a leak?  ", "valve")
    assert "a software manual" in hyde_prompt("q", None)


def test_writer_writes_a_passage_with_the_real_model(writer):
    text = writer("How often should the valve stem be greased?", "valve")
    assert isinstance(text, str) and text.strip() and text == text.strip()
    assert writer("   ", "valve") == ""
    assert writer.name.endswith(".gguf")


def test_query_manual_ranks_by_the_written_passage_only_with_a_product(tmp_path, writer):
    svc = Services(dataclasses.replace(Settings.from_env(), state_dir=tmp_path / "state"))
    ingest_manual(svc, text_pdf(tmp_path / "valve.pdf", VALVE_PAGES), product="valve")
    rec = Recording(writer)
    rep = query_manual(svc, "the stem packing is leaking", product="valve", k=3, write_passage=rec)
    assert len(rec.calls) == 1 and rec.calls[0][:2] == ("the stem packing is leaking", "valve")
    out = rep.to_json()
    assert out["hyde"] == {"passage": rec.calls[0][2], "model": writer.name}
    # the store got that passage: the same ranking as asking the store with it directly
    direct = svc.manuals.query("the stem packing is leaking", product="valve", k=3, passage=rec.calls[0][2])
    assert [(p.source, p.page) for p in rep.passages] == [(r["source"], r["page"]) for r in direct]
    # no product filter, or a Korean query: no passage is written (the gain was measured with a filter only)
    for query, product in [("the stem packing is leaking", None), ("밸브 패킹이 샙니다", "valve")]:
        rep = query_manual(svc, query, product=product, k=3, write_passage=rec)
        assert "hyde" not in rep.to_json()
    assert len(rec.calls) == 1
    # a writer that fails leaves the plain ranking, and the report says why
    def broken(question, product):
        raise TimeoutError("deadline passed")

    # what the writer returns is cleaned like manual text (it reaches the UI and the JSON): no links or HTML
    def linking(question, product):
        return "Tighten the gland nuts, see [the guide](http://evil.example/x) <script>alert(1)</script>"

    rep = query_manual(svc, "the stem packing is leaking", product="valve", k=3, write_passage=linking)
    written = rep.to_json()["hyde"]["passage"]
    assert "http" not in written and "<script" not in written and "Tighten the gland nuts" in written
    rep = query_manual(svc, "the stem packing is leaking", product="valve", k=3, write_passage=broken)
    plain = query_manual(svc, "the stem packing is leaking", product="valve", k=3)
    assert rep.to_json()["hyde"] == {"passage": None, "model": "broken (no passage: TimeoutError)"}
    assert [(p.source, p.page) for p in rep.passages] == [(p.source, p.page) for p in plain.passages]
    assert "hyde" not in plain.to_json()
