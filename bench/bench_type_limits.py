"""Where the defect-type decision loses accuracy across generators (issue 15), tuning split only.

The similar-defect index names a defect type from a descriptor pooled under the PatchCore
anomaly map (:mod:`models.defect_descriptor`) and a per-product metric
(:class:`models.defect_descriptor.DefectProjection`). Trained on defects of one generator and
tested on the other (``data.synth`` -> ``data.synth_alt`` and back), this script separates
the two places where the type decision can fail:

* ``classifiers``: other classifiers on the same cached descriptors (logistic regression with
  other C, random forest, extra trees, gradient boosting; per product or pooled over the three
  products) - is the metric the limit?
* ``oracle``: the descriptor computed under the exact defect masks (Gaussian-smoothed, on
  training *and* test sides) instead of the predicted map - an upper bound of what a perfect
  localisation would give with the same features;
* ``localizer``: a pixel classifier (logistic regression / gradient boosting on the relative
  PatchCore map at three scales plus luminance high-pass and local-energy features, 4 px grid)
  trained on one generator's masks, scored by how often its arg-max falls inside the other
  generator's (4 px dilated) masks, against the PatchCore map's arg-max;
* ``saliency``: the PatchCore map multiplied with a hand-made image saliency (local energy
  ratio, low-frequency deviation) before describing;
* ``confidence``: the shipped metric's probability of its arg-max type as a confidence: share
  of defects at or above each threshold and the type accuracy above / below it (chooses
  :data:`services.search.TYPE_CONFIDENT`).

Sets per product (all from the tuning region; the unseen split is never read here):
``gallery`` (builder's generator), ``val`` defects (builder's generator), 40 defects per type
by ``data.synth`` and by ``data.synth_alt`` drawn on the val normals with acquisition changes
(same seeds as ``bench/bench_retrieval_robustness.py``). Score: defect-type accuracy of the
classifier's arg-max (a proxy of Recall@1).

    DRA_STATE_DIR=state .venv/bin/python bench/bench_type_limits.py classifiers oracle localizer saliency confidence
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.settings import apply_runtime_env, get_settings  # noqa: E402

apply_runtime_env()

from PIL import Image  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402
from skimage.transform import resize  # noqa: E402
from sklearn.ensemble import ExtraTreesClassifier, HistGradientBoostingClassifier, RandomForestClassifier  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from core.imageio import load_rgb  # noqa: E402
from core.settings import PRODUCTS  # noqa: E402
from data.build import load_manifest  # noqa: E402
from models.defect_descriptor import DefectProjection, _relative_map  # noqa: E402
from services.container import Services  # noqa: E402
from services.lock import MODEL_LOCK  # noqa: E402

from bench_retrieval_robustness import generated_with_masks  # noqa: E402  (same seeds as its descriptor cache)

CACHE = Path("/tmp/rb/type_limits")
KEYS = ("gallery", "val", "synth", "alt")
TESTS = (("synth->alt", ("gallery", "synth"), "alt"), ("alt->val", ("gallery", "alt"), "val"),
         ("both->val", ("gallery", "synth", "alt"), "val"))
PER_TYPE = 40


def load_sets(services: Services, product: str) -> dict:
    """``{key: (images, masks, labels, patchcore_maps)}`` for :data:`KEYS`, cached per bank fit."""
    meta = services.banks.read_meta(product)
    key = hashlib.sha1(f"{services.settings.state_dir}|{product}|{meta.get('fitted_at')}".encode()).hexdigest()[:16]
    path = CACHE / f"{product}-{key}.pkl"
    if path.is_file():
        with open(path, "rb") as f:
            return pickle.load(f)
    dd = Path(services.settings.data_dir)
    items = [it for it in load_manifest(dd)["items"] if it["product"] == product]
    normals = [load_rgb(dd / it["image"]) for it in items if it["split"] == "val" and it["label"] == "good"]
    out = {}
    for k in KEYS:
        if k in ("synth", "alt"):
            ims, masks, ys = generated_with_masks(normals, product, PER_TYPE, k)
        else:
            its = [it for it in items if it["split"] == k and it["label"] == "defect"]
            ims = [load_rgb(dd / it["image"]) for it in its]
            masks = [np.asarray(Image.open(dd / it["mask"])) > 0 for it in its]
            ys = [it["defect_type"] for it in its]
        maps = []
        with MODEL_LOCK.shared():
            for i in range(0, len(ims), 16):
                maps += services.image_index.anomaly_maps(ims[i:i + 16], product)
        out[k] = (ims, masks, ys, [np.asarray(m, np.float32) for m in maps])
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(out, f)
    return out


def _clf(kind: str):
    if kind.startswith("logreg"):
        return make_pipeline(StandardScaler(), LogisticRegression(C=float(kind.split("C")[1]), max_iter=5000))
    if kind == "forest":
        return RandomForestClassifier(500, min_samples_leaf=2, n_jobs=2, random_state=0)
    if kind == "extra-trees":
        return ExtraTreesClassifier(500, min_samples_leaf=2, n_jobs=2, random_state=0)
    return HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, max_leaf_nodes=15, random_state=0)


def type_accuracy(X: dict, kind: str = "logregC0.1", pooled: bool = False) -> dict:
    """Cross-generator type accuracy per test of :data:`TESTS`: ``[brick, gravel, grass, mean]``."""
    row = {}
    for name, train, test in TESTS:
        acc = []
        for p in PRODUCTS:
            src = PRODUCTS if pooled else [p]
            Xt = np.vstack([X[q][k][0] for q in src for k in train])
            yt = sum((list(X[q][k][1]) for q in src for k in train), [])
            pred = _clf(kind).fit(Xt, yt).predict(X[p][test][0])
            acc.append(float(np.mean(pred == np.asarray(X[p][test][1]))))
        row[name] = [round(a, 3) for a in acc] + [round(float(np.mean(acc)), 3)]
    return row


def describe_all(services: Services, data: dict, map_fn) -> dict:
    desc = services.image_index.describer
    return {p: {k: (desc(ims, [map_fn(im, mk, m) for im, mk, m in zip(ims, masks, maps)]), ys)
                for k, (ims, masks, ys, maps) in data[p].items()} for p in PRODUCTS}


def _lum(im: np.ndarray) -> np.ndarray:
    return np.asarray(im, np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def _robust_z(a: np.ndarray) -> np.ndarray:
    med = np.median(a)
    return (a - med) / (1.4826 * np.median(np.abs(a - med)) + 1e-6)


def saliency(im: np.ndarray) -> np.ndarray:
    """max(relative local-energy ratio, relative low-frequency deviation), float32 ``(H, W)``."""
    L = _lum(im)
    hp = L - ndi.gaussian_filter(L, 3)
    fine = ndi.gaussian_filter(hp ** 2, 2) / (ndi.gaussian_filter(hp ** 2, 16) + 1e-3)
    low = np.abs(ndi.gaussian_filter(L, 4) - ndi.gaussian_filter(L, 24)) / (np.sqrt(ndi.gaussian_filter(hp ** 2, 16)) + 1e-3)
    return np.maximum(_relative_map(fine), _relative_map(low))


def pixel_features(im: np.ndarray, amap: np.ndarray, stride: int = 4) -> np.ndarray:
    """Per-pixel localiser features on a ``stride`` px grid: float32 ``(h, w, 11)``."""
    H, W = im.shape[:2]
    L = _lum(im)
    pm = resize(np.asarray(amap, np.float32), (H, W), order=1)
    z = _robust_z(pm)
    f = [z, ndi.gaussian_filter(z, 4), ndi.gaussian_filter(z, 10), _relative_map(pm)]
    for s in (1.5, 4, 10):
        hp = _robust_z(L - ndi.gaussian_filter(L, s))
        f += [ndi.gaussian_filter(np.abs(hp), 2), ndi.gaussian_filter(hp, 2)]
    e = L - ndi.gaussian_filter(L, 2)
    f.append(np.log(ndi.gaussian_filter(e ** 2, 3) / (ndi.gaussian_filter(e ** 2, 20) + 1e-3) + 1e-3))
    hw = (max(8, H // stride), max(8, W // stride))
    return np.stack([resize(a, hw, order=1, anti_aliasing=True) for a in f], -1).astype(np.float32)


def _hit(pred: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the arg-max of ``pred`` (resized to the mask) lies in the 4 px dilated mask."""
    pr = resize(np.asarray(pred, np.float32), mask.shape, order=1)
    return bool(ndi.binary_dilation(mask, iterations=4).flat[int(np.argmax(pr))])


def localizer(data: dict) -> dict:
    rng = np.random.default_rng(0)
    feats = {(p, k): [pixel_features(im, m) for im, m in zip(v[0], v[3])] for p in PRODUCTS for k, v in data[p].items()}
    rows = {}
    for kind in ("logreg", "boosting"):
        row = {}
        for name, train, test in TESTS[:2]:
            cells = []
            for p in PRODUCTS:
                X, y = [], []
                for k in train:
                    for F, mask in zip(feats[(p, k)], data[p][k][1]):
                        t = (resize(mask.astype(np.float32), F.shape[:2], order=1, anti_aliasing=True) > 0.25).ravel()
                        Fr = F.reshape(-1, F.shape[-1])
                        neg = np.flatnonzero(~t)
                        neg = rng.choice(neg, min(len(neg), 60), replace=False)
                        X += [Fr[t], Fr[neg]]
                        y += [np.ones(int(t.sum())), np.zeros(len(neg))]
                model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, class_weight="balanced")) \
                    if kind == "logreg" else HistGradientBoostingClassifier(max_iter=150, max_leaf_nodes=15,
                                                                            class_weight="balanced", random_state=0)
                model.fit(np.vstack(X), np.concatenate(y))
                learned = [_hit(model.predict_proba(F.reshape(-1, F.shape[-1]))[:, 1].reshape(F.shape[:2]), mask)
                           for F, mask in zip(feats[(p, test)], data[p][test][1])]
                pc = [_hit(m, mask) for m, mask in zip(data[p][test][3], data[p][test][1])]
                cells.append({"learned": round(float(np.mean(learned)), 2), "patchcore": round(float(np.mean(pc)), 2)})
            row[name] = dict(zip(PRODUCTS, cells))
        rows[kind] = row
    return rows


def confidence(X: dict, thresholds=(0.4, 0.5, 0.6, 0.7, 0.8)) -> dict:
    """Coverage and accuracy of the shipped metric's arg-max type above / below each probability threshold."""
    out = {}
    for name, train, test in TESTS[:2]:
        pmax, ok = [], []
        for p in PRODUCTS:
            proj = DefectProjection.fit(np.vstack([X[p][k][0] for k in train]), sum((list(X[p][k][1]) for k in train), []))
            for probs, truth in zip(proj.class_probabilities(X[p][test][0]), X[p][test][1]):
                best = max(probs, key=probs.get)
                pmax.append(probs[best])
                ok.append(best == truth)
        pmax, ok = np.asarray(pmax), np.asarray(ok)
        out[name] = {"n": len(ok), "accuracy": round(float(ok.mean()), 3), **{
            f"p>={t}": {"coverage": round(float((pmax >= t).mean()), 2),
                        "accuracy_above": round(float(ok[pmax >= t].mean()), 3) if (pmax >= t).any() else None,
                        "accuracy_below": round(float(ok[pmax < t].mean()), 3) if (pmax < t).any() else None}
            for t in thresholds}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modes", nargs="+", choices=("classifiers", "oracle", "localizer", "saliency", "confidence"))
    args = ap.parse_args()
    services = Services(get_settings())
    data = {p: load_sets(services, p) for p in PRODUCTS}
    base = None
    if {"classifiers", "oracle", "saliency", "confidence"} & set(args.modes):
        base = describe_all(services, data, lambda im, mask, m: m)
        print(json.dumps({"mode": "predicted map", "classifier": "logregC0.1 (shipped)", **type_accuracy(base)}), flush=True)
    if "classifiers" in args.modes:
        for kind in ("logregC0.01", "logregC0.1", "logregC1", "forest", "extra-trees", "boosting"):
            for pooled in (False, True):
                print(json.dumps({"mode": "classifiers", "classifier": kind, "pooled": pooled,
                                  **type_accuracy(base, kind, pooled)}), flush=True)
    if "confidence" in args.modes:
        print(json.dumps({"mode": "confidence", **confidence(base)}), flush=True)
    if "oracle" in args.modes:
        X = describe_all(services, data, lambda im, mask, m: ndi.gaussian_filter(mask.astype(np.float32), 1.5))
        print(json.dumps({"mode": "oracle: exact masks on both sides", **type_accuracy(X)}), flush=True)
    if "saliency" in args.modes:
        def combined(im, mask, m):
            pm = _relative_map(m)
            pm = pm if pm.shape == im.shape[:2] else resize(pm, im.shape[:2], order=1)
            return np.sqrt(pm * saliency(im))
        X = describe_all(services, data, combined)
        loc = {p: round(float(np.mean([_hit(combined(im, mk, m), mk) for im, mk, _, m in zip(*data[p]["alt"])])), 2)
               for p in PRODUCTS}
        print(json.dumps({"mode": "saliency x PatchCore map", "alt_argmax_in_mask": loc, **type_accuracy(X)}), flush=True)
    if "localizer" in args.modes:
        print(json.dumps({"mode": "localizer: arg-max inside the true mask", **localizer(data)}), flush=True)


if __name__ == "__main__":
    main()
