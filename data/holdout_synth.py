"""Held-out defect generator: an independent second way of drawing defects on texture photos.

This module exists for *honest* held-out evaluation. The training data are drawn
by another generator; a detector that has only learned that generator's drawing
habits (its stroke profile, its colours, its size range) looks better on its own
validation split than on photos of real defects. Every routine here was written
separately from the training generator and uses different geometry, profiles,
contrast rules and colours (see the per-type notes below). The module imports
only numpy and scipy (never project code, never torch) and does nothing on
import but define constants and functions.

Public API
----------
* :data:`DEFECT_TYPES` - the fixed defect ids.
* :func:`draw_defect` - draw one defect, get ``(image, mask)``.
* :func:`defect_contrast` - how visible a drawn defect is against its surroundings.
* :func:`luminance` - Rec. 601 luminance of an RGB image (the measure every contrast here uses).

How a defect is drawn
---------------------
Each type first builds a signed *shape field* in ``[-1, 1]`` (negative = darker,
positive = brighter, 0 = untouched) with its own geometry, then renders it with
one of three effects: additive luminance change (optionally with a colour tint),
multiplicative darkening, or replacement by a foreign material with its own
texture. The effect's amplitude is **calibrated** against the local texture:
a target contrast ``k`` (in local standard deviations of luminance, log-uniform
in ``[0.6, 2.5] * strength``; ``[0.5, 1.5] * strength`` for stains, whose change
spreads over a large area) is drawn, and the amplitude is solved so that
:func:`defect_contrast` of the result equals ``k`` (or more, where the material
itself differs more). Hard, low-contrast defects are therefore common, but no
defect is invisible by construction.

The mask holds the pixels where the shape field reaches ``MASK_LEVEL`` of its
peak and the image actually changed; the faint soft tails below that level are
drawn but are not part of the mask (they stay within ``3 + 0.04 * min(H, W)``
px of it; faint islands that never reach the mask level are not drawn at all).
Pixels where the shape field is zero are bit-for-bit unchanged.

Gray inputs (three equal channels) stay gray: every effect is computed in RGB
and the result replaced by its luminance, so colour tints become luminance
changes.

Per-type geometry (sizes quoted for a 256 px image; lengths scale with the shorter
side, stroke widths with its square root above 256 px)
--------------------------------------------------------------------------------------
* scratch: 1-2 px wide strokes with a Gaussian cross-section along a cubic
  Bezier or a slightly bent polyline, 64-180 px long; 45 % are groups of 2-4
  parallel strokes (abrasion); stylus-pressure modulation with gaps along the
  length; darker or brighter; a quarter are grooves with a lit lip on one side.
* crack: fractal path from recursive midpoint displacement, 1-3 side branches
  (some branching again), width tapering from 2-3 px at the origin to 1 px at
  the tips, darker where wider, multiplicative darkening, sometimes a lit lip.
* hole: elliptic pits 4-14 px across, lit from one side: a darker bowl with a
  cast shadow inside on the light side, a soft rim highlight outside on the
  light side and a soft shadow outside on the far side; small pits come in
  clusters (porosity).
* stain: large irregular blob (envelope radius 31-72 px) from a Gaussian
  envelope modulated by two octaves of bicubic value noise, thresholded, with a
  soft edge 8-20 % of the radius wide (smoothstep across the signed distance to
  the outline) and a blotchy interior; darkening (multiplicative) or a tint
  (amber, rust, slate, olive, chalk, soot) that becomes a luminance change on
  gray images.
* contamination: a cloud of Gaussian specks, a smooth curly fibre, or an
  opaque patch of foreign material with its own fine-grained texture and colour
  and a sharp edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

#: the fixed defect type ids, in the project's order
DEFECT_TYPES = ("scratch", "crack", "hole", "stain", "contamination")

#: accepted image sides in pixels (inclusive); both height and width must lie in this range
MIN_SIDE = 64
MAX_SIDE = 1024
#: the reference image side: defect sizes are quoted for it and scale with ``min(H, W) / REFERENCE_SIDE``
REFERENCE_SIDE = 256

#: target contrast range (local luminance standard deviations) at ``strength=1``; drawn log-uniformly
CONTRAST_RANGE = (0.6, 2.5)
#: per-type ranges: a stain spreads its change over a large area, so the same mean change per pixel is
#: far more visible than on a thin stroke; stains use a lower range to stay soft and low-contrast
CONTRAST_RANGES = {"scratch": CONTRAST_RANGE, "crack": CONTRAST_RANGE, "hole": CONTRAST_RANGE,
                   "stain": (0.5, 1.5), "contamination": CONTRAST_RANGE}
#: the mask holds pixels whose shape field reaches this fraction of its peak (and that changed)
MASK_LEVEL = 0.25
#: shape-field values below this fraction of the peak are cut to exactly zero (no change at all)
CUT_LEVEL = 0.04
#: the ring used to measure the surroundings: pixels more than RING_INNER and at most RING_OUTER px from the mask
RING_INNER = 2.0
RING_OUTER = 8.0
#: floor (grey levels) on the surroundings' standard deviation in :func:`defect_contrast`
CONTRAST_STD_FLOOR = 1.0
#: floor (grey levels) on the surroundings' standard deviation when choosing the amplitude, so that
#: defects on flat, featureless areas still change the image by a few grey levels
DRAW_STD_FLOOR = 2.0
#: a drawn defect's mask covers this fraction of the image at least / at most (else it is redrawn)
MIN_AREA_FRACTION = 0.0005
MAX_AREA_FRACTION = 0.35
#: a placement is redrawn when the achieved contrast is below this fraction of the target
ACCEPT_FRACTION = 0.85
MAX_TRIES = 12

_LUMA = np.array([0.299, 0.587, 0.114])
_LUMA32 = _LUMA.astype(np.float32)

# generic tints (RGB 0-255) for stains and foreign material; no product-specific palette
_TINTS = ((205, 150, 60), (150, 80, 40), (105, 125, 155), (125, 135, 60), (235, 232, 220), (60, 60, 70))
_FOREIGN = ((40, 40, 45), (230, 230, 235), (45, 85, 185), (200, 55, 45), (215, 175, 90), (60, 120, 70))


# --------------------------------------------------------------------------- public helpers

def luminance(rgb: np.ndarray) -> np.ndarray:
    """Rec. 601 luminance ``0.299 R + 0.587 G + 0.114 B`` of an RGB image.

    Args:
        rgb: ``(H, W, 3)`` array of any real dtype, grey levels (0-255 for uint8).

    Returns:
        float64 ``(H, W)`` in the input's units (0-255 for uint8 input); for a
        gray image (three equal channels) it equals the channel value.

    Raises:
        ValueError: ``rgb`` is not ``(H, W, 3)``.
    """
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    return arr.astype(np.float64) @ _LUMA


def defect_contrast(rgb_before: np.ndarray, rgb_after: np.ndarray, mask: np.ndarray) -> float:
    """Visibility of a defect: mean |luminance change| inside the mask / luminance std around it.

    ``mean(|L_after - L_before|[mask]) / max(std(L_before[ring]), CONTRAST_STD_FLOOR)``
    where ``L`` is :func:`luminance` (grey levels) and the ring is the set of
    pixels more than ``RING_INNER`` (2) and at most ``RING_OUTER`` (8) px
    (Euclidean) from the nearest mask pixel. The ring's spread is measured on
    the image *before* the defect, i.e. it is the texture's own local
    variability. Dimensionless: about 0.5 is hard to see on a busy texture,
    2 and above is plain.

    Args:
        rgb_before: clean image, ``(H, W, 3)`` uint8.
        rgb_after: the same image with the defect, ``(H, W, 3)`` uint8.
        mask: ``(H, W)`` bool (or 0 / non-zero) defect mask, non-empty.

    Returns:
        float >= 0.

    Raises:
        ValueError: an image is not ``(H, W, 3)`` uint8, the shapes differ, the
            mask is empty or has the wrong shape, or the mask leaves no ring
            (it covers the whole image).
    """
    _check_rgb(rgb_before, "rgb_before", sized=False)
    _check_rgb(rgb_after, "rgb_after", sized=False)
    if rgb_before.shape != rgb_after.shape:
        raise ValueError(f"image shapes differ: {rgb_before.shape} vs {rgb_after.shape}")
    m = np.asarray(mask)
    if m.shape != rgb_before.shape[:2]:
        raise ValueError(f"mask shape {m.shape} does not match image shape {rgb_before.shape[:2]}")
    m = m.astype(bool)
    if not m.any():
        raise ValueError("empty mask")
    ring = _ring(m)
    if not ring.any():
        raise ValueError("the mask leaves no surrounding ring to compare with")
    lb = luminance(rgb_before)
    la = luminance(rgb_after)
    change = float(np.abs(la[m] - lb[m]).mean())
    return change / max(float(lb[ring].std()), CONTRAST_STD_FLOOR)


def draw_defect(rgb: np.ndarray, defect_type: str, rng: np.random.Generator, *,
                strength: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect of ``defect_type`` on a copy of ``rgb``.

    The defect's size scales with ``min(H, W) / 256``; its contrast is set
    relative to the local texture: a target ``k`` is drawn log-uniformly from
    ``CONTRAST_RANGES[defect_type] * strength`` local luminance standard
    deviations (``[0.6, 2.5]``; ``[0.5, 1.5]`` for stains) and the
    effect's amplitude is solved so that :func:`defect_contrast` reaches it
    (where the image allows: clipping at 0 / 255 can cap it). A placement whose
    mask is smaller than ``MIN_AREA_FRACTION`` or larger than
    ``MAX_AREA_FRACTION`` of the image, or that misses its contrast target by
    more than 15 %, is redrawn (up to ``MAX_TRIES`` times; then the best try is
    returned). The result is a pure function of the inputs and the state of
    ``rng``.

    Args:
        rgb: clean image, ``(H, W, 3)`` uint8, ``64 <= H, W <= 1024``. A gray
            image (three equal channels) gives a gray result.
        defect_type: one of :data:`DEFECT_TYPES`.
        rng: seeded ``numpy.random.Generator`` (advanced by the call).
        strength: positive multiplier of the contrast range (1.0: 0.6-2.5 local
            standard deviations, 0.5-1.5 for stains; 0.5 gives harder, 2.0
            plainer defects).

    Returns:
        ``(image, mask)``: the defective image, ``(H, W, 3)`` uint8 (three equal
        channels when the input is gray), and a ``(H, W)`` bool mask of the
        changed pixels that make up the visible defect (non-empty). Only the
        faint soft edges (below ``MASK_LEVEL`` of the peak change) lie outside
        the mask; in practice pixels farther than ``3 + 0.04 * min(H, W)`` px
        from it are unchanged.

    Raises:
        ValueError: unknown ``defect_type``; ``rgb`` not a uint8 ``(H, W, 3)``
            array with sides in ``[64, 1024]``; ``strength`` not a positive
            finite number; ``rng`` not a ``numpy.random.Generator``; or no try
            changed the image (e.g. a flat white image with only brightening
            tries).
    """
    if defect_type not in _PLANNERS:
        raise ValueError(f"unknown defect type {defect_type!r}; expected one of {', '.join(DEFECT_TYPES)}")
    _check_rgb(rgb, "rgb", sized=True)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(strength)) or float(strength) <= 0:
        raise ValueError(f"strength must be a positive finite number, got {strength!r}")
    h, w = rgb.shape[:2]
    gray = bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))
    before = rgb.astype(np.float32)
    lum = before @ _LUMA32
    scale = min(h, w) / REFERENCE_SIDE
    lo, hi = CONTRAST_RANGES[defect_type]
    k = float(strength) * float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(MAX_TRIES):
        plan = _PLANNERS[defect_type]((h, w), scale, rng)
        result = _realise(rgb, before, lum, plan, k, gray)
        if result is None:
            continue
        after, mask, achieved = result
        frac = float(mask.mean())
        ok_area = MIN_AREA_FRACTION <= frac <= MAX_AREA_FRACTION
        if ok_area:
            score = achieved / k
        else:  # area failures rank below every area success, nearer the allowed range first
            score = -1.0 - (MIN_AREA_FRACTION - frac) / MIN_AREA_FRACTION if frac < MIN_AREA_FRACTION \
                else -1.0 - (frac - MAX_AREA_FRACTION)
        if ok_area and achieved >= ACCEPT_FRACTION * k:
            return after, mask
        if best is None or score > best[0]:
            best = (score, after, mask)
    if best is None:
        raise ValueError(f"could not draw a visible {defect_type} on this image in {MAX_TRIES} tries")
    return best[1], best[2]


# --------------------------------------------------------------------------- validation and measurement

def _check_rgb(rgb: object, name: str, *, sized: bool) -> None:
    if not isinstance(rgb, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(rgb).__name__}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {rgb.dtype}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"{name} must be (H, W, 3), got shape {rgb.shape}")
    if sized and not (MIN_SIDE <= rgb.shape[0] <= MAX_SIDE and MIN_SIDE <= rgb.shape[1] <= MAX_SIDE):
        raise ValueError(f"{name} sides must be in [{MIN_SIDE}, {MAX_SIDE}] px, got {rgb.shape[:2]}")


def _ring(mask: np.ndarray) -> np.ndarray:
    """Pixels more than RING_INNER and at most RING_OUTER px from the nearest mask pixel (bool, mask's shape)."""
    ring = np.zeros(mask.shape, dtype=bool)
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        return ring
    pad = int(math.ceil(RING_OUTER)) + 1
    y0, y1 = max(ys[0] - pad, 0), min(ys[-1] + pad + 1, mask.shape[0])
    x0, x1 = max(xs[0] - pad, 0), min(xs[-1] + pad + 1, mask.shape[1])
    dist = ndi.distance_transform_edt(~mask[y0:y1, x0:x1])
    ring[y0:y1, x0:x1] = (dist > RING_INNER) & (dist <= RING_OUTER)
    return ring


# --------------------------------------------------------------------------- rendering and calibration

@dataclass
class _Plan:
    """A defect before its amplitude is known.

    field: float32 (H, W) signed shape in [-1, 1] (normalised and cut by :func:`_realise`).
    mode: "add" (luminance + field * a), "mul" (times 1 + field * a / ref) or
        "replace" (blend towards a foreign material of luminance ref + sign * a + texture).
    chroma: (3,) zero-luminance colour direction; "add"/"mul": grey levels per unit of
        |field| * a; "replace": grey levels added to the material. None for none.
    sign: "replace" only: +1 brighter material, -1 darker.
    opacity: "replace" only: material opacity in (0, 1].
    texture: "replace" only: (H, W) float32 material texture in units of the local std.
    """

    field: np.ndarray
    mode: str
    chroma: np.ndarray | None = None
    sign: float = 1.0
    opacity: float = 1.0
    texture: np.ndarray | None = None


def _zero_luma(colour: tuple[int, int, int] | np.ndarray) -> np.ndarray:
    """Chromatic part of a colour with unit peak: ``c - luma(c)``, scaled to max |.| = 1 (float32 (3,))."""
    c = np.asarray(colour, dtype=np.float32)
    d = c - float(c @ _LUMA32)
    peak = float(np.abs(d).max())
    return (d / peak if peak > 0 else d).astype(np.float32)


def _render(before: np.ndarray, field: np.ndarray, texture: np.ndarray | None, plan: _Plan, a: float,
            ref: float, std: float, gray: bool) -> np.ndarray:
    """Float RGB ``(..., 3)`` in [0, 255]: ``before`` ``(..., 3)`` with the effect at amplitude ``a`` (grey levels).

    ``field`` and ``texture`` have the leading shape of ``before`` (a crop, or the
    flat list of mask pixels during calibration).
    """
    mag = np.abs(field)
    if plan.mode == "add":
        out = before + (field * a)[..., None]
        if plan.chroma is not None and not gray:
            out = out + (mag * a)[..., None] * plan.chroma
    elif plan.mode == "mul":
        out = before * (1.0 + field * (a / ref))[..., None]
        if plan.chroma is not None and not gray:
            out = out + (mag * a)[..., None] * plan.chroma
    else:
        material = ref + plan.sign * a + (texture * std if texture is not None else 0.0)
        target = np.broadcast_to(np.asarray(material, np.float32)[..., None], before.shape)
        if plan.chroma is not None and not gray:
            target = target + plan.chroma
        out = before + (mag * plan.opacity)[..., None] * (target - before)
    out = np.clip(out, 0.0, 255.0)
    if gray:
        out = np.repeat((out @ _LUMA32)[..., None], 3, axis=-1)
    return out


def _realise(rgb: np.ndarray, before: np.ndarray, lum: np.ndarray, plan: _Plan, k: float,
             gray: bool) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Normalise the plan's field, calibrate its amplitude to contrast ``k`` and draw it.

    Returns ``(image uint8, mask bool, achieved contrast)`` or None when nothing usable was drawn.
    """
    field = plan.field.astype(np.float32)
    peak = float(np.abs(field).max())
    if not math.isfinite(peak) or peak <= 0:
        return None
    field = field / peak
    mag = np.abs(field)
    field = np.sign(field) * np.clip((mag - CUT_LEVEL) / (1.0 - CUT_LEVEL), 0.0, 1.0)
    mag = np.abs(field)
    mask_geo = mag >= MASK_LEVEL
    if not mask_geo.any():
        return None
    # faint islands that never reach the mask level are not drawn at all
    labels, n_labels = ndi.label(mag > 0)
    keep = np.zeros(n_labels + 1, dtype=bool)
    keep[np.unique(labels[mask_geo])] = True
    keep[0] = False
    support = keep[labels]
    field = np.where(support, field, 0.0).astype(np.float32)
    ring = _ring(mask_geo)
    if not ring.any():
        return None
    std = max(float(lum[ring].std()), DRAW_STD_FLOOR)
    ys = np.flatnonzero(support.any(axis=1))
    xs = np.flatnonzero(support.any(axis=0))
    sl = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
    b, lm, f, sup, mg = before[sl], lum[sl], field[sl], support[sl], mask_geo[sl]
    ref = float(lm[mg].mean())
    if plan.mode == "mul":
        ref = max(ref, 8.0)
    tex = plan.texture[sl] if plan.texture is not None else None
    # calibration only needs the mask pixels
    b_m, f_m, lm_m = b[mg], f[mg], lm[mg]
    tex_m = tex[mg] if tex is not None else None
    target = k * std

    def change(a: float) -> float:
        out_m = _render(b_m, f_m, tex_m, plan, a, ref, std, gray)
        return float(np.abs(out_m @ _LUMA32 - lm_m).mean())

    a = _solve_amplitude(change, target)
    out = _render(b, f, tex, plan, a, ref, std, gray)
    out_u8 = np.clip(np.round(out), 0, 255).astype(np.uint8)
    after = rgb.copy()
    crop = after[sl]
    crop[sup] = out_u8[sup]
    diff = np.abs(after.astype(np.int16) - rgb.astype(np.int16)).max(axis=2)
    mask = mask_geo & (diff >= 1)
    if not mask.any() or not _ring(mask).any():
        return None
    return after, mask, defect_contrast(rgb, after, mask)


def _solve_amplitude(change, target: float, a_max: float = 255.0) -> float:
    """Smallest amplitude in [0, a_max] whose mean luminance change reaches ``target`` (bracket + bisection).

    ``change(a)`` need not be monotone near 0 (replacement by a textured material
    already changes the image at ``a = 0``); the bracket is the first point of a
    geometric grid that reaches the target. Returns ``a_max`` when none does.
    """
    if change(0.0) >= target:
        return 0.0
    grid = np.concatenate([[0.0], np.geomspace(0.25, a_max, 28)])
    prev = 0.0
    for a in grid[1:]:
        if change(float(a)) >= target:
            lo, hi = prev, float(a)
            for _ in range(10):
                mid = 0.5 * (lo + hi)
                if change(mid) >= target:
                    hi = mid
                else:
                    lo = mid
            return hi
        prev = float(a)
    return a_max


# --------------------------------------------------------------------------- geometry helpers

def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _resample(points: np.ndarray, step: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Points every ``step`` px along a polyline ((N, 2) x, y) and their arc-length fraction t in [0, 1]."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    total = float(s[-1])
    if total <= 0:
        return points[:1].copy(), np.zeros(1)
    n = max(int(total / step), 1) + 1
    ts = np.linspace(0.0, total, n)
    pts = np.stack([np.interp(ts, s, points[:, 0]), np.interp(ts, s, points[:, 1])], axis=1)
    return pts, ts / total


def _profile(rng: np.random.Generator, t: np.ndarray, n_knots: int, lo: float, hi: float,
             gap_prob: float = 0.0) -> np.ndarray:
    """Piecewise-linear random profile over t in [0, 1]: knot values in [lo, hi], some knots 0 (gaps)."""
    knots = np.linspace(0.0, 1.0, n_knots)
    vals = rng.uniform(lo, hi, n_knots)
    if gap_prob > 0:
        vals[rng.random(n_knots) < gap_prob] = 0.0
    return np.interp(t, knots, vals)


def _line_field(shape: tuple[int, int], pts: np.ndarray, widths: np.ndarray,
                gains: np.ndarray) -> np.ndarray:
    """Gaussian-profile stroke along dense points ((N, 2) x, y, spacing <= ~0.4 px).

    Each pixel near the stroke takes ``gain_j * exp(-d^2 / (2 sigma_j^2))`` of its
    nearest centre-line point ``j`` (k-d tree query), where ``sigma_j`` makes the
    full width at half maximum equal ``widths[j]`` px. Returns float32 (H, W) >= 0.
    """
    h, w = shape
    field = np.zeros(shape, dtype=np.float32)
    if len(pts) == 0:
        return field
    reach = int(math.ceil(1.2 * float(widths.max()) + 1.0))
    base = np.unique(np.round(pts).astype(np.int64), axis=0)
    oy, ox = np.mgrid[-reach:reach + 1, -reach:reach + 1]
    offs = np.stack([ox.ravel(), oy.ravel()], axis=1)
    cand = (base[:, None, :] + offs[None, :, :]).reshape(-1, 2)
    ok = (cand[:, 0] >= 0) & (cand[:, 0] < w) & (cand[:, 1] >= 0) & (cand[:, 1] < h)
    cand = cand[ok]
    if cand.size == 0:
        return field
    lin = np.unique(cand[:, 1] * w + cand[:, 0])
    cy, cx = lin // w, lin % w
    dist, j = cKDTree(pts).query(np.stack([cx, cy], axis=1).astype(np.float64), k=1)
    sigma = widths[j] / 2.3548
    val = gains[j] * np.exp(-0.5 * (dist / sigma) ** 2)
    field[cy, cx] = val.astype(np.float32)
    return field


def _value_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Smooth 2-D noise: a coarse Gaussian grid (one value per ``cell`` px) upsampled bicubically; unit std."""
    h, w = shape
    cell = max(float(cell), 1.5)
    gh, gw = int(math.ceil(h / cell)) + 4, int(math.ceil(w / cell)) + 4
    grid = rng.normal(size=(gh, gw))
    up = ndi.zoom(grid, cell, order=3, mode="mirror", grid_mode=False)
    off = int(cell)
    out = up[off:off + h, off:off + w]
    if out.shape != (h, w):  # rounding of the zoomed size; pad by edge values
        out = np.pad(out, ((0, h - out.shape[0]), (0, w - out.shape[1])), mode="edge")
    out = out - out.mean()
    sd = out.std()
    return (out / sd if sd > 0 else out).astype(np.float32)


def _window(cx: float, cy: float, r: float, shape: tuple[int, int]) -> tuple[slice, slice] | None:
    h, w = shape
    y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 2, h)
    x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 2, w)
    if y0 >= y1 or x0 >= x1:
        return None
    return slice(y0, y1), slice(x0, x1)


def _thick(scale: float) -> float:
    """Width multiplier: widths grow with the square root of the image scale, never below 1."""
    return max(1.0, math.sqrt(scale))


# --------------------------------------------------------------------------- planners (one per type)

def _bezier(p0, p1, p2, p3, n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t ** 2 * p2 + t ** 3 * p3


def _plan_scratch(shape: tuple[int, int], scale: float, rng: np.random.Generator) -> _Plan:
    h, w = shape
    side = min(h, w)
    length = float(rng.uniform(0.25, 0.7)) * side
    ang = float(rng.uniform(0.0, np.pi))
    d = np.array([math.cos(ang), math.sin(ang)])
    nrm = np.array([-d[1], d[0]])
    c = rng.uniform([0.25 * w, 0.25 * h], [0.75 * w, 0.75 * h])
    p0, p3 = c - d * length / 2, c + d * length / 2
    if rng.random() < 0.5:  # cubic Bezier, slight (possibly S-shaped) curvature
        b1, b2 = rng.uniform(-0.07, 0.07, 2) * length
        centre = _bezier(p0, p0 + d * length / 3 + nrm * b1, p0 + 2 * d * length / 3 + nrm * b2, p3, 64)
    else:  # polyline of 3-5 straight runs with small bends
        k = int(rng.integers(3, 6))
        ts = np.concatenate([[0.0], np.sort(rng.uniform(0.1, 0.9, k - 1)), [1.0]])
        lateral = rng.normal(0.0, 0.02 * length, k + 1)
        lateral[[0, -1]] *= 0.3
        centre = p0 + ts[:, None] * (p3 - p0) + lateral[:, None] * nrm
    pts, t = _resample(centre)
    n_strokes = 1 if rng.random() < 0.55 else int(rng.integers(2, 5))
    spacing = float(rng.uniform(2.5, 6.0)) * max(1.0, scale)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    field = np.zeros(shape, np.float32)
    widths_used = []
    for i in range(n_strokes):
        offset = (i - (n_strokes - 1) / 2) * spacing * float(rng.uniform(0.8, 1.2))
        t0, t1 = (0.0, 1.0) if i == 0 else (float(rng.uniform(0.0, 0.35)), float(rng.uniform(0.65, 1.0)))
        sel = (t >= t0) & (t <= t1)
        tt = (t[sel] - t0) / max(t1 - t0, 1e-6)
        width = float(rng.uniform(1.0, 2.0)) * _thick(scale)
        widths_used.append(width)
        ends = np.clip(np.minimum(tt, 1 - tt) / float(rng.uniform(0.04, 0.12)), 0.0, 1.0) ** 0.7
        pressure = _profile(rng, tt, int(rng.integers(6, 14)), 0.45, 1.0, gap_prob=0.1)
        gains = float(rng.uniform(0.6, 1.0)) * ends * pressure
        gains = np.where(pressure > 0, np.maximum(gains, 0.5 * ends), 0.0)
        f = _line_field(shape, pts[sel] + offset * nrm, np.full(sel.sum(), width), gains)
        field = np.maximum(field, f)
    field = sign * field
    if n_strokes == 1 and rng.random() < 0.25:  # groove: a lit (or shaded) lip along one side
        side_sign = 1.0 if rng.random() < 0.5 else -1.0
        lip_off = (widths_used[0] * 0.9 + 0.6) * side_sign
        lip = _line_field(shape, pts + lip_off * nrm, np.full(len(pts), max(1.0, widths_used[0] * 0.7)),
                          np.full(len(pts), 0.45))
        field = np.where(np.abs(field) >= lip, field, -sign * lip)
    return _Plan(field, "add")


def _fractal_path(rng: np.random.Generator, p0: np.ndarray, p1: np.ndarray, rough: float,
                  min_seg: float = 1.5) -> np.ndarray:
    """Recursive midpoint displacement between two points: (N, 2) jagged, self-similar path."""
    pts = np.stack([p0, p1]).astype(np.float64)
    seg = float(np.linalg.norm(p1 - p0))
    while seg > min_seg and len(pts) < 4097:
        a, b = pts[:-1], pts[1:]
        diff = b - a
        mid = (a + b) / 2 + np.stack([-diff[:, 1], diff[:, 0]], axis=1) * rng.normal(0.0, rough, len(a))[:, None]
        out = np.empty((2 * len(pts) - 1, 2))
        out[0::2] = pts
        out[1::2] = mid
        pts = out
        seg /= 2
    return pts


def _plan_crack(shape: tuple[int, int], scale: float, rng: np.random.Generator) -> _Plan:
    h, w = shape
    side = min(h, w)
    thick = _thick(scale)
    length = float(rng.uniform(0.3, 0.75)) * side
    ang = float(rng.uniform(-np.pi, np.pi))
    d = np.array([math.cos(ang), math.sin(ang)])
    c = rng.uniform([0.3 * w, 0.3 * h], [0.7 * w, 0.7 * h])
    p0, p1 = c - d * length / 2, c + d * length / 2
    rough = float(rng.uniform(0.1, 0.22))
    wmax = float(rng.uniform(2.0, 3.0)) * thick
    wmin = 1.0 * thick
    power = float(rng.uniform(0.6, 1.3))

    def path(a: np.ndarray, b: np.ndarray, w0: float, rough_: float):
        pts, t = _resample(_fractal_path(rng, a, b, rough_))
        wid = wmin + (w0 - wmin) * (1 - t) ** power
        wid = wid * (1 + 0.12 * _profile(rng, t, 8, -1.0, 1.0))
        wid = np.maximum(wid, wmin)
        gains = 0.55 + 0.45 * np.clip((wid - wmin) / max(wmax - wmin, 1e-6), 0, 1)
        return pts, t, wid, gains

    paths = [path(p0, p1, wmax, rough)]
    for _ in range(int(rng.integers(1, 4))):
        pts, t, wid, _g = paths[0]
        i = int(np.searchsorted(t, float(rng.uniform(0.1, 0.7))))
        i = min(i, len(pts) - 2)
        tangent = pts[min(i + 5, len(pts) - 1)] - pts[max(i - 5, 0)]
        base = math.atan2(tangent[1], tangent[0]) + (1 if rng.random() < 0.5 else -1) * float(rng.uniform(0.35, 1.0))
        blen = (1 - t[i]) * length * float(rng.uniform(0.3, 0.6))
        if blen < 4:
            continue
        end = pts[i] + blen * np.array([math.cos(base), math.sin(base)])
        paths.append(path(pts[i], end, max(wid[i] * 0.8, wmin), rough * 1.2))
        if rng.random() < 0.35:  # a branch of the branch
            bp, bt, bw, _g = paths[-1]
            j = min(int(np.searchsorted(bt, float(rng.uniform(0.2, 0.6)))), len(bp) - 2)
            tan2 = bp[min(j + 5, len(bp) - 1)] - bp[max(j - 5, 0)]
            b2 = math.atan2(tan2[1], tan2[0]) + (1 if rng.random() < 0.5 else -1) * float(rng.uniform(0.4, 1.0))
            l2 = blen * (1 - bt[j]) * float(rng.uniform(0.4, 0.8))
            if l2 >= 4:
                paths.append(path(bp[j], bp[j] + l2 * np.array([math.cos(b2), math.sin(b2)]),
                                  max(bw[j] * 0.8, wmin), rough * 1.2))
    dark = np.zeros(shape, np.float32)
    for pts, _t, wid, gains in paths:
        dark = np.maximum(dark, _line_field(shape, pts, wid, gains))
    field = -dark
    if rng.random() < 0.3:  # spalled lip catching the light along the main fracture
        pts, _t, wid, _g = paths[0]
        la = float(rng.uniform(-np.pi, np.pi))
        off = np.array([math.cos(la), math.sin(la)]) * (wmax * 0.6 + 0.8)
        lip = _line_field(shape, pts + off, np.full(len(pts), wmin), np.full(len(pts), 0.35))
        field = np.where(dark >= lip, field, lip)
    return _Plan(field, "mul")


def _pit(dx: np.ndarray, dy: np.ndarray, a: float, b: float, phi: float, lx: float, ly: float,
         rim_gain: float) -> np.ndarray:
    """Signed shading of one elliptic pit (semi-axes a, b px, angle phi) lit from direction (lx, ly)."""
    u = dx * math.cos(phi) + dy * math.sin(phi)
    v = -dx * math.sin(phi) + dy * math.cos(phi)
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    toward = (dx * lx + dy * ly) / (np.hypot(dx, dy) + 1e-6)  # +1 on the side facing the light source
    edge = max(0.12, 0.5 / b)  # at least half a pixel of soft edge
    inside = 1.0 - _smoothstep(1.0 - 2 * edge, 1.0 + edge, r)
    bowl = inside * (0.55 + 0.45 * np.clip(1.0 - r * r, 0.0, 1.0))
    # the wall nearer the light is in the rim's shadow (darker); the far wall is lit (lighter)
    interior = -bowl * (1.0 + 0.45 * toward * np.clip(r, 0, 1)) + 0.25 * inside * np.clip(-toward, 0, 1) * r
    rim_w = max(0.17, 0.7 / b)
    rim = np.exp(-(((r - 1.0 - 1.2 * rim_w) / rim_w) ** 2)) * (1.0 - inside)
    exterior = rim_gain * rim * toward  # highlight facing the light, soft shadow on the far side
    return interior + exterior


def _plan_hole(shape: tuple[int, int], scale: float, rng: np.random.Generator) -> _Plan:
    h, w = shape
    light = float(rng.uniform(-np.pi, np.pi))
    lx, ly = math.cos(light), math.sin(light)
    diam = max(float(rng.uniform(4.0, 14.0)) * scale, 3.0)
    aspect = float(rng.uniform(0.6, 1.0))
    n = 1 if rng.random() < 0.7 else int(rng.integers(2, 4))
    need = 1.5 * MIN_AREA_FRACTION * h * w
    n = int(min(max(n, math.ceil(need / (0.6 * diam * diam * aspect))), 9))  # small pits come in clusters
    c0 = rng.uniform([0.15 * w, 0.15 * h], [0.85 * w, 0.85 * h])
    rim_gain = float(rng.uniform(0.35, 0.7))
    field = np.zeros(shape, np.float32)
    for i in range(n):
        cx, cy = c0 if i == 0 else c0 + rng.normal(0.0, 1.2 * diam * math.sqrt(n), 2)
        cx, cy = float(np.clip(cx, 2, w - 3)), float(np.clip(cy, 2, h - 3))
        a = diam * (1.0 if i == 0 else float(rng.uniform(0.6, 1.1))) / 2
        b = a * float(np.clip(aspect * rng.uniform(0.9, 1.1), 0.5, 1.0))
        phi = float(rng.uniform(0.0, np.pi))
        win = _window(cx, cy, a + 2.6 * max(0.17 * a, 0.7) + 2, shape)
        if win is None:
            continue
        yy, xx = np.mgrid[win[0], win[1]].astype(np.float32)
        # 3 x 3 supersampling: pits are only a few pixels across
        pit = np.zeros(yy.shape, np.float32)
        for oy in (-1 / 3, 0.0, 1 / 3):
            for ox in (-1 / 3, 0.0, 1 / 3):
                pit += _pit(xx + ox - cx, yy + oy - cy, a, b, phi, lx, ly, rim_gain)
        pit = np.clip(pit / 9.0, -1.0, 1.0)
        cur = field[win]
        field[win] = np.where(np.abs(pit) > np.abs(cur), pit, cur)
    return _Plan(field, "add")


def _plan_stain(shape: tuple[int, int], scale: float, rng: np.random.Generator) -> _Plan:
    h, w = shape
    side = min(h, w)
    rad = float(rng.uniform(0.12, 0.28)) * side
    aspect = float(rng.uniform(0.55, 1.0))
    phi = float(rng.uniform(0.0, np.pi))
    cx, cy = rng.uniform([0.3 * w, 0.3 * h], [0.7 * w, 0.7 * h])
    field = np.zeros(shape, np.float32)
    win = _window(float(cx), float(cy), 1.6 * rad, shape)
    wshape = (win[0].stop - win[0].start, win[1].stop - win[1].start)
    yy, xx = np.mgrid[win[0], win[1]].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    u = dx * math.cos(phi) + dy * math.sin(phi)
    v = -dx * math.sin(phi) + dy * math.cos(phi)
    env = np.exp(-((u / rad) ** 2 + (v / (rad * aspect)) ** 2))
    n1 = _value_noise(rng, wshape, rad * float(rng.uniform(0.35, 0.6)))
    n2 = _value_noise(rng, wshape, rad * 0.15)
    val = env * (1.0 + 0.5 * (0.85 * n1 + 0.4 * n2))
    blob = val > 0.5
    if not blob.any():
        return _Plan(field, "add")
    # soft edge in pixels: a smoothstep across the signed distance to the thresholded blob's outline
    soft = max(float(rng.uniform(0.08, 0.2)) * rad, 1.5)
    signed = ndi.distance_transform_edt(blob) - ndi.distance_transform_edt(~blob)
    alpha = _smoothstep(-soft, soft, signed)
    blotch = _value_noise(rng, wshape, rad * 0.3)
    alpha = alpha * (0.78 + 0.22 * np.tanh(blotch))
    if rng.random() < 0.55:  # darkening (oil, damp, soot): multiplicative
        field[win] = -alpha
        return _Plan(field, "mul")
    tint = _TINTS[int(rng.integers(len(_TINTS)))]
    sign = 1.0 if rng.random() < 0.5 else -1.0
    field[win] = sign * alpha
    return _Plan(field, "add", chroma=_zero_luma(tint) * float(rng.uniform(0.6, 1.4)))


def _plan_contamination(shape: tuple[int, int], scale: float, rng: np.random.Generator) -> _Plan:
    h, w = shape
    side = min(h, w)
    thick = _thick(scale)
    colour = _FOREIGN[int(rng.integers(len(_FOREIGN)))]
    variant = int(rng.integers(3))
    field = np.zeros(shape, np.float32)
    if variant == 0:  # cloud of soft specks (dust, grit, spatter)
        n = int(rng.integers(12, 46))
        major = float(rng.uniform(0.03, 0.09)) * side
        minor = major * float(rng.uniform(0.25, 0.9))
        rot = float(rng.uniform(0.0, np.pi))
        c = rng.uniform([0.25 * w, 0.25 * h], [0.75 * w, 0.75 * h])
        e = rng.normal(size=(n, 2)) * [major, minor]
        xs = c[0] + e[:, 0] * math.cos(rot) - e[:, 1] * math.sin(rot)
        ys = c[1] + e[:, 0] * math.sin(rot) + e[:, 1] * math.cos(rot)
        sig = rng.uniform(0.6, 1.6, n) * thick
        gain = rng.uniform(0.45, 1.0, n)
        for x, y, s_, g in zip(xs, ys, sig, gain, strict=True):
            win = _window(float(x), float(y), 3 * s_ + 1, shape)
            if win is None:
                continue
            yy, xx = np.mgrid[win[0], win[1]].astype(np.float32)
            blob = g * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s_ * s_))
            field[win] = np.maximum(field[win], blob)
        sign = -1.0 if rng.random() < 0.65 else 1.0
        return _Plan(sign * field, "add", chroma=_zero_luma(colour) * float(rng.uniform(0.3, 1.0)))
    sign = -1.0 if rng.random() < 0.5 else 1.0
    chroma = _zero_luma(colour) * float(rng.uniform(10.0, 45.0))
    if variant == 1:  # a loose fibre / hair: smooth curly strand
        length = float(rng.uniform(0.2, 0.55)) * side
        n = int(length / 0.3) + 2
        t = np.linspace(0.0, 1.0, n)
        h0 = float(rng.uniform(-np.pi, np.pi))
        amp = rng.uniform(0.2, 1.1, 2)
        freq = rng.uniform(0.3, 1.6, 2)
        ph = rng.uniform(0.0, 2 * np.pi, 2)
        heading = h0 + (amp[:, None] * np.sin(2 * np.pi * freq[:, None] * t[None, :] + ph[:, None])).sum(axis=0)
        steps = np.stack([np.cos(heading), np.sin(heading)], axis=1) * (length / (n - 1))
        pts = np.concatenate([[[0.0, 0.0]], np.cumsum(steps, axis=0)[:-1]])
        pts = pts - pts.mean(axis=0) + rng.uniform([0.3 * w, 0.3 * h], [0.7 * w, 0.7 * h])
        width = float(rng.uniform(1.0, 1.8)) * thick
        ends = np.clip(np.minimum(t, 1 - t) / 0.05, 0.3, 1.0)
        field = _line_field(shape, pts, np.full(n, width), ends * rng.uniform(0.85, 1.0))
        return _Plan(field, "replace", chroma=chroma, sign=sign, opacity=float(rng.uniform(0.8, 1.0)),
                     texture=np.zeros(shape, np.float32))
    # an opaque patch of foreign material with its own fine texture and a sharp edge
    rad = float(rng.uniform(0.035, 0.09)) * side
    aspect = float(rng.uniform(0.5, 1.0))
    phi = float(rng.uniform(0.0, np.pi))
    cx, cy = rng.uniform([0.25 * w, 0.25 * h], [0.75 * w, 0.75 * h])
    win = _window(float(cx), float(cy), 1.6 * rad + 2, shape)
    wshape = (win[0].stop - win[0].start, win[1].stop - win[1].start)
    yy, xx = np.mgrid[win[0], win[1]].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    u = dx * math.cos(phi) + dy * math.sin(phi)
    v = -dx * math.sin(phi) + dy * math.cos(phi)
    env = np.exp(-((u / rad) ** 2 + (v / (rad * aspect)) ** 2))
    val = env * (1.0 + 0.5 * _value_noise(rng, wshape, rad * 0.4))
    edge = 0.6 / max(rad, 1.0)  # about one pixel of anti-aliasing
    field[win] = _smoothstep(0.5 - edge, 0.5 + edge, val)
    texture = np.zeros(shape, np.float32)
    grain = float(rng.uniform(1.5, 4.0)) * thick
    texture[win] = _value_noise(rng, wshape, grain) * float(rng.uniform(0.4, 1.3))
    return _Plan(field, "replace", chroma=chroma, sign=sign, opacity=float(rng.uniform(0.75, 1.0)),
                 texture=texture)


_PLANNERS = {
    "scratch": _plan_scratch,
    "crack": _plan_crack,
    "hole": _plan_hole,
    "stain": _plan_stain,
    "contamination": _plan_contamination,
}
