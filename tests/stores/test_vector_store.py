"""Vector stores: real FAISS (exact and HNSW) and real Milvus (milvus-lite file) on random unit vectors."""

from __future__ import annotations

import numpy as np
import pytest

from core.blas import import_faiss
from stores.vector_store import FaissVectorStore, MilvusVectorStore

faiss = import_faiss()

FIELDS = {"image": 32, "caption": 16}
PRODUCTS = ("brick", "gravel", "grass")
TYPES = ("scratch", "hole", None)


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.arange(1000, 1000 + n, dtype=np.int64)
    vecs = {f: _unit(rng, n, d) for f, d in FIELDS.items()}
    payloads = [{"product": PRODUCTS[i % 3], "defect_type": TYPES[(i // 3) % 3]} for i in range(n)]
    return ids, vecs, payloads


def _exact(ids, vecs, payloads, field, q, k, where=None):
    keep = np.array([all(p[key] == v for key, v in (where or {}).items()) for p in payloads])
    s = vecs[field][keep] @ q
    order = np.argsort(-s)[:k]
    return [int(i) for i in ids[keep][order]]


def _stores(tmp_path):
    return {"faiss-flat": FaissVectorStore(FIELDS, tmp_path / "flat.npz", hnsw_threshold=10**9),
            "faiss-hnsw": FaissVectorStore(FIELDS, tmp_path / "hnsw.npz", hnsw_threshold=1),
            "milvus": MilvusVectorStore(FIELDS, str(tmp_path / "milvus.db"), collection="t")}


def test_all_backends_agree_with_exact_search_and_each_other(tmp_path):
    ids, vecs, payloads = _data()
    stores = _stores(tmp_path)
    for s in stores.values():
        s.add(ids, vecs, payloads)
    assert stores["faiss-hnsw"].kind == "hnsw" and stores["faiss-flat"].kind == "flat"
    rng = np.random.default_rng(1)
    queries = {f: _unit(rng, 10, d) for f, d in FIELDS.items()}
    for field in FIELDS:
        for where in (None, {"product": "gravel"}, {"product": "brick", "defect_type": "hole"}):
            for qi, q in enumerate(queries[field]):
                want = _exact(ids, vecs, payloads, field, q, 5, where)
                got = {name: [i for i, _ in s.search(field, q[None], 5, where)[0]] for name, s in stores.items()}
                assert got["faiss-flat"] == want, (field, where, qi)
                assert got["milvus"] == want, (field, where, qi)  # same top results on both backends
                assert got["faiss-hnsw"][:3] == want[:3], (field, where, qi)
    # scores are inner products of the stored vectors
    hit = stores["milvus"].search("image", queries["image"][:1], 1)[0][0]
    assert hit[1] == pytest.approx(float(vecs["image"][hit[0] - 1000] @ queries["image"][0]), abs=1e-5)
    for s in stores.values():
        np.testing.assert_allclose(s.get_vectors("caption", [1003, 1001]), vecs["caption"][[3, 1]], atol=1e-6)
        with pytest.raises(KeyError):
            s.get_vectors("image", [5])
        with pytest.raises(ValueError):
            s.add(ids[:1], {f: v[:1] for f, v in vecs.items()}, payloads[:1])  # duplicate id
        s.close()


def test_remove_relabel_persist_reload(tmp_path):
    ids, vecs, payloads = _data(120, seed=3)
    for name in ("faiss-flat", "faiss-hnsw", "milvus"):
        store = _stores(tmp_path / name)[name]
        store.add(ids, vecs, payloads)
        q = vecs["image"][7][None]
        assert store.search("image", q, 1)[0][0][0] == 1007
        assert store.remove([1007, 999_999]) == 1 and len(store) == 119
        assert all(i != 1007 for i, _ in store.search("image", q, 10)[0])
        store.set_payload(1010, {"product": "grass", "defect_type": "crack"})
        hits = store.search("image", vecs["image"][10][None], 3, {"defect_type": "crack"})[0]
        assert [i for i, _ in hits] == [1010]
        with pytest.raises(KeyError):
            store.set_payload(1007, {"product": "brick"})
        store.persist()
        store.close()
        again = _stores(tmp_path / name)[name]
        assert len(again) == 119 and sorted(again.ids()) == sorted(set(ids.tolist()) - {1007})
        assert [i for i, _ in again.search("image", vecs["image"][10][None], 3, {"defect_type": "crack"})[0]] == [1010]
        assert again.search("caption", vecs["caption"][20][None], 1)[0][0][0] == 1020
        again.close()


def test_faiss_switches_exact_to_hnsw_and_compacts(tmp_path):
    ids, vecs, payloads = _data(200, seed=5)
    store = FaissVectorStore(FIELDS, tmp_path / "s.npz", hnsw_threshold=100)
    store.add(ids[:99], {f: v[:99] for f, v in vecs.items()}, payloads[:99])
    assert store.kind == "flat"
    store.add(ids[99:], {f: v[99:] for f, v in vecs.items()}, payloads[99:])
    assert store.kind == "hnsw" and len(store) == 200
    store.remove(ids[:10].tolist())
    assert store.tombstones == set(ids[:10].tolist())
    assert all(i >= 1010 for i, _ in store.search("image", vecs["image"][:5], 5)[0])
    store.remove(ids[10:120].tolist())  # 80 left, 120 dead > 25 %: the graph is rebuilt without them
    assert store.kind == "hnsw" and not store.tombstones and store.indexes["image"].ntotal == 80
    store.remove(ids[120:160].tolist())  # 40 left: below threshold / 2 -> exact search again
    assert store.kind == "flat" and store.indexes["image"].ntotal == 40
    assert store.search("image", vecs["image"][170][None], 1)[0][0][0] == 1170
    with pytest.raises(ValueError):
        store.add(ids[:1], {"image": vecs["image"][:1]}, payloads[:1])  # a field missing
    store.persist()
    with pytest.raises(ValueError):
        FaissVectorStore({"image": 8}, tmp_path / "s.npz")  # other fields than the persisted ones


def _clustered(rng, n, d, centres):
    x = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, d)).astype(np.float32) * (0.6 / np.sqrt(d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_faiss_hnsw_sq8_recall_filters_rebuild_and_persistence(tmp_path):
    """hnsw_storage="sq8": SQ8 graph + exact re-ranking; same answers as exact search on clustered data."""
    rng = np.random.default_rng(11)
    d, n = 96, 3000
    centres = _unit(rng, 16, d)
    vecs = _clustered(rng, n, d, centres)
    ids = np.arange(5000, 5000 + n, dtype=np.int64)
    payloads = [{"product": PRODUCTS[i % 3], "defect_type": None} for i in range(n)]
    with pytest.raises(ValueError):
        FaissVectorStore({"image": d}, None, hnsw_storage="pq")
    with pytest.raises(ValueError):
        FaissVectorStore({"image": d}, None, hnsw_storage="sq8", refine_factor=0.5)
    path = tmp_path / "sq8.npz"
    store = FaissVectorStore({"image": d}, path, hnsw_threshold=1000, hnsw_storage="sq8", refine_factor=2)
    store.add(ids[:1500], {"image": vecs[:1500]}, payloads[:1500])  # switches to HNSW, SQ trained on these
    store.add(ids[1500:], {"image": vecs[1500:]}, payloads[1500:])  # later rows go through the trained SQ
    assert store.kind == "hnsw"
    inner = faiss.downcast_index(store.indexes["image"].index)
    assert isinstance(inner, faiss.IndexRefine)
    assert isinstance(faiss.downcast_index(inner.base_index), faiss.IndexHNSWSQ)
    queries = _clustered(rng, 50, d, centres)
    truth = np.argsort(-(vecs @ queries.T), axis=0)[:10].T + 5000

    def recall(s, where=None, keep=None):
        got = s.search("image", queries, 10, where)
        want = truth if keep is None else [
            [int(ids[keep][j]) for j in np.argsort(-(vecs[keep] @ q))[:10]] for q in queries]
        return np.mean([len({i for i, _ in g} & set(w)) / 10 for g, w in zip(got, want)]), got

    r, got = recall(store)
    assert r >= 0.95
    # scores are exact inner products (re-ranked against the float vectors), best first
    for g, q in zip(got[:5], queries[:5]):
        np.testing.assert_allclose([s for _, s in g], [float(vecs[i - 5000] @ q) for i, _ in g], atol=1e-5)
        assert [s for _, s in g] == sorted((s for _, s in g), reverse=True)
    # the re-rank factor is what buys the recall: 1 = plain SQ8 order
    store.refine_factor = 1.0
    r1, _ = recall(store)
    store.refine_factor = 2.0
    assert r >= r1
    # filters go through the id map into the graph
    keep = np.array([p["product"] == "gravel" for p in payloads])
    rf, got = recall(store, {"product": "gravel"}, keep)
    assert rf >= 0.95 and all(payloads[i - 5000]["product"] == "gravel" for g in got for i, _ in g)
    # stored vectors stay exact (the float copy), not SQ8 reconstructions
    np.testing.assert_array_equal(store.get_vectors("image", [5003, 7999]), vecs[[3, 2999]])
    # persistence keeps the storage choice; a reloaded store answers the same
    store.persist()
    again = FaissVectorStore({"image": d}, path, hnsw_threshold=1000)  # storage from the file, not the args
    assert again.hnsw_storage == "sq8" and again.refine_factor == 2.0 and again.kind == "hnsw"
    assert [[i for i, _ in g] for g in again.search("image", queries, 10)] == \
        [[i for i, _ in g] for g in store.search("image", queries, 10)]
    # tombstones (excluded by the translated selector), then compaction (> 25 % dead) rebuilds an sq8 graph
    top = [i for i, _ in again.search("image", queries[:1], 10)[0]]
    again.remove(top[:3])
    assert again.tombstones == set(top[:3])
    assert not set(top[:3]) & {i for i, _ in again.search("image", queries[:1], 10)[0]}
    dead = ids[:1000].tolist()
    again.remove(dead)
    gone = len(set(dead) | set(top[:3]))
    assert again.kind == "hnsw" and not again.tombstones and again.indexes["image"].ntotal == n - gone
    assert isinstance(faiss.downcast_index(faiss.downcast_index(again.indexes["image"].index).base_index),
                      faiss.IndexHNSWSQ)
    live = np.ones(n, bool)
    live[:1000] = False
    live[[i - 5000 for i in top[:3]]] = False
    r_live, got = recall(again, None, live)
    assert r_live >= 0.95 and all(i >= 6000 for g in got for i, _ in g)
    np.testing.assert_array_equal(again.get_vectors("image", [6000]), vecs[[1000]])
    # an old file without the field loads as the default flat storage
    flat = FaissVectorStore({"image": d}, tmp_path / "flat.npz", hnsw_threshold=1000)
    flat.add(ids, {"image": vecs}, payloads)
    flat.persist()
    assert FaissVectorStore({"image": d}, tmp_path / "flat.npz").hnsw_storage == "flat"
