"""ManualStore: real pymupdf PDFs written here, real Chroma on a tmp dir, real embedders."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.pdfs import text_pdf

from stores.manual_store import ManualStore, chunk_page, detect_lang, extract_chunks
from core.settings import Settings
from tests.chroma_server import ChromaServer

pymupdf = pytest.importorskip("pymupdf")

EN_PAGES = {
    "crack": ("4. Crack (균열)",
              "Firing the brick too fast in the kiln builds thermal stress that opens a fracture line.",
              "Quarantine the pallet and tap-test every neighbouring brick for hidden fractures.",
              "Lower the kiln heating ramp and keep the clay moisture below eight percent."),
    "stain": ("5. Stain (얼룩)",
              "Conveyor lubricant drips or rusty water mark the surface with a discoloured patch.",
              "Wipe the patch with a dry cloth and move the brick to the rework bay for cleaning.",
              "Fit drip trays under the conveyor rollers and cover stored pallets from rain."),
}
KO_PAGE = ("4. 균열 (Crack)",
           "가마에서 벽돌을 너무 빨리 가열하면 열응력이 생겨 균열이 발생한다.",
           "해당 팔레트를 격리하고 주변 벽돌을 모두 두드려 검사한다.",
           "가마 승온 속도를 낮추고 점토 수분을 8 퍼센트 이하로 유지한다.")


def _write_manual(path: Path, pages: list[tuple], lang: str, product: str = "brick", title: str = "Brick manual") -> Path:
    doc = pymupdf.open()
    heads = ("Cause", "Immediate action", "Prevention") if lang == "en" else ("원인", "즉시 조치", "예방")
    font = "helv" if lang == "en" else "korea"
    n = len(pages) + 1
    page = doc.new_page()
    page.insert_text((72, 72), title, fontname=font, fontsize=18)
    page.insert_text((72, 110), "Scope: inspection of clay facing bricks before shipping.", fontname=font)
    page.insert_text((72, 800), f"{title} — page 1 of {n}", fontname=font, fontsize=8)
    for i, (heading, cause, action, prevention) in enumerate(pages, start=2):
        page = doc.new_page()
        y = 72
        page.insert_text((72, y), heading, fontname=font, fontsize=14)
        for head, body in zip(heads, (cause, action, prevention)):
            y += 40
            page.insert_text((72, y), head, fontname=font, fontsize=12)
            y += 20
            page.insert_text((72, y), body, fontname=font, fontsize=9)
        page.insert_text((72, 800), f"{title} — page {i} of {n}", fontname=font, fontsize=8)
    doc.set_metadata({"title": title, "subject": product, "keywords": f"product={product};lang={lang}"})
    doc.save(path)
    doc.close()
    return path


@pytest.fixture()
def store(tmp_path) -> ManualStore:
    settings = dataclasses.replace(Settings.from_env(), state_dir=tmp_path / "state")
    return ManualStore(settings)


@pytest.fixture()
def en_pdf(tmp_path) -> Path:
    return _write_manual(tmp_path / "brick_manual_en.pdf", list(EN_PAGES.values()), "en")


@pytest.fixture()
def ko_pdf(tmp_path) -> Path:
    return _write_manual(tmp_path / "brick_manual_ko.pdf", [KO_PAGE], "ko", title="벽돌 품질 매뉴얼")


def test_chunk_page_sections_and_footer():
    text = "Brick manual\n4. Crack (균열)\nCause\nToo fast firing.\nImmediate action\nQuarantine.\nPrevention\nSlow ramp.\nBrick manual — page 3 of 7\n"
    chunks = chunk_page(text, 3)
    assert [c["section"] for c in chunks] == ["cause", "action", "prevention"]
    assert all(c["defect"] == "crack" and c["page"] == 3 for c in chunks)
    assert not any("page 3 of 7" in c["text"] for c in chunks)
    assert detect_lang("가마 승온 속도를 낮춘다") == "ko" and detect_lang("lower the kiln ramp") == "en"


def test_ingest_query_page_and_section(store, en_pdf):
    info = store.ingest_pdf(en_pdf)
    assert info["documents"] == 1 and info["pages"] == 3 and info["source"] == "brick_manual_en.pdf"
    assert info["chunks"] >= 6 and info["product"] == "brick"
    hits = store.query("why does the brick crack in the kiln", product="brick", section="cause", k=2)
    assert hits[0]["page"] == 2 and hits[0]["section"] == "cause" and hits[0]["defect"] == "crack"
    assert hits[0]["product"] == "brick" and hits[0]["source"] == "brick_manual_en.pdf"
    assert hits[0]["score"] >= hits[-1]["score"]
    # defect filter (Korean name accepted) narrows to the stain page
    hits = store.query("what to do right away", defect="얼룩", section="action", k=3)
    assert hits and all(h["defect"] == "stain" and h["page"] == 3 and h["section"] == "action" for h in hits)
    # no filter: the prevention chunk of the right page wins on content
    top = store.query("drip trays under conveyor rollers", k=1)[0]
    assert (top["page"], top["section"], top["defect"]) == (3, "prevention", "stain")
    # unknown product filter gives nothing
    assert store.query("crack", product="gravel") == []
    with pytest.raises(ValueError):
        store.query("crack", section="bogus")


def test_reingest_replaces_and_persists(store, en_pdf, tmp_path):
    first = store.ingest_pdf(en_pdf)
    n = store.count()
    again = store.ingest_pdf(en_pdf, product="brick")
    assert again["chunks"] == first["chunks"] and store.count() == n
    reopened = ManualStore(store.settings)
    assert reopened.count() == n
    docs = reopened.list_documents()
    assert [d["source"] for d in docs] == ["brick_manual_en.pdf"] and docs[0]["pages"] == 3
    assert reopened.delete_document("brick_manual_en.pdf") == n
    assert reopened.count() == 0 and reopened.list_documents() == []


def test_korean_manual_and_query(store, en_pdf, ko_pdf):
    store.ingest_pdf(en_pdf)
    info = store.ingest_pdf(ko_pdf)
    assert info["langs"] == ["ko"] and info["product"] == "brick"
    chunks, _ = extract_chunks(ko_pdf)
    assert any("열응력" in c["text"] for c in chunks)
    hits = store.query("벽돌 균열이 생기는 원인은?", product="brick", k=2)
    assert hits[0]["lang"] == "ko" and hits[0]["source"] == "brick_manual_ko.pdf"
    assert hits[0]["section"] == "cause" and hits[0]["defect"] == "crack" and hits[0]["page"] == 2
    hits = store.query("균열 예방 방법", section="prevention", k=1)
    assert "승온" in hits[0]["text"]
    docs = {d["source"]: d for d in store.list_documents()}
    assert docs["brick_manual_ko.pdf"]["lang"] == "ko" and docs["brick_manual_en.pdf"]["lang"] == "en"


def test_generic_pdf_paragraph_chunks(store, tmp_path):
    doc = pymupdf.open()
    for i in range(2):
        page = doc.new_page()
        page.insert_textbox(pymupdf.Rect(72, 72, 520, 760),
                            f"Section {i}. Hydraulic press maintenance.\n\nThe seal leaks are caused by worn O-rings and "
                            "overheating of the oil.\n\nPrevent recurrence: replace O-rings every 500 hours." * 3)
    path = tmp_path / "press.pdf"
    doc.save(path)
    doc.close()
    info = store.ingest_pdf(path, product="press")
    assert info["pages"] == 2 and info["chunks"] >= 2
    hits = store.query("why do seals leak", product="press", k=3)
    assert {h["page"] for h in hits} <= {1, 2} and hits[0]["source"] == "press.pdf"
    assert all(h["section"] in ("cause", "prevention", "general", "action") for h in hits)


def test_bad_pdfs_raise_clear_errors(store, tmp_path):
    blank = pymupdf.open()
    blank.new_page()
    blank.save(tmp_path / "scan.pdf")
    with pytest.raises(ValueError, match="no text could be extracted"):
        store.ingest_pdf(tmp_path / "scan.pdf")
    enc = pymupdf.open()
    enc.new_page().insert_text((72, 72), "secret")
    enc.save(tmp_path / "locked.pdf", encryption=pymupdf.PDF_ENCRYPT_AES_256, owner_pw="o", user_pw="u")
    with pytest.raises(ValueError, match="password"):
        store.ingest_pdf(tmp_path / "locked.pdf")
    (tmp_path / "fake.pdf").write_bytes(b"this is not a pdf")
    with pytest.raises(ValueError, match="not a readable PDF"):
        store.ingest_pdf(tmp_path / "fake.pdf")
    with pytest.raises(FileNotFoundError):
        store.ingest_pdf(tmp_path / "missing.pdf")
    assert store.count() == 0


def _long_pdf(path: Path, pages: int, topic: str) -> Path:
    doc = pymupdf.open()
    for i in range(pages):
        doc.new_page().insert_textbox(pymupdf.Rect(72, 72, 520, 760),
                                      f"Page {i + 1}. {topic} procedure step {i + 1}: inspect the seal and log it.")
    doc.save(path)
    doc.close()
    return path


_KILL_SCRIPT = """
import dataclasses, os, sys, time
sys.path.insert(0, {repo!r})
from stores.manual_store import ManualStore
from core.settings import Settings

store = ManualStore(dataclasses.replace(Settings.from_env(), state_dir=__import__("pathlib").Path({state!r})))

def progress(fraction, message):
    print("PROGRESS", fraction, flush=True)
    if fraction < 0.9:
        time.sleep(120)  # stay in the middle of the ingestion until the test kills us

store.ingest_pdf({pdf!r}, product="press", progress=progress)
print("DONE", flush=True)
"""


@pytest.mark.slow
def test_sigkill_mid_ingest_keeps_previous_document(store, tmp_path):
    """A real SIGKILL between two embedding batches: the previous version stays whole and usable."""
    import os
    import signal
    import subprocess
    import sys

    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    old_dir.mkdir()
    new_dir.mkdir()
    old_pdf = _long_pdf(old_dir / "press.pdf", 3, "Hydraulic press")
    first = store.ingest_pdf(old_pdf, product="press")
    before = store.list_documents()
    n = store.count()
    new_pdf = _long_pdf(new_dir / "press.pdf", 70, "Replacement pump")  # > 64 chunks: two batches
    code = _KILL_SCRIPT.format(repo=str(Path(__file__).resolve().parents[2]), state=str(store.settings.state_dir),
                               pdf=str(new_pdf))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("PROGRESS"):
                break
        else:
            pytest.fail("the ingesting subprocess ended before its first batch")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    reopened = ManualStore(store.settings)
    assert reopened.list_documents() == before and reopened.count() == n == first["chunks"]
    hits = reopened.query("hydraulic press seal", product="press", k=3)
    assert hits and all("Hydraulic press" in h["text"] for h in hits)
    # and the interrupted replacement can simply be done again
    again = reopened.ingest_pdf(new_pdf, product="press")
    assert again["chunks"] >= 70 and reopened.count() == again["chunks"]
    assert "Replacement pump" in reopened.query("pump procedure", product="press", k=1)[0]["text"]


def test_recover_drops_pending_and_superseded_generations(store, en_pdf):
    store.ingest_pdf(en_pdf)
    n = store.count()
    col = store._collection("en")
    got = col.get(include=["documents", "metadatas"])
    # what a killed ingest leaves: a pending generation, and an older live generation
    col.add(ids=[f"{i}-pending" for i in got["ids"][:3]], documents=got["documents"][:3],
            metadatas=[{**m, "gen": 2**62, "pending": True} for m in got["metadatas"][:3]])
    col.add(ids=[f"{i}-old" for i in got["ids"][:2]], documents=got["documents"][:2],
            metadatas=[{**m, "gen": 1, "pending": False} for m in got["metadatas"][:2]])
    fresh = ManualStore(store.settings)
    assert fresh.recover() == {"pending_removed": 3, "stale_removed": 2}
    assert fresh.count() == n and fresh.recover() == {"pending_removed": 0, "stale_removed": 0}


def test_render_page_preview(store, en_pdf):
    import shutil

    store.ingest_pdf(en_pdf)
    with pytest.raises(FileNotFoundError):
        store.render_page("brick_manual_en.pdf", 2)  # ingested from elsewhere: no stored copy
    store.files_dir.mkdir(parents=True)
    shutil.copy(en_pdf, store.files_dir / en_pdf.name)
    png = store.render_page("brick_manual_en.pdf", 2)
    from PIL import Image

    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (595, 842)  # A4 at 72 dpi
    assert store.render_page("brick_manual_en.pdf", 2) == png  # cached
    with pytest.raises(ValueError, match="page 9"):
        store.render_page("brick_manual_en.pdf", 9)
    assert store.pdf_path("../brick_manual_en.pdf") is None


# ----------------------------------------------------------------------------- retrieval (issue 15)
_generic_pdf = text_pdf


PUMP_PAGES = [
    "Installation. Mount the pump on a level concrete base and align the coupling.\n\n" * 3
    + "Anchor bolts must be tightened to the torque in the table.",
    "Seal replacement. The mechanical seal leaks when the faces are worn.\n\n"
    "Replace the seal: drain the casing, remove the impeller, fit the new seal.\n\n"
    "Seal faces must be kept clean; a leaking seal wastes water.\n\n" * 10,
    "Spare parts. Valve XJ-4471 is the pressure relief valve of the discharge line.\n\n"
    "Order spare parts with the serial number from the name plate.",
]


def test_hybrid_query_returns_distinct_pages(store, tmp_path):
    from stores.manual_store import RetrievalConfig

    _generic_pdf(tmp_path / "pump.pdf", PUMP_PAGES)
    info = store.ingest_pdf(tmp_path / "pump.pdf", product="pump")
    assert info["chunks"] > len(PUMP_PAGES)  # page 2 is several chunks
    for mode in ("hybrid", "dense", "bm25"):
        hits = store.query("how do I replace a leaking seal", k=3, retrieval=RetrievalConfig(mode=mode))
        assert hits[0]["page"] == 2, (mode, hits)
        pages = [(h["source"], h["page"]) for h in hits]
        assert len(pages) == len(set(pages)), (mode, pages)  # one passage per page
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        assert set(hits[0]) == {"text", "source", "page", "section", "product", "defect", "lang", "score"}
    # the store before issue 15 (dense chunks, pages may repeat) gave page 2 several times
    chunks = store.query("how do I replace a leaking seal", k=3,
                         retrieval=RetrievalConfig(mode="dense", distinct_pages=False))
    assert [h["page"] for h in chunks].count(2) >= 2
    # BM25 finds an exact part number; hybrid keeps it first
    assert store.query("XJ-4471", k=1, retrieval=RetrievalConfig(mode="bm25"))[0]["page"] == 3
    assert store.query("XJ-4471", k=1)[0]["page"] == 3
    # BM25 follows the filters too
    assert store.query("seal", product="other", retrieval=RetrievalConfig(mode="bm25")) == []


def test_bm25_index_follows_reingest_and_delete(store, tmp_path):
    from stores.manual_store import RetrievalConfig

    bm25 = RetrievalConfig(mode="bm25")
    _generic_pdf(tmp_path / "pump.pdf", PUMP_PAGES)
    store.ingest_pdf(tmp_path / "pump.pdf", product="pump")
    assert store.query("XJ-4471", k=1, retrieval=bm25)[0]["page"] == 3
    # same file name, same number of chunks, new text: the index must not keep the old one
    new = [p.replace("XJ-4471", "KV-9090") for p in PUMP_PAGES]
    (tmp_path / "v2").mkdir()
    _generic_pdf(tmp_path / "v2" / "pump.pdf", new)
    store.ingest_pdf(tmp_path / "v2" / "pump.pdf", product="pump")
    assert store.query("XJ-4471", k=3, retrieval=bm25) == []
    assert store.query("KV-9090", k=1, retrieval=bm25)[0]["page"] == 3
    store.delete_document("pump.pdf")
    assert store.query("KV-9090", k=3, retrieval=bm25) == []


# ----------------------------------------------------------------------------- caps (issue 16)
def test_chunk_and_time_caps(store, en_pdf, tmp_path):
    from stores.manual_store import IngestLimits, IngestTimeoutError, ManualLimitError, TooManyChunksError

    store.ingest_pdf(en_pdf)
    before, n = store.list_documents(), store.count()
    capped = ManualStore(store.settings, embedder=store.embedder, limits=IngestLimits(max_chunks=3))
    with pytest.raises(TooManyChunksError, match="more than 3 text chunks"):
        capped.ingest_pdf(en_pdf)
    slow = ManualStore(store.settings, embedder=store.embedder, limits=IngestLimits(max_seconds=0))
    with pytest.raises(IngestTimeoutError, match="0 s ingestion limit") as err:
        slow.ingest_pdf(en_pdf)
    assert isinstance(err.value, ManualLimitError) and isinstance(err.value, ValueError)
    assert store.list_documents() == before and store.count() == n  # the stored version is untouched


_MEMORY_SCRIPT = """
import dataclasses, json, pathlib, resource, shutil, sys
sys.path.insert(0, {repo!r})
from core.settings import Settings
from stores.manual_store import ManualLimitError, ManualStore, extract_chunks

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

store = ManualStore(dataclasses.replace(Settings.from_env(), state_dir=pathlib.Path({state!r})))
store.files_dir.mkdir(parents=True, exist_ok=True)
shutil.copy({huge!r}, store.files_dir / "huge.pdf")
out = {{"base_mib": peak_mib()}}
try:
    extract_chunks({many!r})
except ManualLimitError as exc:
    out["pages_error"] = str(exc)
out["chunks_of_huge_page"] = len(extract_chunks({huge!r})[0])  # text of a huge page: no pixels involved
try:
    store.render_page("huge.pdf", 1)
except ManualLimitError as exc:
    out["preview_error"] = str(exc)
out["peak_mib"] = peak_mib()
print(json.dumps(out))
"""


def test_many_pages_and_huge_page_fail_clearly_with_bounded_memory(tmp_path):
    """2001 pages: refused before any page is read. A 14400 pt square page (the PDF maximum) would be a
    207-megapixel, 622 MB RGB preview at zoom 1: refused before rendering. Peak RSS of a real process is checked."""
    import json
    import subprocess
    import sys

    many = pymupdf.open()
    for _ in range(2001):
        many.new_page(width=200, height=200)
    many.save(tmp_path / "many.pdf")
    many.close()
    huge = pymupdf.open()
    huge.new_page(width=14400, height=14400).insert_text((72, 72), "Huge poster page: torque table", fontsize=40)
    huge.save(tmp_path / "huge.pdf")
    huge.close()
    code = _MEMORY_SCRIPT.format(repo=str(Path(__file__).resolve().parents[2]), state=str(tmp_path / "state"),
                                 many=str(tmp_path / "many.pdf"), huge=str(tmp_path / "huge.pdf"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "many.pdf has 2001 pages; at most 2000 pages per PDF" in out["pages_error"]
    assert "over the 16,000,000 pixel preview limit" in out["preview_error"] and "14400x14400" in out["preview_error"]
    assert out["chunks_of_huge_page"] >= 1
    assert out["peak_mib"] - out["base_mib"] < 150, out  # an uncapped render alone needs ~600 MiB


# ----------------------------------------------------------------------------- Chroma server (issue 16)
@pytest.fixture()
def chroma_server(tmp_path):
    """A real ``chroma run`` server on 127.0.0.1 (:class:`tests.chroma_server.ChromaServer`), stopped afterwards."""
    server = ChromaServer(tmp_path / "chroma-server")
    try:
        yield server.start()
    finally:
        server.stop()


def _settings_with_chroma_url(state_dir: Path, url: str) -> Settings:
    """Settings pointing at a Chroma server (``chroma_url``; a subclass while core.settings lacks the field)."""
    base = dataclasses.replace(Settings.from_env(), state_dir=state_dir)
    if "chroma_url" in {f.name for f in dataclasses.fields(Settings)}:
        return dataclasses.replace(base, chroma_url=url)

    @dataclasses.dataclass(frozen=True)
    class ServerSettings(Settings):
        chroma_url: str = ""

    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name != "model_resolution"}
    return ServerSettings(**values, chroma_url=url)


def test_chroma_server_second_replica_sees_first_ones_manual(chroma_server, tmp_path, en_pdf):
    from stores.manual_store import RetrievalConfig

    first = ManualStore(_settings_with_chroma_url(tmp_path / "replica1", chroma_server))
    second = ManualStore(_settings_with_chroma_url(tmp_path / "replica2", chroma_server), embedder=first.embedder)
    assert first.backend == f"chroma-server {chroma_server}"
    assert second.list_documents() == [] and second.query("crack", k=2) == []
    info = first.ingest_pdf(en_pdf)
    # nothing on the local disk of either replica: the chunks live on the server
    assert not (tmp_path / "replica1" / "chroma").exists() and not (tmp_path / "replica2" / "chroma").exists()
    docs = second.list_documents()
    assert [d["source"] for d in docs] == ["brick_manual_en.pdf"] and docs[0]["chunks"] == info["chunks"]
    top = second.query("why does the brick crack in the kiln", product="brick", section="cause", k=1)[0]
    assert (top["source"], top["page"], top["defect"]) == ("brick_manual_en.pdf", 2, "crack")
    # the second replica's BM25 index is built from the server and follows the first one's writes
    bm25 = RetrievalConfig(mode="bm25")
    assert second.query("drip trays", k=1, retrieval=bm25)[0]["page"] == 3
    _generic_pdf(tmp_path / "pump.pdf", PUMP_PAGES)
    first.ingest_pdf(tmp_path / "pump.pdf", product="pump")
    assert second.query("XJ-4471", k=1, retrieval=bm25)[0]["source"] == "pump.pdf"
    assert first.delete_document("pump.pdf") > 0
    assert second.query("XJ-4471", k=3, retrieval=bm25) == []
    # our embedding function is the collection's (chromadb's default ONNX model is never used)
    col = second._collection("en", create=False)
    assert col.configuration_json["embedding_function"]["name"] == "dra_text_embedder"


def test_chroma_server_recover_spares_another_replicas_ingestion(chroma_server, tmp_path, en_pdf):
    """On a shared server a starting replica must not drop the pending chunks of an ingestion running elsewhere;
    pending chunks older than 1.5 x the ingestion time cap are from a dead writer and go."""
    import time

    first = ManualStore(_settings_with_chroma_url(tmp_path / "replica1", chroma_server))
    first.ingest_pdf(en_pdf)
    n = first.count()
    col = first._collection("en")
    got = col.get(include=["documents", "metadatas"], limit=2)
    running, dead = time.time_ns(), 1
    col.add(ids=[f"{i}-running" for i in got["ids"]], documents=got["documents"],
            metadatas=[{**m, "gen": running, "pending": True} for m in got["metadatas"]])
    col.add(ids=[f"{i}-dead" for i in got["ids"]], documents=got["documents"],
            metadatas=[{**m, "gen": dead, "pending": True} for m in got["metadatas"]])
    second = ManualStore(_settings_with_chroma_url(tmp_path / "replica2", chroma_server), embedder=first.embedder)
    assert second.recover() == {"pending_removed": 2, "stale_removed": 0}
    assert second.count() == n + 2  # the running ingestion's chunks are still there ...
    assert second.list_documents() == first.list_documents()  # ... and invisible to readers
    assert all(h["text"] for h in second.query("crack", k=3))


def test_section_titles_from_outline_and_navigation_pages_skipped(store, tmp_path):
    from stores.manual_store import RetrievalConfig, is_navigation_page

    contents = "\n".join(f"{i}.{j} Topic number {i}{j} . . . . . . . . . . . {10 * i + j}"
                         for i in range(1, 4) for j in range(1, 5))
    assert is_navigation_page(contents) and not is_navigation_page(PUMP_PAGES[1])
    path = _generic_pdf(tmp_path / "pump.pdf", [contents + "\nSeal replacement . . . . . . . 3"] + PUMP_PAGES)
    doc = pymupdf.open(path)
    doc.set_toc([[1, "Contents", 1], [1, "Pump service", 2], [2, "Mounting the pump", 2],
                 [2, "Replacing the mechanical seal", 3], [2, "Spare parts", 4]])
    doc.saveIncr()
    doc.close()
    chunks, _ = extract_chunks(path)
    seal = [c for c in chunks if c["page"] == 3]
    assert seal and all(c["text"].startswith("Pump service › Replacing the mechanical seal\n") for c in seal)
    assert all(c.get("nav") for c in chunks if c["page"] == 1) and not any(c.get("nav") for c in seal)
    assert extract_chunks(path, section_titles=False)[0][2]["text"].startswith("Seal replacement.")
    store.ingest_pdf(path, product="pump")
    for mode in ("hybrid", "bm25", "dense"):  # the contents page names "seal replacement" but answers nothing
        pages = [h["page"] for h in store.query("seal replacement", k=4, retrieval=RetrievalConfig(mode=mode))]
        assert 1 not in pages and pages[0] == 3, (mode, pages)
    with_nav = store.query("seal replacement", k=4, retrieval=RetrievalConfig(mode="bm25", skip_navigation=False))
    assert 1 in [h["page"] for h in with_nav]


def test_written_passage_ranks_by_the_manuals_words(store, tmp_path):
    """HyDE (``query(passage=...)``): a question in the user's words misses the page that a passage in the
    manual's words finds first; an exact part number is still found with a passage; the filters still hold."""
    from stores.manual_store import RetrievalConfig

    pages = PUMP_PAGES + [
        "Flow curves. The head falls as the flow rises; read the duty point where the system curve crosses the "
        "pump curve.\n\nNet positive suction head: keep NPSH available above NPSH required or the pump cavitates."]
    _generic_pdf(tmp_path / "pump.pdf", pages)
    store.ingest_pdf(tmp_path / "pump.pdf", product="pump")
    question = "why is my pump making a gravel-like noise at the inlet?"
    assert store.query(question, product="pump", k=1)[0]["page"] != 4
    passage = "The pump cavitates when the net positive suction head available (NPSH) falls below the NPSH required."
    hits = store.query(question, product="pump", k=3, passage=passage)
    assert hits[0]["page"] == 4, hits
    assert len({h["page"] for h in hits}) == 3
    # the passage ranks by passage_mode (dense by default); a blank passage leaves the question's ranking
    assert RetrievalConfig().passage_mode == "dense"
    assert store.query(question, product="pump", k=3, passage="  ") == store.query(question, product="pump", k=3)
    assert store.query("XJ-4471", product="pump", k=1,
                       passage="Part XJ-4471 is a spare part; order it with the serial number.")[0]["page"] == 3
    assert store.query(question, product="other", passage=passage) == []
    with pytest.raises(ValueError, match="unknown retrieval mode"):
        RetrievalConfig(passage_mode="rerank")
