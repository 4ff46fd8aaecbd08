"""faiss's sequential-search cut-off: its default against ``core.blas.FAISS_BLAS_THRESHOLD``, one process.

faiss 1.15 searches ``nx`` queries of ``d`` dims exactly one query at a time (SIMD, no BLAS) while
``nx * d < distance_compute_blas_threshold`` (default 128000), else with BLAS ``sgemm`` blocks. The
setting is read at every search, so both run side by side here:

1. a sweep: ``IndexFlatL2`` top-1 search of 1-16,384 random queries against banks of PatchCore's
   shapes (12 dims: texture features, 120: Lite0 blocks 4+7; 1,600 / 3,200 patches) and the
   gallery's (520 dims, 150 / 10,000 vectors); ms per search, faiss's default / ours;
2. with ``--state DIR``: ``PatchCore.predict`` of each product's served bank on 20 val photos
   (256 px) and 20 unseen-sized photos (the tuning set of ``bench_texture``: 128 px tall), p50 ms
   per photo with faiss's default and with ours, alternating photo by photo.

Usage::

    .venv/bin/python bench/bench_faiss_threshold.py [--state state]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_texture as bt  # noqa: E402  (sets the runtime environment first)
import bench_robustness as br  # noqa: E402
import torch  # noqa: E402

from core.blas import FAISS_BLAS_THRESHOLD, import_faiss  # noqa: E402
from core.imageio import load_rgb  # noqa: E402

FAISS_DEFAULT = 128_000


def _ms(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1000


def sweep(faiss) -> None:
    rng = np.random.default_rng(0)
    for d, nb in ((12, 1600), (12, 3200), (120, 1600), (120, 3200), (520, 150), (520, 10_000)):
        index = faiss.IndexFlatL2(d)
        index.add(rng.normal(size=(nb, d)).astype(np.float32))
        for nq in (1, 16, 256, 1024, 4096, 16_384):
            q = rng.normal(size=(nq, d)).astype(np.float32)
            reps = max(3, 4000 // nq)
            out = {}
            for name, thr in (("faiss_default", FAISS_DEFAULT), ("ours", FAISS_BLAS_THRESHOLD)):
                faiss.cvar.distance_compute_blas_threshold = thr
                out[name] = round(_ms(lambda: index.search(q, 1), reps), 3)
            print(json.dumps({"dims": d, "bank": nb, "queries": nq, "ms": out,
                              "ratio_default_over_ours": round(out["faiss_default"] / out["ours"], 2)}), flush=True)
    faiss.cvar.distance_compute_blas_threshold = FAISS_BLAS_THRESHOLD


def served(faiss, state: str) -> None:
    from core.settings import Settings
    from stores.banks import BankStore

    store = BankStore(Settings.from_env(state_dir=state))
    for product in ("brick", "gravel", "grass"):
        bank = store.get(product)
        sets = {"val 256 px": [load_rgb(it["path"]) for it in br.items(product, "val")
                               if it["label"] == "good"][:20],
                "tune 128 px": [p["rgb"] for p in bt.tune_set(product)[:20]]}
        for name, photos in sets.items():
            times: dict[str, list[float]] = {"faiss_default": [], "ours": []}
            bank.predict(photos[:1])
            for im in photos:
                for key, thr in (("faiss_default", FAISS_DEFAULT), ("ours", FAISS_BLAS_THRESHOLD)):
                    faiss.cvar.distance_compute_blas_threshold = thr
                    t0 = time.perf_counter()
                    bank.predict([im])
                    times[key].append((time.perf_counter() - t0) * 1000)
            p50 = {k: round(float(np.percentile(v, 50)), 1) for k, v in times.items()}
            p95 = {k: round(float(np.percentile(v, 95)), 1) for k, v in times.items()}
            print(json.dumps({"product": product, "model": bank.meta["model"], "photos": name, "p50_ms": p50,
                              "p95_ms": p95,
                              "ratio_p50_default_over_ours": round(p50["faiss_default"] / p50["ours"], 2)}),
                  flush=True)
    faiss.cvar.distance_compute_blas_threshold = FAISS_BLAS_THRESHOLD


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", help="also time PatchCore.predict with this built state's banks")
    args = ap.parse_args()
    torch.set_num_threads(2)
    faiss = import_faiss()
    sweep(faiss)
    if args.state:
        served(faiss, args.state)


if __name__ == "__main__":
    main()
