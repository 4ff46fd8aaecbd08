"""The deterministic fallback: an answer for every kind of message; claims from passage bullets only."""

import numpy as np
import pytest

from agent.checks import check_answer, find_citations
from agent.fallback import _items, write_answer
from tools.context import RunContext

PASSAGES = [
    {"source": "brick_manual_en.pdf", "page": 4, "section": s, "defect": "crack", "product": "brick", "lang": "en",
     "text": f"4. Crack (균열) — {title}\n• {claim}\n• Second {s} item of the page."}
    for s, title, claim in (("cause", "Cause", "Thermal shock in the kiln."),
                            ("action", "Immediate action", "Hold the panel."),
                            ("prevention", "Prevention", "Check the cooling curve."))
]


def _ctx(kind: str, lang_q: str | None = None, anomalous: bool = True) -> RunContext:
    ctx = RunContext(image=np.zeros((16, 16, 3), np.uint8), question=lang_q, product="brick",
                     product_source="inferred", product_confidence=0.8, new_photo=True)
    ctx.inspection = {"product": "brick", "score": 3.0 if anomalous else 1.0, "threshold": 2.0,
                      "is_anomalous": anomalous, "regions": [], "width": 16, "height": 16}
    ctx.search = {"product": "brick", "defect_type": "crack", "votes": 3,
                  "hits": [{"defect_type": "crack", "product": "brick", "score": 0.9}] * 5}
    ctx.defect_type = "crack"
    if kind in ("manual", "manual_question", "followup"):
        ctx.add_passages(PASSAGES)
    return ctx


@pytest.mark.parametrize("kind", ["manual", "verdict", "similar", "manual_question", "followup", "capabilities",
                                  "offtopic", "register"])
@pytest.mark.parametrize("lang", ["en", "ko"])
def test_every_kind_has_an_answer(kind, lang):
    ctx = _ctx(kind, "이건 뭐예요?" if lang == "ko" else "what is this?")
    answer = write_answer(ctx, kind, "unit test")
    assert answer.startswith("> ") and "unit test" in answer and len(answer) > 60
    assert set(find_citations(answer)) <= ctx.cited_pages()
    if kind == "manual":
        assert check_answer(answer, ctx) == []
    if kind in ("manual_question", "followup"):
        assert find_citations(answer)
    if lang == "ko":
        assert any("\uac00" <= ch <= "\ud7a3" for ch in answer)


def test_no_defect_manual_for_a_normal_part():
    ctx = _ctx("manual", anomalous=False)
    answer = write_answer(ctx, "manual", "unit test")
    assert "## Likely causes" not in answer and "NORMAL" in answer


def test_followup_first_action_cites_the_action_page():
    ctx = _ctx("followup", "Which action first?")
    assert "Hold the panel." in write_answer(ctx, "followup", "unit test")


def test_chunk_heading_is_not_a_claim():
    text = ("3. Scratch (스크래치) — Prevention\n•  Use timber bearers on every stacking frame.\n"
            " •   Clean the vacuum lifter pads at the start of every shift.")
    assert _items(text) == ["Use timber bearers on every stacking frame.",
                            "Clean the vacuum lifter pads at the start of every shift."]


def test_korean_heading_skipped_and_limit_applied():
    text = "4. 균열 (Crack) — 예방\n• 가마 냉각 곡선을 확인한다.\n• 패널을 양생대에 둔다.\n• 수량을 관리한다.\n• 서리를 막는다."
    items = _items(text, limit=3)
    assert items == ["가마 냉각 곡선을 확인한다.", "패널을 양생대에 둔다.", "수량을 관리한다."]


@pytest.mark.parametrize("lang", ["en", "ko"])
def test_an_uncertain_defect_type_is_said_in_the_summary(lang):
    """Below services.search.TYPE_CONFIDENT the answer names the type as uncertain, with the runner-up."""
    from agent.answers import summary_line
    from services.search import type_confidence

    ctx = _ctx("manual")
    probs = {"crack": 0.46, "scratch": 0.31, "hole": 0.11, "stain": 0.07, "contamination": 0.05}
    ctx.search["type_confidence"] = type_confidence(probs, "crack")
    assert ctx.search["type_confidence"] == {"p": 0.46, "confident": False, "runner_up": "scratch",
                                             "runner_up_p": 0.31}
    line = summary_line(ctx, lang)
    assert ("유형 불확실" in line and "scratch 31%" in line) if lang == "ko" else \
        ("type uncertain: defect metric 46%, next scratch 31%" in line)
    def defect_part() -> str:
        line = summary_line(ctx, lang).split("결함 유형" if lang == "ko" else "Defect type")[1]
        return line.split("판정" if lang == "ko" else "Verdict")[0]

    # a confident call is not claimed as a probability (it is not one across generators)
    ctx.search["type_confidence"] = type_confidence({**probs, "crack": 0.86, "scratch": 0.04}, "crack")
    assert ctx.search["type_confidence"]["confident"]
    assert "불확실" not in defect_part() and "uncertain" not in defect_part() and "%" not in defect_part()
    ctx.search.pop("type_confidence")  # no metric (e.g. a product without one): no claim either way
    assert "%" not in defect_part()


@pytest.mark.parametrize("lang", ["en", "ko"])
def test_a_part_scored_normal_gets_no_defect_type_in_the_summary(lang):
    """The nearest past defects of a normal part are not its defect: the code-written summary names none."""
    from agent.answers import summary_line

    ctx = _ctx("verdict")
    assert ("결함 유형" if lang == "ko" else "Defect type") in summary_line(ctx, lang)
    ctx.inspection["is_anomalous"] = False
    line = summary_line(ctx, lang)
    assert "결함 유형" not in line and "Defect type" not in line and "crack" not in line
    answer = write_answer(ctx, "verdict", "test")
    assert "NORMAL" in answer and "Defect type" not in answer


def test_korean_fallback_note_says_why_in_korean():
    """The note's reason starts in Korean; the English diagnostic follows as details."""
    answer = write_answer(_ctx("offtopic", "주식 추천해 줘"), "offtopic",
                          "the model's answer failed the checks after one retry: language")
    first = answer.splitlines()[0]
    assert "검사를 통과하지 못했습니다" in first and first.index("검사") < first.index("the model")
