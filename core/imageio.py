"""Safe image loading shared by every entry point (CLI, app, tools, stores).

All user images go through :func:`load_rgb`, which turns every failure into an
:class:`InvalidImageError` with a message a person can act on.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import InputError
from core.settings import get_settings


class InvalidImageError(InputError):
    """The input is not a readable, reasonably sized raster image."""


def load_rgb(source: str | Path | bytes | Image.Image | np.ndarray, max_pixels: int | None = None) -> np.ndarray:
    """Load an image as an RGB uint8 array ``(H, W, 3)``.

    Handles EXIF orientation, palette / RGBA / 16-bit / grayscale inputs.

    Args:
        source: a file path, encoded bytes, a PIL image or an array
            (``(H, W)`` or ``(H, W, 3|4)``, uint8 or uint16).
        max_pixels: refuse images with more pixels than this (decompression
            bombs); defaults to ``Settings.max_image_pixels``.

    Raises:
        InvalidImageError: missing file, not an image, truncated data, too large.
    """
    if max_pixels is None:
        max_pixels = get_settings().max_image_pixels
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    if isinstance(source, Image.Image):
        img = source
    else:
        name = "uploaded bytes"
        if isinstance(source, (str, Path)):
            path = Path(source)
            name = path.name
            if not path.is_file():
                raise InvalidImageError(f"image file not found: {path}")
            data = path.read_bytes()
        else:
            data = bytes(source)
        if not data:
            raise InvalidImageError(f"{name} is empty (0 bytes), not an image")
        try:
            probe = Image.open(io.BytesIO(data))
            w, h = probe.size
        except Image.DecompressionBombError as exc:
            raise InvalidImageError(
                f"{name} is above the limit of {max_pixels:,} pixels (decompression bomb guard): {exc}"
            ) from None
        except UnidentifiedImageError:
            raise InvalidImageError(f"{name} is not a recognised image file (PNG, JPEG, BMP, TIFF, WebP ...)") from None
        except Exception as exc:  # noqa: BLE001 - PIL raises many types on bad headers
            raise InvalidImageError(f"{name} could not be read as an image: {exc}") from None
        if w * h > max_pixels:
            raise InvalidImageError(
                f"{name} is {w}x{h} pixels, above the limit of {max_pixels:,} pixels (DRA_MAX_IMAGE_PIXELS)"
            )
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except Exception as exc:  # noqa: BLE001
            raise InvalidImageError(f"{name} is truncated or corrupt: {exc}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - broken EXIF must not block the pixels
        pass
    return _pil_to_rgb(img)


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        return _array_to_rgb((arr / hi * 255.0).clip(0, 255).astype(np.uint8))
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        rng = float(arr.max() - arr.min()) or 1.0
        return _array_to_rgb(((arr - arr.min()) / rng * 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint16:
        arr = (arr.astype(np.float64) / 65535.0 * 255.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InvalidImageError(f"array of shape {arr.shape} is not an image")
    return np.ascontiguousarray(arr)


def content_hash(rgb: np.ndarray) -> str:
    """sha256 hex digest of the decoded pixels and shape (same picture, same hash)."""
    h = hashlib.sha256()
    h.update(str(rgb.shape).encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()


def save_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Write an RGB or grayscale uint8 array as PNG, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path
