"""open_clip image embedder: a tiny random-init CLIP built from a config (no download), saved in
open_clip's local-dir layout, embedding images and texts into one space; text search through the
real FAISS index of :class:`stores.image_index.ImageIndex` (real skimage crops, rows < 320 only)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from skimage import data as skdata

from core.settings import Settings
from tests.tiny_models import TINY_CLIP_CFG, save_tiny_open_clip

ROWS = 320  # rows >= 320 of the sample photos are reserved and never read


def _crop(product: str, y: int, x: int, size: int = 96) -> np.ndarray:
    src = getattr(skdata, product)()[:ROWS]
    assert y + size <= ROWS
    return np.repeat(src[y : y + size, x : x + size, None], 3, axis=2).copy()


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return save_tiny_open_clip(tmp_path_factory.mktemp("tiny_open_clip"))


def test_open_clip_text_and_image_share_space(tiny_clip_dir):
    from models.embedders import OpenClipEmbedder, get_image_embedder

    emb = get_image_embedder(f"open_clip:{tiny_clip_dir}")
    assert isinstance(emb, OpenClipEmbedder) and emb.dim == TINY_CLIP_CFG["embed_dim"]
    assert not hasattr(emb, "raw")  # the index must use these vectors as they are
    imgs = emb.embed([_crop("brick", 0, 0), _crop("grass", 100, 100), _crop("gravel", 200, 50)])
    txts = emb.embed_text(["crack along the mortar joint", "hole in the gravel"])
    assert imgs.shape == (3, 24) and txts.shape == (2, 24)
    assert imgs.dtype == np.float32 and txts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(imgs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txts, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(txts[0], txts[1])  # the text tower reads the tokens
    # weights come from the saved checkpoint: a second load gives identical vectors
    other = OpenClipEmbedder(str(tiny_clip_dir), name="again")
    np.testing.assert_allclose(other.embed_text(["crack along the mortar joint"])[0], txts[0], atol=1e-5)


def test_open_clip_text_search_through_faiss_index(tiny_clip_dir, tmp_path):
    from models.embedders import OpenClipEmbedder
    from stores.image_index import ImageIndex

    settings = dataclasses.replace(Settings.from_env(), state_dir=tmp_path / "state")
    emb = OpenClipEmbedder(str(tiny_clip_dir), name="open_clip:tiny")
    index = ImageIndex(settings, embedder=emb)
    items = [("brick", 0, 0, "crack"), ("brick", 100, 150, "hole"), ("grass", 50, 50, "stain"),
             ("gravel", 200, 200, "scratch")]
    for product, y, x, defect in items:
        index.add(_crop(product, y, x), product, defect, note=f"{defect} on {product}")
    assert len(index) == 4 and index.index.ntotal == 4

    query = "crack along the mortar joint"
    hits = index.search_text(query, k=3)
    assert len(hits) == 3 and all(h["matched"] == "image" for h in hits)
    # the ranking is the FAISS inner product between the query's text embedding and the stored
    # image vectors (not a caption match): recompute it from the index's own vectors
    q = np.zeros((1, index.dim), np.float32)
    q[0, : emb.dim] = emb.embed_text([query])[0]
    stored = index.index.index.reconstruct_n(0, index.index.ntotal)  # IndexIDMap2 -> IndexFlatIP rows
    fids = [int(f) for f in __import__("faiss").vector_to_array(index.index.id_map)]
    by_fid = {it["fid"]: iid for iid, it in index.meta["items"].items()}
    sims = stored @ (q[0] / np.linalg.norm(q[0]))
    expected = [by_fid[fids[j]] for j in np.argsort(-sims)[:3]]
    assert [h["id"] for h in hits] == expected
    np.testing.assert_allclose([h["score"] for h in hits], np.sort(sims)[::-1][:3], atol=1e-4)
    # filters still apply on the image path
    assert {h["product"] for h in index.search_text(query, k=5, product="brick")} == {"brick"}


def test_open_clip_missing_hub_weights_name_the_setting(monkeypatch):
    from models.embedders import OpenClipEmbedder
    from core.profiles import MissingModelError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", "/nonexistent-hf-home/hub")
    with pytest.raises(MissingModelError, match="DRA_IMAGE_EMBEDDER"):
        OpenClipEmbedder("ViT-B-32", "laion2b_s34b_b79k")
