"""Vector backends at scale, side by side in one process: FAISS exact (the anchor), FAISS HNSW, Milvus.

    python bench/bench_vectors.py [--sizes 10000 100000] [--dim 520] [--queries 200] [--k 10]
                                  [--backends exact hnsw hnsw-sq8 milvus] [--milvus-max 100000] [--threads 2]
                                  [--search-threads 1] [--ef-search 16 32 64] [--refine 1 2]
    python bench/bench_vectors.py --small          # CI mode: 2,000 x 64-d, exact / hnsw / milvus
    python bench/bench_vectors.py --sizes 1000000 --backends exact hnsw hnsw-sq8 --search-threads 1 \
        --ef-search 64 96 128                      # 1M x 520: streamed, one 2.1 GB copy at a time

Every backend is the project's own store class (:mod:`stores.vector_store`), so the
figures include its Python wrapper: ``FaissVectorStore`` with ``IndexFlatIP`` (exact),
``FaissVectorStore`` with ``IndexHNSWFlat`` (M, efConstruction, efSearch from the
module), ``hnsw-sq8``: the same store with ``hnsw_storage="sq8"`` (HNSW over 8-bit
codes + exact re-ranking of ``--refine-factor`` x k candidates), ``MilvusVectorStore`` on a milvus-lite file (its FLAT index; a Milvus server
would use HNSW through the same class).

Data: synthetic L2-normalised vectors of the image index's width (``--dim``, default
520: the offline profile's 512-d projected EfficientNet-Lite0 global part + 8 defect dims,
the same width as the hub profile's open_clip ViT-B-32 512 + 8; ``--dim 2568`` is the
unprojected offline vector, ``DRA_IMAGE_GLOBAL_DIM=0``) drawn around 256
random cluster centres (real embeddings are clustered; uniform random vectors make
HNSW look worse than it is); queries are fresh draws from the same mixture, never in
the store. Per backend and size: query latency p50 / p95 (one query per call, ms),
recall@k against the exact top-k, build time (s; insert + index), memory (MiB: RSS
growth of this process, plus the milvus-lite server process for Milvus), and each
figure's ratio against exact search on the same data. ``--ef-search`` (and ``--refine``
for hnsw-sq8) adds a latency / recall curve at other beam widths. Prints a table and,
last, one JSON line.

Sizes above ``--stream-above`` (200k) are never materialised: blocks of
:func:`synthetic_chunks` go straight into each store in turn (pre-sized FAISS arrays),
the exact store's batched search gives the ground truth, and its latency is timed on
``--exact-queries`` single queries. Single-query latency is sensitive to OpenMP: on a
machine whose cores are busy, 2 threads wait on each other for a scheduler tick per
call (p50 pinned near 4 / 8 / 16 ms); ``--search-threads 1`` times the queries on one.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.settings import apply_runtime_env  # noqa: E402

apply_runtime_env()  # before torch / faiss / transformers load

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from core.blas import import_faiss  # noqa: E402
from stores.vector_store import (HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, REFINE_FACTOR,  # noqa: E402
                                 FaissVectorStore, MilvusVectorStore)

faiss = import_faiss()

DEFAULT_DIM = 512 + 8  # core.settings image_global_dim + image_index.DEFECT_DIM


CHUNK = 20_000


def synthetic_chunks(n: int, dim: int, seed: int, n_centres: int = 256, spread: float = 0.6):
    """Yield ``synthetic(n, dim, seed)`` as consecutive float32 row blocks of at most :data:`CHUNK` rows.

    Same random stream, same rows (up to float32 rounding of the normalisation, which can depend
    on buffer alignment: <= 3e-8 per entry) as ``synthetic(...)``, so a
    1M x 2568 set (10.3 GB) can be streamed into an index without ever existing as one array.
    """
    centres = np.random.default_rng(0).standard_normal((n_centres, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    for s in range(0, n, CHUNK):
        m = min(CHUNK, n - s)
        noise = rng.standard_normal((m, dim)).astype(np.float32) * (spread / np.sqrt(dim))
        x = centres[rng.integers(0, n_centres, m)] + noise
        yield x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic(n: int, dim: int, seed: int, n_centres: int = 256, spread: float = 0.6) -> np.ndarray:
    """``n`` unit vectors float32 ``(n, dim)`` around ``n_centres`` shared random centres (centres from seed 0)."""
    out = np.empty((n, dim), np.float32)
    s = 0
    for block in synthetic_chunks(n, dim, seed, n_centres, spread):
        out[s:s + len(block)] = block
        s += len(block)
    return out


def _rss_mib() -> float:
    proc = psutil.Process()
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def _pct(ms: list[float]) -> tuple[float, float]:
    a = np.asarray(ms)
    return float(np.percentile(a, 50)), float(np.percentile(a, 95))


BACKENDS = ("exact", "hnsw", "hnsw-sq8", "milvus")
HNSW_BACKENDS = ("hnsw", "hnsw-sq8")


# HNSW graph of the FAISS backends (--hnsw-m, --ef-construction; default: the store's)
GRAPH = {"hnsw_m": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION}


def _make_store(name: str, fields: dict, workdir: Path, n: int, refine_factor: float):
    if name == "exact":
        return FaissVectorStore(fields, None, hnsw_threshold=10**12)
    if name == "hnsw":
        return FaissVectorStore(fields, None, hnsw_threshold=0, **GRAPH)
    if name == "hnsw-sq8":
        return FaissVectorStore(fields, None, hnsw_threshold=0, hnsw_storage="sq8", refine_factor=refine_factor,
                                **GRAPH)
    if name == "milvus":
        return MilvusVectorStore(fields, str(workdir / f"bench_{n}.db"), collection="bench")
    raise ValueError(name)


def _reserve(store, n: int) -> None:
    """Pre-size the FAISS code arrays of ``store`` for ``n`` rows (streamed builds only).

    ``IndexFlatCodes.add`` grows a ``std::vector``, which doubles its capacity: near 1M x 2568
    that briefly holds the old 6.6 GB buffer and the new one. Resizing once to the final size
    (then back to the rows already present; the capacity stays) keeps exactly one copy.
    """
    def walk(ix):
        ix = faiss.downcast_index(ix)
        if isinstance(ix, faiss.IndexIDMap2) or isinstance(ix, faiss.IndexIDMap):
            walk(ix.index)
        elif isinstance(ix, faiss.IndexHNSW):
            walk(ix.storage)
        elif isinstance(ix, faiss.IndexRefine):
            walk(ix.base_index)
            walk(ix.refine_index)
        elif isinstance(ix, faiss.IndexFlatCodes):
            have = ix.codes.size()
            ix.codes.resize(n * ix.code_size)
            ix.codes.resize(have)
    for index in store.indexes.values():
        walk(index)


SEARCH_THREADS: int | None = None  # FAISS threads while timing queries (None: the build's); set by main()


def _measure(store, queries: np.ndarray, k: int, truth: np.ndarray | None) -> tuple[float, float, float, np.ndarray]:
    """p50 ms, p95 ms, recall@k (1.0 when ``truth`` is None) and the ids, one query per call."""
    build_threads = faiss.omp_get_max_threads()
    if SEARCH_THREADS:
        faiss.omp_set_num_threads(SEARCH_THREADS)
    try:
        return _measure_calls(store, queries, k, truth)
    finally:
        faiss.omp_set_num_threads(build_threads)


def _measure_calls(store, queries, k, truth):
    for q in queries[:5]:  # warm-up
        store.search("image", q[None], k)
    lat, got = [], []
    for q in queries:
        t = time.perf_counter()
        res = store.search("image", q[None], k)[0]
        lat.append((time.perf_counter() - t) * 1000)
        got.append([i for i, _ in res] + [-1] * (k - len(res)))
    got = np.asarray(got, np.int64)
    p50, p95 = _pct(lat)
    recall = 1.0 if truth is None else float(np.mean([len(set(g) & set(t)) / k for g, t in zip(got, truth)]))
    return p50, p95, recall, got


def _curve(name: str, store, queries: np.ndarray, k: int, truth: np.ndarray | None, ef_values: list[int],
           refine_values: list[float]) -> list[dict]:
    """Latency / recall at other efSearch (and, for hnsw-sq8, re-rank factor) values; restores the store's."""
    if name not in HNSW_BACKENDS or truth is None:
        return []
    ef0, rf0 = store.ef_search, store.refine_factor
    out = []
    for rf in (refine_values if name == "hnsw-sq8" else [rf0]):
        for ef in ef_values:
            store.ef_search, store.refine_factor = ef, rf
            p50, p95, recall, _ = _measure(store, queries, k, truth)
            point = {"efSearch": ef, "p50_ms": p50, "p95_ms": p95, "recall_at_k": recall}
            if name == "hnsw-sq8":
                point["refine_factor"] = rf
            out.append(point)
            print(f"    {name} efSearch={ef:4d}" + (f" refine={rf:g}" if name == "hnsw-sq8" else "")
                  + f": p50 {p50:.3f} ms, p95 {p95:.3f} ms, recall@{k} {recall:.3f}", file=sys.stderr, flush=True)
    store.ef_search, store.refine_factor = ef0, rf0
    return out


def _row(name, n, dim, p50, p95, recall, build_s, mem) -> dict:
    return {"backend": name, "n": n, "dim": dim, "p50_ms": p50, "p95_ms": p95, "recall_at_k": recall,
            "build_s": build_s, "memory_mib": mem}


def run_backend(name: str, base: np.ndarray, queries: np.ndarray, k: int, truth: np.ndarray | None,
                workdir: Path, ef_values: list[int] = (), refine_values: list[float] = (),
                refine_factor: float = 2.0) -> tuple[dict, np.ndarray]:
    dim = base.shape[1]
    fields = {"image": dim}
    gc.collect()
    mem0 = _rss_mib()
    t0 = time.perf_counter()
    store = _make_store(name, fields, workdir, len(base), refine_factor)
    ids = np.arange(len(base), dtype=np.int64)
    payload = [{"product": None, "defect_type": None}] * len(base)
    step = 2000 if name == "milvus" else len(base)
    for s in range(0, len(base), step):
        store.add(ids[s:s + step], {"image": base[s:s + step]}, payload[s:s + step])
    store.persist()
    build_s = time.perf_counter() - t0
    mem = _rss_mib() - mem0
    p50, p95, recall, got = _measure(store, queries, k, truth)
    row = _row(name, len(base), dim, p50, p95, recall, build_s, mem)
    curve = _curve(name, store, queries, k, truth, list(ef_values), list(refine_values))
    if curve:
        row["curve"] = curve
    store.close()
    del store
    gc.collect()
    return row, got


def run_backend_streamed(name: str, n: int, dim: int, queries: np.ndarray, k: int, truth: np.ndarray | None,
                         exact_queries: int, ef_values: list[int] = (), refine_values: list[float] = (),
                         refine_factor: float = 2.0) -> tuple[dict, np.ndarray | None]:
    """Like :func:`run_backend`, for sets too big to hold twice (1M x 2568 = 10.3 GB).

    The data are generated block by block (:func:`synthetic_chunks`, seed 1, the same rows as
    :func:`synthetic`) and each block goes straight into the store, whose FAISS arrays are pre-sized
    (:func:`_reserve`): only the index holds the vectors. Build time excludes the generation
    (reported as ``gen_s``). For ``exact`` the returned ids are the ground truth: one batched exact
    search of all queries (FAISS BLAS path); its latency row times only the first
    ``exact_queries`` single-query calls (a 1M exact query reads all 10.3 GB).
    """
    fields = {"image": dim}
    gc.collect()
    mem0 = _rss_mib()
    gen_s = 0.0
    t0 = time.perf_counter()
    store = _make_store(name, fields, Path("."), n, refine_factor)
    payload = [{"product": None, "defect_type": None}] * CHUNK
    s = 0
    chunks = synthetic_chunks(n, dim, seed=1)
    while True:
        tg = time.perf_counter()
        block = next(chunks, None)
        gen_s += time.perf_counter() - tg
        if block is None:
            break
        store.add(np.arange(s, s + len(block), dtype=np.int64), {"image": block}, payload[:len(block)])
        if s == 0:
            _reserve(store, n)  # after the first add: a threshold-0 store has just switched to HNSW
        s += len(block)
        if (s // CHUNK) % 10 == 0:
            print(f"    {name}: {s:,} / {n:,} added, {time.perf_counter() - t0:.0f} s, RSS {_rss_mib():.0f} MiB",
                  file=sys.stderr, flush=True)
        del block
    store.persist()
    build_s = time.perf_counter() - t0 - gen_s
    mem = _rss_mib() - mem0
    if name == "exact":
        p50, p95, _, _ = _measure(store, queries[:exact_queries], k, None)
        res = store.search("image", queries, k)
        got = np.asarray([[i for i, _ in r] + [-1] * (k - len(r)) for r in res], np.int64)
        row = _row(name, n, dim, p50, p95, 1.0, build_s, mem)
        row["latency_queries"] = min(exact_queries, len(queries))
    else:
        p50, p95, recall, got = _measure(store, queries, k, truth)
        row = _row(name, n, dim, p50, p95, recall, build_s, mem)
        curve = _curve(name, store, queries, k, truth, list(ef_values), list(refine_values))
        if curve:
            row["curve"] = curve
    row["gen_s"] = gen_s
    row["streamed"] = True
    store.close()
    del store
    gc.collect()
    return row, got


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dim", type=int, default=DEFAULT_DIM)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--backends", nargs="+", default=["exact", "hnsw", "milvus"], choices=list(BACKENDS))
    ap.add_argument("--milvus-max", type=int, default=100_000, help="skip Milvus above this many vectors")
    ap.add_argument("--threads", type=int, default=2, help="FAISS OpenMP threads (build, and search by default)")
    ap.add_argument("--search-threads", type=int, default=None,
                    help="FAISS OpenMP threads while timing single queries (default: --threads)")
    ap.add_argument("--stream-above", type=int, default=200_000,
                    help="sizes above this are generated block by block straight into each index")
    ap.add_argument("--exact-queries", type=int, default=20,
                    help="streamed sizes: single exact queries timed (ground truth still covers all queries)")
    ap.add_argument("--ef-search", type=int, nargs="*", default=[],
                    help="HNSW backends: also measure latency / recall at these efSearch values")
    ap.add_argument("--refine", type=float, nargs="*", default=None,
                    help="hnsw-sq8: re-rank factors for the efSearch curve (default: the store's)")
    ap.add_argument("--refine-factor", type=float, default=REFINE_FACTOR, help="hnsw-sq8: the store's re-rank factor")
    ap.add_argument("--hnsw-m", type=int, default=HNSW_M, help="HNSW graph degree M (default: the store's)")
    ap.add_argument("--ef-construction", type=int, default=HNSW_EF_CONSTRUCTION,
                    help="HNSW build beam width (default: the store's)")
    ap.add_argument("--small", action="store_true", help="CI mode: 2,000 x 64-d, 50 queries")
    args = ap.parse_args(argv)
    if args.small:
        args.sizes, args.dim, args.queries = [2000], 64, 50
    faiss.omp_set_num_threads(args.threads)
    global SEARCH_THREADS
    SEARCH_THREADS = args.search_threads
    GRAPH.update(hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
    refine_values = args.refine if args.refine else [args.refine_factor]
    backends = ["exact"] + [b for b in args.backends if b != "exact"]  # the anchor first
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_vectors_") as tmp:
        for n in args.sizes:
            streamed = n > args.stream_above
            base = None if streamed else synthetic(n, args.dim, seed=1)
            queries = synthetic(args.queries, args.dim, seed=2)
            truth = None
            anchor = None
            for name in backends:
                if name == "milvus" and n > args.milvus_max:
                    rows.append({"backend": name, "n": n, "skipped": f"n > --milvus-max {args.milvus_max}"})
                    continue
                if streamed:
                    row, got = run_backend_streamed(name, n, args.dim, queries, args.k, truth, args.exact_queries,
                                                    args.ef_search, refine_values, args.refine_factor)
                else:
                    row, got = run_backend(name, base, queries, args.k, truth, Path(tmp), args.ef_search,
                                           refine_values, args.refine_factor)
                if name == "exact":
                    truth, anchor = got, row
                for key in ("p50_ms", "p95_ms", "build_s", "memory_mib"):
                    row[f"{key}_vs_exact"] = row[key] / anchor[key] if anchor[key] > 0 else None
                rows.append(row)
                print(f"  {name:8s} n={n:>8,d}: p50 {row['p50_ms']:.3f} ms, p95 {row['p95_ms']:.3f} ms, "
                      f"recall@{args.k} {row['recall_at_k']:.3f}, "
                      f"build {row['build_s']:.1f} s, memory {row['memory_mib']:.0f} MiB", file=sys.stderr, flush=True)
            del base
            gc.collect()
    print(f"vector backends: d={args.dim}, {args.queries} queries, k={args.k}, FAISS threads {args.threads} "
          f"(search {args.search_threads or args.threads}), "
          f"HNSW M={args.hnsw_m} efConstruction={args.ef_construction} efSearch={HNSW_EF_SEARCH}, "
          f"hnsw-sq8 re-rank factor {args.refine_factor:g}; ratios against FAISS exact (IndexFlatIP) on the same data")
    print(f"| backend | n | p50 ms | p95 ms | recall@{args.k} | build s | memory MiB | p50 / exact | build / exact |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['backend']} | {r['n']:,} | skipped: {r['skipped']} | | | | | | |")
            continue
        print(f"| {r['backend']} | {r['n']:,} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | {r['recall_at_k']:.3f} | "
              f"{r['build_s']:.2f} | {r['memory_mib']:.0f} | {r['p50_ms_vs_exact']:.3g} | {r['build_s_vs_exact']:.1f} |")
    curves = [(r, p) for r in rows for p in r.get("curve", [])]
    if curves:
        print(f"\n| backend | n | efSearch | re-rank | p50 ms | p95 ms | recall@{args.k} |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r, p in curves:
            print(f"| {r['backend']} | {r['n']:,} | {p['efSearch']} | {p.get('refine_factor', '')} | "
                  f"{p['p50_ms']:.3f} | {p['p95_ms']:.3f} | {p['recall_at_k']:.3f} |")
    summary = {"dim": args.dim, "k": args.k, "queries": args.queries, "threads": args.threads,
               "search_threads": args.search_threads or args.threads,
               "hnsw": {"M": args.hnsw_m, "efConstruction": args.ef_construction, "efSearch": HNSW_EF_SEARCH,
                        "refine_factor": args.refine_factor},
               "rows": rows}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
