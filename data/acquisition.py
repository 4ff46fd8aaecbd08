"""Acquisition changes a real inspection line sees, applied to uint8 RGB images.

Between the photos a model was trained on and the photos a line sends later,
the part is the same but the acquisition drifts: the camera sits a little
closer or farther (scale), focus softens (blur), the ISP sharpens, exposure and
tone curve change, a monochrome camera replaces a colour one (gray), images
are re-encoded as JPEG, and sensor noise varies. This module reproduces those
changes so a held-out evaluation can measure robustness to them.

Public API: :data:`ACQUISITION_CHANGES`, :func:`apply_change`,
:func:`random_acquisition`, :func:`acquire` (the same with a defect mask carried along),
:func:`to_gray`, :func:`rescale`,
:func:`crop_native`. Only numpy, scipy and Pillow are used; nothing happens on
import. Every function returns a new array and never modifies its input; every
random choice comes from the ``numpy.random.Generator`` passed in, so a result
is a pure function of the inputs and the generator's state.

Gray inputs (three equal channels) stay gray under every change.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

#: the change names, in the order :func:`random_acquisition` applies them when several are drawn
ACQUISITION_CHANGES = ("scale", "blur", "sharpen", "exposure", "gamma", "gray", "jpeg", "noise")

#: default random ranges (inclusive) of each change's amount when ``amount`` is None
SCALE_RANGE = (0.8, 1.2)        # resize factor
BLUR_RANGE = (0.5, 1.5)         # Gaussian sigma, px
SHARPEN_RANGE = (0.3, 1.2)      # unsharp-mask amount (gain of the high-pass), radius SHARPEN_SIGMA
SHARPEN_SIGMA = 1.0             # unsharp-mask Gaussian sigma, px
EXPOSURE_RANGE = (0.7, 1.3)     # linear gain on grey levels
GAMMA_RANGE = (0.7, 1.4)        # out = 255 * (in / 255) ** gamma
JPEG_RANGE = (50, 90)           # JPEG quality
NOISE_RANGE = (1.0, 4.0)        # Gaussian sensor noise sigma, grey levels

# the physical order of a capture: optics, sensor, ISP, storage
_PIPELINE_ORDER = ("scale", "blur", "exposure", "noise", "gamma", "sharpen", "gray", "jpeg")
_LUMA = np.array([0.299, 0.587, 0.114])


def _check_rgb(rgb: object, name: str = "rgb") -> None:
    if not isinstance(rgb, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(rgb).__name__}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {rgb.dtype}")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"{name} must be (H, W, 3) with H, W >= 1, got shape {rgb.shape}")


def _is_gray(rgb: np.ndarray) -> bool:
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))


def _to_u8(arr: np.ndarray) -> np.ndarray:
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """Rec. 601 luminance replicated to three equal channels.

    Args:
        rgb: ``(H, W, 3)`` uint8.

    Returns:
        ``(H, W, 3)`` uint8 with ``out[..., 0] == out[..., 1] == out[..., 2]``
        ``= round(0.299 R + 0.587 G + 0.114 B)`` (0-255). A gray input is returned unchanged (as a copy).

    Raises:
        ValueError: ``rgb`` is not a ``(H, W, 3)`` uint8 array.
    """
    _check_rgb(rgb)
    lum = _to_u8(rgb.astype(np.float64) @ _LUMA)
    return np.repeat(lum[..., None], 3, axis=2)


def rescale(rgb: np.ndarray, factor: float) -> np.ndarray:
    """Resize by ``factor`` with Pillow's Lanczos filter (antialiased when shrinking).

    The new size is ``(max(1, round(H * factor)), max(1, round(W * factor)))``.

    Args:
        rgb: ``(H, W, 3)`` uint8.
        factor: positive finite scale factor (1.0 returns a copy).

    Returns:
        ``(H', W', 3)`` uint8; gray stays gray.

    Raises:
        ValueError: bad image, or ``factor`` not a positive finite number.
    """
    _check_rgb(rgb)
    f = _number(factor, "factor")
    if f <= 0:
        raise ValueError(f"factor must be positive, got {factor!r}")
    h, w = rgb.shape[:2]
    nh, nw = max(1, int(round(h * f))), max(1, int(round(w * f)))
    if (nh, nw) == (h, w):
        return rgb.copy()
    if _is_gray(rgb):
        g = np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., 0])).resize((nw, nh), Image.LANCZOS))
        return np.repeat(g[..., None], 3, axis=2)
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((nw, nh), Image.LANCZOS)).copy()


def crop_native(rgb: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``size`` x ``size`` crop at native scale (no resizing).

    Args:
        rgb: ``(H, W, 3)`` uint8 with ``H, W >= size``.
        size: crop side in px, integer >= 1.
        rng: generator; the top-left corner is uniform over all valid positions.

    Returns:
        ``(size, size, 3)`` uint8 copy.

    Raises:
        ValueError: bad image, ``size`` not an integer >= 1, or larger than the image.
    """
    _check_rgb(rgb)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be an integer >= 1, got {size!r}")
    h, w = rgb.shape[:2]
    if size > h or size > w:
        raise ValueError(f"crop size {size} exceeds the image ({h} x {w})")
    y0 = int(rng.integers(0, h - size + 1))
    x0 = int(rng.integers(0, w - size + 1))
    return rgb[y0:y0 + size, x0:x0 + size].copy()


def _amount(change: str, amount: object, rng: np.random.Generator) -> float:
    ranges = {"scale": SCALE_RANGE, "blur": BLUR_RANGE, "sharpen": SHARPEN_RANGE, "exposure": EXPOSURE_RANGE,
              "gamma": GAMMA_RANGE, "noise": NOISE_RANGE}
    if amount is None:
        if change == "jpeg":
            return float(rng.integers(JPEG_RANGE[0], JPEG_RANGE[1] + 1))
        lo, hi = ranges[change]
        return float(rng.uniform(lo, hi))
    v = _number(amount, f"{change} amount")
    if change == "jpeg":
        if v != int(v) or not 1 <= v <= 95:
            raise ValueError(f"jpeg quality must be an integer in [1, 95], got {amount!r}")
    elif change in ("scale", "exposure", "gamma") and v <= 0:
        raise ValueError(f"{change} amount must be positive, got {amount!r}")
    elif change in ("blur", "sharpen", "noise") and v < 0:
        raise ValueError(f"{change} amount must be >= 0, got {amount!r}")
    return v


def apply_change(rgb: np.ndarray, change: str, rng: np.random.Generator, *,
                 amount: float | None = None) -> np.ndarray:
    """Apply one acquisition change to a uint8 RGB image.

    Changes and their ``amount`` (drawn uniformly from the default range when None):

    * ``scale``: resize factor, default 0.8-1.2 (:func:`rescale`; the output size changes
      to ``round(H * f) x round(W * f)``);
    * ``blur``: Gaussian blur sigma in px, default 0.5-1.5 (per channel, reflective borders);
    * ``sharpen``: unsharp mask ``x + amount * (x - gauss(x, 1 px))``, default amount 0.3-1.2;
    * ``exposure``: linear gain on grey levels, default 0.7-1.3 (clipped to 0-255);
    * ``gamma``: ``255 * (x / 255) ** gamma``, default 0.7-1.4;
    * ``gray``: :func:`to_gray` (``amount`` ignored, no random draw);
    * ``jpeg``: Pillow JPEG re-encode at quality ``amount`` (integer 1-95), default 50-90
      (a gray image is encoded as one-channel JPEG so that it stays gray);
    * ``noise``: additive Gaussian sensor noise, sigma in grey levels, default 1-4
      (the same noise on all channels of a gray image).

    Args:
        rgb: ``(H, W, 3)`` uint8 (not modified).
        change: one of :data:`ACQUISITION_CHANGES`.
        rng: generator for the amount (when None) and the noise.
        amount: see above; None draws it from ``rng``.

    Returns:
        ``(H, W, 3)`` uint8 (``(H', W', 3)`` for ``scale``); gray input stays gray.

    Raises:
        ValueError: bad image, unknown change, or an amount outside its valid domain
            (scale / exposure / gamma <= 0, blur / sharpen / noise < 0, jpeg quality not an
            integer in 1-95, or not a finite number).
    """
    _check_rgb(rgb)
    if change not in ACQUISITION_CHANGES:
        raise ValueError(f"unknown acquisition change {change!r}; expected one of {', '.join(ACQUISITION_CHANGES)}")
    if change == "gray":
        return to_gray(rgb)
    amt = _amount(change, amount, rng)
    gray = _is_gray(rgb)
    if change == "scale":
        return rescale(rgb, amt)
    x = rgb.astype(np.float32)
    if change == "blur":
        return _to_u8(ndi.gaussian_filter(x, sigma=(amt, amt, 0), mode="reflect")) if amt > 0 else rgb.copy()
    if change == "sharpen":
        low = ndi.gaussian_filter(x, sigma=(SHARPEN_SIGMA, SHARPEN_SIGMA, 0), mode="reflect")
        return _to_u8(x + amt * (x - low))
    if change == "exposure":
        return _to_u8(x * amt)
    if change == "gamma":
        return _to_u8(255.0 * (x / 255.0) ** amt)
    if change == "noise":
        if gray:
            n = rng.normal(0.0, amt, size=rgb.shape[:2]).astype(np.float32)[..., None]
        else:
            n = rng.normal(0.0, amt, size=rgb.shape).astype(np.float32)
        return _to_u8(x + n)
    # jpeg
    buf = io.BytesIO()
    src = Image.fromarray(np.ascontiguousarray(rgb[..., 0])) if gray else Image.fromarray(np.ascontiguousarray(rgb))
    src.save(buf, format="JPEG", quality=int(amt))
    buf.seek(0)
    with Image.open(buf) as im:
        dec = np.asarray(im.convert("L" if gray else "RGB"))
    return np.repeat(dec[..., None], 3, axis=2) if gray else dec.copy()


def random_acquisition(rgb: np.ndarray, rng: np.random.Generator, *, n_changes: tuple[int, int] = (1, 3),
                       changes: tuple[str, ...] | list[str] = ACQUISITION_CHANGES) -> tuple[np.ndarray, list[str]]:
    """Apply a random subset of acquisition changes, each with a random amount.

    The number of changes is drawn uniformly from ``n_changes`` (inclusive,
    capped at ``len(changes)``), the changes are drawn without replacement from
    ``changes`` and applied in the order of a capture (scale, blur, exposure,
    noise, gamma, sharpen, gray, jpeg).

    Args:
        rgb: ``(H, W, 3)`` uint8 (not modified).
        rng: generator for every choice.
        n_changes: ``(lo, hi)`` integers with ``0 <= lo <= hi``.
        changes: the allowed change names (a subset of :data:`ACQUISITION_CHANGES`, no repeats).

    Returns:
        ``(image, names)``: ``(H', W', 3)`` uint8 (the size changes only when
        ``scale`` was applied) and the names applied, in order.

    Raises:
        ValueError: bad image, bad ``n_changes``, or unknown / repeated names in ``changes``.
    """
    out, _, applied = acquire(rgb, rng, n_changes=n_changes, changes=changes)
    return out, applied


def acquire(rgb: np.ndarray, rng: np.random.Generator, *, mask: np.ndarray | None = None,
            n_changes: tuple[int, int] = (1, 3),
            changes: tuple[str, ...] | list[str] = ACQUISITION_CHANGES) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """:func:`random_acquisition` that also carries a defect mask through the geometric change.

    Same draws from ``rng`` as :func:`random_acquisition` (same image for the same state).
    When ``scale`` is applied, the mask is resized to the new image size (bilinear on the
    0/1 mask, kept where >= 0.5; where that would empty it, where > 0); the photometric
    changes leave it as it is.

    Args:
        rgb: ``(H, W, 3)`` uint8 (not modified).
        rng: generator for every choice.
        mask: ``(H, W)`` bool (or 0 / non-zero) defect mask, or None.
        n_changes, changes: as :func:`random_acquisition`.

    Returns:
        ``(image (H', W', 3) uint8, mask (H', W') bool or None, names applied in order)``.

    Raises:
        ValueError: bad image, mask of another shape, bad ``n_changes``, unknown / repeated names.
    """
    _check_rgb(rgb)
    if mask is not None and np.asarray(mask).shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {np.asarray(mask).shape} does not match the image {rgb.shape[:2]}")
    try:
        lo, hi = (int(v) for v in n_changes)
    except (TypeError, ValueError):
        raise ValueError(f"n_changes must be a (lo, hi) pair of integers, got {n_changes!r}") from None
    if lo < 0 or hi < lo:
        raise ValueError(f"n_changes must satisfy 0 <= lo <= hi, got {n_changes!r}")
    names = list(changes)
    unknown = [c for c in names if c not in ACQUISITION_CHANGES]
    if unknown:
        raise ValueError(f"unknown acquisition change(s) {unknown}; expected names from {ACQUISITION_CHANGES}")
    if len(set(names)) != len(names):
        raise ValueError(f"changes must not repeat names, got {names}")
    n = min(int(rng.integers(lo, hi + 1)), len(names))
    picked = {names[i] for i in rng.choice(len(names), size=n, replace=False)} if n else set()
    applied = [c for c in _PIPELINE_ORDER if c in picked]
    out = rgb.copy()
    m = None if mask is None else np.asarray(mask).astype(bool)
    for c in applied:
        out = apply_change(out, c, rng)
        if c == "scale" and m is not None and m.shape != out.shape[:2]:
            small = Image.fromarray(m.astype(np.float32)).resize((out.shape[1], out.shape[0]), Image.BILINEAR)
            arr = np.asarray(small)
            m = arr >= 0.5 if (arr >= 0.5).any() else arr > 0
    return out, m, applied
