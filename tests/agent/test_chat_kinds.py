"""Every kind of message through the real tools on a built state: the SmolLM2 fixture (fast: whatever it
decides, guards, checks and the fallback give the kind's answer) and the offline 1.5B model (slow), plus a
two-turn CLI conversation with ``--session`` in real subprocesses."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.agents import DefectAgent
from agent.ask import ask, open_conversation, start_turn
from agent.evaluate import check_turn_outcome
from agent.models import LlamaCppModel, smollm2_gguf_path
from core.settings import get_settings
from tools import build_tools

REPO = Path(__file__).resolve().parents[2]
IMAGE_TOOLS = {"anomaly_scoring", "similar_defect_search"}

# (conversation: [(image relative to data/ or None, question, kind)])
CONVERSATIONS = {
    "photo-manual-then-followup": [("brick/val/crack/001.png", "", "manual"),
                                   (None, "Which action should I take first?", "followup")],
    "normal-verdict": [("gravel/val/good/004.png", "Is this part OK?", "verdict")],
    "similar": [("grass/val/stain/005.png", "Show me similar cases.", "similar")],
    "text-then-other-product": [(None, "What causes cracks in brick panels?", "manual_question"),
                                (None, "And for gravel?", "manual_question")],
    "capabilities-ko": [(None, "무엇을 할 수 있나요?", "capabilities")],
    "offtopic": [(None, "Write me a poem about the sea.", "offtopic")],
}


def _run(services, agent, turns, data_dir: Path) -> list[tuple]:
    conv = open_conversation(services, None, "test", new=True)
    out, product = [], None
    for image, question, kind in turns:
        ctx = start_turn(conv, str(data_dir / image) if image else None, question)
        product = image.split("/")[0] if image else product
        result, hid = ask(services, conv, ctx, source="cli", agent=agent, owner="test")
        assert hid and result.kind == kind, (result.kind, kind)
        out.append((ctx, result, product))
    return out


def _check(name, turns, runs, capsys=None):
    for (image, question, kind), (ctx, result, product) in zip(turns, runs):
        tools = {s.tool for s in result.steps}
        problems = check_turn_outcome({"kind": kind, "question": question}, result, ctx, product)
        if capsys is not None:
            with capsys.disabled():
                print(f"\n[{name}] {kind}: {result.elapsed_s:.1f} s fallback={result.fallback} tools={sorted(tools)} "
                      f"problems={problems}")
        assert problems == [], (kind, result.answer[:400])
        if ctx.image is None:
            assert not tools & IMAGE_TOOLS  # no photo: image tools are never offered
        assert {(c["source"], c["page"]) for c in result.citations} <= ctx.cited_pages()


@pytest.fixture(scope="module")
def services(built_state):
    from services.container import Services

    return Services(get_settings())


@pytest.fixture(scope="module")
def smol():
    return LlamaCppModel(smollm2_gguf_path(), n_ctx=4096, n_threads=2, max_tokens=160)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_every_kind_with_smollm2(name, services, smol, built_state):
    settings = dataclasses.replace(get_settings(), agent_timeout_s=120, agent_max_steps=5)
    agent = DefectAgent(lambda c: build_tools(c, services), model=smol, settings=settings)
    turns = CONVERSATIONS[name]
    _check(name, turns, _run(services, agent, turns, built_state / "data"))


@pytest.mark.slow
def test_every_kind_with_the_offline_model(services, built_state, capsys):
    """The real 1.5B model: each kind answered as it should, and the model (not the fallback) answers most."""
    from agent.models import get_agent_model

    model, _ = get_agent_model(get_settings())
    agent = DefectAgent(lambda c: build_tools(c, services), model=model)
    fallbacks = n = 0
    for name in ("photo-manual-then-followup", "normal-verdict", "text-then-other-product", "offtopic"):
        turns = CONVERSATIONS[name]
        runs = _run(services, agent, turns, built_state / "data")
        _check(name, turns, runs, capsys)
        fallbacks += sum(r.fallback for _, r, _ in runs)
        n += len(runs)
    assert fallbacks <= n // 3, f"{fallbacks} of {n} turns fell back"


def test_two_turn_cli_conversation_with_session(built_state, tmp_path):
    """``cli.py ask IMAGE --session S`` then ``cli.py ask --question Q --session S``: two processes, one
    conversation (the photo and its facts come back from the state directory)."""
    state = tmp_path / "state"
    import shutil

    shutil.copytree(built_state, state)
    env = {**os.environ, "DRA_STATE_DIR": str(state), "DRA_AGENT_MODEL": str(smollm2_gguf_path())}

    def cli(*args):
        proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "ask", *args, "--json"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    photo = state / "data" / "gravel" / "val" / "hole" / "005.png"
    first = cli(str(photo), "--session", "line-3")
    assert first["session"] == "line-3" and first["turn"] == 0 and first["kind"] == "manual"
    assert first["product"] == "gravel" and first["score"] is not None
    for key in ("steps", "answer", "citations", "model", "elapsed_s"):
        assert key in first
    second = cli("--question", "Which action should I take first?", "--session", "line-3")
    assert second["session"] == "line-3" and second["turn"] == 1 and second["image"] is None
    assert second["score"] == first["score"] and second["product"] == "gravel"  # the photo came back
    assert "anomaly_scoring" not in [s["tool"] for s in second["steps"] if "vs threshold" not in s["observation"]]
    fresh = cli("--question", "Which action should I take first?")  # no --session: a new conversation
    assert fresh["session"] != "line-3" and fresh["turn"] == 0 and fresh["score"] is None
    bad = subprocess.run([sys.executable, str(REPO / "cli.py"), "ask", "--json"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "error" in json.loads(bad.stdout.strip().splitlines()[-1])


def test_cli_eval_ask_on_the_unseen_split_reports_detection_apart(built_state):
    """``cli.py eval ask --split unseen``: unseen defect photos, and the type accuracy over the photos anomaly
    scoring flagged apart from the photos it called NORMAL (which rightly get no defect type)."""
    env = {**os.environ, "DRA_STATE_DIR": str(built_state), "DRA_AGENT_MODEL": str(smollm2_gguf_path()),
           "DRA_AGENT_MAX_STEPS": "2", "DRA_AGENT_MAX_TOKENS": "24"}
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "eval", "ask", "--per-product", "1", "--split",
                           "unseen", "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["split"] == "unseen" and out["n"] == 3
    runs = out["runs"]
    assert all("/unseen/" in r["image"] for r in runs) and {r["true_product"] for r in runs} == {
        "brick", "gravel", "grass"}
    flagged = [r for r in runs if r["flagged"]]
    assert all(r["flagged"] in (True, False) for r in runs)  # every photo was scored
    assert out["n_flagged"] == len(flagged) and out["flagged_rate"] == round(len(flagged) / 3, 3)
    if flagged:
        assert out["defect_type_accuracy_flagged"] == round(
            sum(r["defect_type"] == r["true_defect"] for r in flagged) / len(flagged), 3)
    unflagged = [r for r in runs if r["flagged"] is False]
    assert all(r["defect_type"] is None for r in unflagged)  # a part scored NORMAL reports no defect type
    assert out["no_type_rate_unflagged"] == (1.0 if unflagged else None)
