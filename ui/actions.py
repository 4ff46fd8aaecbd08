"""What each app tab and API endpoint does, as plain functions with JSON-friendly results.

The Gradio layer (``app.py``) only maps components to these functions and turns
:class:`ActionError` into ``gr.Error``. Every function validates its input and raises
:class:`ActionError` with a message a person can act on; nothing here keeps state
between calls (per-session state lives in ``gr.State`` in the app).
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from core.catalog import UnknownProductError, check_product, defect_types, normalize_defect, products
from core.imageio import InvalidImageError, content_hash, load_rgb
from core.settings import get_settings
from ui.uploads import UploadError, check_upload, images_from_uploads, safe_name

Progress = Callable[[float, str], None] | None
AUTO = "auto (infer)"
SEARCH_MODES = ("auto", "image", "text", "fused")
NORMAL_REFERENCES = 6  # normal images of a fitted product added to the index (product inference)


class ActionError(ValueError):
    """Bad input or a state that prevents the action; the message is shown to the user."""


class SharedExclusiveLock:
    """Readers-writer lock (writer preferring) built on :class:`threading.Condition`.

    Why: building a PatchCore model traces its backbone with torch.fx, which patches
    ``torch.nn.Module.__call__`` for the whole process while it runs, so a forward pass
    in another thread at that moment fails. Every request that runs a vision model
    holds the lock shared; fitting a product (which builds models) holds it exclusive.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def shared(self):
        """Hold the lock shared for the ``with`` block (many at a time)."""
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        """Hold the lock alone for the ``with`` block (waits for running readers to finish)."""
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


MODEL_LOCK = SharedExclusiveLock()


def services():
    """The process's :class:`services.container.Services`."""
    from services.container import get_services

    return get_services()


def history():
    """The process's :class:`stores.history.HistoryStore`."""
    from stores.history import get_history

    return get_history()


def product_arg(value: str | None) -> str | None:
    """Dropdown / API value → product id, or None for "infer" / empty. Raises ActionError."""
    if value is None:
        return None
    v = str(value).strip()
    if not v or v.lower() in ("auto", AUTO, "none", "all", "any"):
        return None
    try:
        return check_product(v)
    except UnknownProductError as exc:
        raise ActionError(str(exc)) from None


def defect_arg(value: str | None) -> str | None:
    """Defect-type name (en / ko / id) → id, None for empty / "all". Raises ActionError if unknown."""
    if value is None or not str(value).strip() or str(value).strip().lower() in ("all", "any", "none", AUTO):
        return None
    d = normalize_defect(str(value))
    if d is None:
        raise ActionError(f"unknown defect type {value!r}; one of {', '.join(defect_types())}")
    return d


def load_upload_image(value, what: str = "image"):
    """Checked upload → RGB uint8 ``(H, W, 3)``. Raises ActionError with the reason."""
    try:
        return load_rgb(check_upload(value, what))
    except (UploadError, InvalidImageError) as exc:
        raise ActionError(str(exc)) from None


KEEP_INSPECT_RUNS = 200  # newest /inspect artifact folders kept on disk (older ones are pruned)


def _run_dir(prefix: str) -> Path:
    """A fresh per-call artifact folder; prunes the oldest ``<prefix>-*`` folders beyond ``KEEP_INSPECT_RUNS``."""
    runs = get_settings().runs_dir
    if runs.is_dir():
        old = sorted(runs.glob(f"{prefix}-*"))[:-KEEP_INSPECT_RUNS]
        for folder in old:
            shutil.rmtree(folder, ignore_errors=True)
    return runs / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------- inspect
def inspect(image, product: str | None = None) -> dict:
    """PatchCore anomaly scoring of one uploaded image (endpoint ``/inspect``, tab Inspect).

    Returns:
        ``{"product", "product_source" ("user" | "inferred"), "product_confidence",
        "score", "threshold", "is_anomalous", "verdict", "regions" [{bbox [x0,y0,x1,y1]
        px, area_frac 0..1, peak}], "model", "elapsed_ms", "image_sha256", "width",
        "height", "overlay", "heatmap", "comparison", "mask", "anomaly_map" (server paths)}``.

    Raises:
        ActionError: bad image, unknown product, empty index (cannot infer the product).
    """
    from models.patchcore.model import save_artifacts

    rgb = load_upload_image(image)
    prod = product_arg(product)
    svc = services()
    t0 = time.perf_counter()
    source, conf = "user", None
    with MODEL_LOCK.shared():
        if prod is None:
            try:
                prod, conf = svc.infer_product(rgb)
            except RuntimeError as exc:
                raise ActionError(str(exc)) from None
            source = "inferred"
        try:
            res = svc.patchcore.inspect(rgb, prod)
        except KeyError as exc:
            raise ActionError(str(exc)) from None
    files = save_artifacts(res, rgb, _run_dir("inspect"))
    return {
        "product": prod, "product_source": source,
        "product_confidence": None if conf is None else round(float(conf), 3),
        "score": round(float(res.score), 4), "threshold": round(float(res.threshold), 4),
        "is_anomalous": bool(res.is_anomalous), "verdict": "ANOMALOUS" if res.is_anomalous else "NORMAL",
        "regions": res.regions, "model": res.model,
        "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1),
        "image_sha256": content_hash(rgb), "width": int(rgb.shape[1]), "height": int(rgb.shape[0]),
        **files,
    }


# ---------------------------------------------------------------------------- search
def search(image=None, text: str | None = None, mode: str = "auto", product: str | None = None,
           defect_type: str | None = None, k: int = 5) -> dict:
    """Similar past defects by image, by text, or both (endpoint ``/search``, tab Search).

    Args:
        image: uploaded query image (optional).
        text: text query (optional), e.g. "crack on brick".
        mode: ``auto`` (whatever is given; both → fused), ``image``, ``text`` or ``fused``.
        product, defect_type: exact filters ("" / "all" for none).
        k: number of hits, 1..50.

    Returns:
        ``{"mode", "product", "defect_type", "k", "results": [{"id", "product",
        "defect_type", "score", "matched", "image", "note"}], "model", "elapsed_ms"}``.

    Raises:
        ActionError: neither image nor text, bad image, unknown filters, bad mode.
    """
    mode = (mode or "auto").strip().lower()
    if mode not in SEARCH_MODES:
        raise ActionError(f"unknown search mode {mode!r}; one of {', '.join(SEARCH_MODES)}")
    prod, defect = product_arg(product), defect_arg(defect_type)
    k = max(1, min(int(k or 5), 50))
    text = (text or "").strip() or None
    rgb = load_upload_image(image) if image not in (None, "") else None
    if rgb is None and text is None:
        raise ActionError("give an image, a text query, or both")
    if mode == "image" and rgb is None:
        raise ActionError("image search needs an image")
    if mode == "text" and text is None:
        raise ActionError("text search needs a text query")
    if mode == "fused" and (rgb is None or text is None):
        raise ActionError("fused search needs both an image and a text query")
    index = services().image_index
    t0 = time.perf_counter()
    if len(index) == 0:
        return {"mode": mode, "product": prod, "defect_type": defect, "k": k, "results": [],
                "model": index.model, "elapsed_ms": 0.0, "message": "the gallery is empty"}
    with MODEL_LOCK.shared():
        hits = _search_hits(index, rgb, text, mode, k, prod, defect)
    keep = ("id", "product", "defect_type", "score", "matched", "image", "note")
    results = [{key: (round(float(h[key]), 4) if key == "score" and h.get(key) is not None else h.get(key))
                for key in keep} for h in hits]
    return {"mode": mode, "product": prod, "defect_type": defect, "k": k, "results": results,
            "model": index.model, "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1)}


def _search_hits(index, rgb, text, mode, k, prod, defect) -> list[dict]:
    if callable(getattr(index, "query", None)):
        return index.query(image=rgb, text=text, mode=mode, k=k, product=prod, defect_type=defect)
    # an index without query(): image or text search only
    if rgb is not None and (mode in ("image", "fused") or text is None):
        return [{**h, "matched": "image"} for h in index.search(rgb, k=k, product=prod, defect_type=defect)]
    return index.search_text(text, k=k, product=prod, defect_type=defect)


# ---------------------------------------------------------------------------- manuals
def manual_query(query: str, product: str | None = None, defect_type: str | None = None,
                 section: str | None = None, k: int = 4, previews: bool = True) -> dict:
    """Manual passages with page previews (endpoint ``/manual``, tab Manuals).

    Returns:
        ``{"query", "results": [{"text", "source", "page", "section", "product", "defect",
        "lang", "score", "preview" (PNG path or None)}], "model", "elapsed_ms"}``.

    Raises:
        ActionError: empty query, unknown product / defect / section.
    """
    from stores.manual_store import SECTIONS

    if not query or not str(query).strip():
        raise ActionError("the manual query is empty")
    sec = (section or "").strip().lower() or None
    if sec in ("all", "any"):
        sec = None
    if sec is not None and sec not in SECTIONS:
        raise ActionError(f"unknown section {section!r}; one of {', '.join(SECTIONS)}")
    store = services().manuals
    t0 = time.perf_counter()
    hits = store.query(str(query), product=product_arg(product), defect=defect_arg(defect_type), section=sec,
                       k=max(1, min(int(k or 4), 20)))
    for h in hits:
        h["score"] = round(float(h["score"]), 4)
        h["preview"] = None
        if previews:
            try:
                h["preview"] = str(store.render_page(h["source"], h["page"]))
            except (FileNotFoundError, ValueError, RuntimeError):
                h["preview"] = None
    return {"query": str(query), "results": hits, "model": store.model,
            "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1)}


def list_manuals() -> list[dict]:
    """Stored manuals ``[{"source", "product", "lang", "pages", "chunks", "title"}]``."""
    return services().manuals.list_documents()


def ingest_manual(pdf, product: str | None = None, progress: Progress = None) -> dict:
    """Store an uploaded PDF under a safe name and ingest it (endpoint ``/ingest_manual``).

    The file is copied to ``<state_dir>/manual_files/<safe name>`` (the uploaded name is
    sanitised with :func:`ui.uploads.safe_name`); re-ingesting a name replaces the
    document atomically (see :meth:`stores.manual_store.ManualStore.ingest_pdf`).

    Returns:
        ``{"source", "pages", "chunks", "product", "langs", "documents" (list after ingest)}``.

    Raises:
        ActionError: no file, not a PDF, encrypted, image-only (no text), unknown product.
    """
    try:
        src = check_upload(pdf, "PDF")
    except UploadError as exc:
        raise ActionError(str(exc)) from None
    prod = product_arg(product)
    name = safe_name(src.name, default="manual.pdf")
    if not name.lower().endswith(".pdf"):
        name = f"{Path(name).stem or 'manual'}.pdf"
    store = services().manuals
    from stores.manual_store import extract_chunks

    try:
        extract_chunks(src)  # validate before anything is copied or replaced
    except ValueError as exc:
        raise ActionError(str(exc).replace(src.name, name)) from None
    dest_dir = store.files_dir
    dest_dir.mkdir(parents=True, exist_ok=True)
    staged = dest_dir / f".{name}.{uuid.uuid4().hex[:8]}.part"
    shutil.copyfile(src, staged)
    final = dest_dir / name
    try:
        # ingest from a file that already carries the final name (the source id), then publish it
        work = Path(get_settings().state_dir) / "cache" / "ingest" / uuid.uuid4().hex[:8]
        work.mkdir(parents=True, exist_ok=True)
        named = work / name
        shutil.copyfile(staged, named)
        try:
            res = store.ingest_pdf(named, product=prod, progress=progress)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        staged.replace(final)
    except ValueError as exc:
        raise ActionError(str(exc)) from None
    finally:
        staged.unlink(missing_ok=True)
    return {**res, "documents": store.list_documents()}


def delete_manual(source: str) -> dict:
    """Delete a stored manual's chunks and its uploaded copy; ``{"source", "removed_chunks"}``."""
    if not source or not str(source).strip():
        raise ActionError("choose a manual to delete")
    store = services().manuals
    name = str(source).strip()
    removed = store.delete_document(name)
    if removed == 0:
        raise ActionError(f"no stored manual named {name!r}")
    copy = store.files_dir / safe_name(name)
    if copy.is_file() and copy.name == name:
        copy.unlink()
    return {"source": name, "removed_chunks": removed}


# ---------------------------------------------------------------------------- gallery
def register_defect(image, product: str, defect_type: str, note: str = "") -> dict:
    """Add a labelled defect image to the gallery (endpoint ``/register_defect``).

    Returns:
        ``{"id", "duplicate", "product", "defect_type", "note", "image"}``.

    Raises:
        ActionError: bad image, missing / unknown product or defect type.
    """
    rgb = load_upload_image(image)
    prod = product_arg(product)
    if prod is None:
        raise ActionError("choose the product of the defect image")
    defect = defect_arg(defect_type)
    if defect is None:
        raise ActionError(f"choose the defect type ({', '.join(defect_types())})")
    note = str(note or "").strip()[:500]
    index = services().image_index
    with MODEL_LOCK.shared():
        if callable(getattr(index, "register", None)):
            return dict(index.register(rgb, prod, defect, note=note))
        item_id = content_hash(rgb)[:16]
        duplicate = index.get(item_id) is not None
        item_id = index.add(rgb, prod, defect, note=note, source="app")
    row = index.get(item_id) or {}
    return {"id": item_id, "duplicate": duplicate, "product": row.get("product"),
            "defect_type": row.get("defect_type"), "note": row.get("note"), "image": row.get("image")}


def relabel_defect(item_id: str, product: str | None = None, defect_type: str | None = None,
                   note: str | None = None) -> dict:
    """Change the product, defect type or note of a gallery item; returns its row.

    Raises:
        ActionError: unknown id, unknown product / defect type, or an index without relabel.
    """
    item_id = str(item_id or "").strip()
    if not item_id:
        raise ActionError("choose a gallery item")
    index = services().image_index
    if not callable(getattr(index, "relabel", None)):
        raise ActionError("this image index cannot relabel items")
    try:
        with MODEL_LOCK.shared():  # a new product re-embeds the item
            return dict(index.relabel(item_id, product=product_arg(product), defect_type=defect_arg(defect_type),
                                      note=None if note is None else str(note).strip()[:500]))
    except KeyError:
        raise ActionError(f"no gallery item {item_id!r}") from None


def delete_defect(item_id: str) -> dict:
    """Remove a gallery item; ``{"id", "deleted": True}``. Raises ActionError if unknown."""
    item_id = str(item_id or "").strip()
    if not item_id or not services().image_index.delete(item_id):
        raise ActionError(f"no gallery item {item_id!r}")
    return {"id": item_id, "deleted": True}


def gallery_items(product: str | None = None, defect_type: str | None = None, limit: int = 200) -> list[dict]:
    """Gallery rows ``[{"id", "product", "defect_type", "note", "image"}]`` with exact filters, newest last."""
    prod, defect = product_arg(product), defect_arg(defect_type)
    rows = [r for r in services().image_index.items()
            if (prod is None or r["product"] == prod) and (defect is None or r["defect_type"] == defect)]
    return rows[-int(limit):]


# ---------------------------------------------------------------------------- products
def fit_product(name: str, files, progress: Progress = None, val_fraction: float = 0.2,
                symmetry: str | None = "none") -> dict:
    """Add a product from normal images (files and / or zip archives) and fit its PatchCore bank.

    The images are stored as PNG under ``<state_dir>/products/<product>/train/`` (so the
    bank's nearest-normal references survive), split into training and validation
    normals (``val_fraction``, at least 2), fitted and calibrated with
    :meth:`models.patchcore.model.PatchCoreStore.fit` (memory bank written atomically), and
    up to ``NORMAL_REFERENCES`` training images are added to the image index as normal
    references so that product inference (``Services.infer_product``) can name the
    product. The product then appears in every product list and in the agent's tools.

    ``symmetry`` (:data:`models.patchcore.model.SYMMETRIES`: ``none``, ``mirror``, ``flips``,
    ``turns``; empty = ``none``) says under which mirrors / turns the product looks the
    same: the bank then also holds those views of the training images and every
    inspection averages the anomaly maps of those views (more accurate, one backbone
    pass per view).

    Returns:
        ``{"product", "n_train", "n_val", "skipped" [messages], "bank_size",
        "threshold", "pixel_threshold", "fit_s", "symmetry", "views", "products"}``.

    Raises:
        ActionError: bad product id or symmetry, fewer than 4 usable images, unreadable zip.
    """
    from core.imageio import save_png
    from models.patchcore.model import SYMMETRIES

    pid = str(name or "").strip().lower()
    if not pid or len(pid) > 40 or not all(c.isalnum() or c in "-_" for c in pid) or not pid[0].isalnum():
        raise ActionError("product id: 1-40 letters, digits, '-' or '_', starting with a letter or digit")
    sym = str(symmetry or "none").strip().lower()
    if sym not in SYMMETRIES:
        raise ActionError(f"symmetry must be one of {', '.join(SYMMETRIES)}, got {symmetry!r}")
    report = progress or (lambda _f, _m: None)
    report(0.0, "reading the uploaded images")
    try:
        images, skipped = images_from_uploads(files)
    except UploadError as exc:
        raise ActionError(str(exc)) from None
    if len(images) < 4:
        raise ActionError(f"need at least 4 readable normal images, got {len(images)}"
                          + (f" (skipped: {'; '.join(skipped[:5])})" if skipped else ""))
    n_val = max(2, int(round(len(images) * val_fraction)))
    train, val = images[: len(images) - n_val], images[len(images) - n_val:]
    folder = Path(get_settings().state_dir) / "products" / pid
    staging = folder.parent / f".{pid}-{uuid.uuid4().hex[:8]}"
    (staging / "train").mkdir(parents=True, exist_ok=True)
    paths = [str(save_png(rgb, staging / "train" / f"{i:04d}.png")) for i, rgb in enumerate(train)]
    final_paths = [str(folder / "train" / Path(p).name) for p in paths]
    svc = services()
    try:
        # the bank records the final paths; the images are published there only after a good fit
        report(0.03, "waiting for running inspections to finish")
        with MODEL_LOCK.exclusive():  # fit and the first load of the new bank build models (torch.fx)
            out = svc.patchcore.fit(pid, train, val, train_paths=final_paths, symmetry=sym,
                                    progress=lambda f, m: report(0.05 + 0.85 * f, m))
            meta = svc.patchcore.meta(pid)
        if folder.exists():
            old = folder.parent / f".old-{pid}-{uuid.uuid4().hex[:8]}"
            folder.replace(old)
            staging.replace(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.replace(folder)
    except ValueError as exc:
        raise ActionError(str(exc)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    index = svc.image_index
    if any(it["product"] == pid for it in index.items()):  # a refit: descriptors under the new maps
        report(0.9, "renewing the image index's defect descriptors")
        with MODEL_LOCK.shared():
            index.renew_descriptors(pid)
    report(0.92, "adding normal references to the image index")
    step = max(1, len(train) // NORMAL_REFERENCES)
    with MODEL_LOCK.shared():
        for rgb in train[::step][:NORMAL_REFERENCES]:
            index.add(rgb, pid, None, note="normal reference (product fit)", source="product-fit")
    report(1.0, f"{pid}: fitted")
    return {"product": pid, "n_train": len(train), "n_val": len(val), "skipped": skipped,
            "bank_size": out.get("bank_size"), "threshold": out.get("threshold"),
            "pixel_threshold": out.get("pixel_threshold"), "fit_s": out.get("fit_s"), "symmetry": sym,
            "views": int(meta.get("tta_views", 1)), "products": products()}


# ---------------------------------------------------------------------------- history
def history_list(product: str | None = None, defect_type: str | None = None, verdict: str | None = None,
                 text: str | None = None, limit: int = 100) -> dict:
    """Past analyses and statistics (endpoint ``/history``).

    Returns:
        ``{"runs": [...] (see :meth:`stores.history.HistoryStore.list`), "stats": {...}
        (see :meth:`stores.history.HistoryStore.stats`)}``.
    """
    v = (verdict or "").strip().upper() or None
    if v in ("ALL", "ANY"):
        v = None
    if v is not None and v not in ("ANOMALOUS", "NORMAL"):
        raise ActionError("verdict filter: ANOMALOUS, NORMAL or empty")
    store = history()
    prod = str(product).strip().lower() if product and str(product).strip().lower() not in ("all", AUTO) else None
    return {"runs": store.list(product=prod, defect_type=defect_arg(defect_type), verdict=v, text=text,
                               limit=max(1, min(int(limit or 100), 1000))),
            "stats": store.stats()}


def history_run(run_id: str) -> dict:
    """One stored analysis with its manual and tool calls. Raises ActionError if unknown."""
    row = history().get(str(run_id or "").strip())
    if row is None:
        raise ActionError(f"no analysis {run_id!r} in the history")
    return row


def export_manual(run_id: str, fmt: str) -> str:
    """Write the response manual of a run as ``md`` or ``pdf``; returns the file path.

    Raises:
        ActionError: unknown run or format.
    """
    from stores.history import manual_markdown, manual_pdf

    row = history_run(run_id)
    out_dir = Path(get_settings().state_dir) / "exports"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"response_manual_{safe_name(row['id'])}"
    if fmt == "md":
        path = out_dir / f"{stem}.md"
        tmp = out_dir / f".{stem}.{uuid.uuid4().hex[:6]}.tmp"
        tmp.write_text(manual_markdown(row), encoding="utf-8")
        tmp.replace(path)
        return str(path)
    if fmt == "pdf":
        return str(manual_pdf(row, out_dir / f"{stem}.pdf"))
    raise ActionError(f"unknown export format {fmt!r}: md or pdf")
