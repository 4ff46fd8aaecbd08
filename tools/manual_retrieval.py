"""Tool: retrieval of response-manual passages (Chroma over PDF manuals)."""

from __future__ import annotations

import re

from smolagents import Tool

from core import catalog
from core.catalog import check_product, normalize_defect
from services.manuals import query_manual
from tools.context import RunContext

SECTIONS = ("cause", "action", "prevention")
#: words of a query that ask for one section (English and Korean)
SECTION_WORDS = {
    "cause": ("cause", "causes", "why", "reason", "origin", "원인", "왜", "이유"),
    "action": ("action", "actions", "immediate", "handle", "repair", "fix", "what should", "what to do",
               "do now", "조치", "처리", "대응", "해야"),
    "prevention": ("prevent", "prevention", "avoid", "stop it", "recurr", "예방", "방지", "재발"),
}
# chunk headings written by the manual store ("3. Scratch (스크래치) — Prevention") carry no claim
_HEADING = re.compile(r"^\s*\d+\.\s.*[—-]\s*(Cause|Causes|Immediate action|Prevention|General|원인|즉시 조치|예방)\s*$",
                      re.IGNORECASE)
#: short names people use for the sample products (besides the catalog's id, English and Korean names)
PRODUCT_ALIASES = {"brick": ("bricks", "벽돌"), "gravel": ("자갈",), "grass": ("turf", "잔디")}
_BULLET = re.compile(r"^\s*(?:[-*+\u2022\u00b7]|\d+[.)])\s*")


_HEADING_SECTION = {"cause": ("cause", "원인"), "action": ("immediate action", "즉시 조치"),
                    "prevention": ("prevention", "예방")}


def headed_as(text: str, section: str) -> bool:
    """The passage starts with a manual heading naming ``section`` (e.g. ``4. Crack (균열) — Cause``)."""
    first = next((ln.strip() for ln in (text or "").splitlines() if ln.strip()), "")
    m = _HEADING.match(first)
    return bool(m) and m.group(1).lower() in _HEADING_SECTION.get(section, ())


def asked_sections(text: str | None) -> list[str]:
    """The manual sections a question or query asks for (all three when none or several are named)."""
    low = (text or "").lower()
    found = [s for s, words in SECTION_WORDS.items() if any(w in low for w in words)]
    return found if len(found) == 1 else list(SECTIONS)


def named_products(text: str | None) -> list[str]:
    """Catalog products named in a text (id, English or Korean name), in catalog order."""
    low = (text or "").lower()
    out = []
    for p in catalog.products():
        info = catalog.product_info(p)
        names = {p, str(info.get("en", "")).lower(), str(info.get("ko", "")), *PRODUCT_ALIASES.get(p, ())} - {""}
        if any(re.search(rf"(?<![a-z]){re.escape(n)}", low) if n.isascii() else n in low for n in names):
            out.append(p)
    return out


def named_defects(text: str | None) -> list[str]:
    """Taxonomy defect types named in a text (id, English or Korean name, plurals), in taxonomy order."""
    low = (text or "").lower()
    out = []
    for d in catalog.taxonomy()["defect_types"]:
        names = {d["id"], d["en"].lower(), d["ko"]}
        if any((re.search(rf"(?<![a-z]){re.escape(n)}", low) if n.isascii() else n in low) for n in names):
            out.append(d["id"])
    return out


def passage_claims(text: str, max_chars: int = 170, limit: int = 3) -> list[str]:
    """A passage's claims: its bullet lines (else the whole text), headings dropped, each cut at ``max_chars``."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip() and not _HEADING.match(ln.strip())]
    bullets = [_BULLET.sub("", ln) for ln in lines if _BULLET.match(ln)]
    claims = bullets or [" ".join(_BULLET.sub("", ln) for ln in lines)]
    out = []
    for c in claims:
        c = " ".join(c.replace("[", "(").replace("]", ")").split())
        if len(c) > max_chars:
            c = c[:max_chars].rsplit(" ", 1)[0] + " ..."
        if c:
            out.append(c)
    return out[:limit]


def passage_text(text: str, max_chars: int = 240) -> str:
    """A passage as one short line: headings dropped, bullets joined with ``; ``, cut at ``max_chars``."""
    return "; ".join(passage_claims(text, max_chars, limit=20))[: max_chars + 4]


def passage_line(p: dict, max_chars: int = 170) -> str:
    """What the model reads of a passage: a header line, then one line per claim in the answer's own format::

        [P1] brick_manual_en.pdf p.4, brick crack cause:
        - Thermal shock or uneven cooling in the kiln. [P1]

    (two claims per passage at most: the answer's items are short).
    """
    what = " ".join(x for x in (p.get("product"), p.get("defect"), p.get("section")) if x)
    head = f"[{p['label']}] {p['source']} p.{p['page']}, {what}:"
    claims = passage_claims(p.get("text", ""), max_chars, limit=2)
    return "\n".join([head, *(f"- {c} [{p['label']}]" for c in claims)])


class ManualRetrievalTool(Tool):
    """Manual passages for a query, filtered by product and defect type.

    Product and defect type (:meth:`resolve`): those the user named, else the conversation's photo
    (its product and the defect type similar-defect search found), else the model's arguments or
    its query, else the topic of the previous manual retrieval (so "and for grass?" keeps the
    defect type). The
    sections come from the query (cause / action / prevention words, English or Korean): one asked
    section gives its two best passages, otherwise the best passage of each section; without a
    defect type, the best passages overall. The user's language is preferred. Every passage is
    labelled ``P<n>`` for the conversation and recorded in ``ctx.passages``: answers cite only those.

    Raises:
        ValueError: empty query. UnknownProductError: unknown product.
    """

    name = "manual_retrieval"
    description = ("Searches the product manuals (PDF) for causes, immediate actions or prevention of a "
                   "defect and returns labelled passages [P1], [P2] with file and page.")
    inputs = {
        "query": {"type": "string", "description": "what to look for, e.g. 'crack cause and immediate action'"},
        "product": {"type": "string", "description": "product id; omit to use the photo's or the one asked about",
                    "nullable": True},
        "defect_type": {"type": "string",
                        "description": "scratch, crack, hole, stain or contamination; omit to use the found one",
                        "nullable": True},
    }
    output_type = "string"

    def __init__(self, ctx: RunContext, services, max_chars: int = 170):
        super().__init__()
        self.ctx, self.services, self.max_chars = ctx, services, max_chars

    def resolve(self, query: str, product: str | None, defect_type: str | None) -> tuple[str | None, str | None]:
        """The ``(product, defect type)`` filters of a call (see the class docstring).

        Order: what the user said (the product they chose, names in their message) wins, then the
        photo's (a call list may be written before the search found the defect type), then the
        model's arguments, then names in the model's query, then the previous retrieval's topic.
        """
        ctx = self.ctx
        photo = ctx.has_photo
        if ctx.product_source == "user" and ctx.product:
            prod = ctx.product
        else:
            said = named_products(ctx.question)
            prod = (said[0] if said else None) or (ctx.product if photo else None) or (
                check_product(product) if product else None)
            if prod is None:
                in_query = named_products(query)
                prod = in_query[0] if in_query else ctx.topic.get("product")
        said = named_defects(ctx.question)
        defect = (said[0] if said else None) or (ctx.defect_type if photo else None) or normalize_defect(defect_type)
        if defect is None:
            in_query = named_defects(query)
            defect = in_query[0] if in_query else ctx.topic.get("defect_type")
        return prod, defect

    def forward(self, query: str, product: str | None = None, defect_type: str | None = None) -> str:
        ctx = self.ctx
        ctx.tool_calls.append(self.name)
        if not query or not query.strip():
            raise ValueError("query must be a non-empty string")
        prod, defect = self.resolve(query, product, defect_type)
        ctx.topic = {"product": prod, "defect_type": defect}

        def passages(**kw) -> list[dict]:
            rep = query_manual(self.services, query, product=prod, defect_type=defect, lang=ctx.lang, **kw)
            return self._prefer_lang([p.to_json() for p in rep.passages])

        hits: list[dict] = []
        if defect:
            sections = asked_sections(f"{query} {ctx.question or ''}")
            per = 2 if len(sections) == 1 else 1
            for section in sections:
                got = [h for h in passages(section=section, k=4) if h.get("defect") in (defect, None)]
                # a chunk headed by its section ("4. Crack (균열) — Cause") before one that only carries the label
                got.sort(key=lambda h: not headed_as(h.get("text", ""), section))
                hits += got[:per]
        if not hits:
            hits = passages(k=self.services.settings.manual_k)[:3]
        labelled = ctx.add_passages(hits)
        if not labelled:
            return f"no manual passages found for product={prod} defect={defect}"
        return "\n".join(passage_line(p, self.max_chars) for p in labelled)

    def _prefer_lang(self, hits: list[dict]) -> list[dict]:
        same = [h for h in hits if h.get("lang", "en") == self.ctx.lang]
        return same if same else hits
