"""Tests for the sample-data builder (data/build.py) and defect synthesis (data/synth.py).

One full build runs per module, with scikit-image's photo loaders replaced by a
guard that hands out only rows 0-319 and raises on any other access, so the
same build also proves that the reserved rows 320-511 are never read.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image
from skimage.measure import regionprops

from data import acquisition, build, synth
from core.settings import DEFECT_TYPES, PRODUCTS

LIMIT = 320
NOTE_WORDS = {"scratch": ("scratch",), "crack": ("crack",), "hole": ("pit",), "stain": ("stain",),
              "contamination": ("particles", "fibre", "flake")}


class ReservedRowsError(AssertionError):
    """Raised when code touches a reserved row (>= 320) of a source photo."""


class RowGuardedPhoto:
    """Stand-in for a scikit-image photo that only gives out rows below ``limit``.

    Indexing is the only way to get pixels: the rows selected by the first index
    are computed (ints, negative ints, slices, arrays, Ellipsis) and any row
    >= ``limit`` raises; converting or iterating the whole photo raises too.
    """

    def __init__(self, photo: np.ndarray, limit: int = LIMIT):
        self._photo = photo
        self.limit = limit
        self.shape = photo.shape
        self.dtype = photo.dtype
        self.ndim = photo.ndim
        self.calls = 0
        self.max_row = -1

    def __getitem__(self, key):
        first = key[0] if isinstance(key, tuple) else key
        rows = np.atleast_1d(np.arange(self.shape[0])[first])
        self.calls += 1
        if rows.size and int(rows.max()) >= self.limit:
            raise ReservedRowsError(f"reserved row {int(rows.max())} read (index {key!r})")
        if rows.size:
            self.max_row = max(self.max_row, int(rows.max()))
        return self._photo[key]

    def __array__(self, *args, **kwargs):
        raise ReservedRowsError("the whole photo was converted to an array")

    def __iter__(self):
        raise ReservedRowsError("the whole photo was iterated row by row")


def _install_guards(mp) -> dict[str, list[RowGuardedPhoto]]:
    guards: dict[str, list[RowGuardedPhoto]] = {p: [] for p in PRODUCTS}
    for product in PRODUCTS:
        real = getattr(skimage.data, product)

        def loader(real=real, product=product):
            g = RowGuardedPhoto(real())
            guards[product].append(g)
            return g

        mp.setattr(skimage.data, product, loader)
    return guards


@pytest.fixture(scope="module")
def guarded_build(tmp_path_factory):
    """A full build (seed 0) made while every photo loader is row-guarded."""
    out = tmp_path_factory.mktemp("sample") / "data"
    events: list[tuple[float, str]] = []
    with pytest.MonkeyPatch.context() as mp:
        guards = _install_guards(mp)
        summary = build.build_sample_data(out, seed=0, progress=lambda f, m: events.append((f, m)))
    return {"out": out, "summary": summary, "guards": guards, "events": events,
            "manifest": build.load_manifest(out)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ the row rule

def test_guard_catches_reserved_access():
    g = RowGuardedPhoto(np.zeros((512, 512), np.uint8))
    assert g[:LIMIT].shape == (LIMIT, 512)
    assert g[319, 5] == 0
    for bad in (np.s_[300:340], np.s_[LIMIT], np.s_[-1], np.s_[:, 0], np.s_[...], np.s_[[0, 400]]):
        with pytest.raises(ReservedRowsError):
            g[bad]
    with pytest.raises(ReservedRowsError):
        np.asarray(g)


def test_full_build_never_reads_reserved_rows(guarded_build):
    for product in PRODUCTS:
        guards = guarded_build["guards"][product]
        assert guards, f"the build never loaded skimage.data.{product}: the guard was bypassed"
        assert all(g.calls >= 1 for g in guards)
        assert max(g.max_row for g in guards) == LIMIT - 1


def test_regions_are_disjoint_and_inside_the_allowed_rows():
    cover = np.zeros((LIMIT, 512), np.int8)
    for name, ((r0, r1), (c0, c1)) in build.REGIONS.items():
        assert 0 <= r0 < r1 <= LIMIT and 0 <= c0 < c1 <= 512, name
        cover[r0:r1, c0:c1] += 1
    assert cover.max() == 1, "the bank, tune and unseen regions overlap"
    rows = build.source_rows("gravel")
    (r0, r1), (c0, c1) = build.REGIONS["unseen"]
    assert np.array_equal(build.region("gravel", "unseen"), rows[r0:r1, c0:c1])
    with pytest.raises(ValueError, match="unknown region"):
        build.region("gravel", "everything")


def test_each_split_reads_only_its_region(guarded_build):
    """Train photos come from the bank region, val / gallery from the tune region, unseen from the unseen
    region: no fit, bank, gallery, metric or threshold sees an unseen pixel."""
    where = {"train": "bank", "val": "tune", "gallery": "tune", "unseen": "unseen"}
    for it in guarded_build["manifest"]["items"]:
        (r0, r1), (c0, c1) = build.REGIONS[where[it["split"]]]
        y0, y1 = it["crop"]["rows"]
        x0, x1 = it["crop"]["cols"]
        assert 0 <= y0 < y1 <= r1 - r0 and 0 <= x0 < x1 <= c1 - c0, it["id"]
        if it["split"] in ("train", "unseen"):
            assert it["crop"]["region"] == where[it["split"]]


def test_off_by_one_would_be_caught(monkeypatch):
    """The same guard fails a build whose accessor reads one row too many."""
    _install_guards(monkeypatch)
    monkeypatch.setattr(build, "SOURCE_ROWS", LIMIT + 1)
    with pytest.raises(ReservedRowsError):
        build.source_rows("brick")


@pytest.mark.parametrize("product", PRODUCTS)
def test_source_rows_are_rows_0_to_319(product):
    rows = build.source_rows(product)
    assert rows.shape == (LIMIT, 512) and rows.dtype == np.uint8
    assert np.array_equal(rows, getattr(skimage.data, product)()[:LIMIT])


def test_source_rows_unknown_product():
    with pytest.raises(ValueError, match="unknown sample product"):
        build.source_rows("marble")


# ------------------------------------------------------------------ layout and counts

def test_counts_per_split_and_defect(guarded_build):
    items = guarded_build["manifest"]["items"]
    summary = guarded_build["summary"]
    assert len({it["id"] for it in items}) == len(items)
    for product in PRODUCTS:
        mine = [it for it in items if it["product"] == product]
        train = [it for it in mine if it["split"] == "train"]
        assert len(train) >= 80 and all(it["label"] == "good" for it in train)
        assert sum(it["split"] == "val" and it["label"] == "good" for it in mine) == 30
        for d in DEFECT_TYPES:
            assert sum(it["split"] == "val" and it["defect_type"] == d for it in mine) == 8
            assert sum(it["split"] == "gallery" and it["defect_type"] == d for it in mine) >= 8
        c = summary["products"][product]
        assert (c["train"], c["val_good"], c["val_defect"]) == (len(train), 30, 40)
        assert c["gallery"] == sum(it["split"] == "gallery" for it in mine)
        assert (c["unseen_good"], c["unseen_defect"]) == (build.N_UNSEEN_GOOD, 5 * build.N_UNSEEN_PER_DEFECT)
        unseen = [it for it in mine if it["split"] == "unseen" and it["label"] == "defect"]
        assert all(it["generator"] == "data.holdout_synth" for it in unseen)
        assert all(it["generator"] == "data.synth" for it in mine if it["split"] in ("val", "gallery")
                   and it["label"] == "defect")
    assert summary["cached"] is False and summary["elapsed_s"] > 0


def test_layout_paths_and_fields(guarded_build):
    out, manifest = guarded_build["out"], guarded_build["manifest"]
    assert (manifest["version"], manifest["seed"], manifest["image_size"]) == (build.VERSION, 0, 256)
    assert "brick-train-000" in {it["id"] for it in manifest["items"]}
    for it in manifest["items"]:
        assert not Path(it["image"]).is_absolute() and (out / it["image"]).is_file()
        folder = "good" if it["label"] == "good" else it["defect_type"]
        assert it["image"].startswith(f"{it['product']}/{it['split']}/{folder}/")
        if it["label"] == "good":
            assert it["defect_type"] is None and it["mask"] is None and it["bbox"] is None
        else:
            assert it["defect_type"] in DEFECT_TYPES and it["split"] in ("val", "gallery", "unseen")
            assert it["mask"] == it["image"][:-4] + "_mask.png" and (out / it["mask"]).is_file()
            if it["split"] != "unseen":
                assert any(w in it["note"] for w in NOTE_WORDS[it["defect_type"]]), (it["id"], it["note"])
    assert [(m["product"], m["lang"]) for m in manifest["manuals"]] == [
        ("brick", "en"), ("brick", "ko"), ("gravel", "en"), ("grass", "en")]
    for m in manifest["manuals"]:
        assert m["path"] == f"manuals/{m['product']}_manual_{m['lang']}.pdf" and (out / m["path"]).is_file()
    assert not list(out.parent.glob(".data.*")), "temporary build folders were left behind"


def test_image_sizes_per_split(guarded_build):
    """Val / gallery: 256 px crops; train: native-scale windows of the bank region; unseen: native-scale
    photos smaller than the crops (128 px tall), half of them gray, with acquisition changes."""
    out = guarded_build["out"]
    grays, changes = [], set()
    for it in guarded_build["manifest"]["items"]:
        with Image.open(out / it["image"]) as im:
            assert im.mode == "RGB", it["id"]
            w, h = im.size
            arr = np.asarray(im)
        if it["split"] in ("val", "gallery"):
            assert (w, h) == (256, 256), it["id"]
            assert 1.0 <= it["crop"]["scale"] <= 1.2
        elif it["split"] == "train":
            if it["crop"]["rot90"] % 2:  # gravel's 90-degree turns swap the sides
                h, w = w, h
            assert build.TRAIN_HEIGHTS[0] <= h <= build.TRAIN_HEIGHTS[1], it["id"]
            assert build.TRAIN_WIDTHS[0] <= w <= build.TRAIN_WIDTHS[1], it["id"]
        else:
            assert [h, w] == it["size"] and max(h, w) < 256, it["id"]
            assert 1 <= len(it["crop"]["acquisition"]) <= 3
            changes |= set(it["crop"]["acquisition"])
            grays.append(bool(np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])))
    assert 0.4 <= np.mean(grays) <= 0.85  # half raw gray photos, plus colour photos turned gray by "gray"
    assert changes == set(acquisition.ACQUISITION_CHANGES)


def test_masks_binary_nonempty_and_match_bbox(guarded_build):
    out = guarded_build["out"]
    for it in guarded_build["manifest"]["items"]:
        if it["mask"] is None:
            continue
        mask = np.asarray(Image.open(out / it["mask"]))
        with Image.open(out / it["image"]) as im:
            assert mask.shape == im.size[::-1] and mask.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 255}, it["id"]
        ys, xs = np.nonzero(mask)
        assert it["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], it["id"]


def test_brick_never_rotated_or_flipped_vertically(guarded_build):
    crops = [it["crop"] for it in guarded_build["manifest"]["items"] if it["product"] == "brick"
             and it["split"] != "unseen"]
    assert all(c["rot90"] == 0 and not c["vflip"] for c in crops)
    assert any(c["hflip"] for c in crops) and not all(c["hflip"] for c in crops)
    assert all(0 <= c["rows"][0] < c["rows"][1] <= LIMIT for c in crops)


def test_progress_reported(guarded_build):
    fracs = [f for f, _ in guarded_build["events"]]
    assert fracs == sorted(fracs) and fracs[-1] == 1.0 and len(fracs) >= 4


# ------------------------------------------------------------------ determinism, idempotence, atomicity

def test_same_seed_same_files(guarded_build, tmp_path):
    first = guarded_build["out"]
    second = tmp_path / "again"
    build.build_sample_data(second, seed=0)
    m1, m2 = guarded_build["manifest"], build.load_manifest(second)
    assert m1["items"] == m2["items"]
    for it in m1["items"][::7]:
        assert _sha(first / it["image"]) == _sha(second / it["image"]), it["id"]
        if it["mask"]:
            assert _sha(first / it["mask"]) == _sha(second / it["mask"]), it["id"]


def test_other_seed_other_images():
    rows = build.region("gravel", "tune")
    a, _ = build.random_crop(rows, build._item_rng(0, "gravel", "val", "crack", 0), "gravel")
    b, _ = build.random_crop(rows, build._item_rng(1, "gravel", "val", "crack", 0), "gravel")
    assert not np.array_equal(a, b)


def test_rebuild_is_skipped_when_manifest_matches(guarded_build):
    out = guarded_build["out"]
    before = (out / "manifest.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    summary = build.build_sample_data(out, seed=0)
    assert time.perf_counter() - t0 < 5.0
    assert summary["cached"] is True and summary["products"] == guarded_build["summary"]["products"]
    assert (out / "manifest.json").stat().st_mtime_ns == before


def test_failed_build_keeps_previous_data(guarded_build, monkeypatch):
    out = guarded_build["out"]
    before = (out / "manifest.json").read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(build, "_build_product", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build.build_sample_data(out, seed=0, force=True)
    assert (out / "manifest.json").read_bytes() == before
    assert not list(out.parent.glob(".data.*"))


def test_load_manifest_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="cli.py build"):
        build.load_manifest(tmp_path / "nothing")


def test_load_manifest_parses(guarded_build):
    assert build.load_manifest(guarded_build["out"]) == json.loads(
        (guarded_build["out"] / "manifest.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------ variety of defects

def test_defects_vary_in_size_position_contrast(guarded_build):
    out = guarded_build["out"]
    items = [it for it in guarded_build["manifest"]["items"] if it["mask"] and it["split"] != "unseen"]
    contrasts = set()
    for d in DEFECT_TYPES:
        mine = [it for it in items if it["defect_type"] == d]
        areas = [int((np.asarray(Image.open(out / it["mask"])) > 0).sum()) for it in mine]
        assert max(areas) >= 4 * min(areas), (d, min(areas), max(areas))
        cx = [(it["bbox"][0] + it["bbox"][2]) / 2 for it in mine]
        cy = [(it["bbox"][1] + it["bbox"][3]) / 2 for it in mine]
        assert np.ptp(cx) > 100 and np.ptp(cy) > 100, d
        words = {re.search(r"(low|medium|high) contrast", it["note"]).group(0) for it in mine}
        assert len(words) >= 2, (d, words)
        contrasts |= words
        assert len({it["note"] for it in mine}) >= 0.9 * len(mine), f"{d} notes repeat"
    assert "low contrast" in contrasts


@pytest.mark.parametrize("defect", ["scratch", "crack"])
def test_linear_defects_span_orientations(guarded_build, defect):
    out = guarded_build["out"]
    angles = []
    for it in guarded_build["manifest"]["items"]:
        if it["defect_type"] == defect and it["split"] != "unseen":
            mask = np.asarray(Image.open(out / it["mask"])) > 0
            props = max(regionprops(mask.astype(np.uint8)), key=lambda p: p.area)
            if props.eccentricity > 0.9:
                angles.append(np.degrees(props.orientation))
    assert len(angles) >= 20
    hist, _ = np.histogram(angles, bins=4, range=(-90, 90))
    assert (hist > 0).all(), hist


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_mask_is_the_changed_pixels(defect):
    rows = build.source_rows("grass")
    for i in range(4):
        rng = np.random.default_rng(100 + i)
        clean, _ = build.random_crop(rows, rng, "grass")
        d = synth.synthesize(defect, clean, rng, "grass")
        assert d.image.shape == clean.shape and d.image.dtype == np.uint8
        diff = np.abs(d.image.astype(int) - clean.astype(int)).max(axis=2)
        inside = d.mask > 0
        assert inside.sum() >= synth.MIN_AREA
        assert diff[inside].min() >= synth.MIN_DELTA
        assert diff[~inside].mean() < 1.0
        assert diff[~inside].max() < np.percentile(diff[inside], 99)
        x0, y0, x1, y1 = d.bbox
        assert inside[y0:y1, x0:x1].sum() == inside.sum()


def test_synthesize_rejects_bad_input():
    with pytest.raises(ValueError):
        synth.synthesize("crack", np.zeros((64, 64), np.uint8), np.random.default_rng(0))
    with pytest.raises(KeyError):
        synth.synthesize("dent", np.zeros((64, 64, 3), np.uint8), np.random.default_rng(0))
