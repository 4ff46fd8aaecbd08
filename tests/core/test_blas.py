"""faiss's bundled OpenBLAS runs kernels that match the CPU (``core.blas``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.blas import cpu_flags, openblas_coretype

REPO = Path(__file__).resolve().parents[2]

# what faiss's OpenBLAS chose in a fresh process, read back by threadpoolctl (a scikit-learn dependency)
PROBE = """
import json, os, sys
sys.path.insert(0, {repo!r})
from core.blas import import_faiss
faiss = import_faiss()
import numpy as np
index = faiss.IndexFlatL2(8); index.add(np.eye(8, dtype="float32")); index.search(np.eye(8, dtype="float32"), 1)
from threadpoolctl import threadpool_info
libs = [i for i in threadpool_info() if i.get("internal_api") == "openblas" and "faiss" in i["filepath"]]
print(json.dumps({{"faiss_openblas": [i.get("architecture") for i in libs],
                   "env_after": os.environ.get("OPENBLAS_CORETYPE")}}))
"""


def _probe(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(repo=str(REPO))], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("flags,machine,expected", [
    ({"avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}, "x86_64", "SkylakeX"),
    ({"avx2", "fma", "avx512f"}, "x86_64", "Haswell"),  # AVX-512 F without BW / DQ / VL: no SkylakeX kernels
    ({"AVX2", "FMA"}, "AMD64", "Haswell"),
    ({"sse3", "avx"}, "x86_64", None),
    ({"avx2", "fma"}, "aarch64", None),
    (set(), "x86_64", None),
])
def test_coretype_follows_the_cpu_flags(flags, machine, expected):
    assert openblas_coretype(flags, machine) == expected


def test_cpu_flags_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu SSE3 avx2 fma\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "sse3", "avx2", "fma"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_faiss_openblas_runs_the_kernels_the_cpu_allows():
    """On a CPU newer than faiss-cpu's OpenBLAS 0.3.15 knows (this CI machine) it picked ``Prescott``."""
    expected = openblas_coretype(cpu_flags())
    if expected is None:
        pytest.skip("no AVX2 x86-64 CPU: OpenBLAS's own detection is left alone")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    got = _probe(env)
    assert [a.lower() for a in got["faiss_openblas"]] == [expected.lower()], got
    assert got["env_after"] is None  # the variable was set for the import only


def test_a_coretype_the_user_set_is_kept():
    got = _probe({**os.environ, "OPENBLAS_CORETYPE": "Prescott"})
    assert [a.lower() for a in got["faiss_openblas"]] == ["prescott"], got
    assert got["env_after"] == "Prescott"


def test_faiss_searches_small_query_sets_with_blas_and_the_same_neighbours():
    """import_faiss lowers faiss's sequential-search cut-off (faiss 1.15: queries x dims < 128000); the
    BLAS path must find the same nearest neighbours, at the distances of the sequential one."""
    from core.blas import FAISS_BLAS_THRESHOLD, import_faiss

    faiss = import_faiss()
    assert faiss.cvar.distance_compute_blas_threshold == FAISS_BLAS_THRESHOLD
    rng = np.random.default_rng(0)
    for d, nq in ((12, 900), (120, 1024)):
        bank = rng.normal(size=(1600, d)).astype(np.float32)
        queries = rng.normal(size=(nq, d)).astype(np.float32)
        index = faiss.IndexFlatL2(d)
        index.add(bank)
        d_blas, i_blas = index.search(queries, 1)
        try:
            faiss.cvar.distance_compute_blas_threshold = 10**9  # every query on the sequential path
            d_seq, i_seq = index.search(queries, 1)
        finally:
            faiss.cvar.distance_compute_blas_threshold = FAISS_BLAS_THRESHOLD
        assert (i_blas == i_seq).mean() > 0.999  # ties within float rounding may swap
        assert np.allclose(d_blas, d_seq, rtol=1e-4, atol=1e-4)
