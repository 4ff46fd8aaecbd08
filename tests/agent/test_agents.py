"""DefectAgent: tool-calling run, answer checks, retry and the deterministic fallback.

The tools here are small real smolagents Tools that compute on a real photo
(scikit-image's ``brick``, rows 0-319 only) and record into the real
``tools.context.RunContext`` like the project's tools do: a robust z-score of patch
means (anomaly scoring), nearest neighbours of residual histograms over a synthesized
defect gallery (similar-defect search), and word-overlap retrieval over a small
manual corpus (manual retrieval). The fast agent runs use the SmolLM2-135M fixture
model; the 1.5B offline model run is marked ``slow``.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections import Counter

import numpy as np
import pytest
import skimage.data
from scipy.ndimage import uniform_filter
from smolagents import Tool

from agent.agents import DefectAgent, load_prompts
from agent.types import AgentResult, AgentStep, AnswerDelta, ToolStarted
from agent.checks import check_answer
from agent.fallback import run_missing_tools, write_manual
from agent.models import LlamaCppModel, smollm2_gguf_path
from core.settings import get_settings
from tools.context import RunContext

PRODUCTS = ("brick", "gravel", "grass")
DEFECTS = ("scratch", "crack", "hole", "stain", "contamination")
ALLOWED_ROWS = 320  # rows 320-511 of the photos are reserved: never read


def crop(product: str, y: int, x: int, size: int = 128) -> np.ndarray:
    assert y + size <= ALLOWED_ROWS
    gray = getattr(skimage.data, product)()[:ALLOWED_ROWS][y:y + size, x:x + size]
    return np.repeat(gray[..., None], 3, axis=2).astype(np.uint8)


def synth_defect(img: np.ndarray, defect: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = img.astype(np.float32).copy()
    h, w = out.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    if defect == "scratch":
        mask = np.abs((yy - 20) - 0.8 * (xx - 10)) < 1.5
        out[mask] *= 0.25
    elif defect == "crack":
        path = 30 + np.cumsum(rng.integers(-1, 2, size=w))
        mask = np.abs(yy - path[None, :]) < 1
        out[mask] = 10
    elif defect == "hole":
        mask = (yy - 64) ** 2 + (xx - 64) ** 2 < 12 ** 2
        out[mask] = 5
    elif defect == "stain":
        blob = np.exp(-(((yy - 50) ** 2 + (xx - 70) ** 2) / (2 * 14.0 ** 2)))
        out = out * (1 - 0.6 * blob[..., None])
    else:  # contamination: bright specks
        for _ in range(25):
            cy, cx = rng.integers(5, h - 5), rng.integers(5, w - 5)
            out[cy - 1:cy + 2, cx - 1:cx + 2] = 255
    return np.clip(out, 0, 255).astype(np.uint8)


def residual_hist(img: np.ndarray) -> np.ndarray:
    g = img.mean(-1).astype(np.float32)
    r = g - uniform_filter(g, 9)
    hist, _ = np.histogram(np.clip(r, -80, 80), bins=32, range=(-80, 80))
    v = np.log1p(hist.astype(np.float32))
    return v / (np.linalg.norm(v) + 1e-9)


class LocalAnomalyScoring(Tool):
    name = "anomaly_scoring"
    description = ("Scores the uploaded photo: anomaly score vs the product's threshold, verdict and defect "
                   "regions. Call it first.")
    inputs = {"product": {"type": "string", "description": "product id; omit to infer it", "nullable": True}}
    output_type = "string"

    def __init__(self, ctx: RunContext):
        super().__init__()
        self.ctx = ctx

    def forward(self, product: str | None = None) -> str:
        ctx = self.ctx
        ctx.tool_calls.append(self.name)
        if product and product not in PRODUCTS:
            raise ValueError(f"unknown product {product!r}; known: {PRODUCTS}")
        if product and ctx.product_source != "user":
            ctx.set_product(product, "model")
        if not ctx.product:  # nearest product by (mean, std) of a reference crop
            g = ctx.image.mean(-1)
            stats = {p: crop(p, 180, 180).mean(-1) for p in PRODUCTS}
            dist = {p: abs(g.mean() - s.mean()) + abs(g.std() - s.std()) for p, s in stats.items()}
            ctx.set_product(min(dist, key=dist.get), "inferred")
        g = ctx.image.mean(-1)
        ps = 16
        means = g[: g.shape[0] // ps * ps, : g.shape[1] // ps * ps].reshape(g.shape[0] // ps, ps, -1, ps).mean((1, 3))
        med = np.median(means)
        z = np.abs(means - med) / (1.4826 * np.median(np.abs(means - med)) + 1e-6)
        score, threshold = float(z.max()), 3.0
        ys, xs = np.nonzero(z > threshold)
        regions = []
        if len(ys):
            regions = [{"bbox": [int(xs.min() * ps), int(ys.min() * ps), int((xs.max() + 1) * ps),
                                 int((ys.max() + 1) * ps)],
                        "area_frac": float(len(ys) / z.size), "peak": float(z.max())}]
        ctx.inspection = {"product": ctx.product, "score": score, "threshold": threshold,
                          "is_anomalous": score > threshold, "regions": regions,
                          "height": int(g.shape[0]), "width": int(g.shape[1])}
        verdict = "ANOMALOUS" if score > threshold else "NORMAL"
        reg = "; ".join(f"{i + 1}) bbox {r['bbox']} area {100 * r['area_frac']:.1f}% peak {r['peak']:.2f}"
                        for i, r in enumerate(regions)) or "none"
        return f"product={ctx.product} score={score:.2f} threshold={threshold:.2f} verdict={verdict}; regions: {reg}"


class LocalSimilarDefectSearch(Tool):
    name = "similar_defect_search"
    description = ("Finds the most similar past defect images and returns their defect types with similarity "
                   "scores and the majority defect type.")
    inputs = {
        "product": {"type": "string", "description": "restrict to this product id", "nullable": True},
        "k": {"type": "integer", "description": "number of matches (default 5)", "nullable": True},
    }
    output_type = "string"

    def __init__(self, ctx: RunContext):
        super().__init__()
        self.ctx = ctx
        self.gallery = [(d, p, residual_hist(synth_defect(crop(p, 150, 40 + 60 * s), d, seed=s)))
                        for d in DEFECTS for p in PRODUCTS for s in range(2)]

    def forward(self, product: str | None = None, k: int | None = None) -> str:
        ctx = self.ctx
        ctx.tool_calls.append(self.name)
        k = max(1, min(int(k or 5), 10))
        prod = ctx.product or product
        q = residual_hist(ctx.image)
        hits = sorted(({"defect_type": d, "product": p, "score": float(q @ f)} for d, p, f in self.gallery
                       if prod is None or p == prod), key=lambda h: -h["score"])[:k]
        votes = Counter(h["defect_type"] for h in hits)
        defect, count = votes.most_common(1)[0]
        ctx.defect_type = defect
        if not ctx.product:
            ctx.set_product(hits[0]["product"], "inferred")
        ctx.search = {"product": ctx.product, "hits": hits, "defect_type": defect, "votes": count, "k": k}
        top = "; ".join(f"{i + 1}) {h['defect_type']} ({h['product']}) score {h['score']:.2f}"
                        for i, h in enumerate(hits))
        return f"product={ctx.product}; top matches: {top}; majority defect type: {defect} ({count}/{len(hits)})"


MANUAL_TEXT = {
    "cause": "Causes: {d} on {p} parts comes from worn tooling and rough handling on the conveyor. "
             "Moisture left in the {p} before firing makes {d} more likely.",
    "action": "Immediate action: stop the line, quarantine the {p} batch with {d} and inspect the last 50 parts. "
              "Mark rejected parts and inform the shift lead.",
    "prevention": "Prevention: replace worn tooling every 500 hours and add a guard rail on the conveyor. "
                  "Check drying time of each {p} batch to avoid {d}.",
}


def manual_corpus() -> list[dict]:
    out = []
    for p in PRODUCTS:
        for i, d in enumerate(DEFECTS):
            for j, (section, text) in enumerate(MANUAL_TEXT.items()):
                out.append({"source": f"{p}_manual_en.pdf", "page": 2 + 3 * i + j, "section": section,
                            "product": p, "defect": d, "text": text.format(d=d, p=p), "lang": "en"})
    return out


class LocalManualRetrieval(Tool):
    name = "manual_retrieval"
    description = ("Searches the product manuals and returns passages with file name, page and section "
                   "(cause / action / prevention). Cite passages as [file p.N].")
    inputs = {
        "query": {"type": "string", "description": "what to look for"},
        "product": {"type": "string", "description": "product id", "nullable": True},
        "defect_type": {"type": "string", "description": "defect type", "nullable": True},
    }
    output_type = "string"

    def __init__(self, ctx: RunContext):
        super().__init__()
        self.ctx, self.corpus = ctx, manual_corpus()

    def forward(self, query: str, product: str | None = None, defect_type: str | None = None) -> str:
        ctx = self.ctx
        ctx.tool_calls.append(self.name)
        product = ctx.product or product
        defect = defect_type if defect_type in DEFECTS else ctx.defect_type
        words = set(re.findall(r"\w+", query.lower()))
        cands = [h for h in self.corpus if (not product or h["product"] == product)
                 and (not defect or h["defect"] == defect)]
        ranked = sorted(cands, key=lambda h: -len(words & set(re.findall(r"\w+", h["text"].lower()))))
        best = {}
        for h in ranked:
            best.setdefault(h["section"], dict(h, score=float(len(words & set(h["text"].lower().split())))))
        hits = ctx.add_passages(list(best.values())[:3])
        return "\n".join(f"[{h['label']}] {h['source']} p.{h['page']} ({h['section']}): {h['text']}"
                         for h in hits) or "no passages"


def local_tools(ctx: RunContext) -> list[Tool]:
    return [LocalAnomalyScoring(ctx), LocalSimilarDefectSearch(ctx), LocalManualRetrieval(ctx)]


def make_ctx(product: str | None = None, question: str | None = None) -> RunContext:
    img = synth_defect(crop("brick", 60, 200), "hole", seed=3)
    return RunContext(image=img, product=product, question=question, new_photo=True)


@pytest.fixture(scope="module")
def smol():
    return LlamaCppModel(smollm2_gguf_path(), n_ctx=4096, n_threads=2, max_tokens=160)


def _assert_valid_result(result: AgentResult, ctx: RunContext) -> None:
    assert check_answer(result.answer, ctx) == []
    assert result.product == ctx.product and result.product
    assert result.defect_type == ctx.defect_type and result.defect_type
    assert result.citations, "the manual must cite pages"
    assert {(c["source"], c["page"]) for c in result.citations} <= ctx.cited_pages()
    ok_tools = {s.tool for s in result.steps if s.error is None}
    assert {"anomaly_scoring", "similar_defect_search", "manual_retrieval"} <= ok_tools
    if result.fallback:
        assert result.fallback_reason
        assert result.answer.startswith("> Written by the deterministic fallback")
        assert result.fallback_reason in result.answer


def test_prompts_layer_over_smolagents_defaults():
    templates, extra = load_prompts()
    assert {"system_prompt", "planning", "managed_agent", "final_answer"} <= set(templates)
    assert "manual_retrieval" in templates["system_prompt"] and "Examples:" in templates["system_prompt"]
    assert "{{ problems }}" in extra["answer_problems"] and "question" in extra["turn"]


def test_system_prompt_is_the_same_for_every_conversation(smol):
    """The system prompt names every tool once and does not depend on the turn (its KV cache is reused)."""
    a = DefectAgent(local_tools, model=smol)
    b = DefectAgent(lambda ctx: local_tools(ctx)[:1], model=smol)
    assert a.system_text == b.system_text
    for name in ("anomaly_scoring", "similar_defect_search", "manual_retrieval", "register_correction"):
        assert a.system_text.count(f"- {name}:") == 1


def test_turn_text_marks_photo_product_question_and_language(smol):
    agent = DefectAgent(local_tools, model=smol)
    text = agent.turn_text(make_ctx(product="brick", question="why does it crack?"))
    assert text.startswith("[photo attached") and "product brick" in text and "why does it crack?" in text
    assert "(no question)" in agent.turn_text(make_ctx())
    follow = RunContext(image=None, question="그럼 예방은?")
    assert agent.turn_text(follow).startswith("[no photo]") and "Answer in Korean" in agent.turn_text(follow)
    assert "Answer in Korean" not in agent.turn_text(make_ctx(question="why?"))
    ui_ko = RunContext(image=make_ctx().image, ui_lang="ko", new_photo=False)
    assert agent.turn_text(ui_ko).startswith("[same photo as before]") and "Answer in Korean" in agent.turn_text(ui_ko)


def test_fallback_alone_writes_a_valid_manual():
    ctx = make_ctx()
    steps = list(run_missing_tools(ctx, local_tools(ctx)))
    assert [s.tool for s in steps] == ["anomaly_scoring", "similar_defect_search", "manual_retrieval"]
    assert all(isinstance(s, AgentStep) and s.error is None and s.observation for s in steps)
    answer = write_manual(ctx, "unit test")
    assert check_answer(answer, ctx) == []
    assert f"Product: **{ctx.product}** (inferred" in answer and f"**{ctx.defect_type}**" in answer
    # a second pass calls nothing: everything is already in the context
    assert list(run_missing_tools(ctx, local_tools(ctx))) == []


def test_fallback_survives_a_failing_tool():
    ctx = make_ctx()
    tools = local_tools(ctx)
    tools[0].forward = lambda product=None: (_ for _ in ()).throw(RuntimeError("bank missing"))
    steps = list(run_missing_tools(ctx, tools))
    assert steps[0].tool == "anomaly_scoring" and "bank missing" in steps[0].error
    answer = write_manual(ctx, "anomaly scoring failed")
    assert "## Defect summary" in answer and "unknown (anomaly scoring failed)" in answer


def test_agent_run_with_smollm2(smol):
    """Fast end-to-end run with the 135M model: whatever it writes, the result is a valid manual."""
    ctx = make_ctx()
    settings = dataclasses.replace(get_settings(), agent_timeout_s=90, agent_max_steps=5)
    agent = DefectAgent(local_tools, model=smol, settings=settings)
    events = list(agent.stream(ctx))
    result = events[-1]
    assert isinstance(result, AgentResult)
    assert all(isinstance(e, (AgentStep, ToolStarted, AnswerDelta)) for e in events[:-1])
    assert [e for e in events if isinstance(e, AgentStep) and e.tool not in ("answer_check", "invalid_tool_call")] \
        == result.steps
    if not result.fallback:  # the grammar makes the first reply to a new photo a tool call
        assert result.timings["model_steps"] >= 1 and result.timings["first_tool_s"] < result.elapsed_s
    _assert_valid_result(result, ctx)
    assert result.model.startswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert result.elapsed_s < 120


def test_timeout_falls_back(smol):
    ctx = make_ctx(product="brick")
    settings = dataclasses.replace(get_settings(), agent_timeout_s=0.0)
    result = DefectAgent(local_tools, model=smol, settings=settings).run(ctx)
    assert result.fallback and result.fallback_reason.startswith("timeout")
    _assert_valid_result(result, ctx)
    assert result.product == "brick"  # the user's product is kept


def test_missing_model_falls_back():
    ctx = make_ctx()
    settings = dataclasses.replace(get_settings(), agent_backend="llamacpp", agent_model="/nonexistent/x.gguf")
    result = DefectAgent(local_tools, settings=settings).run(ctx)
    assert result.fallback and "could not be loaded" in result.fallback_reason
    _assert_valid_result(result, ctx)


def test_agent_with_project_tools_on_built_state(built_state, smol):
    """The real tools (PatchCore, gallery search, Chroma manuals) on a built state, SmolLM2 model."""
    import json

    from services.container import Services
    from tools import RunContext as ToolsRunContext
    from tools import build_tools

    services = Services(get_settings())
    manifest = json.loads((built_state / "data" / "manifest.json").read_text())
    item = next(it for it in manifest["items"] if it["split"] == "val" and it["product"] == "brick"
                and it["defect_type"] == "crack")
    ctx = ToolsRunContext.from_path(built_state / "data" / item["image"])
    settings = dataclasses.replace(get_settings(), agent_timeout_s=90, agent_max_steps=5)
    result = DefectAgent(lambda c: build_tools(c, services), model=smol, settings=settings).run(ctx)
    _assert_valid_result(result, ctx)
    assert result.product == "brick"
    assert all(c["source"].endswith(".pdf") and c["page"] >= 1 for c in result.citations)


def test_step_grammar_looks_at_a_new_photo_first_and_then_calls_what_the_checks_miss(smol):
    """The per-step grammar (compiled by llama.cpp): a new photo's first step may only call the tools that use
    the photo; after an answer that lacked evidence the next step may only call the missing tools."""
    from llama_cpp import LlamaGrammar

    from agent.agents import _TurnModel

    ctx = make_ctx(question="Analyse this part.")
    turn = _TurnModel(smol, ctx, local_tools(ctx), time.monotonic() + 60, None, {})
    first = turn.step_grammar()
    assert [t.name for t in first.tools] == ["anomaly_scoring", "similar_defect_search"]
    assert first.answer_gbnf is None  # a call, not an answer
    LlamaGrammar.from_string(first.gbnf(), verbose=False)
    ctx.tool_calls.append("manual_retrieval")  # the model went to the manuals and then answered unchecked
    turn.rounds = 1
    assert "manual_retrieval" in [t.name for t in turn.step_grammar().tools] and turn.step_grammar().answer_gbnf
    turn.needs_evidence = ["anomaly_scoring"]
    retry = turn.step_grammar()
    assert [t.name for t in retry.tools] == ["anomaly_scoring"] and retry.answer_gbnf is None
    LlamaGrammar.from_string(retry.gbnf(), verbose=False)
    assert turn.needs_evidence == [] and turn.step_grammar().answer_gbnf is not None  # one step only


def test_text_question_without_photo_never_reaches_image_tools(smol):
    """No photo in the conversation: the image tools are not offered (whatever the model writes) and the
    answer cites only pages retrieved in the turn."""
    ctx = RunContext(image=None, question="What causes cracks on brick panels?")
    settings = dataclasses.replace(get_settings(), agent_timeout_s=90, agent_max_steps=5)
    result = DefectAgent(local_tools, model=smol, settings=settings).run(ctx)
    tools = [s.tool for s in result.steps]
    assert "anomaly_scoring" not in tools and "similar_defect_search" not in tools
    assert result.kind == "manual_question" and result.answer.strip()
    assert {(c["source"], c["page"]) for c in result.citations} <= ctx.cited_pages()
    if result.fallback:
        assert "manual_retrieval" in tools and result.citations


def test_stop_cancels_the_turn(smol):
    ctx = make_ctx(question="Analyse this part.")
    cancel = threading.Event()
    settings = dataclasses.replace(get_settings(), agent_timeout_s=90, agent_max_steps=5)
    events = []
    t0 = time.monotonic()
    for event in DefectAgent(local_tools, model=smol, settings=settings).stream(ctx, cancel=cancel):
        events.append(event)
        if isinstance(event, (ToolStarted, AgentStep, AnswerDelta)):
            cancel.set()
    result = events[-1]
    assert isinstance(result, AgentResult) and result.cancelled and not result.fallback
    assert time.monotonic() - t0 < 60
