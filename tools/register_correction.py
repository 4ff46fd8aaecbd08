"""Tool: register the conversation's photo in the similar-defect gallery with a label the user gave.

A write: the agent offers it only where the session may write (an operator's session, the CLI)
and only when the user asks for it (see :mod:`agent.policy`).
"""

from __future__ import annotations

from smolagents import Tool

from core.catalog import normalize_defect
from services.gallery import register_defect
from tools.anomaly_scoring import require_photo
from tools.context import RunContext


class RegisterCorrectionTool(Tool):
    """Adds the photo to the labelled gallery (:func:`services.gallery.register_defect`).

    Observation: the new (or existing, for the same pixels) gallery id and its labels; the row is
    appended to ``ctx.registered``.

    Raises:
        PermissionError: the session may not write. ValueError: no photo, unknown defect type.
    """

    name = "register_correction"
    description = ("Registers the photo in the similar-defect gallery with the defect type the user states "
                   "(only when the user asks to register or correct the label).")
    inputs = {
        "defect_type": {"type": "string", "description": "scratch, crack, hole, stain or contamination"},
        "product": {"type": "string", "description": "product id; omit to use the photo's", "nullable": True},
    }
    output_type = "string"

    def __init__(self, ctx: RunContext, services):
        super().__init__()
        self.ctx, self.services = ctx, services

    def forward(self, defect_type: str, product: str | None = None) -> str:
        ctx = self.ctx
        ctx.tool_calls.append(self.name)
        if not ctx.writes:
            raise PermissionError("registering needs an operator session")
        require_photo(ctx)
        defect = normalize_defect(defect_type)
        if defect is None:
            raise ValueError(f"unknown defect type {defect_type!r}")
        prod = (ctx.product if ctx.product_source == "user" else None) or product or ctx.product
        row = register_defect(self.services, ctx.image, prod, defect, note="correction from the chat")
        ctx.registered.append(row)
        state = "was already in the gallery" if row.get("duplicate") else "registered"
        return f"photo {state} as {row['product']} / {row['defect_type']} (gallery id {row['id']})"
