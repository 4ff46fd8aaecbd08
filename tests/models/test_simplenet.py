"""SimpleNet-style patch scorer (models/patchcore/simplenet.py) inside the shipped PatchCore fit, on real
scikit-image grass crops (rows 0-319 only; rows 320-511 are reserved) and real EfficientNet-Lite0 features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data
from sklearn.metrics import roc_auc_score

from core.settings import Settings
from models.patchcore.config import PRODUCT_CONFIGS
from models.patchcore.model import config_from_meta
from models.patchcore.simplenet import SimpleNetHead, head_from_state, train_head
from stores.banks import HEAD_NAME, BankNotFoundError
from tests.bank_helpers import PatchCoreBanks, assert_scratches_found, gray_crops

def _grass(n: int, seed: int, h: int = 128, w: int = 160) -> list[np.ndarray]:
    return gray_crops(n, seed, data.grass, h, w)  # rows 0-319 only


def test_train_head_learns_the_noise_boundary_and_is_seeded():
    """On Gaussian 'normal' rows the trained head scores noisy rows above the normal ones; the same rows and
    seed give the same head; its state round-trips; bad input is refused."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(4000, 16, generator=gen) * torch.linspace(0.5, 3.0, 16) + 5.0
    a, b = train_head(rows, sigma=0.5, steps=300, batch=256), train_head(rows, sigma=0.5, steps=300, batch=256)
    test = torch.randn(500, 16, generator=gen) * torch.linspace(0.5, 3.0, 16) + 5.0  # normal rows it has not seen
    noisy = test + torch.randn(test.shape, generator=gen) * rows.std(0)  # 1 sd off the normal features
    scores = torch.cat([a.patch_scores(test), a.patch_scores(noisy)]).numpy()
    assert roc_auc_score(np.r_[np.zeros(500), np.ones(500)], scores) > 0.8
    assert torch.equal(a.patch_scores(test), b.patch_scores(test))
    again = head_from_state({k: v.clone() for k, v in a.state_dict().items()})
    assert again.dim == 16 and again.hidden == a.hidden
    assert torch.allclose(again.patch_scores(test), a.patch_scores(test))
    with pytest.raises(ValueError, match="patch embeddings"):
        a.patch_scores(torch.zeros(3, 8))
    with pytest.raises(ValueError):
        train_head(rows[:1])
    with pytest.raises(ValueError):
        train_head(rows, sigma=0.0)


def test_simplenet_bank_fits_scores_and_round_trips(tmp_path):
    """grass's shipped configuration (SimpleNet scorer) through the shipped fit: recorded in meta.json, held-out
    calibration, the head stored as safetensors and read back with the same scores; a 5 px bright scratch scores
    above every normal and the map peaks on it; a small gray photo of a normal part is not flagged; a bank whose
    head file is gone is reported, not served with the wrong scorer."""
    assert PRODUCT_CONFIGS["grass"].scorer == "simplenet"
    settings = Settings.from_env(state_dir=tmp_path, patchcore_acquisition_copies=1, patchcore_calibration_copies=2,
                                 patchcore_head_steps=300)  # DRA_PATCHCORE_HEAD_STEPS; 0 = the configuration's 2,000
    assert PatchCoreBanks(Settings.from_env(state_dir=tmp_path)).config_for("grass").head_steps == 2000
    store = PatchCoreBanks(settings)
    assert store.config_for("grass").head_steps == 300
    train, val = _grass(16, seed=21), _grass(8, seed=22)
    store.fit("grass", train, val)
    meta = store.meta("grass")
    assert meta["scorer"] == "simplenet" and meta["model"].endswith("/simplenet")
    assert meta["calibration"] == "held-out" and len(meta["fold_bank_sizes"]) == 1
    assert "SimpleNet" in meta["method"] and "SimpleNet head" in meta["image_score_rule"]
    assert "300 steps" in meta["head_rule"] and "16 train normals and 32 extra normals" in meta["head_rule"]
    assert config_from_meta(meta).scorer == "simplenet" and config_from_meta(meta).head_steps == 300
    assert (settings.banks_dir / "grass" / HEAD_NAME).is_file()
    bank = store.services.banks.get("grass")
    assert isinstance(bank.head, SimpleNetHead) and bank.head.dim == meta["embedding_dim"]
    normals = _grass(6, seed=23)
    res_n = assert_scratches_found(store, "grass", normals, near_px=8)
    # the head, not the memory bank, scores: the same photos through the nearest-neighbour distance differ
    knn_scores, _, _ = bank.__class__(bank.model, bank.spec, bank.meta, bank.descriptors, bank.train_paths,
                                      None).predict_maps(normals[:2])
    assert not np.allclose(knn_scores.numpy(), [r.score for r in res_n[:2]], atol=1e-3)
    # rebuilt from disk by a new store (a new process would do the same): the same scores
    again = PatchCoreBanks(Settings.from_env(state_dir=tmp_path)).inspect_batch(normals[:2], "grass")
    assert [r.score for r in again] == pytest.approx([r.score for r in res_n[:2]], abs=1e-5)
    # the check: a small gray photo of a normal part (rows < 320, not a training crop) is not flagged
    assert not store.inspect(_grass(1, seed=24, h=128, w=128)[0], "grass").is_anomalous
    (settings.banks_dir / "grass" / HEAD_NAME).unlink()
    fresh = PatchCoreBanks(Settings.from_env(state_dir=tmp_path))
    with pytest.raises(BankNotFoundError, match="cannot be read"):
        fresh.services.banks.get("grass")
    with pytest.raises(ValueError, match="scorer"):
        PatchCoreBanks(Settings.from_env(state_dir=tmp_path / "x"), scorer="svm")
