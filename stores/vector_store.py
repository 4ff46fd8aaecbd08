"""Vector stores behind one interface: FAISS embedded (default) and Milvus.

A store holds items keyed by an int64 id, each with one or more **named vectors**
(e.g. ``"image"`` and ``"caption"``; every name has its own width) and a small
string payload used for exact filters (``product``, ``defect_type``). Vectors are
compared by inner product; callers L2-normalise them, so scores are cosine
similarities.

* :class:`FaissVectorStore` (``DRA_VECTOR_BACKEND=faiss``, default): one
  ``faiss.IndexIDMap2`` per named vector, exact ``IndexFlatIP`` while the store holds
  fewer than ``hnsw_threshold`` items, ``IndexHNSWFlat`` (inner product; Malkov &
  Yashunin 2018, as implemented by FAISS) above. Filters are FAISS ``IDSelectorBatch``
  search parameters. HNSW graphs cannot remove points: removed ids are tombstones
  (excluded by the selector) until more than a quarter of the graph is dead, then
  the graph is rebuilt. :meth:`persist` writes everything into ONE ``.npz`` file
  (temp file + ``os.replace``), so a killed process leaves either the previous or
  the new state, never a mix.
* :class:`MilvusVectorStore` (``DRA_VECTOR_BACKEND=milvus``): one pymilvus
  collection with one ``FLOAT_VECTOR`` field per name plus VARCHAR payload fields;
  filters are Milvus boolean expressions. A URI ending in ``.db`` opens an embedded
  milvus-lite file (tests); ``http://host:19530`` runs the same code against a
  Milvus server (``DRA_MILVUS_URI``).

:func:`open_vector_store` picks the backend from the settings.
"""

from __future__ import annotations

import io
import json
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from core.blas import import_faiss
from stores.atomic import atomic_write_bytes

faiss = import_faiss()

# Exact search below this many items, HNSW from it on. Chosen with bench/bench_vectors.py
# at d = 2568 and kept at the image vector's 520 (exact ~6 ms at 50k, HNSW build ~20 s on
# 2 cores): see the README's vector benchmark.
HNSW_THRESHOLD = 50_000
HNSW_M = 32
# graph build / search beam widths, measured at 1M synthetic clustered vectors (README): with
# efConstruction 80 recall@10 reached 0.93 at efSearch 128; 200 builds 1.2-1.7x longer and gives
# 0.97 at efSearch 96 (d = 520, the hub CLIP vector: 0.87 ms p50, one search thread)
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 96
# hnsw_storage="sq8": the graph walks 8-bit scalar-quantised codes, the best
# REFINE_FACTOR * k candidates are re-ranked exactly against the float vectors.
HNSW_STORAGES = ("flat", "sq8")
REFINE_FACTOR = 2.0
SQ8_RANGE_MARGIN = 0.05
PAYLOAD_KEYS = ("product", "defect_type")

Where = Mapping[str, "str | Iterable[str] | None"] | None


def _norm_where(where: Where) -> dict[str, set[str]]:
    """``{"product": "brick", "defect_type": None}`` -> ``{"product": {"brick"}}`` (None = no filter)."""
    out: dict[str, set[str]] = {}
    for key, val in (where or {}).items():
        if val is None:
            continue
        if key not in PAYLOAD_KEYS:
            raise ValueError(f"unknown filter field {key!r}; known: {PAYLOAD_KEYS}")
        out[key] = {val} if isinstance(val, str) else {str(v) for v in val}
    return out


class VectorStore(ABC):
    """Interface of a vector store with named vectors and exact payload filters.

    Args (of implementations):
        fields: ``{vector name: width}``, e.g. ``{"image": 2568, "caption": 384}``.

    Ids are int64 (callers map their own keys to them). Vectors are float32
    ``(N, width)``; scores are inner products (cosine for unit rows).
    """

    fields: dict[str, int]

    def _check_add(self, ids, vectors: Mapping[str, np.ndarray], payloads: list[dict]) -> np.ndarray:
        """Common argument checks of :meth:`add`; returns ``ids`` as int64 ``(N,)``."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if set(vectors) != set(self.fields):
            raise ValueError(f"vectors for fields {sorted(vectors)} given, expected {sorted(self.fields)}")
        if len(payloads) != len(ids):
            raise ValueError("one payload per id is required")
        return ids

    @abstractmethod
    def add(self, ids: np.ndarray, vectors: Mapping[str, np.ndarray], payloads: list[dict]) -> None:
        """Insert items: ``ids`` int64 ``(N,)``, one ``(N, width)`` array per field, one payload dict each.

        Raises:
            ValueError: wrong shapes, a missing field or an id already present.
        """

    @abstractmethod
    def remove(self, ids: Iterable[int]) -> int:
        """Remove items by id; returns how many existed."""

    @abstractmethod
    def search(self, field: str, queries: np.ndarray, k: int, where: Where = None) -> list[list[tuple[int, float]]]:
        """Top-``k`` ``(id, score)`` per query row (best first) on vector ``field``, payload-filtered.

        ``where``: ``{"product": "brick" | ["brick", "grass"] | None, "defect_type": ...}``.
        """

    @abstractmethod
    def get_vectors(self, field: str, ids: Iterable[int]) -> np.ndarray:
        """Stored vectors of ``field`` for ``ids``: float32 ``(len(ids), width)``.

        Raises:
            KeyError: an unknown id.
        """

    @abstractmethod
    def set_payload(self, item_id: int, payload: dict) -> None:
        """Replace the payload of one item (relabelling). Raises KeyError for an unknown id."""

    @abstractmethod
    def ids(self) -> list[int]:
        """Ids of the live items (any order)."""

    @abstractmethod
    def persist(self) -> None:
        """Make every change so far durable."""

    def __len__(self) -> int:
        return len(self.ids())

    def close(self) -> None:
        """Release connections (no-op for embedded stores)."""


class FaissVectorStore(VectorStore):
    """FAISS embedded store: exact ``IndexFlatIP`` below ``hnsw_threshold`` items, ``IndexHNSWFlat`` above.

    Args:
        fields: ``{name: width}``.
        path: the single ``.npz`` file :meth:`persist` writes (None: memory only).
        hnsw_threshold: item count from which the store switches to HNSW (and back
            below half of it after removals); default :data:`HNSW_THRESHOLD`.
        hnsw_m, ef_construction, ef_search: HNSW graph degree and beam widths.
        hnsw_storage: what the HNSW graph compares the query against while it walks:
            ``"flat"`` (default): the float32 vectors (``IndexHNSWFlat``);
            ``"sq8"``: 8-bit scalar-quantised codes, one byte per dimension, range per
            dimension trained on the vectors present when the graph is (re)built, widened
            by :data:`SQ8_RANGE_MARGIN` each side (``IndexHNSWSQ`` ``QT_8bit``). A quarter of
            the memory read per hop; the best ``refine_factor * k`` candidates are then
            re-ranked exactly against the float vectors kept beside the codes
            (``IndexRefineFlat``), so scores are exact inner products and
            :meth:`get_vectors` / rebuilds stay lossless. Costs ~1.25x the memory of
            ``"flat"``. Persisted with the store (a loaded store keeps its saved choice).
            Measured (bench/bench_vectors.py, 1M synthetic, 1 search thread): with the
            efConstruction-80 graph at d = 2568, efSearch 128 gave recall@10 0.931 in 1.63 ms
            p50 against 0.932 in 2.27 ms for ``"flat"``; with efConstruction 200 at d = 520,
            ``"flat"`` reaches 0.971 in 0.87 ms at efSearch 96 (sq8: 0.968 in 0.76 ms), so
            ``"flat"`` stays the default; at d = 2568 sq8 needs ~1.7 ms for 0.95.
        refine_factor: ``"sq8"`` only: candidates re-ranked per result (>= 1).

    A store whose file exists is loaded from it; fields must match.
    """

    def __init__(self, fields: Mapping[str, int], path: str | Path | None = None, hnsw_threshold: int = HNSW_THRESHOLD,
                 hnsw_m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION, ef_search: int = HNSW_EF_SEARCH,
                 hnsw_storage: str = "flat", refine_factor: float = REFINE_FACTOR):
        if hnsw_storage not in HNSW_STORAGES:
            raise ValueError(f"unknown hnsw_storage {hnsw_storage!r}; known: {HNSW_STORAGES}")
        if refine_factor < 1:
            raise ValueError(f"refine_factor must be >= 1, got {refine_factor}")
        self.fields = {str(k): int(v) for k, v in fields.items()}
        self.path = Path(path) if path is not None else None
        self.hnsw_storage, self.refine_factor = hnsw_storage, float(refine_factor)
        self.hnsw_threshold = int(hnsw_threshold)
        self.hnsw_m, self.ef_construction, self.ef_search = int(hnsw_m), int(ef_construction), int(ef_search)
        self._lock = threading.RLock()
        self.payload: dict[int, dict] = {}
        self.tombstones: set[int] = set()
        self.kind = "flat"
        self.indexes = {f: self._new_index(d, "flat") for f, d in self.fields.items()}
        if self.path is not None and self.path.is_file():
            self._load()

    # ---------------------------------------------------------------- internals
    def _new_index(self, dim: int, kind: str, train: np.ndarray | None = None):
        """Empty index of ``kind``; an ``"sq8"`` HNSW index is trained on (a stride sample of) ``train``."""
        if kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        if self.hnsw_storage == "flat":
            base = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            base.hnsw.efConstruction = self.ef_construction
            return faiss.IndexIDMap2(base)
        hnsw = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_8bit, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = self.ef_construction
        sq = faiss.downcast_index(hnsw.storage).sq
        sq.rangestat, sq.rangestat_arg = faiss.ScalarQuantizer.RS_minmax, SQ8_RANGE_MARGIN
        refine = faiss.IndexRefineFlat(hnsw)
        refine.k_factor = self.refine_factor
        if train is not None and len(train):
            # SQ training transposes its input: a stride sample keeps that copy small at 1M rows
            refine.train(np.ascontiguousarray(train[::max(1, len(train) // 100_000)]))
        return faiss.IndexIDMap2(refine)

    def _all_vectors(self, field: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 (n,), vectors (n, d)) of everything in the FAISS index of ``field`` (tombstones included)."""
        index = self.indexes[field]
        n = int(index.ntotal)
        if n == 0:
            return np.zeros(0, np.int64), np.zeros((0, self.fields[field]), np.float32)
        return faiss.vector_to_array(index.id_map).astype(np.int64), index.index.reconstruct_n(0, n)

    def _rebuild(self, kind: str) -> None:
        """Rebuild every index as ``kind`` from its live vectors (drops tombstones)."""
        for field, dim in self.fields.items():
            ids, vecs = self._all_vectors(field)
            keep = np.array([i not in self.tombstones for i in ids], bool) if len(ids) else np.zeros(0, bool)
            new = self._new_index(dim, kind, vecs[keep] if keep.any() else None)
            if keep.any():
                new.add_with_ids(np.ascontiguousarray(vecs[keep]), ids[keep])
            self.indexes[field] = new
        self.tombstones.clear()
        self.kind = kind

    def _maybe_switch(self) -> None:
        n = len(self.payload)
        if self.kind == "flat" and n >= self.hnsw_threshold:
            self._rebuild("hnsw")
        elif self.kind == "hnsw" and (n < self.hnsw_threshold // 2 or len(self.tombstones) > 0.25 * max(1, n)):
            self._rebuild("hnsw" if n >= self.hnsw_threshold // 2 else "flat")

    def _load(self) -> None:
        with np.load(self.path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta.json"]).decode("utf-8"))
            if meta["fields"] != self.fields:
                raise ValueError(f"{self.path} holds fields {meta['fields']}, expected {self.fields}")
            self.kind = meta["kind"]
            self.hnsw_storage = meta.get("hnsw_storage", "flat")
            self.refine_factor = float(meta.get("refine_factor", self.refine_factor))
            self.payload = {int(k): v for k, v in meta["payload"].items()}
            self.tombstones = {int(i) for i in meta["tombstones"]}
            self.indexes = {f: faiss.deserialize_index(z[f"{f}.faiss"]) for f in self.fields}

    # ---------------------------------------------------------------- interface
    def add(self, ids: np.ndarray, vectors: Mapping[str, np.ndarray], payloads: list[dict]) -> None:
        ids = self._check_add(ids, vectors, payloads)
        arrays = {}
        for f, d in self.fields.items():
            v = np.ascontiguousarray(np.asarray(vectors[f], np.float32).reshape(len(ids), -1))
            if v.shape[1] != d:
                raise ValueError(f"field {f!r}: width {v.shape[1]}, expected {d}")
            arrays[f] = v
        with self._lock:
            dup = [int(i) for i in ids if int(i) in self.payload or int(i) in self.tombstones]
            if dup or len(set(ids.tolist())) != len(ids):
                raise ValueError(f"ids already present: {dup[:5]}")
            if len(ids) == 0:
                return
            for f, v in arrays.items():
                self.indexes[f].add_with_ids(v, ids)
            for i, p in zip(ids, payloads):
                self.payload[int(i)] = {k: (None if p.get(k) is None else str(p.get(k))) for k in PAYLOAD_KEYS}
            self._maybe_switch()

    def remove(self, ids: Iterable[int]) -> int:
        with self._lock:
            gone = [int(i) for i in ids if int(i) in self.payload]
            for i in gone:
                del self.payload[i]
            if gone:
                if self.kind == "flat":
                    arr = np.array(gone, np.int64)
                    for index in self.indexes.values():
                        index.remove_ids(arr)
                else:
                    self.tombstones.update(gone)
                self._maybe_switch()
            return len(gone)

    def _selector(self, where: Where):
        conds = _norm_where(where)
        if not conds and not self.tombstones:
            return None, len(self.payload)
        allowed = [i for i, p in self.payload.items() if all(p.get(k) in v for k, v in conds.items())]
        return faiss.IDSelectorBatch(np.array(allowed, np.int64)), len(allowed)

    def search(self, field: str, queries: np.ndarray, k: int, where: Where = None) -> list[list[tuple[int, float]]]:
        q = np.ascontiguousarray(np.asarray(queries, np.float32).reshape(-1, self.fields[field]))
        with self._lock:
            sel, n_allowed = self._selector(where)
            k_eff = min(int(k), n_allowed)
            if k_eff <= 0:
                return [[] for _ in range(len(q))]
            if self.kind == "hnsw" and self.hnsw_storage == "sq8":
                n_cand = int(np.ceil(self.refine_factor * k_eff))
                hnsw_params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, n_cand))
                if sel is not None:  # the graph sees internal row numbers: translate through the id map
                    translated = faiss.IDSelectorTranslated(self.indexes[field].id_map, sel)
                    hnsw_params.sel = translated
                params = faiss.IndexRefineSearchParameters(k_factor=self.refine_factor, base_index_params=hnsw_params)
            elif self.kind == "hnsw":
                params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k_eff))
                if sel is not None:
                    params.sel = sel
            else:
                params = faiss.SearchParameters(sel=sel) if sel is not None else None
            scores, ids = self.indexes[field].search(q, k_eff, params=params)
        return [[(int(i), float(s)) for i, s in zip(irow, srow) if i >= 0] for irow, srow in zip(ids, scores)]

    def get_vectors(self, field: str, ids: Iterable[int]) -> np.ndarray:
        ids = [int(i) for i in ids]
        with self._lock:
            missing = [i for i in ids if i not in self.payload]
            if missing:
                raise KeyError(f"unknown ids: {missing[:5]}")
            index = self.indexes[field]
            if not ids:
                return np.zeros((0, self.fields[field]), np.float32)
            return np.stack([index.reconstruct(i) for i in ids]).astype(np.float32)

    def set_payload(self, item_id: int, payload: dict) -> None:
        with self._lock:
            if int(item_id) not in self.payload:
                raise KeyError(item_id)
            self.payload[int(item_id)] = {k: (None if payload.get(k) is None else str(payload[k])) for k in PAYLOAD_KEYS}

    def ids(self) -> list[int]:
        with self._lock:
            return list(self.payload)

    def to_bytes(self) -> bytes:
        """The whole store as one ``.npz`` (serialized FAISS indexes + JSON metadata)."""
        with self._lock:
            meta = {"fields": self.fields, "kind": self.kind, "payload": {str(k): v for k, v in self.payload.items()},
                    "tombstones": sorted(self.tombstones), "hnsw_storage": self.hnsw_storage,
                    "refine_factor": self.refine_factor}
            arrays = {f"{f}.faiss": faiss.serialize_index(ix) for f, ix in self.indexes.items()}
            arrays["meta.json"] = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8)
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            return buf.getvalue()

    def persist(self) -> None:
        if self.path is None:
            return
        atomic_write_bytes(self.path, self.to_bytes())


def _milvus_literal(value: str) -> str:
    return json.dumps(str(value), ensure_ascii=False)


class MilvusVectorStore(VectorStore):
    """Milvus store (pymilvus ``MilvusClient``): one collection, one FLOAT_VECTOR field per name.

    Args:
        fields: ``{name: width}``.
        uri: ``/path/file.db`` (embedded milvus-lite) or ``http://host:19530`` (server).
        collection: collection name; created when missing (fields must match otherwise).
        token: server credentials (``user:password``) if any.
        index_type: ``"FLAT"`` (exact; default for milvus-lite) or e.g. ``"HNSW"`` /
            ``"AUTOINDEX"`` for a server; default: FLAT for ``.db`` URIs, HNSW otherwise.

    Payload strings ``None`` are stored as ``""``. Strong consistency: a write is
    visible to the next search.
    """

    def __init__(self, fields: Mapping[str, int], uri: str, collection: str = "defects", token: str = "",
                 index_type: str | None = None, hnsw_m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION,
                 ef_search: int = HNSW_EF_SEARCH):
        from pymilvus import DataType, MilvusClient

        self.fields = {str(k): int(v) for k, v in fields.items()}
        self.uri, self.collection = str(uri), collection
        if self.uri.endswith(".db"):
            Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
        self.index_type = index_type or ("FLAT" if self.uri.endswith(".db") else "HNSW")
        self.ef_search = int(ef_search)
        self._lock = threading.RLock()
        self.client = MilvusClient(uri=self.uri, token=token) if token else MilvusClient(uri=self.uri)
        if not self.client.has_collection(collection):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            for f, d in self.fields.items():
                schema.add_field(f, DataType.FLOAT_VECTOR, dim=d)
            for key in PAYLOAD_KEYS:
                schema.add_field(key, DataType.VARCHAR, max_length=256)
            params = self.client.prepare_index_params()
            for f in self.fields:
                extra = {"M": hnsw_m, "efConstruction": ef_construction} if self.index_type == "HNSW" else {}
                params.add_index(field_name=f, index_type=self.index_type, metric_type="IP", params=extra)
            self.client.create_collection(collection, schema=schema, index_params=params, consistency_level="Strong")
        else:
            desc = self.client.describe_collection(collection)
            have = {f["name"]: int(f.get("params", {}).get("dim", 0)) for f in desc["fields"]
                    if f.get("params", {}).get("dim")}
            if have != self.fields:
                raise ValueError(f"collection {collection!r} at {uri} holds vector fields {have}, expected {self.fields}")
        self.client.load_collection(collection)

    def _where_expr(self, where: Where) -> str:
        parts = []
        for key, vals in _norm_where(where).items():
            parts.append(f"{key} in [{', '.join(_milvus_literal(v) for v in sorted(vals))}]")
        return " and ".join(parts)

    def add(self, ids: np.ndarray, vectors: Mapping[str, np.ndarray], payloads: list[dict]) -> None:
        ids = self._check_add(ids, vectors, payloads)
        arrays = {f: np.asarray(vectors[f], np.float32).reshape(len(ids), -1) for f in self.fields}
        for f, v in arrays.items():
            if v.shape[1] != self.fields[f]:
                raise ValueError(f"field {f!r}: width {v.shape[1]}, expected {self.fields[f]}")
        with self._lock:
            if len(ids) == 0:
                return
            if len(set(ids.tolist())) != len(ids) or self.client.get(self.collection, ids=ids.tolist(), output_fields=["id"]):
                raise ValueError("ids already present")
            rows = []
            for j, i in enumerate(ids):
                row = {"id": int(i), **{f: arrays[f][j].tolist() for f in self.fields}}
                row.update({k: "" if payloads[j].get(k) is None else str(payloads[j][k]) for k in PAYLOAD_KEYS})
                rows.append(row)
            for start in range(0, len(rows), 1000):
                self.client.insert(self.collection, rows[start:start + 1000])

    def remove(self, ids: Iterable[int]) -> int:
        ids = [int(i) for i in ids]
        with self._lock:
            if not ids:
                return 0
            present = self.client.get(self.collection, ids=ids, output_fields=["id"])
            if present:
                self.client.delete(self.collection, ids=[int(r["id"]) for r in present])
            return len(present)

    def search(self, field: str, queries: np.ndarray, k: int, where: Where = None) -> list[list[tuple[int, float]]]:
        q = np.asarray(queries, np.float32).reshape(-1, self.fields[field])
        if k <= 0 or len(q) == 0:
            return [[] for _ in range(len(q))]
        params = {"metric_type": "IP"}
        if self.index_type == "HNSW":
            params["params"] = {"ef": max(self.ef_search, int(k))}
        with self._lock:
            res = self.client.search(self.collection, data=q.tolist(), anns_field=field, limit=int(k),
                                     filter=self._where_expr(where), search_params=params, output_fields=["id"])
        return [[(int(h["id"]), float(h["distance"])) for h in row] for row in res]

    def get_vectors(self, field: str, ids: Iterable[int]) -> np.ndarray:
        ids = [int(i) for i in ids]
        if not ids:
            return np.zeros((0, self.fields[field]), np.float32)
        with self._lock:
            rows = {int(r["id"]): r[field] for r in self.client.get(self.collection, ids=ids, output_fields=[field])}
        missing = [i for i in ids if i not in rows]
        if missing:
            raise KeyError(f"unknown ids: {missing[:5]}")
        return np.asarray([rows[i] for i in ids], np.float32)

    def set_payload(self, item_id: int, payload: dict) -> None:
        with self._lock:
            rows = self.client.get(self.collection, ids=[int(item_id)], output_fields=["id", *self.fields])
            if not rows:
                raise KeyError(item_id)
            row = {"id": int(item_id), **{f: list(rows[0][f]) for f in self.fields}}
            row.update({k: "" if payload.get(k) is None else str(payload[k]) for k in PAYLOAD_KEYS})
            self.client.upsert(self.collection, [row])

    def ids(self) -> list[int]:
        with self._lock:
            out: list[int] = []
            it = self.client.query_iterator(self.collection, batch_size=1000, filter="id >= 0", output_fields=["id"])
            while True:
                batch = it.next()
                if not batch:
                    it.close()
                    break
                out.extend(int(r["id"]) for r in batch)
            return out

    def __len__(self) -> int:
        with self._lock:
            res = self.client.query(self.collection, filter="", output_fields=["count(*)"])
            return int(res[0]["count(*)"])

    def persist(self) -> None:
        with self._lock:
            self.client.flush(self.collection)

    def close(self) -> None:
        self.client.close()


def open_vector_store(settings, fields: Mapping[str, int], name: str = "defects") -> VectorStore:
    """The store configured in ``settings``: ``vector_backend`` ``"faiss"`` (file under
    ``settings.index_dir``) or ``"milvus"`` (``settings.milvus_uri``; empty: a milvus-lite file
    under ``settings.index_dir``), collection / file named after ``name``.

    Raises:
        ValueError: an unknown backend.
    """
    backend = getattr(settings, "vector_backend", "faiss") or "faiss"
    index_dir = Path(settings.index_dir)
    if backend == "faiss":
        return FaissVectorStore(fields, index_dir / f"{name}.vectors.npz",
                                hnsw_threshold=int(getattr(settings, "faiss_hnsw_threshold", HNSW_THRESHOLD)))
    if backend == "milvus":
        uri = getattr(settings, "milvus_uri", "") or str(index_dir / "milvus.db")
        return MilvusVectorStore(fields, uri, collection=name, token=getattr(settings, "milvus_token", "") or "")
    raise ValueError(f"unknown vector backend {backend!r}; known: faiss, milvus")
