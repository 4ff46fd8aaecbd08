"""Process-wide, lazily loaded stores: one PatchCore store, image index and manual store.

The app and the CLI hold one :class:`Services`; tools receive it. Loading is lazy so
that ``cli.py manual`` does not pay for PatchCore, and thread-safe for Gradio.
"""

from __future__ import annotations

import threading
from functools import cached_property

from core.settings import Settings, get_settings


class Services:
    """Holder of the loaded stores for one settings object."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or get_settings()
        self._lock = threading.RLock()

    @cached_property
    def patchcore(self):
        """:class:`models.patchcore.model.PatchCoreStore`."""
        with self._lock:
            from models.patchcore.model import PatchCoreStore

            return PatchCoreStore(self.settings)

    @cached_property
    def image_index(self):
        """:class:`stores.image_index.ImageIndex`."""
        with self._lock:
            from stores.image_index import ImageIndex

            # share the PatchCore store: the index needs its anomaly maps, and a second
            # store would load every memory bank and the backbone again
            return ImageIndex(self.settings, patchcore=self.patchcore)

    @cached_property
    def manuals(self):
        """:class:`stores.manual_store.ManualStore`."""
        with self._lock:
            from stores.manual_store import ManualStore

            return ManualStore(self.settings)

    def infer_product(self, rgb) -> tuple[str, float]:
        """Product of the nearest gallery images: ``(product_id, confidence 0..1)``.

        Raises:
            RuntimeError: the image index is empty (run ``python cli.py build``).
        """
        if len(self.image_index) == 0:
            raise RuntimeError("the image index is empty: run `python cli.py build` first")
        return self.image_index.infer_product(rgb)


_SERVICES: dict[str, Services] = {}
_GLOBAL_LOCK = threading.Lock()


def get_services(settings: Settings | None = None) -> Services:
    """Cached :class:`Services` per state directory."""
    settings = settings or get_settings()
    key = str(settings.state_dir)
    with _GLOBAL_LOCK:
        if key not in _SERVICES:
            _SERVICES[key] = Services(settings)
        return _SERVICES[key]
