"""Checks of the agent's final answer (the response manual) against what this run retrieved.

The response manual is markdown with six fixed sections, in this order (:data:`SECTIONS`):
``## Defect summary``, ``## Location and extent``, ``## Likely causes``,
``## Immediate actions``, ``## Prevention``, ``## Sources``. Claims cite manual pages
as ``[brick_manual_en.pdf p.5]``; a citation is only valid when manual retrieval
returned that (file, page) in the same run (``ctx.manual_hits``), so the model cannot
cite pages it never saw.
"""

from __future__ import annotations

import re
from typing import Any

from core import catalog

SECTIONS = (
    "Defect summary",
    "Location and extent",
    "Likely causes",
    "Immediate actions",
    "Prevention",
    "Sources",
)
CITED_SECTIONS = ("Likely causes", "Immediate actions")

# "[brick_manual_en.pdf p.5]", "[brick_manual_en.pdf p.5 cause]", "brick_manual_en.pdf, page 5"
CITATION_RE = re.compile(r"(?P<source>[\w.\-]+\.pdf)\s*,?\s*(?:p\.|pp\.|page|p)\s*(?P<page>\d+)", re.IGNORECASE)
_HEADING_RE = re.compile(r"^\s{0,3}##\s+(?P<title>[^\n#]+?)\s*#*\s*$", re.MULTILINE)
_ITEM_RE = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+\S")


def find_citations(text: str) -> list[tuple[str, int]]:
    """(source, page) pairs cited in ``text``, in order of first appearance, without duplicates."""
    seen: dict[tuple[str, int], None] = {}
    for m in CITATION_RE.finditer(text or ""):
        seen.setdefault((m.group("source"), int(m.group("page"))), None)
    return list(seen)


def split_sections(answer: str) -> dict[str, str]:
    """Body text of each ``## `` section keyed by its title (first occurrence wins)."""
    out: dict[str, str] = {}
    heads = list(_HEADING_RE.finditer(answer or ""))
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(answer)
        out.setdefault(m.group("title").strip(), answer[m.end():end].strip())
    return out


def _canonical(title: str) -> str | None:
    t = title.strip().lower().rstrip(":")
    for s in SECTIONS:
        if t == s.lower():
            return s
    return None


def retrieved_pages(ctx: Any) -> set[tuple[str, int]]:
    """(source, page) pairs that manual retrieval returned in this run (``ctx.manual_hits``)."""
    if hasattr(ctx, "cited_pages"):
        return set(ctx.cited_pages())
    return {(h["source"], int(h["page"])) for h in getattr(ctx, "manual_hits", []) or []}


def _names(value: str | None, kind: str) -> list[str]:
    """Accepted spellings of a product / defect id (id, English and Korean names)."""
    if not value:
        return []
    names = {value, value.replace("_", " ")}
    try:
        info = catalog.defect_info(value) if kind == "defect" else catalog.product_info(value)
        names |= {str(info.get("en", "")), str(info.get("ko", ""))}
    except (KeyError, ImportError, OSError, ValueError):
        pass
    return [n for n in names if n]


def check_answer(answer: Any, ctx: Any) -> list[str]:
    """Problems of a response manual; an empty list means it passes.

    Args:
        answer: the final answer (markdown string; anything else is a problem).
        ctx: the run's ``tools.context.RunContext`` (uses ``manual_hits``, ``product``,
            ``defect_type``).

    Returns:
        Human-readable problems (also sent back to the model for its one retry):
        missing / out-of-order sections, citations of pages manual retrieval did not
        return in this run, causes or actions without citations, product or defect
        type not named.
    """
    if not isinstance(answer, str) or not answer.strip():
        return ["the answer is empty or not markdown text"]
    problems: list[str] = []
    sections = split_sections(answer)
    found = [c for c in (_canonical(t) for t in sections) if c]
    canon_body = {}
    for title, body in sections.items():
        c = _canonical(title)
        if c and c not in canon_body:
            canon_body[c] = body
    missing = [s for s in SECTIONS if s not in canon_body]
    if missing:
        problems.append("missing sections: " + ", ".join(f"'## {s}'" for s in missing))
    elif found != [s for s in SECTIONS if s in found] or len(found) != len(SECTIONS):
        problems.append("sections must appear once each, in this order: " + ", ".join(SECTIONS))

    allowed = retrieved_pages(ctx)
    cited = find_citations(answer)
    bad = [c for c in cited if c not in allowed]
    if bad:
        shown = ", ".join(f"[{s} p.{p}]" for s, p in bad[:5])
        ok = ", ".join(f"[{s} p.{p}]" for s, p in sorted(allowed)[:8]) or "none (call manual_retrieval)"
        problems.append(f"cites pages that manual_retrieval did not return in this run: {shown}; citable: {ok}")
    for sec in CITED_SECTIONS:
        body = canon_body.get(sec)
        if body is None:
            continue
        if not find_citations(body):
            problems.append(f"'## {sec}' has no citation like [file.pdf p.N]")
            continue
        uncited = [ln.strip() for ln in body.splitlines() if _ITEM_RE.match(ln) and not find_citations(ln)]
        if uncited:
            problems.append(f"'## {sec}': every item needs a citation [file.pdf p.N]; missing in: {uncited[0][:60]!r}")
    src_body = canon_body.get("Sources")
    if src_body is not None:
        listed = set(find_citations(src_body))
        body_cites = set(find_citations("\n".join(canon_body.get(s, "") for s in CITED_SECTIONS)))
        unlisted = sorted(body_cites - listed)
        if unlisted:
            problems.append("'## Sources' must list every cited file and page; missing: "
                            + ", ".join(f"{s} p.{p}" for s, p in unlisted[:5]))
    # named in the summary (citations like brick_manual_en.pdf must not count as naming the product)
    low = canon_body.get("Defect summary", answer).lower()
    product = getattr(ctx, "product", None)
    if product and not any(n.lower() in low for n in _names(product, "product")):
        problems.append(f"the Defect summary must name the product '{product}'")
    defect = getattr(ctx, "defect_type", None)
    if defect and not any(n.lower() in low for n in _names(defect, "defect")):
        problems.append(f"the Defect summary must name the defect type '{defect}'")
    return problems


def _re_literal(text: str) -> str:
    """``text`` as a regex literal that llama.cpp's JSON-schema→grammar converter accepts
    (metacharacters as one-char classes instead of backslash escapes)."""
    out = []
    for c in text:
        if c.isalnum() or c in " _-:,'":
            out.append(c)
        elif c in "[]":
            out.append("\\" + c)  # a class cannot hold a bracket for that converter
        else:
            out.append(f"[{c}]")
    return "".join(out)


def manual_pattern(ctx: Any, max_items: int = 3) -> str | None:
    """A regex (JSON-schema ``pattern``) that only admits manuals that pass :func:`check_answer`'s structure.

    Used to constrain the ``final_answer`` argument of grammar-capable backends: the six
    sections in order; the summary starts with the run's product and defect type; each
    item of causes / actions / prevention ends with a citation ``[file p.N]`` of a page
    manual retrieval returned in this run for that section (cause / action / prevention;
    any retrieved page when the section had none); Sources lists such pages. Free text never
    contains ``"``, ``\\`` or ``#`` (items also no brackets), so it cannot open a section
    or forge a citation.

    Returns:
        the pattern (anchored ``^...$``), or None when nothing is citable yet.
    """
    pages = sorted(retrieved_pages(ctx))
    if not pages:
        return None
    line = r'[^"\\#\n]+'
    text = r'[^"\\#\[\]\n]+'
    def alt(refs) -> str:
        return "(" + "|".join(_re_literal(f"{s} p.{p}") for s, p in refs) + ")"

    def item(section_key: str) -> str:
        # cite pages retrieved for this section (cause / action / prevention); any page if none
        refs = sorted({(h["source"], int(h["page"])) for h in getattr(ctx, "manual_hits", []) or []
                       if section_key in str(h.get("section", "")).lower()} & set(pages)) or pages
        return f"- {text} \\[{alt(refs)}\\]\\n"

    head = ""
    product, defect = getattr(ctx, "product", None), getattr(ctx, "defect_type", None)
    if product and defect:
        head = _re_literal(f"Product: {product}. Defect type: {defect}.")
    def sec(title: str) -> str:
        return _re_literal(f"## {title}") + "\\n"

    rep = "{1,%d}" % max_items
    return (
        "^" + sec(SECTIONS[0]) + head + line + "\\n"
        + sec(SECTIONS[1]) + f"({line}\\n){rep}"
        + sec(SECTIONS[2]) + f"({item('cause')}){rep}"
        + sec(SECTIONS[3]) + f"({item('action')}){rep}"
        + sec(SECTIONS[4]) + f"({item('prevent')}){rep}"
        + sec(SECTIONS[5]) + f"(- {alt(pages)}\\n){{1,{min(len(pages), 8)}}}$"
    )


def complete_sources(answer: str) -> str:
    """Add to ``## Sources`` every (file, page) cited elsewhere in the manual but not listed there.

    Deterministic bookkeeping on the model's own citations (the Sources list is fully
    determined by them); the rest of the answer is returned unchanged. Answers without
    a ``## Sources`` heading get one appended.
    """
    if not isinstance(answer, str) or not answer.strip():
        return answer
    heads = [m for m in _HEADING_RE.finditer(answer) if _canonical(m.group("title")) == "Sources"]
    if heads:
        start = heads[0].start()
        nxt = [m.start() for m in _HEADING_RE.finditer(answer) if m.start() > start]
        end = nxt[0] if nxt else len(answer)
        body, listed = answer[:start] + answer[end:], set(find_citations(answer[start:end]))
    else:
        body, listed = answer, set()
    missing = [c for c in find_citations(body) if c not in listed]
    if not missing:
        return answer
    extra = "\n".join(f"- {s} p.{p}" for s, p in missing)
    if heads:
        insert_at = end if end < len(answer) else len(answer)
        before = answer[:insert_at].rstrip("\n")
        return before + "\n" + extra + "\n" + answer[insert_at:].lstrip("\n") if insert_at < len(answer) \
            else before + "\n" + extra + "\n"
    return answer.rstrip("\n") + "\n\n## Sources\n" + extra + "\n"
