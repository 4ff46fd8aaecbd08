"""Similar-defect image index: FAISS inner-product search over L2-normalised vectors.

Layout in ``Settings.index_dir``::

    gallery.vectors.npz     the vector store (:mod:`stores.vector_store`; FAISS backend): two named
                            vectors per item, "image" (dim below) and "caption" (text embedding of
                            the item's caption), int64 ids = the items' "fid", payload product /
                            defect_type for filters. Milvus backend: a collection "gallery" instead.
    items.json              {"version", "model", "dim", "caption_model", "caption_dim", "next_fid", "manifest_fingerprint",
                             "descriptor", "items": {item_id: {"fid", "product", "defect_type", "note",
                             "source", "image" (blob key), "description"}}}  <- the commit record
    normal_means.npz        per-product mean raw image feature of training normals (optional)
    defect_projection.npz   per-product fitted defect metric (:class:`models.defect_descriptor.DefectProjection`)
    features.npz            per item: raw global feature and raw defect descriptor (re-embedding without
                            re-running PatchCore)
    images/<hash16>.png     every indexed image (:mod:`stores.blobstore`; or an S3 bucket)

Item ids are the first 16 hex digits of :func:`core.imageio.content_hash`, the
sha256 of the decoded RGB pixels and shape (same picture in any lossless file,
same id: duplicates are found whatever the file format or metadata).

Crash safety: every file is written to a temp file and moved into place with
``os.replace``, in the order blob -> features.npz -> vector store -> items.json.
items.json is the commit record: on load, vectors of ids it does not list are
removed and items it lists without vectors get them recomputed from the cached
features (:meth:`ImageIndex._reconcile`). A process killed at any point therefore
leaves the previous state or the new one, both usable (tested with SIGKILL).
One ``threading.RLock`` serialises all access within a process (Gradio threads);
several writer processes on one state directory are not supported.

Search modes (:meth:`ImageIndex.query`): image -> image on the "image" vector,
text -> caption on the "caption" vector (or, with a CLIP embedder, text -> image
on the "image" vector), and fused: prefetch candidates on one vector, re-rank
them by ``(1 - w) * image cosine + w * caption cosine`` (``w`` =
``DRA_SEARCH_TEXT_WEIGHT``).

Vector of an image (``dim = 512 + DEFECT_DIM`` = 520 with the offline defaults;
``2 * 1280 + DEFECT_DIM`` with ``DRA_IMAGE_GLOBAL_DIM=0``), L2-normalised::

    [GLOBAL_WEIGHT * g, DEFECT_WEIGHT * d]

* ``g``: :class:`models.embedders.DefectAwareEmbedder` (global EfficientNet-Lite0
  feature + residual from the product's normal mean, projected from 2560 to
  ``DRA_IMAGE_GLOBAL_DIM`` = 512 dimensions by a fixed random orthonormal matrix), unit
  norm: product identity.
* ``d``: the defect part (:mod:`models.defect_descriptor`): region statistics and
  anomaly-weighted Lite0 features, located by the PatchCore anomaly map (predicted,
  never a ground-truth mask), mapped by the product's metric (defect-type class
  probabilities of a logistic regression learned on the labelled gallery plus
  defects synthesized on val normals), zero-padded to ``DEFECT_DIM`` and unit-normalised; all zeros when
  the product has no PatchCore bank or no fitted metric (the index then behaves
  like a global-feature index).

Image queries are product-filtered (the product given, else the vote of the nearest
items by ``g`` alone), because defect parts of different products live in different
learned spaces. Measured numbers: see :mod:`models.defect_descriptor`.
"""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from stores.atomic import atomic_write_bytes
from stores.blobstore import open_blob_store
from models.defect_descriptor import DefectDescriber, DefectProjection, DescriptorConfig
from models.embedders import (DefectAwareEmbedder, ImageEmbedder, embed_queries, get_image_embedder,
                              get_text_embedder, l2_normalize)
from core.imageio import InvalidImageError, content_hash, load_rgb
from core import catalog
from core.settings import DEFECT_TYPES, Settings, get_settings
from stores.vector_store import FaissVectorStore, VectorStore, open_vector_store

INDEX_VERSION = 3
DEFECT_DIM = 8  # width of the defect part (the metric gives 5 class probabilities; zero-padded)
GLOBAL_WEIGHT = 0.3
DEFECT_WEIGHT = 1.0
# Defects per type synthesized (data.synth, on each product's val normals) to train the defect
# metric: Settings.synth_per_type (DRA_SYNTH_PER_TYPE, default 600). Measured Recall@1 (120 val
# queries): 30 -> 0.633, 90 -> 0.683 on early banks; on the current banks with the gallery's
# descriptors renewed under the current maps: 90 -> 0.783, 300 -> 0.842, 600 -> 0.858 (with the
# stale gallery descriptors of earlier builds: 90 -> 0.767, 180 -> 0.800, 300 -> 0.825,
# 450 -> 0.842, 600 -> 0.850). Cost: describing 3,000 synthesized images per product, about
# 16 min of index build for the three products on 2 cores (90: ~3 min).
PREFETCH_MIN = 50  # fused search: candidates prefetched on the first vector (at least; 10 x k otherwise)
MODES = ("auto", "image", "text", "fused")
Progress = Callable[[float, str], None] | None
AnomalyMaps = Callable[[list[np.ndarray], str], "list[np.ndarray] | None"]


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


class ImageIndex:
    """Persistent, thread-safe similar-defect image index with two named vectors per item.

    Args:
        settings: paths (``settings.index_dir``), backends (``vector_backend``,
            ``blob_store``), fusion weight.
        embedder: an :class:`~models.embedders.ImageEmbedder`; default
            ``get_image_embedder()`` wrapped in :class:`~models.embedders.DefectAwareEmbedder`
            when it exposes raw features.
        anomaly_maps: ``anomaly_maps(rgbs, product) -> [float32 (H, W)] | None``: the PatchCore
            anomaly maps of images of one product (None when the product has no bank);
            the service container passes one backed by :class:`stores.banks.BankStore`.
            None: no defect part (the index behaves like a global-feature index).
        descriptor_config: :class:`~models.defect_descriptor.DescriptorConfig`; default the
            persisted one, else the module default.
        text_embedder: embeds captions and text queries (default ``get_text_embedder()``).
        captioner: optional ``callable(rgb uint8 (H, W, 3)) -> str`` (e.g. a VLM) whose
            description of a registered image is appended to its caption; None: the
            caption is product, defect type and note only.

    Scores are cosine similarities in [-1, 1], higher = closer.
    """

    def __init__(self, settings: Settings, embedder: ImageEmbedder | None = None,
                 anomaly_maps: AnomalyMaps | None = None, descriptor_config: DescriptorConfig | None = None, text_embedder=None,
                 captioner: Callable[[np.ndarray], str] | None = None):
        self.settings = settings
        self.dir = Path(self.settings.index_dir)
        self.images_dir = self.dir / "images"
        self._meta_path = self.dir / "items.json"
        self._normals_path = self.dir / "normal_means.npz"
        self._proj_path = self.dir / "defect_projection.npz"
        self._feat_path = self.dir / "features.npz"
        self._lock = threading.RLock()
        self.captioner = captioner
        self._text_embedder = text_embedder
        self._caption_known: tuple[str, int] | None = None  # (name, dim) read from items.json
        self.blobs = open_blob_store(self.settings)
        base = embedder if embedder is not None else get_image_embedder()
        self._base = base
        normal_means = self._read_normal_means()
        if callable(getattr(base, "raw", None)) and not isinstance(base, DefectAwareEmbedder):
            self.embedder = DefectAwareEmbedder(base, normal_means, out_dim=self.settings.image_global_dim)
        else:
            self.embedder = base
        self._has_raw = callable(getattr(base, "raw", None))
        stored_cfg = self._read_stored_config()
        self.descriptor_config = descriptor_config or stored_cfg or DescriptorConfig()
        self._describer: DefectDescriber | None = None
        self._anomaly_maps = anomaly_maps
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
        """Width of the "image" vector: global part + ``DEFECT_DIM``."""
        return int(self.embedder.dim) + DEFECT_DIM

    @property
    def text_embedder(self):
        """The caption / text-query embedder (loaded lazily)."""
        if self._text_embedder is None:
            self._text_embedder = get_text_embedder()
        return self._text_embedder

    @property
    def caption_model(self) -> str:
        """Name of the caption embedder (without loading it when the stored index already names it)."""
        return self._caption_spec()[0]

    def _caption_spec(self) -> tuple[str, int]:
        """``(name, dim)`` of the caption / text-query embedder.

        Opening the gallery (delete, relabel, image search, product inference) needs only these two:
        when ``items.json`` records the configured embedder with its width, they come from there and
        the text model (sentence-transformers: ~10 s to import and load on 2 cores) loads on first use.
        """
        if self._text_embedder is None and self._caption_known is not None:
            return self._caption_known
        return str(self.text_embedder.name), int(self.text_embedder.dim)

    @property
    def index(self):
        """The FAISS ``IndexIDMap2`` of the "image" vectors (FAISS backend only; for inspection)."""
        indexes = getattr(self.vectors, "indexes", None)
        if indexes is None:
            raise AttributeError("the Milvus backend has no in-process FAISS index")
        return indexes["image"]

    @property
    def describer(self) -> DefectDescriber:
        """The :class:`~models.defect_descriptor.DefectDescriber` (loaded lazily)."""
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
        return {"version": INDEX_VERSION, "model": self.model, "dim": self.dim, "caption_model": self.caption_model,
                "caption_dim": self._caption_spec()[1],
                "next_fid": 0, "manifest_fingerprint": None, "descriptor": self.descriptor_config.to_dict(),
                "items": {}}

    def _open_vectors(self) -> VectorStore:
        fields = {"image": self.dim, "caption": self._caption_spec()[1]}
        try:
            return open_vector_store(self.settings, fields, name="gallery")
        except ValueError:
            # persisted with other widths (another embedder): start empty; _load re-embeds
            if self.settings.vector_backend != "faiss":
                return self._drop_milvus(fields)
            return FaissVectorStore(fields, None, hnsw_threshold=int(self.settings.faiss_hnsw_threshold))

    def _drop_milvus(self, fields: dict) -> VectorStore:
        from pymilvus import MilvusClient

        uri = self.settings.milvus_uri or str(self.dir / "milvus.db")
        client = MilvusClient(uri=uri)
        client.drop_collection("gallery")
        client.close()
        return open_vector_store(self.settings, fields, name="gallery")

    def _load(self) -> None:
        with self._lock:
            meta = json.loads(self._meta_path.read_text(encoding="utf-8")) if self._meta_path.is_file() else None
            if meta and meta.get("caption_model") == str(get_settings().text_embedder) \
                    and int(meta.get("caption_dim") or 0) > 0:
                self._caption_known = (str(meta["caption_model"]), int(meta["caption_dim"]))
            self.vectors = self._open_vectors()
            if getattr(self.vectors, "path", 0) is None:
                self.vectors.path = self.dir / "gallery.vectors.npz"
            if meta is None:
                self.meta = self._empty_meta()
                if len(self.vectors):  # vectors written, first commit never happened
                    self.vectors.remove(self.vectors.ids())
                return
            self.meta = meta
            same_cfg = meta.get("descriptor") == self.descriptor_config.to_dict()
            if meta.get("model") != self.model or int(meta.get("dim", -1)) != self.dim or not same_cfg \
                    or meta.get("caption_model") != self.caption_model:
                # another embedder / descriptor / caption model: re-embed the stored images
                if not same_cfg:
                    self._features = {}
                self.meta["descriptor"] = self.descriptor_config.to_dict()
                self._reembed_all()
            else:
                if not meta.get("caption_dim"):  # written by older code: kept from the next write on
                    meta["caption_dim"] = self._caption_spec()[1]
                self._reconcile()

    def _reconcile(self) -> None:
        """Make the vector store match items.json (the commit record) after a crash or a migration.

        Vectors of ids not committed are removed; committed items without vectors get
        them from the cached features (recomputed from the stored image if missing).
        """
        items = self.meta["items"]
        by_fid = {int(it["fid"]): i for i, it in items.items()}
        stored = set(self.vectors.ids())
        extra = [f for f in stored if f not in by_fid]
        missing = [by_fid[f] for f in by_fid if f not in stored]
        if stored:
            self.meta["next_fid"] = max(int(self.meta.get("next_fid", 0)), max(stored) + 1)
        if not extra and not missing:
            return
        if extra:
            self.vectors.remove(extra)
        if missing:
            self._add_vectors(missing)
        self.vectors.persist()
        self._write_meta()

    def _write_meta(self) -> None:
        atomic_write_bytes(self._meta_path, json.dumps(self.meta, ensure_ascii=False, indent=1).encode("utf-8"))

    def _write_features(self) -> None:
        feats = {f"{i}/{kind}": v for i, d in self._features.items() if i in self.meta["items"] for kind, v in d.items()}
        _atomic_savez(self._feat_path, feats)

    def _save(self) -> None:
        """Persist everything, commit record last: features -> vectors -> items.json."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_features()
        self.vectors.persist()
        self._write_meta()

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
        if product is None or not rgbs or self._anomaly_maps is None:
            return None
        return self._anomaly_maps(list(rgbs), product)

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

    def caption(self, item: dict) -> str:
        """Caption text of an item row: ``"<defect type> on <product>. <note>. <description>"``."""
        defect = item.get("defect_type") or "no defect"
        parts = [f"{defect} on {item['product']}", item.get("note") or "", item.get("description") or ""]
        return ". ".join(p.strip().rstrip(".") for p in parts if p and p.strip())

    def _item_vectors(self, ids: list[str]) -> dict[str, np.ndarray]:
        """Both named vectors of stored items from their cached features: ``{"image": (N, dim), "caption": (N, d_t)}``."""
        items = self.meta["items"]
        self._ensure_features(ids)
        raw = np.stack([self._features[i]["global"] for i in ids])
        descs = [self._features[i].get("defect") for i in ids]
        image = self._compose(raw, descs, [items[i]["product"] for i in ids])
        caption = l2_normalize(self.text_embedder.embed([self.caption(items[i]) for i in ids]))
        return {"image": image, "caption": caption}

    def _payload(self, item: dict) -> dict:
        return {"product": item["product"], "defect_type": item.get("defect_type")}

    def _add_vectors(self, ids: list[str], batch: int = 64) -> None:
        items = self.meta["items"]
        for start in range(0, len(ids), batch):
            chunk = ids[start:start + batch]
            self.vectors.add(np.array([items[i]["fid"] for i in chunk], np.int64), self._item_vectors(chunk),
                             [self._payload(items[i]) for i in chunk])

    def _reembed_all(self, progress: Progress = None) -> None:
        """Recompute every stored vector with the current embedders, descriptor and metric.

        Cached raw features (``features.npz``) are reused; missing ones are recomputed
        from the stored images (PatchCore maps included).
        """
        items = self.meta["items"]
        ids = list(items)
        self.meta["model"], self.meta["dim"] = self.model, self.dim
        self.meta["caption_model"], self.meta["caption_dim"] = self._caption_spec()
        self.meta["descriptor"] = self.descriptor_config.to_dict()
        self.meta["version"] = INDEX_VERSION
        old = self.vectors.ids()
        if old:
            self.vectors.remove(old)
        self.meta["next_fid"] = max(int(self.meta.get("next_fid", 0)), max(old, default=-1) + 1)
        for n, i in enumerate(ids):  # fresh fids: an HNSW store keeps removed ids as tombstones
            items[i]["fid"] = int(self.meta["next_fid"]) + n
        self.meta["next_fid"] = int(self.meta["next_fid"]) + len(ids)
        for start in range(0, len(ids), 32):
            chunk = ids[start : start + 32]
            self._add_vectors(chunk)
            if progress:
                progress(min(1.0, (start + len(chunk)) / max(1, len(ids))), "re-embedding index")
        self._save()

    def _image_path(self, item_id: str) -> Path:
        return self.blobs.local_path(self.meta["items"][item_id]["image"])

    def _ensure_features(self, ids: list[str]) -> None:
        """Compute cached raw features of stored items that lack them (grouped by product)."""
        items = self.meta["items"]
        need_g = [i for i in ids if "global" not in self._features.get(i, {})
                  or self._features[i]["global"].shape[0] != self._global_dim()]
        for i in need_g:
            self._features.setdefault(i, {})["global"] = self._global_raw([load_rgb(self._image_path(i))])[0]
        need_d = [i for i in ids if "defect" not in self._features.get(i, {})]
        by_product: dict[str, list[str]] = {}
        for i in need_d:
            by_product.setdefault(items[i]["product"], []).append(i)
        for product, group in by_product.items():
            if product not in self.projections:
                continue
            descs = self.describe([load_rgb(self._image_path(i)) for i in group], product)
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

        The image goes to the blob store under its content hash; the item is searchable
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
                ``product``, ``defect_type``, optional ``note``, ``source``, ``description``,
                ``anomaly_map`` (float32 ``(H, W)``; computed with PatchCore if absent),
                ``defect_descriptor`` (precomputed raw descriptor).
            progress: ``callback(fraction 0..1, message)``.

        Returns:
            item ids in input order (existing ids for duplicates).

        Raises:
            ValueError: an item without a product.
            core.imageio.InvalidImageError: an unreadable image.
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
                # 1. blobs (content-addressed: an orphan after a crash is harmless)
                keys = [self.blobs.put_image(rgb) for _, rgb, _ in chunk]
                fids = np.arange(self.meta["next_fid"], self.meta["next_fid"] + len(chunk), dtype=np.int64)
                rows = {}
                for (item_id, rgb, it), fid, g, dsc, key in zip(chunk, fids, raw, descs, keys):
                    rows[item_id] = {
                        "fid": int(fid), "product": str(it["product"]), "defect_type": it.get("defect_type") or None,
                        "note": str(it.get("note") or ""), "source": it.get("source"), "image": key}
                    if it.get("description"):
                        rows[item_id]["description"] = str(it["description"])
                    self._features[item_id] = {"global": np.asarray(g, np.float32)}
                    if dsc is not None:
                        self._features[item_id]["defect"] = np.asarray(dsc, np.float32)
                image = self._compose(raw, descs, [str(it["product"]) for _, _, it in chunk])
                caption = l2_normalize(self.text_embedder.embed([self.caption(r) for r in rows.values()]))
                committed = dict(self.meta["items"])
                self.meta["items"].update(rows)
                try:
                    # 2. features, 3. vectors, 4. items.json (the commit)
                    self._write_features()
                    self.vectors.add(fids, {"image": image, "caption": caption},
                                     [self._payload(r) for r in rows.values()])
                    self.vectors.persist()
                    self.meta["next_fid"] = int(fids[-1]) + 1
                    self._write_meta()
                except BaseException:
                    self.meta["items"] = committed
                    self.vectors.remove(fids.tolist())
                    raise
                if progress:
                    progress((start + len(chunk)) / len(todo), f"indexed {start + len(chunk)}/{len(todo)} images")
        return ids

    def _check_labels(self, product: str | None, defect_type: str | None) -> tuple[str | None, str | None]:
        if product is not None:
            if product not in catalog.products():
                raise ValueError(f"unknown product {product!r}; known: {', '.join(catalog.products())}")
        if defect_type is not None and defect_type != "":
            d = catalog.normalize_defect(defect_type)
            if d is None:
                raise ValueError(f"unknown defect type {defect_type!r}; known: {', '.join(DEFECT_TYPES)}")
            defect_type = d
        return product, defect_type or None

    def register(self, image, product: str, defect_type: str, note: str = "") -> dict:
        """Register a labelled defect image: searchable at once, persisted atomically.

        Args:
            image: RGB uint8 array ``(H, W, 3)`` (grey / RGBA are converted) or a path / bytes.
            product: a known product id (:func:`core.catalog.products`).
            defect_type: a defect type id of the taxonomy (English or Korean names accepted).
            note: free text, part of the caption vector.

        Returns:
            ``{"id", "duplicate", "product", "defect_type", "note", "image" (absolute path)}``;
            ``duplicate`` is True (and nothing changes) when the same pixels are already
            indexed (id = content hash), then the row is the stored one.

        Raises:
            ValueError: unknown product or defect type, or an unreadable image
                (:class:`core.imageio.InvalidImageError`, a ValueError).
        """
        product, defect_type = self._check_labels(product, defect_type)
        if not product or not defect_type:
            raise ValueError("register needs a product and a defect type")
        try:
            rgb = load_rgb(image, max_pixels=self.settings.max_image_pixels)
        except InvalidImageError:
            raise
        except (OSError, TypeError) as exc:
            raise InvalidImageError(f"cannot read the image: {exc}") from exc
        item_id = content_hash(rgb)[:16]
        with self._lock:
            if item_id in self.meta["items"]:
                return {**self._public(item_id), "duplicate": True}
            entry = {"rgb": rgb, "product": product, "defect_type": defect_type, "note": note or "",
                     "source": "registered"}
            if self.captioner is not None:
                entry["description"] = str(self.captioner(rgb) or "")
            self.add_many([entry])
            return {**self._public(item_id), "duplicate": False}

    def _public(self, item_id: str) -> dict:
        row = self._row(item_id)
        return {k: row[k] for k in ("id", "product", "defect_type", "note", "image")}

    def relabel(self, item_id: str, *, product: str | None = None, defect_type: str | None = None,
                note: str | None = None) -> dict:
        """Change an item's product, defect type and / or note; both vectors follow.

        The image vector's defect part depends on the product's metric and the caption
        on all labels, so the item gets new vectors under a new internal id (written
        before the commit record; the old ones are removed after it).

        Returns:
            the item row (as :meth:`get`).

        Raises:
            KeyError: unknown id. ValueError: unknown product or defect type.
        """
        product, defect_type = self._check_labels(product, defect_type)
        with self._lock:
            if item_id not in self.meta["items"]:
                raise KeyError(item_id)
            old = dict(self.meta["items"][item_id])
            new = dict(old)
            if product is not None:
                new["product"] = product
            if defect_type is not None:
                new["defect_type"] = defect_type
            if note is not None:
                new["note"] = str(note)
            if new == old:
                return self._row(item_id)
            new["fid"] = int(self.meta["next_fid"])
            if new["product"] != old["product"]:
                self._features.get(item_id, {}).pop("defect", None)  # the descriptor uses the product's bank
            self.meta["items"][item_id] = new
            try:
                vecs = self._item_vectors([item_id])
                self.vectors.add(np.array([new["fid"]], np.int64), vecs, [self._payload(new)])
                self._write_features()
                self.vectors.persist()
                self.meta["next_fid"] = new["fid"] + 1
                self._write_meta()  # commit
            except BaseException:
                self.meta["items"][item_id] = old
                raise
            self.vectors.remove([old["fid"]])
            self.vectors.persist()
            return self._row(item_id)

    def delete(self, item_id: str) -> bool:
        """Remove an item (vectors, metadata, cached features, stored image); False if the id is unknown."""
        with self._lock:
            item = self.meta["items"].pop(item_id, None)
            if item is None:
                return False
            self._write_meta()  # commit first: a crash after it leaves only orphans, removed on load
            self.vectors.remove([item["fid"]])
            self.vectors.persist()
            self._features.pop(item_id, None)
            self._write_features()
            if not any(it["image"] == item["image"] for it in self.meta["items"].values()):
                self.blobs.delete(item["image"])
            return True

    # ------------------------------------------------------------------ reads
    def __len__(self) -> int:
        with self._lock:
            return len(self.meta["items"])

    def _row(self, item_id: str, score: float | None = None) -> dict:
        it = self.meta["items"][item_id]
        row = {"id": item_id, "product": it["product"], "defect_type": it["defect_type"],
               "image": str(self.blobs.local_path(it["image"])), "note": it["note"], "source": it.get("source")}
        if it.get("description"):
            row["description"] = it["description"]
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

    def _search_field(self, field: str, vecs: np.ndarray, k: int, product: str | None,
                      defect_type: str | None) -> list[list[tuple[str, float]]]:
        """``(item id, cosine)`` best first per query row on one named vector, filters exact."""
        with self._lock:
            if not self.meta["items"] or k <= 0:
                return [[] for _ in range(len(vecs))]
            res = self.vectors.search(field, l2_normalize(vecs), k,
                                      {"product": product, "defect_type": defect_type})
            lookup = self._fid_to_id()
            return [[(lookup[f], s) for f, s in row if f in lookup] for row in res]

    def search_vectors(self, vecs: np.ndarray, k: int = 5, product: str | None = None,
                       defect_type: str | None = None) -> list[list[dict]]:
        """Search the "image" vectors with precomputed embeddings ``(N, dim)``; one best-first list per row."""
        with self._lock:
            return [[self._row(i, s) for i, s in row]
                    for row in self._search_field("image", vecs, k, product, defect_type)]

    def type_probabilities(self, desc: np.ndarray | None, product: str | None) -> dict[str, float] | None:
        """The product's defect metric's type probabilities ``{type: p}`` for one raw descriptor ``(D,)``.

        None without a descriptor, without a fitted ``logreg`` metric for ``product``, or when
        the descriptor's width does not match the metric (see
        :meth:`models.defect_descriptor.DefectProjection.class_probabilities`).
        """
        proj = self.projections.get(product) if product else None
        if desc is None or proj is None or proj.mean.shape[0] != np.shape(desc)[0]:
            return None
        probs = proj.class_probabilities(np.asarray(desc, np.float32)[None])
        return probs[0] if probs else None

    def _image_query_vector(self, rgb: np.ndarray, product: str | None, anomaly_map: np.ndarray | None
                            ) -> tuple[np.ndarray, str | None, dict[str, float] | None]:
        """Image query vector ``(1, dim)``, the product filter to apply (given, else inferred) and the
        metric's defect-type probabilities of the photo (:meth:`type_probabilities`)."""
        raw = self._global_raw([rgb])
        if product is None and len(self):
            product = self._vote_product(raw, k=10)[0]
            product_filter = product if product in self.projections else None
        else:
            product_filter = product
        descs = self.describe([rgb], product, [anomaly_map]) if product in self.projections else [None]
        return self._compose(raw, descs, [product]), product_filter, self.type_probabilities(descs[0], product)

    def search(self, rgb: np.ndarray, k: int = 5, product: str | None = None, defect_type: str | None = None,
               anomaly_map: np.ndarray | None = None) -> list[dict]:
        """Nearest indexed images to an RGB uint8 image ``(H, W, 3)`` (image -> image, "image" vector).

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
            (absolute PNG path), "note", "source", "matched": "image"}``, best first;
            ``product`` / ``defect_type`` filters are exact.
        """
        return self.search_with_types(rgb, k=k, product=product, defect_type=defect_type, anomaly_map=anomaly_map)[0]

    def search_with_types(self, rgb: np.ndarray, k: int = 5, product: str | None = None,
                          defect_type: str | None = None, anomaly_map: np.ndarray | None = None
                          ) -> tuple[list[dict], dict[str, float] | None]:
        """:meth:`search` plus the photo's defect-type probabilities (:meth:`type_probabilities`;
        one descriptor serves both)."""
        rgb = load_rgb(rgb)
        vec, product_filter, probs = self._image_query_vector(rgb, product, anomaly_map)
        rows = [{**h, "matched": "image"}
                for h in self.search_vectors(vec, k=k, product=product_filter, defect_type=defect_type)[0]]
        return rows, probs

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

    def _text_query_vector(self, text: str) -> np.ndarray:
        return l2_normalize(embed_queries(self.text_embedder, [text.strip()]))

    def search_text(self, text: str, k: int = 5, product: str | None = None, defect_type: str | None = None) -> list[dict]:
        """Text query (text -> caption on the "caption" vector; text -> image with a CLIP embedder).

        Captions are ``"<defect type> on <product>. <note>. <VLM description>"`` embedded with
        the text embedder (``Settings.text_embedder``); results then carry
        ``"matched": "caption"``. With an image embedder that has a text tower
        (``embed_text``, open_clip) the query is searched against the "image" vectors
        and results carry ``"matched": "image"``. Result dicts as in :meth:`search`.

        Raises:
            ValueError: empty text.
        """
        if not text or not text.strip():
            raise ValueError("empty text query")
        embed_text = getattr(self._base, "embed_text", None)
        if callable(embed_text):
            # CLIP-style embedder (open_clip): the query goes into the image space and is
            # searched through the FAISS index; the defect part of the query vector is zero
            q = np.zeros((1, self.dim), np.float32)
            q[0, : int(self.embedder.dim)] = embed_text([text.strip()])[0]
            return [{**hit, "matched": "image"}
                    for hit in self.search_vectors(q, k=k, product=product, defect_type=defect_type)[0]]
        q = self._text_query_vector(text)
        with self._lock:
            return [{**self._row(i, s), "matched": "caption"}
                    for i, s in self._search_field("caption", q, k, product, defect_type)[0]]

    def query(self, image=None, text: str | None = None, *, mode: str = "auto", k: int = 5,
              product: str | None = None, defect_type: str | None = None, text_weight: float | None = None,
              anomaly_map: np.ndarray | None = None) -> list[dict]:
        """The rows of :meth:`query_with_types` (every search mode, see there)."""
        return self.query_with_types(image, text, mode=mode, k=k, product=product, defect_type=defect_type,
                                     text_weight=text_weight, anomaly_map=anomaly_map)[0]

    def query_with_types(self, image=None, text: str | None = None, *, mode: str = "auto", k: int = 5,
                         product: str | None = None, defect_type: str | None = None,
                         text_weight: float | None = None, anomaly_map: np.ndarray | None = None
                         ) -> tuple[list[dict], dict[str, float] | None]:
        """One entry point for every search mode: ``(rows, type probabilities of the photo or None)``.

        Args:
            image: RGB uint8 array ``(H, W, 3)`` or path (image and fused modes).
            text: query text (text and fused modes).
            mode: ``"image"`` (image -> image, :meth:`search`), ``"text"`` (:meth:`search_text`),
                ``"fused"`` (needs both: prefetch ``max(PREFETCH_MIN, 10 k)`` candidates on the
                image vector, plus the caption vector's best for the text, then re-rank all by
                ``(1 - w) * image cosine + w * caption cosine``), ``"auto"``: fused with both,
                else whichever is given.
            k: number of results. product / defect_type: exact filters (image queries
                without a product infer it as :meth:`search` does).
            text_weight: ``w`` in 0..1; default ``Settings.search_text_weight``.
            anomaly_map: the query image's PatchCore map if the caller has it.

        Returns:
            up to ``k`` row dicts with ``score`` (comparable within this query) and
            ``matched`` (``"image"``, ``"caption"`` or ``"fused"``); fused rows also carry
            ``image_score`` and ``text_score``. The probabilities (image and fused modes with a
            fitted metric; else None) are :meth:`type_probabilities` of the photo.

        Raises:
            ValueError: unknown mode, a mode without its input, empty text, weight outside 0..1.
        """
        if mode not in MODES:
            raise ValueError(f"unknown search mode {mode!r}; known: {', '.join(MODES)}")
        has_text = bool(text and text.strip())
        if mode == "auto":
            mode = "fused" if image is not None and has_text else "image" if image is not None else "text"
        if mode in ("image", "fused") and image is None:
            raise ValueError(f"mode {mode!r} needs an image")
        if mode in ("text", "fused") and not has_text:
            raise ValueError(f"mode {mode!r} needs a non-empty text")
        if mode == "image":
            return self.search_with_types(image, k=k, product=product, defect_type=defect_type,
                                          anomaly_map=anomaly_map)
        if mode == "text":
            return self.search_text(text, k=k, product=product, defect_type=defect_type), None
        w = self.settings.search_text_weight if text_weight is None else float(text_weight)
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"text_weight must be within 0..1, got {w}")
        rgb = load_rgb(image)
        ivec, product_filter, probs = self._image_query_vector(rgb, product, anomaly_map)
        tvec = self._text_query_vector(text)
        prefetch = max(PREFETCH_MIN, 10 * int(k))
        with self._lock:
            cand = [i for i, _ in self._search_field("image", ivec, prefetch, product_filter, defect_type)[0]]
            cand += [i for i, _ in self._search_field("caption", tvec, k, product_filter, defect_type)[0] if i not in cand]
            if not cand:
                return [], probs
            fids = [self.meta["items"][i]["fid"] for i in cand]
            iscore = self.vectors.get_vectors("image", fids) @ ivec[0]
            tscore = self.vectors.get_vectors("caption", fids) @ tvec[0]
            fused = (1.0 - w) * iscore + w * tscore
            order = np.argsort(-fused, kind="stable")[:k]
            return [{**self._row(cand[j], fused[j]), "matched": "fused", "image_score": float(iscore[j]),
                     "text_score": float(tscore[j])} for j in order], probs

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
            self.embedder = self.embedder.with_means(normal_means)
            self._reembed_all(progress)

    def renew_descriptors(self, product: str, progress: Progress = None) -> int:
        """Recompute the cached defect descriptors of ``product``'s items and re-embed the index.

        Call after the product's PatchCore bank was refitted: descriptors are pooled under
        its anomaly maps, and queries use the new maps. The product's defect metric stays
        as fitted (``cli.py build`` refits it with new synthesized defects).

        Returns:
            the number of items of ``product`` whose descriptors were renewed.
        """
        with self._lock:
            ids = [i for i, it in self.meta["items"].items() if it["product"] == product]
            for i in ids:
                self._features.get(i, {}).pop("defect", None)
            if ids:
                self._reembed_all(progress)
            return len(ids)

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

    @property
    def manifest_fingerprint(self) -> str | None:
        """Fingerprint of the sample data, banks and configuration of the last gallery build."""
        return self.meta.get("manifest_fingerprint")

    def commit_build(self, fingerprint: str) -> None:
        """Record a finished gallery build (:func:`services.build.build_gallery`) and persist."""
        with self._lock:
            self.meta["manifest_fingerprint"] = fingerprint
            self._save()

    def set_normal_means_only(self, normal_means: dict[str, np.ndarray]) -> None:
        """Store per-product normal statistics without re-embedding (a build re-embeds after)."""
        if not isinstance(self.embedder, DefectAwareEmbedder):
            return
        with self._lock:
            _atomic_savez(self._normals_path, {k: np.asarray(v, np.float32) for k, v in normal_means.items()})
            self.embedder = self.embedder.with_means(normal_means)

    def refresh_descriptors(self, products: list[str], fresh: dict[str, np.ndarray | None]) -> None:
        """Replace the cached defect descriptors of ``products``' items.

        Items indexed by an earlier build keep descriptors pooled under the anomaly maps
        of the banks of that time; a rebuild follows a bank or configuration change, so
        they are renewed: items in ``fresh`` (id -> raw descriptor) get that one, other
        items of these products lose theirs and are recomputed from their stored images
        at the next re-embedding. Queries always use the current maps.
        """
        with self._lock:
            for item_id, it in self.meta["items"].items():
                if it["product"] not in products or item_id not in self._features:
                    continue
                if fresh.get(item_id) is not None:
                    self._features[item_id]["defect"] = np.asarray(fresh[item_id], np.float32)
                else:
                    self._features[item_id].pop("defect", None)

    def pairs(self) -> list[tuple[str, str]]:
        """Sorted ``(product, defect_type)`` pairs present in the index (labelled items only)."""
        with self._lock:
            return sorted({(it["product"], it["defect_type"]) for it in self.meta["items"].values()
                           if it["defect_type"]})
