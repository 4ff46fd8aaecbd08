"""Conversation memory on a real built state: photo kept across turns, facts reused, history bounded,
undo; a two-turn conversation through the real tools with the SmolLM2 fixture model."""

from __future__ import annotations

import dataclasses
import json

import pytest

from agent.agents import DefectAgent
from agent.ask import ask, open_conversation, start_turn
from agent.memory import Conversation, estimate_tokens
from agent.models import LlamaCppModel, smollm2_gguf_path
from agent.types import AgentResult, AgentStep
from core.errors import InputError
from core.settings import get_settings
from tools import build_tools


@pytest.fixture(scope="module")
def smol():
    return LlamaCppModel(smollm2_gguf_path(), n_ctx=4096, n_threads=2, max_tokens=160)


@pytest.fixture()
def services(writable_state):
    from services.container import Services

    return Services(get_settings())


def _val(state, product: str, label: str) -> str:
    manifest = json.loads((state / "data" / "manifest.json").read_text())
    item = next(it for it in manifest["items"] if it["split"] == "val" and it["product"] == product
                and (it["defect_type"] == label if label != "good" else it["label"] == "good"))
    return str(state / "data" / item["image"])


def _result(answer: str = "ok", messages=None) -> AgentResult:
    return AgentResult(steps=[AgentStep("anomaly_scoring", {}, "brick: score 1", 0.1)], answer=answer, citations=[],
                       model="test", elapsed_s=0.5, fallback=False, fallback_reason=None, product="brick",
                       defect_type=None, kind="verdict", form="text", raw_answer=answer,
                       messages=messages if messages is not None else [{"role": "assistant", "content": answer}])


def test_photo_and_facts_are_kept_until_a_new_photo(services, writable_state):
    conv = open_conversation(services, None, "tester", new=True)
    with pytest.raises(InputError, match="photo of the part or a question"):
        start_turn(conv, None, "  ")
    first = _val(writable_state, "brick", "crack")
    ctx = start_turn(conv, first, "Is this part OK?")
    assert ctx.new_photo and ctx.has_photo and ctx.inspection is None
    build_tools(ctx, services)[0].forward()  # anomaly scoring records its facts
    conv.commit(ctx, _result(), "[photo attached]\nIs this part OK?")

    again = Conversation.open(services, conv.id, "tester")  # e.g. another process
    follow = again.start_turn("Why?")
    assert not follow.new_photo and follow.has_photo and follow.image_sha256 == ctx.image_sha256
    assert follow.inspection["score"] == ctx.inspection["score"] and follow.product == "brick"
    obs = build_tools(follow, services)[0].forward()  # known: not scored again
    assert "brick" in obs and follow.inspection["overlay"] == ctx.inspection["overlay"]

    second = _val(writable_state, "grass", "good")
    ctx2 = again.start_turn("And this one?", second)
    assert ctx2.new_photo and ctx2.inspection is None and ctx2.image_sha256 != ctx.image_sha256
    again.commit(ctx2, _result(), "[photo attached]\nAnd this one?")
    assert again.session["n_turns"] == 2
    assert again.undo()["question"] == "And this one?"  # undo brings the first photo back
    assert again.start_turn("and now?").image_sha256 == ctx.image_sha256
    with pytest.raises(InputError, match="another user"):
        Conversation.open(services, conv.id, "someone-else")


def test_history_is_bounded_by_summaries(services):
    conv = open_conversation(services, None, "tester", new=True)
    for i in range(6):
        ctx = conv.start_turn(f"What causes defect number {i}?")
        long = f"answer {i} " + "word " * 300
        conv.commit(ctx, _result(long), f"[no photo]\nWhat causes defect number {i}?")
    msgs = conv.history_messages(budget=800)
    assert msgs[0]["content"].startswith("Earlier in this conversation (summary):")
    assert "turn 1: user: What causes defect number 0?" in msgs[0]["content"]
    assert msgs[-1]["content"].startswith("answer 5")  # the newest turn is verbatim
    assert sum(estimate_tokens(m["content"]) for m in msgs[2:]) <= 800 + 400
    full = conv.history_messages(budget=100_000)
    assert len(full) == 12 and not full[0]["content"].startswith("Earlier")


def test_two_turn_conversation_with_real_tools(services, writable_state, smol):
    """Photo then a text follow-up, SmolLM2 deciding: the second turn keeps the photo, never re-scores it,
    and every citation is a page retrieved in the conversation."""
    settings = dataclasses.replace(get_settings(), agent_timeout_s=120, agent_max_steps=5)
    agent = DefectAgent(lambda c: build_tools(c, services), model=smol, settings=settings)
    conv = open_conversation(services, "two-turns", "cli")
    ctx = start_turn(conv, _val(writable_state, "gravel", "hole"), "")
    r1, h1 = ask(services, conv, ctx, source="cli", agent=agent, owner="cli")
    assert r1.kind == "manual" and ctx.inspection is not None and h1
    ctx2 = start_turn(conv, None, "Which action should I take first?")
    r2, h2 = ask(services, conv, ctx2, source="cli", agent=agent, owner="cli")
    assert r2.kind == "followup" and r2.answer.strip()
    assert [s.tool for s in r2.steps if s.tool == "anomaly_scoring" and "score" not in s.observation] == []
    assert {(c["source"], c["page"]) for c in r2.citations} <= ctx2.cited_pages()
    turns = services.sessions.turns("two-turns")
    assert [t["question"] for t in turns] == [None, "Which action should I take first?"]
    assert turns[1]["messages"][0]["content"].startswith("[same photo as before]")
    rows = {r["id"]: r for r in [services.history.get(h1), services.history.get(h2)]}
    assert all(r["owner"] == "cli" and r["session_id"] == "two-turns" for r in rows.values())


def test_chat_turns_prune_old_run_folders(writable_state):
    """A chat-only workload keeps the run folders bounded (each turn's folder comes from the RunStore)."""
    from services.container import Services

    services = Services(dataclasses.replace(get_settings(), keep_runs=3))
    runs = services.settings.runs_dir
    runs.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        (runs / f"old-{i}").mkdir()
    conv = open_conversation(services, None, "test", new=True)
    ctx = conv.start_turn("What causes cracks in brick panels?")
    assert ctx.out_dir.parent == runs and ctx.out_dir.name.startswith("chat-")
    assert len([p for p in runs.iterdir() if p.is_dir()]) <= 3
