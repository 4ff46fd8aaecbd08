"""Build the sample data set: texture crops, synthesized defects with masks, manual PDFs.

Source: scikit-image's texture photographs ``skimage.data.brick()``,
``gravel()`` and ``grass()`` (512×512 uint8 grayscale). Only rows 0-319 of each
photo may ever be read (rows 320-511 are reserved for external evaluation);
:func:`source_rows` is the single accessor that loads a photo and slices it at
once, and nothing else touches the full photo.

The allowed rows are split into three disjoint regions (issue 15, :data:`REGIONS`,
:func:`region`):

* ``bank`` (rows 0-191, columns 256-511): the normal photos of the ``train`` split, the
  only images a memory bank (or a detector) is fitted on;
* ``tune`` (rows 0-319, columns 0-255): the ``val`` split (the tuning split: normals that
  calibrate thresholds, defects of the training generator :mod:`data.synth`) and the
  ``gallery``. Its texture is not in the bank, so calibration sees what a new part
  looks like rather than a memorised one;
* ``unseen`` (rows 192-319, columns 256-511): only the ``unseen`` evaluation split, kept
  out of every fit, bank, gallery, metric and threshold: defects drawn by the independent
  second generator (:mod:`data.holdout_synth`), native-scale photos smaller than the
  training crops (128 px tall, 128-192 px wide), half of them raw gray photos, with the
  acquisition changes of :mod:`data.acquisition` applied to normals and defects alike.

Layout under ``out_dir`` (paths in ``manifest.json`` are relative to it)::

    manifest.json
    {product}/train/good/NNN.png                    N_TRAIN normal photos (bank region, native scale)
    {product}/val/good/NNN.png                      N_VAL_GOOD normal crops (tuning split)
    {product}/val/{defect}/NNN.png + NNN_mask.png   N_VAL_PER_DEFECT per defect type (data.synth)
    {product}/gallery/{defect}/NNN.png + _mask.png  N_GALLERY_PER_DEFECT per defect type (data.synth)
    {product}/unseen/good/NNN.png                   N_UNSEEN_GOOD normal photos (unseen region)
    {product}/unseen/{defect}/NNN.png + _mask.png   N_UNSEEN_PER_DEFECT per type (data.holdout_synth)
    manuals/{product}_manual_en.pdf, manuals/brick_manual_ko.pdf

Train photos are native-scale windows of the bank region (160-192 × 160-256 px, palette,
jitter and flips as below; the fit adds the acquisition changes). Val / gallery crops are
256×256 RGB: a random square of 213-256 px of the tune region resized to 256 (the
camera's scale 1.0-1.2× native, ``SCALE_RANGE`` capped by the region's width), flipped (horizontal only for brick, whose courses must stay horizontal;
horizontal/vertical and 90° turns for the isotropic gravel), jittered in brightness,
contrast and gamma, coloured with a product palette (monotonic in the photo's gray
level, so the texture is the photo's) and given slight sensor noise. Val (tuning) normals
and defects then get 0-2 acquisition changes (blur, sharpen, exposure, gamma, gray, JPEG,
noise; ``VAL_CHANGES``). Every item has its own RNG derived from
``(seed, product, split, class, index)``, so the build is deterministic.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from core.settings import DEFECT_TYPES, PRODUCTS, get_settings
from data import acquisition, holdout_synth, synth
from data.manuals import write_manuals

VERSION = 2
IMAGE_SIZE = 256
SOURCE_ROWS = 320  # rows 0..319 may be read; rows 320..511 are reserved
#: disjoint regions of the allowed rows, ``name -> ((row0, row1), (col0, col1))`` (end-exclusive)
REGIONS = {
    "bank": ((0, 192), (256, 512)),    # train normals: what banks and detectors are fitted on
    "tune": ((0, 320), (0, 256)),      # val (tuning + calibration) and gallery
    "unseen": ((192, 320), (256, 512)),  # the unseen evaluation split only
}
#: magnification of val / gallery crops relative to the photo's native scale (capped by the region)
SCALE_RANGE = (0.8, 1.2)
#: train photo sides (px, inclusive): native-scale windows of the bank region
TRAIN_HEIGHTS = (160, 192)
TRAIN_WIDTHS = (160, 256)
N_TRAIN = 80
N_VAL_GOOD = 30
N_VAL_PER_DEFECT = 8
N_GALLERY_PER_DEFECT = 10
N_UNSEEN_GOOD = 60
N_UNSEEN_PER_DEFECT = 12
#: side range (px, inclusive) of the unseen split's native-scale photos (height and width drawn apart,
#: capped by the region: 128 px tall)
UNSEEN_SIDES = (128, 192)
#: fraction of unseen photos that are the raw gray photo (a monochrome camera); the rest are palette-coloured
UNSEEN_GRAY_FRACTION = 0.5
#: acquisition changes of val (tuning) and gallery items: 0-2 of these (the crop already varies the scale)
VAL_CHANGES = ("blur", "sharpen", "exposure", "gamma", "gray", "jpeg", "noise")
VAL_N_CHANGES = (0, 2)
#: acquisition changes of unseen items: 1-3 of all changes, scale included
UNSEEN_N_CHANGES = (1, 3)

# gray level (0..255) -> RGB palette stops per product
_PALETTES = {
    "brick": ([0, 100, 255], [(38, 16, 10), (150, 68, 46), (228, 220, 206)]),
    "gravel": ([0, 128, 255], [(18, 18, 16), (130, 126, 117), (238, 235, 228)]),
    "grass": ([0, 120, 255], [(8, 22, 4), (78, 118, 38), (205, 228, 160)]),
}
_SPLIT_CODE = {"train": 0, "val": 1, "gallery": 2, "unseen": 3}
_CLASS_CODE = {"good": 0, **{d: i + 1 for i, d in enumerate(DEFECT_TYPES)}}


def source_rows(product: str) -> np.ndarray:
    """Rows 0-319 of the product's scikit-image photo: ``(320, 512)`` uint8 (a copy).

    The only place the project reads a source photo: the loader's result is
    sliced to ``[:SOURCE_ROWS]`` immediately and copied, so rows 320-511 are
    never indexed. The loader is looked up on ``skimage.data`` at call time.

    Raises:
        ValueError: unknown product, or the photo is not 2-D uint8 with ≥ 320 rows.
    """
    import skimage.data

    if product not in PRODUCTS:
        raise ValueError(f"unknown sample product {product!r}; expected one of {', '.join(PRODUCTS)}")
    photo = getattr(skimage.data, product)()
    rows = np.array(photo[:SOURCE_ROWS], dtype=np.uint8, copy=True)
    del photo
    if rows.ndim != 2 or rows.shape[0] != SOURCE_ROWS:
        raise ValueError(f"skimage.data.{product}() gave rows of shape {rows.shape}, expected ({SOURCE_ROWS}, W)")
    return rows


def region(product: str, name: str) -> np.ndarray:
    """One of the disjoint :data:`REGIONS` of a product's allowed rows: uint8 ``(h, w)`` copy.

    Raises:
        ValueError: unknown product (see :func:`source_rows`) or region name.
    """
    if name not in REGIONS:
        raise ValueError(f"unknown region {name!r}; expected one of {', '.join(REGIONS)}")
    (r0, r1), (c0, c1) = REGIONS[name]
    return np.ascontiguousarray(source_rows(product)[r0:r1, c0:c1])


def _item_rng(seed: int, product: str, split: str, cls: str, index: int) -> np.random.Generator:
    key = [int(seed), PRODUCTS.index(product), _SPLIT_CODE[split], _CLASS_CODE[cls], int(index)]
    return np.random.default_rng(np.random.SeedSequence(key))


def colourize(gray: np.ndarray, rng: np.random.Generator, product: str) -> np.ndarray:
    """Palette-coloured RGB of a gray texture: ``(H, W)`` float/uint8 0-255 -> ``(H, W, 3)`` float32.

    The product's palette (monotonic in the gray level) with a ±2.5 % per-channel jitter.
    """
    stops, colours = _PALETTES[product]
    colours = np.asarray(colours, np.float32) * rng.uniform(0.975, 1.025, size=(1, 3)).astype(np.float32)
    g = np.asarray(gray, np.float32)
    return np.stack([np.interp(g, stops, colours[:, c]) for c in range(3)], axis=-1).astype(np.float32)


def random_crop(rows: np.ndarray, rng: np.random.Generator, product: str) -> tuple[np.ndarray, dict]:
    """One augmented ``(256, 256, 3)`` uint8 crop of a region, and a dict describing it.

    A random square of ``256 / f`` px (``f`` uniform in :data:`SCALE_RANGE`, capped by the
    region's size) resized to 256 with Lanczos, flips / turns allowed for the product,
    brightness / contrast / gamma jitter, the product palette and slight sensor noise.

    Args:
        rows: ``(H, W)`` uint8 gray region (the ``tune`` region; ``H, W >= 214``).
        rng: seeded generator.
        product: product id (picks the palette and the allowed flips).
    """
    h, w = rows.shape
    lo = int(np.ceil(IMAGE_SIZE / SCALE_RANGE[1]))
    hi = min(h, w, int(IMAGE_SIZE / SCALE_RANGE[0]))
    size = int(rng.integers(lo, hi + 1))
    y0 = int(rng.integers(0, h - size + 1))
    x0 = int(rng.integers(0, w - size + 1))
    patch = rows[y0 : y0 + size, x0 : x0 + size]
    if size != IMAGE_SIZE:
        patch = np.asarray(Image.fromarray(patch).resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS))
    g = patch.astype(np.float32)
    hflip = bool(rng.random() < 0.5)
    vflip = product != "brick" and bool(rng.random() < 0.5)
    rot = int(rng.integers(0, 4)) if product == "gravel" else 0
    if hflip:
        g = g[:, ::-1]
    if vflip:
        g = g[::-1, :]
    if rot:
        g = np.rot90(g, rot)
    contrast = float(rng.uniform(0.9, 1.1))
    brightness = float(rng.uniform(-10, 10))
    gamma = float(rng.uniform(0.9, 1.1))
    mean = float(g.mean())
    g = np.clip((g - mean) * contrast + mean + brightness, 0, 255)
    g = 255.0 * (g / 255.0) ** gamma
    rgb = colourize(g, rng, product)
    noise = float(rng.uniform(0, 2.0))
    rgb = rgb + rng.normal(0, noise, size=rgb.shape) if noise > 0 else rgb
    img = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    info = {"region": "tune", "rows": [y0, y0 + size], "cols": [x0, x0 + size], "scale": round(IMAGE_SIZE / size, 4),
            "hflip": hflip, "vflip": vflip, "rot90": rot,
            "brightness": round(brightness, 2), "contrast": round(contrast, 3), "gamma": round(gamma, 3)}
    return np.ascontiguousarray(img), info


def native_photo(rows: np.ndarray, rng: np.random.Generator, product: str, heights: tuple[int, int],
                 widths: tuple[int, int], gray_fraction: float, flips: bool = False) -> tuple[np.ndarray, dict]:
    """One native-scale photo of a region (no resizing): ``(h, w, 3)`` uint8 and a dict describing it.

    ``h`` / ``w`` are drawn apart from ``heights`` / ``widths`` (inclusive, capped by the
    region); with probability ``gray_fraction`` the photo is the raw gray photo (three equal
    channels), else palette-coloured (:func:`colourize`). With ``flips`` the product's
    symmetry flips of :func:`random_crop` and its brightness / contrast / gamma jitter and
    slight noise are applied too (the train photos).

    Args:
        rows: ``(H, W)`` uint8 gray region (:func:`region`).
    """
    h = min(int(rng.integers(heights[0], heights[1] + 1)), rows.shape[0])
    w = min(int(rng.integers(widths[0], widths[1] + 1)), rows.shape[1])
    y0 = int(rng.integers(0, rows.shape[0] - h + 1))
    x0 = int(rng.integers(0, rows.shape[1] - w + 1))
    g = rows[y0:y0 + h, x0:x0 + w].astype(np.float32)
    info: dict = {"rows": [y0, y0 + h], "cols": [x0, x0 + w], "scale": 1.0}
    if flips:
        hflip = bool(rng.random() < 0.5)
        vflip = product != "brick" and bool(rng.random() < 0.5)
        rot = int(rng.integers(0, 4)) if product == "gravel" else 0
        g = g[:, ::-1] if hflip else g
        g = g[::-1, :] if vflip else g
        g = np.rot90(g, rot) if rot else g
        contrast, brightness, gamma = float(rng.uniform(0.9, 1.1)), float(rng.uniform(-10, 10)), float(rng.uniform(0.9, 1.1))
        mean = float(g.mean())
        g = 255.0 * (np.clip((g - mean) * contrast + mean + brightness, 0, 255) / 255.0) ** gamma
        info.update({"hflip": hflip, "vflip": vflip, "rot90": rot, "brightness": round(brightness, 2),
                     "contrast": round(contrast, 3), "gamma": round(gamma, 3)})
    gray = bool(rng.random() < gray_fraction)
    if gray:
        img = np.repeat(np.clip(np.round(g), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    else:
        rgb = colourize(g, rng, product)
        if flips:
            rgb = rgb + rng.normal(0, float(rng.uniform(0, 2.0)), size=rgb.shape)
        img = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    info["gray"] = gray
    return np.ascontiguousarray(img), info


def _save_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, compress_level=1)


def _build_product(product: str, out: Path, seed: int) -> list[dict]:
    items: list[dict] = []

    def changed(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
        return acquisition.random_acquisition(img, rng, n_changes=VAL_N_CHANGES, changes=VAL_CHANGES)

    def train(rows: np.ndarray) -> None:
        for i in range(N_TRAIN):
            rng = _item_rng(seed, product, "train", "good", i)
            img, info = native_photo(rows, rng, product, TRAIN_HEIGHTS, TRAIN_WIDTHS, 0.0, flips=True)
            info["region"] = "bank"
            rel = f"{product}/train/good/{i:03d}.png"
            _save_png(img, out / rel)
            items.append({"id": f"{product}-train-{i:03d}", "product": product, "split": "train", "label": "good",
                          "defect_type": None, "image": rel, "mask": None, "bbox": None,
                          "note": f"normal {product} surface, no defect", "crop": info})

    def good(rows: np.ndarray, split: str, n: int) -> None:
        for i in range(n):
            rng = _item_rng(seed, product, split, "good", i)
            img, info = random_crop(rows, rng, product)
            img, info["acquisition"] = changed(img, rng)
            rel = f"{product}/{split}/good/{i:03d}.png"
            _save_png(img, out / rel)
            items.append({"id": f"{product}-{split}-good-{i:03d}", "product": product, "split": split, "label": "good",
                          "defect_type": None, "image": rel, "mask": None, "bbox": None,
                          "note": f"normal {product} surface, no defect", "crop": info})

    def defects(rows: np.ndarray, split: str, n: int) -> None:
        for defect in DEFECT_TYPES:
            for i in range(n):
                rng = _item_rng(seed, product, split, defect, i)
                clean, info = random_crop(rows, rng, product)
                d = synth.synthesize(defect, clean, rng, product)
                img, info["acquisition"] = changed(d.image, rng)
                rel = f"{product}/{split}/{defect}/{i:03d}.png"
                rel_mask = f"{product}/{split}/{defect}/{i:03d}_mask.png"
                _save_png(img, out / rel)
                _save_png(d.mask, out / rel_mask)
                items.append({"id": f"{product}-{split}-{defect}-{i:03d}", "product": product, "split": split,
                              "label": "defect", "defect_type": defect, "image": rel, "mask": rel_mask,
                              "bbox": d.bbox, "note": d.note, "crop": info, "generator": "data.synth"})

    def unseen(rows: np.ndarray) -> None:
        for cls in ("good", *DEFECT_TYPES):
            for i in range(N_UNSEEN_GOOD if cls == "good" else N_UNSEEN_PER_DEFECT):
                rng = _item_rng(seed, product, "unseen", cls, i)
                clean, info = native_photo(rows, rng, product, UNSEEN_SIDES, UNSEEN_SIDES, UNSEEN_GRAY_FRACTION)
                info["region"] = "unseen"
                mask = None
                if cls != "good":
                    clean, mask = holdout_synth.draw_defect(clean, cls, rng)
                img, mask, info["acquisition"] = acquisition.acquire(clean, rng, mask=mask,
                                                                     n_changes=UNSEEN_N_CHANGES)
                rel = f"{product}/unseen/{cls}/{i:03d}.png"
                item = {"id": f"{product}-unseen-{cls}-{i:03d}", "product": product, "split": "unseen",
                        "label": "good" if cls == "good" else "defect", "defect_type": None if cls == "good" else cls,
                        "image": rel, "mask": None, "bbox": None, "note": "", "crop": info,
                        "size": [int(img.shape[0]), int(img.shape[1])]}
                if mask is not None:
                    m8 = mask.astype(np.uint8) * 255
                    item["mask"] = f"{product}/unseen/{cls}/{i:03d}_mask.png"
                    item["bbox"] = synth.mask_bbox(m8)
                    item["generator"] = "data.holdout_synth"
                    _save_png(m8, out / item["mask"])
                _save_png(img, out / rel)
                items.append(item)

    train(region(product, "bank"))
    tune = region(product, "tune")
    good(tune, "val", N_VAL_GOOD)
    defects(tune, "val", N_VAL_PER_DEFECT)
    defects(tune, "gallery", N_GALLERY_PER_DEFECT)
    unseen(region(product, "unseen"))
    return items


def _summary(manifest: dict, out_dir: Path, elapsed: float, cached: bool) -> dict:
    products: dict[str, dict] = {}
    for it in manifest["items"]:
        c = products.setdefault(it["product"], {"train": 0, "val_good": 0, "val_defect": 0, "gallery": 0,
                                                 "unseen_good": 0, "unseen_defect": 0,
                                                 "by_defect": {d: {"val": 0, "gallery": 0, "unseen": 0}
                                                               for d in DEFECT_TYPES}})
        if it["split"] == "train":
            c["train"] += 1
        elif it["split"] == "unseen":
            c["unseen_good" if it["label"] == "good" else "unseen_defect"] += 1
            if it["label"] == "defect":
                c["by_defect"][it["defect_type"]]["unseen"] += 1
        elif it["label"] == "good":
            c["val_good"] += 1
        else:
            c["val_defect" if it["split"] == "val" else "gallery"] += 1
            c["by_defect"][it["defect_type"]][it["split"]] += 1
    return {"products": products, "manuals": [m["path"] for m in manifest["manuals"]],
            "elapsed_s": round(elapsed, 3), "data_dir": str(out_dir), "cached": cached}


def _is_complete(manifest: dict, out_dir: Path) -> bool:
    paths = [m["path"] for m in manifest.get("manuals", [])]
    for it in manifest.get("items", []):
        paths.append(it["image"])
        if it.get("mask"):
            paths.append(it["mask"])
    return bool(paths) and all((out_dir / p).is_file() for p in paths)


def build_sample_data(out_dir: Path | None = None, seed: int = 0, force: bool = False,
                      progress: Callable[[float, str], None] | None = None) -> dict:
    """Write the sample data set under ``out_dir`` and return a summary.

    Idempotent: if ``out_dir/manifest.json`` exists with the same version, seed
    and image size, and every file it lists exists, nothing is rebuilt (unless
    ``force``). The set is built in a temporary sibling folder and renamed into
    place, so readers never see a half-written ``out_dir``.

    Args:
        out_dir: target folder; defaults to ``get_settings().data_dir``.
        seed: master seed; the same seed gives identical images and masks.
        force: rebuild even when a matching manifest exists.
        progress: optional callback ``progress(fraction in [0, 1], message)``.

    Returns:
        ``{"products": {product: {"train", "val_good", "val_defect", "gallery", "by_defect"}},
        "manuals": [relative pdf paths], "elapsed_s": float, "data_dir": str, "cached": bool}``.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir if out_dir is not None else get_settings().data_dir).resolve()
    report = progress or (lambda frac, msg: None)
    if not force and (out_dir / "manifest.json").is_file():
        try:
            manifest = load_manifest(out_dir)
        except (OSError, ValueError):
            manifest = None
        if (manifest and manifest.get("version") == VERSION and manifest.get("seed") == seed
                and manifest.get("image_size") == IMAGE_SIZE and _is_complete(manifest, out_dir)):
            report(1.0, "sample data already built")
            return _summary(manifest, out_dir, time.perf_counter() - t0, cached=True)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        items: list[dict] = []
        for k, product in enumerate(PRODUCTS):
            report(k / (len(PRODUCTS) + 1), f"building {product} crops and defects")
            items += _build_product(product, tmp, seed)
        report(len(PRODUCTS) / (len(PRODUCTS) + 1), "writing manuals")
        manuals = write_manuals(tmp)
        manifest = {"version": VERSION, "seed": seed, "image_size": IMAGE_SIZE,
                    "source": {"photos": {p: f"skimage.data.{p}" for p in PRODUCTS}, "rows": [0, SOURCE_ROWS],
                               "regions": {k: [list(r), list(c)] for k, (r, c) in REGIONS.items()}},
                    "items": items, "manuals": manuals}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report(1.0, "sample data built")
    return _summary(manifest, out_dir, time.perf_counter() - t0, cached=False)


def load_manifest(data_dir: Path | None = None) -> dict:
    """Parsed ``manifest.json`` of a built sample data set (paths inside are relative to ``data_dir``).

    Args:
        data_dir: folder holding ``manifest.json``; defaults to ``get_settings().data_dir``.

    Raises:
        FileNotFoundError: no manifest there (the message says how to build it).
        ValueError: the file is not valid JSON.
    """
    data_dir = Path(data_dir if data_dir is not None else get_settings().data_dir)
    path = data_dir / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no sample data manifest at {path}; build it with `python cli.py build` "
            "(or data.build.build_sample_data())"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


if __name__ == "__main__":  # python -m data.build [--force] [--seed N] [--out DIR]
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    print(json.dumps(build_sample_data(a.out, a.seed, a.force), indent=1))
