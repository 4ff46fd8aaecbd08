"""Tool: PatchCore anomaly scoring of the uploaded photo."""

from __future__ import annotations

import time

from smolagents import Tool

from core.catalog import check_product
from tools.context import RunContext


def resolve_product(ctx: RunContext, services, requested: str | None) -> str:
    """The product to use: the user's, else the model's request, else inferred from the gallery.

    A product the user gave always wins over one the model asks for. Raises
    ``UnknownProductError`` for an unknown id.
    """
    requested = check_product(requested) if requested else None
    if ctx.product and ctx.product_source == "user":
        return ctx.product
    if requested:
        ctx.set_product(requested, "model")
        return requested
    if ctx.product:
        return ctx.product
    product, conf = services.infer_product(ctx.image)
    ctx.set_product(product, "inferred")
    ctx.product_confidence = conf
    return product


class AnomalyScoringTool(Tool):
    """PatchCore scoring (Roth et al. 2022, via anomalib) of the run's photo.

    Observation: one line with product, score, threshold, verdict and up to three
    regions (bbox in pixels, area %, peak). Artifacts (anomaly map .npy, mask,
    heat map, overlay, side-by-side comparison) are written to ``ctx.out_dir``
    and recorded in ``ctx.inspection``.
    """

    name = "anomaly_scoring"
    description = (
        "Scores the uploaded photo with PatchCore: anomaly score vs the product's calibrated threshold, "
        "verdict (ANOMALOUS/NORMAL) and the defect regions (bounding boxes, area). Call it first."
    )
    inputs = {
        "product": {"type": "string", "description": "product id (brick, gravel, grass, ...); omit to infer it",
                    "nullable": True},
    }
    output_type = "string"

    def __init__(self, ctx: RunContext, services):
        super().__init__()
        self.ctx, self.services = ctx, services

    def forward(self, product: str | None = None) -> str:
        from models.patchcore.model import save_artifacts

        t0 = time.perf_counter()
        ctx = self.ctx
        ctx.tool_calls.append(self.name)
        prod = resolve_product(ctx, self.services, product)
        result = self.services.patchcore.inspect(ctx.image, prod)
        paths = save_artifacts(result, ctx.image, ctx.out_dir)
        ctx.anomaly_map = result.anomaly_map
        verdict = "ANOMALOUS" if result.is_anomalous else "NORMAL"
        ctx.inspection = {
            "product": prod,
            "score": round(float(result.score), 4),
            "threshold": round(float(result.threshold), 4),
            "is_anomalous": bool(result.is_anomalous),
            "regions": result.regions,
            "model": result.model,
            "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1),
            "height": int(ctx.image.shape[0]),
            "width": int(ctx.image.shape[1]),
            **paths,
        }
        regions = "; ".join(
            f"{i + 1}) bbox {r['bbox']} area {100 * r['area_frac']:.1f}% peak {r['peak']:.2f}"
            for i, r in enumerate(result.regions[:3])
        ) or "none"
        src = f" ({ctx.product_source})" if ctx.product_source == "inferred" else ""
        return (
            f"product={prod}{src} score={result.score:.3f} threshold={result.threshold:.3f} verdict={verdict}; "
            f"image {ctx.image.shape[1]}x{ctx.image.shape[0]} px; regions: {regions}"
        )
