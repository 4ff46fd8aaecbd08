"""Evaluation use cases on the project's own data: anomaly scoring and similar-defect retrieval.

``cli.py eval anomaly`` / ``eval retrieval`` print these; the agent's evaluation
(``eval ask``) lives in :mod:`agent.evaluate` (it runs the agent).

Two splits (:data:`SPLITS`, issue 15): ``val`` is the tuning split (the data builder's own
defect generator on crops of the ``tune`` region; settings are chosen here and its normals
calibrate the thresholds); ``unseen`` is kept out of every fit, bank, gallery, metric and
threshold: the ``unseen`` region's native-scale photos (128 px tall, half gray), defects
drawn by the second generator (:mod:`data.holdout_synth`), the acquisition changes on
normals and defects (:mod:`data.build`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from core.catalog import UnknownProductError
from core.imageio import load_rgb
from core.types import SearchHit
from data.build import load_manifest
from models.patchcore.calibration import binary_metrics
from services.container import Services
from services.inspect import inspect_image
from services.lock import MODEL_LOCK
from services.search import TYPE_CONFIDENT, type_confidence, vote_defect_type

#: evaluation splits of the sample data (manifest ``split`` values)
SPLITS = ("val", "unseen")


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown evaluation split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def evaluate_anomaly(services: Services, product: str, data_dir: Path | None = None,
                     limit: int | None = None, split: str = "val") -> dict:
    """Image AUROC, pixel AUROC, per-defect-type image AUROC, F1, FPR and recall on one split.

    AUROCs by sklearn's ``roc_auc_score``. Pixel AUROC pools every pixel of every image of the
    split at its own resolution (anomaly maps at the input's size; normal images count as
    all-negative), masks from the manifest (non-zero = defect). Per-defect-type image AUROC:
    the images of one defect type against all normal images. F1 / precision / recall / FPR:
    image verdicts at the bank's calibrated threshold (each photo's size-adjusted one,
    :meth:`models.patchcore.model.PatchCore.threshold_for`; ``threshold`` reports the reference
    one); ``uncertain_rate``: share of verdicts
    within the bank's uncertain band; ``gray``: FPR / recall / image AUROC of the gray photos
    alone (three equal channels: a monochrome camera), when the split has any.

    Args:
        product: product with a fitted bank.
        data_dir: folder of ``manifest.json`` (default ``settings.data_dir``).
        limit: evaluate only the first ``limit`` normal and the first ``limit`` images of
            each defect type (a fast CI mode; None = all).
        split: ``val`` (tuning split) or ``unseen`` (:data:`SPLITS`).

    Returns:
        ``{"split", "image_auroc", "pixel_auroc", "per_type_image_auroc": {type: auroc}, "n_normal",
        "n_defect", "threshold", "f1", "precision", "recall", "fpr", "uncertain_rate", "gray",
        "pixel_threshold", "ms_per_image", "model"}`` (AUROCs are None when a class is missing).

    Raises:
        FileNotFoundError: no manifest; ValueError: unknown split, no images of the split for the
        product; stores.banks.BankNotFoundError: no bank.
    """
    from sklearn.metrics import roc_auc_score

    data_dir = Path(data_dir or services.settings.data_dir)
    _check_split(split)
    items = [it for it in load_manifest(data_dir)["items"]
             if it.get("product") == product and it.get("split") == split]
    if not items:
        raise ValueError(f"manifest in {data_dir} has no {split} images for product {product!r} "
                         "(rebuild the sample data: python cli.py build)")
    if limit is not None:
        counts: dict[str, int] = {}
        kept = []
        for it in items:
            key = (it.get("defect_type") or "defect") if it.get("label") == "defect" else "good"
            if counts.get(key, 0) < limit:
                kept.append(it)
                counts[key] = counts.get(key, 0) + 1
        items = kept
    images = [load_rgb(data_dir / it["image"]) for it in items]
    labels = np.array([it.get("label") == "defect" for it in items])
    bank = services.banks.get(product)  # load the bank before timing
    t0 = time.perf_counter()
    with MODEL_LOCK.shared():
        results = bank.predict(images)
    ms = (time.perf_counter() - t0) * 1000.0 / len(images)
    scores = np.array([r.score for r in results])
    px_scores, px_labels = [], []
    for it, r in zip(items, results, strict=True):
        if it.get("mask"):
            m = np.asarray(load_rgb(data_dir / it["mask"]))[..., 0] > 0
        else:
            m = np.zeros(r.anomaly_map.shape, dtype=bool)
        px_scores.append(r.anomaly_map.reshape(-1))
        px_labels.append(m.reshape(-1))
    px_l = np.concatenate(px_labels)
    both = labels.any() and (~labels).any()
    types = [it.get("defect_type") if it.get("label") == "defect" else None for it in items]
    per_type = {}
    for t in sorted({t for t in types if t}):
        sel = np.array([tt is None or tt == t for tt in types])
        per_type[t] = float(roc_auc_score(labels[sel], scores[sel])) if (~labels[sel]).any() else None
    uncertain = np.array([r.uncertain for r in results])
    gray = np.array([bool(np.array_equal(im[..., 0], im[..., 1]) and np.array_equal(im[..., 1], im[..., 2]))
                     for im in images])
    out = {
        "split": split,
        "image_auroc": float(roc_auc_score(labels, scores)) if both else None,
        "per_type_image_auroc": per_type,
        "pixel_auroc": float(roc_auc_score(px_l, np.concatenate(px_scores))) if px_l.any() and (~px_l).any() else None,
        "n_normal": int((~labels).sum()),
        "n_defect": int(labels.sum()),
        "threshold": float(bank.meta["threshold"]),
        "pixel_threshold": results[0].pixel_threshold,
        "ms_per_image": round(ms, 1),
        "model": results[0].model,
    }
    # each photo's own (size-adjusted) threshold decides its verdict
    over = scores - np.array([r.threshold for r in results])
    out.update(binary_metrics(labels, over, 0.0))
    out["uncertain_rate"] = float(uncertain.mean())
    if gray.any():
        g = binary_metrics(labels[gray], over[gray], 0.0)
        g_both = labels[gray].any() and (~labels[gray]).any()
        out["gray"] = {"n": int(gray.sum()), "fpr": g["fpr"], "recall": g["recall"],
                       "image_auroc": float(roc_auc_score(labels[gray], scores[gray])) if g_both else None}
    return out


def evaluate_retrieval(services: Services, data_dir: Path | None = None, k: int = 10, split: str = "val") -> dict:
    """Similar-defect retrieval quality with the manifest's defects of one split as queries.

    Queries are never in the gallery and go through :meth:`stores.image_index.ImageIndex.search` exactly as a
    user's image does (product inferred, PatchCore map predicted, no ground-truth
    mask). Metrics: defect-type Recall@1 / Recall@5 (a hit of the query's defect
    type within the top 1 / 5), MRR@10 (reciprocal rank of the first hit of that
    type within the top 10, else 0), product accuracy of the top hit; overall, per
    product and per type; mean wall time per query (ms, PatchCore included). The metric's own
    type call (arg-max of :meth:`stores.image_index.ImageIndex.type_probabilities`) is scored
    separately above and below :data:`services.search.TYPE_CONFIDENT`: the share of confident
    calls and the accuracy of each group (``type_confidence``).

    ``split``: ``val`` (the data builder's generator, the tuning split) or ``unseen`` (the second
    generator, native-scale gray / colour photos with acquisition changes; :data:`SPLITS`).

    Returns:
        ``{"split", "recall_at_1", "recall_at_5", "mrr_at_10", "product_accuracy", "n_queries",
        "per_product": {p: {...}}, "recall_at_1_per_type", "type_confidence": {"threshold",
        "confident_share", "accuracy_confident", "accuracy_uncertain", "n"}, "voted_type_accuracy",
        "flagged": {"n", "share", "recall_at_1", "voted_type_accuracy", "per_product": {p: {"n",
        "recall_at_1", "voted_type_accuracy"}}}, "ms_per_query", "model"}``.
        ``voted_type_accuracy``: the share of queries whose score-weighted vote over the top
        ``Settings.search_k`` hits (:func:`services.search.vote_defect_type`, the type the agent
        states) is right. ``flagged``: the queries that anomaly scoring flags as a user's photo is
        scored (product inferred, calibrated threshold); the agent states a type only for those.
        ``ms_per_query``: the search alone.

    Raises:
        ValueError: unknown split or no defects of the split in the manifest.
    """
    data_dir = Path(data_dir or services.settings.data_dir)
    _check_split(split)
    index = services.image_index
    manifest = load_manifest(data_dir)
    queries = [it for it in manifest["items"] if it["split"] == split and it["label"] == "defect"]
    if not queries:
        raise ValueError(f"the manifest has no {split} defects to evaluate with (rebuild: python cli.py build)")
    rows, calls, flags = [], [], []
    search_s = 0.0
    for q in queries:
        rgb = load_rgb(data_dir / q["image"])
        t0 = time.perf_counter()
        with MODEL_LOCK.shared():
            hits, probs = index.search_with_types(rgb, k=k)
        search_s += time.perf_counter() - t0
        if probs:
            best = max(probs, key=probs.get)
            calls.append((type_confidence(probs, best)["confident"], best == q["defect_type"]))
        types = [h["defect_type"] for h in hits]
        rank = next((i + 1 for i, t in enumerate(types) if t == q["defect_type"]), None)
        voted, _ = vote_defect_type([SearchHit.from_row(h) for h in hits[:services.settings.search_k]])
        rows.append((q["product"], q["defect_type"], rank, bool(hits) and hits[0]["product"] == q["product"],
                     voted == q["defect_type"]))
        flags.append(_flagged(services, rgb))
    ms = search_s * 1000.0 / len(queries)

    def summary(sel: list[tuple]) -> dict:
        n = len(sel)
        return {"recall_at_1": sum(r[2] == 1 for r in sel) / n,
                "recall_at_5": sum(r[2] is not None and r[2] <= 5 for r in sel) / n,
                "mrr_at_10": sum(1.0 / r[2] if r[2] else 0.0 for r in sel) / n,
                "product_accuracy": sum(r[3] for r in sel) / n, "n_queries": n}

    out = {"split": split, **summary(rows)}
    out["per_product"] = {p: summary([r for r in rows if r[0] == p]) for p in sorted({r[0] for r in rows})}
    out["recall_at_1_per_type"] = {t: float(np.mean([r[2] == 1 for r in rows if r[1] == t]))
                                   for t in sorted({r[1] for r in rows})}

    out["type_confidence"] = {"threshold": TYPE_CONFIDENT, "n": len(calls),
                              "confident_share": _share([c for c, _ in calls]),
                              "accuracy_confident": _share([ok for confident, ok in calls if confident]),
                              "accuracy_uncertain": _share([ok for confident, ok in calls if not confident])}
    out["ms_per_query"] = round(ms, 1)
    # what a user is told: the agent names a defect type only for a photo that anomaly scoring flags
    known = [(f, r) for f, r in zip(flags, rows) if f is not None]
    flagged = [r for f, r in known if f]
    out["flagged"] = {"n": len(flagged), "share": _share([f for f, _ in known]),
                      "recall_at_1": _share([r[2] == 1 for r in flagged]),
                      "voted_type_accuracy": _share([r[4] for r in flagged]),
                      "per_product": {p: {"n": sum(r[0] == p for r in flagged),
                                          "recall_at_1": _share([r[2] == 1 for r in flagged if r[0] == p]),
                                          "voted_type_accuracy": _share([r[4] for r in flagged if r[0] == p])}
                                      for p in sorted({r[0] for r in rows})}}
    out["voted_type_accuracy"] = _share([r[4] for r in rows])
    out.update(evaluate_text(services))
    out["model"] = index.model
    return out


def _share(flags: list[bool]) -> float | None:
    """Share of true values, rounded to 3 places; None for an empty list."""
    return round(sum(flags) / len(flags), 3) if flags else None


def _flagged(services: Services, rgb: np.ndarray) -> bool | None:
    """Whether anomaly scoring flags the photo as the user path does (product inferred, calibrated
    threshold); None when the inferred product has no fitted bank."""
    try:
        return bool(inspect_image(services, rgb, None, artifacts=False).is_anomalous)
    except UnknownProductError:
        return None


def evaluate_text(services: Services, k: int = 5) -> dict:
    """Text -> image Recall@k for template queries, per defect type.

    For every (product, defect type) pair present in the index the query
    ``"a <defect type> on the <product>"`` goes through :meth:`stores.image_index.ImageIndex.search_text` without
    filters; a hit is an item of that product and type within the top ``k``. With
    the offline embedders this exercises the caption vectors (whose captions hold
    the labels, so it measures the text path, not visual understanding); with a
    CLIP embedder it is real text -> image retrieval.

    Returns:
        ``{"text_recall_at_5": overall, "text_recall_at_5_per_type": {type: value},
        "text_matched": "caption" | "image", "n_text_queries": n}`` (key suffix = ``k``).
    """
    index = services.image_index
    pairs = index.pairs()
    hits: dict[str, list[bool]] = {}
    matched = "caption"
    for product, defect in pairs:
        with MODEL_LOCK.shared():
            res = index.search_text(f"a {defect} on the {product}", k=k)
        matched = res[0]["matched"] if res else matched
        hits.setdefault(defect, []).append(any(h["product"] == product and h["defect_type"] == defect for h in res))
    allhits = [h for v in hits.values() for h in v]
    return {f"text_recall_at_{k}": float(np.mean(allhits)) if allhits else 0.0,
            f"text_recall_at_{k}_per_type": {t: float(np.mean(v)) for t, v in sorted(hits.items())},
            "text_matched": matched, "n_text_queries": len(allhits)}
