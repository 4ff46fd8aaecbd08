"""The similar-defect search use case: past defects by image, by text, or both.

One function for every edge: ``cli.py search``, the app's ``/search`` endpoint and Search
tab, and the agent's similar-defect tool call :func:`search_similar` and return
:meth:`core.types.SearchReport.to_json`.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

from core.catalog import parse_defect, parse_product
from core.errors import InputError
from core.imageio import load_rgb
from core.types import SearchHit, SearchReport
from services.container import Services
from services.inspect import resolve_product
from services.lock import MODEL_LOCK

MODES = ("auto", "image", "text", "fused")
MAX_K = 50
#: A defect type is called *confident* when the product's defect metric gives it at least this
#: probability. Chosen on the tuning split across generators (``bench/bench_type_limits.py
#: confidence``: metric fitted on the gallery + one training generator, scored on the other):
#: the lowest of 0.4 / 0.5 / 0.6 / 0.7 / 0.8 at which the confident calls were right >= 80 % of
#: the time in both directions (0.7: 85 % / 83 %, covering 44 % / 49 % of the defects; below
#: it 41 % / 43 % were right). See docs/tuning.md.
TYPE_CONFIDENT = 0.7


def search_similar(services: Services, image=None, text: str | None = None, *, mode: str = "auto",
                   product: str | None = None, defect_type: str | None = None, k: int = 5,
                   text_weight: float | None = None, anomaly_map: np.ndarray | None = None) -> SearchReport:
    """Nearest labelled gallery items of a photo and / or a text query.

    Args:
        services: the process's services.
        image: query photo (path, bytes, PIL image or array), or None.
        text: text query (e.g. "crack on brick"), or None / "".
        mode: ``auto`` (fused with both, else whichever is given), ``image``, ``text``, ``fused``.
        product: exact product filter; for image queries None infers it from the nearest items.
        defect_type: exact defect-type filter (id, English or Korean name), or None.
        k: number of hits, clamped to 1..50.
        text_weight: fused score weight of the caption cosine (0..1; default the setting).
        anomaly_map: the photo's PatchCore map (float32 ``(H, W)``) if the caller has it.

    Returns:
        :class:`core.types.SearchReport` (hits best first; an empty gallery gives no hits
        and a ``message``).

    Raises:
        InputError: neither image nor text, a mode without its input, bad mode or weight,
            unknown defect type. UnknownProductError: unknown product.
        core.imageio.InvalidImageError: an unreadable image.
    """
    t0 = time.perf_counter()
    mode = (mode or "auto").strip().lower()
    if mode not in MODES:
        raise InputError(f"unknown search mode {mode!r}; one of {', '.join(MODES)}")
    prod, defect = parse_product(product), parse_defect(defect_type)
    k = max(1, min(int(k or 5), MAX_K))
    text = (text or "").strip() or None
    rgb = load_rgb(image) if image is not None and not (isinstance(image, str) and not image) else None
    if rgb is None and text is None:
        raise InputError("give an image, a text query, or both")
    if mode == "auto":
        mode = "fused" if rgb is not None and text else "image" if rgb is not None else "text"
    if mode in ("image", "fused") and rgb is None:
        raise InputError(f"{mode} search needs an image")
    if mode in ("text", "fused") and text is None:
        raise InputError(f"{mode} search needs a text query")
    if text_weight is not None and not 0.0 <= float(text_weight) <= 1.0:
        raise InputError(f"the text weight must be within 0..1, got {text_weight}")
    index = services.image_index
    source = "user" if prod else None
    if len(index) == 0:
        return SearchReport(mode=mode, query=text, product=prod, product_source=source, defect_type=defect, k=k,
                            hits=[], model=index.model, elapsed_ms=(time.perf_counter() - t0) * 1000.0,
                            message="the gallery is empty")
    if rgb is not None and prod is None:
        prod, source, _conf = resolve_product(services, rgb, None)
    with MODEL_LOCK.shared():
        rows, probs = index.query_with_types(image=rgb, text=text if mode != "image" else None, mode=mode, k=k,
                                             product=prod, defect_type=defect, text_weight=text_weight,
                                             anomaly_map=anomaly_map)
    return SearchReport(mode=mode, query=text, product=prod, product_source=source, defect_type=defect, k=k,
                        hits=[SearchHit.from_row(r) for r in rows], model=index.model,
                        elapsed_ms=(time.perf_counter() - t0) * 1000.0, type_probabilities=probs)


def vote_defect_type(hits: list[SearchHit]) -> tuple[str | None, int]:
    """Score-weighted vote over hits' defect types: ``(defect_type, count among hits)``; (None, 0) if none."""
    weights: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for h in hits:
        if h.defect_type:
            weights[h.defect_type] += max(float(h.score), 0.0) + 1e-6
            counts[h.defect_type] += 1
    if not weights:
        return None, 0
    best = max(weights, key=weights.get)
    return best, counts[best]


def type_confidence(probabilities: dict[str, float] | None, defect_type: str | None) -> dict | None:
    """How sure the defect metric is of ``defect_type``: ``{"p", "confident", "runner_up", "runner_up_p"}``.

    ``p``: the metric's probability of ``defect_type`` (0..1); ``confident``: ``p >=``
    :data:`TYPE_CONFIDENT`; ``runner_up``: the most probable other type. None without
    probabilities or a type.
    """
    if not probabilities or not defect_type:
        return None
    p = float(probabilities.get(defect_type, 0.0))
    others = sorted(((v, t) for t, v in probabilities.items() if t != defect_type), reverse=True)
    out = {"p": round(p, 3), "confident": p >= TYPE_CONFIDENT, "runner_up": None, "runner_up_p": None}
    if others:
        out["runner_up"], out["runner_up_p"] = others[0][1], round(float(others[0][0]), 3)
    return out
