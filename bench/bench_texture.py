"""Fine-scale texture statistics against PatchCore on gravel and grass (issue 15, eighth session).

Why: on the stochastic textures the second generator's thin, low-contrast defects sit below
Lite0's stride-8 blocks (see docs/benchmarks.md, "Why gravel and grass stay low"). This bench
measures a detector built from pixel-level filter responses instead of CNN features.

Detector ("texture kNN"): each photo is turned to gray and standardised by its own median and
inter-quartile range (removes exposure and contrast); at every pixel, for the scales 1, 2 and 4 px,
the two Hessian eigenvalues (scale-normalised, scikit-image ``hessian_matrix``) and the gradient
magnitude, plus the local mean at 3 and 8 px and the local standard deviation at 3 px: 12 numbers.
Each feature is standardised by the train normals' mean and spread; the memory bank is 10,000
random pixels of the train normals and one acquisition-changed copy of each; a pixel's score is
the distance to its nearest bank pixel (faiss ``IndexFlatL2``); the map is smoothed
(Gaussian, ``--smooth`` px), minus its own median, and the image score is its maximum inside a
4 px border.

Anchor: PatchCore as shipped in its protocol (Lite0 blocks 4+7, bank of the train normals and one
acquisition copy each, 1 % coreset, the product's test-time views, relative scores), from
``bench_robustness.py``'s functions, on the same photos in the same process.

Tuning set (``tune``): no unseen photo. The 30 val normals of the tuning region, recropped to
128 px tall and 128-192 px wide, half of them gray, 1-3 acquisition changes; 60 normals and 60
defects drawn by ``data.synth_alt`` (a training generator, not the evaluation one). It mimics the
unseen split's conditions with another generator. ``--unseen`` reads the unseen split once.

Usage::

    .venv/bin/python bench/bench_texture.py --products brick gravel grass [--unseen]

Prints one JSON object per product and detector: image AUROC, pixel AUROC, per-type image AUROC,
ms per photo (texture kNN: features + search, one process, 2 torch threads).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_robustness as br  # noqa: E402  (sets the runtime environment first)
import torch  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402
from skimage.feature import hessian_matrix, hessian_matrix_eigvals  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from core.blas import import_faiss  # noqa: E402
from core.imageio import load_rgb  # noqa: E402
from data import acquisition, synth_alt  # noqa: E402
from models.patchcore.config import PRODUCT_CONFIGS  # noqa: E402

TYPES = br.TYPES


def tune_set(product: str, n: int = 60, seed: int = 7) -> list[dict]:
    """``n`` normals and ``n`` defects (``data.synth_alt``) on recropped, acquisition-changed val normals."""
    vals = [it for it in br.items(product, "val") if it["label"] == "good"]
    out = []
    for i in range(2 * n):
        rng = np.random.default_rng([seed, i])
        rgb = load_rgb(vals[i % len(vals)]["path"])
        h, w = rgb.shape[:2]
        cw = int(rng.integers(128, min(193, w + 1)))
        y0, x0 = int(rng.integers(0, h - 128 + 1)), int(rng.integers(0, w - cw + 1))
        crop = rgb[y0:y0 + 128, x0:x0 + cw].copy()
        if rng.random() < 0.5:
            crop = acquisition.to_gray(crop)
        if i < n:
            img, m, _ = acquisition.acquire(crop, rng, mask=np.zeros(crop.shape[:2], bool), n_changes=(1, 3))
            out.append({"rgb": img, "mask": m, "label": "good", "defect_type": None})
        else:
            t = TYPES[i % len(TYPES)]
            drawn, mask = synth_alt.draw(crop, t, rng)
            img, m, _ = acquisition.acquire(drawn, rng, mask=mask, n_changes=(1, 3))
            out.append({"rgb": img, "mask": m, "label": "defect", "defect_type": t})
    return out


def load_split(product: str, split: str) -> list[dict]:
    out = []
    for it in br.items(product, split):
        rgb = load_rgb(it["path"])
        out.append({"rgb": rgb, "mask": br.load_mask(it, rgb.shape[:2]), "label": it["label"],
                    "defect_type": it.get("defect_type")})
    return out


def texture_features(rgb: np.ndarray) -> np.ndarray:
    """``(12, H, W)`` float32 filter responses of a ``(H, W, 3)`` uint8 photo (see the module doc)."""
    g = (rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255.0
    q75, q50, q25 = np.percentile(g, [75, 50, 25])
    g = (g - q50) / (q75 - q25 + 1e-3)
    fs = []
    for s in (1.0, 2.0, 4.0):
        l1, l2 = hessian_matrix_eigvals(hessian_matrix(g, sigma=s, order="rc", use_gaussian_derivatives=False))
        fs += [l1 * s * s, l2 * s * s]
        fs.append(np.hypot(ndi.gaussian_filter(g, s, order=(0, 1)), ndi.gaussian_filter(g, s, order=(1, 0))) * s)
    m3 = ndi.gaussian_filter(g, 3)
    fs += [m3, ndi.gaussian_filter(g, 8), np.sqrt(np.maximum(ndi.gaussian_filter(g * g, 3) - m3 * m3, 0))]
    return np.stack(fs, 0).astype(np.float32)


class TextureKNN:
    """The texture kNN detector of the module doc, fitted on a product's train normals."""

    def __init__(self, product: str, bank_size: int = 10_000, per_image: int = 1500, seed: int = 0):
        rows = []
        for i, it in enumerate(br.items(product, "train")):
            rgb = load_rgb(it["path"])
            copy, _ = acquisition.random_acquisition(rgb, np.random.default_rng([seed, 0, i]), n_changes=(1, 3))
            for j, im in enumerate((rgb, copy)):
                f = texture_features(im)[:, 8:-8, 8:-8]
                f = f.reshape(f.shape[0], -1).T
                pick = np.random.default_rng([seed, 99, i, j]).choice(len(f), min(per_image, len(f)), replace=False)
                rows.append(f[pick])
        x = np.concatenate(rows)
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-6
        pick = np.random.default_rng(seed).choice(len(x), min(bank_size, len(x)), replace=False)
        bank = (x[pick] - self.mu) / self.sd
        faiss = import_faiss()
        self.index = faiss.IndexFlatL2(bank.shape[1])
        self.index.add(np.ascontiguousarray(bank, dtype=np.float32))

    def raw_map(self, rgb: np.ndarray) -> np.ndarray:
        """``(H, W)`` float32 distance of each pixel to its nearest bank pixel (standardised feature units)."""
        f = texture_features(rgb)
        c, h, w = f.shape
        q = np.ascontiguousarray(((f.reshape(c, -1).T - self.mu) / self.sd).astype(np.float32))
        d2, _ = self.index.search(q, 1)
        return np.sqrt(np.maximum(d2[:, 0], 0)).reshape(h, w)


def patchcore_maps(product: str, photos: list[dict]) -> list[np.ndarray]:
    """PatchCore maps at pixel resolution (nearest upsampling, no blur), shipped protocol of bench_robustness."""
    cfg = PRODUCT_CONFIGS[product]
    embs = list(br.split_embeddings(product, "train", cfg.augment, None))
    embs += br.acq_train_embeddings(product, cfg.augment, None, 1, 100, br.ACQ_CHANGES, (1, 3))
    bank = br.bank_from(embs, 0.01, 120_000)
    pm = br.score_maps(bank, [br.embed_views(p["rgb"], cfg.tta, None) for p in photos], cfg.tta)
    return [br.full_map(m, p["rgb"].shape[:2], 0) for p, m in zip(photos, pm)]


def evaluate(photos: list[dict], maps: list[np.ndarray], border: int) -> dict:
    """Image / pixel / per-type AUROC of relative maps (each minus its median); image score = max inside ``border``."""
    labels = np.array([p["label"] == "defect" for p in photos])
    rel = [m - np.median(m) for m in maps]
    scores = np.array([float((r[border:-border, border:-border] if border else r).max()) for r in rel])
    per = {}
    for t in TYPES:
        sel = np.array([(not lab) or p["defect_type"] == t for p, lab in zip(photos, labels)])
        per[t] = round(float(roc_auc_score(labels[sel], scores[sel])), 3)
    pixel = roc_auc_score(np.concatenate([p["mask"].ravel() for p in photos]), np.concatenate([r.ravel() for r in rel]))
    return {"image_auroc": round(float(roc_auc_score(labels, scores)), 3), "pixel_auroc": round(float(pixel), 3),
            "per_type": per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--products", nargs="+", default=["brick", "gravel", "grass"])
    ap.add_argument("--smooth", type=float, default=2.0, help="Gaussian sigma (px) of the texture map")
    ap.add_argument("--unseen", action="store_true", help="also read the unseen split (once per change)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    splits = ["tune"] + (["unseen"] if args.unseen else [])
    for product in args.products:
        det = TextureKNN(product)
        for split in splits:
            photos = tune_set(product) if split == "tune" else load_split(product, "unseen")
            t0 = time.perf_counter()
            tex = [ndi.gaussian_filter(det.raw_map(p["rgb"]), args.smooth) for p in photos]
            ms = (time.perf_counter() - t0) * 1000 / len(photos)
            row = {"product": product, "split": split, "detector": f"texture-knn (smooth {args.smooth:g})",
                   "ms_per_photo": round(ms, 1), **evaluate(photos, tex, 4)}
            print(json.dumps(row), flush=True)
            row = {"product": product, "split": split, "detector": "patchcore (anchor)",
                   **evaluate(photos, patchcore_maps(product, photos), 0)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
