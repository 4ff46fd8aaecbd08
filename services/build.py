"""Build everything a fresh state directory needs (``python cli.py build``).

Order: sample data (``data/build.py``) → PatchCore memory bank per product →
gallery image index → manual store. Each step is idempotent: work already done is
skipped unless ``force`` is set, so a second build takes seconds.
"""

from __future__ import annotations

import time
from typing import Callable

from core.settings import PRODUCTS, Settings, get_settings

Progress = Callable[[float, str], None]


def _noop(_f: float, _m: str) -> None:
    return None


def build_state(settings: Settings | None = None, force: bool = False, progress: Progress | None = None) -> dict:
    """Build sample data and all stores under ``settings.state_dir``.

    Args:
        settings: defaults to :func:`get_settings`.
        force: rebuild everything even when present.
        progress: callback ``(fraction 0..1, message)``.

    Returns:
        summary dict: ``{"data": ..., "patchcore": {product: fit summary}, "index": ...,
        "manuals": ..., "elapsed_s": float}``.
    """
    from data.build import build_sample_data, load_manifest
    from services.container import Services

    settings = settings or get_settings()
    progress = progress or _noop
    t0 = time.perf_counter()
    summary: dict = {}
    progress(0.0, "sample data")
    summary["data"] = build_sample_data(settings.data_dir, force=force,
                                        progress=lambda f, m: progress(0.25 * f, f"sample data: {m}"))
    manifest = load_manifest(settings.data_dir)
    products = sorted({it["product"] for it in manifest["items"]}, key=lambda p: (p not in PRODUCTS, p))
    services = Services(settings)
    fitted = set(services.patchcore.products())
    summary["patchcore"] = {}
    for i, product in enumerate(products):
        if product in fitted and not force:
            summary["patchcore"][product] = "present"
            continue
        base = 0.25 + 0.5 * i / len(products)
        summary["patchcore"][product] = services.patchcore.fit_from_manifest(
            product, settings.data_dir,
            progress=lambda f, m, b=base, p=product: progress(b + 0.5 * f / len(products), f"PatchCore {p}: {m}"))
    progress(0.75, "gallery index")
    summary["index"] = services.image_index.build_from_manifest(
        settings.data_dir, progress=lambda f, m: progress(0.75 + 0.15 * f, f"index: {m}"))
    progress(0.9, "manual store")
    summary["manuals"] = services.manuals.build_from_manifest(
        settings.data_dir, progress=lambda f, m: progress(0.9 + 0.1 * f, f"manuals: {m}"))
    summary["elapsed_s"] = round(time.perf_counter() - t0, 2)
    progress(1.0, "done")
    return summary
