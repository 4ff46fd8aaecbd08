"""Tool: retrieval of response-manual passages (Chroma over PDF manuals)."""

from __future__ import annotations

from smolagents import Tool

from core.catalog import check_product, normalize_defect
from services.manuals import query_manual
from tools.context import RunContext

SECTIONS = ("cause", "action", "prevention")


class ManualRetrievalTool(Tool):
    """Manual passages for a query, filtered by product and defect type.

    When the defect type is known the tool returns the best chunk of each section
    (cause, immediate action, prevention) plus the best general matches, preferring
    the run's language. Every passage returned is recorded in ``ctx.manual_hits``:
    only those pages may be cited in the response manual.
    """

    name = "manual_retrieval"
    description = (
        "Searches the product manuals (PDF) and returns passages with file name, page and section "
        "(cause / action / prevention). Cite passages as [file p.N]."
    )
    inputs = {
        "query": {"type": "string", "description": "what to look for, e.g. 'crack cause and immediate action'"},
        "product": {"type": "string", "description": "product id; omit to use the analysed product",
                    "nullable": True},
        "defect_type": {"type": "string",
                        "description": "scratch, crack, hole, stain or contamination; omit to use the found one",
                        "nullable": True},
    }
    output_type = "string"

    def __init__(self, ctx: RunContext, services, max_chars: int = 320):
        super().__init__()
        self.ctx, self.services, self.max_chars = ctx, services, max_chars

    def forward(self, query: str, product: str | None = None, defect_type: str | None = None) -> str:
        ctx = self.ctx
        ctx.tool_calls.append(self.name)
        if not query or not query.strip():
            raise ValueError("query must be a non-empty string")
        if ctx.product_source == "user" or not product:
            product = ctx.product
        else:
            product = check_product(product)
        # an unknown or omitted defect name falls back to the type the search found
        defect = normalize_defect(defect_type) or ctx.defect_type
        k = self.services.settings.manual_k

        def passages(**kw) -> list[dict]:
            rep = query_manual(self.services, query, product=product, defect_type=defect, **kw)
            return [p.to_json() for p in rep.passages]

        hits: list[dict] = []
        if defect:
            for section in SECTIONS:
                hits += self._prefer_lang(passages(section=section, k=4))[:1]
        hits += self._prefer_lang(passages(k=k * 2))
        seen, unique = set(), []
        for h in hits:
            key = (h["source"], h["page"], h.get("section"), h["text"][:80])
            if key not in seen:
                seen.add(key)
                unique.append(h)
        unique = unique[: max(k, 3 if defect else k)]
        ctx.manual_hits.extend(unique)
        if not unique:
            return f"no manual passages found for product={product} defect={defect}"
        lines = []
        for h in unique:
            text = " ".join(h["text"].split())
            if len(text) > self.max_chars:
                text = text[: self.max_chars].rsplit(" ", 1)[0] + " ..."
            lines.append(f"[{h['source']} p.{h['page']} {h.get('section', 'general')}] {text}")
        return "\n".join(lines)

    def _prefer_lang(self, hits: list[dict]) -> list[dict]:
        same = [h for h in hits if h.get("lang", "en") == self.ctx.lang]
        return same if same else hits
