"""Manual use cases: query the manual store, ingest a PDF, list and delete manuals.

One function per use case for every edge (``cli.py manual`` / ``ingest``, the app's
``/manual``, ``/ingest_manual``, ``/manuals``, ``/delete_manual`` and Manuals tab, and the
agent's manual-retrieval tool).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from core import catalog
from core.catalog import UnknownProductError, parse_defect
from core.errors import InputError
from core.text import strip_markup
from core.types import ManualPassage, ManualReport
from core.uploads import safe_name
from services.container import Services
from stores.manual_store import SECTIONS, detect_lang

log = logging.getLogger("dra.manuals")
Progress = Callable[[float, str], None] | None
#: ``(question, product id) -> passage``: writes a hypothetical manual passage answering the question (HyDE)
PassageWriter = Callable[[str, str], str]
MAX_K = 20


def safe_pdf_name(name: str | None) -> str:
    """A stored file name for an uploaded PDF (:func:`core.uploads.safe_name`, ending ``.pdf``)."""
    base = safe_name(name, default="manual.pdf")
    if not base.lower().endswith(".pdf"):
        base = f"{Path(base).stem or 'manual'}.pdf"
    return base


def manual_products(services: Services) -> list[str]:
    """Products that can filter a manual query: the catalog's and every product a manual was ingested under."""
    known = list(catalog.products())
    for doc in services.manuals.list_documents():
        p = doc.get("product")
        if p and p not in known:
            known.append(p)
    return known


def parse_manual_product(services: Services, value: str | None) -> str | None:
    """A product filter for manuals (:func:`core.catalog.parse_product` + ingested products).

    Raises:
        UnknownProductError: neither a catalog product nor one of an ingested manual.
    """
    if value is None or str(value).strip().lower() in catalog.NO_PRODUCT:
        return None
    pid = str(value).strip().lower()
    known = manual_products(services)
    if pid not in known:
        raise UnknownProductError(f"unknown product {value!r}; known products: {', '.join(known)}")
    return pid


def query_manual(services: Services, query: str, product: str | None = None, defect_type: str | None = None,
                 section: str | None = None, k: int = 4, *, previews: bool = False,
                 lang: str | None = None, write_passage: PassageWriter | None = None) -> ManualReport:
    """Most relevant manual passages for a question.

    With ``write_passage``, a product filter and an English query, the passage it writes for the
    question is ranked by too (HyDE: :meth:`stores.manual_store.ManualStore.query`'s ``passage``);
    the measured gain is with a product filter only (docs/benchmarks.md), so other queries skip it.
    A writer that fails or times out leaves the plain ranking (the report says why).

    Args:
        services: the process's services.
        query: the question (English or Korean).
        product: exact product filter (a catalog product or one a manual was ingested under).
        defect_type: exact defect filter (id, English or Korean name).
        section: ``cause`` | ``action`` | ``prevention`` | ``general`` (or empty / ``all``).
        k: passages, clamped to 1..20.
        previews: also render a PNG of each passage's page (``preview``).
        lang: ``en`` / ``ko`` to prefer a language (default: the query's).
        write_passage: ``(question, product) -> passage`` (e.g. :class:`agent.hyde.PassageWriter`), with a
            ``name`` attribute for the report.

    Returns:
        :class:`core.types.ManualReport`, passages best first; ``written_passage`` / ``passage_model`` say
        what the writer wrote (or why it wrote nothing).

    Raises:
        InputError: empty query, unknown section or defect type. UnknownProductError: unknown product.
    """
    if not query or not str(query).strip():
        raise InputError("the manual query is empty")
    sec = (section or "").strip().lower() or None
    if sec in ("all", "any"):
        sec = None
    if sec is not None and sec not in SECTIONS:
        raise InputError(f"unknown section {section!r}; one of {', '.join(SECTIONS)}")
    prod = parse_manual_product(services, product)
    defect = parse_defect(defect_type)
    store = services.manuals
    t0 = time.perf_counter()
    passage, passage_model = None, ""
    if write_passage is not None and prod and (lang or detect_lang(str(query))) == "en":
        try:
            passage = strip_markup(write_passage(str(query), prod)).strip() or None  # shown in the UI and JSON
            passage_model = _writer_name(write_passage)
        except Exception as exc:  # noqa: BLE001 - any writer failure leaves the plain ranking
            log.warning("HyDE passage not written (%s); plain ranking", exc)
            passage_model = f"{_writer_name(write_passage)} (no passage: {type(exc).__name__})"
    rows = store.query(str(query), product=prod, defect=defect, section=sec, k=max(1, min(int(k or 4), MAX_K)),
                       lang=lang, passage=passage)
    passages = [ManualPassage.from_row({**r, "text": strip_markup(r["text"])}) for r in rows]
    if previews:
        for p in passages:
            try:
                p.preview = str(store.render_page(p.source, p.page))
            except (FileNotFoundError, ValueError, RuntimeError):
                p.preview = None
    return ManualReport(query=str(query), passages=passages, model=store.model,
                        elapsed_ms=(time.perf_counter() - t0) * 1000.0, written_passage=passage,
                        passage_model=passage_model)


def _writer_name(writer: PassageWriter) -> str:
    """A passage writer's display name: its ``name`` (the model, once loaded), else the function's or class's."""
    return str(getattr(writer, "name", "") or getattr(writer, "__name__", "") or type(writer).__name__)


def list_manuals(services: Services) -> list[dict]:
    """Stored manuals ``[{"source", "product", "lang", "pages", "chunks", "title"}]``."""
    return services.manuals.list_documents()


def shipped_manuals(services: Services) -> set[str]:
    """File names of the manuals the sample data ships (its manifest's ``manuals``); empty without a manifest."""
    try:
        manifest = json.loads((Path(services.settings.data_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return set()
    return {Path(str(m.get("path", ""))).name for m in manifest.get("manuals") or [] if m.get("path")}


def _guard_shipped(services: Services, name: str, replace_shipped: bool, verb: str) -> None:
    if name in shipped_manuals(services) and not replace_shipped:
        raise InputError(f"{name!r} is a shipped manual: upload it under another file name, or confirm "
                         f"that you {verb} the shipped one (replace_shipped)")


def ingest_manual(services: Services, pdf: str | Path, product: str | None = None, *, name: str | None = None,
                  progress: Progress = None, replace_shipped: bool = False) -> dict:
    """Store a PDF under a safe name and ingest it into the manual store.

    The file is validated first (text extracted, page / chunk / time caps of
    :class:`stores.manual_store.IngestLimits`), then copied to
    ``<state_dir>/manual_files/<safe name>`` (kept for page previews); re-ingesting a
    name replaces that document atomically (:meth:`stores.manual_store.ManualStore.ingest_pdf`).

    Args:
        pdf: path of the PDF on this machine.
        product: product id for every chunk (lower-cased; any id: a manual may bring a new product).
        name: the stored file name (default: ``pdf``'s name), sanitised by :func:`safe_pdf_name`.

    Returns:
        ``{"documents": 1, "pages", "chunks", "source", "product", "langs"}``.

    Raises:
        InputError: a shipped manual's name (:func:`shipped_manuals`) without ``replace_shipped``;
            not a file, not a PDF, encrypted, no text, a bad product id, or over a cap
            (too many pages or chunks, ingestion too slow: :class:`stores.manual_store.ManualLimitError`).
    """
    src = Path(pdf)
    if not src.is_file():
        raise InputError(f"file not found: {src.name}")
    prod = (str(product).strip().lower() or None) if product else None
    if prod is not None and not all(c.isalnum() or c in "-_" for c in prod):
        raise InputError("product id: letters, digits, '-' or '_'")
    stored_name = safe_pdf_name(name or src.name)
    _guard_shipped(services, stored_name, replace_shipped, "replace")
    store = services.manuals
    try:
        store.check_pdf(src)  # validate (text, caps) before anything is copied or replaced
    except (ValueError, RuntimeError) as exc:
        raise InputError(str(exc).replace(src.name, stored_name)) from None
    dest_dir = store.files_dir
    dest_dir.mkdir(parents=True, exist_ok=True)
    staged = dest_dir / f".{stored_name}.{uuid.uuid4().hex[:8]}.part"
    shutil.copyfile(src, staged)
    try:
        # ingest from a file that already carries the final name (the source id), then publish it
        work = Path(services.settings.state_dir) / "cache" / "ingest" / uuid.uuid4().hex[:8]
        work.mkdir(parents=True, exist_ok=True)
        named = work / stored_name
        shutil.copyfile(staged, named)
        try:
            res = store.ingest_pdf(named, product=prod, progress=progress)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        staged.replace(dest_dir / stored_name)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    finally:
        staged.unlink(missing_ok=True)
    return res


def delete_manual(services: Services, source: str, *, replace_shipped: bool = False) -> dict:
    """Delete a stored manual's chunks and its uploaded copy; ``{"source", "removed_chunks"}``.

    Raises:
        InputError: no name, no stored manual of that name, or a shipped manual without
            ``replace_shipped`` (the operator's confirmation).
    """
    if not source or not str(source).strip():
        raise InputError("choose a manual to delete")
    store = services.manuals
    name = str(source).strip()
    _guard_shipped(services, name, replace_shipped, "delete")
    removed = store.delete_document(name)
    if removed == 0:
        raise InputError(f"no stored manual named {name!r}")
    copy = store.files_dir / safe_pdf_name(name)
    if copy.is_file() and copy.name == name:
        copy.unlink()
    return {"source": name, "removed_chunks": removed}
