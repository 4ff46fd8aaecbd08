"""Import faiss with OpenBLAS kernels that match the CPU.

faiss-cpu 1.15.1's wheel bundles its own OpenBLAS (0.3.15, ``faiss_cpu.libs/libopenblaso-*.so``),
and faiss's exact search (``IndexFlatL2`` with many queries: PatchCore's nearest-neighbour
search of every patch) is one BLAS ``sgemm``. That OpenBLAS picks its kernels from the CPU
model number when it is loaded, and on a CPU newer than it knows (this project's CI machine,
a Sapphire Rapids Xeon) it falls back to its generic ``Prescott`` (SSE3) kernels: the search of
gravel's 8 test-time views (8,192 query patches x 3,200 bank patches x 120 dims) took 213 ms
there instead of 57 ms (``bench/bench_openblas.py``). numpy's newer OpenBLAS on the same
machine chose ``SkylakeX`` by itself.

:func:`import_faiss` sets ``OPENBLAS_CORETYPE`` (OpenBLAS's documented override, read once
when the library loads) to the kernel family the CPU's feature flags allow, imports faiss, and
puts the environment back. A value the user already set is kept. Importing this module has no
side effects.

It also sets faiss's ``distance_compute_blas_threshold`` (:data:`FAISS_BLAS_THRESHOLD`). faiss 1.15
runs an exact search of ``nx`` queries of ``d`` dims one query at a time (no BLAS) while
``nx * d < 128000``, its default: a 256 px photo's 1,024 Lite0 patches (120 dims) and every photo's
texture patches (12 dims, up to 10,000) took that path, 3-40x slower than the BLAS one
(``bench/bench_faiss_threshold.py``). The exact same nearest neighbours come back either way.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from types import ModuleType

#: CPU flags OpenBLAS's SkylakeX kernels need (AVX-512 foundation, CD, BW, DQ, VL)
SKYLAKEX_FLAGS = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})
#: CPU flags OpenBLAS's Haswell kernels need
HASWELL_FLAGS = frozenset({"avx2", "fma"})
#: faiss's exact search uses BLAS from ``queries x dims >= `` this (faiss 1.15's default: 128000). Measured
#: with ``bench/bench_faiss_threshold.py`` on 2 cores: BLAS is faster from 4-16 queries at 12, 120 and 520
#: dims; one 520-d query (the gallery's search) stays on the sequential path, which is as fast or faster.
FAISS_BLAS_THRESHOLD = 1024


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of the first CPU listed in ``cpuinfo`` (Linux), lower case.

    Linux lists only the features the kernel enabled (AVX-512 flags disappear when the OS does
    not save their registers). Returns an empty set where the file does not exist (macOS,
    Windows) or has no ``flags`` line (ARM).
    """
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.lower().split())
    return frozenset()


def openblas_coretype(flags: Iterable[str], machine: str | None = None) -> str | None:
    """The ``OPENBLAS_CORETYPE`` for an x86-64 CPU with these feature ``flags``.

    ``SkylakeX`` (AVX-512 sgemm kernels) where the AVX-512 F/CD/BW/DQ/VL flags are all present,
    else ``Haswell`` (AVX2 + FMA), else ``None`` (leave OpenBLAS's own detection alone: older
    x86 CPUs, where its table is complete, and every other architecture). ``machine`` defaults
    to :func:`platform.machine`.
    """
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return None
    flags = frozenset(f.lower() for f in flags)
    if SKYLAKEX_FLAGS <= flags:
        return "SkylakeX"
    if HASWELL_FLAGS <= flags:
        return "Haswell"
    return None


@lru_cache(maxsize=1)
def import_faiss() -> ModuleType:
    """``import faiss``, with its bundled OpenBLAS on the kernels :func:`openblas_coretype` names.

    Call it instead of ``import faiss`` everywhere: whichever import runs first in a process
    loads faiss's OpenBLAS, and its kernel choice lasts for the process. ``OPENBLAS_CORETYPE``
    is set only for the import and only when the caller has not set it; other libraries that
    load an OpenBLAS later (or subprocesses) keep their own detection.

    faiss's ``distance_compute_blas_threshold`` is set to :data:`FAISS_BLAS_THRESHOLD` (a process-wide
    setting of faiss).

    Returns:
        the ``faiss`` module.
    """
    leave = "faiss" in sys.modules or os.environ.get("OPENBLAS_CORETYPE")
    core = None if leave else openblas_coretype(cpu_flags())
    if core:
        os.environ["OPENBLAS_CORETYPE"] = core
    try:
        import faiss
    finally:
        if core:
            os.environ.pop("OPENBLAS_CORETYPE", None)
    faiss.cvar.distance_compute_blas_threshold = FAISS_BLAS_THRESHOLD
    return faiss
