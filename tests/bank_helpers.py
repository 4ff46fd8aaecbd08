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
