"""Product use cases: fit a product's PatchCore memory bank (new products from the UI / API, and the build).

A fit builds the model under the model lock's exclusive side only while the model is
constructed (torch.fx tracing); feature extraction, the coreset and the calibration run
beside inspections and chats.

Every fit (the build's and a product added from the UI alike) covers what a line sees
(issue 15): the memory bank holds, besides the training normals, ``patchcore_acquisition_copies``
acquisition-changed copies of each (:func:`acquisition_copies`: scale ±20 % around native,
blur, sharpening, exposure, gamma, gray, JPEG, noise, :mod:`data.acquisition`), and the
image threshold comes from calibration normals plus ``patchcore_calibration_copies`` changed
copies of each, at the target false-positive rate ``patchcore_target_fpr``, scored only by a
bank that does not contain them (``patchcore_cross_fit``: two folds, each fold's bank scores the
other fold's normals; the product's bank holds both folds). Photos are scored at native scale
times the product's pixel scale, recorded in its meta.json.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from core import catalog
from core.errors import InputError
from core.settings import PRODUCTS
from core.imageio import load_rgb, save_png
from core.uploads import UploadError, images_from_uploads
from data.acquisition import ACQUISITION_CHANGES, random_acquisition
from models.patchcore.config import SYMMETRIES, PatchCoreConfig, config_for
from models.patchcore.model import PatchCore
from models.patchcore.simplenet import HEAD_COPIES
from services.container import Services
from services.lock import MODEL_LOCK

Progress = Callable[[float, str], None] | None
#: the products the sample data ships; a fit does not replace them unless an operator confirms it
SHIPPED_PRODUCTS = frozenset(PRODUCTS)
NORMAL_REFERENCES = 6  # normal images of a fitted product added to the image index (product inference)
#: acquisition changes of the bank's and the calibration's copies, and how many per copy
ACQUISITION_N_CHANGES = (1, 3)
ACQUISITION_SEED = 15
#: seed of the acquisition copies a SimpleNet-scored bank's head is trained on (the set-up of
#: bench/bench_simplenet.py, where the scorer was chosen)
HEAD_COPY_SEED = 5


def acquisition_copies(images: list[np.ndarray], copies: int, seed: int = ACQUISITION_SEED,
                       changes: tuple[str, ...] = ACQUISITION_CHANGES,
                       n_changes: tuple[int, int] = ACQUISITION_N_CHANGES) -> list[np.ndarray]:
    """``copies`` acquisition-changed versions of each image (:func:`data.acquisition.random_acquisition`).

    Each copy draws 1-3 of ``changes`` (scale ±20 %, blur, sharpen, exposure, gamma, gray,
    JPEG, noise by default) with a generator seeded by ``(seed, copy, index)``: deterministic.

    Returns:
        RGB uint8 images, copy-major (all images of copy 0, then copy 1, ...).
    """
    out = []
    for c in range(max(0, int(copies))):
        for i, im in enumerate(images):
            img, _ = random_acquisition(load_rgb(im), np.random.default_rng([seed, c, i]), n_changes=n_changes,
                                        changes=changes)
            out.append(img)
    return out


def fit_config(services: Services, product: str, symmetry: str | None = None, **overrides) -> PatchCoreConfig:
    """The :class:`models.patchcore.config.PatchCoreConfig` a fit of ``product`` uses.

    Field by field: an override if given (not None), else the settings' non-zero
    ``patchcore_image_size`` / ``patchcore_coreset_ratio`` / ``patchcore_pixel_scale`` /
    ``patchcore_head_steps``, else the product's tuned entry,
    else the default; ``symmetry`` sets the bank and test-time views.

    Raises:
        ValueError: unknown symmetry or views.
    """
    s = services.settings
    over = {"image_size": s.patchcore_image_size or None, "coreset_ratio": s.patchcore_coreset_ratio or None,
            "pixel_scale": s.patchcore_pixel_scale or None, "head_steps": s.patchcore_head_steps or None}
    over.update({k: v for k, v in overrides.items() if v is not None})
    return config_for(product, symmetry, **over)


def fit_bank(services: Services, product: str, train: list[np.ndarray], val_normal: list[np.ndarray],
             val_defect: list[np.ndarray] | None = None, *, train_paths: list[str] | None = None,
             symmetry: str | None = None, progress: Progress = None, record: dict | None = None,
             **overrides) -> dict:
    """Fit and save ``product``'s memory bank (:meth:`models.patchcore.model.PatchCore.fit` + :class:`stores.banks.BankStore`).

    The bank gets ``settings.patchcore_acquisition_copies`` acquisition-changed copies of each
    training normal (a ``scorer="simplenet"`` configuration's head is trained on the training
    normals and :data:`models.patchcore.simplenet.HEAD_COPIES` other copies of each); the threshold
    is calibrated on ``val_normal`` plus ``settings.patchcore_calibration_copies`` changed copies of each, at
    ``settings.patchcore_target_fpr`` (see the module docstring). With ``settings.patchcore_cross_fit``
    (default) those calibration normals form a second fold of the bank and the threshold comes from
    out-of-fold scores only (:meth:`models.patchcore.model.PatchCore.fit`).

    Args:
        train, val_normal, val_defect: RGB uint8 images (val_defect optional: reported only).
            ``val_normal`` must not be in ``train`` (calibration on memorised normals flags new parts).
        train_paths: file path of each training image (nearest-normal references).
        symmetry: :data:`models.patchcore.config.SYMMETRIES` key, or None for the product's tuned views.
        record: extra JSON-ready fields written into the bank's meta.json (e.g. the sample data's
            version a build fitted it on).
        overrides: :class:`models.patchcore.config.PatchCoreConfig` fields (e.g. ``pixel_scale``);
            the settings' non-zero ``patchcore_image_size`` / ``patchcore_coreset_ratio`` /
            ``patchcore_pixel_scale`` apply first.

    Returns:
        ``{"bank_size", "threshold", "pixel_threshold", "coreset_s", "image_auroc" / "recall" (with
        defects), "fpr" (on the calibration normals), "fit_s"}``.

    Raises:
        ValueError: see :meth:`PatchCore.fit` (bad id, too few images, unknown views or symmetry).
    """
    t0 = time.perf_counter()
    s = services.settings
    if len(val_normal) < 2:  # before the acquisition copies multiply them
        raise ValueError(f"need at least 2 calibration normals, got {len(val_normal)}")
    cfg = fit_config(services, product, symmetry, **overrides)
    extra = acquisition_copies(train, s.patchcore_acquisition_copies)
    head_extra = acquisition_copies(train, HEAD_COPIES, seed=HEAD_COPY_SEED) if cfg.scorer == "simplenet" else None
    calib = [load_rgb(im) for im in val_normal] + acquisition_copies(val_normal, s.patchcore_calibration_copies,
                                                                      seed=ACQUISITION_SEED + 1)
    bank, summary = PatchCore.fit(product, train, calib, val_defect, cfg=cfg, rt=services.banks.runtime,
                                  train_paths=train_paths, symmetry=symmetry, bank_extra=extra, head_extra=head_extra,
                                  target_fpr=s.patchcore_target_fpr, cross_fit=s.patchcore_cross_fit,
                                  uncertain_band=s.patchcore_uncertain_band,
                                  progress=progress, guard=MODEL_LOCK.exclusive)
    if record:
        bank.meta.update(record)
    services.banks.save(product, bank)
    summary["fit_s"] = round(time.perf_counter() - t0, 2)
    if progress:
        progress(1.0, f"{product}: bank {summary['bank_size']} patches, threshold {summary['threshold']:.3f}")
    return summary


def fit_product(services: Services, name: str, files, *, progress: Progress = None, val_fraction: float = 0.2,
                symmetry: str | None = "none", pixel_scale: float | None = None,
                replace_shipped: bool = False) -> dict:
    """Add a product from normal photos (files and / or zip archives) and fit its PatchCore bank.

    The images are stored as PNG under ``<state_dir>/products/<product>/train/`` (so the
    bank's nearest-normal references survive), split into training and validation normals
    (``val_fraction``, at least 2), fitted and calibrated (:func:`fit_bank`, memory bank
    written atomically), and up to ``NORMAL_REFERENCES`` training images are added to the
    image index as normal references so that product inference can name the product.
    A refit renews the index's defect descriptors of that product.

    Args:
        name: product id (1-40 letters, digits, ``-``, ``_``).
        files: upload values (paths, ``{"path": ...}`` dicts) of images and zip archives.
        symmetry: ``none`` / ``mirror`` / ``flips`` / ``turns`` (empty = ``none``): under which
            mirrors / turns the product looks the same (bank and test-time views).
        pixel_scale: model pixels per photo pixel (None: the settings' ``patchcore_pixel_scale``,
            else 1.0 = the camera's native scale); recorded in meta.json (``pixel_scale``).
        replace_shipped: the operator confirms refitting a shipped product (:data:`SHIPPED_PRODUCTS`);
            without it such an id is refused (one fit with defect photos would make that product's
            defects score NORMAL for everyone).

    Returns:
        ``{"product", "n_train", "n_val", "skipped" [messages], "bank_size", "threshold",
        "pixel_threshold", "fit_s", "symmetry", "views", "pixel_scale", "products"}``.

    Raises:
        InputError: bad product id, symmetry or pixel scale, fewer than 4 usable images, unreadable zip,
            a shipped product id without ``replace_shipped``.
    """
    pid = str(name or "").strip().lower()
    if not pid or len(pid) > 40 or not all(c.isalnum() or c in "-_" for c in pid) or not pid[0].isalnum():
        raise InputError("product id: 1-40 letters, digits, '-' or '_', starting with a letter or digit")
    if pid in SHIPPED_PRODUCTS and not replace_shipped:
        raise InputError(f"{pid!r} is a shipped product: choose a new product id, or confirm replacing the "
                         "shipped one (replace_shipped)")
    sym = str(symmetry or "none").strip().lower()
    if sym not in SYMMETRIES:
        raise InputError(f"symmetry must be one of {', '.join(SYMMETRIES)}, got {symmetry!r}")
    report = progress or (lambda _f, _m: None)
    report(0.0, "reading the uploaded images")
    try:
        images, skipped = images_from_uploads(files)
    except UploadError:
        raise
    if len(images) < 4:
        raise InputError(f"need at least 4 readable normal images, got {len(images)}"
                         + (f" (skipped: {'; '.join(skipped[:5])})" if skipped else ""))
    n_val = max(2, int(round(len(images) * val_fraction)))
    train, val = images[: len(images) - n_val], images[len(images) - n_val:]
    folder = Path(services.settings.state_dir) / "products" / pid
    staging = folder.parent / f".{pid}-{uuid.uuid4().hex[:8]}"
    (staging / "train").mkdir(parents=True, exist_ok=True)
    paths = [str(save_png(rgb, staging / "train" / f"{i:04d}.png")) for i, rgb in enumerate(train)]
    final_paths = [str(folder / "train" / Path(p).name) for p in paths]
    try:
        # the bank records the final paths; the images are published there only after a good fit
        out = fit_bank(services, pid, train, val, train_paths=final_paths, symmetry=sym, pixel_scale=pixel_scale,
                       progress=lambda f, m: report(0.05 + 0.85 * f, m))
        if folder.exists():
            old = folder.parent / f".old-{pid}-{uuid.uuid4().hex[:8]}"
            folder.replace(old)
            staging.replace(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.replace(folder)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    meta = services.banks.read_meta(pid)
    index = services.image_index
    with MODEL_LOCK.shared():
        if any(it["product"] == pid for it in index.items()):  # a refit: descriptors under the new maps
            report(0.9, "renewing the image index's defect descriptors")
            index.renew_descriptors(pid)
        report(0.92, "adding normal references to the image index")
        step = max(1, len(train) // NORMAL_REFERENCES)
        for rgb in train[::step][:NORMAL_REFERENCES]:
            index.add(rgb, pid, None, note="normal reference (product fit)", source="product-fit")
    report(1.0, f"{pid}: fitted")
    return {"product": pid, "n_train": len(train), "n_val": len(val), "skipped": skipped,
            "bank_size": out.get("bank_size"), "threshold": out.get("threshold"),
            "pixel_threshold": out.get("pixel_threshold"), "fit_s": out.get("fit_s"), "symmetry": sym,
            "views": int(meta.get("tta_views", 1)), "pixel_scale": meta.get("pixel_scale"),
            "products": catalog.products()}


def product_rows(services: Services) -> list[list]:
    """One row per fitted product, read from each bank's meta.json (never loads a model):
    ``[product, n_train, bank_size, views, threshold, val image AUROC, fitted_at]`` (the pixel scale is
    in :meth:`stores.banks.BankStore.read_meta` / ``BankMeta.pixel_scale``); a broken
    bank shows as "unreadable bank" instead of hiding the others."""
    out = []
    for p in services.banks.products():
        try:
            m = services.banks.read_meta(p)
        except (OSError, ValueError, KeyError):
            out.append([p, "", "", "", "", "", "unreadable bank"])
            continue
        auroc = m.get("image_auroc_val")
        views = f"{m.get('tta_views', 1)} ({m.get('tta', 'none')})"
        out.append([p, m.get("n_train"), m.get("bank_size"), views, round(float(m.get("threshold", 0)), 4),
                    None if auroc is None else round(float(auroc), 3), m.get("fitted_at", "")])
    return out


def load_images(paths: list[str | Path]) -> list[np.ndarray]:
    """RGB uint8 arrays of image files (:func:`core.imageio.load_rgb`)."""
    return [load_rgb(p) for p in paths]
