"""Similar-defect image index: FAISS inner-product search over L2-normalised vectors.

Layout in ``Settings.index_dir``::

    index.faiss             faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), int64 ids
    items.json              {"version", "model", "dim", "next_fid", "manifest_fingerprint", "descriptor",
                             "items": {item_id: {"fid", "product", "defect_type", "note", "source", "image"}}}
    normal_means.npz        per-product mean raw image feature of training normals (optional)
    defect_projection.npz   per-product fitted defect metric (:class:`stores.defect_descriptor.DefectProjection`)
    features.npz            per item: raw global feature and raw defect descriptor (re-embedding without
                            re-running PatchCore)
    images/<hash16>.png     a copy of every indexed image

Item ids are the first 16 hex digits of the image's content hash (same pixels,
same id). Every write goes to a temp file first and is moved into place with
``os.replace``. One ``threading.RLock`` serialises all access (Gradio threads).

Vector of an image (``dim = 2 * 1280 + DEFECT_DIM``), L2-normalised::

    [GLOBAL_WEIGHT * g, DEFECT_WEIGHT * d]

* ``g``: :class:`stores.embedders.DefectAwareEmbedder` (global EfficientNet-Lite0
  feature + residual from the product's normal mean), unit norm: product identity.
* ``d``: the defect part (:mod:`stores.defect_descriptor`): region statistics and
  anomaly-weighted Lite0 features, located by the PatchCore anomaly map (predicted,
  never a ground-truth mask), mapped by the product's metric (defect-type class
  probabilities of a logistic regression learned on the labelled gallery plus
  defects synthesized on val normals), zero-padded to ``DEFECT_DIM`` and unit-normalised; all zeros when
  the product has no PatchCore bank or no fitted metric (the index then behaves
  like a global-feature index).

Image queries are product-filtered (the product given, else the vote of the nearest
items by ``g`` alone), because defect parts of different products live in different
learned spaces. Measured numbers: see :mod:`stores.defect_descriptor`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from stores.defect_descriptor import (DefectDescriber, DefectProjection, DescriptorConfig,
                                      synthesize_training_defects)
from stores.embedders import (DefectAwareEmbedder, ImageEmbedder, embed_queries, get_image_embedder,
                              get_text_embedder, l2_normalize)
from stores.imageio import content_hash, load_rgb, save_png
from stores.settings import Settings, get_settings

INDEX_VERSION = 2
DEFECT_DIM = 8  # width of the defect part (the metric gives 5 class probabilities; zero-padded)
GLOBAL_WEIGHT = 0.3
DEFECT_WEIGHT = 1.0
SYNTH_PER_TYPE = 90  # measured: 30 -> Recall@1 0.633, 90 -> 0.683 (index build 80 s -> 190 s)
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


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    _atomic_write_bytes(path, buf.getvalue())


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
        patchcore: a :class:`stores.patchcore.PatchCoreStore` that gives the anomaly maps
            (default: one created lazily on the same settings).
        descriptor_config: :class:`~stores.defect_descriptor.DescriptorConfig`; default the
            persisted one, else the module default.

    Scores are cosine similarities in [-1, 1], higher = closer.
    """

    def __init__(self, settings: Settings | None = None, embedder: ImageEmbedder | None = None,
                 patchcore=None, descriptor_config: DescriptorConfig | None = None):
        self.settings = settings or get_settings()
        self.dir = Path(self.settings.index_dir)
        self.images_dir = self.dir / "images"
        self._faiss_path = self.dir / "index.faiss"
        self._meta_path = self.dir / "items.json"
        self._normals_path = self.dir / "normal_means.npz"
        self._proj_path = self.dir / "defect_projection.npz"
        self._feat_path = self.dir / "features.npz"
        self._lock = threading.RLock()
        self._caption_cache: dict[str, np.ndarray] = {}
        base = embedder if embedder is not None else get_image_embedder()
        self._base = base
        normal_means = self._read_normal_means()
        if callable(getattr(base, "raw", None)) and not isinstance(base, DefectAwareEmbedder):
            self.embedder = DefectAwareEmbedder(base, normal_means)
        else:
            self.embedder = base
        self._has_raw = callable(getattr(base, "raw", None))
        stored_cfg = self._read_stored_config()
        self.descriptor_config = descriptor_config or stored_cfg or DescriptorConfig()
        self._describer: DefectDescriber | None = None
        self._patchcore = patchcore
        self.projections: dict[str, DefectProjection] = self._read_projections()
        self._features: dict[str, dict[str, np.ndarray]] = self._read_features()
        self._load()

    # ------------------------------------------------------------------ persistence
    @property
    def model(self) -> str:
        """Name of the pipeline that produced the stored vectors."""
        return f"{self.embedder.name}+patchcore-defect-logreg"

    @property
    def dim(self) -> int:
        """Vector width: global part + ``DEFECT_DIM``."""
        return int(self.embedder.dim) + DEFECT_DIM

    @property
    def patchcore(self):
        """The :class:`stores.patchcore.PatchCoreStore` giving anomaly maps (created lazily)."""
        if self._patchcore is None:
            from stores.patchcore import PatchCoreStore

            self._patchcore = PatchCoreStore(self.settings)
        return self._patchcore

    @property
    def describer(self) -> DefectDescriber:
        """The :class:`~stores.defect_descriptor.DefectDescriber` (loaded lazily)."""
        if self._describer is None:
            self._describer = DefectDescriber(self.descriptor_config)
        return self._describer

    def _read_stored_config(self) -> DescriptorConfig | None:
        if not self._meta_path.is_file():
            return None
        try:
            d = json.loads(self._meta_path.read_text(encoding="utf-8")).get("descriptor")
        except (OSError, ValueError):
            return None
        return DescriptorConfig.from_dict(d) if d else None

    def _read_normal_means(self) -> dict[str, np.ndarray]:
        if not self._normals_path.is_file():
            return {}
        with np.load(self._normals_path) as z:
            return {k: z[k].astype(np.float32) for k in z.files}

    def _read_projections(self) -> dict[str, DefectProjection]:
        if not self._proj_path.is_file():
            return {}
        with np.load(self._proj_path) as z:
            arrays = {k: z[k] for k in z.files}
        products = sorted({k.split("/")[0] for k in arrays})
        return {p: DefectProjection.from_arrays(arrays, p) for p in products}

    def _read_features(self) -> dict[str, dict[str, np.ndarray]]:
        if not self._feat_path.is_file():
            return {}
        out: dict[str, dict[str, np.ndarray]] = {}
        with np.load(self._feat_path) as z:
            for k in z.files:
                item_id, kind = k.split("/")
                out.setdefault(item_id, {})[kind] = z[k].astype(np.float32)
        return out

    def _empty_meta(self) -> dict:
        return {"version": INDEX_VERSION, "model": self.model, "dim": self.dim, "next_fid": 0,
                "manifest_fingerprint": None, "descriptor": self.descriptor_config.to_dict(), "items": {}}

    def _new_faiss(self):
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def _load(self) -> None:
        with self._lock:
            if self._meta_path.is_file() and self._faiss_path.is_file():
                meta = json.loads(self._meta_path.read_text(encoding="utf-8"))
                index = faiss.read_index(str(self._faiss_path))
                same_cfg = meta.get("descriptor") == self.descriptor_config.to_dict()
                self.meta, self.index = meta, index
                if meta.get("model") != self.model or int(meta.get("dim", -1)) != self.dim or not same_cfg \
                        or index.ntotal != len(meta["items"]):
                    # another embedder / descriptor (or a torn write): re-embed the stored images
                    if not same_cfg:
                        self._features = {}
                    self.meta["descriptor"] = self.descriptor_config.to_dict()
                    self._reembed_all()
            else:
                self.meta, self.index = self._empty_meta(), self._new_faiss()

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        feats = {f"{i}/{kind}": v for i, d in self._features.items() if i in self.meta["items"] for kind, v in d.items()}
        _atomic_savez(self._feat_path, feats)
        _atomic_write_bytes(self._faiss_path, faiss.serialize_index(self.index).tobytes())
        _atomic_write_bytes(self._meta_path, json.dumps(self.meta, ensure_ascii=False, indent=1).encode("utf-8"))

    def _save_projections(self) -> None:
        arrays: dict[str, np.ndarray] = {}
        for p, proj in self.projections.items():
            arrays.update(proj.arrays(p))
        _atomic_savez(self._proj_path, arrays)

    # ------------------------------------------------------------------ vectors
    def anomaly_maps(self, rgbs: list[np.ndarray], product: str | None) -> list[np.ndarray] | None:
        """PatchCore anomaly maps (float32 ``(H, W)`` each) of images of one product, or None.

        None when ``product`` is None or has no fitted PatchCore bank.
        """
        if product is None or not rgbs or product not in self.patchcore.products():
            return None
        return [r.anomaly_map for r in self.patchcore.inspect_batch(list(rgbs), product)]

    def describe(self, rgbs: list[np.ndarray], product: str | None,
                 anomaly_maps: list[np.ndarray | None] | None = None) -> list[np.ndarray | None]:
        """Raw defect descriptors (float32 ``(D,)`` each, or None without an anomaly map).

        Maps missing from ``anomaly_maps`` are computed with PatchCore when ``product``
        has a bank. Ground-truth masks are never used here.
        """
        rgbs = list(rgbs)
        maps = list(anomaly_maps) if anomaly_maps is not None else [None] * len(rgbs)
        todo = [i for i, m in enumerate(maps) if m is None]
        if todo:
            computed = self.anomaly_maps([rgbs[i] for i in todo], product)
            if computed is not None:
                for i, m in zip(todo, computed):
                    maps[i] = m
        have = [i for i, m in enumerate(maps) if m is not None]
        out: list[np.ndarray | None] = [None] * len(rgbs)
        if have:
            vecs = self.describer([rgbs[i] for i in have], [np.asarray(maps[i], np.float32) for i in have])
            for i, v in zip(have, vecs):
                out[i] = v
        return out

    def _global_raw(self, rgbs: list[np.ndarray]) -> np.ndarray:
        if self._has_raw:
            return self._base.raw(rgbs)
        return self.embedder.embed(rgbs)

    def _global_vec(self, raw: np.ndarray) -> np.ndarray:
        if isinstance(self.embedder, DefectAwareEmbedder):
            return self.embedder.embed_raw(raw)
        return l2_normalize(raw)

    def _defect_vec(self, desc: np.ndarray | None, product: str | None) -> np.ndarray:
        out = np.zeros(DEFECT_DIM, np.float32)
        proj = self.projections.get(product) if product else None
        if desc is None or proj is None or proj.mean.shape[0] != desc.shape[0]:
            return out
        z = proj.transform(desc[None])[0][:DEFECT_DIM]
        out[: len(z)] = z
        n = float(np.linalg.norm(out))
        return out / n if n > 0 else out

    def _compose(self, global_raw: np.ndarray, descs: list[np.ndarray | None], products: list[str | None]) -> np.ndarray:
        """Final vectors ``(N, dim)``: ``l2([GLOBAL_WEIGHT * g, DEFECT_WEIGHT * d])``."""
        if len(global_raw) == 0:
            return np.zeros((0, self.dim), np.float32)
        g = self._global_vec(global_raw)
        d = np.stack([self._defect_vec(v, p) for v, p in zip(descs, products)])
        return l2_normalize(np.hstack([GLOBAL_WEIGHT * g, DEFECT_WEIGHT * d]))

    def _reembed_all(self, progress: Progress = None) -> None:
        """Recompute every stored vector with the current embedder, descriptor and metric.

        Cached raw features (``features.npz``) are reused; missing ones are recomputed
        from the stored PNGs (PatchCore maps included).
        """
        items = self.meta["items"]
        ids = list(items)
        self.meta["model"], self.meta["dim"] = self.model, self.dim
        self.meta["descriptor"] = self.descriptor_config.to_dict()
        self.meta["version"] = INDEX_VERSION
        self.index = self._new_faiss()
        for start in range(0, len(ids), 32):
            chunk = ids[start : start + 32]
            self._ensure_features(chunk)
            raw = np.stack([self._features[i]["global"] for i in chunk])
            descs = [self._features[i].get("defect") for i in chunk]
            vecs = self._compose(raw, descs, [items[i]["product"] for i in chunk])
            self.index.add_with_ids(vecs, np.array([items[i]["fid"] for i in chunk], dtype=np.int64))
            if progress:
                progress(min(1.0, (start + len(chunk)) / max(1, len(ids))), "re-embedding index")
        self._caption_cache.clear()
        self._save()

    def _ensure_features(self, ids: list[str]) -> None:
        """Compute cached raw features of stored items that lack them (grouped by product)."""
        items = self.meta["items"]
        need_g = [i for i in ids if "global" not in self._features.get(i, {})
                  or self._features[i]["global"].shape[0] != self._global_dim()]
        for i in need_g:
            self._features.setdefault(i, {})["global"] = self._global_raw([load_rgb(self.images_dir / items[i]["image"])])[0]
        need_d = [i for i in ids if "defect" not in self._features.get(i, {})]
        by_product: dict[str, list[str]] = {}
        for i in need_d:
            by_product.setdefault(items[i]["product"], []).append(i)
        for product, group in by_product.items():
            descs = self.describe([load_rgb(self.images_dir / items[i]["image"]) for i in group], product)
            for i, v in zip(group, descs):
                if v is not None:
                    self._features[i]["defect"] = v

    def _global_dim(self) -> int:
        return int(getattr(self._base, "dim", self.embedder.dim)) if self._has_raw else int(self.embedder.dim)

    def embed(self, rgbs: list[np.ndarray], product: str | None,
              anomaly_maps: list[np.ndarray | None] | None = None) -> np.ndarray:
        """Final index vectors of images of one product: float32 ``(N, dim)``, L2-normalised."""
        rgbs = [load_rgb(im) for im in rgbs]
        raw = self._global_raw(rgbs)
        descs = self.describe(rgbs, product, anomaly_maps) if product in self.projections else [None] * len(rgbs)
        return self._compose(raw, descs, [product] * len(rgbs))

    # ------------------------------------------------------------------ writes
    def add(self, rgb: np.ndarray, product: str, defect_type: str | None, note: str = "", source: str | None = None,
            anomaly_map: np.ndarray | None = None) -> str:
        """Index one RGB uint8 image ``(H, W, 3)``; returns its item id (16 hex chars).

        The image is copied to ``index_dir/images/<id>.png``; the item is searchable
        and persisted when this returns (its defect part uses ``anomaly_map`` if given,
        else PatchCore's map for ``product``, and the product's fitted metric).
        Adding the same pixels again returns the existing id without changes.
        """
        return self.add_many([{"rgb": rgb, "product": product, "defect_type": defect_type, "note": note,
                               "source": source, "anomaly_map": anomaly_map}])[0]

    def add_many(self, items: list[dict], progress: Progress = None, batch_size: int = 32) -> list[str]:
        """Index several images, embedding in batches.

        Args:
            items: dicts with ``rgb`` (RGB uint8 array; or ``image``: a path) and
                ``product``, ``defect_type``, optional ``note``, ``source``,
                ``anomaly_map`` (float32 ``(H, W)``; computed with PatchCore if absent).
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
                raw = self._global_raw([rgb for _, rgb, _ in chunk])
                descs: list[np.ndarray | None] = [it.get("defect_descriptor") for _, _, it in chunk]
                by_product: dict[str, list[int]] = {}
                for j, (_, _, it) in enumerate(chunk):
                    if descs[j] is None:
                        by_product.setdefault(str(it["product"]), []).append(j)
                for product, js in by_product.items():
                    maps = [chunk[j][2].get("anomaly_map") for j in js]
                    for j, v in zip(js, self.describe([chunk[j][1] for j in js], product, maps)):
                        descs[j] = v
                vecs = self._compose(raw, descs, [str(it["product"]) for _, _, it in chunk])
                fids = np.arange(self.meta["next_fid"], self.meta["next_fid"] + len(chunk), dtype=np.int64)
                for (item_id, rgb, it), fid, g, dsc in zip(chunk, fids, raw, descs):
                    save_png(rgb, self.images_dir / f"{item_id}.png")
                    self.meta["items"][item_id] = {
                        "fid": int(fid), "product": str(it["product"]), "defect_type": it.get("defect_type") or None,
                        "note": str(it.get("note") or ""), "source": it.get("source"), "image": f"{item_id}.png"}
                    self._features[item_id] = {"global": np.asarray(g, np.float32)}
                    if dsc is not None:
                        self._features[item_id]["defect"] = np.asarray(dsc, np.float32)
                self.meta["next_fid"] = int(fids[-1]) + 1
                self.index.add_with_ids(vecs, fids)
                self._save()
                if progress:
                    progress((start + len(chunk)) / len(todo), f"indexed {start + len(chunk)}/{len(todo)} images")
        return ids

    def delete(self, item_id: str) -> bool:
        """Remove an item (vector, metadata, cached features, stored PNG); False if the id is unknown."""
        with self._lock:
            item = self.meta["items"].pop(item_id, None)
            if item is None:
                return False
            self.index.remove_ids(np.array([item["fid"]], dtype=np.int64))
            self._caption_cache.pop(item_id, None)
            self._features.pop(item_id, None)
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

    def search(self, rgb: np.ndarray, k: int = 5, product: str | None = None, defect_type: str | None = None,
               anomaly_map: np.ndarray | None = None) -> list[dict]:
        """Nearest indexed images to an RGB uint8 image ``(H, W, 3)``.

        Args:
            rgb: the query image.
            k: number of results.
            product: restrict to this product; None: the product voted by the nearest
                items' global features (then results are restricted to it whenever its
                defect metric is fitted).
            defect_type: exact filter on the items' defect type.
            anomaly_map: PatchCore anomaly map of ``rgb`` (float32 ``(H, W)``) if the
                caller has it; else computed with the product's bank when there is one.

        Returns:
            up to ``k`` dicts ``{"id", "product", "defect_type", "score" (cosine), "image"
            (absolute PNG path), "note", "source"}``, best first; ``product`` /
            ``defect_type`` filters are exact.
        """
        rgb = load_rgb(rgb)
        raw = self._global_raw([rgb])
        if product is None and len(self):
            product = self._vote_product(raw, k=10)[0]
            if product not in self.projections:
                product_filter = None
            else:
                product_filter = product
        else:
            product_filter = product
        descs = self.describe([rgb], product, [anomaly_map]) if product in self.projections else [None]
        vec = self._compose(raw, descs, [product])
        return self.search_vectors(vec, k=k, product=product_filter, defect_type=defect_type)[0]

    def _vote_product(self, raw: np.ndarray, k: int = 10) -> tuple[str, float]:
        """Product by a score-weighted vote of the ``k`` nearest items by the global part only."""
        g = self._compose(raw, [None], [None])  # defect part zero -> global similarity only
        hits = self.search_vectors(g, k=k)[0]
        if not hits:
            raise RuntimeError("the image index is empty: run `python cli.py build` first")
        votes: dict[str, float] = {}
        for h in hits:
            votes[h["product"]] = votes.get(h["product"], 0.0) + max(h["score"], 0.0) + 1e-6
        best = max(votes, key=votes.get)
        return best, float(votes[best] / sum(votes.values()))

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
        """Product of an image by a score-weighted vote of its ``k`` nearest items (global features only).

        Returns:
            ``(product, confidence)`` with confidence = winning weight / total weight, 0..1.

        Raises:
            RuntimeError: the index is empty.
        """
        if len(self) == 0:
            raise RuntimeError("the image index is empty: run `python cli.py build` first")
        return self._vote_product(self._global_raw([load_rgb(rgb)]), k=k)

    # ------------------------------------------------------------------ build / evaluate
    def set_normal_means(self, normal_means: dict[str, np.ndarray], progress: Progress = None) -> None:
        """Store per-product normal statistics and re-embed the index with them."""
        if not isinstance(self.embedder, DefectAwareEmbedder):
            return
        with self._lock:
            _atomic_savez(self._normals_path, {k: np.asarray(v, np.float32) for k, v in normal_means.items()})
            self.embedder = DefectAwareEmbedder(self._base, normal_means, self.embedder.global_weight)
            self._reembed_all(progress)

    def fit_projections(self, labelled: dict[str, tuple[np.ndarray, list[str]]], progress: Progress = None) -> dict:
        """Fit the per-product defect metric and re-embed the index with it.

        Args:
            labelled: ``{product: (descriptors (N, D) float32, defect types [N])}``; products
                with fewer than 2 defect types are skipped.

        Returns:
            ``{product: output dim}`` of the fitted projections.
        """
        with self._lock:
            fitted = {}
            for product, (X, y) in labelled.items():
                if len(set(y)) < 2 or len(X) < 3:
                    continue
                self.projections[product] = DefectProjection.fit(X, list(y))
                fitted[product] = self.projections[product].out_dim
            self._save_projections()
            self._reembed_all(progress)
            return fitted

    def _fingerprint(self, normals: dict, gallery: list[dict], synth_per_type: int = 0) -> str:
        banks = {}
        for p in sorted({g["product"] for g in gallery}):
            if p in self.patchcore.products():
                banks[p] = self.patchcore.meta(p).get("fitted_at")
        return hashlib.sha256(json.dumps([normals, [g["image"] for g in gallery], self.model,
                                          self.descriptor_config.to_dict(), banks, synth_per_type],
                                         sort_keys=True).encode()).hexdigest()

    def build_from_manifest(self, data_dir: Path | None = None, progress: Progress = None,
                            normals_per_product: int = 40, synth_per_type: int = SYNTH_PER_TYPE) -> dict:
        """Index the manifest's gallery split, with normal statistics and the defect metric.

        Steps: per-product normal mean from train normals; PatchCore anomaly maps of
        the gallery images (banks must be fitted first, as ``stores.pipeline`` does;
        products without a bank get no defect part); defect descriptors; per-product
        metric (:class:`~stores.defect_descriptor.DefectProjection`) fitted on the
        gallery's labels (+ synthesized defects); vectors into FAISS. Idempotent: a
        second call with the same manifest, banks and configuration only checks.

        Args:
            data_dir: folder holding ``manifest.json`` (default ``Settings.data_dir``).
            normals_per_product: training normals per product used for the normal mean.
            synth_per_type: defects per type synthesized (``data.synth``) on the product's
                val normal images to enlarge the metric's training set (never indexed;
                the val defect queries are other images); 0 = gallery only.

        Returns:
            ``{"items": n_total, "added": n_new, "products": [...], "model": name, "skipped": bool,
            "metric": {product: dims}}``

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
        fp = self._fingerprint(normals, gallery, synth_per_type)
        products = sorted({g["product"] for g in gallery})
        report = progress or (lambda _f, _m: None)
        with self._lock:
            if self.meta.get("manifest_fingerprint") == fp and len(self) >= len(gallery):
                return {"items": len(self), "added": 0, "products": products, "model": self.model, "skipped": True,
                        "metric": {p: v.out_dim for p, v in self.projections.items()}}
            if isinstance(self.embedder, DefectAwareEmbedder) and normals:
                report(0.0, "normal statistics")
                means = self.embedder.compute_normal_means(
                    {p: [load_rgb(data_dir / rel) for rel in rels] for p, rels in normals.items()})
                _atomic_savez(self._normals_path, {k: np.asarray(v, np.float32) for k, v in means.items()})
                self.embedder = DefectAwareEmbedder(self._base, means, self.embedder.global_weight)
            rows = []
            labelled: dict[str, tuple[list, list]] = {}
            for n, product in enumerate(products):
                its = [g for g in gallery if g["product"] == product]
                rgbs = [load_rgb(data_dir / g["image"]) for g in its]
                report(0.1 + 0.6 * n / len(products), f"{product}: anomaly maps and defect descriptors")
                descs = self.describe(rgbs, product)
                for g, rgb, d in zip(its, rgbs, descs):
                    rows.append({"rgb": rgb, "product": product, "defect_type": g.get("defect_type"),
                                 "note": g.get("note") or "", "source": g["id"], "defect_descriptor": d})
                    if d is not None and g.get("defect_type"):
                        labelled.setdefault(product, ([], []))[0].append(d)
                        labelled[product][1].append(g["defect_type"])
                if product in labelled and synth_per_type > 0:
                    clean = [load_rgb(data_dir / it["image"]) for it in manifest["items"]
                             if it["product"] == product and it["split"] == "val" and it["label"] == "good"]
                    ims, types = synthesize_training_defects(clean, product, synth_per_type)
                    report(0.1 + 0.6 * (n + 0.5) / len(products), f"{product}: {len(ims)} synthesized defects")
                    for d, t in zip(self.describe(ims, product), types):
                        if d is not None:
                            labelled[product][0].append(d)
                            labelled[product][1].append(t)
            report(0.7, "fitting the defect metric")
            fitted = self.fit_projections({p: (np.stack(X), y) for p, (X, y) in labelled.items()})
            before = len(self)
            self.add_many(rows, progress=lambda f, m: report(0.75 + 0.25 * f, m))
            self.meta["manifest_fingerprint"] = fp
            self._save()
            return {"items": len(self), "added": len(self) - before, "products": products, "model": self.model,
                    "skipped": False, "metric": fitted}

    def evaluate(self, data_dir: Path | None = None, k: int = 10) -> dict:
        """Similar-defect retrieval quality with the manifest's val defects as queries.

        Queries are never in the gallery and go through :meth:`search` exactly as a
        user's image does (product inferred, PatchCore map predicted, no ground-truth
        mask). Metrics: defect-type Recall@1 / Recall@5 (a hit of the query's defect
        type within the top 1 / 5), MRR@10 (reciprocal rank of the first hit of that
        type within the top 10, else 0), product accuracy of the top hit; overall, per
        product and per type; mean wall time per query (ms, PatchCore included).

        Returns:
            ``{"recall_at_1", "recall_at_5", "mrr_at_10", "product_accuracy", "n_queries",
            "per_product": {p: {...}}, "recall_at_1_per_type", "ms_per_query", "model"}``
        """
        data_dir = Path(data_dir or self.settings.data_dir)
        manifest = _load_manifest(data_dir)
        queries = [it for it in manifest["items"] if it["split"] == "val" and it["label"] == "defect"]
        if not queries:
            raise ValueError("the manifest has no val defects to evaluate with")
        rows = []
        t0 = time.perf_counter()
        for q in queries:
            hits = self.search(load_rgb(data_dir / q["image"]), k=k)
            types = [h["defect_type"] for h in hits]
            rank = next((i + 1 for i, t in enumerate(types) if t == q["defect_type"]), None)
            rows.append((q["product"], q["defect_type"], rank, bool(hits) and hits[0]["product"] == q["product"]))
        ms = (time.perf_counter() - t0) * 1000.0 / len(queries)

        def summary(sel: list[tuple]) -> dict:
            n = len(sel)
            return {"recall_at_1": sum(r[2] == 1 for r in sel) / n,
                    "recall_at_5": sum(r[2] is not None and r[2] <= 5 for r in sel) / n,
                    "mrr_at_10": sum(1.0 / r[2] if r[2] else 0.0 for r in sel) / n,
                    "product_accuracy": sum(r[3] for r in sel) / n, "n_queries": n}

        out = summary(rows)
        out["per_product"] = {p: summary([r for r in rows if r[0] == p]) for p in sorted({r[0] for r in rows})}
        out["recall_at_1_per_type"] = {t: float(np.mean([r[2] == 1 for r in rows if r[1] == t]))
                                       for t in sorted({r[1] for r in rows})}
        out["ms_per_query"] = round(ms, 1)
        out["model"] = self.model
        return out
