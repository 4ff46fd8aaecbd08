"""Rendered answers: a text answer about a photo sent with the message starts with the code-written verdict."""

import numpy as np
import pytest

from agent.answers import render_answer
from tools.context import RunContext


def _ctx(question: str, anomalous: bool, new_photo: bool = True, margin: float = -1.5) -> RunContext:
    ctx = RunContext(image=np.zeros((16, 16, 3), np.uint8), question=question, product="gravel",
                     product_source="inferred", product_confidence=1.0, new_photo=new_photo)
    ctx.inspection = {"product": "gravel", "score": 7.2 if anomalous else 4.66, "threshold": 6.09,
                      "is_anomalous": anomalous, "margin": margin, "uncertain": abs(margin) < 1.0, "regions": []}
    return ctx


def test_korean_normal_answer_starts_with_the_scored_verdict():
    """The 1.5B model answered a Korean photo turn with '답변: NORMAL (no defect)': the facts come from code."""
    out = render_answer("답변: NORMAL (no defect)", _ctx("이 부품에 무슨 문제가 있나요?", False), "text")
    first, rest = out.split("\n\n", 1)
    assert first == "판정: **정상 (NORMAL)**: 이상 점수 4.66가 임계값 6.09보다 낮습니다."
    assert rest == "답변: NORMAL (no defect)\n"


@pytest.mark.parametrize("final", [True, False])
def test_english_uncertain_anomalous_verdict_says_the_margin(final):
    ctx = _ctx("is this part ok?", True, margin=0.4)
    out = render_answer("The part has a defect.", ctx, "text", final=final)
    assert out.startswith("Verdict: **ANOMALOUS**: anomaly score 7.20 is above the threshold 6.09.")
    assert "uncertain" in out.split("\n\n")[0].lower()
    assert out.rstrip().endswith("The part has a defect.")


def test_no_verdict_head_without_a_photo_in_this_message():
    """A follow-up about an earlier photo, or a question without one, is answered as written."""
    assert render_answer("From the manuals: ...", _ctx("why?", False, new_photo=False), "text") == \
        "From the manuals: ...\n"
    ctx = RunContext(question="what causes cracks?")
    assert render_answer("Thermal shock.", ctx, "text") == "Thermal shock.\n"
