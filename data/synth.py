"""Defect synthesis on texture crops, with exact pixel masks.

Every synthesizer takes a clean RGB crop (``(H, W, 3)`` uint8) and a seeded
``numpy.random.Generator`` and returns a :class:`Defect` tuple
``(image, mask, note, bbox)``:

* ``image``: the defective crop, ``(H, W, 3)`` uint8;
* ``mask``: ``(H, W)`` uint8 with values 0 / 255: exactly the pixels whose
  colour the defect changed meaningfully (see :func:`changed_mask`);
* ``note``: a short human description ("dark diagonal jagged crack, 70 px,
  2 branches, up to 3.1 px wide, low contrast, top-left");
* ``bbox``: ``[x0, y0, x1, y1]`` in pixels, the tight box of the mask with
  exclusive upper bounds (``mask[y0:y1, x0:x1]`` holds every mask pixel).

Size, contrast, position, orientation, colour and drawing variant are drawn
from the generator per sample, so that no single drawing routine dominates.
Rendering is vectorised numpy / ``scipy.ndimage`` / ``skimage.draw``; one
defect on a 256×256 crop takes a few milliseconds.

Drawing methods: thin marks (scratches, cracks, fibres) are rasterised
centre lines widened with a Euclidean distance transform and an anti-aliased
edge (``scipy.ndimage.distance_transform_edt``); holes are shaded ellipses
lit from one side; stains are thresholded smooth noise fields with a blurred
soft edge, blended towards a product-specific stain colour.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
from scipy import ndimage as ndi
from skimage import draw

from core.settings import DEFECT_TYPES  # noqa: F401 - re-exported: the fixed taxonomy ids

#: a change smaller than this (max over RGB channels, 0-255 levels) is never "meaningful"
MIN_DELTA = 4.0
#: a change below this fraction of the defect's own peak change (99th percentile) is not part of the mask
REL_DELTA = 0.2
#: a synthesized defect whose mask has fewer pixels is redrawn
MIN_AREA = 12
MAX_TRIES = 200


class Defect(NamedTuple):
    """One synthesized defect: ``(image, mask, note, bbox)`` (see module docstring)."""

    image: np.ndarray
    mask: np.ndarray
    note: str
    bbox: list[int]


# --------------------------------------------------------------------------- helpers

def changed_mask(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Pixels changed meaningfully between two RGB uint8 images.

    A pixel is in the mask when its largest per-channel absolute change is at
    least ``max(MIN_DELTA, REL_DELTA * p99)``, where ``p99`` is the 99th
    percentile of the non-zero changes (the defect's own peak contrast).

    Returns:
        bool array ``(H, W)``.
    """
    diff = np.abs(after.astype(np.int16) - before.astype(np.int16)).max(axis=2).astype(np.float32)
    nz = diff[diff > 0]
    if nz.size == 0:
        return np.zeros(diff.shape, dtype=bool)
    tau = max(MIN_DELTA, REL_DELTA * float(np.percentile(nz, 99)))
    return diff >= tau


def mask_bbox(mask: np.ndarray) -> list[int]:
    """Tight ``[x0, y0, x1, y1]`` of the non-zero pixels (exclusive x1, y1).

    Raises:
        ValueError: the mask is empty.
    """
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        raise ValueError("empty mask has no bounding box")
    return [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]


def contrast_word(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> str:
    """'low' / 'medium' / 'high' from the mean per-pixel change inside the mask (0-255 levels)."""
    diff = np.abs(after.astype(np.int16) - before.astype(np.int16)).max(axis=2)
    mean = float(diff[mask].mean()) if mask.any() else 0.0
    return "low" if mean < 25 else "medium" if mean < 55 else "high"


def orientation_word(angle_rad: float) -> str:
    """'horizontal' / 'vertical' / 'diagonal' for a line angle in image coordinates."""
    a = abs(np.degrees(angle_rad)) % 180.0
    a = min(a, 180.0 - a)
    return "horizontal" if a < 20 else "vertical" if a > 70 else "diagonal"


def position_word(bbox: list[int], shape: tuple[int, int]) -> str:
    """Where a box lies in the image: 'top-left', 'centre', 'bottom' ... (3 x 3 grid of its centre)."""
    h, w = shape
    cx, cy = (bbox[0] + bbox[2]) / 2 / w, (bbox[1] + bbox[3]) / 2 / h
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    return "-".join(p for p in (row, col) if p) or "centre"


def _smooth_noise(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """1-D smooth noise of length n, roughly in [-1, 1]."""
    x = ndi.gaussian_filter1d(rng.normal(size=n + 8), max(scale, 0.5), mode="wrap")[4:-4]
    s = np.abs(x).max()
    return x / s if s > 0 else x


def _stroke_alpha(shape: tuple[int, int], points: np.ndarray, widths: np.ndarray,
                  strengths: np.ndarray | None = None) -> np.ndarray:
    """Anti-aliased coverage of a stroke through ``points`` ((N, 2) float, (x, y)).

    Each point carries a full width in pixels (``widths``, (N,)) and optionally a
    strength in [0, 1]. Points are joined by 1-px line segments, then widened with
    the Euclidean distance transform; coverage falls linearly over one pixel at
    the edge. Returns float32 ``(H, W)`` in [0, 1].
    """
    h, w = shape
    centre = np.zeros(shape, dtype=bool)
    width_map = np.zeros(shape, dtype=np.float32)
    strength_map = np.zeros(shape, dtype=np.float32)
    pts = np.round(points).astype(int)
    if strengths is None:
        strengths = np.ones(len(points), dtype=np.float32)
    # dense sampling: consecutive points are <= ~1.5 px apart, so fill gaps with draw.line
    rr_all, cc_all, idx_all = [], [], []
    for i in range(len(pts) - 1):
        rr, cc = draw.line(pts[i, 1], pts[i, 0], pts[i + 1, 1], pts[i + 1, 0])
        rr_all.append(rr)
        cc_all.append(cc)
        idx_all.append(np.full(rr.shape, i))
    if not rr_all:
        return np.zeros(shape, dtype=np.float32)
    rr = np.concatenate(rr_all)
    cc = np.concatenate(cc_all)
    idx = np.concatenate(idx_all)
    ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    rr, cc, idx = rr[ok], cc[ok], idx[ok]
    if rr.size == 0:
        return np.zeros(shape, dtype=np.float32)
    centre[rr, cc] = True
    width_map[rr, cc] = widths[idx]
    strength_map[rr, cc] = strengths[idx]
    dist, (ir, ic) = ndi.distance_transform_edt(~centre, return_indices=True)
    half = width_map[ir, ic] / 2.0
    alpha = np.clip(half + 0.5 - dist, 0.0, 1.0) * strength_map[ir, ic]
    return alpha.astype(np.float32)


def _blend(img: np.ndarray, alpha: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``img * (1 - alpha) + target * alpha`` for float images; ``target`` is (H, W, 3) or (3,)."""
    a = alpha[..., None]
    return img * (1.0 - a) + target * a


def _finish(before: np.ndarray, after_f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    after = np.clip(np.round(after_f), 0, 255).astype(np.uint8)
    return after, changed_mask(before, after)


def _random_walk(rng: np.random.Generator, start: np.ndarray, angle: float, length: float,
                 step: float, jitter: float, kink_prob: float) -> np.ndarray:
    """Jagged path: (N, 2) points (x, y); heading drifts with noise and occasional kinks."""
    n = max(int(length / step), 2)
    turns = rng.normal(0.0, jitter, size=n)
    kinks = rng.random(n) < kink_prob
    turns[kinks] += rng.choice([-1.0, 1.0], size=kinks.sum()) * rng.uniform(0.3, 0.8, size=kinks.sum())
    heading = np.empty(n)
    h = angle
    for i in range(n):  # mean-reverting heading keeps the overall direction
        h = h + turns[i] - 0.15 * (h - angle)
        heading[i] = h
    steps = np.stack([np.cos(heading), np.sin(heading)], axis=1) * step
    return start[None, :] + np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])[: n]


def _luma(img: np.ndarray) -> np.ndarray:
    return img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


# product-specific colours (RGB 0-255) of foreign matter and stains
_STAINS = {
    "brick": [("rust", (150, 70, 30), "tint"), ("efflorescence", (236, 234, 228), "tint"),
              ("damp", None, "darken"), ("soot", (40, 36, 34), "tint"), ("algae", (70, 100, 45), "tint")],
    "gravel": [("oil", None, "darken"), ("rust", (145, 72, 32), "tint"), ("cement laitance", (205, 202, 195), "tint"),
               ("damp", None, "darken"), ("tannin", (110, 80, 40), "tint")],
    "grass": [("oil", None, "darken"), ("mud", (105, 78, 50), "tint"), ("line paint", (240, 240, 235), "tint"),
              ("UV bleaching", (190, 190, 120), "tint"), ("rust", (140, 70, 30), "tint")],
}
_DEBRIS = {
    "brick": [("mortar splash", (205, 200, 190)), ("paint fleck", (235, 235, 240)), ("soot", (30, 28, 28)),
              ("timber chip", (185, 145, 95))],
    "gravel": [("wood chip", (180, 140, 90)), ("plastic fragment", (40, 90, 200)), ("soot", (30, 30, 30)),
               ("leaf litter", (120, 95, 40))],
    "grass": [("rubber granule", (28, 28, 28)), ("sand", (205, 185, 135)), ("plastic litter", (210, 60, 50)),
              ("dead leaf", (140, 100, 50))],
}


# --------------------------------------------------------------------------- defect types

def scratch(image: np.ndarray, rng: np.random.Generator, product: str = "brick") -> Defect:
    """Thin straight or gently curved line, lighter (scraped) or darker (abraded-in dirt).

    Quadratic Bezier centre line, 20-190 px long, 0.7-3 px wide, any angle,
    intermittent along its length, blended towards a light or dark colour with
    opacity 0.2-0.9 (low to high contrast).
    """
    h, w = image.shape[:2]
    img = image.astype(np.float32)
    length = float(rng.uniform(20, 190))
    angle = float(rng.uniform(-np.pi, np.pi))
    p0 = rng.uniform([0.1 * w, 0.1 * h], [0.9 * w, 0.9 * h])
    p2 = p0 + length * np.array([np.cos(angle), np.sin(angle)])
    bend = length * float(rng.uniform(-0.15, 0.15))
    mid = (p0 + p2) / 2 + bend * np.array([-np.sin(angle), np.cos(angle)])
    n = int(length * 1.5) + 2
    t = np.linspace(0, 1, n)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * mid + t**2 * p2
    width = float(rng.uniform(0.7, 3.0))
    widths = np.full(n, width) * (1 + 0.25 * _smooth_noise(rng, n, 6))
    fade = np.clip(np.minimum(t[:, 0], 1 - t[:, 0]) * 8, 0.2, 1.0)
    strengths = fade * np.clip(0.75 + 0.45 * _smooth_noise(rng, n, n / 10), 0.15, 1.0)
    alpha = _stroke_alpha((h, w), pts, widths, strengths)
    bright = bool(rng.random() < 0.55)
    opacity = float(rng.uniform(0.2, 0.9))
    if bright:
        target = np.array([238, 236, 230], np.float32) * rng.uniform(0.9, 1.0)
    else:
        target = img * rng.uniform(0.05, 0.35)
    out, mask = _finish(image, _blend(img, alpha * opacity, target))
    curve = "slightly curved" if abs(bend) > 0.06 * length else "straight"
    note = (f"{'bright' if bright else 'dark'} {orientation_word(angle)} {curve} scratch, {int(round(length))} px, "
            f"{width:.1f} px wide, {contrast_word(image, out, mask)} contrast")
    return Defect(out, mask, note, [])


def crack(image: np.ndarray, rng: np.random.Generator, product: str = "brick") -> Defect:
    """Jagged, branching dark fracture with variable width.

    Mean-reverting random walk with kinks (30-200 px), 0-3 side branches,
    width tapering from a 1.2-4.5 px maximum, darkened by 20-90 %.
    """
    h, w = image.shape[:2]
    img = image.astype(np.float32)
    length = float(rng.uniform(30, 200))
    angle = float(rng.uniform(-np.pi, np.pi))
    start = rng.uniform([0.15 * w, 0.15 * h], [0.85 * w, 0.85 * h])
    main = _random_walk(rng, start, angle, length, 1.2, float(rng.uniform(0.08, 0.25)), float(rng.uniform(0.02, 0.08)))
    wmax = float(rng.uniform(1.2, 4.5))
    tt = np.linspace(0, 1, len(main))
    taper = np.clip(np.sin(np.pi * np.clip(tt * 0.9 + 0.05, 0, 1)) ** 0.6, 0.25, 1)
    widths = [wmax * taper * np.clip(1 + 0.35 * _smooth_noise(rng, len(main), 5), 0.4, 1.6)]
    paths = [main]
    n_branch = int(rng.integers(0, 4))
    for _ in range(n_branch):
        i = int(rng.integers(len(main) // 5, max(len(main) * 4 // 5, len(main) // 5 + 1)))
        b_angle = angle + rng.choice([-1, 1]) * rng.uniform(0.4, 1.2)
        b_len = length * rng.uniform(0.15, 0.5)
        b = _random_walk(rng, main[i], float(b_angle), float(b_len), 1.2, 0.2, 0.05)
        bw = widths[0][i] * np.linspace(0.8, 0.3, len(b))
        paths.append(b)
        widths.append(bw)
    alpha = np.zeros((h, w), np.float32)
    for p, wd in zip(paths, widths):
        alpha = np.maximum(alpha, _stroke_alpha((h, w), p, np.maximum(wd, 0.6)))
    darkness = float(rng.uniform(0.2, 0.9))
    out, mask = _finish(image, img * (1 - darkness * alpha[..., None]))
    branching = f"{n_branch} branch{'es' if n_branch != 1 else ''}" if n_branch else "no branches"
    note = (f"dark {orientation_word(angle)} jagged crack, {int(round(length))} px, {branching}, "
            f"up to {wmax:.1f} px wide, {contrast_word(image, out, mask)} contrast")
    return Defect(out, mask, note, [])


def hole(image: np.ndarray, rng: np.random.Generator, product: str = "brick") -> Defect:
    """Dark cavity / pit: an irregular ellipse, darker towards its centre, with a shaded rim.

    Radii 3-28 px (aspect 0.5-1), any orientation, depth 0.2-0.9; the wall facing
    a random light direction is lit, the rim casts a highlight / shadow pair.
    """
    h, w = image.shape[:2]
    img = image.astype(np.float32)
    a = float(rng.choice([rng.uniform(3, 8), rng.uniform(8, 28)], p=[0.4, 0.6]))
    b = a * float(rng.uniform(0.5, 1.0))
    phi = float(rng.uniform(0, np.pi))
    cx, cy = rng.uniform([a + 2, a + 2], [w - a - 2, h - a - 2])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    u = dx * np.cos(phi) + dy * np.sin(phi)
    v = -dx * np.sin(phi) + dy * np.cos(phi)
    theta = np.arctan2(dy, dx)
    k = np.arange(2, 6)
    amp = rng.uniform(0, 0.07, size=4)
    ph = rng.uniform(0, 2 * np.pi, size=4)
    wobble = 1 + (amp[:, None, None] * np.cos(k[:, None, None] * theta[None] + ph[:, None, None])).sum(0)
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2) / wobble
    depth = float(rng.uniform(0.2, 0.9))
    light = float(rng.uniform(-np.pi, np.pi))
    facing = np.cos(theta - light)
    inside = np.clip(1 - r, 0, 1)
    shade = np.ones_like(r)
    cav = r < 1
    # interior: darker towards the centre, the wall facing the light a little brighter
    shade[cav] = 1 - depth * (0.55 + 0.45 * np.sqrt(inside[cav])) + 0.25 * depth * np.clip(facing[cav], 0, 1) * r[cav]
    rim = (r >= 1) & (r < 1.35)
    shade[rim] = 1 - 0.35 * depth * facing[rim] * (1 - (r[rim] - 1) / 0.35)
    shade = ndi.gaussian_filter(shade, 0.6)
    out_f = img * shade[..., None]
    out_f = np.where(cav[..., None], _blend(out_f, np.full((h, w), 0.15, np.float32) * depth, np.float32([25, 20, 18])), out_f)
    out, mask = _finish(image, out_f)
    size = "small" if a < 8 else "medium" if a < 18 else "large"
    shape = "round" if b / a > 0.8 else "elliptical"
    note = (f"{size} {shape} dark pit, {int(round(2 * a))}x{int(round(2 * b))} px, shaded rim, "
            f"{contrast_word(image, out, mask)} contrast")
    return Defect(out, mask, note, [])


def stain(image: np.ndarray, rng: np.random.Generator, product: str = "brick") -> Defect:
    """Diffuse, soft-edged discoloured patch (product-specific: rust, oil, damp, efflorescence ...).

    Irregular blob from thresholded smooth noise inside an ellipse of radius
    12-75 px, soft edge (Gaussian, sigma 2-10 px), opacity 0.15-0.7; "tint"
    stains move colour towards the stain colour keeping the texture's shading,
    "darken" stains (oil, damp) multiply; some are tide marks with a darker edge.
    """
    h, w = image.shape[:2]
    img = image.astype(np.float32)
    kinds = _STAINS.get(product, _STAINS["brick"])
    kind, colour, mode = kinds[int(rng.integers(len(kinds)))]
    R = float(rng.uniform(12, 75))
    ecc = float(rng.uniform(0.5, 1.0))
    phi = float(rng.uniform(0, np.pi))
    cx, cy = rng.uniform([0.1 * w, 0.1 * h], [0.9 * w, 0.9 * h])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    u = dx * np.cos(phi) + dy * np.sin(phi)
    v = -dx * np.sin(phi) + dy * np.cos(phi)
    r = np.sqrt((u / R) ** 2 + (v / (R * ecc)) ** 2)
    noise = ndi.gaussian_filter(rng.normal(size=(h, w)).astype(np.float32), max(R / 5, 2))
    noise /= noise.std() + 1e-6
    blob = (1.0 - r + 0.25 * noise) > 0.25
    soft = float(rng.uniform(2, max(3, min(10, R / 3))))
    alpha = ndi.gaussian_filter(blob.astype(np.float32), soft)
    tide = bool(rng.random() < 0.25)
    if tide:  # tide mark: concentrated at the drying edge
        edge = np.clip(1 - np.abs(alpha - 0.5) * 3, 0, 1)
        alpha = 0.5 * alpha + edge
    if alpha.max() > 0:
        alpha /= alpha.max()
    opacity = float(rng.uniform(0.15, 0.7))
    alpha *= opacity
    if mode == "darken":
        out_f = img * (1 - 0.8 * alpha[..., None])
    else:
        lum = _luma(img)
        rel = (lum / (lum.mean() + 1e-6))[..., None]
        target = np.clip(np.float32(colour) * (0.6 + 0.4 * rel), 0, 255)
        out_f = _blend(img, alpha, target)
    out, mask = _finish(image, out_f)
    size = "small" if R < 25 else "medium" if R < 50 else "large"
    note = (f"{size} {kind} stain{' with tide-mark edge' if tide else ''}, about {int(round(2 * R))} px across, "
            f"soft edges, {contrast_word(image, out, mask)} contrast")
    return Defect(out, mask, note, [])


def contamination(image: np.ndarray, rng: np.random.Generator, product: str = "brick") -> Defect:
    """Foreign matter: particle clusters, fibres or debris flakes with their own colour and texture.

    particles: 6-60 discs (r 0.8-3.5 px) scattered around a centre (sigma 5-35 px);
    fibres: 1-4 thin wandering strands 25-120 px; debris: 1-3 irregular flakes
    5-22 px with a small cast shadow. Colour from a product-specific list
    (mortar splash, plastic fragments, rubber infill ...), opacity 0.3-1.
    """
    h, w = image.shape[:2]
    img = image.astype(np.float32)
    name, colour = _DEBRIS.get(product, _DEBRIS["brick"])[int(rng.integers(4))]
    colour = np.float32(colour) * np.float32(rng.uniform(0.85, 1.1, size=3))
    variant = str(rng.choice(["particles", "fibres", "debris"]))
    opacity = float(rng.uniform(0.3, 1.0))
    cx, cy = rng.uniform([0.15 * w, 0.15 * h], [0.85 * w, 0.85 * h])
    alpha = np.zeros((h, w), np.float32)
    texture = ndi.gaussian_filter(rng.normal(size=(h, w)).astype(np.float32), 1.0)
    texture = 1 + 0.35 * texture / (texture.std() + 1e-6)
    shadow = np.zeros((h, w), np.float32)
    if variant == "particles":
        n = int(rng.integers(6, 61))
        spread = float(rng.uniform(5, 35))
        xs = rng.normal(cx, spread, n)
        ys = rng.normal(cy, spread, n)
        rs = rng.uniform(0.8, 3.5, n)
        for x, y, rad in zip(xs, ys, rs):
            rr, cc = draw.disk((y, x), rad, shape=(h, w))
            alpha[rr, cc] = 1.0
        alpha = ndi.gaussian_filter(alpha, 0.5)
        desc = f"cluster of {n} {name} particles, about {int(round(4 * spread))} px across"
    elif variant == "fibres":
        n = int(rng.integers(1, 5))
        total = 0.0
        for _ in range(n):
            ln = float(rng.uniform(25, 120))
            total += ln
            start = np.array([cx, cy]) + rng.normal(0, 15, 2)
            p = _random_walk(rng, start, float(rng.uniform(-np.pi, np.pi)), ln, 1.0, 0.12, 0.01)
            alpha = np.maximum(alpha, _stroke_alpha((h, w), p, np.full(len(p), rng.uniform(0.7, 1.6))))
        colour = np.float32(rng.choice([[30, 28, 26], [230, 230, 235], [50, 80, 170], list(colour)]))
        texture = np.ones_like(texture)
        desc = f"{n} loose fibre{'s' if n > 1 else ''}, {int(round(total))} px total"
    else:
        n = int(rng.integers(1, 4))
        size = 0.0
        for _ in range(n):
            rad = float(rng.uniform(2.5, 11))
            size = max(size, 2 * rad)
            k = int(rng.integers(5, 10))
            ang = np.sort(rng.uniform(0, 2 * np.pi, k))
            rad_k = rad * rng.uniform(0.55, 1.0, k)
            px = cx + rng.normal(0, 12) + rad_k * np.cos(ang)
            py = cy + rng.normal(0, 12) + rad_k * np.sin(ang)
            rr, cc = draw.polygon(py, px, shape=(h, w))
            alpha[rr, cc] = 1.0
        alpha = ndi.gaussian_filter(alpha, 0.6)
        shadow = np.clip(ndi.shift(alpha, (1.5, 1.5), order=1) - alpha, 0, 1) * 0.5
        desc = f"{n} {name} flake{'s' if n > 1 else ''}, up to {int(round(size))} px"
    out_f = img * (1 - shadow[..., None])
    out_f = _blend(out_f, alpha * opacity, np.clip(colour * texture[..., None], 0, 255))
    out, mask = _finish(image, out_f)
    note = f"{desc}, foreign colour/texture, {contrast_word(image, out, mask)} contrast"
    return Defect(out, mask, note, [])


SYNTHESIZERS: dict[str, Callable[..., Defect]] = {
    "scratch": scratch,
    "crack": crack,
    "hole": hole,
    "stain": stain,
    "contamination": contamination,
}


# Minimum visibility of a defect against its own surroundings (see :func:`visibility`), per type.
# Without it, thin dark strokes drawn on gravel's dark gaps or grass blades were invisible even to a
# person (scores 0.2-0.8), which is not a defect photo an inspector would upload. Thin strokes need
# more contrast than compact marks; diffuse stains are visible at lower contrast over a large area.
MIN_VISIBILITY = {"scratch": 1.4, "crack": 1.4, "hole": 1.2, "contamination": 1.2, "stain": 0.7}


def visibility(image: np.ndarray, mask: np.ndarray) -> float:
    """Contrast of a defect against its surroundings, in units of the surroundings' own spread.

    ``max_c |mean(defect_c) - mean(ring_c)| / std(ring_c)`` over the RGB channels, where the
    ring is the band 2-6 px outside the mask. Dimensionless; ~0.5 is invisible on a busy
    texture, >= 1.5 is plainly visible.

    Args:
        image: ``(H, W, 3)`` uint8 image with the defect drawn.
        mask: ``(H, W)`` bool / 0-255 defect mask (non-empty).
    """
    m = np.asarray(mask) > 0
    ring = ndi.binary_dilation(m, iterations=6) & ~ndi.binary_dilation(m, iterations=2)
    if not m.any() or not ring.any():
        return 0.0
    img = image.astype(np.float32)
    diff = np.abs(img[m].mean(0) - img[ring].mean(0))
    return float((diff / (img[ring].std(0) + 1e-3)).max())


def synthesize(defect_type: str, image: np.ndarray, rng: np.random.Generator, product: str = "brick") -> Defect:
    """Draw one defect of ``defect_type`` onto ``image`` and return ``(image, mask, note, bbox)``.

    Redraws (same generator, new parameters) until the mask has at least
    ``MIN_AREA`` pixels and :func:`visibility` reaches ``MIN_VISIBILITY[defect_type]``; the mask is uint8 0/255, ``bbox`` its tight box, and the
    note ends with the contrast and the position ("..., low contrast, top-left").

    Args:
        defect_type: one of :data:`DEFECT_TYPES`.
        image: clean crop, ``(H, W, 3)`` uint8.
        rng: seeded generator (the result is a pure function of its state).
        product: product id, picks plausible stain / foreign-matter colours.

    Raises:
        KeyError: unknown defect type.
        ValueError: image is not ``(H, W, 3)`` uint8, or no visible defect after ``MAX_TRIES``.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    fn = SYNTHESIZERS[defect_type]
    for _ in range(MAX_TRIES):
        d = fn(image, rng, product)
        if int(d.mask.sum()) >= MIN_AREA and visibility(d.image, d.mask) >= MIN_VISIBILITY[defect_type]:
            mask = d.mask.astype(np.uint8) * 255
            bbox = mask_bbox(mask)
            return Defect(d.image, mask, f"{d.note}, {position_word(bbox, mask.shape)}", bbox)
    raise ValueError(f"could not draw a visible {defect_type} in {MAX_TRIES} tries")
