"""Similar-defect image index: FAISS inner-product search over L2-normalised embeddings.

Layout in ``Settings.index_dir``::

    index.faiss          faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), int64 ids
    items.json           {"version", "model", "dim", "next_fid", "manifest_fingerprint",
                          "items": {item_id: {"fid", "product", "defect_type", "note", "source", "image"}}}
    normal_means.npz     per-product mean raw image feature of training normals (optional)
    images/<hash16>.png  a copy of every indexed image

Item ids are the first 16 hex digits of the image's content hash (same pixels,
same id). Every write goes to a temp file first and is moved into place with
``os.replace``. One ``threading.RLock`` serialises all access (Gradio threads).

Embedding: with the default offline image embedder, :class:`stores.embedders.DefectAwareEmbedder`
(global descriptor + deviation from the product's mean normal feature), so the
nearest items share the defect type, not only the texture.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from stores.embedders import (DefectAwareEmbedder, ImageEmbedder, embed_queries, get_image_embedder,
                              get_text_embedder, l2_normalize)
from stores.imageio import content_hash, load_rgb, save_png
from stores.settings import Settings, get_settings

INDEX_VERSION = 1
Progress = Callable[[float, str], None] | None


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load_manifest(data_dir: Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest at {path}: build the sample data first (python cli.py build)")
    return json.loads(path.read_text(encoding="utf-8"))


class ImageIndex:
    """Persistent, thread-safe similar-defect image index (FAISS ``IndexFlatIP`` in ``IndexIDMap2``).

    Args:
        settings: paths (``settings.index_dir``); default ``get_settings()``.
        embedder: an :class:`~stores.embedders.ImageEmbedder`; default
            ``get_image_embedder()`` wrapped in :class:`~stores.embedders.DefectAwareEmbedder`
            when it exposes raw features.

    Scores are cosine similarities in [-1, 1], higher = closer.
    """

    def __init__(self, settings: Settings | None = None, embedder: ImageEmbedder | None = None):
        self.settings = settings or get_settings()
        self.dir = Path(self.settings.index_dir)
        self.images_dir = self.dir / "images"
        self._faiss_path = self.dir / "index.faiss"
        self._meta_path = self.dir / "items.json"
        self._normals_path = self.dir / "normal_means.npz"
        self._lock = threading.RLock()
        self._caption_cache: dict[str, np.ndarray] = {}
        base = embedder if embedder is not None else get_image_embedder()
        self._base = base
        normal_means = self._read_normal_means()
        if callable(getattr(base, "raw", None)) and not isinstance(base, DefectAwareEmbedder):
            self.embedder = DefectAwareEmbedder(base, normal_means)
        else:
            self.embedder = base
        self._load()

    # ------------------------------------------------------------------ persistence
    @property
    def model(self) -> str:
        """Name of the embedder that produced the stored vectors."""
        return self.embedder.name

    def _read_normal_means(self) -> dict[str, np.ndarray]:
        if not self._normals_path.is_file():
            return {}
        with np.load(self._normals_path) as z:
            return {k: z[k].astype(np.float32) for k in z.files}

    def _empty_meta(self) -> dict:
        return {"version": INDEX_VERSION, "model": self.embedder.name, "dim": int(self.embedder.dim),
                "next_fid": 0, "manifest_fingerprint": None, "items": {}}

    def _new_faiss(self):
        return faiss.IndexIDMap2(faiss.IndexFlatIP(int(self.embedder.dim)))

    def _load(self) -> None:
        with self._lock:
            if self._meta_path.is_file() and self._faiss_path.is_file():
                meta = json.loads(self._meta_path.read_text(encoding="utf-8"))
                index = faiss.read_index(str(self._faiss_path))
                if meta.get("model") != self.embedder.name or int(meta.get("dim", -1)) != int(self.embedder.dim) \
                        or index.ntotal != len(meta["items"]):
                    # another embedder (or a torn write): re-embed the stored images
                    self.meta, self.index = meta, index
                    self._reembed_all()
                    return
                self.meta, self.index = meta, index
            else:
                self.meta, self.index = self._empty_meta(), self._new_faiss()

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(self._faiss_path, faiss.serialize_index(self.index).tobytes())
        _atomic_write_bytes(self._meta_path, json.dumps(self.meta, ensure_ascii=False, indent=1).encode("utf-8"))

    def _reembed_all(self, progress: Progress = None) -> None:
        """Recompute every stored vector from the stored PNGs with the current embedder."""
        items = self.meta["items"]
        ids = list(items)
        self.meta["model"], self.meta["dim"] = self.embedder.name, int(self.embedder.dim)
        self.index = self._new_faiss()
        for start in range(0, len(ids), 32):
            chunk = ids[start : start + 32]
            vecs = self.embedder.embed([load_rgb(self.images_dir / items[i]["image"]) for i in chunk])
            self.index.add_with_ids(l2_normalize(vecs), np.array([items[i]["fid"] for i in chunk], dtype=np.int64))
            if progress:
                progress(min(1.0, (start + len(chunk)) / max(1, len(ids))), "re-embedding index")
        self._caption_cache.clear()
        self._save()

    # ------------------------------------------------------------------ writes
    def add(self, rgb: np.ndarray, product: str, defect_type: str | None, note: str = "", source: str | None = None) -> str:
        """Index one RGB uint8 image ``(H, W, 3)``; returns its item id (16 hex chars).

        The image is copied to ``index_dir/images/<id>.png``; the item is searchable
        and persisted when this returns. Adding the same pixels again returns the
        existing id without changes.
        """
        return self.add_many([{"rgb": rgb, "product": product, "defect_type": defect_type, "note": note,
                               "source": source}])[0]

    def add_many(self, items: list[dict], progress: Progress = None, batch_size: int = 32) -> list[str]:
        """Index several images, embedding in batches.

        Args:
            items: dicts with ``rgb`` (RGB uint8 array; or ``image``: a path) and
                ``product``, ``defect_type``, optional ``note``, ``source``.
            progress: ``callback(fraction 0..1, message)``.

        Returns:
            item ids in input order (existing ids for duplicates).

        Raises:
            ValueError: an item without a product.
            stores.imageio.InvalidImageError: an unreadable image.
        """
        prepared = []
        for it in items:
            if not it.get("product"):
                raise ValueError("every indexed image needs a product id")
            rgb = it.get("rgb")
            rgb = load_rgb(rgb if rgb is not None else it["image"])
            prepared.append((content_hash(rgb)[:16], rgb, it))
        ids: list[str] = []
        with self._lock:
            todo = []
            seen = set()
            for item_id, rgb, it in prepared:
                ids.append(item_id)
                if item_id in self.meta["items"] or item_id in seen:
                    continue
                seen.add(item_id)
                todo.append((item_id, rgb, it))
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                vecs = l2_normalize(self.embedder.embed([rgb for _, rgb, _ in chunk]))
                fids = np.arange(self.meta["next_fid"], self.meta["next_fid"] + len(chunk), dtype=np.int64)
                for (item_id, rgb, it), fid in zip(chunk, fids):
                    save_png(rgb, self.images_dir / f"{item_id}.png")
                    self.meta["items"][item_id] = {
                        "fid": int(fid), "product": str(it["product"]), "defect_type": it.get("defect_type") or None,
                        "note": str(it.get("note") or ""), "source": it.get("source"), "image": f"{item_id}.png"}
                self.meta["next_fid"] = int(fids[-1]) + 1
                self.index.add_with_ids(vecs, fids)
                self._save()
                if progress:
                    progress((start + len(chunk)) / len(todo), f"indexed {start + len(chunk)}/{len(todo)} images")
        return ids

    def delete(self, item_id: str) -> bool:
        """Remove an item (vector, metadata, stored PNG); False if the id is unknown."""
        with self._lock:
            item = self.meta["items"].pop(item_id, None)
            if item is None:
                return False
            self.index.remove_ids(np.array([item["fid"]], dtype=np.int64))
            self._caption_cache.pop(item_id, None)
            self._save()
            png = self.images_dir / item["image"]
            if png.exists():
                png.unlink()
            return True

    # ------------------------------------------------------------------ reads
    def __len__(self) -> int:
        with self._lock:
            return int(self.index.ntotal)

    def _row(self, item_id: str, score: float | None = None) -> dict:
        it = self.meta["items"][item_id]
        row = {"id": item_id, "product": it["product"], "defect_type": it["defect_type"],
               "image": str((self.images_dir / it["image"]).resolve()), "note": it["note"], "source": it.get("source")}
        if score is not None:
            row["score"] = float(score)
        return row

    def get(self, item_id: str) -> dict | None:
        """Metadata of one item (id, product, defect_type, image path, note, source) or None."""
        with self._lock:
            return self._row(item_id) if item_id in self.meta["items"] else None

    def items(self) -> list[dict]:
        """Metadata of every item, in insertion order."""
        with self._lock:
            return [self._row(i) for i in self.meta["items"]]

    def _fid_to_id(self) -> dict[int, str]:
        return {it["fid"]: i for i, it in self.meta["items"].items()}

    def _match(self, item_id: str, product: str | None, defect_type: str | None) -> bool:
        it = self.meta["items"][item_id]
        return (product is None or it["product"] == product) and (defect_type is None or it["defect_type"] == defect_type)

    def search_vectors(self, vecs: np.ndarray, k: int = 5, product: str | None = None,
                       defect_type: str | None = None) -> list[list[dict]]:
        """Search with precomputed embeddings ``(N, dim)``; one best-first result list per row."""
        with self._lock:
            n = int(self.index.ntotal)
            if n == 0 or k <= 0:
                return [[] for _ in range(len(vecs))]
            filtered = product is not None or defect_type is not None
            fetch = n if filtered else min(k, n)  # filters: rank everything, then filter (exact)
            scores, fids = self.index.search(l2_normalize(vecs), fetch)
            lookup = self._fid_to_id()
            out = []
            for srow, frow in zip(scores, fids):
                hits = []
                for s, f in zip(srow, frow):
                    if f < 0:
                        continue
                    item_id = lookup[int(f)]
                    if self._match(item_id, product, defect_type):
                        hits.append(self._row(item_id, s))
                        if len(hits) == k:
                            break
                out.append(hits)
            return out

    def search(self, rgb: np.ndarray, k: int = 5, product: str | None = None, defect_type: str | None = None) -> list[dict]:
        """Nearest indexed images to an RGB uint8 image ``(H, W, 3)``.

        Returns:
            up to ``k`` dicts ``{"id", "product", "defect_type", "score" (cosine), "image"
            (absolute PNG path), "note", "source"}``, best first; ``product`` /
            ``defect_type`` filters are exact.
        """
        vec = self.embedder.embed([load_rgb(rgb)])
        return self.search_vectors(vec, k=k, product=product, defect_type=defect_type)[0]

    def search_text(self, text: str, k: int = 5, product: str | None = None, defect_type: str | None = None) -> list[dict]:
        """Text query against the items' captions ``"<product> <defect type> <note>"``.

        The offline image embedder has no text tower, so the query and the captions
        are embedded with the text embedder (``Settings.text_embedder``); each result
        carries ``"matched": "caption"``. Result dicts as in :meth:`search`.

        Raises:
            ValueError: empty text.
        """
        if not text or not text.strip():
            raise ValueError("empty text query")
        temb = get_text_embedder()
        with self._lock:
            ids = [i for i in self.meta["items"] if self._match(i, product, defect_type)]
            missing = [i for i in ids if i not in self._caption_cache]
            if missing:
                caps = []
                for i in missing:
                    it = self.meta["items"][i]
                    caps.append(" ".join(x for x in (it["product"], it["defect_type"] or "normal", it["note"]) if x))
                for i, v in zip(missing, temb.embed(caps)):
                    self._caption_cache[i] = v
            if not ids:
                return []
            mat = np.stack([self._caption_cache[i] for i in ids])
            q = embed_queries(temb, [text.strip()])[0]
            sims = mat @ q
            order = np.argsort(-sims)[:k]
            return [{**self._row(ids[j], sims[j]), "matched": "caption"} for j in order]

    def infer_product(self, rgb: np.ndarray, k: int = 10) -> tuple[str, float]:
        """Product of an image by a score-weighted vote of its ``k`` nearest items.

        Returns:
            ``(product, confidence)`` with confidence = winning weight / total weight, 0..1.

        Raises:
            RuntimeError: the index is empty.
        """
        hits = self.search(rgb, k=k)
        if not hits:
            raise RuntimeError("the image index is empty: run `python cli.py build` first")
        votes: dict[str, float] = {}
        for h in hits:
            votes[h["product"]] = votes.get(h["product"], 0.0) + max(h["score"], 0.0) + 1e-6
        best = max(votes, key=votes.get)
        return best, float(votes[best] / sum(votes.values()))

    # ------------------------------------------------------------------ build / evaluate
    def set_normal_means(self, normal_means: dict[str, np.ndarray], progress: Progress = None) -> None:
        """Store per-product normal statistics and re-embed the index with them."""
        if not isinstance(self.embedder, DefectAwareEmbedder):
            return
        with self._lock:
            buf = tempfile.SpooledTemporaryFile()
            np.savez(buf, **{k: np.asarray(v, np.float32) for k, v in normal_means.items()})
            buf.seek(0)
            _atomic_write_bytes(self._normals_path, buf.read())
            self.embedder = DefectAwareEmbedder(self._base, normal_means, self.embedder.global_weight)
            self._reembed_all(progress)

    def build_from_manifest(self, data_dir: Path | None = None, progress: Progress = None,
                            normals_per_product: int = 40) -> dict:
        """Index the manifest's gallery split (+ per-product normal statistics from train normals).

        Idempotent: a second call with the same manifest only checks and returns.

        Args:
            data_dir: folder holding ``manifest.json`` (default ``Settings.data_dir``).
            normals_per_product: training normals per product used for the normal mean.

        Returns:
            ``{"items": n_total, "added": n_new, "products": [...], "model": name, "skipped": bool}``

        Raises:
            FileNotFoundError: no manifest.
        """
        data_dir = Path(data_dir or self.settings.data_dir)
        manifest = _load_manifest(data_dir)
        gallery = [it for it in manifest["items"] if it["split"] == "gallery"]
        normals: dict[str, list[str]] = {}
        for it in manifest["items"]:
            if it["split"] == "train" and it["label"] == "good":
                normals.setdefault(it["product"], []).append(it["image"])
        normals = {p: sorted(v)[:normals_per_product] for p, v in normals.items()}
        fp = hashlib.sha256(json.dumps([normals, [g["image"] for g in gallery], self.embedder.name],
                                       sort_keys=True).encode()).hexdigest()
        products = sorted({g["product"] for g in gallery})
        with self._lock:
            if self.meta.get("manifest_fingerprint") == fp and len(self) >= len(gallery):
                return {"items": len(self), "added": 0, "products": products, "model": self.model, "skipped": True}
            if isinstance(self.embedder, DefectAwareEmbedder) and normals:
                if progress:
                    progress(0.0, "normal statistics")
                means = self.embedder.compute_normal_means(
                    {p: [load_rgb(data_dir / rel) for rel in rels] for p, rels in normals.items()})
                self.set_normal_means(means)
            before = len(self)
            self.add_many([{"image": data_dir / g["image"], "product": g["product"], "defect_type": g.get("defect_type"),
                            "note": g.get("note") or "", "source": g["id"]} for g in gallery], progress=progress)
            self.meta["manifest_fingerprint"] = fp
            self._save()
            return {"items": len(self), "added": len(self) - before, "products": products, "model": self.model,
                    "skipped": False}

    def evaluate(self, data_dir: Path | None = None, k: int = 10) -> dict:
        """Similar-defect retrieval quality with the manifest's val defects as queries.

        Queries are never in the gallery. Metrics: defect-type Recall@1 / Recall@5
        (a hit of the query's defect type within the top 1 / 5), MRR@10 (reciprocal
        rank of the first hit of that type within the top 10, else 0), product
        accuracy of the top hit.

        Returns:
            ``{"recall_at_1", "recall_at_5", "mrr_at_10", "product_accuracy", "n_queries", "model"}``
        """
        data_dir = Path(data_dir or self.settings.data_dir)
        manifest = _load_manifest(data_dir)
        queries = [it for it in manifest["items"] if it["split"] == "val" and it["label"] == "defect"]
        if not queries:
            raise ValueError("the manifest has no val defects to evaluate with")
        vecs = np.concatenate([self.embedder.embed([load_rgb(data_dir / q["image"]) for q in queries[i : i + 32]])
                               for i in range(0, len(queries), 32)])
        results = self.search_vectors(vecs, k=k)
        r1 = r5 = mrr = pacc = 0.0
        per_type: dict[str, list[int]] = {}
        for q, hits in zip(queries, results):
            types = [h["defect_type"] for h in hits]
            rank = next((i + 1 for i, t in enumerate(types) if t == q["defect_type"]), None)
            r1 += rank == 1
            r5 += rank is not None and rank <= 5
            mrr += 1.0 / rank if rank else 0.0
            pacc += bool(hits) and hits[0]["product"] == q["product"]
            per_type.setdefault(q["defect_type"], []).append(int(rank == 1))
        n = len(queries)
        return {"recall_at_1": r1 / n, "recall_at_5": r5 / n, "mrr_at_10": mrr / n, "product_accuracy": pacc / n,
                "n_queries": n, "recall_at_1_per_type": {t: float(np.mean(v)) for t, v in per_type.items()},
                "model": self.model}
