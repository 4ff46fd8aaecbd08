"""The PatchCore benchmarks run end to end in their small CI modes (real models, real fits).

Timing is never asserted; the tests check that each bench runs, prints one
JSON summary line and that its correctness checks hold (same-bank score
agreement with anomalib, bank sizes, memory figures).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, timeout: int = 600) -> tuple[dict, str]:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                         cwd=ROOT, timeout=timeout, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1]), out.stdout


@pytest.mark.slow
def test_bench_inspect_small():
    res, text = _run("bench_inspect.py", "--small", "--product", "gravel")
    assert res["n_train"] == 4 and res["n_timed"] == 3 and res["images"] == "builder crops"
    rows = res["rows"]
    assert set(rows) == {"ours", "ours_tta", "anomalib_same_bank", "anomalib_default"}  # gravel: dihedral views
    assert "/tta-dihedral" in rows["ours_tta"]["model"] and rows["ours_tta"]["bank"] == rows["ours"]["bank"]
    for r in rows.values():
        assert r["p95"] >= r["p50"] > 0 and r["bank"] > 0
    # same backbone + bank: faiss search path == anomalib's torch path
    assert res["score_max_rel_diff_same_bank"] < 1e-4
    assert res["map_max_abs_diff_same_bank"] < 1e-2
    assert rows["anomalib_default"]["bank"] == int(4 * (64 // 8) ** 2 * 0.1)  # WRN50 layer2: stride 8, 10 %
    assert res["ratio_anchor_over_ours_p50"] > 0
    assert "ratio anomalib default / ours" in text


@pytest.mark.slow
def test_bench_bank_scale_small():
    res, text = _run("bench_bank_scale.py", "--small", "--product", "grass")
    rows = res["rows"]
    assert [r["n_train"] for r in rows] == [4, 8]
    for r in rows:
        side = 64 // 8  # default blocks 4, 7: stride 8
        assert r["patches"] == r["n_train"] * side * side
        assert r["bank_size"] == int(r["patches"] * 0.05)
        assert r["peak_rss_mb"] > 0 and r["full_distance_matrix_gb"] >= 0
    assert rows[1]["patches"] == 2 * rows[0]["patches"]
    assert "full NxN matrix would be" in text


@pytest.mark.slow
def test_bench_openblas_small(built_state):
    """Both variants run in their own process; ours runs the kernels the CPU flags name."""
    from core.blas import cpu_flags, openblas_coretype

    res, text = _run("bench_openblas.py", "--small", "--state", str(built_state))
    assert res["n"] == 3 and res["rounds"] == 1
    for variant in ("library", "ours"):
        r = res[variant]
        assert len(r["kernels"]) == 1 and r["bank"][1] > 0
        assert r["search_p95"] >= r["search_p50"] > 0 and r["inspect_p95"] >= r["inspect_p50"] > 0
    expected = openblas_coretype(cpu_flags())
    if expected is not None:
        assert res["ours"]["kernels"][0].lower() == expected.lower()
    assert "ratio library / ours" in text
