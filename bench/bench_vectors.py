"""Vector backends at scale, side by side in one process: FAISS exact (the anchor), FAISS HNSW, Milvus.

    python bench/bench_vectors.py [--sizes 10000 100000] [--dim 2568] [--queries 200] [--k 10]
                                  [--backends exact hnsw milvus] [--milvus-max 100000] [--threads 2]
    python bench/bench_vectors.py --small          # CI mode: 2,000 x 64-d, every backend

Every backend is the project's own store class (:mod:`stores.vector_store`), so the
figures include its Python wrapper: ``FaissVectorStore`` with ``IndexFlatIP`` (exact),
``FaissVectorStore`` with ``IndexHNSWFlat`` (M, efConstruction, efSearch from the
module), ``MilvusVectorStore`` on a milvus-lite file (its FLAT index; a Milvus server
would use HNSW through the same class).

Data: synthetic L2-normalised vectors of the image index's width (``--dim``, default
2568 = 2 x 1280 EfficientNet-Lite0 global part + 8 defect dims) drawn around 256
random cluster centres (real embeddings are clustered; uniform random vectors make
HNSW look worse than it is); queries are fresh draws from the same mixture, never in
the store. Per backend and size: query latency p50 / p95 (one query per call, ms),
recall@k against the exact top-k, build time (s; insert + index), memory (MiB: RSS
growth of this process, plus the milvus-lite server process for Milvus), and each
figure's ratio against exact search on the same data. Prints a table and, last, one
JSON line.
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

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from stores.vector_store import (HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, FaissVectorStore,  # noqa: E402
                                 MilvusVectorStore)

DEFAULT_DIM = 2 * 1280 + 8


def synthetic(n: int, dim: int, seed: int, n_centres: int = 256, spread: float = 0.6) -> np.ndarray:
    """``n`` unit vectors float32 ``(n, dim)`` around ``n_centres`` shared random centres (centres from seed 0)."""
    centres = np.random.default_rng(0).standard_normal((n_centres, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 20_000):
        m = min(20_000, n - s)
        noise = rng.standard_normal((m, dim)).astype(np.float32) * (spread / np.sqrt(dim))
        x = centres[rng.integers(0, n_centres, m)] + noise
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
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


def run_backend(name: str, base: np.ndarray, queries: np.ndarray, k: int, truth: np.ndarray | None,
                workdir: Path) -> tuple[dict, np.ndarray]:
    dim = base.shape[1]
    fields = {"image": dim}
    gc.collect()
    mem0 = _rss_mib()
    t0 = time.perf_counter()
    if name == "exact":
        store = FaissVectorStore(fields, None, hnsw_threshold=10**12)
    elif name == "hnsw":
        store = FaissVectorStore(fields, None, hnsw_threshold=0)
    elif name == "milvus":
        store = MilvusVectorStore(fields, str(workdir / f"bench_{len(base)}.db"), collection="bench")
    else:
        raise ValueError(name)
    ids = np.arange(len(base), dtype=np.int64)
    payload = [{"product": None, "defect_type": None}] * len(base)
    step = 2000 if name == "milvus" else len(base)
    for s in range(0, len(base), step):
        store.add(ids[s:s + step], {"image": base[s:s + step]}, payload[s:s + step])
    store.persist()
    build_s = time.perf_counter() - t0
    mem = _rss_mib() - mem0
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
    store.close()
    del store
    gc.collect()
    return {"backend": name, "n": len(base), "dim": dim, "p50_ms": p50, "p95_ms": p95, "recall_at_k": recall,
            "build_s": build_s, "memory_mib": mem}, got


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dim", type=int, default=DEFAULT_DIM)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--backends", nargs="+", default=["exact", "hnsw", "milvus"], choices=["exact", "hnsw", "milvus"])
    ap.add_argument("--milvus-max", type=int, default=100_000, help="skip Milvus above this many vectors")
    ap.add_argument("--threads", type=int, default=2, help="FAISS OpenMP threads")
    ap.add_argument("--small", action="store_true", help="CI mode: 2,000 x 64-d, 50 queries")
    args = ap.parse_args(argv)
    if args.small:
        args.sizes, args.dim, args.queries = [2000], 64, 50
    faiss.omp_set_num_threads(args.threads)
    backends = ["exact"] + [b for b in args.backends if b != "exact"]  # the anchor first
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_vectors_") as tmp:
        for n in args.sizes:
            base = synthetic(n, args.dim, seed=1)
            queries = synthetic(args.queries, args.dim, seed=2)
            truth = None
            anchor = None
            for name in backends:
                if name == "milvus" and n > args.milvus_max:
                    rows.append({"backend": name, "n": n, "skipped": f"n > --milvus-max {args.milvus_max}"})
                    continue
                row, got = run_backend(name, base, queries, args.k, truth, Path(tmp))
                if name == "exact":
                    truth, anchor = got, row
                for key in ("p50_ms", "p95_ms", "build_s", "memory_mib"):
                    row[f"{key}_vs_exact"] = row[key] / anchor[key] if anchor[key] > 0 else None
                rows.append(row)
                print(f"  {name:6s} n={n:>8,d}: p50 {row['p50_ms']:.3f} ms, recall@{args.k} {row['recall_at_k']:.3f}, "
                      f"build {row['build_s']:.1f} s", file=sys.stderr, flush=True)
            del base
            gc.collect()
    print(f"vector backends: d={args.dim}, {args.queries} queries, k={args.k}, FAISS threads {args.threads}, "
          f"HNSW M={HNSW_M} efConstruction={HNSW_EF_CONSTRUCTION} efSearch={HNSW_EF_SEARCH}; "
          f"ratios against FAISS exact (IndexFlatIP) on the same data")
    print(f"| backend | n | p50 ms | p95 ms | recall@{args.k} | build s | memory MiB | p50 / exact | build / exact |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['backend']} | {r['n']:,} | skipped: {r['skipped']} | | | | | | |")
            continue
        print(f"| {r['backend']} | {r['n']:,} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | {r['recall_at_k']:.3f} | "
              f"{r['build_s']:.2f} | {r['memory_mib']:.0f} | {r['p50_ms_vs_exact']:.2f} | {r['build_s_vs_exact']:.1f} |")
    summary = {"dim": args.dim, "k": args.k, "queries": args.queries, "threads": args.threads,
               "hnsw": {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH},
               "rows": rows}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
