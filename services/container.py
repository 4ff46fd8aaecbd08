"""The service container: the stores of one state directory, loaded lazily, shared by every edge.

The app, the CLI, the agent's tools and the benches hold one :class:`Services` per state
directory (:func:`get_services`) and pass it to the use-case functions of ``services/``.
Loading is lazy (``cli.py manual`` does not pay for PatchCore) and thread-safe (Gradio).
"""

from __future__ import annotations

import threading
from functools import cached_property

import numpy as np

from core.settings import Settings, get_settings
from services.lock import MODEL_LOCK
from stores.banks import BankNotFoundError, BankStore
from stores.history import HistoryStore
from stores.image_index import ImageIndex
from stores.manual_store import ManualStore
from stores.runs import RunStore
from stores.sessions import SessionStore


class Services:
    """The loaded stores for one settings object.

    Attributes (each created on first use): ``banks`` (:class:`stores.banks.BankStore`),
    ``image_index`` (:class:`stores.image_index.ImageIndex`, whose defect descriptors use
    the banks' anomaly maps), ``manuals`` (:class:`stores.manual_store.ManualStore`),
    ``history`` (:class:`stores.history.HistoryStore`), ``sessions``
    (:class:`stores.sessions.SessionStore`), ``runs`` (:class:`stores.runs.RunStore`).
    """

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or get_settings()
        self._lock = threading.RLock()

    @cached_property
    def banks(self) -> BankStore:
        """PatchCore memory banks (models built under the model lock's exclusive side)."""
        with self._lock:
            return BankStore(self.settings, guard=MODEL_LOCK.exclusive)

    def anomaly_maps(self, rgbs: list[np.ndarray], product: str) -> list[np.ndarray] | None:
        """PatchCore anomaly maps (float32 ``(H, W)`` each) of images of ``product``; None without a bank."""
        if product not in self.banks.products():
            return None
        try:
            bank = self.banks.get(product)
        except BankNotFoundError:
            return None
        with MODEL_LOCK.shared():
            return [r.anomaly_map for r in bank.predict(list(rgbs))]

    @cached_property
    def image_index(self) -> ImageIndex:
        """The similar-defect gallery."""
        with self._lock:
            return ImageIndex(self.settings, anomaly_maps=self.anomaly_maps)

    @cached_property
    def manuals(self) -> ManualStore:
        """The manual store (Chroma over PDF chunks)."""
        with self._lock:
            return ManualStore(self.settings)

    @cached_property
    def history(self) -> HistoryStore:
        """The SQLite history of analyses."""
        with self._lock:
            return HistoryStore(self.settings)

    @cached_property
    def sessions(self) -> SessionStore:
        """Chat sessions and their turns (same database as the history)."""
        with self._lock:
            return SessionStore(self.settings)

    @cached_property
    def runs(self) -> RunStore:
        """Per-request artifact folders (pruned by count and bytes)."""
        return RunStore(self.settings.runs_dir, keep_runs=self.settings.keep_runs,
                        keep_bytes=self.settings.keep_runs_mb * 2**20)

    def loaded(self, name: str):
        """A store if it was already created, else None (never loads anything)."""
        return self.__dict__.get(name)

    def infer_product(self, rgb: np.ndarray) -> tuple[str, float]:
        """Product of the nearest gallery images: ``(product_id, confidence 0..1)``.

        Raises:
            RuntimeError: the image index is empty (run ``python cli.py build``).
        """
        if len(self.image_index) == 0:
            raise RuntimeError("the image index is empty: run `python cli.py build` first")
        with MODEL_LOCK.shared():
            return self.image_index.infer_product(rgb)


_SERVICES: dict[str, Services] = {}
_GLOBAL_LOCK = threading.Lock()


def get_services(settings: Settings | None = None) -> Services:
    """The cached :class:`Services` of a state directory (default: :func:`get_settings`'s)."""
    settings = settings or get_settings()
    key = str(settings.state_dir)
    with _GLOBAL_LOCK:
        if key not in _SERVICES:
            _SERVICES[key] = Services(settings)
        return _SERVICES[key]
