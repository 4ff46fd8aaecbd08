"""faiss's OpenBLAS kernels: as the library detects them against ``core.blas.import_faiss``.

    python bench/bench_openblas.py [--product gravel] [--n 20] [--rounds 2] [--state state]
    python bench/bench_openblas.py --small        # CI: 3 timed photos, 1 round

OpenBLAS picks its kernels once, when faiss loads, so the two variants cannot share a process.
The parent runs one child process per variant and round, alternating, with the same inputs:

* **library** (the anchor): a plain ``import faiss`` before anything else: faiss-cpu's bundled
  OpenBLAS 0.3.15 detects the CPU itself (``Prescott`` generic kernels on a CPU it does not know);
* **ours**: ``core.blas.import_faiss`` (``OPENBLAS_CORETYPE`` from the CPU flags).

Each child reports which kernels faiss's OpenBLAS runs (threadpoolctl), the time of one exact
search with the size of gravel's 8 test-time views (8,192 query patches against the product's
memory bank of the state, 120 dims; random queries: the cost does not depend on the values), and
the end-to-end ``inspect`` of the state's bank on ``--n`` val photos of the product (2 torch
threads). Printed: p50 / p95 per variant over all rounds and the ratio library / ours.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def child(variant: str, product: str, n: int, state: str) -> dict:
    """One variant's measurements in this process (the first faiss import happens here)."""
    sys.path.insert(0, str(REPO))
    if variant == "library":
        import faiss  # noqa: F401  (the bundled OpenBLAS detects the CPU itself)
    from core.settings import apply_runtime_env

    apply_runtime_env()
    from core.blas import import_faiss

    faiss = import_faiss()
    import numpy as np
    import torch
    from threadpoolctl import threadpool_info

    torch.set_num_threads(2)
    kernels = [i.get("architecture") for i in threadpool_info()
               if i.get("internal_api") == "openblas" and "faiss" in i["filepath"]]
    from core.imageio import load_rgb
    from core.settings import Settings
    from data.build import load_manifest
    from services.container import Services
    from services.lock import MODEL_LOCK

    svc = Services(Settings.from_env(state_dir=Path(state)))
    bank = svc.banks.get(product)
    memory = np.ascontiguousarray(bank.memory_bank.float().numpy())
    index = faiss.IndexFlatL2(memory.shape[1])
    index.add(memory)
    query = np.random.default_rng(0).standard_normal((8192, memory.shape[1])).astype("float32")
    index.search(query, 1)
    search_ms = []
    for _ in range(5):
        t0 = time.perf_counter()
        index.search(query, 1)
        search_ms.append((time.perf_counter() - t0) * 1000)
    data_dir = svc.settings.data_dir
    items = [it for it in load_manifest(data_dir)["items"] if it["product"] == product and it["split"] == "val"]
    photos = [load_rgb(data_dir / it["image"]) for it in items[:n]]
    with MODEL_LOCK.shared():
        for im in photos[:2]:
            bank.predict([im])
        inspect_ms = []
        for im in photos:
            t0 = time.perf_counter()
            bank.predict([im])
            inspect_ms.append((time.perf_counter() - t0) * 1000)
    return {"variant": variant, "kernels": kernels, "bank": list(memory.shape), "search_ms": search_ms,
            "inspect_ms": inspect_ms, "photo_shape": list(photos[0].shape) if photos else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--product", default="gravel")
    ap.add_argument("--n", type=int, default=20, help="timed val photos per child")
    ap.add_argument("--rounds", type=int, default=2, help="child processes per variant, alternating")
    ap.add_argument("--state", default=os.environ.get("DRA_STATE_DIR", str(REPO / "state")))
    ap.add_argument("--small", action="store_true", help="CI mode: 3 timed photos, one round")
    ap.add_argument("--child", choices=("library", "ours"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.product, args.n, args.state)))
        return
    if args.small:
        args.n, args.rounds = 3, 1
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    runs: dict[str, list[dict]] = {"library": [], "ours": []}
    for _ in range(args.rounds):
        for variant in ("library", "ours"):
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--product", args.product,
                                  "--n", str(args.n), "--state", args.state],
                                 env=env, capture_output=True, text=True, check=True)
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    import numpy as np

    res = {"product": args.product, "n": args.n, "rounds": args.rounds}
    for variant, rs in runs.items():
        s = [x for r in rs for x in r["search_ms"]]
        i = [x for r in rs for x in r["inspect_ms"]]
        res[variant] = {"kernels": rs[0]["kernels"], "bank": rs[0]["bank"],
                        "search_p50": float(np.percentile(s, 50)), "search_p95": float(np.percentile(s, 95)),
                        "inspect_p50": float(np.percentile(i, 50)), "inspect_p95": float(np.percentile(i, 95))}
    lib, ours = res["library"], res["ours"]
    res["ratio_library_over_ours_search_p50"] = lib["search_p50"] / ours["search_p50"]
    res["ratio_library_over_ours_inspect_p50"] = lib["inspect_p50"] / ours["inspect_p50"]
    print(f"faiss OpenBLAS kernels, product={args.product}, bank {ours['bank']}, {args.n} val photos x "
          f"{args.rounds} round(s) per variant, 2 torch threads")
    print(f"{'variant':10s} {'kernels':14s} {'search p50/p95 ms':>20s} {'inspect p50/p95 ms':>20s}")
    for variant in ("library", "ours"):
        r = res[variant]
        print(f"{variant:10s} {','.join(map(str, r['kernels'])):14s} {r['search_p50']:9.1f} / {r['search_p95']:6.1f} "
              f"{r['inspect_p50']:11.1f} / {r['inspect_p95']:6.1f}")
    print(f"ratio library / ours: search p50 {res['ratio_library_over_ours_search_p50']:.2f}x, "
          f"inspect p50 {res['ratio_library_over_ours_inspect_p50']:.2f}x")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
