"""Memory-bank scale: fit time, bank size and peak memory for 50, 200 and 1,000 normal images.

    python bench/bench_bank_scale.py [--product brick] [--sizes 50 200 1000]
    python bench/bench_bank_scale.py --small          # CI: 4 and 8 images at 64 px

Normal images are fresh crops from the data builder's own crop function
(``data.build.random_crop`` on ``data.build.source_rows``: rows 0-319 only,
the same flips / photometric jitter as the sample data), seeded per size.
Every size is fitted in its own subprocess (``services.products.fit_bank`` into a
temporary state folder, the product's configuration from
``services.products.fit_config`` unless overridden; always the nearest-neighbour
scorer, no SimpleNet head), so that the
peak resident memory (``resource.getrusage(...).ru_maxrss``) belongs to that fit
alone. Printed per size: training images, patches, bank size, fit time split
into feature extraction and coreset, peak RSS, the RSS growth during the fit,
and the size a full ``N x N`` float32 distance matrix over the patches would
need: the figure that anomalib 2.7's and the official code's samplers hit
before they run out of memory. The greedy coreset here keeps one ``(N,)``
distance vector (``models.patchcore.coreset.greedy_coreset_indices``).

Anchor: none for time (anomalib's ``KCenterGreedy`` would be the anchor; the
O(N) claim is about memory, shown by peak RSS << N x N matrix).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.settings import apply_runtime_env  # noqa: E402

apply_runtime_env()  # before torch / faiss / transformers load


def _crops(product: str, n: int, seed: int):
    import numpy as np

    from data.build import random_crop, source_rows

    rows = source_rows(product)
    rng = np.random.default_rng(seed)
    return [random_crop(rows, rng, product)[0] for _ in range(n)]


def _rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(args) -> dict:
    """Fit one bank of ``args.one`` normal images in this process; return the figures."""
    import torch

    from core.settings import Settings
    from models.patchcore.model import backbone_spec, new_model
    from services.container import Services
    from services.products import fit_bank, fit_config

    torch.set_num_threads(args.threads)
    n = int(args.one)
    train = _crops(args.product, n, seed=1000 + n)
    val = _crops(args.product, 4, seed=7)
    # the memory bank alone: a SimpleNet-scored product (grass) would also train its head, whose ~1 min of
    # training does not depend on N and would be counted in the coreset time below
    overrides = {"scorer": "knn"}
    if args.image_size:
        overrides["image_size"] = args.image_size
    if args.ratio:
        overrides["coreset_ratio"] = args.ratio
    if args.augment:
        overrides["augment"] = args.augment
    with tempfile.TemporaryDirectory(prefix="bank_scale_") as tmp:
        # the coreset's scaling with N normals: no acquisition copies, no second (calibration) fold
        svc = Services(Settings.from_env(state_dir=Path(tmp), patchcore_acquisition_copies=0,
                                         patchcore_cross_fit=False))
        cfg = fit_config(svc, args.product, **overrides)
        # warm the backbone so its load is not counted as fit memory / time
        new_model(backbone_spec(svc.settings.patchcore_backbone, cfg.blocks), cfg, svc.banks.runtime)
        base_rss = _current_rss_mb()
        marks: dict[str, float] = {}
        t0 = time.perf_counter()

        def progress(frac: float, msg: str) -> None:
            if msg.startswith("coreset") and "coreset_start" not in marks:
                marks["coreset_start"] = time.perf_counter()
            if msg.startswith("calibrating") and "coreset_end" not in marks:
                marks["coreset_end"] = time.perf_counter()

        info = fit_bank(svc, args.product, train, val, progress=progress, **overrides)
        fit_s = time.perf_counter() - t0
        meta = svc.banks.read_meta(args.product)
    n_patches = int(meta["n_patches"])
    return {
        "n_train": n,
        "augment_views": meta.get("augment_views", 1),
        "image_size": cfg.image_size,
        "coreset_ratio": cfg.coreset_ratio,
        "patches": n_patches,
        "embedding_dim": meta["embedding_dim"],
        "bank_size": info["bank_size"],
        "bank_mb": round(info["bank_size"] * meta["embedding_dim"] * 4 / 2**20, 2),
        "fit_s": round(fit_s, 1),
        "features_s": round(marks.get("coreset_start", t0) - t0, 1),
        "coreset_s": round(marks.get("coreset_end", t0) - marks.get("coreset_start", t0), 1),
        "peak_rss_mb": round(_rss_mb(), 0),
        "fit_rss_growth_mb": round(_rss_mb() - base_rss, 0),
        "embeddings_mb": round(n_patches * meta["embedding_dim"] * 4 / 2**20, 0),
        "full_distance_matrix_gb": round(n_patches * n_patches * 4 / 2**30, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--product", default="brick")
    ap.add_argument("--sizes", nargs="+", type=int, default=[50, 200, 1000])
    ap.add_argument("--image-size", type=int, default=0, help="override the model input size (0: product config)")
    ap.add_argument("--ratio", type=float, default=0.0, help="override the coreset ratio (0: product config)")
    ap.add_argument("--augment", default="", help="override the bank augmentation ('' : product config)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="CI mode: sizes 4 and 8 at 64 px, ratio 0.05, no augmentation")
    ap.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.small:
        args.sizes, args.image_size, args.ratio, args.augment = [4, 8], 64, 0.05, "none"
    if args.one:
        print(json.dumps(run_one(args)), flush=True)
        return
    rows = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(n), "--product", args.product, "--threads", str(args.threads),
               "--image-size", str(args.image_size), "--ratio", str(args.ratio), "--augment", args.augment]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['n_train']:>6d} images  {r['patches']:>9d} patches  bank {r['bank_size']:>6d} x {r['embedding_dim']}"
              f" ({r['bank_mb']} MiB)  fit {r['fit_s']:.1f} s (features {r['features_s']:.1f}, coreset"
              f" {r['coreset_s']:.1f})  peak RSS {r['peak_rss_mb']:.0f} MiB (+{r['fit_rss_growth_mb']:.0f} during fit;"
              f" embeddings {r['embeddings_mb']:.0f} MiB)  full NxN matrix would be {r['full_distance_matrix_gb']} GiB",
              flush=True)
    print(json.dumps({"product": args.product, "rows": rows}))


if __name__ == "__main__":
    main()
