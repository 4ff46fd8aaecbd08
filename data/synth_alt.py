"""A third defect generator, for TRAINING only: other drawing habits than :mod:`data.synth`.

Why: a detector or a defect-type metric trained on one drawing routine learns that
routine (its stroke profile, its colours, its size range) and loses accuracy on defects
drawn another way (issue 15: contamination Recall@1 0.04 on the external set). Training on
two independently written generators (:mod:`data.synth` and this one) and testing on a
third (:mod:`data.holdout_synth`, evaluation only, never imported for training) measures
and reduces that. Written without looking at the evaluation generator's routines beyond
its documented type list; it only imports numpy, scipy and scikit-image.

Public API: :data:`DEFECT_TYPES`, :func:`draw`.

Drawing (sizes for a 256 px photo, scaled with ``min(H, W) / 256``):

* scratch: a chain of 1-3 straight segments (a dragged tool that changes direction),
  box profile 0.8-2.5 px wide with a 1 px anti-aliased edge, sometimes dashed, lighter or darker;
* crack: a branching tree of straight segments whose width halves at each branching level,
  darkening by multiplication;
* hole: one crater or a cluster of 2-6 small ones: an irregular outline (angular harmonics),
  a dark core falling off quadratically to the rim and a thin bright rim;
* stain: a mixture of 2-5 anisotropic Gaussian blobs, soft-thresholded, darkening or a
  colour tint, sometimes only its ring (a dried "coffee ring");
* contamination: a cloud of hard-edged dots, a thick sinuous fibre, or a polygonal flake of
  uniform foreign colour.

Visibility: every effect's amplitude is set so that the mean luminance change inside the
mask is ``v`` times the local luminance standard deviation around it, ``v`` drawn
log-uniformly from :data:`VISIBILITY` (faint to plain). Gray photos stay gray.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi
from skimage import draw as skdraw

DEFECT_TYPES = ("scratch", "crack", "hole", "stain", "contamination")
#: mean luminance change in the mask, in local standard deviations (log-uniform)
VISIBILITY = (0.5, 2.5)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_COLOURS = ((240, 240, 235), (25, 25, 30), (190, 70, 40), (70, 110, 190), (200, 170, 60), (90, 140, 80))


def _segment_mask(shape: tuple[int, int], p0, p1, width: float) -> np.ndarray:
    """Anti-aliased coverage (float32 0..1) of a straight box-profile segment ``p0 -> p1`` (x, y)."""
    h, w = shape
    pad = int(math.ceil(width)) + 2
    x0, x1 = int(max(0, min(p0[0], p1[0]) - pad)), int(min(w, max(p0[0], p1[0]) + pad + 1))
    y0, y1 = int(max(0, min(p0[1], p1[1]) - pad)), int(min(h, max(p0[1], p1[1]) + pad + 1))
    out = np.zeros(shape, np.float32)
    if x1 <= x0 or y1 <= y0:
        return out
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    d = np.asarray(p1, np.float32) - np.asarray(p0, np.float32)
    length2 = float(d @ d) or 1.0
    t = np.clip(((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / length2, 0.0, 1.0)
    dist = np.hypot(xx - (p0[0] + t * d[0]), yy - (p0[1] + t * d[1]))
    out[y0:y1, x0:x1] = np.clip(width / 2 + 0.5 - dist, 0.0, 1.0)
    return out


def _scratch(shape, scale, rng):
    h, w = shape
    n_seg = int(rng.integers(1, 4))
    p = rng.uniform([0.15 * w, 0.15 * h], [0.85 * w, 0.85 * h])
    ang = rng.uniform(-np.pi, np.pi)
    width = float(rng.uniform(0.8, 2.5)) * max(1.0, math.sqrt(scale))
    cov = np.zeros(shape, np.float32)
    dashed = rng.random() < 0.3
    for _ in range(n_seg):
        length = float(rng.uniform(25, 90)) * scale
        q = p + length * np.array([math.cos(ang), math.sin(ang)])
        if dashed:
            k = max(2, int(length / (8 * scale)))
            for j in range(0, k, 2):
                a, b = p + (q - p) * j / k, p + (q - p) * (j + 1) / k
                cov = np.maximum(cov, _segment_mask(shape, a, b, width))
        else:
            cov = np.maximum(cov, _segment_mask(shape, p, q, width))
        p, ang = q, ang + rng.uniform(-0.6, 0.6)
    return cov * (1.0 if rng.random() < 0.5 else -1.0), "add"


def _crack(shape, scale, rng):
    h, w = shape
    cov = np.zeros(shape, np.float32)
    stack = [(rng.uniform([0.2 * w, 0.2 * h], [0.8 * w, 0.8 * h]), rng.uniform(-np.pi, np.pi),
              float(rng.uniform(2.0, 3.5)) * max(1.0, math.sqrt(scale)), 0)]
    segments = 0
    while stack and segments < 40:
        p, ang, width, level = stack.pop()
        for _ in range(int(rng.integers(3, 8))):
            q = p + float(rng.uniform(6, 16)) * scale * np.array([math.cos(ang), math.sin(ang)])
            cov = np.maximum(cov, _segment_mask(shape, p, q, width))
            segments += 1
            p, ang = q, ang + rng.normal(0.0, 0.45)
            if level < 2 and rng.random() < 0.18:
                stack.append((p.copy(), ang + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1), max(0.8, width / 2), level + 1))
    return -cov, "mul"


def _hole(shape, scale, rng):
    h, w = shape
    field = np.zeros(shape, np.float32)
    n = 1 if rng.random() < 0.6 else int(rng.integers(2, 7))
    cx, cy = rng.uniform([0.2 * w, 0.2 * h], [0.8 * w, 0.8 * h])
    for _ in range(n):
        r = float(rng.uniform(3, 10 if n > 1 else 20)) * scale
        x, y = (cx, cy) if n == 1 else (cx + rng.normal(0, 12 * scale), cy + rng.normal(0, 12 * scale))
        pad = 1.6 * r + 2
        y0, y1 = int(max(0, y - pad)), int(min(h, y + pad + 1))
        x0, x1 = int(max(0, x - pad)), int(min(w, x + pad + 1))
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        theta = np.arctan2(yy - y, xx - x)
        k = np.arange(2, 5)
        amp, ph = rng.uniform(0, 0.15, 3), rng.uniform(0, 2 * np.pi, 3)
        radius = r * (1 + (amp[:, None, None] * np.sin(k[:, None, None] * theta[None] + ph[:, None, None])).sum(0))
        rho = np.hypot(xx - x, yy - y) / np.maximum(radius, 1e-3)
        core = np.clip(1 - rho ** 2, 0, 1)
        rim = np.clip(1 - np.abs(rho - 1.1) / 0.12, 0, 1) * 0.35
        win = field[y0:y1, x0:x1]
        field[y0:y1, x0:x1] = np.minimum(win, -core) + rim * (win == 0) * (core == 0)
    return field, "add"


def _stain(shape, scale, rng):
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = rng.uniform([0.25 * w, 0.25 * h], [0.75 * w, 0.75 * h])
    acc = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(2, 6))):
        sx, sy = rng.uniform(10, 40, 2) * scale
        x, y = cx + rng.normal(0, 18 * scale), cy + rng.normal(0, 18 * scale)
        phi = rng.uniform(0, np.pi)
        u = (xx - x) * math.cos(phi) + (yy - y) * math.sin(phi)
        v = -(xx - x) * math.sin(phi) + (yy - y) * math.cos(phi)
        acc += np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))
    soft = np.clip((acc - 0.4) / 0.4, 0, 1)
    soft = soft * soft * (3 - 2 * soft)
    if rng.random() < 0.3:  # coffee ring: the edge only
        soft = np.clip(1 - np.abs(soft - 0.5) * 3, 0, 1) * (soft > 0)
    return -soft, ("tint" if rng.random() < 0.5 else "mul")


def _contamination(shape, scale, rng):
    h, w = shape
    cov = np.zeros(shape, np.float32)
    cx, cy = rng.uniform([0.25 * w, 0.25 * h], [0.75 * w, 0.75 * h])
    kind = int(rng.integers(3))
    if kind == 0:  # dots
        for _ in range(int(rng.integers(5, 30))):
            rr, cc = skdraw.disk((cy + rng.normal(0, 14 * scale), cx + rng.normal(0, 14 * scale)),
                                 float(rng.uniform(1.0, 3.0)) * scale, shape=shape)
            cov[rr, cc] = 1.0
    elif kind == 1:  # thick sinuous fibre
        t = np.linspace(0, 1, 60)
        length = float(rng.uniform(40, 110)) * scale
        ang = rng.uniform(-np.pi, np.pi)
        wave = float(rng.uniform(3, 10)) * scale * np.sin(2 * np.pi * rng.uniform(1, 3) * t + rng.uniform(0, 6.3))
        px = cx + (t - 0.5) * length * math.cos(ang) - wave * math.sin(ang)
        py = cy + (t - 0.5) * length * math.sin(ang) + wave * math.cos(ang)
        width = float(rng.uniform(1.5, 3.0)) * max(1.0, math.sqrt(scale))
        for i in range(len(t) - 1):
            cov = np.maximum(cov, _segment_mask(shape, (px[i], py[i]), (px[i + 1], py[i + 1]), width))
    else:  # polygonal flake
        k = int(rng.integers(4, 8))
        ang = np.sort(rng.uniform(0, 2 * np.pi, k))
        rad = float(rng.uniform(4, 14)) * scale * rng.uniform(0.6, 1.0, k)
        rr, cc = skdraw.polygon(cy + rad * np.sin(ang), cx + rad * np.cos(ang), shape=shape)
        cov[rr, cc] = 1.0
    return cov, "replace"


_DRAWERS = {"scratch": _scratch, "crack": _crack, "hole": _hole, "stain": _stain, "contamination": _contamination}


def draw(rgb: np.ndarray, defect_type: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect of ``defect_type`` on a copy of ``rgb``; returns ``(image, mask)``.

    Args:
        rgb: clean photo, ``(H, W, 3)`` uint8 with ``H, W >= 32``; a gray photo (three
            equal channels) gives a gray result.
        defect_type: one of :data:`DEFECT_TYPES`.
        rng: seeded generator (advanced by the call).

    Returns:
        ``(H, W, 3)`` uint8 defective photo and a non-empty ``(H, W)`` bool mask of the pixels
        whose shape reaches 25 % of its peak (the visible defect).

    Raises:
        ValueError: unknown type or a bad image.
    """
    if defect_type not in _DRAWERS:
        raise ValueError(f"unknown defect type {defect_type!r}; expected one of {', '.join(DEFECT_TYPES)}")
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 \
            or min(rgb.shape[:2]) < 32:
        raise ValueError(f"expected an (H, W, 3) uint8 image with sides >= 32, got {getattr(rgb, 'shape', None)}")
    h, w = rgb.shape[:2]
    gray = bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))
    img = rgb.astype(np.float32)
    lum = img @ _LUMA
    scale = min(h, w) / 256.0
    for _ in range(20):
        field, mode = _DRAWERS[defect_type]((h, w), scale, rng)
        mag = np.abs(field)
        mask = mag >= 0.25 * float(mag.max()) if mag.max() > 0 else mag > 0
        if mask.sum() >= 6 and mask.mean() < 0.4:
            break
    ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    win = (slice(max(0, ys[0] - 10), ys[-1] + 11), slice(max(0, xs[0] - 10), xs[-1] + 11))
    dist = ndi.distance_transform_edt(~mask[win])
    ring = np.zeros_like(mask)
    ring[win] = (dist > 2) & (dist <= 8)
    local_std = max(float(lum[ring].std()) if ring.any() else float(lum.std()), 3.0)
    vis = float(np.exp(rng.uniform(np.log(VISIBILITY[0]), np.log(VISIBILITY[1]))))
    delta = vis * local_std / max(float(mag[mask].mean()), 1e-3)  # grey levels per unit of |field|
    if mode == "add":
        out = img + (field * delta)[..., None]
    elif mode == "mul":
        out = img * (1.0 + field * min(0.95, delta / max(float(lum[mask].mean()), 8.0)))[..., None]
    elif mode == "tint":
        colour = np.asarray(_COLOURS[int(rng.integers(len(_COLOURS)))], np.float32)
        alpha = np.clip(mag * delta / max(float(np.abs(colour @ _LUMA - lum[mask].mean())), 10.0), 0, 1)[..., None]
        out = img + alpha * (colour - img)
    else:  # replace by a foreign material of uniform colour
        colour = np.asarray(_COLOURS[int(rng.integers(len(_COLOURS)))], np.float32)
        base = float(lum[mask].mean())
        target_l = base + (delta if colour @ _LUMA > base else -delta)
        colour = np.clip(colour + (target_l - float(colour @ _LUMA)), 0, 255)
        out = img + mag[..., None] * (colour - img)
    out = np.clip(out, 0, 255)
    if gray:
        out = np.repeat((out @ _LUMA)[..., None], 3, axis=2)
    result = np.round(out).astype(np.uint8)
    changed = np.abs(result.astype(np.int16) - rgb.astype(np.int16)).max(axis=2) > 0
    mask = mask & changed
    if not mask.any():
        mask = changed if changed.any() else mask | (mag > 0)
    return result, mask
