"""PatchCore store: real EfficientNet-Lite0 features on real scikit-image brick crops.

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

from stores.patchcore import (
    BankNotFoundError,
    InspectionResult,
    PatchCoreStore,
    calibrate_threshold,
    coreset_sampler_class,
    find_regions,
    greedy_coreset_indices,
    save_artifacts,
)
from stores.settings import Settings

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


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _overlap(a: list[int], b: list[int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A store fitted on 20 real normal crops (coreset 1 %) with 6 val normals + 6 val defects."""
    state = tmp_path_factory.mktemp("pc_state")
    settings = Settings(state_dir=state)
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
    store = PatchCoreStore(settings, coreset_ratio=0.01)
    info = store.fit("brick", train, val_normal, val_defect, train_paths=paths,
                     progress=lambda f, m: events.append((f, m)))
    return {"settings": settings, "store": store, "info": info, "paths": paths, "events": events}


def test_fit_reports_bank_and_threshold(fitted):
    info = fitted["info"]
    side = fitted["store"].image_size // 8  # blocks 4, 7: patch grid at stride 8 of the resized input
    assert info["bank_size"] == int(20 * side * side * 0.01)  # 20 images x side^2 patches x 1 %
    assert info["threshold"] > 0 and info["pixel_threshold"] > 0
    assert info["image_auroc"] >= 0.9
    fracs = [f for f, _ in fitted["events"]]
    assert fracs == sorted(fracs) and fracs[-1] == 1.0
    assert fitted["store"].products() == ["brick"]
    folder = fitted["settings"].banks_dir / "brick"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["backbone"] == "efficientnet-lite0" and meta["blocks"] == [4, 7]
    assert meta["pool_size"] == fitted["store"].pool_size and meta["image_size"] == fitted["store"].image_size
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
        assert _overlap(top["bbox"], _bbox(mask)), (top, _bbox(mask))
        assert 0 < top["area_frac"] < 0.5
        # the anomaly map peaks inside (or right next to) the defect
        y, x = np.unravel_index(np.argmax(r.anomaly_map), r.anomaly_map.shape)
        near = np.zeros_like(mask)
        near[max(0, y - 12):y + 13, max(0, x - 12):x + 13] = True
        assert (near & mask).any()
    st = fitted["store"]
    assert results[3].model == f"patchcore/efficientnet-lite0[blocks 4,7]@{st.image_size}px/pool{st.pool_size}/coreset0.01"


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
            x0, y0, x1, y1 = reg["bbox"]
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
    settings = Settings(state_dir=tmp_path)
    store = PatchCoreStore(settings, coreset_ratio=0.01, image_size=128)  # small: this test is about files
    train, val = _crops(6, seed=31), _crops(3, seed=32)
    store.fit("brick", train, val)  # normal-only calibration
    meta1 = store.meta("brick")
    assert meta1["threshold"] >= max(meta1["val_normal_scores"]) and meta1["n_val_defect"] == 0
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
    from stores.anomaly_viz import _scale

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
    store = PatchCoreStore(Settings(state_dir=tmp_path))
    with pytest.raises(ValueError):
        store.fit("brick", [], _crops(2, seed=1))
    with pytest.raises(ValueError):
        store.fit("brick", _crops(2, seed=1), _crops(1, seed=2))
    with pytest.raises(ValueError):
        store.fit("../evil", _crops(2, seed=1), _crops(2, seed=2))
    assert store.products() == []


def test_fit_from_manifest_and_evaluate(tmp_path):
    """A tiny manifest in the data builder's format: fit, then image / pixel AUROC on val."""
    settings = Settings(state_dir=tmp_path / "state")
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


def test_find_regions_boxes():
    mask = np.zeros((100, 200), dtype=bool)
    mask[10:20, 30:60] = True
    mask[70:90, 150:190] = True
    mask[50, 5] = True  # a speck, dropped
    amap = mask.astype(np.float32)
    amap[75, 160] = 5.0
    regions = find_regions(mask, amap)
    assert [r["bbox"] for r in regions] == [[150, 70, 190, 90], [30, 10, 60, 20]]
    assert regions[0]["peak"] == 5.0 and regions[0]["area_frac"] == pytest.approx(800 / 20000)


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
