"""Evaluation and verdict robustness (issue 15) on the real built state: the tuning and the unseen split,
native-scale scoring, the calibrated margin, and a small gray photo of a normal part.

Photos here are read from rows 0-319 only (the sample data's regions; never rows 320-511).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from core.settings import PRODUCTS, get_settings
from data.acquisition import to_gray
from data.build import REGIONS, load_manifest, region
from services.container import Services
from services.evaluate import evaluate_anomaly, evaluate_retrieval
from services.inspect import inspect_image

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def services(built_state):
    return Services(get_settings())


def test_banks_record_native_scale_and_calibration(services):
    for product in PRODUCTS:
        meta = services.banks.meta(product)
        assert meta.pixel_scale == 1.0 and meta.raw["image_size"] == 0  # photos scored as they are
        assert meta.target_fpr == pytest.approx(services.settings.patchcore_target_fpr)
        assert meta.normal_spread and meta.normal_spread > 0
        # calibration normals: the val normals (tune region, never in the bank) and changed copies of them
        assert meta.raw["n_val_normal"] == 30 * (1 + services.settings.patchcore_calibration_copies)
        assert meta.raw["n_bank_extra"] == 80 * services.settings.patchcore_acquisition_copies


@pytest.mark.parametrize("product", PRODUCTS)
def test_small_gray_photos_of_normal_parts_are_not_flagged(services, product):
    """The external set's failure: smaller photos, gray instead of colour, flagged 40 / 40. A gray 128 x 160 px
    photo of the unseen region (never in a bank, gallery or calibration) and a gray 176 px photo of the tune
    region are scored at native scale and come out normal, below the threshold by a margin."""
    unseen = region(product, "unseen")
    tune = region(product, "tune")
    photos = [to_gray(np.repeat(unseen[:128, x:x + 160, None], 3, axis=2)) for x in (0, 96)]
    photos.append(to_gray(np.repeat(tune[40:216, 40:216, None], 3, axis=2)))
    for rgb in photos:
        report = inspect_image(services, rgb, product, artifacts=False)
        assert (report.width, report.height) == (rgb.shape[1], rgb.shape[0])
        assert report.result.anomaly_map.shape == rgb.shape[:2]
        assert not report.is_anomalous, (product, report.score, report.threshold, report.margin)
        assert report.margin is not None and report.margin < 0
        js = report.to_json()
        assert js["verdict"] == "NORMAL" and js["margin"] < 0 and isinstance(js["uncertain"], bool)


def test_too_small_photo_is_a_clear_input_error(services):
    from core.errors import InputError

    with pytest.raises(InputError, match="too small"):
        inspect_image(services, np.zeros((40, 300, 3), np.uint8), "brick", artifacts=False)


def test_evaluate_both_splits(services):
    val = evaluate_anomaly(services, "brick", limit=3, split="val")
    unseen = evaluate_anomaly(services, "brick", limit=3, split="unseen")
    for out, split in ((val, "val"), (unseen, "unseen")):
        assert out["split"] == split and out["n_normal"] == 3 and out["n_defect"] == 15
        assert 0.0 <= out["fpr"] <= 1.0 and 0.0 <= out["recall"] <= 1.0 and 0.0 <= out["uncertain_rate"] <= 1.0
        assert set(out["per_type_image_auroc"]) == {"scratch", "crack", "hole", "stain", "contamination"}
    assert "gray" in unseen and unseen["gray"]["n"] >= 1
    with pytest.raises(ValueError, match="unknown evaluation split"):
        evaluate_anomaly(services, "brick", split="external")


def test_unseen_split_is_outside_every_fit(built_state):
    """No bank, gallery item or calibration image comes from the unseen region."""
    manifest = load_manifest(built_state / "data")
    (r0, r1), (c0, c1) = REGIONS["unseen"]
    for it in manifest["items"]:
        if it["split"] == "unseen":
            assert it["crop"]["region"] == "unseen"
        else:
            assert it["crop"].get("region", "tune") in ("bank", "tune")
    services = Services(get_settings())
    for product in PRODUCTS:
        paths = services.banks.read_meta(product)["train_paths"]
        assert paths and all("/train/" in p for p in paths)
    sources = {it["source"] for it in services.image_index.items() if it.get("source")}
    assert not any("-unseen-" in s for s in sources)


def test_cli_eval_unseen_split_json(built_state):
    proc = subprocess.run([sys.executable, "cli.py", "eval", "anomaly", "--split", "unseen", "--product", "gravel",
                           "--small", "2", "--json"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "DRA_STATE_DIR": str(built_state)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["split"] == "unseen" and set(out["products"]) == {"gravel"}
    assert {"image_auroc", "fpr", "recall"} <= set(out["mean"]) and "scratch" in out["per_type_mean"]


@pytest.mark.slow
def test_retrieval_on_the_unseen_split(services):
    out = evaluate_retrieval(services, split="unseen")
    assert out["split"] == "unseen" and out["n_queries"] == 3 * 5 * 12
    assert out["product_accuracy"] >= 0.9
    assert out["recall_at_1"] > 0.2  # well above chance (0.2); the measured value is in docs/benchmarks.md
    # the subset the agent states a type for: photos anomaly scoring flags (most brick defects, few of the others)
    flagged = out["flagged"]
    assert 0 < flagged["n"] < out["n_queries"] and flagged["share"] == round(flagged["n"] / out["n_queries"], 3)
    assert sum(p["n"] for p in flagged["per_product"].values()) == flagged["n"]
    assert flagged["per_product"]["brick"]["n"] > flagged["per_product"]["grass"]["n"]
    assert 0.0 <= flagged["recall_at_1"] <= 1.0 and 0.0 <= out["voted_type_accuracy"] <= 1.0
