"""The inspect use case: PatchCore anomaly scoring of photos, with their pictures written to a run folder.

One function for every edge: ``cli.py inspect``, the app's ``/inspect`` endpoint and Inspect
tab, and the agent's anomaly-scoring tool all call :func:`inspect_image` /
:func:`inspect_images` and return :meth:`core.types.InspectionReport.to_json`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from core.catalog import parse_product
from core.errors import InputError
from core.imageio import content_hash, load_rgb
from core.types import InspectionReport
from services.container import Services
from services.lock import MODEL_LOCK
from stores.runs import write_inspection_artifacts


def resolve_product(services: Services, rgb: np.ndarray, product: str | None) -> tuple[str, str, float | None]:
    """``(product id, source "user" | "inferred", confidence or None)`` for a photo.

    Raises:
        UnknownProductError: an unknown product id.
        InputError: no product given and an empty gallery to infer it from.
    """
    prod = parse_product(product)
    if prod is not None:
        return prod, "user", None
    try:
        prod, conf = services.infer_product(rgb)
    except RuntimeError as exc:
        raise InputError(str(exc)) from None
    return prod, "inferred", float(conf)


def inspect_image(services: Services, image, product: str | None = None, *, out_dir: Path | None = None,
                  artifacts: bool = True, display_max_side: int | None = None) -> InspectionReport:
    """Score one photo against its product's memory bank.

    Args:
        services: the process's services.
        image: a path, encoded bytes, a PIL image or an RGB / gray array (decoded with
            :func:`core.imageio.load_rgb`, pixel cap ``Settings.max_image_pixels``).
        product: product id, or None / ``auto`` to infer it from the nearest gallery images.
        out_dir: folder for the pictures (default: a fresh run folder of ``services.runs``).
        artifacts: write the pictures (anomaly map ``.npy``, mask, heat map, overlay, comparison).
        display_max_side: store the pictures and the map scaled to this longer side (the app);
            None: at the input's resolution (the CLI contract).

    Returns:
        :class:`core.types.InspectionReport` (``result`` holds the arrays).

    The photo is scored at its own size times the product's pixel scale (``BankMeta.pixel_scale``;
    1.0 = the camera's native pixels): a small photo is not magnified.

    Raises:
        core.imageio.InvalidImageError: not an image, truncated, too many pixels.
        InputError: a photo too small for the model (a side below 64 px at the product's pixel scale).
        core.catalog.UnknownProductError: unknown product or no fitted bank for it.
        InputError: the product cannot be inferred (empty gallery).
    """
    t0 = time.perf_counter()
    rgb = load_rgb(image)
    prod, source, conf = resolve_product(services, rgb, product)
    bank = services.banks.get(prod)
    with MODEL_LOCK.shared():
        try:
            result = bank.predict([rgb])[0]
        except ValueError as exc:  # a photo too small for the model input at the product's pixel scale
            raise InputError(str(exc)) from None
    files: dict[str, str | None] = {}
    if artifacts:
        files = write_inspection_artifacts(result, rgb, out_dir or services.runs.new_run("inspect"),
                                           display_max_side=display_max_side)
    return InspectionReport(
        product=prod, product_source=source, product_confidence=conf, score=result.score,
        threshold=result.threshold, is_anomalous=result.is_anomalous, regions=result.regions,
        model=result.model, elapsed_ms=(time.perf_counter() - t0) * 1000.0, width=int(rgb.shape[1]),
        height=int(rgb.shape[0]), image_sha256=content_hash(rgb), artifacts=files, result=result,
        margin=None if result.margin != result.margin else float(result.margin), uncertain=bool(result.uncertain))


def inspect_images(services: Services, images: list, product: str | None = None, *,
                   out_dir: Path | None = None, names: list[str] | None = None) -> list[InspectionReport]:
    """:func:`inspect_image` for several photos (models loaded once); reports in input order.

    Args:
        names: a short name per image for its artifact sub-folder ``<i>_<name>`` of ``out_dir``.
    """
    root = Path(out_dir) if out_dir else services.runs.new_run("inspect")
    out = []
    for i, image in enumerate(images):
        name = Path(names[i]).stem[:40] if names else "image"
        out.append(inspect_image(services, image, product, out_dir=root / f"{i:03d}_{name}"))
    return out
