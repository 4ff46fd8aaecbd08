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
