"""Tool: similar-defect search over the labelled gallery (image embeddings in FAISS)."""

from __future__ import annotations

from collections import defaultdict

from smolagents import Tool

from tools.anomaly_scoring import resolve_product
from tools.context import RunContext


def vote_defect_type(hits: list[dict]) -> tuple[str | None, int]:
    """Score-weighted vote over hits' defect types: ``(defect_type, count among hits)``."""
    weights: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for h in hits:
        if h.get("defect_type"):
            weights[h["defect_type"]] += max(float(h["score"]), 0.0) + 1e-6
            counts[h["defect_type"]] += 1
    if not weights:
        return None, 0
    best = max(weights, key=weights.get)
    return best, counts[best]


class SimilarDefectSearchTool(Tool):
    """Nearest labelled defect images of the run's photo (cosine similarity).

    Observation: inferred product, top matches (defect type, product, score) and the
    majority defect type, which is also stored as ``ctx.defect_type``.
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
        hits = self.services.image_index.search(ctx.image, k=k, product=prod, anomaly_map=amap)
        defect, count = vote_defect_type(hits)
        ctx.defect_type = defect
        ctx.search = {"product": prod, "hits": hits, "defect_type": defect, "votes": count, "k": k,
                      "model": getattr(self.services.image_index, "model", "")}
        if not hits:
            return f"product={prod}: the gallery has no labelled images for this product"
        top = "; ".join(f"{i + 1}) {h['defect_type']} ({h['product']}) score {h['score']:.2f}"
                        for i, h in enumerate(hits))
        src = f" ({ctx.product_source})" if ctx.product_source == "inferred" else ""
        return f"product={prod}{src}; top matches: {top}; majority defect type: {defect} ({count}/{len(hits)})"
