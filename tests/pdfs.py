"""Test helper: small text PDFs written with pymupdf (one text box per page)."""

from __future__ import annotations

from pathlib import Path


def text_pdf(path: Path, pages: list[str]) -> Path:
    """Write ``pages`` (one string each, 9 pt) as a PDF with a text layer at ``path``; returns ``path``."""
    import pymupdf

    doc = pymupdf.open()
    for text in pages:
        doc.new_page().insert_textbox(pymupdf.Rect(50, 50, 560, 800), text, fontsize=9)
    doc.save(path)
    doc.close()
    return path
