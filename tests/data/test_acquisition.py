"""Tests for the acquisition changes (data/acquisition.py) on real texture crops.

The texture is ``skimage.data.grass()`` sliced to rows 0-255 the moment it is
loaded (rows 320-511 of the source photos are reserved and never read).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from scipy import ndimage as ndi

from data import acquisition as acq

LUMA = np.array([0.299, 0.587, 0.114])


@functools.lru_cache(maxsize=None)
def _texture(colour: bool) -> np.ndarray:
    import skimage.data

    gray = np.array(skimage.data.grass()[:256], dtype=np.uint8, copy=True)[:160, :200]  # rows 0-255 only
    if colour:
        stops = [0, 120, 255]
        colours = np.array([(8, 22, 4), (78, 118, 38), (205, 228, 160)], dtype=np.float64)
        img = np.clip(np.round(np.stack([np.interp(gray, stops, colours[:, c]) for c in range(3)], -1)), 0, 255)
        img = img.astype(np.uint8)
    else:
        img = np.repeat(gray[..., None], 3, axis=2)
    img.setflags(write=False)
    return img


def _gray(img: np.ndarray) -> bool:
    return bool((img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all())


def _lum(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64) @ LUMA


def _detail(img: np.ndarray) -> float:
    return float(ndi.laplace(_lum(img)).std())


@pytest.mark.parametrize("colour", [True, False], ids=["colour", "gray"])
@pytest.mark.parametrize("change", acq.ACQUISITION_CHANGES)
def test_every_change_keeps_uint8_rgb_and_gray_stays_gray(change, colour):
    img = _texture(colour)
    before = img.copy()
    out = acq.apply_change(img, change, np.random.default_rng(0))
    assert np.array_equal(img, before), "the input must not be modified"
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    if change != "scale":
        assert out.shape == img.shape
    if not colour or change == "gray":
        assert _gray(out)
    if change != "gray" or colour:
        assert not np.array_equal(out, img), f"{change} left the image unchanged"


@pytest.mark.parametrize("factor", [0.8, 0.93, 1.0, 1.17, 1.2])
def test_scale_changes_the_size_by_the_factor(factor):
    img = _texture(True)
    out = acq.apply_change(img, "scale", np.random.default_rng(0), amount=factor)
    h, w = img.shape[:2]
    assert abs(out.shape[0] - h * factor) <= 1 and abs(out.shape[1] - w * factor) <= 1
    assert abs(_lum(out).mean() - _lum(img).mean()) < 2.0
    for seed in range(5):  # default factor drawn from [0.8, 1.2]
        out = acq.apply_change(img, "scale", np.random.default_rng(seed))
        f = out.shape[0] / h
        assert 0.8 - 1 / h <= f <= 1.2 + 1 / h
        assert abs(out.shape[1] - w * f) <= 1.5


def test_rescale_is_antialiased():
    checker = ((np.indices((128, 128)).sum(axis=0) % 2) * 255).astype(np.uint8)
    img = np.repeat(checker[..., None], 3, axis=2)
    small = acq.rescale(img, 0.5)
    assert small.shape == (64, 64, 3)
    assert abs(float(small.mean()) - 127.5) < 3 and float(small.std()) < 10  # no aliasing into stripes


def test_to_gray_gives_equal_channels_with_rec601_luminance():
    img = _texture(True)
    g = acq.to_gray(img)
    assert g.dtype == np.uint8 and g.shape == img.shape and _gray(g)
    assert np.abs(g[..., 0].astype(np.float64) - _lum(img)).max() <= 0.5 + 1e-9
    assert np.array_equal(acq.apply_change(img, "gray", np.random.default_rng(0)), g)


@pytest.mark.parametrize("quality", [50, 70, 90])
def test_jpeg_changes_pixels_but_keeps_mean_luminance(quality):
    for colour in (True, False):
        img = _texture(colour)
        out = acq.apply_change(img, "jpeg", np.random.default_rng(0), amount=quality)
        assert (out != img).any()
        assert abs(_lum(out).mean() - _lum(img).mean()) <= 3.0
        assert _gray(out) or colour
    default = acq.apply_change(_texture(True), "jpeg", np.random.default_rng(1))
    assert abs(_lum(default).mean() - _lum(_texture(True)).mean()) <= 3.0


def test_changes_do_what_their_names_say():
    img = _texture(True)
    rng = np.random.default_rng
    assert _detail(acq.apply_change(img, "blur", rng(0), amount=1.0)) < 0.7 * _detail(img)
    assert _detail(acq.apply_change(img, "sharpen", rng(0), amount=1.0)) > 1.3 * _detail(img)
    bright = acq.apply_change(img, "exposure", rng(0), amount=1.2)
    assert _lum(bright).mean() == pytest.approx(min(1.2 * _lum(img).mean(), 255), rel=0.03)
    assert _lum(acq.apply_change(img, "gamma", rng(0), amount=1.4)).mean() < _lum(img).mean() - 5
    assert _lum(acq.apply_change(img, "gamma", rng(0), amount=0.7)).mean() > _lum(img).mean() + 5
    flat = np.full((200, 200, 3), 128, np.uint8)
    noisy = acq.apply_change(flat, "noise", rng(0), amount=3.0)
    assert float(noisy.astype(np.float64).std()) == pytest.approx(3.0, rel=0.1)
    noisy_gray = acq.apply_change(flat, "noise", rng(0), amount=3.0)
    assert _gray(noisy_gray)


@pytest.mark.parametrize("change", acq.ACQUISITION_CHANGES)
def test_apply_change_is_deterministic(change):
    img = _texture(True)
    a = acq.apply_change(img, change, np.random.default_rng(9))
    b = acq.apply_change(img, change, np.random.default_rng(9))
    assert np.array_equal(a, b)


def test_random_acquisition_applies_a_random_subset_deterministically():
    img = _texture(True)
    seen = set()
    for seed in range(12):
        out, names = acq.random_acquisition(img, np.random.default_rng(seed))
        again, names2 = acq.random_acquisition(img, np.random.default_rng(seed))
        assert names == names2 and np.array_equal(out, again)
        assert 1 <= len(names) <= 3 and len(set(names)) == len(names)
        assert set(names) <= set(acq.ACQUISITION_CHANGES)
        assert out.dtype == np.uint8 and out.shape[2] == 3
        if "scale" not in names:
            assert out.shape == img.shape
        if "gray" in names:
            assert _gray(out)
        seen.update(names)
    assert len(seen) >= 6
    out, names = acq.random_acquisition(img, np.random.default_rng(0), n_changes=(2, 2), changes=("blur", "jpeg"))
    assert names == ["blur", "jpeg"]
    out, names = acq.random_acquisition(img, np.random.default_rng(0), n_changes=(0, 0))
    assert names == [] and np.array_equal(out, img)


def test_crop_native_is_a_window_of_the_image():
    img = _texture(True)
    crop = acq.crop_native(img, 96, np.random.default_rng(3))
    assert crop.shape == (96, 96, 3) and crop.dtype == np.uint8
    hits = [(y, x) for y in range(img.shape[0] - 95) for x in range(img.shape[1] - 95)
            if img[y, x, 0] == crop[0, 0, 0] and np.array_equal(img[y:y + 96, x:x + 96], crop)]
    assert hits, "the crop must be an unresized window of the image"
    assert np.array_equal(crop, acq.crop_native(img, 96, np.random.default_rng(3)))
    full_height = acq.crop_native(img, 160, np.random.default_rng(0))
    assert any(np.array_equal(full_height, img[:, x:x + 160]) for x in range(41))


def test_bad_inputs_raise_value_error():
    img = _texture(True)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown acquisition change"):
        acq.apply_change(img, "vignette", rng)
    with pytest.raises(ValueError, match="uint8"):
        acq.apply_change(img.astype(np.float32), "blur", rng)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        acq.apply_change(img[..., 0], "blur", rng)
    for change, amount in (("blur", -1.0), ("scale", 0.0), ("exposure", -0.5), ("gamma", 0.0),
                           ("jpeg", 0), ("jpeg", 120), ("jpeg", 70.5), ("noise", -2.0), ("blur", float("nan"))):
        with pytest.raises(ValueError):
            acq.apply_change(img, change, rng, amount=amount)
    with pytest.raises(ValueError):
        acq.rescale(img, -1.0)
    with pytest.raises(ValueError, match="exceeds"):
        acq.crop_native(img, 500, rng)
    with pytest.raises(ValueError):
        acq.crop_native(img, 0, rng)
    with pytest.raises(ValueError, match="n_changes"):
        acq.random_acquisition(img, rng, n_changes=(3, 1))
    with pytest.raises(ValueError, match="unknown acquisition change"):
        acq.random_acquisition(img, rng, changes=("blur", "fisheye"))
    with pytest.raises(ValueError, match="repeat"):
        acq.random_acquisition(img, rng, changes=("blur", "blur"))
