"""Tests for the third (training-only) defect generator, data/synth_alt.py, on real texture crops."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from data import build, synth_alt
from data.acquisition import to_gray


@pytest.fixture(scope="module")
def crops() -> list[np.ndarray]:
    rows = build.region("grass", "tune")
    return [build.random_crop(rows, np.random.default_rng(i), "grass")[0] for i in range(3)]


@pytest.mark.parametrize("defect", synth_alt.DEFECT_TYPES)
def test_draw_changes_the_masked_pixels_and_little_else(crops, defect):
    for i, clean in enumerate(crops):
        img, mask = synth_alt.draw(clean, defect, np.random.default_rng(10 + i))
        assert img.shape == clean.shape and img.dtype == np.uint8
        assert mask.shape == clean.shape[:2] and mask.dtype == bool and mask.any()
        diff = np.abs(img.astype(int) - clean.astype(int)).max(axis=2)
        assert diff[mask].mean() > diff[~mask].mean()
        assert mask.mean() < 0.4


@pytest.mark.parametrize("defect", synth_alt.DEFECT_TYPES)
def test_draw_is_deterministic_and_keeps_gray(crops, defect):
    a = synth_alt.draw(crops[0], defect, np.random.default_rng(3))
    b = synth_alt.draw(crops[0], defect, np.random.default_rng(3))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    gray = to_gray(crops[1])
    img, _ = synth_alt.draw(gray, defect, np.random.default_rng(4))
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])


def test_visibility_spans_faint_to_plain(crops):
    """Mean luminance change in the mask / local luminance std spans the VISIBILITY range (roughly)."""
    from data.holdout_synth import defect_contrast  # the measure only, not a drawing routine

    values = []
    for i in range(30):
        img, mask = synth_alt.draw(crops[i % 3], synth_alt.DEFECT_TYPES[i % 5], np.random.default_rng(100 + i))
        values.append(defect_contrast(crops[i % 3], img, mask))
    assert min(values) < 1.0 and max(values) > 1.5


def test_bad_input():
    with pytest.raises(ValueError, match="unknown defect type"):
        synth_alt.draw(np.zeros((64, 64, 3), np.uint8), "dent", np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        synth_alt.draw(np.zeros((64, 64), np.uint8), "hole", np.random.default_rng(0))
    with pytest.raises(ValueError):
        synth_alt.draw(np.zeros((16, 16, 3), np.uint8), "hole", np.random.default_rng(0))


def test_training_code_never_imports_the_evaluation_generator():
    """data.holdout_synth is for evaluation only: no module that fits or trains imports it."""
    repo = Path(__file__).resolve().parents[2]
    allowed = {"data/build.py", "data/holdout_synth.py"}  # the builder draws the unseen split with it
    for pkg in ("core", "models", "data", "stores", "services", "tools", "agent", "ui"):
        for path in (repo / pkg).rglob("*.py"):
            rel = path.relative_to(repo).as_posix()
            if rel in allowed:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
                mod = node.module or "" if isinstance(node, ast.ImportFrom) else ""
                assert "holdout_synth" not in mod and not any("holdout_synth" in n for n in names), rel
