"""Test helper: the PatchCore use cases of one state directory behind one object.

Composes the real services (:func:`services.products.fit_bank`, :class:`stores.banks.BankStore`,
:func:`services.evaluate.evaluate_anomaly`) with fixed configuration overrides, so a test
reads like the fit -> inspect -> evaluate sequence it checks. No behaviour of its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.settings import Settings
from core.types import InspectionResult
from models.patchcore.config import PatchCoreConfig
from services.build import fit_from_manifest
from services.container import Services
from services.evaluate import evaluate_anomaly
from services.lock import MODEL_LOCK
from services.products import fit_bank, fit_config


class PatchCoreBanks:
    """Fit, inspect and evaluate PatchCore banks of one state directory.

    Args:
        settings: the state directory and runtime choices.
        overrides: :class:`models.patchcore.config.PatchCoreConfig` fields every fit uses.
    """

    def __init__(self, settings: Settings, **overrides):
        self.services = Services(settings)
        self.overrides = {k: v for k, v in overrides.items() if v is not None}
        fit_config(self.services, "any", None, **self.overrides)  # unknown views fail here

    def config_for(self, product: str, symmetry: str | None = None) -> PatchCoreConfig:
        return fit_config(self.services, product, symmetry, **self.overrides)

    def fit(self, product: str, train, val_normal, val_defect=None, *, train_paths=None, progress=None,
            symmetry=None) -> dict:
        return fit_bank(self.services, product, train, val_normal, val_defect, train_paths=train_paths,
                        progress=progress, symmetry=symmetry, **self.overrides)

    def fit_from_manifest(self, product: str, data_dir: Path | None = None) -> dict:
        return fit_from_manifest(self.services, product, data_dir)

    def products(self) -> list[str]:
        return self.services.banks.products()

    def meta(self, product: str) -> dict:
        return self.services.banks.read_meta(product)

    def inspect_batch(self, images: list[np.ndarray], product: str) -> list[InspectionResult]:
        bank = self.services.banks.get(product)
        with MODEL_LOCK.shared():
            return bank.predict(images)

    def inspect(self, rgb: np.ndarray, product: str) -> InspectionResult:
        return self.inspect_batch([rgb], product)[0]

    def evaluate(self, product: str, limit: int | None = None) -> dict:
        return evaluate_anomaly(self.services, product, limit=limit)


def bright_scratches(photos: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each photo with a 5 px wide line, 100 gray levels brighter, from (30, 30) to (100, 130): ``(image, mask)``."""
    from scipy import ndimage as ndi
    from skimage import draw

    out = []
    for im in photos:
        img, mask = im.copy(), np.zeros(im.shape[:2], bool)
        rr, cc = draw.line(30, 30, 100, 130)
        mask[rr, cc] = True
        mask = ndi.binary_dilation(mask, iterations=2)  # 5 px wide
        img[mask] = (img[mask].astype(np.int16) + 100).clip(0, 255).astype(np.uint8)
        out.append((img, mask))
    return out


def assert_scratches_found(store: "PatchCoreBanks", product: str, normals: list[np.ndarray], near_px: int) -> list:
    """:func:`bright_scratches` of ``normals`` all score above every normal, and each anomaly map peaks within
    ``near_px`` px of its scratch. Returns the normals' results."""
    from scipy import ndimage as ndi

    scratched = bright_scratches(normals)
    res_n = store.inspect_batch(normals, product)
    res_d = store.inspect_batch([s for s, _ in scratched], product)
    assert min(r.score for r in res_d) > max(r.score for r in res_n)
    for r, (_, mask) in zip(res_d, scratched):
        peak = np.unravel_index(np.argmax(r.anomaly_map), r.anomaly_map.shape)
        assert ndi.binary_dilation(mask, iterations=near_px)[peak]
    return res_n


#: rows 320..511 of the scikit-image photos are reserved: never read
ALLOWED_ROWS = 320


def gray_crops(n: int, seed: int, photo, h: int = 128, w: int = 160) -> list[np.ndarray]:
    """``n`` seeded ``h x w`` crops of a scikit-image gray photo (``photo()``, e.g. ``skimage.data.grass``),
    rows 0-319 only, as RGB uint8 ``(h, w, 3)``."""
    rows = photo()[:ALLOWED_ROWS]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y, x = int(rng.integers(0, ALLOWED_ROWS - h + 1)), int(rng.integers(0, rows.shape[1] - w + 1))
        out.append(np.repeat(rows[y:y + h, x:x + w, None], 3, axis=2).astype(np.uint8))
    return out
