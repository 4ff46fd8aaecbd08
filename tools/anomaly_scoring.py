"""Tool: PatchCore anomaly scoring of the uploaded photo."""

from __future__ import annotations

from smolagents import Tool

from core.catalog import check_product
from services.inspect import inspect_image
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
        ctx = self.ctx
        ctx.tool_calls.append(self.name)
        prod = resolve_product(ctx, self.services, product)
        report = inspect_image(self.services, ctx.image, prod, out_dir=ctx.out_dir)
        report.product_source = ctx.product_source or "user"
        report.product_confidence = ctx.product_confidence
        ctx.anomaly_map = report.result.anomaly_map if report.result is not None else None
        ctx.inspection = report.to_json()
        regions = "; ".join(
            f"{i + 1}) bbox {list(r.bbox)} area {100 * r.area_frac:.1f}% peak {r.peak:.2f}"
            for i, r in enumerate(report.regions[:3])
        ) or "none"
        src = f" ({ctx.product_source})" if ctx.product_source == "inferred" else ""
        return (
            f"product={prod}{src} score={report.score:.3f} threshold={report.threshold:.3f} "
            f"verdict={report.verdict}; image {report.width}x{report.height} px; regions: {regions}"
        )
