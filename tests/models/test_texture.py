"""Pixel-level texture features (models/patchcore/texture.py) and PatchCore banks built on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from skimage import data, draw
from skimage.feature import hessian_matrix, hessian_matrix_eigvals

from core.settings import Settings
from models.patchcore.model import backbone_spec, config_from_meta
from models.patchcore.texture import CHANNELS, SCALES, TextureFeatures, robust_gray, texture_maps
from tests.bank_helpers import PatchCoreBanks, assert_scratches_found, gray_crops


def _crops(n: int, seed: int, h: int = 128, w: int = 160, photo=data.gravel) -> list[np.ndarray]:
    return gray_crops(n, seed, photo, h, w)


def _to_input(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0


def test_hessian_eigenvalues_equal_scikit_image():
    """The Hessian channels are scikit-image's eigenvalues (Gaussian smoothing, then np.gradient twice),
    scale-normalised by sigma^2, on every pixel (both reflect at the border)."""
    rgb = _crops(1, seed=3)[0]
    feats = texture_maps(_to_input(rgb))[0].numpy()
    g = robust_gray(_to_input(rgb)[0].numpy())
    assert abs(float(np.median(g))) < 1e-5
    for i, s in enumerate(SCALES):
        l1, l2 = hessian_matrix_eigvals(hessian_matrix(g, sigma=s, order="rc", use_gaussian_derivatives=False,
                                                       mode="reflect"))
        for ours, ref in ((feats[3 * i], l1 * s * s), (feats[3 * i + 1], l2 * s * s)):
            assert np.abs(ours - ref).max() < 1e-4 * (np.abs(ref).max() + 1e-6)
    # the local mean is scipy's Gaussian of the robust gray image
    assert np.allclose(feats[3 * len(SCALES)], ndi.gaussian_filter(g, 3.0), atol=1e-5)


def test_shape_stride_and_exposure_invariance():
    rgb = _crops(1, seed=4, h=100, w=130)[0]
    out = TextureFeatures(2)(_to_input(rgb))
    assert list(out) == ["texture"]
    assert tuple(out["texture"].shape) == (1, CHANNELS, 50, 65) and out["texture"].dtype == torch.float32
    assert TextureFeatures(1)(_to_input(rgb))["texture"].shape[-2:] == (100, 130)
    # a darker, flatter exposure of the same photo gives the same features (robust gray standardisation)
    dim = (rgb.astype(np.float32) * 0.6 + 20).round().astype(np.uint8)
    a, b = texture_maps(_to_input(rgb)), texture_maps(_to_input(dim))
    assert torch.allclose(a, b, atol=0.05 * float(a.abs().max()))
    with pytest.raises(ValueError, match="stride"):
        TextureFeatures(0)


def test_a_thin_dark_line_is_a_strong_hessian_ridge():
    """A 1 px dark line gives a large positive Hessian eigenvalue along it at the finest scale."""
    rgb = np.full((96, 96, 3), 128, np.uint8)
    rgb += np.random.default_rng(1).integers(0, 30, size=(96, 96, 1)).astype(np.uint8)
    rr, cc = draw.line(20, 20, 75, 70)
    line = rgb.copy()
    line[rr, cc] = 40
    f0, f1 = texture_maps(_to_input(rgb))[0, 0], texture_maps(_to_input(line))[0, 0]
    on = torch.zeros(96, 96, dtype=torch.bool)
    on[torch.from_numpy(rr), torch.from_numpy(cc)] = True
    assert float(f1[on].median()) > 3 * float(f0.abs().quantile(0.99))


def test_texture_bank_fits_scores_and_round_trips(tmp_path):
    """A bank of texture features through the shipped fit (grass's configuration): recorded in meta.json,
    rebuilt from disk with the same scores, a 5 px bright scratch scores above every normal and is where
    the map peaks, and a small gray photo of a normal part is not flagged."""
    settings = Settings.from_env(state_dir=tmp_path, patchcore_acquisition_copies=1, patchcore_calibration_copies=2)
    store = PatchCoreBanks(settings, features="texture", pool_size=3, sigma=2.0, augment="none", tta="none",
                           fold_bank=1600, coreset_ratio=0.01, scorer="knn")
    grass = lambda n, seed, **kw: _crops(n, seed, photo=data.grass, **kw)  # noqa: E731
    train, val = grass(24, seed=11), grass(8, seed=12)
    info = store.fit("grass", train, val)
    meta = store.meta("grass")
    assert meta["features"] == "texture" and meta["backbone"] == "texture" and meta["embedding_dim"] == CHANNELS
    assert meta["model"].startswith("patchcore/texture[") and config_from_meta(meta).features == "texture"
    assert 0 < info["bank_size"] <= 3200
    normals = grass(6, seed=13)
    res_n = assert_scratches_found(store, "grass", normals, near_px=4)
    # rebuilt from the stored arrays (a new process would do the same): the same scores
    again = PatchCoreBanks(Settings.from_env(state_dir=tmp_path)).inspect_batch(normals[:2], "grass")
    assert [r.score for r in again] == pytest.approx([r.score for r in res_n[:2]], abs=1e-5)
    # the check: a small gray photo of a normal part (rows < 320, not a training crop) is not flagged
    small = grass(1, seed=14, h=128, w=128)[0]
    assert not store.inspect(small, "grass").is_anomalous


def test_texture_spec_and_unknown_features(tmp_path):
    spec = backbone_spec("texture")
    assert spec.layers == ("texture",) and spec.mean == (0.0, 0.0, 0.0) and spec.std == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="features"):
        PatchCoreBanks(Settings.from_env(state_dir=tmp_path), features="sift")
