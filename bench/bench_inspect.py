"""PatchCore inspect: ours vs anomalib's default Patchcore pipeline, side by side in one process.

    python bench/bench_inspect.py [--product brick] [--train 80] [--n 30]
    python bench/bench_inspect.py --small            # CI: 4 train images, 3 timed, 64 px

Three pipelines on the same images, one process, torch threads = ``--threads``:

1. **ours**: ``PatchCore.predict`` through ``services/`` (EfficientNet-Lite0 features, the
   product's tuned configuration but one view at test time, faiss nearest-neighbour
   search, anomaly map at input resolution, mask, regions, nearest normal image)
   with a bank fitted here by ``services.products.fit_bank`` on the train images.
1b. **ours + test-time views**: the same, fitted again with the product's tuned
   ``tta`` (e.g. 8 dihedral views for gravel): what the app runs, at the
   accuracy in the README table.
2. **anomalib, same bank**: anomalib 2.7's own ``PatchcoreModel`` (chunked
   torch distances) with OUR backbone, layers, pooling and memory bank: the
   scores must agree with (1) (max abs difference printed; it isolates the
   search / pipeline cost from the backbone choice).
3. **anomalib default** (the anchor): ``PatchcoreModel()`` defaults, i.e.
   wide_resnet50_2 layer2 + layer3, 3x3 pooling, 10 % coreset by anomalib's
   ``KCenterGreedy``, fitted here on the same train images. Its ImageNet
   weights cannot be downloaded here, so the backbone is random-init: its
   latency, fit time and bank size do not depend on the weight values, its
   accuracy does (not compared; see README for the accuracy anchor).
4. **shipped** (with ``--shipped STATE``): the bank a built state serves for the product
   (``cli.py build``: both calibration folds, so a larger bank than (1b)), same images.

Printed: latency per image p50 / p95 (ms) after warm-up, fit time (s), bank
size, and the ratios anchor / ours.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.settings import apply_runtime_env  # noqa: E402

apply_runtime_env()  # before torch / faiss / transformers load

import numpy as np  # noqa: E402
import torch  # noqa: E402


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _images(product: str, n_train: int, n_val: int, small: bool):
    """Train normals and timed val images: the built manifest's, else fresh builder crops (rows 0-319)."""
    from data.build import random_crop, source_rows
    from core.settings import get_settings

    data_dir = get_settings().data_dir
    if not small and (data_dir / "manifest.json").is_file():
        from data.build import load_manifest
        from core.imageio import load_rgb

        items = [it for it in load_manifest(data_dir)["items"] if it["product"] == product]
        train = [load_rgb(data_dir / it["image"]) for it in items if it["split"] == "train"][:n_train]
        val = [load_rgb(data_dir / it["image"]) for it in items if it["split"] == "val"][:n_val]
        if len(train) >= 2 and len(val) >= 2:
            return train, val, "manifest"
    rows = source_rows(product)
    rng = np.random.default_rng(0)
    crops = [random_crop(rows, rng, product)[0] for _ in range(n_train + n_val)]
    return crops[:n_train], crops[n_train:], "builder crops"


def _time(fn, items, warm: int = 2) -> list[float]:
    for it in items[:warm]:
        fn(it)
    out = []
    for it in items:
        t0 = time.perf_counter()
        fn(it)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def run(args) -> dict:
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    from core.settings import Settings
    from models.patchcore.model import backbone_spec, build_model, prepare
    from services.container import Services
    from services.lock import MODEL_LOCK
    from services.products import fit_bank, fit_config

    class Bank:
        """One state directory's fit + inspect with fixed configuration overrides (services/)."""

        def __init__(self, state, **over):
            self.svc, self.over = Services(Settings.from_env(state_dir=Path(state))), over

        def config_for(self, product):
            return fit_config(self.svc, product, **self.over)

        def fit(self, product, train, val):
            return fit_bank(self.svc, product, train, val, **self.over)

        def meta(self, product):
            return self.svc.banks.read_meta(product)

        def inspect(self, im, product):
            bank = self.svc.banks.get(product)
            with MODEL_LOCK.shared():
                return bank.predict([im])[0]

    torch.set_num_threads(args.threads)
    train, val, source = _images(args.product, args.train, args.n, args.small)
    over = {"image_size": args.image_size} if args.image_size else {}
    if args.small:
        over.update(coreset_ratio=0.05, augment="none")
    with tempfile.TemporaryDirectory(prefix="bench_inspect_") as tmp:
        tuned_tta = Bank(tmp, **over).config_for(args.product).tta
        tta_ms, tta_fit_s = None, None
        if tuned_tta != "none":
            tstore = Bank(Path(tmp) / "tta", **over)
            t0 = time.perf_counter()
            tstore.fit(args.product, train, val[:2] if len(val) > 2 else val)
            tta_fit_s = time.perf_counter() - t0
            tta_ms = _time(lambda im: tstore.inspect(im, args.product), val)
            tta_model = tstore.meta(args.product)["model"]
        shipped = None
        if args.shipped:  # the bank a built state serves (both calibration folds: a larger bank)
            sstore = Bank(args.shipped)
            s_ms = _time(lambda im: sstore.inspect(im, args.product), val)
            smeta = sstore.meta(args.product)
            shipped = {"p50": pct(s_ms, 50), "p95": pct(s_ms, 95), "fit_s": None,
                       "bank": int(smeta["bank_size"]), "model": f"{smeta['model']} (state {args.shipped})"}
        # one view, plain patch distance: the computation anomalib's PatchcoreModel does (checked to match
        # below); the shipped image-relative score (score_norm "median") only subtracts each map's median
        store = Bank(tmp, **over, tta="none", score_norm="none")
        cfg = store.config_for(args.product)
        t0 = time.perf_counter()
        store.fit(args.product, train, val[:2] if len(val) > 2 else val)
        ours_fit_s = time.perf_counter() - t0
        meta = store.meta(args.product)
        ours_ms = _time(lambda im: store.inspect(im, args.product), val)
        ours_res = [store.inspect(im, args.product) for im in val]

        # 2. anomalib's PatchcoreModel (torch search) with our backbone, config and bank
        spec = backbone_spec(meta["backbone"], meta.get("blocks"))
        same = build_model(spec, cfg.pool_size, sigma=cfg.sigma, search="torch")
        if not cfg.reweight:
            same.num_neighbors = 1
        same.memory_bank = store.svc.banks.get(args.product).memory_bank.clone()

        def same_forward(im):
            with torch.inference_mode():
                return same(prepare(im, cfg, spec))

        same_ms = _time(same_forward, val)
        same_out = [same_forward(im) for im in val]
    score_diff = max(abs(float(o.pred_score.reshape(-1)[0]) - r.score) for o, r in zip(same_out, ours_res, strict=True))
    rel_diff = score_diff / max(abs(r.score) for r in ours_res)
    map_diff = 0.0
    for o, r in zip(same_out, ours_res, strict=True):
        amap = o.anomaly_map[:, :1]
        if tuple(amap.shape[-2:]) != r.anomaly_map.shape:
            amap = torch.nn.functional.interpolate(amap, size=r.anomaly_map.shape, mode="bilinear", align_corners=False)
        map_diff = max(map_diff, float(np.abs(amap[0, 0].numpy() - r.anomaly_map).max()))

    # 3. anchor: anomalib's default PatchCore (wide_resnet50_2, layer2 + layer3, 10 % coreset)
    size = args.image_size or 256
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def tens(ims: list[np.ndarray]) -> torch.Tensor:
        """Images of any sizes (native-scale train photos) -> one normalised (B, 3, size, size) batch."""
        xs = []
        for im in ims:
            x = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float() / 255.0
            if tuple(x.shape[-2:]) != (size, size):
                x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
            xs.append(x)
        return (torch.cat(xs) - mean) / std

    # the Lightning Patchcore's defaults: wide_resnet50_2, layers (layer2, layer3), 9 neighbours, ratio 0.1
    anchor = PatchcoreModel(layers=["layer2", "layer3"], backbone="wide_resnet50_2", pre_trained=False)
    t0 = time.perf_counter()
    anchor.train()
    with torch.inference_mode():
        for i in range(0, len(train), 8):
            anchor(tens(train[i:i + 8]))
    anchor.subsample_embedding(0.1)  # anomalib's default coreset_sampling_ratio
    anchor_fit_s = time.perf_counter() - t0
    anchor.eval()

    def anchor_forward(im):
        with torch.inference_mode():
            return anchor(tens([im]))

    anchor_ms = _time(anchor_forward, val)

    rows = {
        "ours": {"p50": pct(ours_ms, 50), "p95": pct(ours_ms, 95), "fit_s": ours_fit_s,
                 "bank": int(meta["bank_size"]), "model": meta["model"]},
        **({"ours_tta": {"p50": pct(tta_ms, 50), "p95": pct(tta_ms, 95), "fit_s": tta_fit_s,
                         "bank": int(meta["bank_size"]), "model": tta_model}} if tta_ms else {}),
        **({"shipped": shipped} if shipped else {}),
        "anomalib_same_bank": {"p50": pct(same_ms, 50), "p95": pct(same_ms, 95), "fit_s": None,
                               "bank": int(meta["bank_size"]), "model": "anomalib PatchcoreModel, our backbone+bank"},
        "anomalib_default": {"p50": pct(anchor_ms, 50), "p95": pct(anchor_ms, 95), "fit_s": anchor_fit_s,
                             "bank": int(anchor.memory_bank.shape[0]),
                             "model": "anomalib PatchcoreModel() wide_resnet50_2 layer2+3 coreset 0.1 (random init)"},
    }
    return {
        "product": args.product, "images": source, "n_train": len(train), "n_timed": len(val),
        "threads": torch.get_num_threads(), "rows": rows,
        "score_max_abs_diff_same_bank": score_diff, "score_max_rel_diff_same_bank": rel_diff,
        "map_max_abs_diff_same_bank": map_diff,
        "ratio_anchor_over_ours_p50": rows["anomalib_default"]["p50"] / rows["ours"]["p50"],
        "ratio_anchor_over_ours_p95": rows["anomalib_default"]["p95"] / rows["ours"]["p95"],
        "ratio_same_bank_over_ours_p50": rows["anomalib_same_bank"]["p50"] / rows["ours"]["p50"],
        "ratio_anchor_over_ours_fit": anchor_fit_s / ours_fit_s,
        **({"ratio_anchor_over_ours_tta_p50": rows["anomalib_default"]["p50"] / rows["ours_tta"]["p50"]}
           if tta_ms else {}),
        **({"ratio_anchor_over_shipped_p50": rows["anomalib_default"]["p50"] / shipped["p50"]} if shipped else {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--product", default="brick")
    ap.add_argument("--n", type=int, default=30, help="timed images")
    ap.add_argument("--train", type=int, default=80, help="training images (both banks)")
    ap.add_argument("--image-size", type=int, default=0,
                    help="override the input size (0: the product's config: native scale)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shipped", default="",
                    help="also time the bank of this built state directory (what the app serves)")
    ap.add_argument("--small", action="store_true", help="CI mode: 4 train images, 3 timed, 64 px")
    args = ap.parse_args()
    if args.small:
        args.n, args.train, args.image_size = 3, 4, 64
    res = run(args)
    print(f"PatchCore inspect, product={res['product']} ({res['images']}), {res['n_train']} train images, "
          f"{res['n_timed']} timed, torch threads={res['threads']}")
    print(f"{'pipeline':22s} {'p50 ms':>8s} {'p95 ms':>8s} {'fit s':>7s} {'bank':>7s}  model")
    for name, r in res["rows"].items():
        fit = f"{r['fit_s']:7.1f}" if r["fit_s"] is not None else f"{'-':>7s}"
        print(f"{name:22s} {r['p50']:8.1f} {r['p95']:8.1f} {fit} {r['bank']:7d}  {r['model']}")
    print(f"same bank, ours vs anomalib torch search: max |score diff| {res['score_max_abs_diff_same_bank']:.2e} "
          f"(rel {res['score_max_rel_diff_same_bank']:.1e}), max |map diff| {res['map_max_abs_diff_same_bank']:.2e}")
    print(f"ratio anomalib default / ours: p50 {res['ratio_anchor_over_ours_p50']:.2f}x, "
          f"p95 {res['ratio_anchor_over_ours_p95']:.2f}x, fit {res['ratio_anchor_over_ours_fit']:.2f}x; "
          f"anomalib same bank / ours p50 {res['ratio_same_bank_over_ours_p50']:.2f}x")
    if "ratio_anchor_over_ours_tta_p50" in res:
        print(f"ratio anomalib default / ours with test-time views: p50 {res['ratio_anchor_over_ours_tta_p50']:.2f}x")
    if "ratio_anchor_over_shipped_p50" in res:
        print(f"ratio anomalib default / the state's bank: p50 {res['ratio_anchor_over_shipped_p50']:.2f}x")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
