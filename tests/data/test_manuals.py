"""Tests for the manual PDFs (data/manuals.py): structure, footers, metadata, text round trip."""

from __future__ import annotations

import re
from pathlib import Path

import pymupdf
import pytest

from data import manuals
from core.settings import DEFECT_TYPES, PRODUCTS


def _collapse(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("manuals")
    entries = manuals.write_manuals(out)
    return out, entries


def _open(out: Path, entry: dict) -> pymupdf.Document:
    return pymupdf.open(out / entry["path"])


def test_files_and_entries(written):
    out, entries = written
    assert [(e["product"], e["lang"]) for e in entries] == [
        ("brick", "en"), ("brick", "ko"), ("gravel", "en"), ("grass", "en")]
    assert {e["product"] for e in entries if e["lang"] == "en"} == set(PRODUCTS)
    for e in entries:
        assert e["path"] == f"manuals/{e['product']}_manual_{e['lang']}.pdf"
        with _open(out, e) as doc:
            assert doc.page_count == e["pages"] >= 7
            assert doc.metadata["title"] == e["title"]
            assert doc.metadata["subject"] == e["product"]
            assert doc.metadata["keywords"] == f"product={e['product']};lang={e['lang']}"


def test_defect_pages_have_heading_and_subsections(written):
    out, entries = written
    for e in entries:
        sub = manuals.SUBHEADINGS[e["lang"]]
        with _open(out, e) as doc:
            texts = [p.get_text() for p in doc]
        for d in DEFECT_TYPES:
            heading = manuals.defect_heading(d, e["lang"])
            pages = [t for t in texts if heading in t.splitlines()]
            assert len(pages) == 1, (e["path"], heading)
            lines = [ln.strip() for ln in pages[0].splitlines()]
            positions = [lines.index(h) for h in sub]  # each sub-heading on its own line
            assert positions == sorted(positions), (e["path"], d)


def test_crack_heading_numbering(written):
    assert manuals.defect_heading("crack", "en") == "4. Crack (균열)"
    assert manuals.defect_heading("crack", "ko") == "4. 균열 (Crack)"
    out, entries = written
    with _open(out, entries[0]) as doc:
        assert "4. Crack (균열)" in doc[3].get_text().splitlines()


def test_footer_on_every_page(written):
    out, entries = written
    for e in entries:
        with _open(out, e) as doc:
            n = doc.page_count
            for i, page in enumerate(doc, start=1):
                assert f"{e['title']} — page {i} of {n}" in page.get_text(), (e["path"], i)


@pytest.mark.parametrize("product,lang", [("brick", "ko"), ("brick", "en"), ("grass", "en")])
def test_written_text_round_trips(written, product, lang):
    """Every block written to a page comes back from page.get_text() unchanged (modulo line wrapping)."""
    out, _ = written
    planned = manuals.manual_pages(product, lang)
    with pymupdf.open(out / f"manuals/{product}_manual_{lang}.pdf") as doc:
        assert doc.page_count == len(planned)
        for page, blocks in zip(doc, planned):
            text = _collapse(page.get_text())
            for _, block in blocks:
                assert _collapse(block) in text, (page.number + 1, block)


def test_korean_text_is_korean(written):
    out, _ = written
    with pymupdf.open(out / "manuals/brick_manual_ko.pdf") as doc:
        text = "".join(p.get_text() for p in doc)
    hangul = re.findall(r"[\uac00-\ud7af]", text)
    assert len(hangul) > 1500
    for word in ("원인", "즉시 조치", "예방", "균열", "스크래치", "구멍", "얼룩", "이물질", "석회 팽창 파열"):
        assert word in text


def test_content_is_product_specific():
    for d in DEFECT_TYPES:
        for key in ("cause", "action", "prevention"):
            seen: set[str] = set()
            for product in PRODUCTS:
                lines = manuals.manual_content(product, "en")["defects"][d][key]
                assert len(lines) >= 2
                assert not seen & set(lines), (d, key, product)
                seen |= set(lines)
    assert manuals.manual_content("brick", "ko")["defects"].keys() == set(DEFECT_TYPES)


def test_unknown_manual_raises(tmp_path):
    with pytest.raises(KeyError):
        manuals.write_manual(tmp_path / "x.pdf", "gravel", "ko")
