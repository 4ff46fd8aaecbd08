"""Deterministic fallback: an answer for every kind of message, written without the language model.

Used when the model fails (invalid output, exception, timeout, max steps) or its answer still
fails :func:`agent.checks.check_turn` after one retry. :func:`run_missing_tools` calls the
tools the message kind needs and the model did not get to; :func:`write_answer` writes the
answer for the kind (:func:`agent.policy.classify`) from the tools' records:

* ``manual``: the response manual (:func:`write_manual`; the six sections, causes / actions /
  prevention taken from the retrieved passages, each item cited); a normal part gets the verdict;
* ``verdict``: the verdict with score and threshold; ``similar``: the similar past defects;
* ``manual_question``: items of the retrieved passages, cited; ``followup``: the passages of the
  conversation that fit the question (first action, causes, prevention), cited;
* ``capabilities`` / ``offtopic``: what the assistant does; ``register``: the registration.

Every fallback answer says at the top that it was written without the language model, and why.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

from agent.answers import expand_labels, heading, location_lines, manual_head, sources_section, summary_line
from agent.types import AgentStep
from core.reasons import localize_reason
from tools.manual_retrieval import asked_sections, named_defects
from tools.similar_defects import confidence_phrase

_SECTION_KEYS = {"Likely causes": "cause", "Immediate actions": "action", "Prevention": "prevent"}
_BULLET = re.compile(r"^\s*(?:[-*+\u2022\u00b7]|\d+[.)])\s*")
_SENTENCE = re.compile(r"(?<=[.!?。])\s+")
# chunk headings written by the manual store ("3. Scratch (스크래치) — Prevention") are not claims
_CHUNK_HEADING = re.compile(r"^\d+\.\s.*\s[—-]\s*(Cause|Immediate action|Prevention|General|원인|즉시 조치|예방)\s*$")

CAPABILITIES = {
    "en": ("I help with defects of parts on the line. Send a **photo** of a part and I score it with PatchCore "
           "(anomaly score, verdict, defect region), find **similar past defects** in the labelled gallery and "
           "write a **response manual** (likely causes, immediate actions, prevention) citing the manual pages. "
           "You can also ask about causes, actions or prevention without a photo, and ask follow-up questions."),
    "ko": ("생산 라인 부품의 결함을 도와드립니다. 부품 **사진**을 보내 주시면 PatchCore로 이상 점수와 판정, 결함 영역을 "
           "계산하고, 라벨이 있는 갤러리에서 **유사한 과거 결함**을 찾고, 매뉴얼 페이지를 인용한 **대응 매뉴얼**(추정 원인, "
           "즉시 조치, 예방)을 작성합니다. 사진 없이 원인, 조치, 예방에 대해 질문하거나 이어서 질문할 수도 있습니다."),
}
OFFTOPIC = {
    "en": ("I can only help with parts, their defects and the response manuals: send a photo of a part or ask "
           "about causes, actions or prevention of a defect."),
    "ko": "저는 부품과 결함, 대응 매뉴얼에 관한 질문만 도와드릴 수 있습니다. 부품 사진을 보내거나 결함의 원인, 조치, "
          "예방에 대해 물어봐 주세요.",
}


def _tool_done(name: str, ctx: Any) -> bool:
    if name == "anomaly_scoring":
        return getattr(ctx, "inspection", None) is not None
    if name == "similar_defect_search":
        return getattr(ctx, "search", None) is not None
    return False


def _hits_for(ctx: Any, key: str, hits: list[dict] | None = None) -> list[dict]:
    """Passages of one section kind, best first: matching defect and product preferred."""
    defect, product = getattr(ctx, "defect_type", None), getattr(ctx, "product", None)
    pool = (getattr(ctx, "manual_hits", []) or []) if hits is None else hits
    found = [h for h in pool if key in str(h.get("section", "")).lower()]

    def rank(h: dict) -> tuple:
        return (
            0 if defect and h.get("defect") == defect else 1,
            0 if product and h.get("product") == product else 1,
            0 if h.get("lang", "en") == getattr(ctx, "lang", "en") else 1,
            -float(h.get("score", 0.0) or 0.0),
        )

    return sorted(found, key=rank)


def run_missing_tools(ctx: Any, tools: list, kind: str = "manual") -> Iterator[AgentStep]:
    """Call the tools a message of ``kind`` needs and the model did not call successfully.

    Args:
        ctx: the turn's ``RunContext`` (tools record their results in it).
        tools: the turn's smolagents tools (looked up by name; missing ones are skipped).
        kind: the message kind (:data:`agent.policy.KINDS`).

    Yields:
        :class:`agent.types.AgentStep` (``error`` set when a tool raised; the fallback goes on).
    """
    by_name = {t.name: t for t in tools}

    def call(name: str, **arguments):
        tool = by_name.get(name)
        if tool is None:
            return None
        args = {k: v for k, v in arguments.items() if v is not None}
        t0 = time.perf_counter()
        try:
            obs, err = str(tool(**args)), None
        except Exception as exc:  # a failing tool must not stop the fallback
            obs, err = "", f"{type(exc).__name__}: {exc}"
        return AgentStep(tool=name, arguments=args, observation=obs, duration_s=time.perf_counter() - t0, error=err)

    has_photo = getattr(ctx, "image", None) is not None
    user_product = ctx.product if getattr(ctx, "product_source", None) == "user" else None
    wanted = {"manual": ("anomaly_scoring", "similar_defect_search"), "verdict": ("anomaly_scoring",),
              "similar": ("similar_defect_search",)}.get(kind, ())
    if has_photo:
        for name in wanted:
            if not _tool_done(name, ctx):
                step = call(name, product=user_product)
                if step is not None:
                    yield step
    if kind == "register" and has_photo and not getattr(ctx, "registered", None):
        named = named_defects(getattr(ctx, "question", None))
        if named:
            step = call("register_correction", defect_type=named[0])
            if step is not None:
                yield step
    called = list(getattr(ctx, "tool_calls", []) or [])
    if kind == "manual":
        if not (getattr(ctx, "inspection", None) or {}).get("is_anomalous") and has_photo:
            return  # a normal part gets the verdict, not a defect manual
        label = getattr(ctx, "defect_type", None) or "defect"
        if any(not _hits_for(ctx, key) for key in _SECTION_KEYS.values()):
            step = call("manual_retrieval", query=f"{label} cause immediate action prevention")
            if step is not None:
                yield step
    elif kind == "manual_question" and "manual_retrieval" not in called:
        step = call("manual_retrieval", query=(getattr(ctx, "question", None) or "defect cause action")[:80])
        if step is not None:
            yield step


def _items(text: str, limit: int = 3) -> list[str]:
    """Short claims from a manual passage: its bullet lines, else its sentences."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip() and not _CHUNK_HEADING.match(ln.strip())]
    bullets = [_BULLET.sub("", ln) for ln in lines if _BULLET.match(ln)]
    if not bullets:
        flat = " ".join(lines)
        bullets = [s.strip() for s in _SENTENCE.split(flat) if s.strip()]
        # drop a leading heading-like fragment ("Crack - causes") without punctuation
        bullets = [b for b in bullets if len(b.split()) >= 4 or b.endswith((".", "다."))] or bullets
    out = []
    for b in bullets:
        b = b.rstrip()
        if len(b) > 240:
            b = b[:240].rsplit(" ", 1)[0] + " ..."
        if b and b not in out:
            out.append(b)
    return out[:limit]


def _note(reason: str, lang: str) -> str:
    if lang == "ko":
        return f"> 결정론적 대체 경로가 작성한 답변입니다 (언어 모델 없이): {localize_reason(reason, lang, 300)}"
    return f"> Written by the deterministic fallback (no language model): {reason}"


def write_manual(ctx: Any, reason: str) -> str:
    """The response manual (markdown, the six sections of :data:`agent.checks.SECTIONS`) from ``ctx``.

    Args:
        ctx: the turn's ``RunContext`` after the tools ran.
        reason: why the fallback was used (shown at the top of the manual).

    Returns:
        Markdown; every cause / action / prevention item cites ``[file p.N]`` of a passage that
        manual retrieval returned in this conversation.
    """
    lang = getattr(ctx, "lang", "en")
    lines = [_note(reason, lang), "", manual_head(ctx, lang).rstrip("\n"), ""]
    cited: list[tuple[str, int]] = []
    defect, product = getattr(ctx, "defect_type", None), getattr(ctx, "product", None)
    for title, key in _SECTION_KEYS.items():
        lines.append(heading(title, lang))
        items = []
        for h in _hits_for(ctx, key)[:2]:
            ref = (h["source"], int(h["page"]))
            for claim in _items(h.get("text", "")):
                items.append(f"- {claim} [{ref[0]} p.{ref[1]}]")
            if ref not in cited:
                cited.append(ref)
        none = (f"- 이 섹션의 매뉴얼 구절을 찾지 못했습니다 ({defect or '결함'}, {product})." if lang == "ko" else
                f"- No manual passage for this section was retrieved for {defect or 'this defect'} on {product}.")
        lines.extend(items[:4] or [none])
        lines.append("")
    lines.append(sources_section(cited, lang).rstrip("\n"))
    return "\n".join(lines).rstrip() + "\n"


def _verdict(ctx: Any, lang: str) -> str:
    insp = getattr(ctx, "inspection", None)
    if getattr(ctx, "image", None) is None:
        return ("사진이 없습니다: 부품 사진을 첨부해 주세요." if lang == "ko" else
                "There is no photo in this conversation: attach a photo of the part.")
    if not insp:
        return "이상 점수를 계산하지 못했습니다." if lang == "ko" else "The photo could not be scored."
    head = summary_line(ctx, lang)
    regions = "\n".join(location_lines(ctx, lang)) if insp.get("is_anomalous") else ""
    return f"{head}\n{regions}".strip()


def _similar(ctx: Any, lang: str) -> str:
    search = getattr(ctx, "search", None) or {}
    hits = search.get("hits") or []
    if not hits:
        return ("유사한 과거 결함을 찾지 못했습니다." if lang == "ko" else "No similar past defects were found.")
    top = "\n".join(f"- {h['defect_type']} ({h['product']}), similarity {float(h['score']):.2f}" for h in hits[:5])
    conf = confidence_phrase(search.get("type_confidence"), lang)
    conf = f"; {conf}" if conf else ""
    if lang == "ko":
        return f"유사한 과거 결함 ({search.get('product')}): 다수 유형 **{search.get('defect_type')}** " \
               f"({search.get('votes')}/{len(hits)}{conf}).\n{top}"
    return f"Similar past defects ({search.get('product')}): majority type **{search.get('defect_type')}** " \
           f"({search.get('votes')}/{len(hits)}{conf}).\n{top}"


def _cited_items(ctx: Any, hits: list[dict], sections: list[str], limit: int = 3) -> list[str]:
    out = []
    for sec in sections:
        key = "prevent" if sec.startswith("prevent") else sec
        for h in _hits_for(ctx, key, hits)[:1]:
            for claim in _items(h.get("text", ""), limit=2):
                out.append(f"- {claim} [{h['source']} p.{int(h['page'])}]")
    if not out:
        for h in hits[:2]:
            for claim in _items(h.get("text", ""), limit=2):
                out.append(f"- {claim} [{h['source']} p.{int(h['page'])}]")
    return out[:limit]


def _manual_question(ctx: Any, lang: str) -> str:
    hits = list(getattr(ctx, "manual_hits", []) or []) or list(getattr(ctx, "passages", []) or [])
    items = _cited_items(ctx, hits, asked_sections(getattr(ctx, "question", None)))
    if not items:
        return ("매뉴얼에서 관련 구절을 찾지 못했습니다." if lang == "ko" else
                "The manuals have no passage about this.")
    return ("매뉴얼에 따르면:\n" if lang == "ko" else "From the manuals:\n") + "\n".join(items)


def _followup(ctx: Any, lang: str) -> str:
    q = (getattr(ctx, "question", None) or "").lower()
    hits = list(getattr(ctx, "passages", []) or [])
    if any(w in q for w in ("first", "먼저", "우선")):
        sections = ["action"]
    elif any(w in q for w in ("why", "왜", "이유", "cause", "원인")):
        sections = ["cause"]
    else:
        sections = asked_sections(q)
    items = _cited_items(ctx, hits, sections, limit=2)
    if items:
        return ("이전 답변의 매뉴얼 구절에 따르면:\n" if lang == "ko" else "From the manual passages of this conversation:\n") \
            + "\n".join(items)
    if getattr(ctx, "inspection", None):
        return _verdict(ctx, lang)
    return CAPABILITIES[lang if lang in CAPABILITIES else "en"]


def write_answer(ctx: Any, kind: str, reason: str) -> str:
    """The fallback's answer for a message of ``kind`` (see the module docstring), in ``ctx.lang``.

    Returns:
        Markdown starting with a note that the fallback wrote it; citations ``[file p.N]`` only of
        passages retrieved in this conversation.
    """
    lang = getattr(ctx, "lang", "en")
    lang = lang if lang in ("en", "ko") else "en"
    if kind == "manual":
        if getattr(ctx, "image", None) is not None and (getattr(ctx, "inspection", None) or {}).get("is_anomalous"):
            return write_manual(ctx, reason)
        body = _verdict(ctx, lang)
    elif kind == "verdict":
        body = _verdict(ctx, lang)
    elif kind == "similar":
        body = _similar(ctx, lang)
    elif kind == "manual_question":
        body = _manual_question(ctx, lang)
    elif kind == "followup":
        body = _followup(ctx, lang)
    elif kind == "register":
        rows = getattr(ctx, "registered", None) or []
        body = (f"Registered: {rows[-1]['product']} / {rows[-1]['defect_type']} (gallery id {rows[-1]['id']})."
                if rows else ("등록하지 못했습니다: 결함 유형을 알려 주세요." if lang == "ko" else
                              "Nothing was registered: name the correct defect type."))
    elif kind == "capabilities":
        body = CAPABILITIES[lang]
    else:
        body = OFFTOPIC[lang]
    return f"{_note(reason, lang)}\n\n{expand_labels(body, ctx).strip()}\n"
