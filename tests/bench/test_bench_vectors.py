"""bench/bench_vectors.py runs end to end in its small CI mode (real FAISS, real milvus-lite).

Timing is never asserted: the test checks the table, the JSON summary and the
correctness figures (exact search is its own anchor; recall of every backend).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_vectors_small():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_vectors.py"), "--small"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    rows = {r["backend"]: r for r in res["rows"]}
    assert set(rows) == {"exact", "hnsw", "milvus"} and res["dim"] == 64 and res["k"] == 10
    assert rows["exact"]["recall_at_k"] == 1.0 and rows["exact"]["p50_ms_vs_exact"] == 1.0
    assert rows["milvus"]["recall_at_k"] == 1.0  # milvus-lite FLAT is exact too
    assert rows["hnsw"]["recall_at_k"] >= 0.9
    for r in rows.values():
        assert r["n"] == 2000 and r["p95_ms"] >= r["p50_ms"] > 0 and r["build_s"] > 0
    assert "| backend | n | p50 ms |" in out.stdout and "p50 / exact" in out.stdout


def test_bench_vectors_streamed_path_and_sq8():
    """Sizes above --stream-above are streamed block by block (the 1M path), hnsw-sq8 included."""
    sys.path.insert(0, str(ROOT / "bench"))
    import numpy as np

    from bench_vectors import CHUNK, synthetic, synthetic_chunks

    n = 2 * CHUNK + 123  # three blocks, the last one partial
    blocks = list(synthetic_chunks(n, 16, seed=1))
    assert [len(b) for b in blocks] == [CHUNK, CHUNK, 123]
    np.testing.assert_allclose(np.concatenate(blocks), synthetic(n, 16, seed=1), atol=1e-6)
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_vectors.py"), "--sizes", str(n), "--dim", "32",
                          "--queries", "30", "--stream-above", "1000", "--exact-queries", "5",
                          "--backends", "exact", "hnsw", "hnsw-sq8", "milvus", "--milvus-max", "1000",
                          "--search-threads", "1", "--ef-search", "16", "--refine", "1", "2",
                          "--hnsw-m", "24", "--ef-construction", "60"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    rows = {r["backend"]: r for r in res["rows"]}
    assert "skipped" in rows["milvus"] and res["search_threads"] == 1
    assert (res["hnsw"]["M"], res["hnsw"]["efConstruction"]) == (24, 60) and "M=24 efConstruction=60" in out.stdout
    assert rows["exact"]["streamed"] and rows["exact"]["latency_queries"] == 5 and rows["exact"]["recall_at_k"] == 1.0
    for name in ("hnsw", "hnsw-sq8"):
        r = rows[name]
        assert r["streamed"] and r["n"] == n and r["recall_at_k"] >= 0.9 and r["build_s"] > 0 and r["gen_s"] > 0
    assert [p["efSearch"] for p in rows["hnsw"]["curve"]] == [16]
    assert [(p["efSearch"], p["refine_factor"]) for p in rows["hnsw-sq8"]["curve"]] == [(16, 1.0), (16, 2.0)]
    assert "| hnsw-sq8 |" in out.stdout and "| backend | n | efSearch | re-rank |" in out.stdout
