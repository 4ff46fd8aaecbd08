"""Defect descriptor: region statistics, anomaly-weighted Lite0 pooling, the LDA metric (real sklearn, real weights)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage import data as skdata

from models.defect_descriptor import (STAT_NAMES, DeepPooler, DefectDescriber, DefectProjection, DescriptorConfig,
                                      region_stats)


def _crop(product: str, y: int, x: int, size: int = 256) -> np.ndarray:
    assert y + size <= 320  # reserved rows >= 320 are never read
    return np.repeat(getattr(skdata, product)()[:320][y : y + size, x : x + size, None], 3, axis=2).copy()


def _map_of(mask: np.ndarray) -> np.ndarray:
    """A PatchCore-like blurred anomaly map peaking on ``mask``."""
    return (ndi.gaussian_filter(mask.astype(np.float32), 4) + 0.05).astype(np.float32)


def _hole(im: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:256, :256]
    m = (yy - 128) ** 2 + (xx - 100) ** 2 < 12**2
    out = im.copy()
    out[m] = 5
    return out, m


def _scratch(im: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = np.zeros((256, 256), bool)
    m[120:122, 30:226] = True
    out = im.copy()
    out[m] = 255
    return out, m


def _stain(im: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:256, :256]
    m = (yy - 128) ** 2 + (xx - 128) ** 2 < 45**2
    out = im.astype(np.float32)
    out[m] = out[m] * np.array([0.7, 0.9, 0.5])  # tinted (yellow-green), soft
    return np.clip(out, 0, 255).astype(np.uint8), m


def test_region_stats_separate_shapes_and_colour():
    cfg = DescriptorConfig()
    base = _crop("gravel", 0, 0)
    hole, hm = _hole(base)
    scratch, sm = _scratch(base)
    stain, tm = _stain(base)
    h = dict(zip(STAT_NAMES, region_stats(hole, _map_of(hm), cfg)))
    s = dict(zip(STAT_NAMES, region_stats(scratch, _map_of(sm), cfg)))
    t = dict(zip(STAT_NAMES, region_stats(stain, _map_of(tm), cfg)))
    assert len(h) == len(STAT_NAMES)
    assert h["dL"] < 0 < s["dL"]  # dark pit vs bright line (signed luminance deviation)
    assert s["elongation"] > h["elongation"] + 0.5  # a line is elongated, a pit is round
    assert t["dchroma"] > max(h["dchroma"], s["dchroma"])  # the tinted stain is off in chroma
    assert t["log_area"] > h["log_area"]
    assert all(np.isfinite(v) for v in (*h.values(), *s.values(), *t.values()))
    # works at another input size and with a flat (no-peak) map
    flat = region_stats(_crop("brick", 0, 0, 128), np.ones((128, 128), np.float32), cfg)
    assert flat.shape == (len(STAT_NAMES),) and np.isfinite(flat).all()


def test_deep_pooler_and_describer_shapes():
    base = _crop("grass", 0, 0)
    hole, hm = _hole(base)
    pool = DeepPooler((2, 4, 7))
    v = pool([hole, base], [_map_of(hm), _map_of(hm)])
    assert v.shape == (2, 24 + 40 + 80) and v.dtype == np.float32
    assert not np.allclose(v[0], v[1])  # the pit changes the anomaly-weighted features
    desc = DefectDescriber()
    x = desc([hole], [_map_of(hm)])
    assert x.shape == (1, desc.dim) and desc.dim == len(STAT_NAMES) + 144
    assert desc([], []).shape == (0, desc.dim)
    with pytest.raises(ValueError):
        desc([hole], [])
    cfg = DescriptorConfig.from_dict(DescriptorConfig(blocks=(4,)).to_dict())
    assert cfg.blocks == (4,) and DefectDescriber(cfg).dim == len(STAT_NAMES) + 40


def test_projection_matches_sklearn_and_round_trips():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 30)) * 3
    y = [f"c{i}" for i in range(4) for _ in range(10)]
    X = np.concatenate([c + rng.normal(size=(10, 30)) for c in centres]).astype(np.float32)
    Z = StandardScaler().fit_transform(X)
    lda = DefectProjection.fit(X, y, kind="lda")
    assert lda.out_dim == 3
    ref = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto").fit(Z, y).transform(Z)
    np.testing.assert_allclose(lda.transform(X), ref - ref.mean(0), atol=1e-3)
    lr = DefectProjection.fit(X, y)  # default: logistic regression probabilities
    assert lr.kind == "logreg" and lr.out_dim == 4
    ref = LogisticRegression(C=0.1, max_iter=5000).fit(Z, y).predict_proba(Z)
    np.testing.assert_allclose(lr.transform(X), ref, atol=1e-4)
    Q = np.concatenate([c + rng.normal(size=(5, 30)) for c in centres]).astype(np.float32)
    for proj in (lda, lr):
        again = DefectProjection.from_arrays(proj.arrays("p"), "p")
        assert again.kind == proj.kind
        np.testing.assert_array_equal(again.transform(Q), proj.transform(Q))
        # nearest class mean in the projected space recovers the labels of new samples
        P, PQ = proj.transform(X), proj.transform(Q)
        means = np.stack([P[i * 10:(i + 1) * 10].mean(0) for i in range(4)])
        pred = np.argmin(((PQ[:, None] - means[None]) ** 2).sum(-1), 1)
        assert (pred == np.repeat(np.arange(4), 5)).mean() >= 0.9
    with pytest.raises(ValueError):
        DefectProjection.fit(X[:5], ["a"] * 5)
    with pytest.raises(ValueError):
        DefectProjection.fit(X, y, kind="svm")


def test_class_probabilities_name_the_types_and_survive_a_reload():
    """The logreg metric's outputs are probabilities keyed by the trained types (sklearn's classes_)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    types = ["stain", "crack", "hole"]  # not sorted: the order must come from the fit, not be assumed
    centres = rng.normal(size=(3, 12)) * 3
    y = [t for t in types for _ in range(15)]
    X = np.concatenate([c + rng.normal(size=(15, 12)) for c in centres]).astype(np.float32)
    proj = DefectProjection.fit(X, y)
    assert proj.classes == ("crack", "hole", "stain")
    probs = proj.class_probabilities(X)
    ref = LogisticRegression(C=0.1, max_iter=5000).fit(StandardScaler().fit_transform(X), y)
    ref_p = ref.predict_proba(StandardScaler().fit_transform(X))
    for row, r in zip(probs, ref_p):
        assert set(row) == set(types) and abs(sum(row.values()) - 1.0) < 1e-5
        assert max(row, key=row.get) == ref.classes_[int(np.argmax(r))]
    assert np.mean([max(row, key=row.get) == t for row, t in zip(probs, y)]) >= 0.9
    again = DefectProjection.from_arrays(proj.arrays("p"), "p")
    assert again.classes == proj.classes and again.class_probabilities(X[:3]) == probs[:3]
    # a projection saved before the field: five outputs are read in the sorted order of the five types
    old = {k: v for k, v in DefectProjection.fit(X, y).arrays("q").items() if not k.endswith("/classes")}
    assert DefectProjection.from_arrays(old, "q").class_probabilities(X[:1]) is None  # 3 outputs: order unknown
    assert DefectProjection.fit(X, y, kind="lda").class_probabilities(X[:1]) is None  # coordinates, not probabilities
