"""Checks of the agent's final answer (the response manual) against what this run retrieved.

The response manual is markdown with six fixed sections, in this order (:data:`SECTIONS`):
``## Defect summary``, ``## Location and extent``, ``## Likely causes``,
``## Immediate actions``, ``## Prevention``, ``## Sources`` (a Korean answer may add the Korean
title in parentheses). Claims cite manual pages as ``[brick_manual_en.pdf p.5]``; a citation is
only valid when manual retrieval returned that (file, page) in this conversation
(``ctx.cited_pages()``), so the model cannot cite pages it never saw.

:func:`check_turn` checks any answer of a chat turn by its kind: citations always, the six
sections only for a response manual, and the evidence the message kind needs (a verdict needs
the anomaly score, a manual question the manual, ...).
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
    t = re.sub(r"\s*\([^)]*\)\s*$", "", title.strip()).lower().rstrip(":")
    for s in SECTIONS:
        if t == s.lower():
            return s
    return None


def retrieved_pages(ctx: Any) -> set[tuple[str, int]]:
    """(source, page) pairs an answer may cite: retrieved in this conversation (``ctx.cited_pages()``)."""
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
    repeated = repeated_items("\n".join(canon_body.get(s, "") for s in ("Likely causes", "Immediate actions",
                                                                        "Prevention")))
    if repeated:
        problems.append(f"an item is repeated; write each cause, action or prevention once: {repeated[0][:60]!r}")
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


def repeated_items(text: str) -> list[str]:
    """Items (list lines) of ``text`` whose words appear again in a later item, in order of their repeat.

    Two items are the same when they are equal after removing citations and labels, case,
    punctuation and spacing (a small model tends to repeat an item with another citation).
    """
    seen: set[str] = set()
    out: list[str] = []
    for line in text.splitlines():
        if not _ITEM_RE.match(line):
            continue
        bare = CITATION_RE.sub(" ", re.sub(r"\[[^\]]*\]", " ", line))  # without [labels] and citations
        key = " ".join(re.findall(r"\w+", re.sub(r"^\s*(?:[-*+]|\d+[.)])", " ", bare).lower()))
        if key and key in seen:
            out.append(line.strip())
        seen.add(key)
    return out


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


_HANGUL = re.compile(r"[\uac00-\ud7a3]")
_LABEL = re.compile(r"\[(P\d+)\]")
#: words a verdict uses for a normal part / a defective one (English and Korean)
NORMAL_WORDS = ("normal", " ok", "okay", "no defect", "fine", "good", "정상", "문제가 없", "문제 없", "이상이 없",
                "이상 없", "결함이 없", "결함 없")
DEFECT_WORDS = ("anomal", "defect", "not ok", "reject", "scratch", "crack", "hole", "stain", "contamination",
                "이상", "불량", "결함", "스크래치", "균열", "구멍", "얼룩", "이물질")
#: a reply about what the assistant does names these; an off-topic reply says what it helps with
CAPABILITY_WORDS = ("photo", "manual", "similar", "image", "defect", "사진", "매뉴얼", "유사", "이미지", "결함")
DOMAIN_WORDS = ("part", "defect", "manual", "부품", "결함", "매뉴얼")


def other_products_named(text: str, ctx: Any) -> list[str]:
    """Catalog products that ``text`` names when it does not name the turn's own product.

    A photo turn's product comes from its tools (or the user); an answer that names only another product
    copied it from elsewhere (an earlier turn, the prompt's examples). Names are the ids and the English and
    Korean names (:func:`core.catalog.product_info`); Latin names match as whole words, case-insensitive,
    so a citation such as ``gravel_manual_en.pdf`` names nothing.

    Args:
        text: the model's answer.
        ctx: the turn's context (uses ``product``).

    Returns:
        Product ids, sorted; empty when the turn has no product or the text names it.
    """
    own = getattr(ctx, "product", None)
    if not own or not text:
        return []

    def named(pid: str) -> bool:  # Korean particles attach to the word: Hangul names match as substrings
        return any(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])" if n.isascii() else re.escape(n), text,
                             re.IGNORECASE) for n in _names(pid, "product") if len(n) > 1)

    if named(own):
        return []
    try:
        known = catalog.products()
    except (OSError, ValueError):
        return []
    return sorted(p for p in known if p != own and named(p))


_SUBJECT = r"\b(?:the part|this part|the product|this one|the brick|the gravel|the grass)"
#: claims that contradict a verdict: (ANOMALOUS scored, NORMAL scored) -> patterns of the opposite claim
_CONTRADICTIONS = {
    True: (_SUBJECT + r"\s+(?:looks|is|seems|appears)\s+(?:to be\s+)?(?:normal|ok|okay|fine|good|defect-free)\b",
           r"\bis below the threshold\b", r"\bno defects? (?:was |were |is )?(?:found|detected)\b",
           r"\bnot (?:anomalous|defective)\b", r"정상입니다", r"임계값보다 낮", r"결함이 (?:발견되지 않|없습니다)"),
    False: (_SUBJECT + r"\s+(?:looks|is|seems|appears)\s+(?:to be\s+)?(?:anomalous|defective|damaged)\b",
            r"\bis above the threshold\b", r"\b(?:a|the) defect (?:was |is )?(?:found|detected)\b",
            r"임계값보다 높", r"불량입니다", r"결함이 발견되었"),
}


def contradicting_claim(text: str, anomalous: bool) -> str | None:
    """The first phrase of ``text`` that claims the opposite of the scored verdict, or ``None``.

    A small model copies the prompt's example sentence ("The part looks normal: its anomaly score ... is below
    the threshold ...") under an ANOMALOUS verdict while also naming the defect, which a word-presence check
    lets through. These patterns are claims about the part or the score (English and Korean), not single words,
    so "the rest of the surface looks normal" passes.

    Args:
        text: the model's answer.
        anomalous: the verdict anomaly scoring gave this photo.
    """
    for pat in _CONTRADICTIONS[bool(anomalous)]:
        m = re.search(pat, text or "", re.IGNORECASE)
        if m:
            return m.group(0)
    return None


def writes_verdict_head(ctx: Any) -> bool:
    """Whether a text answer of this turn starts with the code-written verdict
    (:func:`agent.answers.verdict_head`): a photo sent with this message was scored."""
    insp = getattr(ctx, "inspection", None) or {}
    return bool(getattr(ctx, "new_photo", False)) and "score" in insp and "threshold" in insp


def says_any(text: str, words) -> bool:
    """The text contains one of ``words`` (case-insensitive; a leading space in a word marks a word start)."""
    low = f" {(text or '').lower()}"
    return any(w in low for w in words)


def required_tools(kind: str, ctx: Any) -> list[str]:
    """Tools whose results an answer to this kind of message needs and that this conversation lacks.

    ``manual``: the photo scored, and for an anomalous photo its defect type searched and its manual
    retrieved in this turn; ``verdict``: scored; ``similar``: searched; ``manual_question``:
    manual retrieval in this turn; ``register``: the registration. Others need nothing.
    Each entry starts with the tool's name (the agent offers the next step only those tools).
    """
    called = set(getattr(ctx, "tool_calls", []) or [])
    insp = getattr(ctx, "inspection", None)
    need = []
    if kind in ("manual", "verdict") and getattr(ctx, "image", None) is not None and not insp:
        need.append("anomaly_scoring")
    if kind == "manual" and (insp or {}).get("is_anomalous"):
        defect = getattr(ctx, "defect_type", None)
        if not getattr(ctx, "search", None):
            need.append("similar_defect_search")
        if "manual_retrieval" not in called or (defect and not any(
                h.get("defect") == defect for h in getattr(ctx, "manual_hits", []) or [])):
            need.append(f"manual_retrieval for the defect type {defect}" if defect else "manual_retrieval")
    if kind == "similar" and getattr(ctx, "image", None) is not None and not getattr(ctx, "search", None):
        need.append("similar_defect_search")
    if kind == "manual_question" and "manual_retrieval" not in called:
        need.append("manual_retrieval")
    if kind == "register" and not getattr(ctx, "registered", None):
        need.append("register_correction")
    return need


def check_turn(raw: Any, answer: str, ctx: Any, kind: str, form: str) -> list[str]:
    """Problems of one chat answer; an empty list means it passes (sent back to the model for one retry).

    Args:
        raw: what the model wrote (labels ``[P<n>]``).
        answer: the rendered answer (:func:`agent.answers.render_answer`: citations expanded,
            a manual with its code-written sections).
        ctx: the turn's :class:`tools.context.RunContext`.
        kind: the message kind (:data:`agent.policy.KINDS`).
        form: ``"manual"`` or ``"text"``.

    Checks: non-empty; labels and citations only of passages retrieved in this conversation;
    a response manual passes :func:`check_answer`; the evidence :func:`required_tools` names;
    a manual question answered with at least one citation; a verdict states the scored verdict
    (:data:`NORMAL_WORDS` / :data:`DEFECT_WORDS`) and no answer about a scored photo claims the opposite
    (:func:`contradicting_claim`); similar cases are named by their defect types; a
    photo turn's answer does not name another product instead of the turn's own
    (:func:`other_products_named`); a capabilities reply says what the assistant does, an off-topic
    reply what it helps with; a Korean message answered in Korean.
    """
    if not isinstance(raw, str) or not raw.strip():
        return ["the answer is empty"]
    problems: list[str] = []
    known = {p.get("label") for p in getattr(ctx, "passages", []) or []}
    unknown = sorted({lab for lab in _LABEL.findall(raw) if lab not in known})
    if unknown:
        ok = ", ".join(f"[{lab}]" for lab in sorted(known)) or "none (call manual_retrieval)"
        problems.append(f"cites unknown passages {', '.join(unknown)}; citable: {ok}")
    allowed = retrieved_pages(ctx)
    bad = [c for c in find_citations(answer) if c not in allowed]
    if bad and not unknown:
        problems.append("cites pages not retrieved in this conversation: "
                        + ", ".join(f"[{s} p.{p}]" for s, p in bad[:5]))
    if form == "manual":
        problems += check_answer(answer, ctx)
    missing = required_tools(kind, ctx)
    insp = getattr(ctx, "inspection", None) or {}
    contradicted = False
    if missing:
        problems.append("the user's message needs " + ", ".join(missing) + ": call it before answering")
    elif kind == "manual_question" and getattr(ctx, "manual_hits", None) and not find_citations(answer):
        problems.append("cite the manual passages you used with their labels, e.g. [P1]")
    # a verdict states it; a photo sent for analysis that scored NORMAL gets a short verdict, never a manual
    # (when the code wrote it at the head of the answer - a new photo's text answer, or the response manual's
    # Defect summary - the model's words need only not contradict it: a manual's items copied from passages
    # that name no defect word, e.g. grass contamination, state no verdict of their own)
    if insp and not missing and (kind == "verdict" or (kind == "manual" and not insp.get("is_anomalous"))):
        anomalous = bool(insp.get("is_anomalous"))
        verdict_words, other_words = (DEFECT_WORDS, NORMAL_WORDS) if anomalous else (NORMAL_WORDS, DEFECT_WORDS)
        verdict = "ANOMALOUS (a defect was found)" if anomalous else "NORMAL (no defect)"
        if form == "manual" or (form == "text" and writes_verdict_head(ctx)):
            if says_any(raw, other_words) and not says_any(raw, verdict_words):
                problems.append(f"the part scored {verdict}: the answer must not say otherwise")
                contradicted = True
        elif not says_any(raw, verdict_words):
            problems.append("state the verdict: the part is " + verdict)
    if insp and "is_anomalous" in insp and not contradicted:
        claim = contradicting_claim(raw, bool(insp.get("is_anomalous")))
        if claim:
            verdict = "ANOMALOUS (a defect was found)" if insp.get("is_anomalous") else "NORMAL (no defect)"
            problems.append(f"the part scored {verdict}, score {float(insp.get('score', 0)):.2f} against the "
                            f"threshold {float(insp.get('threshold', 0)):.2f}; the answer says '{claim}': "
                            "the answer must not say otherwise")
    others = other_products_named(raw, ctx) if insp and kind in ("verdict", "manual", "similar") else []
    if others:
        problems.append(f"this photo is {ctx.product} (anomaly scoring); the answer names "
                        + ", ".join(others) + f" instead: describe this {ctx.product} part")
    search = getattr(ctx, "search", None) or {}
    type_names = [n for d in {h.get("defect_type") for h in search.get("hits") or []} for n in _names(d, "defect")]
    if kind == "similar" and type_names and not says_any(raw, type_names):
        problems.append(f"name the defect types of the similar past defects (majority: {search.get('defect_type')})")
    if kind == "capabilities" and not says_any(raw, CAPABILITY_WORDS):
        problems.append("say what you do: score photos of parts for defects, find similar past defects, answer "
                        "from the manuals")
    if kind == "offtopic" and not says_any(raw, DOMAIN_WORDS):
        problems.append("say that you only help with parts, their defects and the manuals")
    if getattr(ctx, "lang", "en") == "ko" and not _HANGUL.search(raw):
        problems.append("the user wrote in Korean: answer in Korean")
    return problems
