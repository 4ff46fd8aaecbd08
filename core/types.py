"""Typed results passed between the layers; turned into JSON only at the edges (CLI, app, tools).

Each ``to_json()`` gives the JSON-friendly dict that ``cli.py``, the app's endpoints and the
agent's tools return for the same input (one place decides names and rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


@dataclass(frozen=True)
class Region:
    """One connected region of an anomaly mask.

    Attributes:
        bbox: ``(x0, y0, x1, y1)`` in pixels of the input image, x1 / y1 exclusive.
        area_frac: region area / image area, 0..1.
        peak: highest anomaly-map value inside the region (PatchCore distance units).
    """

    bbox: tuple[int, int, int, int]
    area_frac: float
    peak: float

    def to_json(self) -> dict:
        """``{"bbox": [x0, y0, x1, y1], "area_frac", "peak"}``."""
        return {"bbox": [int(v) for v in self.bbox], "area_frac": round(float(self.area_frac), 5),
                "peak": round(float(self.peak), 4)}


@dataclass
class InspectionResult:
    """PatchCore verdict for one image (the model's output, arrays included).

    Attributes:
        product: product id whose memory bank scored the image.
        score: image anomaly score (PatchCore distance in feature space, >= 0).
        threshold: calibrated image threshold; ``is_anomalous = score >= threshold``.
        is_anomalous: the verdict.
        anomaly_map: float32 ``(H, W)`` at the input image resolution (blurred patch distances).
        mask: bool ``(H, W)``: ``anomaly_map >= pixel_threshold``.
        regions: connected components of ``mask``, highest peak first, at most 10, specks dropped.
        nearest_normal: path of the most similar normal training image, or None.
        model: model label, e.g. ``patchcore/efficientnet-lite0[blocks 4,7]@256px/...``.
        elapsed_ms: wall time spent on this image (ms).
        pixel_threshold: the calibrated pixel threshold used for ``mask``.
        color_scale: fixed per-product ``(vmin, vmax)`` for heat maps.
        margin: ``(score - threshold) / normal spread``: how far above (> 0) or below (< 0) the
            threshold, in units of the spread of the calibration normals' scores (NaN: unknown).
        uncertain: True when ``|margin|`` is within the bank's uncertain band (the verdict could
            flip under a small change of focus, exposure or zoom).
    """

    product: str
    score: float
    threshold: float
    is_anomalous: bool
    anomaly_map: np.ndarray
    mask: np.ndarray
    regions: list[Region]
    nearest_normal: str | None
    model: str
    elapsed_ms: float
    pixel_threshold: float = float("nan")
    color_scale: tuple[float, float] | None = None
    margin: float = float("nan")
    uncertain: bool = False

    def summary(self) -> dict:
        """JSON-ready fields (no arrays): product, score, threshold, is_anomalous, regions, ..."""
        return {
            "product": self.product,
            "score": _r(self.score),
            "threshold": _r(self.threshold),
            "is_anomalous": bool(self.is_anomalous),
            "margin": _r(self.margin, 3) if self.margin == self.margin else None,
            "uncertain": bool(self.uncertain),
            "regions": [r.to_json() for r in self.regions],
            "nearest_normal": self.nearest_normal,
            "model": self.model,
            "elapsed_ms": _r(self.elapsed_ms, 1),
        }


@dataclass
class BankMeta:
    """What a fitted PatchCore memory bank records about itself (its ``meta.json``).

    Attributes:
        product: product id.
        model: model label (as :attr:`InspectionResult.model`).
        threshold: calibrated image threshold; pixel_threshold: pixel threshold.
        image_size: model input size (pixels); tta: test-time views key; tta_views: their count.
        symmetry: the symmetry chosen at fit time (``none`` / ``mirror`` / ``flips`` / ``turns``) or None.
        fitted_at: ISO time of the fit.
        pixel_scale: model pixels per photo pixel (1.0: photos scored at the camera's native
            scale); None for a bank that resizes every photo to ``image_size`` (before issue 15).
        target_fpr: the false-positive rate the threshold was calibrated for (None: older rule).
        normal_spread: spread of the calibration normals' scores (the margin's unit) or None.
        raw: the whole meta.json (thresholds' rules, validation scores, training paths, ...).
    """

    product: str
    model: str
    threshold: float
    pixel_threshold: float
    image_size: int
    tta: str
    tta_views: int
    symmetry: str | None
    fitted_at: str | None
    pixel_scale: float | None = None
    target_fpr: float | None = None
    normal_spread: float | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, meta: dict) -> "BankMeta":
        """From a meta.json dict (KeyError if a required key is missing)."""
        return cls(product=str(meta["product"]), model=str(meta["model"]), threshold=float(meta["threshold"]),
                   pixel_threshold=float(meta["pixel_threshold"]), image_size=int(meta["image_size"]),
                   tta=str(meta.get("tta", "none")), tta_views=int(meta.get("tta_views", 1)),
                   symmetry=meta.get("symmetry"), fitted_at=meta.get("fitted_at"),
                   pixel_scale=(float(meta.get("pixel_scale", 1.0)) if int(meta["image_size"]) == 0 else None),
                   target_fpr=meta.get("target_fpr"), normal_spread=meta.get("normal_spread"), raw=dict(meta))


@dataclass
class InspectionReport:
    """The inspect use case's answer for one photo (:func:`services.inspect.inspect_image`).

    Attributes:
        product: product id; product_source: ``user`` | ``inferred`` | ``model``;
        product_confidence: vote share of the inferred product 0..1 (None when given).
        score, threshold, is_anomalous: the verdict (see :class:`InspectionResult`).
        margin: ``(score - threshold) / normal spread`` (None: unknown); uncertain: the verdict lies
            within the bank's uncertain band of the threshold.
        regions: defect regions; model: PatchCore model label; elapsed_ms: wall time (ms).
        width, height: input size in pixels; image_sha256: content hash of the decoded pixels.
        artifacts: ``{"anomaly_map" (.npy float32 H x W), "mask", "heatmap", "overlay",
            "comparison"}`` -> file path (None where not written).
        result: the model's :class:`InspectionResult` (arrays; not in the JSON).
    """

    product: str
    product_source: str
    product_confidence: float | None
    score: float
    threshold: float
    is_anomalous: bool
    regions: list[Region]
    model: str
    elapsed_ms: float
    width: int
    height: int
    image_sha256: str
    artifacts: dict[str, str | None] = field(default_factory=dict)
    result: InspectionResult | None = field(default=None, repr=False)
    margin: float | None = None
    uncertain: bool = False

    @property
    def verdict(self) -> str:
        """``ANOMALOUS`` or ``NORMAL``."""
        return "ANOMALOUS" if self.is_anomalous else "NORMAL"

    def to_json(self) -> dict:
        """The JSON of ``cli.py inspect``, the app's ``/inspect`` and the anomaly-scoring tool."""
        out = {
            "product": self.product, "product_source": self.product_source,
            "product_confidence": _r(self.product_confidence, 3),
            "score": _r(self.score), "threshold": _r(self.threshold),
            "is_anomalous": bool(self.is_anomalous), "verdict": self.verdict,
            "margin": _r(self.margin, 3), "uncertain": bool(self.uncertain),
            "regions": [r.to_json() for r in self.regions], "model": self.model,
            "elapsed_ms": _r(self.elapsed_ms, 1), "image_sha256": self.image_sha256,
            "width": int(self.width), "height": int(self.height),
        }
        for key in ("anomaly_map", "mask", "heatmap", "overlay", "comparison"):
            out[key] = self.artifacts.get(key)
        return out


@dataclass
class SearchHit:
    """One gallery item returned by similar-defect search.

    Attributes:
        id: item id (16 hex digits of the content hash); product, defect_type: its labels.
        score: cosine similarity (fused: the weighted sum), comparable within one query.
        image: local path of the item's PNG; note, source, description: its metadata.
        matched: ``image`` | ``caption`` | ``fused``; image_score / text_score: the fused parts.
    """

    id: str
    product: str
    defect_type: str | None
    score: float
    image: str | None = None
    note: str = ""
    source: str | None = None
    matched: str = "image"
    image_score: float | None = None
    text_score: float | None = None
    description: str | None = None

    @classmethod
    def from_row(cls, row: dict) -> "SearchHit":
        """From an index row dict (:meth:`stores.image_index.ImageIndex` results)."""
        return cls(id=row["id"], product=row["product"], defect_type=row.get("defect_type"),
                   score=float(row.get("score", 0.0)), image=row.get("image"), note=row.get("note") or "",
                   source=row.get("source"), matched=row.get("matched", "image"),
                   image_score=row.get("image_score"), text_score=row.get("text_score"),
                   description=row.get("description"))

    def to_json(self) -> dict:
        """``{"id", "product", "defect_type", "score", "matched", "image", "note"}`` (+ fused parts)."""
        out = {"id": self.id, "product": self.product, "defect_type": self.defect_type, "score": _r(self.score),
               "matched": self.matched, "image": self.image, "note": self.note}
        if self.image_score is not None:
            out["image_score"] = _r(self.image_score)
            out["text_score"] = _r(self.text_score)
        return out


@dataclass
class SearchReport:
    """The search use case's answer (:func:`services.search.search_similar`).

    Attributes:
        mode: ``image`` | ``text`` | ``fused``; query: the text query or None.
        product: the product filter applied (given or inferred) or None; product_source: how it was chosen.
        defect_type: the defect-type filter or None; k: hits asked for.
        hits: best first; model: the index's pipeline name; elapsed_ms: wall time (ms).
        message: a note for the user (e.g. "the gallery is empty") or None.
        type_probabilities: the product's defect metric's probability per defect type for the
            query photo (``{type: p}``, summing to 1), or None (text queries, no fitted metric).
    """

    mode: str
    query: str | None
    product: str | None
    product_source: str | None
    defect_type: str | None
    k: int
    hits: list[SearchHit]
    model: str
    elapsed_ms: float
    message: str | None = None
    type_probabilities: dict[str, float] | None = None

    def to_json(self) -> dict:
        """The JSON of ``cli.py search``, the app's ``/search`` and the search tool."""
        out = {"mode": self.mode, "query": self.query, "product": self.product,
               "product_source": self.product_source, "defect_type": self.defect_type, "k": self.k,
               "results": [h.to_json() for h in self.hits], "model": self.model,
               "elapsed_ms": _r(self.elapsed_ms, 1)}
        if self.type_probabilities is not None:
            out["type_probabilities"] = {t: _r(p, 3) for t, p in
                                         sorted(self.type_probabilities.items(), key=lambda kv: -kv[1])}
        if self.message:
            out["message"] = self.message
        return out


@dataclass
class ManualPassage:
    """One retrieved chunk of a manual.

    Attributes:
        text: the chunk; source: PDF file name; page: 1-based page in the PDF;
        section: ``cause`` | ``action`` | ``prevention`` | ``general``;
        product, defect, lang: the chunk's metadata; score: relevance (higher is better);
        preview: path of a rendered PNG of the page, or None.
    """

    text: str
    source: str
    page: int
    section: str
    product: str | None = None
    defect: str | None = None
    lang: str = "en"
    score: float = 0.0
    preview: str | None = None

    @classmethod
    def from_row(cls, row: dict) -> "ManualPassage":
        """From a manual-store row dict."""
        return cls(text=row["text"], source=row["source"], page=int(row["page"]),
                   section=row.get("section") or "general", product=row.get("product") or None,
                   defect=row.get("defect") or None, lang=row.get("lang") or "en",
                   score=float(row.get("score", 0.0)), preview=row.get("preview"))

    def to_json(self) -> dict:
        """``{"text", "source", "page", "section", "product", "defect", "lang", "score", "preview"}``."""
        return {"text": self.text, "source": self.source, "page": self.page, "section": self.section,
                "product": self.product, "defect": self.defect, "lang": self.lang, "score": _r(self.score),
                "preview": self.preview}


@dataclass
class ManualReport:
    """The manual-query use case's answer (:func:`services.manuals.query_manual`)."""

    query: str
    passages: list[ManualPassage]
    model: str
    elapsed_ms: float
    #: the passage the agent's model wrote for the query and the store ranked by (HyDE), else None
    written_passage: str | None = None
    #: the model that wrote it, or why none was written ("" when HyDE was not asked for)
    passage_model: str = ""

    def to_json(self) -> dict:
        """The JSON of ``cli.py manual``, the app's ``/manual`` and the manual tool."""
        out = {"query": self.query, "results": [p.to_json() for p in self.passages], "model": self.model,
               "elapsed_ms": _r(self.elapsed_ms, 1)}
        if self.passage_model:
            out["hyde"] = {"passage": self.written_passage, "model": self.passage_model}
        return out


def jsonable(value: Any) -> Any:
    """``value`` with every typed result replaced by its ``to_json()`` (recursively)."""
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
