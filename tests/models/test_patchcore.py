"""PatchCore (models.patchcore, stores.banks, services.products): real EfficientNet-Lite0 features
on real scikit-image brick crops.

Only rows 0-319 of ``skimage.data.brick()`` are read (rows 320-511 are reserved).
Defects are synthesised with exact masks: a dark hole and a bright scratch.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data, draw

from core.settings import Settings
from core.types import InspectionResult
from models.patchcore.anomaly_map import find_regions
from models.patchcore.calibration import calibrate_threshold
from models.patchcore.config import DEFAULT_CONFIG, PatchCoreConfig
from models.patchcore.coreset import coreset_sampler_class, greedy_coreset_indices
from models.patchcore.model import _forward_views, augment_views, backbone_spec, build_model
from stores.banks import BankNotFoundError
from stores.runs import write_inspection_artifacts as save_artifacts
from tests.bank_helpers import PatchCoreBanks as PatchCoreStore

ROWS = 320  # never read rows 320..511


def _brick_rows() -> np.ndarray:
    rows = data.brick()[:ROWS]
    assert rows.shape[0] == ROWS
    return rows


def _crops(n: int, seed: int, size: int = 256) -> list[np.ndarray]:
    rows = _brick_rows()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y = int(rng.integers(0, ROWS - size + 1))
        x = int(rng.integers(0, rows.shape[1] - size + 1))
        out.append(np.repeat(rows[y:y + size, x:x + size, None], 3, axis=2).astype(np.uint8))
    return out


def _hole(img: np.ndarray, center: tuple[int, int], radius: int = 16) -> tuple[np.ndarray, np.ndarray]:
    out = img.copy()
    mask = np.zeros(img.shape[:2], dtype=bool)
    rr, cc = draw.disk(center, radius, shape=mask.shape)
    out[rr, cc] = (18, 14, 12)
    mask[rr, cc] = True
    return out, mask


def _scratch(img: np.ndarray, row: int) -> tuple[np.ndarray, np.ndarray]:
    out = img.copy()
    mask = np.zeros(img.shape[:2], dtype=bool)
    w = img.shape[1]
    rr, cc = draw.line(row, w // 5, row + 25, 4 * w // 5)
    for d in (-1, 0, 1):
        mask[np.clip(rr + d, 0, img.shape[0] - 1), cc] = True
    out[mask] = (245, 245, 245)
    return out, mask


#: settings of the tests of the PatchCore mechanics (patch counts, views): no acquisition copies, no second fold
PLAIN = {"patchcore_acquisition_copies": 0, "patchcore_calibration_copies": 0, "patchcore_cross_fit": False}


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _overlap(a: list[int], b: list[int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A store fitted on 20 real normal crops (coreset 1 %) with 6 val normals + 6 val defects."""
    state = tmp_path_factory.mktemp("pc_state")
    settings = Settings.from_env(state_dir=state, patchcore_cross_fit=False)  # held-out calibration (cross-fitted banks: tests/services/test_evaluate.py)
    train = _crops(20, seed=1)
    val_normal = _crops(6, seed=2)
    rng = np.random.default_rng(7)
    val_defect = []
    for i, im in enumerate(_crops(6, seed=3)):
        if i % 2:
            val_defect.append(_scratch(im, int(rng.integers(60, 170)))[0])
        else:
            val_defect.append(_hole(im, (int(rng.integers(60, 196)), int(rng.integers(60, 196))))[0])
    img_dir = state / "train_imgs"
    img_dir.mkdir()
    paths = []
    for i, im in enumerate(train):
        p = img_dir / f"{i:03d}.png"
        Image.fromarray(im).save(p)
        paths.append(str(p))
    events = []
    # the default configuration (not the tuned per-product one): blocks 4+7 at native scale, no views
    store = PatchCoreStore(settings, coreset_ratio=0.01, blocks=(4, 7), pool_size=3, augment="none", tta="none")
    info = store.fit("brick", train, val_normal, val_defect, train_paths=paths,
                     progress=lambda f, m: events.append((f, m)))
    return {"settings": settings, "store": store, "info": info, "paths": paths, "events": events}


def test_fit_reports_bank_and_threshold(fitted):
    info = fitted["info"]
    meta = fitted["store"].meta("brick")
    assert fitted["store"].config_for("brick").image_size == 0  # native scale
    # 20 train crops of 256 px (patch grid 32 x 32 at stride 8) + one acquisition-changed copy of each
    # (the copies that were rescaled by +-20 % have other grids)
    assert meta["n_train"] == 20 and meta["n_bank_extra"] == 20
    assert meta["n_patches"] > 20 * 32 * 32 and info["bank_size"] == int(meta["n_patches"] * 0.01)
    assert info["threshold"] > 0 and info["pixel_threshold"] > 0
    # the threshold: the (1 - target FPR) quantile of the calibration normals (6 val normals + 3 changed copies)
    assert meta["n_val_normal"] == 6 * 4 and meta["target_fpr"] == pytest.approx(0.02)
    # (scores moved to the reference area: the max over more patches is higher, size_slope per ln(area))
    at_ref = meta["calibration_scores_at_reference_area"]
    assert len(at_ref) == len(meta["val_normal_scores"]) == 24 and meta["size_slope"] >= 0
    assert meta["threshold"] == pytest.approx(float(np.quantile(at_ref, 0.98)), rel=1e-5)
    assert meta["normal_spread"] == pytest.approx(float(np.std(at_ref)), rel=1e-4)
    assert meta["pixel_scale"] == 1.0 and meta["input_norm"] == "rgb" and meta["uncertain_band"] == 1.0
    assert info["image_auroc"] >= 0.9
    fracs = [f for f, _ in fitted["events"]]
    assert fracs == sorted(fracs) and fracs[-1] == 1.0
    assert fitted["store"].products() == ["brick"]
    folder = fitted["settings"].banks_dir / "brick"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["backbone"] == "efficientnet-lite0" and meta["blocks"] == [4, 7]
    cfg = fitted["store"].config_for("brick")
    assert meta["pool_size"] == cfg.pool_size and meta["image_size"] == cfg.image_size == 0
    assert meta["augment"] == "none" and meta["sigma"] == cfg.sigma and meta["reweight"] is cfg.reweight
    assert meta["threshold"] == pytest.approx(info["threshold"])
    assert meta["color_scale"][0] < meta["pixel_threshold"] < meta["color_scale"][1]
    bank = np.load(folder / "memory_bank.npy")
    assert bank.dtype == np.float32 and bank.shape == (info["bank_size"], 40 + 80)
    assert not [p.name for p in fitted["settings"].banks_dir.iterdir() if p.name.startswith(".")]


def test_defect_above_threshold_normal_below(fitted):
    store = fitted["store"]
    normal = _crops(3, seed=11)
    hole_img, hole_mask = _hole(_crops(1, seed=12)[0], (120, 150), radius=18)
    scratch_img, scratch_mask = _scratch(_crops(1, seed=13)[0], 100)
    results = store.inspect_batch(normal + [hole_img, scratch_img], "brick")
    thr = results[0].threshold
    for r in results[:3]:
        assert not r.is_anomalous and r.score < thr, r.score
    for r, mask in zip(results[3:], (hole_mask, scratch_mask), strict=True):
        assert r.is_anomalous and r.score >= thr
        assert r.regions, "a defect must give at least one region"
        top = r.regions[0]
        assert _overlap(list(top.bbox), _bbox(mask)), (top, _bbox(mask))
        assert 0 < top.area_frac < 0.5
        # the anomaly map peaks inside (or right next to) the defect
        y, x = np.unravel_index(np.argmax(r.anomaly_map), r.anomaly_map.shape)
        near = np.zeros_like(mask)
        near[max(0, y - 12):y + 13, max(0, x - 12):x + 13] = True
        assert (near & mask).any()
    assert results[3].model == "patchcore/efficientnet-lite0[blocks 4,7]@native/pool3/coreset0.01/relative"
    for r in results:  # the margin is the distance to the threshold in normal spreads
        spread = fitted["store"].meta("brick")["normal_spread"]
        assert r.margin == pytest.approx((r.score - r.threshold) / spread)
        assert r.uncertain == (abs(r.margin) < 1.0)


def test_anomaly_map_shape_any_input_size(fitted):
    store = fitted["store"]
    rows = _brick_rows()
    for h, w in ((256, 256), (200, 300), (300, 200), (97, 131)):
        img = np.repeat(rows[:h, 50:50 + w, None], 3, axis=2)
        r = store.inspect(img, "brick")
        assert isinstance(r, InspectionResult)
        assert r.anomaly_map.shape == (h, w) and r.anomaly_map.dtype == np.float32
        assert r.mask.shape == (h, w) and r.mask.dtype == bool
        assert np.array_equal(r.mask, r.anomaly_map >= r.pixel_threshold)
        assert r.elapsed_ms > 0
        for reg in r.regions:
            x0, y0, x1, y1 = reg.bbox
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    gray = rows[:180, :240]  # grayscale arrays are accepted too
    assert store.inspect(gray, "brick").anomaly_map.shape == (180, 240)


def test_nearest_normal_is_a_training_image(fitted):
    img = _crops(1, seed=1)[0]  # identical to the first training crop
    r = fitted["store"].inspect(img, "brick")
    assert r.nearest_normal == fitted["paths"][0]


def test_persistence_roundtrip_identical(fitted):
    images = _crops(2, seed=21) + [_hole(_crops(1, seed=22)[0], (80, 80))[0]]
    first = fitted["store"].inspect_batch(images, "brick")
    again = PatchCoreStore(fitted["settings"]).inspect_batch(images, "brick")  # a "restart"
    for a, b in zip(first, again, strict=True):
        assert a.score == b.score and a.threshold == b.threshold
        assert np.array_equal(a.anomaly_map, b.anomaly_map)
        assert a.regions == b.regions
    single = fitted["store"].inspect(images[2], "brick")
    assert single.score == pytest.approx(first[2].score, rel=1e-5)


def test_refit_replaces_bank_atomically(fitted, tmp_path):
    settings = Settings.from_env(state_dir=tmp_path)
    store = PatchCoreStore(settings, coreset_ratio=0.01, image_size=128, augment="none")  # small: about files
    train, val = _crops(6, seed=31), _crops(3, seed=32)
    store.fit("brick", train, val)  # normal-only calibration
    meta1 = store.meta("brick")
    assert meta1["threshold"] == pytest.approx(float(np.quantile(meta1["val_normal_scores"], 0.98)), rel=1e-5)
    assert meta1["n_val_defect"] == 0 and meta1["calibration_fpr"] <= 0.1
    store.fit("brick", train[:4], val)
    meta2 = PatchCoreStore(settings).meta("brick")
    assert meta2["n_train"] == 4 and meta2["image_size"] == 128
    assert sorted(p.name for p in settings.banks_dir.iterdir()) == ["brick"]


def test_artifacts_written(fitted, tmp_path):
    img, _ = _hole(_crops(1, seed=41)[0][:, :200], (100, 90))  # 256 x 200
    r = fitted["store"].inspect(img, "brick")
    paths = save_artifacts(r, img, tmp_path / "run")
    assert set(paths) == {"anomaly_map", "mask", "heatmap", "overlay", "comparison"}
    amap = np.load(paths["anomaly_map"])
    assert amap.dtype == np.float32 and amap.shape == (256, 200)
    np.testing.assert_array_equal(amap, r.anomaly_map)
    for key in ("mask", "heatmap", "overlay", "comparison"):
        with Image.open(paths[key]) as im:
            assert im.format == "PNG"
            im.verify()
    with Image.open(paths["overlay"]) as im:
        assert im.size == (200, 256)
    mask = np.asarray(Image.open(paths["mask"]))
    assert np.array_equal(mask > 0, r.mask)
    with Image.open(paths["comparison"]) as im:
        assert im.width > 2 * 200  # three panels side by side


def test_fixed_color_scale_keeps_normals_cold(fitted):
    from models.patchcore.anomaly_map import _scale

    store = fitted["store"]
    normal = store.inspect(_crops(1, seed=51)[0], "brick")
    defect_img, mask = _hole(_crops(1, seed=52)[0], (128, 128), radius=20)
    defect = store.inspect(defect_img, "brick")
    assert normal.color_scale == defect.color_scale
    assert _scale(normal.anomaly_map, normal.color_scale).mean() < 0.35
    assert _scale(defect.anomaly_map, defect.color_scale)[mask].mean() > 0.6


def test_unknown_product(fitted):
    with pytest.raises(BankNotFoundError) as info:
        fitted["store"].inspect(_crops(1, seed=1)[0], "turbine-blade")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert "turbine-blade" in str(info.value) and "brick" in str(info.value)


def test_fit_rejects_bad_input(tmp_path):
    store = PatchCoreStore(Settings.from_env(state_dir=tmp_path))
    with pytest.raises(ValueError):
        store.fit("brick", [], _crops(2, seed=1))
    with pytest.raises(ValueError):
        store.fit("brick", _crops(2, seed=1), _crops(1, seed=2))
    with pytest.raises(ValueError):
        store.fit("../evil", _crops(2, seed=1), _crops(2, seed=2))
    assert store.products() == []


def test_fit_from_manifest_and_evaluate(tmp_path):
    """A tiny manifest in the data builder's format: fit, then image / pixel AUROC on val."""
    settings = Settings.from_env(state_dir=tmp_path / "state")
    data_dir = settings.data_dir
    items = []

    def add(split: str, label: str, img: np.ndarray, mask: np.ndarray | None, i: int) -> None:
        rel = f"brick/{split}/{label}/{i:03d}.png"
        (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(data_dir / rel)
        mrel = None
        if mask is not None:
            mrel = f"brick/{split}/{label}/{i:03d}_mask.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(data_dir / mrel)
        items.append({"id": f"brick-{split}-{label}-{i}", "product": "brick", "split": split, "label": label,
                      "defect_type": "hole" if mask is not None else None, "image": rel, "mask": mrel,
                      "bbox": _bbox(mask) if mask is not None else None, "note": ""})

    for i, im in enumerate(_crops(10, seed=61)):
        add("train", "good", im, None, i)
    for i, im in enumerate(_crops(4, seed=62)):
        add("val", "good", im, None, i)
    for i, im in enumerate(_crops(4, seed=63)):
        img, mask = _hole(im, (60 + 40 * i, 200 - 35 * i), radius=14 + 2 * i)
        add("val", "defect", img, mask, i)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "manifest.json").write_text(json.dumps({"version": 1, "items": items}))

    store = PatchCoreStore(settings, coreset_ratio=0.02)
    info = store.fit_from_manifest("brick")
    assert info["image_auroc"] == 1.0
    ev = PatchCoreStore(settings).evaluate("brick")
    assert ev["n_normal"] == 4 and ev["n_defect"] == 4
    assert ev["image_auroc"] == 1.0
    assert ev["pixel_auroc"] > 0.9
    assert ev["f1"] == 1.0 and ev["fpr"] == 0.0
    assert ev["per_type_image_auroc"] == {"hole": 1.0}
    small = PatchCoreStore(settings).evaluate("brick", limit=2)  # CI mode: first 2 per class
    assert (small["n_normal"], small["n_defect"]) == (2, 2) and small["image_auroc"] == 1.0
    r = store.inspect(_crops(1, seed=61)[0], "brick")
    assert r.nearest_normal == str(data_dir / "brick/train/good/000.png")
    with pytest.raises(ValueError):
        store.fit_from_manifest("gravel")


def test_calibrate_threshold_rules():
    normal = [1.0, 1.2, 1.1, 1.3, 0.9]
    thr, rule = calibrate_threshold(normal)
    assert thr > max(normal) and "normal-only" in rule
    thr, _ = calibrate_threshold(normal, [2.0, 2.5, 3.0])
    assert 1.3 < thr < 2.0 and thr == pytest.approx(1.65)  # midpoint of the gap, not the min defect score
    thr, _ = calibrate_threshold(normal, [1.25, 2.5, 3.0])  # overlapping classes: best F1 still separates well
    assert 1.1 < thr < 2.5
    with pytest.raises(ValueError):
        calibrate_threshold([1.0])


def test_fpr_threshold_and_margin():
    from models.patchcore.calibration import fpr_threshold, verdict_margin

    normal = list(np.linspace(10.0, 20.0, 101))
    thr, spread, rule = fpr_threshold(normal, 0.05)
    assert thr == pytest.approx(19.5) and spread == pytest.approx(float(np.std(normal)))
    assert "0.950" in rule and "0.050" in rule
    assert np.mean(np.asarray(normal) >= thr) == pytest.approx(0.05, abs=0.011)
    assert verdict_margin(thr + 2 * spread, thr, spread) == pytest.approx(2.0)
    assert verdict_margin(thr - spread, thr, spread) == pytest.approx(-1.0)
    for bad in (0.0, 0.6, -0.1):
        with pytest.raises(ValueError):
            fpr_threshold(normal, bad)
    with pytest.raises(ValueError):
        fpr_threshold([1.0], 0.05)


def test_native_scale_inputs_are_not_magnified():
    """A photo is scored at its own size times the pixel scale (issue 15: every input used to be
    resized to 256 px, so a 176 px photo was magnified 1.45x and every normal part flagged)."""
    from models.patchcore.model import model_input_size, prepare

    spec = backbone_spec("efficientnet-lite0")
    img = np.zeros((128, 176, 3), np.uint8)
    assert prepare(img, PatchCoreConfig(), spec).shape == (1, 3, 128, 176)
    assert model_input_size(128, 176, PatchCoreConfig(pixel_scale=0.5)) == (64, 88)
    assert prepare(img, PatchCoreConfig(pixel_scale=0.5), spec).shape == (1, 3, 64, 88)
    assert prepare(img, PatchCoreConfig(image_size=256), spec).shape == (1, 3, 256, 256)  # legacy banks
    gray = prepare(np.dstack([img[..., 0] + 10, img[..., 1] + 200, img[..., 2]]).astype(np.uint8),
                   PatchCoreConfig(input_norm="gray"), spec)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    with pytest.raises(ValueError, match="too small"):
        prepare(np.zeros((100, 100, 3), np.uint8), PatchCoreConfig(pixel_scale=0.5), spec)
    with pytest.raises(ValueError, match="pixel_scale"):
        from models.patchcore.config import config_for
        config_for("brick", pixel_scale=10.0)


def test_find_regions_boxes():
    mask = np.zeros((100, 200), dtype=bool)
    mask[10:20, 30:60] = True
    mask[70:90, 150:190] = True
    mask[50, 5] = True  # a speck, dropped
    amap = mask.astype(np.float32)
    amap[75, 160] = 5.0
    regions = find_regions(mask, amap)
    assert [list(r.bbox) for r in regions] == [[150, 70, 190, 90], [30, 10, 60, 20]]
    assert regions[0].peak == 5.0 and regions[0].area_frac == pytest.approx(800 / 20000)


def _brute_force_greedy(x: torch.Tensor, start: int, k: int) -> list[int]:
    ref = [start]
    min_d = torch.cdist(x, x[start][None])[:, 0]
    for _ in range(k - 1):
        nxt = int(torch.argmax(min_d))
        ref.append(nxt)
        min_d = torch.minimum(min_d, torch.cdist(x, x[nxt][None])[:, 0])
    return ref


def test_greedy_coreset_matches_brute_force():
    """Same picks as a brute-force k-center greedy (cdist) from the same start, seeded, no N x N matrix."""
    x = torch.randn(600, 12, generator=torch.Generator().manual_seed(0))
    picks = greedy_coreset_indices(x, 30, seed=5)
    assert len(picks) == 30 and len(set(picks)) == 30
    assert picks == _brute_force_greedy(x, picks[0], 30)
    assert picks == greedy_coreset_indices(x, 30, seed=5)  # seeded: reproducible
    assert greedy_coreset_indices(x, 30, start=7)[0] == 7
    approx = greedy_coreset_indices(x, 30, seed=5, proj_dim=4)  # JL-projected selection still spreads out
    assert len(set(approx)) == 30
    assert torch.cdist(x, x[approx]).min(dim=1).values.max() < 2.0 * torch.cdist(x, x[picks[:1]]).max()
    with pytest.raises(ValueError):
        greedy_coreset_indices(x, 0)
    with pytest.raises(ValueError):
        greedy_coreset_indices(x, 601)


def test_coreset_sampler_is_k_center_greedy():
    """anomalib's KCenterGreedy interface (global RNG start) gives the brute-force greedy picks."""
    x = torch.randn(600, 12, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    sampler = coreset_sampler_class()(x, 0.05)
    picks = sampler.select_coreset_idxs()
    assert len(picks) == 30 and picks == _brute_force_greedy(x, picks[0], 30)
    coreset = coreset_sampler_class()(x, 0.05).sample_coreset()
    assert coreset.shape == (30, 12)


# --------------------------------------------------------------------------- issue 5: search, config, evaluation


def test_faiss_search_matches_anomalib_torch_path():
    """Same bank, same backbone: faiss k-NN gives anomalib's torch scores and maps (max abs diff small)."""
    spec = backbone_spec("efficientnet-lite0", (4, 7))
    ours, theirs = build_model(spec), build_model(spec, search="torch")
    assert type(theirs).__name__ == "PatchcoreModel" and type(ours).__name__ == "FaissPatchcoreModel"
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(3000, 120, generator=g) * 2.0
    ours.memory_bank = bank
    theirs.memory_bank = bank
    x = torch.rand(3, 3, 128, 128, generator=g)
    with torch.inference_mode():
        a, b = ours(x), theirs(x)
    assert torch.allclose(a.pred_score, b.pred_score, rtol=1e-4, atol=1e-3)
    assert (a.anomaly_map - b.anomaly_map).abs().max() < 1e-3
    emb = torch.randn(50, 120, generator=g)
    for k in (1, 9):
        d1, i1 = ours.nearest_neighbors(emb, k)
        d2, i2 = theirs.nearest_neighbors(emb, k)
        assert d1.shape == d2.shape and i1.shape == i2.shape
        assert torch.allclose(d1, d2, rtol=1e-4, atol=1e-3) and (i1 == i2).float().mean() > 0.98
    half = build_model(spec, bank_dtype="float16")
    half.memory_bank = bank
    with torch.inference_mode():
        c = half(x)
    assert torch.allclose(c.pred_score, b.pred_score, rtol=2e-3)  # fp16 rounding of the bank only
    ours.memory_bank = bank[:100].clone()  # a new bank rebuilds the index
    assert ours.faiss_index().ntotal == 100
    with pytest.raises(ValueError):
        build_model(spec, search="annoy")
    with pytest.raises(ValueError):
        build_model(spec, sigma=-1)


def test_sigma_and_reweight_options():
    spec = backbone_spec("efficientnet-lite0", (4, 7))
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(500, 120, generator=g)
    x = torch.rand(2, 3, 64, 64, generator=g)
    maps = {}
    for sigma in (0, 4.0):
        m = build_model(spec, sigma=sigma)
        m.memory_bank = bank
        with torch.inference_mode():
            maps[sigma] = m(x).anomaly_map
    # no blur: nearest upsampling keeps 8 x 8 blocks of equal values; the blur smooths them
    assert maps[0][0, 0, :8, :8].unique().numel() == 1
    assert maps[4.0][0, 0, :8, :8].unique().numel() > 1
    m = build_model(spec)
    m.memory_bank = bank
    m.num_neighbors = 1  # reweight=False: image score = max patch distance
    with torch.inference_mode():
        out = m(x)
    ps, _ = m.nearest_neighbors(m.reshape_embedding(m.generate_embedding(
        {k: m.feature_pooler(v) for k, v in m.feature_extractor(x).items()})), 1)
    assert torch.allclose(out.pred_score, ps.reshape(2, -1).amax(1))


def test_test_time_views_one_view_is_the_plain_path():
    """_forward_views with the identity view alone = anomalib's forward (map) and the max patch distance."""
    spec = backbone_spec("efficientnet-lite0", (4, 7))
    m = build_model(spec, sigma=4.0)
    m.memory_bank = torch.randn(300, 120, generator=torch.Generator().manual_seed(3))
    imgs = _crops(2, seed=91, size=64)
    score, amap, desc = _forward_views(m, imgs, spec, 64, ((False, 0),))
    from models.patchcore.model import preprocess

    with torch.inference_mode():
        out = m(preprocess(imgs, 64, spec.mean, spec.std))
    assert amap.shape == (2, 64, 64) and desc.shape == (2, 40 + 80)
    assert torch.allclose(amap, out.anomaly_map[:, 0], atol=1e-5)
    assert torch.allclose(score, amap.new_tensor([float(out.anomaly_map[i].max()) for i in range(2)]), rtol=0.2)
    patch_max = m.nearest_neighbors(m.reshape_embedding(m.generate_embedding(
        {k: m.feature_pooler(v) for k, v in m.feature_extractor(preprocess(imgs, 64, spec.mean, spec.std)).items()})),
        1)[0].reshape(2, -1).amax(1)
    assert torch.allclose(score, patch_max, atol=1e-5)


@pytest.mark.parametrize("search_rows", [None, 300])
def test_test_time_views_one_search_equals_a_search_per_view(monkeypatch, search_rows):
    """All views of a few photos go to the nearest-neighbour search at once (or in queries of
    ``SEARCH_ROWS`` patches: 300 here splits them after every second view); the averaged map
    equals the one from a separate search per view, also for a non-square input (the
    transposed views have the other grid shape) and a batch larger than ``BATCH_SIZE``."""
    from models.patchcore import model as pc_model
    from models.patchcore.config import AUGMENTATIONS, BATCH_SIZE
    from models.patchcore.model import _views_forward

    if search_rows:
        monkeypatch.setattr(pc_model, "SEARCH_ROWS", search_rows)

    spec = backbone_spec("efficientnet-lite0", (4, 7))
    m = build_model(spec, sigma=4.0)
    m.memory_bank = torch.randn(300, 120, generator=torch.Generator().manual_seed(5))
    rng = np.random.default_rng(7)
    imgs = [rng.integers(0, 256, (72, 104, 3), dtype=np.uint8) for _ in range(BATCH_SIZE + 1)]
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    views = AUGMENTATIONS["dihedral"]
    score, pmap, amap, desc = _views_forward(m, x, views, relative=True)
    back = []
    with torch.inference_mode():
        for transpose, k in views:  # one search per view, the whole batch at once
            v = torch.rot90(x.transpose(2, 3) if transpose else x, k, dims=(2, 3))
            emb = m.generate_embedding({n: m.feature_pooler(f) for n, f in m.feature_extractor(v).items()})
            d = m.nearest_neighbors(m.reshape_embedding(emb), 1)[0].reshape(x.shape[0], *emb.shape[-2:])
            d = torch.rot90(d, -k, dims=(1, 2))
            back.append(d.transpose(1, 2) if transpose else d)
    ref = torch.stack(back).mean(0)
    ref = ref - ref.reshape(x.shape[0], -1).median(1).values.view(-1, 1, 1)
    assert pmap.shape == ref.shape == (BATCH_SIZE + 1, 9, 13)
    assert torch.allclose(pmap, ref, atol=1e-4)
    assert torch.allclose(score, ref.reshape(x.shape[0], -1).amax(1), atol=1e-4)
    assert amap.shape == (BATCH_SIZE + 1, 72, 104) and desc.shape == (BATCH_SIZE + 1, 40 + 80)


@pytest.mark.parametrize("mode", ["flips", "dihedral"])
def test_test_time_views_are_equivariant(tmp_path, mode):
    """With test-time views of a symmetry group, a mirrored / turned image gets the same score and
    the mirrored / turned anomaly map (the views are mapped back before they are averaged)."""
    store = PatchCoreStore(Settings.from_env(state_dir=tmp_path), coreset_ratio=0.05, image_size=64, augment="none",
                           tta=mode)
    store.fit("brick", _crops(3, seed=93, size=64), _crops(2, seed=94, size=64))
    meta = store.meta("brick")
    assert meta["tta"] == mode and meta["tta_views"] == {"flips": 4, "dihedral": 8}[mode]
    assert f"/tta-{mode}" in meta["model"] and "test-time views" in meta["image_score_rule"]
    img = _hole(_crops(1, seed=95, size=64)[0], (20, 40), radius=5)[0]
    base = store.inspect(img, "brick")
    for view in augment_views(img, mode)[1:]:
        r = store.inspect(view, "brick")
        assert r.score == pytest.approx(base.score, rel=1e-4)
    mirrored = store.inspect(np.ascontiguousarray(img[:, ::-1]), "brick")
    assert np.allclose(mirrored.anomaly_map, base.anomaly_map[:, ::-1], atol=1e-3 * base.anomaly_map.max())
    with pytest.raises(ValueError):
        PatchCoreStore(Settings.from_env(state_dir=tmp_path), tta="sideways")


def test_symmetry_choice_sets_bank_and_test_time_views(tmp_path):
    """A product fitted with a symmetry (UI / API choice) gets those bank and test-time views,
    recorded in meta.json; a mirrored photo then scores like the photo. Unknown names fail
    before any work."""
    from models.patchcore.config import SYMMETRIES

    store = PatchCoreStore(Settings.from_env(state_dir=tmp_path, patchcore_image_size=64, patchcore_coreset_ratio=0.05,
                                             **PLAIN))
    assert set(SYMMETRIES) == {"none", "mirror", "flips", "turns"}
    for name, (augment, tta) in SYMMETRIES.items():
        cfg = store.config_for("tile", name)
        assert (cfg.augment, cfg.tta, cfg.image_size) == (augment, tta, 64)
    assert store.config_for("tile") == store.config_for("tile", "none")  # untuned product: no views
    with pytest.raises(ValueError, match="symmetry"):
        store.config_for("tile", "sideways")
    with pytest.raises(ValueError, match="symmetry"):
        store.fit("tile", _crops(3, seed=81, size=64), _crops(2, seed=82, size=64), symmetry="sideways")
    assert store.products() == []

    store.fit("tile", _crops(3, seed=81, size=64), _crops(2, seed=82, size=64), symmetry="flips")
    meta = store.meta("tile")
    assert (meta["symmetry"], meta["augment"], meta["augment_views"], meta["tta"], meta["tta_views"]) == \
        ("flips", "flips", 4, "flips", 4)
    assert meta["n_patches"] == 3 * 4 * 8 * 8  # 3 images x 4 views x an 8 x 8 patch grid at 64 px
    img = _hole(_crops(1, seed=83, size=64)[0], (20, 40), radius=5)[0]
    base = store.inspect(img, "tile")
    flipped = store.inspect(np.ascontiguousarray(img[::-1]), "tile")
    assert flipped.score == pytest.approx(base.score, rel=1e-4)


def test_augment_views():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert [v.shape for v in augment_views(img, "none")] == [(2, 3, 3)]
    h = augment_views(img, "hflip")
    assert np.array_equal(h[1], img[:, ::-1])
    f = augment_views(img, "flips")
    assert np.array_equal(f[2], img[::-1]) and np.array_equal(f[3], img[::-1, ::-1])
    d = augment_views(img, "dihedral")
    assert len(d) == 8 and len({v.tobytes() + bytes(v.shape) for v in d}) == 8
    assert all(v.flags["C_CONTIGUOUS"] for v in d)
    with pytest.raises(ValueError):
        augment_views(img, "mirror")


def test_config_resolution(tmp_path, monkeypatch):
    """Constructor > non-zero setting > tuned per-product config > default; stored in meta.json."""
    import models.patchcore.config as pc

    monkeypatch.setitem(pc.PRODUCT_CONFIGS, "widget", PatchCoreConfig(blocks=(3, 5), image_size=96, augment="hflip"))
    store = PatchCoreStore(Settings.from_env(state_dir=tmp_path, patchcore_image_size=0, patchcore_coreset_ratio=0))
    assert store.config_for("widget") == PatchCoreConfig(blocks=(3, 5), image_size=96, augment="hflip")
    assert store.config_for("other") == DEFAULT_CONFIG
    store = PatchCoreStore(Settings.from_env(state_dir=tmp_path, patchcore_image_size=64, patchcore_coreset_ratio=0.05,
                                             **PLAIN))
    assert store.config_for("widget").image_size == 64 and store.config_for("widget").coreset_ratio == 0.05
    store = PatchCoreStore(Settings.from_env(state_dir=tmp_path, patchcore_image_size=64, patchcore_coreset_ratio=0.05,
                                             **PLAIN), image_size=80, reweight=False, score_norm="none")
    cfg = store.config_for("widget")
    assert (cfg.image_size, cfg.blocks, cfg.augment, cfg.reweight) == (80, (3, 5), "hflip", False)
    info = store.fit("widget", _crops(3, seed=71), _crops(2, seed=72))
    meta = store.meta("widget")
    assert meta["blocks"] == [3, 5] and meta["image_size"] == 80 and meta["augment_views"] == 2
    assert meta["reweight"] is False and "max patch distance" in meta["image_score_rule"]
    side = 80 // 8  # block 3: stride 8
    assert info["bank_size"] == int(3 * 2 * side * side * 0.05)  # 3 images x 2 views
    assert meta["model"].endswith("/aug-hflip")
    with pytest.raises(ValueError):
        PatchCoreStore(Settings.from_env(state_dir=tmp_path), augment="sideways")


def test_fold_bank_caps_each_calibration_fold(tmp_path):
    """With cross-fitted calibration each fold's coreset keeps at most ``fold_bank`` patches; the bank holds
    both folds and meta.json records the cap (gravel's 800 keeps its 8 test-time views' search small)."""
    import models.patchcore.config as pc
    from models.patchcore.model import config_from_meta

    assert pc.PRODUCT_CONFIGS["gravel"].fold_bank == 800 and DEFAULT_CONFIG.fold_bank == pc.MAX_FOLD_BANK
    settings = Settings.from_env(state_dir=tmp_path, patchcore_cross_fit=True, patchcore_acquisition_copies=0,
                                 patchcore_calibration_copies=0)
    store = PatchCoreStore(settings, image_size=64, coreset_ratio=0.5, augment="none", fold_bank=10)
    info = store.fit("brick", _crops(3, seed=121, size=64), _crops(2, seed=122, size=64))
    meta = store.meta("brick")
    assert info["bank_size"] == meta["bank_size"] == 20  # 3 x 64 and 2 x 64 patches x 0.5, each capped at 10
    assert meta["fold_bank"] == 10 and config_from_meta(meta).fold_bank == 10
    uncapped = PatchCoreStore(Settings.from_env(state_dir=tmp_path / "u", patchcore_cross_fit=True,
                                                patchcore_acquisition_copies=0, patchcore_calibration_copies=0),
                              image_size=64, coreset_ratio=0.05, augment="none")
    assert uncapped.fit("brick", _crops(3, seed=121, size=64), _crops(2, seed=122, size=64))["bank_size"] == 15  # 9 + 6
    legacy = dict(meta)
    legacy.pop("fold_bank")
    assert config_from_meta(legacy).fold_bank == pc.MAX_FOLD_BANK


def test_relative_score_is_the_distance_above_the_photos_median(tmp_path):
    """score_norm "median" (the default): each photo's patch map minus its own median patch distance;
    banks fitted before the setting (no ``score_norm`` in meta.json) keep the plain distance."""
    train, val = _crops(3, seed=111, size=96), _crops(2, seed=112, size=96)
    plain = PatchCoreStore(Settings.from_env(state_dir=tmp_path / "plain"), coreset_ratio=0.05, augment="none",
                           tta="hflip", score_norm="none")
    rel = PatchCoreStore(Settings.from_env(state_dir=tmp_path / "rel"), coreset_ratio=0.05, augment="none",
                         tta="hflip")
    assert DEFAULT_CONFIG.score_norm == "median"
    for store in (plain, rel):
        store.fit("brick", train, val)
    assert rel.meta("brick")["score_norm"] == "median" and rel.meta("brick")["model"].endswith("/relative")
    assert "median patch distance" in rel.meta("brick")["image_score_rule"]
    photo = _crops(1, seed=113, size=96)
    s_plain, _, _, pm_plain = plain.services.banks.get("brick").predict_maps(photo, patch_maps=True)
    s_rel, _, _, pm_rel = rel.services.banks.get("brick").predict_maps(photo, patch_maps=True)
    assert torch.allclose(pm_rel[0], pm_plain[0] - pm_plain[0].median(), atol=1e-4)
    assert float(s_rel[0]) == pytest.approx(float(s_plain[0] - pm_plain[0].median()), abs=1e-4)
    assert abs(float(pm_rel[0].median())) < 1e-5
    # the verdict compares like with like: the relative threshold is calibrated on relative scores
    assert rel.meta("brick")["threshold"] < plain.meta("brick")["threshold"]
    meta = dict(rel.meta("brick"))
    meta.pop("score_norm")
    from models.patchcore.model import config_from_meta

    assert config_from_meta(meta).score_norm == "none"
    with pytest.raises(ValueError, match="score_norm"):
        PatchCoreStore(Settings.from_env(state_dir=tmp_path / "x"), score_norm="mean")


def test_float16_bank_setting(tmp_path):
    settings = Settings.from_env(state_dir=tmp_path, patchcore_bank_dtype="float16")
    store = PatchCoreStore(settings, coreset_ratio=0.05, image_size=64, augment="none")
    train, val = _crops(3, seed=81), _crops(2, seed=82)
    store.fit("brick", train, val)
    assert np.load(settings.banks_dir / "brick" / "memory_bank.npy").dtype == np.float16
    assert store.meta("brick")["bank_dtype"] == "float16"
    r16 = store.inspect(val[0], "brick")
    r32 = PatchCoreStore(Settings.from_env(state_dir=tmp_path)).inspect(val[0], "brick")  # exact index, same fp16 values
    assert r16.score == pytest.approx(r32.score, rel=2e-3)


def test_calibration_without_defects_flags_no_normal():
    """anomalib's failure mode: normal-only validation set -> threshold = min score -> everything flagged."""
    rng = np.random.default_rng(0)
    normal = rng.normal(20.0, 0.8, size=30)
    thr, rule = calibrate_threshold(normal.tolist())
    assert (normal >= thr).sum() == 0 and thr > normal.min()
    assert thr == pytest.approx(max(normal.mean() + 3 * normal.std(), 1.05 * normal.max()))
    assert "normal-only" in rule
    thr2, rule2 = calibrate_threshold(normal.tolist(), (normal + 5).tolist())
    assert normal.max() < thr2 < normal.min() + 5 and "youden" in rule2


def test_separable_blur_equals_anomalib_blur():
    """Our two 1-D passes give anomalib's 2-D GaussianBlur2d (kornia kernel, reflect padding)."""
    from anomalib.models.components import GaussianBlur2d

    from models.patchcore.anomaly_map import SeparableGaussianBlur

    x = torch.rand(2, 1, 96, 80, generator=torch.Generator().manual_seed(0)) * 30
    for sigma in (1.0, 4.0, 8.0):
        k = 2 * int(4.0 * sigma + 0.5) + 1
        ref = GaussianBlur2d(kernel_size=(k, k), sigma=(sigma, sigma), channels=1)(x)
        out = SeparableGaussianBlur(sigma)(x)
        assert out.shape == ref.shape and (out - ref).abs().max() < 1e-3
    spec = backbone_spec("efficientnet-lite0", (4, 7))
    assert isinstance(build_model(spec, sigma=8.0).anomaly_map_generator.blur, SeparableGaussianBlur)
    assert not isinstance(build_model(spec, sigma=8.0, search="torch").anomaly_map_generator.blur,
                          SeparableGaussianBlur)



def test_onnxruntime_features_equal_eager_lite0():
    """ONNX Runtime block outputs = eager Lite0 (real weights) at any input size; same PatchCore scores."""
    from models.backbones import OnnxBlockFeatures, load_lite0

    onnx_fe = OnnxBlockFeatures((4, 7), pretrained=True)
    eager = load_lite0(blocks=(4, 7), pretrained=True)
    gen = torch.Generator().manual_seed(0)
    for shape in ((2, 3, 64, 64), (1, 3, 96, 80)):
        x = torch.randn(*shape, generator=gen)
        got, ref = onnx_fe(x), eager(x)
        assert sorted(got) == ["_blocks.4", "_blocks.7"]
        for b in (4, 7):
            assert got[f"_blocks.{b}"].shape == ref[f"block{b}"].shape
            assert (got[f"_blocks.{b}"] - ref[f"block{b}"]).abs().max() < 1e-3
    spec = backbone_spec("efficientnet-lite0", (4, 7))
    with pytest.raises(ValueError, match="runtime"):
        build_model(spec, runtime="tensorrt")
    fast, ref_model = build_model(spec, runtime="onnxruntime"), build_model(spec, runtime="torch")
    assert isinstance(fast.feature_extractor, OnnxBlockFeatures)
    assert not isinstance(ref_model.feature_extractor, OnnxBlockFeatures)
    bank = torch.randn(200, 120, generator=gen).abs()
    fast.memory_bank, ref_model.memory_bank = bank, bank.clone()
    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.inference_mode():
        a, b = fast(x), ref_model(x)
    assert (a.pred_score - b.pred_score).abs().max() < 1e-3 * b.pred_score.abs().max()
    assert (a.anomaly_map - b.anomaly_map).abs().max() < 1e-3 * b.anomaly_map.abs().max()


_REFIT_SCRIPT = """
import os, sys, time
import numpy as np
from skimage import data
from core.settings import Settings
from tests.bank_helpers import PatchCoreBanks
PAUSE = os.environ.get("TEST_PAUSE_AT")

def pause(stage):
    if PAUSE == stage:
        print(f"paused {stage}", flush=True)
        time.sleep(120)

real_replace = os.replace

def replace(src, dst):  # the bank swap: old folder moved away, then the new one in
    real_replace(src, dst)
    if ".old-" in os.path.basename(str(dst)):
        pause("swap")

os.replace = replace
rows = data.brick()[:320]
rng = np.random.default_rng(int(sys.argv[2]))
crops = []
for _ in range(8):
    y = int(rng.integers(0, 320 - 256 + 1)); x = int(rng.integers(0, rows.shape[1] - 256 + 1))
    crops.append(np.repeat(rows[y:y + 256, x:x + 256, None], 3, axis=2).astype(np.uint8))
from pathlib import Path
store = PatchCoreBanks(Settings.from_env(state_dir=Path(sys.argv[1])), coreset_ratio=0.01, image_size=128,
                       augment="none")
print("fitting", flush=True)
store.fit("brick", crops[:5], crops[5:], progress=lambda f, m: m.startswith("coreset") and pause("coreset"))
print("done", flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_refit_leaves_the_previous_bank_usable(tmp_path):
    """A real process is SIGKILLed (1) in the middle of a refit and (2) between moving
    the old bank away and the new one in; each time a new store serves the previous bank."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    settings = Settings.from_env(state_dir=tmp_path)
    store = PatchCoreStore(settings, coreset_ratio=0.01, image_size=128, augment="none")
    store.fit("brick", _crops(5, seed=61), _crops(3, seed=62))
    before = store.meta("brick")
    probe, _ = _hole(_crops(1, seed=63)[0], (128, 128))
    score_before = store.inspect(probe, "brick").score

    def run(seed: int, pause: str | None) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(repo)}
        env.pop("TEST_PAUSE_AT", None)
        if pause:
            env["TEST_PAUSE_AT"] = pause
        return subprocess.Popen([sys.executable, "-c", _REFIT_SCRIPT, str(tmp_path), str(seed)], cwd=repo,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def wait_for(proc: subprocess.Popen, line: str) -> None:
        deadline = time.time() + 240
        for out in proc.stdout:
            if out.strip() == line or time.time() > deadline:
                return
        raise AssertionError(f"subprocess ended before printing {line!r}")

    # (1) killed after feature extraction, before the coreset: the old folder was never touched
    proc = run(71, pause="coreset")
    wait_for(proc, "paused coreset")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    again = PatchCoreStore(settings)
    assert again.meta("brick") == before
    assert again.inspect(probe, "brick").score == pytest.approx(score_before, rel=1e-5)

    # (2) killed between the two renames: brick/ is gone, only .old-brick-* is left
    proc = run(72, pause="swap")
    wait_for(proc, "paused swap")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    left = sorted(p.name for p in settings.banks_dir.iterdir())
    assert "brick" not in left and any(n.startswith(".old-brick-") for n in left)
    recovered = PatchCoreStore(settings)  # recover() runs on open
    assert recovered.products() == ["brick"]
    assert recovered.meta("brick") == before
    assert recovered.inspect(probe, "brick").score == pytest.approx(score_before, rel=1e-5)
    assert sorted(p.name for p in settings.banks_dir.iterdir()) == ["brick"]

    # and a refit that is not interrupted still replaces the bank
    proc = run(73, pause=None)
    wait_for(proc, "done")
    proc.wait(60)
    assert PatchCoreStore(settings).meta("brick") != before
