"""ManualStore: real pymupdf PDFs written here, real Chroma on a tmp dir, real embedders."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from stores.manual_store import ManualStore, chunk_page, detect_lang, extract_chunks
from core.settings import Settings

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
