"""Defect-type metric robustness (issue 15): is the type decision robust to how a defect is drawn?

Offline on cached raw defect descriptors (:meth:`stores.image_index.ImageIndex.describe`: the
product's PatchCore map, region statistics, deep features pooled under the map) of a built
state. The protocol keeps every choice off the unseen split:

* training sets per product: the gallery (``data.synth``), ``N`` defects per type drawn by
  ``data.synth`` and ``N`` by ``data.synth_alt`` on the val normals, with acquisition changes
  (:func:`services.build.synthesize_training_defects`);
* **tuning** (leave one generator out): fit on the gallery + one generator, score the other
  generator's defects (and the val queries, ``data.synth``);
* **report**: fit on everything, score the unseen queries (``data.holdout_synth``, native-scale
  photos of the unseen region, acquisition changes) once per adopted variant.

Score: defect-type accuracy of the metric's arg-max (a proxy of Recall@1: the index's top hit
is the gallery item with the nearest class-probability vector), per product and type.
``cli.py eval retrieval --split val|unseen`` gives the end-to-end Recall@1.

    DRA_STATE_DIR=/tmp/rb3/state .venv/bin/python bench/bench_retrieval_robustness.py --n 40 \\
        --variants default stats-only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.settings import apply_runtime_env, get_settings  # noqa: E402

apply_runtime_env()

from core.imageio import load_rgb  # noqa: E402
from core.settings import DEFECT_TYPES, PRODUCTS  # noqa: E402
from data import synth, synth_alt  # noqa: E402
from data.acquisition import random_acquisition  # noqa: E402
from data.build import load_manifest  # noqa: E402
from models.defect_descriptor import STAT_NAMES, DefectProjection  # noqa: E402
from services.build import TRAINING_N_CHANGES  # noqa: E402
from services.container import Services  # noqa: E402
from services.lock import MODEL_LOCK  # noqa: E402

CACHE = Path("/tmp/rb/retr_cache")


def generated_with_masks(normals: list[np.ndarray], product: str, per_type: int, gen: str, seed: int = 777):
    """``per_type`` defects per type drawn by ``gen`` (``synth`` | ``alt``) on ``normals``, with acquisition
    changes: ``(images, bool masks at the images' size, labels)``, deterministic per (product, type, index)."""
    from skimage.transform import resize

    pseed = int.from_bytes(product.encode()[:8].ljust(8, b"\0"), "little") % (2**31)
    ims, masks, labels = [], [], []
    for ti, d in enumerate(DEFECT_TYPES):
        for i in range(per_type):
            rng = np.random.default_rng([seed, pseed, ti, i, 0 if gen == "synth" else 1])
            clean = normals[i % len(normals)]
            if gen == "synth":
                r = synth.synthesize(d, clean, rng, product)
                img, mask = r.image, r.mask
            else:
                img, mask = synth_alt.draw(clean, d, rng)
            img, _ = random_acquisition(img, rng, n_changes=TRAINING_N_CHANGES)
            mask = np.asarray(mask) > 0
            if img.shape[:2] != mask.shape:
                mask = resize(mask.astype(np.float32), img.shape[:2], order=0) > 0
            ims.append(img)
            masks.append(mask)
            labels.append(d)
    return ims, masks, labels


def _generated(normals: list[np.ndarray], product: str, per_type: int, gen: str, seed: int = 777):
    ims, _, labels = generated_with_masks(normals, product, per_type, gen, seed)
    return ims, labels


def descriptors(services: Services, product: str, name: str, images_fn) -> tuple[np.ndarray, list[str]]:
    meta = services.banks.read_meta(product)
    key = hashlib.sha1(f"{services.settings.state_dir}|{product}|{name}|{meta.get('fitted_at')}|"
                       f"{services.image_index.descriptor_config.to_dict()}".encode()).hexdigest()[:16]
    path = CACHE / f"{key}.npz"
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        return z["X"], [str(v) for v in z["y"]]
    ims, labels = images_fn()
    out = []
    with MODEL_LOCK.shared():
        for i in range(0, len(ims), 16):
            out += services.image_index.describe(ims[i:i + 16], product)
    X = np.stack(out).astype(np.float32)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, X=X, y=np.array(labels))
    return X, labels


def sets(services: Services, product: str, n: int) -> dict:
    data_dir = Path(services.settings.data_dir)
    items = [it for it in load_manifest(data_dir)["items"] if it["product"] == product]

    def split(name: str, label: str):
        its = [it for it in items if it["split"] == name and it["label"] == label]
        return lambda: ([load_rgb(data_dir / it["image"]) for it in its], [it["defect_type"] for it in its])

    normals = [load_rgb(data_dir / it["image"]) for it in items if it["split"] == "val" and it["label"] == "good"]
    return {"gallery": descriptors(services, product, "gallery", split("gallery", "defect")),
            "val": descriptors(services, product, "val", split("val", "defect")),
            "unseen": descriptors(services, product, "unseen", split("unseen", "defect")),
            "synth": descriptors(services, product, f"synth{n}", lambda: _generated(normals, product, n, "synth")),
            "alt": descriptors(services, product, f"alt{n}", lambda: _generated(normals, product, n, "alt"))}


CHROMA = [STAT_NAMES.index(n) for n in ("da", "db", "dchroma", "std_ratio_ab")]


def select(X: np.ndarray, variant: str) -> np.ndarray:
    """Columns of the raw descriptor a variant keeps (``default``: all)."""
    n_stats = len(STAT_NAMES)
    keep = np.ones(X.shape[1], bool)
    if "stats-only" in variant:
        keep[n_stats:] = False
    if "deep-only" in variant:
        keep[:n_stats] = False
    if "no-chroma" in variant:
        keep[CHROMA] = False
    return X[:, keep]


def accuracy(proj: DefectProjection, X: np.ndarray, y: list[str]) -> tuple[float, dict]:
    p = proj.transform(X)
    classes = sorted(set(y) | set(DEFECT_TYPES))
    # DefectProjection keeps sklearn's class order (sorted labels)
    pred = [sorted(DEFECT_TYPES)[int(i)] for i in p.argmax(1)]
    ok = np.array([a == b for a, b in zip(pred, y)])
    per = {t: float(ok[[v == t for v in y]].mean()) for t in classes if t in y}
    return float(ok.mean()), per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="defects per type and training generator")
    ap.add_argument("--variants", nargs="+", default=["default"])
    ap.add_argument("--C", type=float, nargs="+", default=[0.1])
    ap.add_argument("--use", type=int, nargs="+", default=None,
                    help="also score with only the first U defects per type and generator (U <= N)")
    ap.add_argument("--report-unseen", action="store_true", help="also score the unseen queries")
    args = ap.parse_args()
    services = Services(get_settings())
    t0 = time.perf_counter()
    data = {p: sets(services, p, args.n) for p in PRODUCTS}
    print(json.dumps({"describe_s": round(time.perf_counter() - t0, 1)}), flush=True)
    for variant, C, use in [(v, c, u) for v in args.variants for c in args.C for u in (args.use or [args.n])]:
        row = {"variant": variant, "C": C, "n": use}
        for p in PRODUCTS:
            d = {k: (select(X, variant), y) for k, (X, y) in data[p].items()}
            for k in ("synth", "alt"):  # the first `use` of each type (the sets are type-major)
                X, y = d[k]
                keep = [i for i in range(len(y)) if i % args.n < use]
                d[k] = (X[keep], [y[i] for i in keep])

            def fit(*parts):
                X = np.vstack([d[k][0] for k in parts])
                y = sum((d[k][1] for k in parts), [])
                return DefectProjection.fit(X, y, C=C)

            r = {"synth->alt": accuracy(fit("gallery", "synth"), *d["alt"])[0],
                 "alt->val": accuracy(fit("gallery", "alt"), *d["val"])[0],
                 "alt-only->val": accuracy(fit("alt"), *d["val"])[0],
                 "both->val": accuracy(fit("gallery", "synth", "alt"), *d["val"])[0],
                 "gallery+synth->val": accuracy(fit("gallery", "synth"), *d["val"])[0]}
            if args.report_unseen:
                acc, per = accuracy(fit("gallery", "synth", "alt"), *d["unseen"])
                r["both->unseen"], r["unseen_per_type"] = acc, per
                r["gallery+synth->unseen"] = accuracy(fit("gallery", "synth"), *d["unseen"])[0]
            row[p] = {k: (round(v, 3) if isinstance(v, float) else {t: round(a, 2) for t, a in v.items()})
                      for k, v in r.items()}
        keys = [k for k in row["brick"] if not k.endswith("per_type")]
        row["mean"] = {k: round(float(np.mean([row[p][k] for p in PRODUCTS])), 3) for k in keys}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
