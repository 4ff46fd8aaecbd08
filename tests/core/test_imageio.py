"""Image loading: every odd input either decodes to RGB uint8 or raises InvalidImageError."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from core.imageio import InvalidImageError, content_hash, load_rgb


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


@pytest.fixture()
def photo() -> np.ndarray:
    import skimage.data

    return np.repeat(skimage.data.brick()[:64, :96, None], 3, axis=2)  # rows 0-63 only


def test_rgb_roundtrip(photo, tmp_path):
    p = tmp_path / "a.png"
    Image.fromarray(photo).save(p)
    out = load_rgb(p)
    assert out.dtype == np.uint8 and out.shape == (64, 96, 3)
    assert np.array_equal(out, photo)


def test_modes_rgba_palette_16bit_gray(photo):
    rgba = Image.fromarray(photo).convert("RGBA")
    assert load_rgb(_png_bytes(rgba)).shape == (64, 96, 3)
    pal = Image.fromarray(photo).convert("P")
    assert load_rgb(_png_bytes(pal)).shape == (64, 96, 3)
    g16 = Image.fromarray((photo[..., 0].astype(np.uint16) * 257), mode="I;16")
    out = load_rgb(_png_bytes(g16))
    assert out.shape == (64, 96, 3) and abs(int(out[..., 0].mean()) - int(photo[..., 0].mean())) <= 2
    assert load_rgb(photo[..., 0]).shape == (64, 96, 3)


def test_exif_rotation_is_applied(photo):
    img = Image.fromarray(photo)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    out = load_rgb(buf.getvalue())
    assert out.shape == (96, 64, 3)


@pytest.mark.parametrize("data,needle", [
    (b"", "empty"),
    (b"%PDF-1.4 not an image", "not a recognised image"),
])
def test_garbage(data, needle):
    with pytest.raises(InvalidImageError, match=needle):
        load_rgb(data)


def test_truncated_png(photo):
    data = _png_bytes(Image.fromarray(photo))
    with pytest.raises(InvalidImageError, match="truncated|corrupt|could not be read"):
        load_rgb(data[: len(data) // 2])


def test_decompression_bomb_refused_before_decoding():
    # a 20000x20000 1-bit PNG is tiny on disk but 400 Mpx when decoded
    big = Image.new("1", (20000, 20000))
    data = _png_bytes(big, optimize=True)
    assert len(data) < 2_000_000
    with pytest.raises(InvalidImageError, match="above the limit"):
        load_rgb(data, max_pixels=40_000_000)


def test_missing_file(tmp_path):
    with pytest.raises(InvalidImageError, match="not found"):
        load_rgb(tmp_path / "nope.png")


def test_content_hash_depends_on_pixels(photo):
    other = photo.copy()
    other[0, 0, 0] ^= 1
    assert content_hash(photo) == content_hash(photo.copy())
    assert content_hash(photo) != content_hash(other)
