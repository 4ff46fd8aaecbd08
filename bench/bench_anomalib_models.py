"""anomalib 2.7's PaDiM and DFM image models with our EfficientNet-Lite0 backbone, against our PatchCore.

What it measures: image AUROC (all defects and per defect type), pixel AUROC, fit time and
inference time per 128 px tile of two more anomalib models, built from the real classes

* ``anomalib.models.image.padim.torch_model.PadimModel`` (Defard et al. 2021: one Gaussian per
  feature-map position, random channel subset ``n_features``, Mahalanobis map upsampled to the
  tile and blurred (sigma 4); image score = max of the map);
* ``anomalib.models.image.dfm.torch_model.DFMModel`` (Ahuja et al. 2019: one block's feature map
  average-pooled by 4 and flattened per tile, PCA keeping ``n_comps`` of the variance; score
  ``fre`` = feature reconstruction error (also gives a coarse map) or ``nll`` = Gaussian
  negative log likelihood in the PCA space (no map; anomalib 2.7's ``SingleClassGaussian.fit``
  fails on this torch, ``_gaussian_fit`` is the same code without the offending argument));

each around the project's offline EfficientNet-Lite0 (``models.backbones.load_lite0(...).net``
passed as ``backbone=`` with ``pre_trained=False``; anomalib's ``TimmFeatureExtractor`` traces it
with torchvision FX, layers ``_blocks.<i>``, as ``models.patchcore.model.build_model`` does).

Protocol (``DRA_STATE_DIR``: a built state; products brick, gravel, grass):

* PaDiM and DFM need a fixed input size: 128x128 tiles at native scale, never resized.
  Fit: 8 seeded random 128x128 crops of each ``train`` photo (160-256 px), plus (``+acq``) 8 crops
  of an acquisition-changed copy of each photo (``data.acquisition.random_acquisition``,
  ``n_changes=(1, 3)``, the changes and seeds of ``bench_robustness.acq_train_embeddings``).
  Test photos: overlapping 128x128 tiles covering the photo, at most 64 px apart (a 128x192
  photo -> x = 0, 64; a 256x256 val photo -> 3x3 tiles); unseen photos shrunk below 128 px by the
  "scale" acquisition change (103-127 px; 43 of 360) are reflect-padded to 128 first and their
  map cropped back; the photo's map = per-pixel max of
  the tiles' maps (anomalib's full-resolution maps); image score = max of the tiles' scores.
* Features: the Lite0 blocks are computed once per tile (ONNX Runtime,
  ``models.backbones.load_lite0_onnx``, same outputs as the eager module up to float32
  rounding) and replayed into the anomalib models in place of their feature extractor, so
  the models' own ``forward`` / ``fit`` / ``generate_embedding`` / anomaly-map code runs unchanged.
  ``ms/tile`` is the real model forward on one 128x128 tile (batch 1, 1 thread), with the ONNX
  extractor (``onnx``) and with anomalib's FX ``TimmFeatureExtractor`` in eager torch (``torch``).
* Settings (tiny grids below) are chosen on the ``val`` split only (tuning split, 256x256,
  30 normals + 40 defects per product), fit on ``train`` tiles + acq copies, by the mean val image
  AUROC over the products (one setting per model); only the chosen setting is then run on
  ``unseen`` (held out: 128 px tall photos, 60 normals + 60 defects, half gray). The same
  setting fitted without the acq copies is reported as an ablation. Val normals are never fitted.
* Metrics: ``bench_robustness.metrics`` (sigma 0: the maps are already full resolution);
  DFM's image metrics use its per-tile ``pred_score`` (not the map); the threshold for fpr /
  recall is the 95th percentile of the val normals' scores.
* Reference: the project's PatchCore, ``bench_robustness.run_variant("native+acq", ...)``
  (whole photos, its own per-product TTA and blur; features from ``/tmp/rb/cache``);
  its ms/tile is one forward of one view of a 128x128 tile through ``build_model(...)`` with
  that bank (its TTA multiplies it by the number of views).

Usage::

    DRA_STATE_DIR=/work/st15 HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_anomalib_models.py \\
        [--products brick gravel grass] [--no-patchcore] [--no-ablation]

Prints one JSON line per (model, setting, product, split) and a summary table. One torch thread.
Tile features are cached under ``/tmp/am/cache``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from core.settings import apply_runtime_env, get_settings  # noqa: E402

apply_runtime_env()

import torch  # noqa: E402

torch.set_num_threads(1)

import bench_robustness as br  # noqa: E402
from core.imageio import load_rgb  # noqa: E402
from data import acquisition  # noqa: E402
from models.backbones import load_lite0, load_lite0_onnx  # noqa: E402
from models.patchcore.config import AUGMENTATIONS, PRODUCT_CONFIGS  # noqa: E402
from models.patchcore.model import backbone_spec  # noqa: E402

TILE = 128
STRIDE = 64  # max distance between test tiles
CROPS = 8  # random train crops per photo (and per acq copy)
BLOCKS = (2, 4, 7)  # extracted once per tile; the settings pick from them
CACHE = Path("/tmp/am/cache")
BATCH = 32

PADIM_GRID = {
    "b4+7/nf100": {"blocks": (4, 7), "n_features": 100},
    "b4+7/nf120(all)": {"blocks": (4, 7), "n_features": 120},
    "b2+4+7/nf100": {"blocks": (2, 4, 7), "n_features": 100},
}
DFM_GRID = {
    "b7/fre/0.97": {"block": 7, "score_type": "fre", "n_comps": 0.97},
    "b7/nll/0.97": {"block": 7, "score_type": "nll", "n_comps": 0.97},
    "b4/fre/0.97": {"block": 4, "score_type": "fre", "n_comps": 0.97},
}


# --------------------------------------------------------------------------- tiles and features


def positions(length: int) -> list[int]:
    if length <= TILE:
        return [0]
    n = math.ceil((length - TILE) / STRIDE) + 1
    return sorted({int(round(v)) for v in np.linspace(0, length - TILE, n)})


def pad_to_tile(rgb: np.ndarray) -> np.ndarray:
    """Reflect-pad (bottom / right) a photo smaller than a tile (unseen photos shrunk by the "scale"
    acquisition change, 103-127 px) up to 128 px; its map is cropped back to the photo."""
    h, w = rgb.shape[:2]
    if h >= TILE and w >= TILE:
        return rgb
    return np.pad(rgb, ((0, max(0, TILE - h)), (0, max(0, TILE - w)), (0, 0)), mode="reflect")


def test_tiles(rgb: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    rgb = pad_to_tile(rgb)
    h, w = rgb.shape[:2]
    return [(y, x, rgb[y:y + TILE, x:x + TILE]) for y in positions(h) for x in positions(w)]


def random_crops(rgb: np.ndarray, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    h, w = rgb.shape[:2]
    out = []
    for _ in range(n):
        y, x = int(rng.integers(0, h - TILE + 1)), int(rng.integers(0, w - TILE + 1))
        out.append(rgb[y:y + TILE, x:x + TILE])
    return out


def train_tiles(product: str, acq: bool) -> list[np.ndarray]:
    """``CROPS`` seeded crops per train photo (``acq``: of its acquisition-changed copy instead)."""
    out = []
    for i, it in enumerate(br.items(product, "train")):
        img = load_rgb(it["path"])
        if acq:  # same copy as bench_robustness.acq_train_embeddings(copies=1, seed=100)
            img, _ = acquisition.random_acquisition(img, np.random.default_rng([100, 0, i]), n_changes=(1, 3),
                                                    changes=br.ACQ_CHANGES)
        out += random_crops(img, np.random.default_rng([7, int(acq), i]), CROPS)
    return out


def extract(tiles: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Lite0 block outputs of the tiles: ``{"_blocks.<i>": float16 (N, C, h, w)}``."""
    ext = load_lite0_onnx(BLOCKS)
    parts: dict[str, list] = {}
    for s in range(0, len(tiles), BATCH):
        x = torch.cat([br.prep(t, None) for t in tiles[s:s + BATCH]])
        for k, v in ext(x).items():
            parts.setdefault(k, []).append(v.half())
    return {k: torch.cat(v) for k, v in parts.items()}


def cached_features(key: str, tiles_fn) -> tuple[dict[str, torch.Tensor], float, int]:
    """(features, extraction seconds, n tiles); the seconds are those of the first (uncached) run."""
    path = CACHE / (hashlib.sha1(f"{get_settings().data_dir}|{key}|{BLOCKS}|v1".encode()).hexdigest()[:16] + ".pt")
    if path.is_file():
        d = torch.load(path)
        return d["f"], d["s"], d["n"]
    tiles = tiles_fn()
    t0 = time.perf_counter()
    f = extract(tiles)
    s = time.perf_counter() - t0
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save({"f": f, "s": s, "n": len(tiles)}, path)
    return f, s, len(tiles)


def split_tiles(product: str, split: str):
    """Tiles of every photo of a split and, per photo, its ``[(tile index, y, x)]``."""
    tiles, index = [], []
    for it in br.items(product, split):
        rows = []
        for y, x, t in test_tiles(load_rgb(it["path"])):
            rows.append((len(tiles), y, x))
            tiles.append(t)
        index.append(rows)
    return tiles, index


# --------------------------------------------------------------------------- anomalib models


class Replay(torch.nn.Module):
    """Stands in for a model's feature extractor: returns the next rows of precomputed features."""

    def __init__(self, feats: dict[str, torch.Tensor]):
        super().__init__()
        self.feats, self.pos = feats, 0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b = x.shape[0]
        out = {k: v[self.pos:self.pos + b].float() for k, v in self.feats.items()}
        self.pos += b
        return out


def lite0_net(blocks: tuple[int, ...]):
    return load_lite0(blocks=tuple(sorted(blocks)), pretrained=True, with_head=False).net


def _gaussian_fit(self, dataset: torch.Tensor) -> None:
    """anomalib 2.7's ``dfm.torch_model.SingleClassGaussian.fit`` without its ``device=`` argument.

    The original calls ``torch.mean(dataset, dim=1, device=dataset.device)``, which this torch
    (2.x) rejects: ``TypeError: mean() received an invalid combination of arguments - got (Tensor,
    device=torch.device, dim=int)``, so DFM with ``score_type="nll"`` cannot be fitted as shipped.
    Same computation otherwise.
    """
    num_samples = dataset.shape[1]
    self.mean_vec = torch.mean(dataset, dim=1)
    data_centered = (dataset - self.mean_vec.reshape(-1, 1)) / math.sqrt(num_samples)
    self.u_mat, self.sigma_mat, _ = torch.linalg.svd(data_centered, full_matrices=False)


def build(model: str, setting: dict):
    """The real anomalib torch model around our Lite0 module (anomalib's FX feature extractor)."""
    from anomalib.models.image.dfm.torch_model import DFMModel
    from anomalib.models.image.padim.torch_model import PadimModel

    net = lite0_net(setting["blocks"] if model == "padim" else (setting["block"],))  # before the seed: the
    torch.manual_seed(0)  # first (uncached) load draws random numbers; seed for PaDiM's random channel subset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if model == "padim":
            layers = list(backbone_spec("efficientnet-lite0", setting["blocks"]).layers)
            m = PadimModel(backbone=net, layers=layers, pre_trained=False, n_features=setting["n_features"])
        else:
            layer = backbone_spec("efficientnet-lite0", (setting["block"],)).layers[0]
            m = DFMModel(backbone=net, layer=layer, pre_trained=False, n_comps=setting["n_comps"],
                         score_type=setting["score_type"])
            if setting["score_type"] == "nll":  # anomalib 2.7 bug, see _gaussian_fit
                m.gaussian_model.fit = types.MethodType(_gaussian_fit, m.gaussian_model)
    return m


def run_batches(m, feats: dict[str, torch.Tensor], n: int):
    """Run ``m.forward`` over ``n`` tiles whose features are replayed; eval: (scores, maps or None)."""
    m.feature_extractor = Replay(feats)
    scores, maps = [], []
    for s in range(0, n, BATCH):
        b = min(BATCH, n - s)
        out = m(torch.zeros(b, 3, TILE, TILE))
        if not m.training:
            scores.append(out.pred_score.reshape(-1).float())
            maps.append(None if out.anomaly_map is None else out.anomaly_map[:, 0].float())
    if m.training:
        return None
    return torch.cat(scores), (None if maps[0] is None else torch.cat(maps))


def fit(model: str, setting: dict, train: list[tuple[dict, int]]):
    m = build(model, setting)
    t0 = time.perf_counter()
    m.train()
    for feats, n in train:
        run_batches(m, feats, n)
    m.fit()
    m.eval()
    return m, time.perf_counter() - t0


def photo_results(m, feats, index, its) -> tuple[np.ndarray, list[np.ndarray] | None]:
    n = sum(len(r) for r in index)
    scores, maps = run_batches(m, feats, n)
    img_scores = np.array([float(scores[[k for k, _, _ in rows]].max()) for rows in index])
    if maps is None:
        return img_scores, None
    out = []
    for it, rows in zip(its, index):
        h = max(y for _, y, _ in rows) + TILE
        w = max(x for _, _, x in rows) + TILE
        full = torch.full((h, w), -float("inf"))
        for k, y, x in rows:
            full[y:y + TILE, x:x + TILE] = torch.maximum(full[y:y + TILE, x:x + TILE], maps[k])
        h0, w0 = it.get("size") or (256, 256)
        out.append(full[:h0, :w0].numpy())
    return img_scores, out


def evaluate(its, scores: np.ndarray, maps, thr: float | None) -> dict:
    if maps is not None:
        res = br.metrics(its, maps, None, 0.0, pixel=True)
        res = {"pixel_auroc": res["pixel_auroc"]}
    else:
        res = {"pixel_auroc": None}
    tab = br.auroc_table(its, scores, thr)
    labels = np.array([it["label"] == "defect" for it in its])
    res.update(image_auroc=tab["image_auroc"], per_type=tab["per_type"], fpr=tab.get("fpr"),
               recall=tab.get("recall"), normal_scores=[round(float(np.percentile(scores[~labels], q)), 3)
                                                       for q in (5, 50, 95, 100)])
    return res


def val_threshold(its, scores: np.ndarray, fpr: float = 0.05) -> float:
    normal = np.array([it["label"] == "good" for it in its])
    return float(np.quantile(scores[normal], 1 - fpr))


def ms_per_tile(m, blocks: tuple[int, ...], n: int = 30) -> dict:
    """Real forward of one 128 px tile (batch 1): the ONNX extractor and anomalib's FX extractor."""
    x = br.prep(np.random.default_rng(0).integers(0, 256, (TILE, TILE, 3), dtype=np.uint8), None)
    out = {}
    for name, ext in (("onnx", load_lite0_onnx(tuple(sorted(blocks)))), ("torch", m._fx_extractor)):
        m.feature_extractor = ext
        with torch.inference_mode():
            for _ in range(3):
                m(x)
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                m(x)
                ts.append(time.perf_counter() - t0)
        out[name] = round(1000 * float(np.median(ts)), 2)
    return out


# --------------------------------------------------------------------------- experiment


def product_data(product: str) -> dict:
    d = {}
    for acq in (False, True):
        f, s, n = cached_features(f"{product}|train|acq={acq}|crops={CROPS}", lambda acq=acq: train_tiles(product, acq))
        d[f"train{int(acq)}"] = (f, s, n)
    for split in ("val", "unseen"):
        its = br.items(product, split)
        f, s, n = cached_features(f"{product}|{split}|stride={STRIDE}", lambda split=split: split_tiles(product, split)[0])
        index, k = [], 0
        for it in its:
            h, w = pad_to_tile(load_rgb(it["path"])).shape[:2]
            rows = []
            for y in positions(h):
                for x in positions(w):
                    rows.append((k, y, x))
                    k += 1
            index.append(rows)
        assert k == n, (k, n)
        d[split] = (f, s, n, index, its)
    return d


def train_set(d: dict, acq: bool, blocks: tuple[int, ...]):
    keys = [f"_blocks.{b}" for b in blocks]
    sets = [d["train0"]] + ([d["train1"]] if acq else [])
    feat_s = sum(s for _, s, _ in sets)
    return [({k: f[k] for k in keys}, n) for f, _, n in sets], feat_s, sum(n for _, _, n in sets)


def run_one(model: str, name: str, setting: dict, product: str, d: dict, acq: bool, splits: tuple[str, ...]) -> list:
    blocks = setting["blocks"] if model == "padim" else (setting["block"],)
    train, feat_s, n_train = train_set(d, acq, blocks)
    m, fit_s = fit(model, setting, train)
    rows, thr = [], None
    keys = [f"_blocks.{b}" for b in blocks]
    for split in ("val",) + tuple(s for s in splits if s != "val"):
        f, _, n, index, its = d[split]
        t0 = time.perf_counter()
        scores, maps = photo_results(m, {k: f[k] for k in keys}, index, its)
        score_s = time.perf_counter() - t0
        if split == "val":
            thr = val_threshold(its, scores)
        if split not in splits:
            continue
        row = {"model": model, "setting": name, "train": "native+acq" if acq else "native", "product": product,
               "split": split, **evaluate(its, scores, maps, thr), "threshold": round(thr, 4),
               "fit_s": round(fit_s, 2), "feat_s": round(feat_s, 1), "n_train_tiles": n_train,
               "n_tiles": n, "score_s": round(score_s, 2)}
        if model == "dfm":
            row["pca_components"] = int(m.pca_model.num_components.item())
        rows.append(row)
    return rows, m


def patchcore_reference(product: str) -> list[dict]:
    captured = {}
    orig = br.bank_from

    def capture(*a, **k):
        captured["bank"] = orig(*a, **k)
        return captured["bank"]
    br.bank_from = capture
    try:
        args = argparse.Namespace(ratio=0.01, presample=120_000, fpr=0.05, no_pixel=False)
        r = br.run_variant("native+acq", product, args)
    finally:
        br.bank_from = orig
    m = br.model()
    m.memory_bank = captured["bank"]
    x = br.prep(np.random.default_rng(0).integers(0, 256, (TILE, TILE, 3), dtype=np.uint8), None)
    with torch.inference_mode():
        for _ in range(3):
            m(x)
        ts = []
        for _ in range(30):
            t0 = time.perf_counter()
            m(x)
            ts.append(time.perf_counter() - t0)
    ms = round(1000 * float(np.median(ts)), 2)
    views = len(AUGMENTATIONS[PRODUCT_CONFIGS[product].tta])
    rows = []
    for split in ("val", "unseen"):
        v = r[split]
        rows.append({"model": "patchcore", "setting": "native+acq (project)", "train": "native+acq",
                     "product": product, "split": split, "pixel_auroc": v.get("pixel_auroc"),
                     "image_auroc": v["image_auroc"], "per_type": v["per_type"], "fpr": v.get("fpr"),
                     "recall": v.get("recall"), "threshold": v.get("threshold"), "fit_s": r["bank_s"],
                     "feat_s": None, "bank": r["bank"], "ms_tile": {"onnx_1view": ms}, "tta_views": views})
    return rows


def try_other_models() -> dict:
    """Can SuperSimpleNet / FastFlow be built around our nn.Module? (construction only, no training)."""
    out = {}
    net = lite0_net((4, 7))
    layers = list(backbone_spec("efficientnet-lite0", (4, 7)).layers)
    try:
        from anomalib.models.image.supersimplenet.torch_model import SupersimplenetModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            m = SupersimplenetModel(backbone=net, layers=layers).eval()
            with torch.inference_mode():
                o = m(torch.zeros(1, 3, TILE, TILE))
        out["supersimplenet"] = f"built: forward ok, anomaly_map {tuple(o.anomaly_map.shape)} (untrained)"
    except Exception as exc:  # noqa: BLE001
        out["supersimplenet"] = f"failed: {type(exc).__name__}: {exc}"
    try:
        from anomalib.models.image.fastflow.torch_model import FastflowModel

        FastflowModel(input_size=(TILE, TILE), backbone=net, pre_trained=False)
        out["fastflow"] = "built"
    except Exception as exc:  # noqa: BLE001
        msg = str(exc)
        if "\n" in msg:  # "Backbone <the module's repr> is not supported. ..."
            msg = msg.split("\n")[0] + " <EfficientNet repr> ..." + msg.split("\n")[-1][-150:]
        out["fastflow"] = f"failed: {type(exc).__name__}: {msg}"
    return out


def fmt_types(pt: dict) -> str:
    return " ".join(f"{k[:5]}={v:.2f}" for k, v in pt.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--products", nargs="+", default=["brick", "gravel", "grass"])
    ap.add_argument("--no-patchcore", action="store_true")
    ap.add_argument("--no-ablation", action="store_true")
    args = ap.parse_args()
    t_start = time.perf_counter()
    data = {}
    for p in args.products:
        t0 = time.perf_counter()
        data[p] = product_data(p)
        print(json.dumps({"features": p, "seconds": round(time.perf_counter() - t0, 1),
                          **{k: v[2] for k, v in data[p].items()}}), flush=True)
    summary = []
    chosen = {}
    for model, grid in (("padim", PADIM_GRID), ("dfm", DFM_GRID)):
        # 1. tiny grid on val (fit: train + acq tiles)
        val_rows = {}
        for name, setting in grid.items():
            for p in args.products:
                try:
                    rows, _ = run_one(model, name, setting, p, data[p], True, ("val",))
                except Exception as exc:  # noqa: BLE001  (recorded; the setting drops out of the choice)
                    print(json.dumps({"model": model, "setting": name, "product": p,
                                      "error": f"{type(exc).__name__}: {exc}"}), flush=True)
                    val_rows.setdefault(name, []).append(float("nan"))
                    continue
                for r in rows:
                    print(json.dumps(r), flush=True)
                val_rows.setdefault(name, []).append(rows[0]["image_auroc"])
        means = {k: float(np.mean(v)) for k, v in val_rows.items()}
        best = max((k for k in grid if not math.isnan(means[k])), key=lambda k: means[k])  # first wins ties
        chosen[model] = {"setting": best, "val_mean_image_auroc": {k: round(v, 4) for k, v in means.items()}}
        print(json.dumps({"model": model, "chosen": best, "by": "mean val image AUROC (fit train+acq)",
                          "val_means": chosen[model]["val_mean_image_auroc"]}), flush=True)
        # 2. the chosen setting on unseen (and the no-acq ablation)
        for acq in ((True,) if args.no_ablation else (True, False)):
            for p in args.products:
                rows, m = run_one(model, best, grid[best], p, data[p], acq, ("val", "unseen"))
                if acq:
                    blocks = grid[best]["blocks"] if model == "padim" else (grid[best]["block"],)
                    fresh = build(model, grid[best])
                    m._fx_extractor = fresh.feature_extractor
                    ms = ms_per_tile(m, blocks)
                else:
                    ms = None
                for r in rows:
                    r["ms_tile"] = ms
                    r["chosen"] = True
                    print(json.dumps(r), flush=True)
                summary.append(rows)
    if not args.no_patchcore:
        for p in args.products:
            rows = patchcore_reference(p)
            for r in rows:
                print(json.dumps(r), flush=True)
            summary.append(rows)
    others = try_other_models()
    print(json.dumps({"other_models_with_nn_module_backbone": others}), flush=True)

    print()
    print("model | setting | train | product | val img AUROC | unseen img AUROC | unseen px AUROC | "
          "unseen per-type AUROC | fit s (+train feat s) | ms/128px tile (onnx / torch)")
    for rows in summary:
        va = next(r for r in rows if r["split"] == "val")
        un = next(r for r in rows if r["split"] == "unseen")
        fit_txt = f"{un['fit_s']}" + (f" (+{un['feat_s']})" if un.get("feat_s") is not None else " (feat cached)")
        ms = un.get("ms_tile")
        if ms is None:
            ms_txt = "-"
        elif "onnx_1view" in ms:
            ms_txt = f"{ms['onnx_1view']} x {un['tta_views']} views"
        else:
            ms_txt = f"{ms['onnx']} / {ms['torch']}"
        print(f"{un['model']} | {un['setting']} | {un['train']} | {un['product']} | {va['image_auroc']} | "
              f"{un['image_auroc']} | {un['pixel_auroc']} | {fmt_types(un['per_type'])} | {fit_txt} | {ms_txt}")
    print(f"chosen on val: {json.dumps(chosen)}")
    print(f"other models: {json.dumps(others)}")
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
