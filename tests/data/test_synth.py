"""Every synthesized defect is visible against its own surroundings (the visibility floor)."""

from __future__ import annotations

import numpy as np
import pytest

from data import synth
from data.build import source_rows


def _crop(product: str) -> np.ndarray:
    gray = source_rows(product)[:256, :256]
    return np.repeat(gray[..., None], 3, axis=2)


@pytest.mark.parametrize("product", ["brick", "gravel", "grass"])
@pytest.mark.parametrize("defect", list(synth.MIN_VISIBILITY))
def test_synthesized_defects_reach_the_visibility_floor(product, defect):
    image = _crop(product)
    for i in range(3):
        d = synth.synthesize(defect, image, np.random.default_rng([11, i]), product)
        assert synth.visibility(d.image, d.mask) >= synth.MIN_VISIBILITY[defect]


def test_visibility_separates_faint_from_plain_strokes():
    image = _crop("gravel")
    mask = np.zeros(image.shape[:2], bool)
    mask[100:102, 40:200] = True
    faint, plain = image.copy(), image.copy()
    faint[mask] = (faint[mask] * 0.9).astype(np.uint8)
    plain[mask] = 10
    assert synth.visibility(faint, mask) < 1.0 < synth.visibility(plain, mask)
    assert synth.visibility(image, np.zeros_like(mask)) == 0.0
