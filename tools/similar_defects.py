"""Tool: similar-defect search over the labelled gallery (:func:`services.search.search_similar`)."""

from __future__ import annotations

from smolagents import Tool

from services.search import search_similar, type_confidence, vote_defect_type
from tools.anomaly_scoring import clearly_normal, require_photo, resolve_product
from tools.context import RunContext


def confidence_phrase(conf: dict | None, lang: str = "en") -> str:
    """The defect metric's doubt about the type (:func:`services.search.type_confidence`), in words.

    "" when the metric is confident or absent: a confident call is not claimed as a probability,
    because across defect generators it is not one (on the unseen split confident calls were
    right 42 % of the time, uncertain ones 29 %; docs/tuning.md).
    """
    if not conf or conf.get("confident"):
        return ""
    p, other, q = float(conf["p"]), conf.get("runner_up"), conf.get("runner_up_p")
    alt = (f", 다음 후보 {other} {float(q):.0%}" if lang == "ko" else f", next {other} {float(q):.0%}") if other else ""
    return (f"유형 불확실: 유형 확률 {p:.0%}{alt}" if lang == "ko"
            else f"type uncertain: defect metric {p:.0%}{alt}")


#: appended to the observation when the photo scored NORMAL: the nearest past defects of a good part
#: name no defect of it (the 1.5B model wrote "crack 52 %" about a part it had just called normal)
NOT_A_FINDING = ("the part scored NORMAL: these are the nearest past defects, not a defect found on this part; "
                 "name no defect type for it")


def search_line(search: dict, scored_normal: bool = False) -> str:
    """One line about a search record: majority defect type, votes, how sure the metric is, top matches.

    Args:
        search: the search record (``ctx.search``: ``product``, ``hits``, ``defect_type``, ``votes``,
            ``type_confidence``).
        scored_normal: the photo searched was scored NORMAL (outside the uncertain band); the line then ends
            with :data:`NOT_A_FINDING` and states no "type uncertain" (there is no defect to type).
    """
    hits = search.get("hits") or []
    if not hits:
        return f"product={search.get('product')}: the gallery has no labelled images for this product"
    top = ", ".join(f"{h['defect_type']} {float(h['score']):.2f}" for h in hits[:5])
    conf = "" if scored_normal else confidence_phrase(search.get("type_confidence"))
    conf = f"; {conf}; say the type is uncertain" if conf else ""
    tail = f"; {NOT_A_FINDING}" if scored_normal else ""
    return (f"{search.get('product')}: majority defect type {search.get('defect_type')} "
            f"({search.get('votes')}/{len(hits)}){conf}; top matches: {top}{tail}")


def _scored_normal(ctx: RunContext, product: str) -> bool:
    """Whether this photo was scored for ``product`` and :func:`tools.anomaly_scoring.clearly_normal`."""
    return clearly_normal(ctx.inspection) and ctx.inspection.get("product") == product


class SimilarDefectSearchTool(Tool):
    """Nearest labelled defect images of the conversation's photo (cosine similarity).

    Observation: the majority defect type with its votes, how sure the product's defect metric
    is of it (:func:`services.search.type_confidence`: "type uncertain" below
    :data:`services.search.TYPE_CONFIDENT`) and the top matches (defect type, score); when this
    photo was scored NORMAL, that these are not a finding (:data:`NOT_A_FINDING`). The majority
    type is stored as ``ctx.defect_type`` and the search report's JSON (hits with their gallery
    images, for the UI) as ``ctx.search``. A photo already searched in this
    conversation is not searched again. ``k`` is the configured ``settings.search_k`` (a vote needs it).

    Raises:
        ValueError: no photo in the conversation.
    """

    name = "similar_defect_search"
    description = ("Finds the most similar past defects in the labelled gallery: their defect types "
                   "(scratch, crack, hole, stain, contamination), similarity scores and the majority type.")
    inputs = {
        "product": {"type": "string", "description": "restrict to this product id; omit to infer it",
                    "nullable": True},
        "k": {"type": "integer", "description": "number of matches (default 5)", "nullable": True},
    }
    output_type = "string"

    def __init__(self, ctx: RunContext, services):
        super().__init__()
        self.ctx, self.services = ctx, services

    def forward(self, product: str | None = None, k: int | None = None) -> str:
        ctx = self.ctx
        ctx.tool_calls.append(self.name)
        require_photo(ctx)
        k = int(k) if k else self.services.settings.search_k
        k = max(1, min(k, 20))
        prod = resolve_product(ctx, self.services, product)
        if ctx.search and ctx.search.get("product") == prod and len(ctx.search.get("hits") or []) >= k:
            return search_line(ctx.search, _scored_normal(ctx, prod))
        # reuse the anomaly map of this photo's scoring (same product) instead of recomputing it
        amap = ctx.anomaly_map if ctx.inspection and ctx.inspection.get("product") == prod else None
        report = search_similar(self.services, ctx.image, mode="image", product=prod, k=k, anomaly_map=amap)
        defect, count = vote_defect_type(report.hits)
        ctx.defect_type = defect
        hits = [h.to_json() for h in report.hits]
        ctx.search = {**report.to_json(), "hits": hits, "defect_type": defect, "votes": count,
                      "type_confidence": type_confidence(report.type_probabilities, defect)}
        return search_line(ctx.search, _scored_normal(ctx, prod))
