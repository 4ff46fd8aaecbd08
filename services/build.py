"""The build use case: everything a fresh state directory needs (``python cli.py build``).

Order: sample data (:mod:`data.build`) -> PatchCore memory bank per product -> gallery
image index (normal statistics, defect descriptors, the per-product defect metric) ->
manual store. Each step is idempotent: work already done is skipped unless ``force`` is
set, so a second build takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from core.imageio import content_hash, load_rgb
from core.settings import DEFECT_TYPES, PRODUCTS
from data import synth, synth_alt
from data.acquisition import random_acquisition
from data.build import build_sample_data, load_manifest
from models.embedders import DefectAwareEmbedder
from models.patchcore.model import config_from_meta
from services.container import Services
from services.lock import MODEL_LOCK
from services.products import fit_bank, fit_config

Progress = Callable[[float, str], None]


def _noop(_f: float, _m: str) -> None:
    return None


def data_version(manifest: dict) -> str:
    """What a bank fitted from the sample data depends on: ``"<manifest version>/<seed>"``."""
    return f"{manifest.get('version')}/{manifest.get('seed')}"


def fit_from_manifest(services: Services, product: str, data_dir: Path | None = None,
                      progress: Progress | None = None) -> dict:
    """Fit ``product`` from the sample data's manifest: train normals (bank region) in the bank, val
    normals (tune region) as calibration normals, val defects reported.

    The bank's meta.json records the sample data's version (:func:`data_version`): a build after the
    data changed refits it.

    Raises:
        FileNotFoundError: no manifest. ValueError: no train items for the product.
    """
    data_dir = Path(data_dir or services.settings.data_dir)
    manifest = load_manifest(data_dir)
    items = [it for it in manifest["items"] if it.get("product") == product]
    train = [it for it in items if it.get("split") == "train" and it.get("label") == "good"]
    if not train:
        raise ValueError(f"manifest in {data_dir} has no train images for product {product!r}")
    val_good = [it for it in items if it.get("split") == "val" and it.get("label") == "good"]
    val_bad = [it for it in items if it.get("split") == "val" and it.get("label") == "defect"]
    paths = [str(data_dir / it["image"]) for it in train]
    return fit_bank(services, product, [load_rgb(p) for p in paths],
                    [load_rgb(data_dir / it["image"]) for it in val_good],
                    [load_rgb(data_dir / it["image"]) for it in val_bad] or None,
                    train_paths=paths, progress=progress, record={"data_version": data_version(manifest)})


#: generators that draw the defect metric's training defects (data.holdout_synth is evaluation-only)
TRAINING_GENERATORS = ("data.synth", "data.synth_alt")
#: acquisition changes of the metric's training defects (how many, from data.acquisition's list)
TRAINING_N_CHANGES = (0, 2)


def synthesize_training_defects(normals: list[np.ndarray], product: str, per_type: int,
                                seed: int = 777) -> tuple[list[np.ndarray], list[str]]:
    """Extra labelled defects for fitting the defect metric: two independent generators on normal images.

    Draws ``per_type`` defects of each type of :data:`core.settings.DEFECT_TYPES` onto the
    normal images (cycled), alternating between the data builder's generator
    (:func:`data.synth.synthesize`) and a second, independently written one
    (:func:`data.synth_alt.draw`), each followed by 0-2 acquisition changes
    (:func:`data.acquisition.random_acquisition`: scale, blur, sharpening, exposure, gamma,
    gray, JPEG, noise): the metric learns what a defect type looks like rather than one
    drawing routine or one camera (issue 15). Generators are seeded by
    ``(seed, product, type, i)`` (deterministic). Only the metric sees these images; they are
    never indexed or shown. The evaluation generator (:mod:`data.holdout_synth`) is never used.

    Returns:
        ``(images, defect_types)``: RGB uint8 ``(H, W, 3)`` images and their labels.
    """
    if not normals or per_type <= 0:
        return [], []
    pseed = int.from_bytes(product.encode()[:8].ljust(8, b"\0"), "little") % (2**31)
    images, labels = [], []
    for ti, defect in enumerate(DEFECT_TYPES):
        for i in range(per_type):
            rng = np.random.default_rng([seed, pseed, ti, i])
            clean = normals[i % len(normals)]
            if i % 2 == 0:
                img = synth.synthesize(defect, clean, rng, product).image
            else:
                img, _ = synth_alt.draw(clean, defect, rng)
            img, _ = random_acquisition(img, rng, n_changes=TRAINING_N_CHANGES)
            images.append(img)
            labels.append(defect)
    return images, labels


def gallery_fingerprint(services: Services, normals: dict, gallery: list[dict], synth_per_type: int) -> str:
    """sha256 of what a gallery build depends on: normals, gallery images, model, descriptor, banks, synth count
    and the metric's training generators."""
    index = services.image_index
    banks = {}
    for p in sorted({g["product"] for g in gallery}):
        if p in services.banks.products():
            banks[p] = services.banks.read_meta(p).get("fitted_at")
    return hashlib.sha256(json.dumps([normals, [g["image"] for g in gallery], index.model,
                                      index.descriptor_config.to_dict(), banks, synth_per_type,
                                      list(TRAINING_GENERATORS), list(TRAINING_N_CHANGES)],
                                     sort_keys=True).encode()).hexdigest()


def build_gallery(services: Services, data_dir: Path | None = None, progress: Progress | None = None,
                  normals_per_product: int = 40, synth_per_type: int | None = None) -> dict:
    """Index the manifest's gallery split, with normal statistics and the defect metric.

    Steps: per-product normal mean from train normals; PatchCore anomaly maps of the
    gallery images (banks must be fitted first, as :func:`build_state` does; products
    without a bank get no defect part); defect descriptors; per-product metric
    (:class:`models.defect_descriptor.DefectProjection`) fitted on the gallery's labels plus
    ``synth_per_type`` defects per type synthesized on the product's val normals (never
    indexed; the val defect queries are other images); vectors into the vector store.
    Idempotent: a second call with the same manifest, banks and configuration only checks.

    Args:
        synth_per_type: None = ``Settings.synth_per_type`` (``DRA_SYNTH_PER_TYPE``); 0 = gallery only.

    Returns:
        ``{"items", "added", "products", "model", "skipped", "metric": {product: dims}}``.

    Raises:
        FileNotFoundError: no manifest.
    """
    data_dir = Path(data_dir or services.settings.data_dir)
    if synth_per_type is None:
        synth_per_type = int(services.settings.synth_per_type)
    index = services.image_index
    manifest = load_manifest(data_dir)
    gallery = [it for it in manifest["items"] if it["split"] == "gallery"]
    normals: dict[str, list[str]] = {}
    for it in manifest["items"]:
        if it["split"] == "train" and it["label"] == "good":
            normals.setdefault(it["product"], []).append(it["image"])
    normals = {p: sorted(v)[:normals_per_product] for p, v in normals.items()}
    fp = gallery_fingerprint(services, normals, gallery, synth_per_type)
    products = sorted({g["product"] for g in gallery})
    report = progress or _noop
    if index.manifest_fingerprint == fp and len(index) >= len(gallery):
        return {"items": len(index), "added": 0, "products": products, "model": index.model, "skipped": True,
                "metric": {p: v.out_dim for p, v in index.projections.items()}}
    with MODEL_LOCK.shared():
        if isinstance(index.embedder, DefectAwareEmbedder) and normals:
            report(0.0, "normal statistics")
            index.set_normal_means_only(index.embedder.compute_normal_means(
                {p: [load_rgb(data_dir / rel) for rel in rels] for p, rels in normals.items()}))
        rows = []
        labelled: dict[str, tuple[list, list]] = {}
        for n, product in enumerate(products):
            its = [g for g in gallery if g["product"] == product]
            rgbs = [load_rgb(data_dir / g["image"]) for g in its]
            report(0.1 + 0.6 * n / len(products), f"{product}: anomaly maps and defect descriptors")
            descs = index.describe(rgbs, product)
            for g, rgb, d in zip(its, rgbs, descs):
                rows.append({"rgb": rgb, "product": product, "defect_type": g.get("defect_type"),
                             "note": g.get("note") or "", "source": g["id"], "defect_descriptor": d})
                if d is not None and g.get("defect_type"):
                    labelled.setdefault(product, ([], []))[0].append(d)
                    labelled[product][1].append(g["defect_type"])
            if product in labelled and synth_per_type > 0:
                clean = [load_rgb(data_dir / it["image"]) for it in manifest["items"]
                         if it["product"] == product and it["split"] == "val" and it["label"] == "good"]
                ims, types = synthesize_training_defects(clean, product, synth_per_type)
                step = 50
                for start in range(0, len(ims), step):
                    report(0.1 + 0.6 * (n + 0.2 + 0.8 * start / len(ims)) / len(products),
                           f"{product}: synthesized defects {start}/{len(ims)} (defect metric)")
                    for d, t in zip(index.describe(ims[start:start + step], product), types[start:start + step]):
                        if d is not None:
                            labelled[product][0].append(d)
                            labelled[product][1].append(t)
        index.refresh_descriptors(products, {content_hash(r["rgb"])[:16]: r["defect_descriptor"] for r in rows})
        report(0.7, "fitting the defect metric")
        fitted = index.fit_projections({p: (np.stack(X), y) for p, (X, y) in labelled.items()})
        before = len(index)
        index.add_many(rows, progress=lambda f, m: report(0.75 + 0.25 * f, m))
        index.commit_build(fp)
    return {"items": len(index), "added": len(index) - before, "products": products, "model": index.model,
            "skipped": False, "metric": fitted}


def build_manuals(services: Services, data_dir: Path | None = None, progress: Progress | None = None) -> dict:
    """Ingest every manual listed in the manifest (``manuals: [{product, lang, path}]``).

    Idempotent: a manual already stored under the same file name and product is skipped.

    Returns:
        ``{"documents", "pages", "chunks", "skipped"}``.

    Raises:
        FileNotFoundError: no manifest.
    """
    data_dir = Path(data_dir or services.settings.data_dir)
    manuals = load_manifest(data_dir).get("manuals", [])
    store = services.manuals
    stored = {d["source"]: d for d in store.list_documents()}
    total = {"documents": 0, "pages": 0, "chunks": 0, "skipped": 0}
    for i, m in enumerate(manuals):
        pdf = data_dir / m["path"]
        if pdf.name in stored and stored[pdf.name]["product"] == m.get("product"):
            total["skipped"] += 1
            total["documents"] += 1
            total["pages"] += int(stored[pdf.name]["pages"] or 0)
            total["chunks"] += stored[pdf.name]["chunks"]
            continue
        r = store.ingest_pdf(pdf, product=m.get("product"))
        total["documents"] += 1
        total["pages"] += r["pages"]
        total["chunks"] += r["chunks"]
        if progress:
            progress((i + 1) / len(manuals), f"ingested {pdf.name}")
    return total


def _bank_matches(services: Services, product: str, manifest: dict) -> bool:
    """A bank fitted on this sample data version with the product's current configuration (banks of older
    data versions, fitted before the version was recorded, or of another configuration - e.g. after
    :data:`models.patchcore.config.PRODUCT_CONFIGS` changed - are refitted by :func:`build_state`)."""
    try:
        meta = services.banks.read_meta(product)
    except (OSError, ValueError, KeyError):
        return False
    if meta.get("data_version") != data_version(manifest):
        return False
    # a bank of another configuration than the product's current one (e.g. its tuned entry changed)
    return config_from_meta({"coreset_ratio": 0.01, **meta}).as_dict() == fit_config(services, product).as_dict()


def build_state(services: Services, force: bool = False, progress: Progress | None = None) -> dict:
    """Build sample data and all stores under ``services.settings.state_dir``.

    Args:
        force: rebuild everything even when present.
        progress: ``(fraction 0..1, message)`` callback.

    Returns:
        ``{"data": ..., "patchcore": {product: fit summary | "present"}, "index": ...,
        "manuals": ..., "elapsed_s": float}``.
    """
    settings = services.settings
    progress = progress or _noop
    t0 = time.perf_counter()
    summary: dict = {}
    progress(0.0, "sample data")
    summary["data"] = build_sample_data(settings.data_dir, force=force,
                                        progress=lambda f, m: progress(0.25 * f, f"sample data: {m}"))
    manifest = load_manifest(settings.data_dir)
    products = sorted({it["product"] for it in manifest["items"]}, key=lambda p: (p not in PRODUCTS, p))
    fitted = set(services.banks.products())
    summary["patchcore"] = {}
    for i, product in enumerate(products):
        if product in fitted and not force and _bank_matches(services, product, manifest):
            summary["patchcore"][product] = "present"
            continue
        base = 0.25 + 0.5 * i / len(products)
        summary["patchcore"][product] = fit_from_manifest(
            services, product, settings.data_dir,
            progress=lambda f, m, b=base, p=product: progress(b + 0.5 * f / len(products), f"PatchCore {p}: {m}"))
    progress(0.75, "gallery index")
    summary["index"] = build_gallery(services, settings.data_dir,
                                     progress=lambda f, m: progress(0.75 + 0.15 * f, f"index: {m}"))
    progress(0.9, "manual store")
    summary["manuals"] = build_manuals(services, settings.data_dir,
                                       progress=lambda f, m: progress(0.9 + 0.1 * f, f"manuals: {m}"))
    summary["elapsed_s"] = round(time.perf_counter() - t0, 2)
    progress(1.0, "done")
    return summary
