"""Tool: PatchCore anomaly scoring of the conversation's photo."""

from __future__ import annotations

from smolagents import Tool

from core.catalog import check_product
from services.inspect import inspect_image
from tools.context import RunContext

#: a score within this fraction of the threshold is reported as borderline
BORDERLINE = 0.05
#: regions covering more than this share of the photo suggest a different product, scale or lighting
WHOLE_IMAGE = 0.5


def require_photo(ctx: RunContext) -> None:
    """Raise a clear error when the conversation has no photo (image tools cannot run)."""
    if ctx.image is None:
        raise ValueError("no photo in this conversation: ask the user to attach one")


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


def clearly_normal(insp: dict | None) -> bool:
    """Whether an inspection record (``ctx.inspection``) says NORMAL outside the uncertain band.

    False for no record, an ANOMALOUS verdict, or a NORMAL one within one normal spread of the
    threshold (``uncertain``: that part may still be defective).
    """
    return bool(insp) and not insp.get("is_anomalous") and not insp.get("uncertain")


def verdict_line(insp: dict) -> str:
    """One line about an inspection record: product, score vs threshold, verdict, regions, caveats."""
    score, thr = float(insp["score"]), float(insp["threshold"])
    verdict = "ANOMALOUS" if insp.get("is_anomalous") else "NORMAL"
    src = insp.get("product_source")
    conf = insp.get("product_confidence")
    prod = insp.get("product")
    if src == "inferred":
        prod += f" (inferred{f', {conf:.0%} of the nearest images' if conf is not None else ''})"
    regions = insp.get("regions") or []
    reg = "; ".join(f"bbox {list(r['bbox'])} {100 * float(r['area_frac']):.1f}%" for r in regions[:2]) or "none"
    notes = []
    margin = insp.get("margin")
    if insp.get("uncertain"):
        notes.append(f"uncertain: {float(margin):+.1f} normal spreads from the threshold, a small change of focus, "
                     "exposure or zoom could flip the verdict")
    elif margin is None and abs(score - thr) <= BORDERLINE * max(abs(thr), 1e-9):  # banks without a spread
        notes.append("borderline: within 5% of the threshold")
    if insp.get("is_anomalous") and not regions:
        notes.append("no region above the threshold")
    if sum(float(r["area_frac"]) for r in regions) > WHOLE_IMAGE:
        notes.append("most of the photo differs: check product, scale and lighting")
    note = f"; note: {', '.join(notes)}" if notes else ""
    meaning = "defect found" if insp.get("is_anomalous") else "no defect found"
    return f"{prod}: score {score:.2f} vs threshold {thr:.2f} -> {verdict} ({meaning}); regions: {reg}{note}"


class AnomalyScoringTool(Tool):
    """PatchCore scoring (Roth et al. 2022, via anomalib) of the conversation's photo.

    Observation: one line with product, score, threshold, verdict, up to two regions (bbox in
    pixels, area %) and caveats (an uncertain verdict: within the bank's band of the threshold in units
    of the normal spread; anomalous without region, most of the photo
    differing). Artifacts (anomaly map .npy, mask, heat map, overlay, side-by-side comparison)
    are written to ``ctx.out_dir`` and recorded in ``ctx.inspection``. A photo already scored in
    this conversation (same product) is not scored again: the earlier record is returned.

    Raises:
        ValueError: no photo in the conversation. UnknownProductError: unknown product.
    """

    name = "anomaly_scoring"
    description = ("Scores the photo with PatchCore: anomaly score vs the product's threshold, verdict "
                   "(ANOMALOUS/NORMAL) and defect regions.")
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
        require_photo(ctx)
        prod = resolve_product(ctx, self.services, product)
        if ctx.inspection and ctx.inspection.get("product") == prod:
            return verdict_line(ctx.inspection)
        report = inspect_image(self.services, ctx.image, prod, out_dir=ctx.out_dir)
        report.product_source = ctx.product_source or "user"
        report.product_confidence = ctx.product_confidence
        ctx.anomaly_map = report.result.anomaly_map if report.result is not None else None
        ctx.inspection = report.to_json()
        return verdict_line(ctx.inspection)
