"""Robustness experiments (issue 15): PatchCore variants on the tuning split and the unseen split.

Scratch-level sweeps on cached Lite0 features, side by side in one process, so that a
variant is chosen on the **tuning split** (``val``: the data builder's own generator,
fit region) and reported once on the **unseen split** (``unseen``: the second generator
``data.holdout_synth``, the unseen columns 320-511, native-scale 128-192 px photos, half
gray, acquisition changes on normals and defects).

Features: EfficientNet-Lite0 blocks 4+7 through the project's own model builder
(ONNX Runtime), pooled and embedded as anomalib's ``PatchcoreModel`` does, per image and
per symmetry view; cached under ``/tmp/rb/cache`` (float16). Every variant re-uses them.

Usage::

    DRA_STATE_DIR=/tmp/rb/state .venv/bin/python bench/bench_robustness.py anomaly \\
        --variants legacy native native+acq --products brick gravel grass

Prints one JSON object per variant and product, then a summary table.
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

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402,N812

from core.imageio import load_rgb  # noqa: E402
from data import acquisition  # noqa: E402
from data.build import load_manifest  # noqa: E402
from models.patchcore.config import AUGMENTATIONS, PRODUCT_CONFIGS  # noqa: E402
from models.patchcore.coreset import greedy_coreset_indices  # noqa: E402
from models.patchcore.model import augment_views, backbone_spec, build_model  # noqa: E402

CACHE = Path("/tmp/rb/cache")
TYPES = ("scratch", "crack", "hole", "stain", "contamination")


# --------------------------------------------------------------------------- data


def items(product: str, split: str) -> list[dict]:
    data_dir = Path(get_settings().data_dir)
    return [dict(it, path=str(data_dir / it["image"]), mask_path=str(data_dir / it["mask"]) if it.get("mask") else None)
            for it in load_manifest(data_dir)["items"] if it["product"] == product and it["split"] == split]


def load_mask(it: dict, shape: tuple[int, int]) -> np.ndarray:
    if not it.get("mask_path"):
        return np.zeros(shape, bool)
    return np.asarray(load_rgb(it["mask_path"]))[..., 0] > 0


# --------------------------------------------------------------------------- features

_MODEL = {}


def model():
    if "m" not in _MODEL:
        _MODEL["m"] = build_model(backbone_spec("efficientnet-lite0", (4, 7)), 3, sigma=8.0, runtime="onnxruntime")
    return _MODEL["m"]


def prep(rgb: np.ndarray, size: int | None, gray: bool = False) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255.0
    if gray:
        x = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]).repeat(1, 3, 1, 1)
    if size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - 127.0 / 255.0) / (128.0 / 255.0)


def embed_views(rgb: np.ndarray, views: str, size: int | None, gray: bool = False) -> list[torch.Tensor]:
    """Per view: the pooled patch embedding ``(D, h, w)`` (float16) of that view."""
    m = model()
    x = prep(rgb, size, gray)
    out = []
    with torch.inference_mode():
        for transpose, k in AUGMENTATIONS[views]:
            v = x.transpose(2, 3) if transpose else x
            v = torch.rot90(v, k, dims=(2, 3))
            f = m.feature_extractor(v)
            f = {layer: m.feature_pooler(t) for layer, t in f.items()}
            out.append(m.generate_embedding(f)[0].half())
    return out


def cached(key: str, fn):
    path = CACHE / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".pt")
    if path.is_file():
        return torch.load(path)
    val = fn()
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(val, path)
    return val


def split_embeddings(product: str, split: str, views: str, size: int | None, gray: bool = False) -> list:
    its = items(product, split)
    key = f"{get_settings().data_dir}|{product}|{split}|{views}|{size}|{gray}|v1"
    return cached(key, lambda: [embed_views(load_rgb(it["path"]), views, size, gray) for it in its])


def acq_train_embeddings(product: str, views: str, size: int | None, copies: int, seed: int,
                         changes: tuple[str, ...], n_changes: tuple[int, int], gray: bool = False) -> list:
    its = items(product, "train")
    key = f"{get_settings().data_dir}|{product}|acq|{views}|{size}|{copies}|{seed}|{changes}|{n_changes}|{gray}|v1"

    def run():
        out = []
        for c in range(copies):
            for i, it in enumerate(its):
                rng = np.random.default_rng([seed, c, i])
                img, _ = acquisition.random_acquisition(load_rgb(it["path"]), rng, n_changes=n_changes, changes=changes)
                out.append(embed_views(img, views, size, gray))
        return out
    return cached(key, run)


# --------------------------------------------------------------------------- bank and scores


def bank_from(embs: list, n_select_ratio: float, presample: int | None, seed: int = 0) -> torch.Tensor:
    flat = torch.cat([e.reshape(e.shape[0], -1).T for views in embs for e in views]).float()
    n = flat.shape[0]
    n_sel = max(1, int(n * n_select_ratio))
    if presample and n > presample:
        g = torch.Generator().manual_seed(seed)
        flat = flat[torch.randperm(n, generator=g)[:presample]]
    picks = greedy_coreset_indices(flat, min(n_sel, flat.shape[0]), seed=seed)
    return flat[torch.as_tensor(picks)].contiguous()


def score_maps(bank: torch.Tensor, embs: list, views: str, knn: int = 1) -> list[np.ndarray]:
    """Patch-distance map per image, averaged over the test-time views (float32 ``(h, w)``); with ``knn`` > 1
    each patch's distance is the mean over its ``knn`` nearest bank patches."""
    from core.blas import import_faiss

    faiss = import_faiss()

    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(np.ascontiguousarray(bank.numpy()))
    out = []
    for per_view in embs:
        acc = None
        for (transpose, k), e in zip(AUGMENTATIONS[views], per_view):
            d, h, w = e.shape
            q = np.ascontiguousarray(e.float().reshape(d, -1).T.numpy())
            d2, _ = index.search(q, knn)
            m = torch.from_numpy(np.sqrt(np.maximum(d2, 0)).mean(axis=1)).reshape(h, w)
            m = torch.rot90(m, -k, dims=(0, 1))
            m = m.T if transpose else m
            acc = m if acc is None else acc + m
        out.append((acc / len(per_view)).numpy().astype(np.float32))
    return out


def full_map(pmap: np.ndarray, shape: tuple[int, int], sigma: float) -> np.ndarray:
    from models.patchcore.anomaly_map import SeparableGaussianBlur

    t = torch.from_numpy(pmap)[None, None]
    t = F.interpolate(t, size=shape, mode="nearest")
    if sigma > 0:
        t = SeparableGaussianBlur(sigma)(t)
    return t[0, 0].numpy()


def metrics(its: list[dict], pmaps: list[np.ndarray], threshold: float | None, sigma: float,
            pixel: bool = True) -> dict:
    from sklearn.metrics import roc_auc_score

    labels = np.array([it["label"] == "defect" for it in its])
    scores = np.array([float(m.max()) for m in pmaps])
    out = {"image_auroc": round(float(roc_auc_score(labels, scores)), 4)}
    per = {}
    for t in TYPES:
        sel = np.array([(not lab) or it.get("defect_type") == t for it, lab in zip(its, labels)])
        if labels[sel].any():
            per[t] = round(float(roc_auc_score(labels[sel], scores[sel])), 4)
    out["per_type"] = per
    if pixel:
        px_s, px_l = [], []
        for it, m in zip(its, pmaps):
            shape = tuple(it.get("size") or (256, 256))
            amap = full_map(m, shape, sigma)
            px_s.append(amap.reshape(-1))
            px_l.append(load_mask(it, shape).reshape(-1))
        out["pixel_auroc"] = round(float(roc_auc_score(np.concatenate(px_l), np.concatenate(px_s))), 4)
    if threshold is not None:
        pred = scores >= threshold
        out["fpr"] = round(float(pred[~labels].mean()), 4)
        out["recall"] = round(float(pred[labels].mean()), 4)
        out["threshold"] = round(threshold, 4)
    out["normal_scores"] = [round(float(np.percentile(scores[~labels], q)), 3) for q in (5, 50, 95, 100)]
    from scipy import ndimage as ndi

    for sig in (1.0, 2.0):  # image score = max of the patch map blurred by sig cells (pools a defect's extent)
        alt = np.array([float(ndi.gaussian_filter(m, sig).max()) for m in pmaps])
        out[f"image_auroc_blur{sig:g}"] = round(float(roc_auc_score(labels, alt)), 4)
    return out


# --------------------------------------------------------------------------- variants

VARIANTS = {
    # name: dict(size, acq copies, gray, bank views from config, tta)
    "legacy": {"size": 256},
    "native": {},
    "native+acq": {"acq": 1},
    "native+acq2": {"acq": 2},
    "native+gray": {"gray": True},
    "native+gray+acq": {"gray": True, "acq": 1},
    "native+notta": {"tta": "none", "augment": "none"},
    "native+acq+valbank": {"acq": 1, "valbank": True},
    "native+acq+center": {"acq": 1, "center": "mean"},
    "native+acq+standard": {"acq": 1, "center": "std"},
    "native+acq+b4": {"acq": 1, "center": "b4"},
    # image-relative score (PatchCoreConfig.score_norm "median", shipped): each map minus its own median
    "native+acq+relative": {"acq": 1, "relative": True},
    # the same with each patch scored by the mean distance to its k nearest bank patches (a smoother
    # nearest-neighbour estimate on stochastic textures; PatchCore itself uses k = 1)
    "native+acq+relative+knn3": {"acq": 1, "relative": True, "knn": 3},
    "native+acq+relative+knn9": {"acq": 1, "relative": True, "knn": 9},
    # MH-PatchCore (anomalib 2.7 ``mh_patchcore``): the patch embeddings projected by incremental PCA
    # (99 % of the variance) and whitened with a shrunk covariance (0.07), both fitted on the bank's
    # embeddings (anomalib's StreamingPCA / CovarianceWhitening); coreset and search in that space
    "native+acq+relative+mh": {"acq": 1, "relative": True, "whiten": 0.07},
    "native+acq+relative+mh0.3": {"acq": 1, "relative": True, "whiten": 0.3},
    "native+acq+valbank+center": {"acq": 1, "valbank": True, "center": "mean"},
    # PaDiM (Defard et al. 2021) with one Gaussian shared by all positions (textures are not aligned, so
    # anomalib's per-position Gaussians do not apply): Mahalanobis distance of each patch embedding
    "padim-shared+acq": {"acq": 1, "detector": "gauss"},
    # DFM (Ahuja et al. 2019, anomalib's Dfm): PCA of globally pooled features of the normals, score = the
    # feature reconstruction error (image level; the map is the patches' reconstruction error)
    "dfm+acq": {"acq": 1, "detector": "dfm"},
}


def dfm_maps(embs_train: list, embs: list, views: str, keep: float = 0.97) -> list[np.ndarray]:
    pooled = torch.stack([e.float().mean(dim=(1, 2)) for vv in embs_train for e in vv])
    mu = pooled.mean(0)
    u, sv, vt = torch.linalg.svd(pooled - mu, full_matrices=False)
    var = (sv ** 2) / (sv ** 2).sum()
    k = int((torch.cumsum(var, 0) < keep).sum()) + 1
    comp = vt[:k]

    def residual(x: torch.Tensor) -> torch.Tensor:
        x = x - mu
        return (x - (x @ comp.T) @ comp).norm(dim=1)

    return view_averaged_maps(embs, views, residual)


def view_averaged_maps(embs: list, views: str, patch_score) -> list[np.ndarray]:
    """Per image: ``patch_score`` ((N, D) patch features -> (N,) scores) of each view's embedding,
    turned back to the image's orientation and averaged over the views."""
    out = []
    for per_view in embs:
        acc = None
        for (transpose, k), e in zip(AUGMENTATIONS[views], per_view):
            d, h, w = e.shape
            m = patch_score(e.float().reshape(d, -1).T).reshape(h, w)
            m = torch.rot90(m, -k, dims=(0, 1))
            m = m.T if transpose else m
            acc = m if acc is None else acc + m
        out.append((acc / len(per_view)).numpy().astype(np.float32))
    return out


def gauss_maps(embs_train: list, embs: list, views: str) -> list[np.ndarray]:
    flat = torch.cat([e.reshape(e.shape[0], -1).T.float() for vv in embs_train for e in vv])
    mu = flat.mean(0)
    cov = torch.cov((flat - mu).T) + 0.01 * torch.eye(flat.shape[1])
    icov = torch.linalg.inv(cov)

    def mahalanobis(x: torch.Tensor) -> torch.Tensor:
        x = x - mu
        return torch.sqrt(((x @ icov) * x).sum(1).clamp_min(0))

    return view_averaged_maps(embs, views, mahalanobis)


def whitener(embs: list, shrinkage: float, presample: int = 200_000, seed: int = 0):
    """anomalib's MH-PatchCore projection fitted on the bank embeddings: ``(D, h, w) -> (D', h, w)``."""
    from anomalib.models.image.mh_patchcore.components import CovarianceWhitening, StreamingPCA

    flat = torch.cat([e.reshape(e.shape[0], -1).T for views in embs for e in views]).float()
    if flat.shape[0] > presample:
        flat = flat[torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(seed))[:presample]]
    pca, cov = StreamingPCA(variance_ratio=0.99), CovarianceWhitening(shrinkage=shrinkage)
    for i in range(0, flat.shape[0], 8192):
        pca.update(flat[i:i + 8192])
    pca.finalize()
    proj = pca.transform(flat)
    for i in range(0, proj.shape[0], 8192):
        cov.update(proj[i:i + 8192])
    cov.finalize()

    def apply(per_image: list) -> list:
        out = []
        for views in per_image:
            vv = []
            for e in views:
                d, h, w = e.shape
                z = cov.transform(pca.transform(e.float().reshape(d, -1).T)).float()
                vv.append(z.T.reshape(-1, h, w).contiguous())
            out.append(vv)
        return out

    return apply


def centre(embs: list, how: str | None) -> list:
    """Per image and view: subtract the spatial mean feature (``mean``) and divide by the spatial std (``std``)."""
    if not how:
        return embs
    out = []
    for views in embs:
        vv = []
        for e in views:
            if how == "b4":  # block 4 only (stride 8, 40 channels): a smaller receptive field
                vv.append(e[:40])
                continue
            e = e.float()
            c = e - e.mean(dim=(1, 2), keepdim=True)
            if how == "std":
                c = c / (e.std(dim=(1, 2), keepdim=True) + 1e-3)
            vv.append(c.half())
        out.append(vv)
    return out
ACQ_CHANGES = ("scale", "blur", "sharpen", "exposure", "gamma", "gray", "jpeg", "noise")


def run_variant(name: str, product: str, args) -> dict:
    v = dict(VARIANTS[name])
    cfg = PRODUCT_CONFIGS[product]
    views_bank = v.get("augment", cfg.augment)
    tta = v.get("tta", cfg.tta)
    size = v.get("size")
    gray = v.get("gray", False)
    t0 = time.perf_counter()
    # bank embeddings: each bank view of each train crop (+ acquisition copies)
    train = split_embeddings(product, "train", views_bank, size, gray)
    embs = list(train)
    for c in range(v.get("acq", 0)):
        embs += acq_train_embeddings(product, views_bank, size, 1, 100 + c, ACQ_CHANGES, (1, 3), gray)
    if v.get("valbank"):
        vals = split_embeddings(product, "val", views_bank, size, gray)
        embs += [e for e, it in zip(vals, items(product, "val")) if it["label"] == "good"]
    how = v.get("center")
    val_its, un_its = items(product, "val"), items(product, "unseen")
    if v.get("detector") in ("gauss", "dfm"):
        bank = torch.zeros(0, 1)
        fn = gauss_maps if v["detector"] == "gauss" else dfm_maps
        val = fn(embs, split_embeddings(product, "val", tta, size, gray), tta)
        un = fn(embs, split_embeddings(product, "unseen", tta, size, gray), tta)
        t_bank = time.perf_counter() - t0
    elif v.get("whiten") is not None:
        wt = whitener(embs, float(v["whiten"]))
        bank = bank_from(wt(embs), args.ratio, args.presample)
        t_bank = time.perf_counter() - t0
        val = score_maps(bank, wt(split_embeddings(product, "val", tta, size, gray)), tta)
        un = score_maps(bank, wt(split_embeddings(product, "unseen", tta, size, gray)), tta)
    else:
        bank = bank_from(centre(embs, how), args.ratio, args.presample)
        t_bank = time.perf_counter() - t0
        knn = int(v.get("knn", 1))
        val = score_maps(bank, centre(split_embeddings(product, "val", tta, size, gray), how), tta, knn)
        un = score_maps(bank, centre(split_embeddings(product, "unseen", tta, size, gray), how), tta, knn)
    if v.get("relative"):
        val, un = [m - np.median(m) for m in val], [m - np.median(m) for m in un]
    normal_val = np.array([float(m.max()) for m, it in zip(val, val_its) if it["label"] == "good"])
    thr = float(np.quantile(normal_val, 1 - args.fpr))
    row = {"variant": name, "product": product, "bank": int(bank.shape[0]), "bank_s": round(t_bank, 1),
           "val": metrics(val_its, val, thr, cfg.sigma, pixel=not args.no_pixel),
           "unseen": metrics(un_its, un, thr, cfg.sigma, pixel=not args.no_pixel)}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["anomaly", "supervised", "ensemble", "changes"])
    ap.add_argument("--variants", nargs="+", default=["legacy", "native"])
    ap.add_argument("--products", nargs="+", default=["brick", "gravel", "grass"])
    ap.add_argument("--ratio", type=float, default=0.01)
    ap.add_argument("--presample", type=int, default=120_000)
    ap.add_argument("--fpr", type=float, default=0.05)
    ap.add_argument("--no-pixel", action="store_true")
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--normal-copies", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    if args.what == "changes":
        for p in args.products:
            run_changes(p, args)
        return
    if args.what == "ensemble":
        for p in args.products:
            run_ensemble(p, args)
        return
    if args.what == "supervised":
        for p in args.products:
            row = run_supervised(p, args)
            print(json.dumps(row), flush=True)
        return
    for name in args.variants:
        for p in args.products:
            row = run_variant(name, p, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("variant | product | val img/px | unseen img/px | unseen fpr/recall | unseen per type")
    for r in rows:
        u, va = r["unseen"], r["val"]
        print(f"{r['variant']} | {r['product']} | {va['image_auroc']}/{va.get('pixel_auroc')} | "
              f"{u['image_auroc']}/{u.get('pixel_auroc')} | {u.get('fpr')}/{u.get('recall')} | {u['per_type']}")



# --------------------------------------------------------------------------- supervised head (experiment)

_ONNX = {}


def onnx247():
    from models.backbones import load_lite0_onnx

    if "m" not in _ONNX:
        _ONNX["m"] = load_lite0_onnx((2, 4, 7))
    return _ONNX["m"]


def head_features(rgb: np.ndarray, gray: bool = False) -> torch.Tensor:
    """Stride-8 feature map ``(168, H/8, W/8)`` float16: PatchCore's 120-d embedding + block 2 avg / max pooled."""
    x = prep(rgb, None, gray)
    with torch.inference_mode():
        f = onnx247()(x)
        pool = torch.nn.AvgPool2d(3, 1, 1)
        f4, f7 = pool(f["_blocks.4"]), pool(f["_blocks.7"])
        f7 = F.interpolate(f7, size=f4.shape[-2:], mode="bilinear")
        f2 = f["_blocks.2"]
        a2 = F.avg_pool2d(f2, 2)
        m2 = F.max_pool2d((f2 - F.avg_pool2d(f2, 5, 1, 2)).abs(), 2)
        h, w = f4.shape[-2:]
        a2, m2 = a2[..., :h, :w], m2[..., :h, :w]
        return torch.cat([f4, f7, a2, m2], 1)[0].half()


def cell_labels(mask: np.ndarray, h: int, w: int) -> torch.Tensor:
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    frac = F.adaptive_avg_pool2d(t, (h, w))[0, 0]
    return (frac * 8).clamp(0, 1)


def synth_training_set(product: str, copies: int, seed: int, gen: str = "synth") -> list[tuple[np.ndarray, np.ndarray]]:
    """Normals with acquisition changes and synthesized defects on the train crops: ``[(rgb, mask)]``."""
    from data import synth

    out = []
    for i, it in enumerate(items(product, "train")):
        clean = load_rgb(it["path"])
        rng = np.random.default_rng([seed, i])
        img, m, _ = acquisition.acquire(clean, rng, mask=np.zeros(clean.shape[:2], bool), n_changes=(0, 3))
        out.append((img, m))
        for c in range(copies):
            dtype = TYPES[int(rng.integers(len(TYPES)))]
            fn = synth.SYNTHESIZERS[dtype]
            for _ in range(50):
                d = fn(clean, rng, product)
                if d.mask.sum() >= synth.MIN_AREA:
                    break
            alpha = float(rng.uniform(0.25, 1.0))
            faint = np.clip(clean + alpha * (d.image.astype(np.float32) - clean), 0, 255).round().astype(np.uint8)
            mask = d.mask.astype(bool)
            img, m, _ = acquisition.acquire(faint, rng, mask=mask, n_changes=(0, 3))
            out.append((img, m))
    return out


IMAGE_LOSS = True


def train_head(feats: list[torch.Tensor], labels: list[torch.Tensor], epochs: int, seed: int = 0):
    torch.manual_seed(seed)
    c = feats[0].shape[0]
    head = torch.nn.Sequential(torch.nn.Conv2d(c, 64, 1), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3, padding=1),
                               torch.nn.ReLU(), torch.nn.Conv2d(64, 1, 1))
    pos = float(sum(float(lab.sum()) for lab in labels))
    tot = float(sum(lab.numel() for lab in labels))
    crit = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(min(50.0, (tot - pos) / max(pos, 1.0))))
    opt = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=1e-4)
    # normalisation of the features
    allf = torch.cat([f.float().reshape(c, -1) for f in feats[:200]], 1)
    mu, sd = allf.mean(1), allf.std(1) + 1e-4
    order = np.arange(len(feats))
    img_crit = torch.nn.BCEWithLogitsLoss()
    for ep in range(epochs):
        np.random.default_rng(seed + ep).shuffle(order)
        for i in order:
            x = ((feats[i].float() - mu[:, None, None]) / sd[:, None, None])[None]
            logits = head(x)[0, 0]
            loss = crit(logits, labels[i])
            if IMAGE_LOSS:
                loss = loss + img_crit(logits.max()[None], (labels[i].max() > 0.5).float()[None])
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    return head, mu, sd


def head_maps(head, mu, sd, feats: list[torch.Tensor]) -> list[np.ndarray]:
    out = []
    with torch.inference_mode():
        for f in feats:
            x = ((f.float() - mu[:, None, None]) / sd[:, None, None])[None]
            out.append(head(x)[0, 0].numpy().astype(np.float32))
    return out


def run_supervised(product: str, args) -> dict:
    t0 = time.perf_counter()
    key = f"{get_settings().data_dir}|{product}|suptrain|{args.copies}|v1"
    train = cached(key, lambda: [(head_features(img), cell_labels(m, *head_features(img).shape[-2:]))
                                 for img, m in synth_training_set(product, args.copies, 7)])
    t_feat = time.perf_counter() - t0
    head, mu, sd = train_head([f for f, _ in train], [lab for _, lab in train], args.epochs)
    t_train = time.perf_counter() - t0 - t_feat
    res = {"variant": f"supervised-c{args.copies}-e{args.epochs}", "product": product, "feat_s": round(t_feat, 1),
           "train_s": round(t_train, 1)}
    for split in ("val", "unseen"):
        its = items(product, split)
        fk = f"{get_settings().data_dir}|{product}|{split}|headfeat|v1"
        feats = cached(fk, lambda its=its: [head_features(load_rgb(it["path"])) for it in its])
        maps = head_maps(head, mu, sd, feats)
        normal = np.array([float(m.max()) for m, it in zip(maps, its) if it["label"] == "good"])
        thr = float(np.quantile(normal, 1 - args.fpr)) if split == "val" else res["val"]["threshold"]
        res[split] = metrics(its, maps, thr, 8.0, pixel=not args.no_pixel)
    return res



def image_scores_from_maps(maps: list[np.ndarray], how: str) -> np.ndarray:
    from scipy import ndimage as ndi

    out = []
    for m in maps:
        if how == "max":
            out.append(float(m.max()))
        elif how == "blur1":
            out.append(float(ndi.gaussian_filter(m, 1.0).max()))
        elif how == "top2pct":
            v = np.sort(m.reshape(-1))[::-1]
            out.append(float(v[: max(1, int(0.02 * v.size))].mean()))
    return np.array(out)


def auroc_table(its: list[dict], scores: np.ndarray, thr: float | None) -> dict:
    from sklearn.metrics import roc_auc_score

    labels = np.array([it["label"] == "defect" for it in its])
    out = {"image_auroc": round(float(roc_auc_score(labels, scores)), 4), "per_type": {}}
    for t in TYPES:
        sel = np.array([(not lab) or it.get("defect_type") == t for it, lab in zip(its, labels)])
        out["per_type"][t] = round(float(roc_auc_score(labels[sel], scores[sel])), 3)
    if thr is not None:
        out["fpr"] = round(float((scores[~labels] >= thr).mean()), 3)
        out["recall"] = round(float((scores[labels] >= thr).mean()), 3)
    return out


def run_ensemble(product: str, args) -> list[dict]:
    """PatchCore (variant ``args.variants[0]``) and the supervised head, alone and z-score fused."""
    v = dict(VARIANTS[args.variants[0]])
    cfg = PRODUCT_CONFIGS[product]
    views_bank, tta, gray = v.get("augment", cfg.augment), v.get("tta", cfg.tta), v.get("gray", False)
    embs = list(split_embeddings(product, "train", views_bank, None, gray))
    for c in range(v.get("acq", 0)):
        embs += acq_train_embeddings(product, views_bank, None, 1, 100 + c, ACQ_CHANGES, (1, 3), gray)
    bank = bank_from(embs, args.ratio, args.presample)
    key = f"{get_settings().data_dir}|{product}|suptrain2|{args.copies}|{args.normal_copies}|v2"

    def make():
        data = []
        for img, m in synth_training_set(product, args.copies, 7):
            f = head_features(img)
            data.append((f, cell_labels(m, *f.shape[-2:])))
        for c in range(args.normal_copies):
            for i, it in enumerate(items(product, "train")):
                img, _ = acquisition.random_acquisition(load_rgb(it["path"]), np.random.default_rng([55, c, i]))
                f = head_features(img)
                data.append((f, torch.zeros(f.shape[-2:])))
        return data
    train = cached(key, make)
    head, mu, sd = train_head([f for f, _ in train], [lab for _, lab in train], args.epochs)
    rows = []
    res: dict = {}
    for split in ("val", "unseen"):
        its = items(product, split)
        pc = score_maps(bank, split_embeddings(product, split, tta, None, gray), tta)
        fk = f"{get_settings().data_dir}|{product}|{split}|headfeat|v1"
        hm = head_maps(head, mu, sd, cached(fk, lambda its=its: [head_features(load_rgb(it["path"])) for it in its]))
        res[split] = {"its": its, "pc": np.array([float(m.max()) for m in pc])}
        for how in ("max", "blur1", "top2pct"):
            res[split][f"head-{how}"] = image_scores_from_maps(hm, how)
    normal = np.array([it["label"] == "good" for it in res["val"]["its"]])
    stats = {k: (res["val"][k][normal].mean(), res["val"][k][normal].std() + 1e-9)
             for k in res["val"] if k != "its"}
    for split in ("val", "unseen"):
        z = {k: (res[split][k] - stats[k][0]) / stats[k][1] for k in stats}
        z["ens-mean(pc,blur1)"] = (z["pc"] + z["head-blur1"]) / 2
        z["ens-max(pc,blur1)"] = np.maximum(z["pc"], z["head-blur1"])
        res[split]["z"] = z
    for k in res["val"]["z"]:
        thr = float(np.quantile(res["val"]["z"][k][normal], 1 - args.fpr))
        row = {"product": product, "detector": k,
               "val": auroc_table(res["val"]["its"], res["val"]["z"][k], thr),
               "unseen": auroc_table(res["unseen"]["its"], res["unseen"]["z"][k], thr)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows



def clean_val(product: str) -> tuple[list[np.ndarray], list[dict]]:
    """The val split's images before their acquisition changes (regenerated with the builder's own RNG)."""
    from data import build as dbuild, synth

    tune = dbuild.region(product, "tune")
    images, its = [], []
    for i in range(dbuild.N_VAL_GOOD):
        img, _ = dbuild.random_crop(tune, dbuild._item_rng(0, product, "val", "good", i), product)
        images.append(img)
        its.append({"label": "good", "defect_type": None})
    for d in TYPES:
        for i in range(dbuild.N_VAL_PER_DEFECT):
            rng = dbuild._item_rng(0, product, "val", d, i)
            clean, _ = dbuild.random_crop(tune, rng, product)
            images.append(synth.synthesize(d, clean, rng, product).image)
            its.append({"label": "defect", "defect_type": d})
    return images, its


def run_changes(product: str, args) -> list[dict]:
    """Cost of each acquisition change alone: image AUROC and normal-score shift on the clean val split."""
    v = dict(VARIANTS[args.variants[0]])
    cfg = PRODUCT_CONFIGS[product]
    views_bank, gray = v.get("augment", cfg.augment), v.get("gray", False)
    embs = list(split_embeddings(product, "train", views_bank, None, gray))
    for c in range(v.get("acq", 0)):
        embs += acq_train_embeddings(product, views_bank, None, 1, 100 + c, ACQ_CHANGES, (1, 3), gray)
    bank = bank_from(embs, args.ratio, args.presample)
    images, its = clean_val(product)
    normal = np.array([it["label"] == "good" for it in its])
    rows, base = [], None
    for change in ("none",) + ACQ_CHANGES:
        changed = [im if change == "none" else acquisition.apply_change(im, change, np.random.default_rng([9, k]))
                   for k, im in enumerate(images)]
        key = f"{get_settings().data_dir}|{product}|cleanval|{change}|{gray}|v1"
        emb = cached(key, lambda changed=changed: [embed_views(im, "none", None, gray) for im in changed])
        scores = np.array([float(m.max()) for m in score_maps(bank, emb, "none")])
        if base is None:
            base = (scores[normal].mean(), scores[normal].std(), float(np.quantile(scores[normal], 0.95)))
        tab = auroc_table(its, scores, base[2])
        row = {"product": product, "bank": args.variants[0], "change": change, "image_auroc": tab["image_auroc"],
               "normal_shift_sd": round(float((scores[normal].mean() - base[0]) / base[1]), 2),
               "fpr_at_clean_q95": tab["fpr"], "recall": tab["recall"], "per_type": tab["per_type"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
