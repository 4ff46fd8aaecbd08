"""Tool: similar-defect search over the labelled gallery (:func:`services.search.search_similar`)."""

from __future__ import annotations

from smolagents import Tool

from services.search import search_similar, vote_defect_type
from tools.anomaly_scoring import resolve_product
from tools.context import RunContext


class SimilarDefectSearchTool(Tool):
    """Nearest labelled defect images of the run's photo (cosine similarity).

    Observation: inferred product, top matches (defect type, product, score) and the
    majority defect type, which is also stored as ``ctx.defect_type``; the search report's
    JSON is ``ctx.search``.
    """

    name = "similar_defect_search"
    description = (
        "Finds the most similar past defect images in the labelled gallery and returns their defect types "
        "(scratch, crack, hole, stain, contamination) with similarity scores and the majority defect type."
    )
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
        k = int(k) if k else self.services.settings.search_k
        k = max(1, min(k, 20))
        prod = resolve_product(ctx, self.services, product)
        # reuse the anomaly map of this run's scoring (same product) instead of recomputing it
        amap = ctx.anomaly_map if ctx.inspection and ctx.inspection.get("product") == prod else None
        report = search_similar(self.services, ctx.image, mode="image", product=prod, k=k, anomaly_map=amap)
        defect, count = vote_defect_type(report.hits)
        ctx.defect_type = defect
        hits = [h.to_json() for h in report.hits]
        ctx.search = {**report.to_json(), "hits": hits, "defect_type": defect, "votes": count}
        if not hits:
            return f"product={prod}: the gallery has no labelled images for this product"
        top = "; ".join(f"{i + 1}) {h.defect_type} ({h.product}) score {h.score:.2f}"
                        for i, h in enumerate(report.hits))
        src = f" ({ctx.product_source})" if ctx.product_source == "inferred" else ""
        return f"product={prod}{src}; top matches: {top}; majority defect type: {defect} ({count}/{len(hits)})"
