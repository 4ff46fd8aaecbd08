"""Rendering of the agent's answers: passage labels to citations, the code-written parts of a manual.

The model writes only what needs words: in a response manual the causes, immediate actions and
prevention (each item ending with a passage label such as ``[P2]``); in other answers free
text citing labels. The facts come from the tools' records and are written here:

* ``## Defect summary`` (product and how it was found, defect type with its votes, verdict with
  score and threshold) and ``## Location and extent`` (regions) before the model's sections;
* ``## Sources`` after them (every cited file and page);
* labels expanded to citations ``[brick_manual_en.pdf p.4]`` (the format the checks, the CLI
  and the history use).

Korean answers (``ctx.lang == "ko"``) get Korean fact lines and bilingual headings
(``## Likely causes (추정 원인)``); the English title stays first, so checks and exports find it.
"""

from __future__ import annotations

import re
from typing import Any

from agent.checks import find_citations, writes_verdict_head
from core import catalog
from tools.similar_defects import confidence_phrase

LABEL_RE = re.compile(r"\[(P\d+)\]")
SECTION_KO = {
    "Defect summary": "결함 요약",
    "Location and extent": "위치와 범위",
    "Likely causes": "추정 원인",
    "Immediate actions": "즉시 조치",
    "Prevention": "예방",
    "Sources": "출처",
}


def heading(title: str, lang: str = "en") -> str:
    """``## <title>``, with the Korean title in parentheses for Korean answers."""
    ko = SECTION_KO.get(title)
    return f"## {title} ({ko})" if lang == "ko" and ko else f"## {title}"


def expand_labels(text: str, ctx: Any) -> str:
    """Replace passage labels ``[P3]`` with citations ``[file p.N]`` (unknown labels stay as they are)."""
    def sub(m: re.Match) -> str:
        p = ctx.passage(m.group(1)) if hasattr(ctx, "passage") else None
        return f"[{p['source']} p.{int(p['page'])}]" if p else m.group(0)

    return LABEL_RE.sub(sub, text or "")


def to_labels(text: str, ctx: Any) -> str:
    """The inverse of :func:`expand_labels` for memory: citations ``[file p.N]`` become the label of the first
    passage of that page (the model reads labels); a leading ``> `` note line is dropped."""
    lines = (text or "").splitlines()
    if lines and lines[0].startswith("> "):
        lines = lines[1:]
    body = "\n".join(lines).strip()
    pages: dict[tuple[str, int], str] = {}
    for p in getattr(ctx, "passages", []) or []:
        pages.setdefault((p["source"], int(p["page"])), p["label"])
    cite = re.compile(r"\[(?P<source>[\w.\-]+\.pdf)\s*p\.(?P<page>\d+)\]")
    return cite.sub(lambda m: f"[{pages.get((m.group('source'), int(m.group('page'))), m.group(0)[1:-1])}]", body)


def _defect_name(defect: str | None, lang: str) -> str:
    if not defect:
        return "unknown" if lang != "ko" else "알 수 없음"
    try:
        info = catalog.defect_info(defect)
    except KeyError:
        return defect
    return f"{info['ko']} ({defect})" if lang == "ko" else defect


def summary_line(ctx: Any, lang: str = "en") -> str:
    """The Defect summary's line: product (and how it was found), defect type (votes), verdict (score vs threshold).

    A photo that scored NORMAL gets no defect type: the nearest past defects of a normal part name no defect of it
    (as :attr:`tools.context.RunContext.reported_defect_type`)."""
    insp = getattr(ctx, "inspection", None) or {}
    search = getattr(ctx, "search", None) or {}
    product = getattr(ctx, "product", None) or insp.get("product") or search.get("product") or "unknown"
    source = getattr(ctx, "product_source", None)
    conf = getattr(ctx, "product_confidence", None)
    defect = getattr(ctx, "defect_type", None) or search.get("defect_type")
    votes, k = search.get("votes"), len(search.get("hits") or [])
    ko = lang == "ko"
    if source == "inferred":
        share = f", {conf:.0%}" if conf is not None else ""
        prod_note = f" (가장 가까운 갤러리 이미지로 추정{share})" if ko else f" (inferred from the nearest gallery images{share})"
    elif source == "user":
        prod_note = " (사용자 지정)" if ko else " (given by the user)"
    else:
        prod_note = ""
    vote_note = ""
    if defect and votes and k:
        conf = confidence_phrase(search.get("type_confidence") if search.get("defect_type") == defect else None, lang)
        conf = f"; {conf}" if conf else ""
        vote_note = f" (유사 과거 결함 {k}건 중 {votes}건{conf})" if ko else f" ({votes} of {k} similar past defects{conf})"
    parts = [f"제품: **{product}**{prod_note}." if ko else f"Product: **{product}**{prod_note}."]
    if not (insp and insp.get("is_anomalous") is False):
        parts.append(f"결함 유형: **{_defect_name(defect, lang)}**{vote_note}." if ko
                     else f"Defect type: **{_defect_name(defect, lang)}**{vote_note}.")
    if insp:
        parts.append(verdict_sentence(insp, lang))
    else:
        parts.append("판정: 알 수 없음 (이상 점수 계산 실패)." if ko else "Verdict: unknown (anomaly scoring failed).")
    return " ".join(parts)


def uncertainty_note(insp: dict, lang: str = "en") -> str:
    """A sentence for a verdict inside the bank's uncertain band (``insp["uncertain"]``), else ``""``.

    ``insp["margin"]`` is ``(score - threshold) / normal spread`` (:meth:`models.patchcore.model.PatchCore.verdict`).
    """
    if not insp.get("uncertain"):
        return ""
    m = float(insp.get("margin") or 0.0)
    if lang == "ko":
        return (f"**불확실**: 점수가 임계값에서 정상 분산의 {abs(m):.1f}배 이내입니다. 초점, 노출, 배율이 조금만 "
                "바뀌어도 판정이 달라질 수 있으니 다시 촬영하거나 육안으로 확인하세요.")
    return (f"**Uncertain**: the score is within {abs(m):.1f} normal spreads of the threshold; a small change of "
            "focus, exposure or zoom could flip the verdict, so re-take the photo or check the part by eye.")


def location_lines(ctx: Any, lang: str = "en") -> list[str]:
    """The Location and extent items: up to three regions (bbox, share of the photo, peak)."""
    insp = getattr(ctx, "inspection", None) or {}
    regions = insp.get("regions") or []
    ko = lang == "ko"
    if not insp:
        return ["- 알 수 없음 (이상 점수 계산 실패)." if ko else "- Unknown (anomaly scoring failed)."]
    if not regions:
        return ["- 임계값을 넘는 영역이 없습니다." if ko else "- No region exceeds the anomaly threshold."]
    size = f"{insp.get('width')}x{insp.get('height')} px" if insp.get("width") else ""
    out = []
    for i, r in enumerate(regions[:3]):
        box, area, peak = list(r["bbox"]), 100 * float(r["area_frac"]), float(r["peak"])
        if ko:
            out.append(f"- 영역 {i + 1}: 경계 상자 {box} (x0, y0, x1, y1 px{', ' + size + ' 사진' if size else ''}), "
                       f"이미지의 {area:.1f}%, 최대 이상도 {peak:.2f}.")
        else:
            out.append(f"- Region {i + 1}: bounding box {box} (x0, y0, x1, y1 px{' in the ' + size + ' photo' if size else ''}), "
                       f"{area:.1f}% of the image, peak anomaly {peak:.2f}.")
    if sum(float(r["area_frac"]) for r in regions) > 0.5:
        out.append("- 사진 대부분이 정상 기준과 다릅니다: 제품, 배율, 조명을 확인하세요." if ko else
                   "- Most of the photo differs from the normal references: check the product, scale and lighting.")
    return out


def manual_head(ctx: Any, lang: str = "en") -> str:
    """The code-written start of a response manual: Defect summary and Location and extent."""
    return "\n".join([heading("Defect summary", lang), summary_line(ctx, lang), "",
                      heading("Location and extent", lang), *location_lines(ctx, lang), "", ""])


def localize_headings(text: str, lang: str) -> str:
    """Bilingual ``## `` headings for Korean answers (English ones unchanged)."""
    if lang != "ko":
        return text
    return re.sub(r"^## (Likely causes|Immediate actions|Prevention|Sources)\s*$",
                  lambda m: heading(m.group(1), "ko"), text, flags=re.MULTILINE)


def sources_section(cited: list[tuple[str, int]], lang: str = "en") -> str:
    """``## Sources`` listing each cited file and page once."""
    lines = [f"- {s} p.{p}" for s, p in cited] or (["- 없음"] if lang == "ko" else ["- none retrieved"])
    return "\n".join([heading("Sources", lang), *lines]) + "\n"


def verdict_head(ctx: Any, lang: str = "en") -> str:
    """The code-written verdict that starts a text answer about a photo sent with this message.

    A photo scored NORMAL (or a verdict question) gets a short answer rather than a response manual;
    its facts - verdict, anomaly score against the calibrated threshold, an uncertain margin - come from
    the inspection record, not from the model's wording. Empty when no photo came with this message
    or it was not scored.

    Returns:
        ``"<verdict sentence>[ <uncertainty note>]\n\n"`` or ``""``.
    """
    if not writes_verdict_head(ctx):
        return ""
    return verdict_sentence(ctx.inspection, lang) + "\n\n"


def verdict_sentence(insp: dict, lang: str = "en") -> str:
    """``Verdict: **NORMAL** / **ANOMALOUS**: anomaly score S is below / above the threshold T.`` (or Korean),
    followed by :func:`uncertainty_note` when the margin is inside the uncertain band."""
    score, thr = float(insp["score"]), float(insp["threshold"])
    ko = lang == "ko"
    if insp.get("is_anomalous"):
        line = (f"판정: **이상 (ANOMALOUS)**: 이상 점수 {score:.2f}가 임계값 {thr:.2f}보다 높습니다." if ko
                else f"Verdict: **ANOMALOUS**: anomaly score {score:.2f} is above the threshold {thr:.2f}.")
    else:
        line = (f"판정: **정상 (NORMAL)**: 이상 점수 {score:.2f}가 임계값 {thr:.2f}보다 낮습니다." if ko
                else f"Verdict: **NORMAL**: anomaly score {score:.2f} is below the threshold {thr:.2f}.")
    return f"{line} {uncertainty_note(insp, lang)}".strip()


def render_answer(raw: str, ctx: Any, form: str, final: bool = True) -> str:
    """The answer shown to the user from what the model wrote.

    Args:
        raw: the model's text (passage labels not expanded).
        ctx: the turn's :class:`tools.context.RunContext`.
        form: ``"manual"`` (facts + the model's sections + Sources) or ``"text"``.
        final: add the ``## Sources`` section (while streaming it is left out).
    """
    lang = getattr(ctx, "lang", "en")
    body = expand_labels(raw, ctx)
    if form != "manual":
        return verdict_head(ctx, lang) + body.strip() + ("\n" if final else "")
    text = manual_head(ctx, lang) + localize_headings(body.rstrip("\n"), lang)
    if final:
        text = text.rstrip("\n") + "\n\n" + sources_section(find_citations(body), lang)
    return text
