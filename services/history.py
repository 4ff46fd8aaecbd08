"""History use cases: list and read past analyses, export a run's response manual.

Exports: Markdown (:func:`manual_markdown`) and PDF (:func:`manual_pdf`, rendered by
pymupdf's ``Story`` HTML layout engine; Korean text uses the installed Noto Sans CJK
font, else MuPDF's built-in CJK fallback).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from core.catalog import parse_defect
from core.errors import InputError
from core.text import strip_markup
from services.container import Services
from stores.history import ANY

CJK_FONT_CANDIDATES = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/noto/NotoSansCJK-Regular.ttc",
)


def manual_markdown(run: dict) -> str:
    """The response manual of a run as a Markdown document with a header of run facts.

    The question and the answer pass :func:`core.text.strip_markup` (no images, links or HTML
    reach whoever opens the run)."""
    facts = [
        f"- Run: `{run.get('id')}` · {run.get('created', '')}",
        f"- Product: **{run.get('product') or 'unknown'}** ({run.get('product_source') or '-'}) · "
        f"defect type: **{run.get('defect_type') or 'unknown'}**",
    ]
    if run.get("verdict"):
        facts.append(f"- Verdict: **{run['verdict']}** (score {run.get('score')} vs threshold {run.get('threshold')})")
    if run.get("question"):
        facts.append(f"- Question: {strip_markup(run['question'])}")
    models = run.get("models") or {}
    if models:
        facts.append("- Models: " + ", ".join(f"{k} `{v}`" for k, v in models.items()))
    facts.append(f"- Image sha256: `{run.get('image_sha256') or '-'}`")
    calls = run.get("tool_calls") or []
    steps = "\n".join(f"{i + 1}. `{c.get('tool')}` ({float(c.get('duration_s') or 0):.2f} s)"
                      for i, c in enumerate(calls)) or "(none)"
    return (f"# Response manual\n\n{chr(10).join(facts)}\n\n---\n\n{strip_markup(run.get('answer')).strip()}\n\n"
            f"---\n\n### Tool calls\n\n{steps}\n")


def _cjk_font() -> str | None:
    for p in CJK_FONT_CANDIDATES:
        if Path(p).is_file():
            return p
    return None


def manual_pdf(run: dict, path: str | Path) -> Path:
    """Render :func:`manual_markdown` of a run to an A4 PDF at ``path`` (pymupdf ``Story``).

    Markdown is converted to HTML with markdown-it-py; Korean text renders with
    Noto Sans CJK (``fonts-noto-cjk``) when installed.

    Returns:
        the PDF path.
    """
    import pymupdf
    from markdown_it import MarkdownIt

    html = MarkdownIt("commonmark", {"html": False}).enable("table").render(manual_markdown(run))
    # Latin text in Nimbus Sans; glyphs it lacks (Hangul, CJK) come from the Noto Sans CJK
    # collection when installed, else from MuPDF's built-in Droid Sans Fallback. (Using the
    # .ttc as the primary family drops ASCII digits in MuPDF 1.26, so it is only a fallback.)
    font = _cjk_font()
    archive = pymupdf.Archive(str(Path(font).parent)) if font else None
    css = ("body {font-family: sans-serif, cjk; font-size: 10pt; line-height: 1.35;} "
           "h1 {font-size: 17pt;} h2 {font-size: 13pt;} code {font-size: 9pt;}")
    if font:
        css = f"@font-face {{font-family: cjk; src: url({Path(font).name});}} " + css
    story = pymupdf.Story(html=html, user_css=css, archive=archive)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}.tmp")
    writer = pymupdf.DocumentWriter(str(tmp))
    mediabox = pymupdf.paper_rect("a4")
    where = mediabox + (48, 48, -48, -48)
    more = True
    while more:
        dev = writer.begin_page(mediabox)
        more, _ = story.place(where)
        story.draw(dev)
        writer.end_page()
    writer.close()
    tmp.replace(path)
    return path




def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:100] or "run"


def history_list(services: Services, product: str | None = None, defect_type: str | None = None,
                 verdict: str | None = None, text: str | None = None, limit: int = 100, owner=ANY) -> dict:
    """Past analyses and statistics (of ``owner`` only unless :data:`stores.history.ANY`).

    Returns:
        ``{"runs": [...] (see :meth:`stores.history.HistoryStore.list`), "stats": {...}
        (see :meth:`stores.history.HistoryStore.stats`)}``.

    Raises:
        InputError: a bad verdict or defect filter.
    """
    v = (verdict or "").strip().upper() or None
    if v in ("ALL", "ANY"):
        v = None
    if v is not None and v not in ("ANOMALOUS", "NORMAL"):
        raise InputError("verdict filter: ANOMALOUS, NORMAL or empty")
    store = services.history
    prod = str(product).strip().lower() if product and str(product).strip().lower() not in (
        "all", "any", "auto", "auto (infer)") else None
    return {"runs": store.list(product=prod, defect_type=parse_defect(defect_type), verdict=v, text=text,
                               limit=max(1, min(int(limit or 100), 1000)), owner=owner),
            "stats": store.stats(owner=owner)}


def history_run(services: Services, run_id: str, owner=ANY) -> dict:
    """One stored analysis with its manual and tool calls (of ``owner`` only unless ANY).

    Raises:
        InputError: unknown run id (or another owner's: the same message, nothing leaks).
    """
    row = services.history.get(str(run_id or "").strip(), owner=owner)
    if row is None:
        raise InputError(f"no analysis {run_id!r} in the history")
    return row


def export_manual(services: Services, run_id: str, fmt: str, owner=ANY) -> Path:
    """Write the response manual of a run as ``md`` or ``pdf`` under ``<state>/exports``; returns the path.

    Raises:
        InputError: unknown run (or another owner's) or format.
    """
    row = history_run(services, run_id, owner)
    out_dir = Path(services.settings.state_dir) / "exports"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"response_manual_{_safe(row['id'])}"
    if fmt == "md":
        path = out_dir / f"{stem}.md"
        tmp = out_dir / f".{stem}.{uuid.uuid4().hex[:6]}.tmp"
        tmp.write_text(manual_markdown(row), encoding="utf-8")
        tmp.replace(path)
        return path
    if fmt == "pdf":
        return manual_pdf(row, out_dir / f"{stem}.pdf")
    raise InputError(f"unknown export format {fmt!r}: md or pdf")
