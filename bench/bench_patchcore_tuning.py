"""Reproduce the PatchCore tuning measurements on the sample data's val split.

Levers: input resolution (the 256 px crop resized before the backbone),
EfficientNet-Lite0 blocks, neighbourhood pooling size, memory-bank sampler
(k-center-greedy coreset vs random) and ratio, image-score re-weighting
(paper Eq. 7 as in anomalib vs plain max patch distance), anomaly-map blur sigma,
memory-bank augmentation with symmetry views of the train normals
(``models.patchcore.model.augment_views``; their features are cached too) and
coreset selection in a random projection (``--proj``).

Backbone features are extracted once per (size, blocks) with the store's own
anomalib ``PatchcoreModel`` feature extractor and cached under
``/tmp/pc_tune`` (float16); every other lever is evaluated from the cache.
Image AUROC / pixel AUROC use sklearn's ``roc_auc_score`` over the 30 normal
+ 40 defect val images of each product (pixel AUROC at 256 x 256, normal images
all-negative), exactly like ``services.evaluate.evaluate_anomaly``.

Usage::

    .venv/bin/python bench/bench_patchcore_tuning.py sweep --sizes 256 512 --blocks 4,7 2,4,7 \
        --pools 3 5 --ratios 0.01 --samplers coreset random
    .venv/bin/python bench/bench_patchcore_tuning.py sweep --products gravel --augment none flips \
        --sigmas 2 4 8 --reweight 1 0          # bank augmentation, map blur, Eq. 7 vs max
    .venv/bin/python bench/bench_patchcore_tuning.py tta --products grass --augment flips --tta none flips dihedral \
        --sigmas 8 --ratios 0.01      # test-time symmetry views (the store's own averaging path)
    .venv/bin/python bench/bench_patchcore_tuning.py latency      # store.inspect, 1 image, 2 threads
    .venv/bin/python bench/bench_patchcore_tuning.py fit          # store.fit_from_manifest timings (tmp state)

Prints one JSON object per line. Reads only the manifest's train/val images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.settings import apply_runtime_env, get_settings  # noqa: E402

apply_runtime_env()  # before torch loads

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402,N812

from core.imageio import load_rgb  # noqa: E402
from data.build import load_manifest  # noqa: E402
from models.patchcore.config import AUGMENTATIONS  # noqa: E402
from models.patchcore.coreset import greedy_coreset_indices  # noqa: E402
from models.patchcore.model import augment_views, backbone_spec, build_model, preprocess  # noqa: E402

CACHE = Path("/tmp/pc_tune")
PRODUCTS = ("brick", "gravel", "grass")


def _items(product: str):
    data_dir = Path(get_settings().data_dir)
    items = [it for it in load_manifest(data_dir)["items"] if it["product"] == product]
    train = [it for it in items if it["split"] == "train" and it["label"] == "good"]
    val = [it for it in items if it["split"] == "val"]
    return data_dir, train, val


def _features(model, spec, data_dir: Path, items: list[dict], size: int, view: int = 0,
              mode: str = "none") -> dict[str, torch.Tensor]:
    """Backbone block outputs (float16) of ``items`` in symmetry view ``view`` of ``mode``, by layer."""
    out = {layer: [] for layer in spec.layers}
    for i in range(0, len(items), 8):
        imgs = [augment_views(load_rgb(data_dir / it["image"]), mode)[view] for it in items[i:i + 8]]
        with torch.inference_mode():
            f = model.feature_extractor(preprocess(imgs, size, spec.mean, spec.std))
        for layer in spec.layers:
            out[layer].append(f[layer].half())
    return {k: torch.cat(v) for k, v in out.items()}


def extract(size: int, blocks: tuple[int, ...], product: str) -> dict:
    """Backbone block outputs (float16) for train and val images, cached on disk."""
    key = CACHE / f"{product}_{size}_{'-'.join(map(str, blocks))}.pt"
    if key.is_file():
        return torch.load(key)
    data_dir, train, val = _items(product)
    spec = backbone_spec("efficientnet-lite0", blocks)
    model = build_model(spec)

    masks = []
    for it in val:
        if it.get("mask"):
            masks.append(np.asarray(load_rgb(data_dir / it["mask"]))[..., 0] > 0)
        else:
            masks.append(np.zeros((256, 256), dtype=bool))
    res = {"train": _features(model, spec, data_dir, train, size),
           "val": _features(model, spec, data_dir, val, size), "labels": torch.tensor([it["label"] == "defect" for it in val]),
           "masks": torch.from_numpy(np.stack(masks)), "layers": list(spec.layers),
           "types": [it.get("defect_type") for it in val]}
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(res, key)
    return res


def extract_augmented(size: int, blocks: tuple[int, ...], product: str, mode: str) -> dict:
    """``extract`` plus train features of every symmetry view (``models.patchcore.model.augment_views``)."""
    cache = extract(size, blocks, product)
    if mode == "none":
        return cache
    key = CACHE / f"{product}_{size}_{'-'.join(map(str, blocks))}_aug-{mode}.pt"
    if key.is_file():
        extra = torch.load(key)
    else:
        data_dir, train, _ = _items(product)
        spec = backbone_spec("efficientnet-lite0", blocks)
        model = build_model(spec)
        views = [_features(model, spec, data_dir, train, size, view, mode)
                 for view in range(1, len(AUGMENTATIONS[mode]))]
        extra = {layer: torch.cat([v[layer] for v in views]) for layer in spec.layers}
        torch.save(extra, key)
    out = dict(cache)
    out["train"] = {k: torch.cat([cache["train"][k], extra[k]]) for k in cache["train"]}
    return out


def embed(feats: dict, layers: list[str], pool: int) -> torch.Tensor:
    """anomalib PatchcoreModel.generate_embedding with AvgPool2d(pool, 1, pool // 2) -> (B, D, h, w)."""
    pooler = torch.nn.AvgPool2d(pool, 1, pool // 2) if pool > 1 else torch.nn.Identity()
    first = pooler(feats[layers[0]].float())
    out = [first]
    for layer in layers[1:]:
        out.append(F.interpolate(pooler(feats[layer].float()), size=first.shape[-2:], mode="bilinear"))
    return torch.cat(out, 1)


def evaluate(cache: dict, pool: int, ratio: float, sampler: str, reweights: list[bool], size: int,
             sigmas: list[float], proj_dim: int | None = None) -> list[dict]:
    """One memory bank per (pool, ratio, sampler); one result row per (re-weighting, sigma)."""
    from anomalib.models.image.patchcore.anomaly_map import AnomalyMapGenerator
    from sklearn.metrics import roc_auc_score

    spec_layers = cache["layers"]
    train = embed(cache["train"], spec_layers, pool)
    d = train.shape[1]
    train = train.permute(0, 2, 3, 1).reshape(-1, d).contiguous()
    n_keep = max(1, int(train.shape[0] * ratio))
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    if sampler == "random":
        idx = torch.randperm(train.shape[0], generator=g)[:n_keep]
    else:
        idx = torch.as_tensor(greedy_coreset_indices(train, n_keep, seed=0, proj_dim=proj_dim))
    bank = train[idx].contiguous()
    core_s = time.perf_counter() - t0
    blocks = tuple(int(layer.split(".")[1]) for layer in spec_layers)
    model = build_model(backbone_spec("efficientnet-lite0", blocks))
    model.memory_bank = bank
    val = embed(cache["val"], spec_layers, pool)
    b, _, h, w = val.shape
    patch_maps, scores = [], {True: [], False: []}
    for i in range(b):
        emb = val[i:i + 1].permute(0, 2, 3, 1).reshape(-1, d)
        ps, loc = model.nearest_neighbors(emb, n_neighbors=1)
        scores[True].append(float(model.compute_anomaly_score(ps.reshape(1, -1), loc.reshape(1, -1), emb)))
        scores[False].append(float(ps.max()))
        patch_maps.append(ps.reshape(1, 1, h, w))
    patch_maps = torch.cat(patch_maps)
    labels = cache["labels"].numpy()
    masks = cache["masks"].numpy().reshape(-1)
    types = cache["types"]
    rows = []
    for sigma in sigmas:
        gen = AnomalyMapGenerator(sigma=sigma) if sigma > 0 else None
        if gen is None:
            amap = F.interpolate(patch_maps, size=(size, size))
        else:
            amap = gen(patch_maps, (size, size))
        if size != 256:
            amap = F.interpolate(amap, size=(256, 256), mode="bilinear", align_corners=False)
        pixel_auroc = round(float(roc_auc_score(masks, amap.numpy().reshape(-1))), 4)
        for rw in reweights:
            s = np.array(scores[rw])
            per_type = {}
            for t in sorted({t for t in types if t}):
                sel = np.array([(tt == t) or (tt is None) for tt in types])
                per_type[t] = round(float(roc_auc_score(labels[sel], s[sel])), 3)
            rows.append({"reweight": rw, "sigma": sigma, "image_auroc": round(float(roc_auc_score(labels, s)), 4),
                         "pixel_auroc": pixel_auroc, "bank": int(n_keep), "coreset_s": round(core_s, 2),
                         "per_type": per_type})
    return rows


def cmd_sweep(args) -> None:
    import itertools

    torch.set_num_threads(args.threads)
    for size, blocks_s, product, aug in itertools.product(args.sizes, args.blocks, args.products, args.augment):
        blocks = tuple(int(b) for b in blocks_s.split(","))
        t0 = time.perf_counter()
        cache = extract_augmented(size, blocks, product, aug)
        ext_s = time.perf_counter() - t0
        for pool, ratio, sampler in itertools.product(args.pools, args.ratios, args.samplers):
            for r in evaluate(cache, pool, ratio, sampler, [bool(x) for x in args.reweight], size,
                              args.sigmas, args.proj):
                print(json.dumps({"product": product, "size": size, "blocks": blocks_s, "pool": pool,
                                  "augment": aug, "proj": args.proj, "ratio": ratio, "sampler": sampler,
                                  "extract_s": round(ext_s, 1), **r}), flush=True)


def cmd_tta(args) -> None:
    """Test-time symmetry views: one coreset bank per (product, augment), every ``--tta`` mode scored
    through ``models.patchcore.model._forward_views`` (map blur at each ``--sigmas``)."""
    from sklearn.metrics import roc_auc_score

    from models.patchcore.model import _forward_views

    torch.set_num_threads(args.threads)
    blocks = tuple(int(b) for b in args.blocks[0].split(","))
    spec = backbone_spec("efficientnet-lite0", blocks)
    for product, aug in [(p, a) for p in args.products for a in args.augment]:
        cache = extract_augmented(256, blocks, product, aug)
        train = embed(cache["train"], cache["layers"], 3)
        d = train.shape[1]
        train = train.permute(0, 2, 3, 1).reshape(-1, d).contiguous()
        n_keep = max(1, int(train.shape[0] * args.ratios[0]))
        bank = train[torch.as_tensor(greedy_coreset_indices(train, n_keep, seed=0))].contiguous()
        data_dir, _, val = _items(product)
        imgs = [load_rgb(data_dir / it["image"]) for it in val]
        labels, types = cache["labels"].numpy(), cache["types"]
        masks = cache["masks"].numpy().reshape(-1)
        for sigma in args.sigmas:
            model = build_model(spec, 3, sigma=sigma)
            model.memory_bank = bank
            for mode in args.tta:
                scores, maps = [], []
                for i in range(0, len(imgs), 8):
                    sc, am, _ = _forward_views(model, imgs[i:i + 8], spec, 256, AUGMENTATIONS[mode])
                    scores.append(sc)
                    maps.append(am)
                s = torch.cat(scores).numpy()
                per_type = {}
                for t in sorted({t for t in types if t}):
                    sel = np.array([(tt == t) or (tt is None) for tt in types])
                    per_type[t] = round(float(roc_auc_score(labels[sel], s[sel])), 3)
                print(json.dumps({"product": product, "augment": aug, "tta": mode, "views": len(AUGMENTATIONS[mode]),
                                  "sigma": sigma, "bank": n_keep,
                                  "image_auroc": round(float(roc_auc_score(labels, s)), 4),
                                  "pixel_auroc": round(float(roc_auc_score(masks, torch.cat(maps).numpy().reshape(-1))), 4),
                                  "per_type": per_type}), flush=True)


def cmd_latency(args) -> None:
    """Single-image inspection wall time (``services.inspect.inspect_image`` without pictures; median of N,
    after warm-up), torch threads 2."""
    from services.container import get_services
    from services.inspect import inspect_image

    torch.set_num_threads(args.threads)
    svc = get_services()
    for product in args.products:
        data_dir, _, val = _items(product)
        imgs = [load_rgb(data_dir / it["image"]) for it in val[:12]]
        inspect_image(svc, imgs[0], product, artifacts=False)
        times = []
        for im in imgs:
            t0 = time.perf_counter()
            inspect_image(svc, im, product, artifacts=False)
            times.append((time.perf_counter() - t0) * 1000)
        print(json.dumps({"product": product, "model": svc.banks.read_meta(product)["model"],
                          "inspect_ms_median": round(float(np.median(times)), 1),
                          "inspect_ms_min": round(float(np.min(times)), 1)}), flush=True)


def cmd_fit(args) -> None:
    """fit_from_manifest into a temporary state dir (the default banks are untouched)."""
    import shutil
    import tempfile

    from core.settings import Settings
    from services.build import fit_from_manifest
    from services.container import Services
    from services.evaluate import evaluate_anomaly

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="pc_fit_"))
    try:
        svc = Services(Settings.from_env(state_dir=tmp))
        for product in args.products:
            info = fit_from_manifest(svc, product, data_dir=get_settings().data_dir)
            ev = evaluate_anomaly(svc, product, data_dir=get_settings().data_dir)
            print(json.dumps({"product": product, **info, "pixel_auroc": ev["pixel_auroc"]}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["sweep", "tta", "latency", "fit"])
    ap.add_argument("--products", nargs="+", default=list(PRODUCTS))
    ap.add_argument("--sizes", nargs="+", type=int, default=[256])
    ap.add_argument("--blocks", nargs="+", default=["4,7"])
    ap.add_argument("--pools", nargs="+", type=int, default=[3])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.01])
    ap.add_argument("--samplers", nargs="+", default=["coreset"], choices=["coreset", "random"])
    ap.add_argument("--reweight", nargs="+", type=int, default=[1], help="1: paper Eq. 7 re-weighting, 0: max")
    ap.add_argument("--sigmas", nargs="+", type=float, default=[4.0],
                    help="Gaussian sigma (pixels at the model input size) of the anomaly-map blur; 0: none")
    ap.add_argument("--augment", nargs="+", default=["none"], choices=sorted(AUGMENTATIONS),
                    help="symmetry views of the train normals added to the bank")
    ap.add_argument("--proj", type=int, default=None, help="coreset selection in a random projection to this many dims")
    ap.add_argument("--tta", nargs="+", default=["none"], choices=sorted(AUGMENTATIONS),
                    help="(tta command) test-time views averaged at inference")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    {"sweep": cmd_sweep, "tta": cmd_tta, "latency": cmd_latency, "fit": cmd_fit}[args.command](args)


if __name__ == "__main__":
    main()
