"""Tool policy, answer grammars, answer rendering and per-kind checks (real llama.cpp grammar compiler)."""

from __future__ import annotations

import numpy as np
import pytest
from llama_cpp import LlamaGrammar

from agent.answers import expand_labels, render_answer
from agent.checks import DEFECT_WORDS, check_answer, check_turn, required_tools, says_any
from agent.models import ChatGrammar, parse_call_list
from agent.policy import answer_form, answer_gbnf, classify, offered_tools
from tools import build_tools
from tools.context import RunContext

PASSAGES = [
    {"source": "brick_manual_en.pdf", "page": 4, "section": "cause", "defect": "crack", "product": "brick",
     "text": "Thermal shock in the kiln.", "lang": "en"},
    {"source": "brick_manual_en.pdf", "page": 4, "section": "action", "defect": "crack", "product": "brick",
     "text": "Hold the panel.", "lang": "en"},
    {"source": "brick_manual_en.pdf", "page": 4, "section": "prevention", "defect": "crack", "product": "brick",
     "text": "Check the cooling curve.", "lang": "en"},
]


def _ctx(photo: bool = True, question: str | None = None, **kw) -> RunContext:
    img = np.full((64, 64, 3), 120, np.uint8) if photo else None
    return RunContext(image=img, question=question, **kw)


def _analysed(question: str | None = None, lang_ui: str = "en") -> RunContext:
    ctx = _ctx(question=question, new_photo=True, ui_lang=lang_ui, product="brick", product_source="inferred",
               product_confidence=1.0)
    ctx.inspection = {"product": "brick", "score": 30.0, "threshold": 25.0, "is_anomalous": True, "width": 64,
                      "height": 64, "regions": [{"bbox": [1, 2, 30, 40], "area_frac": 0.1, "peak": 2.0}]}
    ctx.search = {"product": "brick", "defect_type": "crack", "votes": 4, "hits": [{}] * 5}
    ctx.defect_type = "crack"
    ctx.tool_calls += ["anomaly_scoring", "similar_defect_search", "manual_retrieval"]
    ctx.add_passages(PASSAGES)
    return ctx


@pytest.mark.parametrize("question,photo,new,history,kind", [
    ("", True, True, False, "manual"),
    ("Analyse this part.", True, True, False, "manual"),
    ("What should I do with this part?", True, True, False, "manual"),
    ("이 사진을 분석해 주세요.", True, True, False, "manual"),
    ("Is this part OK?", True, True, False, "verdict"),
    ("이 부품 괜찮나요?", True, True, False, "verdict"),
    ("Show me similar cases.", True, True, False, "similar"),
    ("비슷한 과거 사례를 보여 주세요.", True, True, False, "similar"),
    ("What causes cracks in brick panels?", False, False, False, "manual_question"),
    ("벽돌에 구멍이 생기면 즉시 어떤 조치를 해야 하나요?", False, False, False, "manual_question"),
    ("Which action should I take first?", True, False, True, "followup"),
    ("Why?", True, False, True, "followup"),
    ("What should I do about it?", True, False, True, "manual"),  # after "Is this part OK?": the manual
    ("그럼 어떻게 조치해야 하나요?", True, False, True, "manual"),
    ("What should I do first?", True, False, True, "followup"),
    ("What should I do about cracks?", False, False, True, "manual_question"),
    ("And for grass?", False, False, True, "manual_question"),
    ("What can you do?", False, False, False, "capabilities"),
    ("Who won the football world cup in 2010?", False, False, False, "offtopic"),
    ("오늘 점심 메뉴 좀 추천해 줘.", False, False, False, "offtopic"),
])
def test_classify_message_kinds(question, photo, new, history, kind):
    assert classify(question, has_photo=photo, new_photo=new, has_history=history) == kind


def test_register_needs_a_writing_session():
    q = "Register this photo as a crack."
    assert classify(q, has_photo=True, new_photo=False, has_history=True, writes=True) == "register"
    assert classify(q, has_photo=True, new_photo=False, has_history=True, writes=False) != "register"


def test_offered_tools_follow_the_conversation(built_state):
    from services.container import get_services

    services = get_services()
    text = _ctx(photo=False, question="What causes cracks?")
    names = [t.name for t in offered_tools(build_tools(text, services), text, 0)]
    assert names == ["manual_retrieval"]  # no photo: no image tools
    photo = _ctx(question="Is this OK?", new_photo=True)
    views = offered_tools(build_tools(photo, services), photo, 0)
    # a new photo is looked at first: its first step offers the tools that use it
    assert [t.name for t in views] == ["anomaly_scoring", "similar_defect_search"]
    assert "k" not in next(v for v in views if v.name == "similar_defect_search").inputs
    views = offered_tools(build_tools(photo, services), photo, 1)
    assert [t.name for t in views] == ["anomaly_scoring", "similar_defect_search", "manual_retrieval"]
    manual = next(v for v in views if v.name == "manual_retrieval")
    assert manual.inputs["defect_type"]["enum"][0] == "scratch" and "pattern" in manual.inputs["query"]
    later = _ctx(question="Is this OK?", new_photo=False)  # a follow-up on an earlier photo: no photo-first step
    assert "manual_retrieval" in [t.name for t in offered_tools(build_tools(later, services), later, 0)]
    photo.tool_calls.append("anomaly_scoring")  # a tool that ran on this photo is not offered again
    assert "anomaly_scoring" not in [t.name for t in offered_tools(build_tools(photo, services), photo, 1)]
    assert offered_tools(build_tools(photo, services), photo, 2) == []  # then the model answers
    # evidence first: only what the checks found missing, also after the last round, narrowed to the turn's finds
    photo.product, photo.defect_type = "brick", "crack"
    views = offered_tools(build_tools(photo, services), photo, 2, only=["manual_retrieval"])
    assert [t.name for t in views] == ["manual_retrieval"]
    assert views[0].inputs["product"]["enum"] == ["brick"] and views[0].inputs["defect_type"]["enum"] == ["crack"]
    fresh = _ctx(question="Analyse this part.", new_photo=True)
    fresh.tool_calls.append("manual_retrieval")
    views = offered_tools(build_tools(fresh, services), fresh, 1, only=["anomaly_scoring"])
    assert [t.name for t in views] == ["anomaly_scoring"]
    writer = _ctx(question="Please register this photo as a hole.", writes=True)
    assert "register_correction" in [t.name for t in offered_tools(build_tools(writer, services), writer, 0)]
    reader = _ctx(question="Please register this photo as a hole.", writes=False)
    assert "register_correction" not in [t.name for t in offered_tools(build_tools(reader, services), reader, 0)]


def test_a_part_scored_normal_gets_no_manual_unless_asked(built_state):
    from services.container import get_services

    services = get_services()

    def offered(question, uncertain=False, only=None, called=("anomaly_scoring", "similar_defect_search")):
        ctx = _ctx(question=question, new_photo=True, product="brick")
        ctx.inspection = {"product": "brick", "score": 20.0, "threshold": 25.0, "is_anomalous": False,
                          "uncertain": uncertain, "width": 64, "height": 64, "regions": []}
        ctx.tool_calls += list(called)
        return [t.name for t in offered_tools(build_tools(ctx, services), ctx, 1, only=only)]

    # a good part needs no response manual: after scoring, the model answers at once
    assert offered(None) == [] and offered("What is wrong with this part?") == []
    assert offered("이 부품에 무슨 문제가 있나요?") == []
    # unless the message asks about the manual, or the verdict is within the uncertain band
    for question in ("How do I prevent cracks?", "What does the manual say?", "얼룩의 원인은?"):
        assert offered(question) == ["manual_retrieval"], question
    assert offered("What is wrong with this part?", uncertain=True) == ["manual_retrieval"]
    assert offered(None, only=["manual_retrieval"]) == ["manual_retrieval"]  # the checks asked for it
    # nor are its nearest past defects searched (they are not its defects), unless similar cases are asked for
    assert offered("Is this part OK?", called=["anomaly_scoring"]) == []
    assert offered("Show me similar cases.", called=["anomaly_scoring"]) == ["similar_defect_search"]
    assert offered("Is this part OK?", uncertain=True, called=["anomaly_scoring"]) == [
        "similar_defect_search", "manual_retrieval"]
    later = _ctx(question="Tell me more.", new_photo=False, product="brick")  # a later turn: the model chooses
    later.inspection = {"is_anomalous": False, "score": 20.0, "threshold": 25.0}
    later.tool_calls += ["anomaly_scoring"]
    assert "manual_retrieval" in [t.name for t in offered_tools(build_tools(later, services), later, 1)]
    anomalous = _ctx(question="What is wrong with this part?", new_photo=True, product="brick")
    anomalous.inspection = {"is_anomalous": True, "score": 30.0, "threshold": 25.0}
    anomalous.tool_calls += ["anomaly_scoring", "similar_defect_search"]
    assert [t.name for t in offered_tools(build_tools(anomalous, services), anomalous, 1)] == ["manual_retrieval"]


def test_answer_grammars_compile_and_constrain():
    ctx = _analysed()
    assert answer_form(ctx) == "manual"
    manual = answer_gbnf(ctx, "manual")
    LlamaGrammar.from_string("root ::= answer\n" + manual, verbose=False)
    assert '"P1"' in manual.split("cause-item ::=")[1].split("\n")[0]  # causes cite the cause passage
    assert '"P2"' in manual.split("action-item ::=")[1].split("\n")[0]
    text = answer_gbnf(ctx, "text")
    LlamaGrammar.from_string("root ::= answer\n" + text, verbose=False)
    LlamaGrammar.from_string(ChatGrammar(tools=[], answer_gbnf=answer_gbnf(_ctx(photo=False), "text")).gbnf(),
                             verbose=False)
    normal = _analysed()
    normal.inspection["is_anomalous"] = False
    assert answer_form(normal) == "text"  # no defect manual for a normal part
    assert answer_form(normal, "manual") == "text"
    # a later turn about the photo scored before, which only retrieved the manual: cited items for a
    # question about it, the response manual when the message asks what to do about the part
    later = _analysed("What should I do about it?")
    later.new_photo, later.tool_calls = False, ["manual_retrieval"]
    assert answer_form(later) == "cited" and answer_form(later, "followup") == "cited"
    assert answer_form(later, "manual") == "manual"
    with pytest.raises(ValueError):
        ChatGrammar().gbnf()


def test_call_lists_parse_and_drop_duplicates():
    calls = parse_call_list('[{"name": "anomaly_scoring", "arguments": {}}, {"name": "anomaly_scoring", '
                            '"arguments": {}}, {"name": "manual_retrieval", "arguments": {"query": "crack"}}]')
    assert [c.function.name for c in calls] == ["anomaly_scoring", "manual_retrieval"]


def test_rendered_manual_passes_the_checks_in_english_and_korean():
    raw = ("## Likely causes\n- Uneven kiln cooling. [P1]\n## Immediate actions\n- Hold the panel. [P2]\n"
           "## Prevention\n- Check the cooling curve. [P3]\n")
    for lang in ("en", "ko"):
        ctx = _analysed(question="이 사진을 분석해 주세요." if lang == "ko" else None)
        answer = render_answer(raw, ctx, "manual")
        assert check_answer(answer, ctx) == [], answer
        assert "[brick_manual_en.pdf p.4]" in answer and "[P1]" not in answer
        assert answer.splitlines()[0] == ("## Defect summary (결함 요약)" if lang == "ko" else "## Defect summary")
        problems = check_turn(raw, answer, ctx, "manual", "manual")
        assert problems == ([] if lang == "en" else ["the user wrote in Korean: answer in Korean"])


def test_turn_checks_by_kind():
    ctx = _analysed()
    assert expand_labels("see [P2] and [P9]", ctx) == "see [brick_manual_en.pdf p.4] and [P9]"
    assert any("unknown passages P9" in p for p in check_turn("see [P9]", "see [P9]", ctx, "followup", "text"))
    fresh = _ctx(question="Is this OK?", new_photo=True)
    assert required_tools("verdict", fresh) == ["anomaly_scoring"]
    assert "needs anomaly_scoring" in check_turn("It is fine.", "It is fine.", fresh, "verdict", "text")[0]
    text = _ctx(photo=False, question="What causes cracks?")
    assert required_tools("manual_question", text) == ["manual_retrieval"]
    reply = "I can only help with parts, their defects and the manuals."
    assert check_turn(reply, reply, _ctx(photo=False), "offtopic", "text") == []
    assert check_turn("Hello there.", "Hello there.", _ctx(photo=False), "offtopic", "text") == [
        "say that you only help with parts, their defects and the manuals"]
    ko = _ctx(photo=False, question="안녕")
    said = "I score photos of parts for defects and answer from the manuals."
    assert check_turn(said, said, ko, "capabilities", "text") == ["the user wrote in Korean: answer in Korean"]
    assert check_turn("Hello.", "Hello.", ko, "capabilities", "text")[0].startswith("say what you do")


def test_a_verdict_the_code_wrote_needs_no_restating_only_no_contradiction():
    """A new photo's text answer starts with the code-written verdict: the model's words may add to it
    ("the part is clean") but not contradict it; without that head (an earlier photo) the words state it."""
    ctx = _ctx(question="이 부품에 무슨 문제가 있나요?", new_photo=True, product="gravel")
    ctx.inspection = {"product": "gravel", "score": 4.66, "threshold": 6.09, "is_anomalous": False, "regions": []}
    ctx.tool_calls.append("anomaly_scoring")
    clean = "그 부품은 깨끗합니다."
    assert check_turn(clean, render_answer(clean, ctx, "text"), ctx, "verdict", "text") == []
    wrong = "crack의 결함은 52%입니다."
    assert any("must not say otherwise" in p
               for p in check_turn(wrong, render_answer(wrong, ctx, "text"), ctx, "verdict", "text"))
    earlier = _ctx(question="Is it OK?", new_photo=False, product="gravel")
    earlier.inspection = dict(ctx.inspection)
    assert any(p.startswith("state the verdict") for p in check_turn("It looks clean.", "It looks clean.", earlier,
                                                                     "verdict", "text"))
    assert check_turn("It looks normal.", "It looks normal.", earlier, "verdict", "text") == []


def test_a_verdict_question_answered_with_the_manual_needs_no_restating():
    """"Is this part OK?" about an anomalous photo, answered with the response manual: its code-written Defect
    summary states ANOMALOUS, so the model's sections pass without a defect word of their own (seen: grass
    contamination passages name none; the check sent the answer back twice and the turn fell back); sections
    that say the part is fine still go back."""
    ctx = _analysed("Is this part OK?")
    raw = ("## Likely causes\n- Uneven kiln cooling. [P1]\n## Immediate actions\n- Hold the panel. [P2]\n"
           "## Prevention\n- Check the cooling curve. [P3]\n")
    answer = render_answer(raw, ctx, "manual")
    assert "ANOMALOUS" in answer.split("## Location")[0]
    assert not says_any(raw, DEFECT_WORDS)
    assert check_turn(raw, answer, ctx, "verdict", "manual") == []
    wrong = raw.replace("- Hold the panel. [P2]", "- The part looks normal: nothing to do. [P2]")
    assert any("must not say otherwise" in p
               for p in check_turn(wrong, render_answer(wrong, ctx, "manual"), ctx, "verdict", "manual"))


def test_a_photo_answer_that_names_only_another_product_goes_back():
    """The copy seen in a long CLI conversation: a gravel photo scored NORMAL, answered "Product: grass ... NORMAL"."""
    from agent.checks import other_products_named

    normal = _analysed()
    normal.product, normal.inspection["product"], normal.inspection["is_anomalous"] = "gravel", "gravel", False
    copied = "Product: **grass**. The part looks NORMAL: no defect was found."
    assert other_products_named(copied, normal) == ["grass"]
    problems = check_turn(copied, copied, normal, "verdict", "text")
    assert problems == ["this photo is gravel (anomaly scoring); the answer names grass instead: "
                        "describe this gravel part"]
    for fine in ("The gravel part looks NORMAL: no defect was found.",  # its own product
                 "The part looks NORMAL: score 4.97 is below the threshold 6.16.",  # no product at all
                 "This gravel part is NORMAL, unlike the grass sample you sent before."):  # its own and another
        assert other_products_named(fine, normal) == [], fine
        assert check_turn(fine, fine, normal, "verdict", "text") == [], fine
    assert other_products_named("NORMAL. See gravel_manual_en.pdf and grass-like notes.", normal) == []  # no word
    assert other_products_named("인조 잔디 매트는 정상입니다.", normal) == ["grass"]  # a Korean name
    assert other_products_named("자갈 골재 패널은 정상입니다. 인조 잔디 매트와 다릅니다.", normal) == []
    text_only = _ctx(photo=False, question="How do I repair grass?")  # no photo, no product: nothing to check
    assert check_turn("Grass is repaired by reseeding.", "Grass is repaired by reseeding.", text_only,
                      "followup", "text") == []


def test_a_photo_scored_normal_reports_no_defect_type():
    """The similar-defect vote of a normal part names no defect of it: ``reported_defect_type`` is None, and the
    turn's known facts do not carry it into the next turn."""
    from agent.agents import known_facts

    ctx = _analysed()
    assert ctx.reported_defect_type == "crack"
    ctx.inspection["is_anomalous"] = False
    assert ctx.defect_type == "crack" and ctx.reported_defect_type is None
    ctx.new_photo = False
    facts = known_facts(ctx)
    assert "NORMAL" in facts and "defect type" not in facts, facts


def test_an_answer_that_restates_the_opposite_verdict_goes_back():
    """Seen in a dev chat run: under the code-written ANOMALOUS verdict the 1.5B model copied the prompt's
    example, "The part looks normal: its anomaly score 10.67 is below the threshold 8.22. The defect found is a
    scratch". It names the defect too, so the word check let it through; the claim check does not."""
    from agent.checks import contradicting_claim

    ctx = _ctx(question="Is this part OK?", new_photo=True, product="brick")
    ctx.inspection = {"product": "brick", "score": 10.67, "threshold": 8.22, "is_anomalous": True, "regions": []}
    ctx.tool_calls.append("anomaly_scoring")
    copied = ("The part looks normal: its anomaly score 10.67 is below the threshold 8.22. "
              "The defect found is a scratch on the brick.")
    problems = check_turn(copied, render_answer(copied, ctx, "text"), ctx, "verdict", "text")
    assert any("says 'The part looks normal'" in p and "must not say otherwise" in p for p in problems), problems
    fine = "A scratch was found: the score is above the threshold. The rest of the surface looks normal."
    assert check_turn(fine, render_answer(fine, ctx, "text"), ctx, "verdict", "text") == []
    assert contradicting_claim("It is good practice to store panels on bearers.", True) is None
    assert contradicting_claim("부품은 정상입니다.", True) == "정상입니다"
    # and the other way round: a part scored NORMAL
    assert contradicting_claim("No defect was found; the score is below the threshold.", False) is None
    assert contradicting_claim("No similar defect found in the gallery.", False) is None
    assert contradicting_claim("Clean surface, but the defect found is a crack.", False) == "the defect found"
    assert contradicting_claim("Its score is above the threshold.", False) == "is above the threshold"
    # a follow-up turn (no new photo) about the scored part is held to the same verdict
    later = _ctx(question="What about it?", new_photo=False, product="brick")
    later.inspection = dict(ctx.inspection)
    assert any("must not say otherwise" in p for p in check_turn(copied, copied, later, "followup", "text"))
