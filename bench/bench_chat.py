"""Chat agent speed: the new conversation agent vs today's fixed three-step pipeline, side by side in one process.

    python bench/bench_chat.py [--photos 3] [--levers] [--json]
    python bench/bench_chat.py --small        # CI: SmolLM2 fixture, 1 photo, no levers

Anchor (the baseline): the agent of commit ``a06fef2`` (the fixed pipeline: anomaly scoring ->
similar-defect search -> manual retrieval -> the model writes the whole six-section manual,
one tool call per generation), loaded from git into this process under other module names
(``_baseline_agent``, ``_baseline_tools``) with its own llama.cpp model instance of the same
GGUF. Both pipelines run on the same photos through the same services (warm: each pipeline
answers one photo first, not timed).

Measured for the new agent (offline model on the cores given by ``DRA_LLM_THREADS``):

* photo -> full response manual: total seconds (p50), and the ratio to the anchor's p50;
* first tool step visible: seconds from sending to the first :class:`agent.types.ToolStarted`;
* first answer token after the last tool: the answer's first visible text (a manual's code-written
  summary) and the model's first token, each minus the end of the last tool call;
* follow-up answered from memory ("Which action should I take first?" after each manual): p50;
* text-only manual question (no photo): p50.

``--levers`` measures the levers one at a time against the default on the same photos:
``one-call`` (at most one tool call per generation), ``no-kv-reuse`` (the KV cache is cleared
before each turn: the system prompt and the conversation are evaluated again),
``long-observations`` (manual passages of 320 characters instead of 170), and
``prompt-lookup`` (llama.cpp ``LlamaPromptLookupDecoding`` draft tokens from the prompt; a second
model instance with ``logits_all``). The machine's load average is printed: other jobs share the cores.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.settings import apply_runtime_env  # noqa: E402

apply_runtime_env()  # before torch / llama.cpp load

BASELINE_COMMIT = "a06fef2"
PHOTOS = ("brick/val/hole/003.png", "gravel/val/crack/003.png", "grass/val/stain/003.png",
          "brick/val/scratch/003.png", "gravel/val/contamination/003.png", "grass/val/hole/003.png")
TEXT_QUESTIONS = ("What causes cracks in brick panels?", "How do I prevent stains on gravel?",
                  "What is the immediate action for contamination on grass?")
FOLLOW_UP = "Which action should I take first?"


def p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def load_baseline(commit: str = BASELINE_COMMIT) -> types.ModuleType:
    """Today's pipeline: ``agent/`` and ``tools/`` of ``commit`` as packages ``_baseline_agent`` / ``_baseline_tools``."""
    root = Path(tempfile.mkdtemp(prefix="dra-baseline-"))
    names = subprocess.run(["git", "-C", str(REPO), "ls-tree", "-r", "--name-only", commit, "agent", "tools"],
                           capture_output=True, text=True, check=True).stdout.split()
    for name in names:
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{name}"], capture_output=True, text=True,
                              check=True).stdout
        text = re.sub(r"\b(from|import) agent\b", r"\1 _baseline_agent", text)
        text = re.sub(r"\b(from|import) tools\b", r"\1 _baseline_tools", text)
        dst = root / name.replace("agent/", "_baseline_agent/", 1).replace("tools/", "_baseline_tools/", 1)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(text, encoding="utf-8")
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    return importlib.import_module("_baseline_agent.agents")


def run_baseline(base_agents, services, model, path: str) -> dict:
    """One photo through the anchor pipeline: total seconds and whether its fallback wrote the manual."""
    tools_mod = importlib.import_module("_baseline_tools")
    ctx = tools_mod.RunContext.from_path(path)
    agent = base_agents.DefectAgent(lambda c: tools_mod.build_tools(c, services), model=model,
                                    settings=services.settings)
    t0 = time.monotonic()
    result = agent.run(ctx)
    return {"total_s": time.monotonic() - t0, "fallback": result.fallback, "tools": [s.tool for s in result.steps]}


def run_turn(services, conv, agent, image: str | None, question: str, reset_kv: bool = False) -> dict:
    """One turn of the new agent with its timings (seconds from sending)."""
    from agent.ask import start_turn, stream_turn
    from agent.types import AgentResult

    ctx = start_turn(conv, image, question)
    if reset_kv:
        agent._model.llm.reset()
    t0 = time.monotonic()
    result = None
    for event in stream_turn(services, conv, ctx, source="cli", agent=agent, owner="bench"):
        if isinstance(event, AgentResult):
            result = event
    total = time.monotonic() - t0
    tm = result.timings or {}
    tools_done = tm.get("tools_done_s")
    row = {"total_s": total, "kind": result.kind, "form": result.form, "fallback": result.fallback,
           "fallback_reason": result.fallback_reason, "tools": [s.tool for s in result.steps],
           "first_tool_s": tm.get("first_tool_s"),
           "answer_after_tools_s": (tm["first_answer_s"] - tools_done) if tools_done and "first_answer_s" in tm else None,
           "model_token_after_tools_s": (tm["first_model_token_s"] - tools_done)
           if tools_done and "first_model_token_s" in tm else None,
           "prompt_tokens": tm.get("prompt_tokens"), "reused_tokens": tm.get("reused_tokens")}
    return row


def new_agent(services, model, passage_chars: int | None = None, max_calls: int = 3):
    """The new chat agent on ``model``; lever switches: manual passage length, tool calls per generation."""
    from agent.agents import DefectAgent
    from tools import AnomalyScoringTool, ManualRetrievalTool, SimilarDefectSearchTool, build_tools

    if passage_chars is None:
        factory = lambda c: build_tools(c, services)  # noqa: E731
    else:
        def factory(c):
            return [AnomalyScoringTool(c, services), SimilarDefectSearchTool(c, services),
                    ManualRetrievalTool(c, services, max_chars=passage_chars)]
    agent = DefectAgent(factory, model=model, settings=services.settings)
    agent.max_calls = max_calls
    return agent


def bench_new(services, agent, photos: list[str], questions: list[str], reset_kv: bool = False,
              follow_up: bool = True) -> dict:
    from agent.ask import open_conversation

    manual, follow, text = [], [], []
    for path in photos:
        conv = open_conversation(services, None, "bench", new=True)
        manual.append(run_turn(services, conv, agent, path, "", reset_kv=reset_kv))
        if follow_up:
            follow.append(run_turn(services, conv, agent, None, FOLLOW_UP, reset_kv=reset_kv))
    for q in questions:
        conv = open_conversation(services, None, "bench", new=True)
        text.append(run_turn(services, conv, agent, None, q, reset_kv=reset_kv))

    def col(rows, key):
        return [r[key] for r in rows if r.get(key) is not None]

    return {
        "manual_p50_s": p50(col(manual, "total_s")),
        "first_tool_p50_s": p50(col(manual, "first_tool_s")),
        "answer_after_tools_p50_s": p50(col(manual, "answer_after_tools_s")),
        "model_token_after_tools_p50_s": p50(col(manual, "model_token_after_tools_s")),
        "followup_p50_s": p50(col(follow, "total_s")),
        "text_question_p50_s": p50(col(text, "total_s")),
        "fallbacks": sum(r["fallback"] for r in manual + follow + text),
        "manual_forms": [r["form"] for r in manual],
        "runs": {"manual": manual, "followup": follow, "text": text},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=int, default=3, help="photos per pipeline (from the built state's val crops)")
    ap.add_argument("--questions", type=int, default=3, help="text-only questions")
    ap.add_argument("--levers", action="store_true", help="also measure each lever against the default")
    ap.add_argument("--no-baseline", action="store_true", help="skip the anchor (e.g. while iterating)")
    ap.add_argument("--small", action="store_true", help="CI: SmolLM2 fixture, 1 photo, 1 question")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    from agent.models import LlamaCppModel, get_agent_model, smollm2_gguf_path
    from core.settings import get_settings
    from services.container import get_services

    settings = get_settings()
    if args.small:
        args.photos, args.questions, args.levers = 1, 1, False
    services = get_services(settings)
    data = settings.data_dir
    photos = [str(data / p) for p in PHOTOS[: max(1, args.photos)] if (data / p).is_file()]
    warm_photo = str(data / "brick/val/crack/004.png")
    questions = list(TEXT_QUESTIONS[: args.questions])
    out: dict = {"cores": os.cpu_count(), "load_avg_before": os.getloadavg(), "photos": photos,
                 "baseline_commit": BASELINE_COMMIT}

    if args.small:
        model = LlamaCppModel(smollm2_gguf_path(), n_ctx=4096, n_threads=settings.llm_threads, max_tokens=200)
        name = "SmolLM2-135M (fixture)"
    else:
        model, name = get_agent_model(settings)
    out["model"] = name
    agent = new_agent(services, model)
    t0 = time.monotonic()
    agent.warm()
    out["system_prompt_prefill_s"] = round(time.monotonic() - t0, 2)
    bench_new(services, agent, [warm_photo], [], follow_up=False)  # warm: banks, index, embedders, caches

    if not args.no_baseline:
        base = load_baseline()
        base_model_mod = importlib.import_module("_baseline_agent.models")
        if args.small:
            base_model = base_model_mod.LlamaCppModel(smollm2_gguf_path(), n_ctx=4096, n_threads=settings.llm_threads,
                                                      max_tokens=settings.agent_max_tokens)
        else:
            base_model, _ = base_model_mod.get_agent_model(settings)
        run_baseline(base, services, base_model, warm_photo)  # warm
        rows = [run_baseline(base, services, base_model, p) for p in photos]
        out["baseline"] = {"manual_p50_s": p50([r["total_s"] for r in rows]), "runs": rows}

    out["new"] = bench_new(services, agent, photos, questions)
    if "baseline" in out and out["new"]["manual_p50_s"]:
        out["ratio_new_to_baseline"] = round(out["new"]["manual_p50_s"] / out["baseline"]["manual_p50_s"], 3)

    if args.levers:
        levers = {}
        levers["one-call"] = bench_new(services, new_agent(services, model, max_calls=1), photos, [],
                                       follow_up=False)
        levers["no-kv-reuse"] = bench_new(services, new_agent(services, model), photos, questions, reset_kv=True)
        levers["long-observations"] = bench_new(services, new_agent(services, model, passage_chars=320), photos, [],
                                                follow_up=False)
        try:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            plm = LlamaCppModel(model.model_path, n_ctx=4096, n_threads=settings.llm_threads,
                                max_tokens=settings.agent_max_tokens,
                                draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10))
            pl_agent = new_agent(services, plm)
            pl_agent.warm()
            levers["prompt-lookup"] = bench_new(services, pl_agent, photos, questions)
            del plm
        except Exception as exc:  # noqa: BLE001 - reported, the other numbers stand
            levers["prompt-lookup"] = {"error": f"{type(exc).__name__}: {exc}"}
        out["levers"] = levers
    out["load_avg_after"] = os.getloadavg()

    if args.json:
        print(json.dumps(out, default=str))
        return 0
    new, base = out["new"], out.get("baseline")
    print(f"machine: {out['cores']} cores, load average before {out['load_avg_before'][0]:.1f} / after "
          f"{out['load_avg_after'][0]:.1f} (other jobs share the cores); model {name}; "
          f"system prompt prefill {out['system_prompt_prefill_s']} s (once per process)")
    if base:
        print(f"anchor ({BASELINE_COMMIT} fixed pipeline): photo -> manual p50 {base['manual_p50_s']} s "
              f"over {len(base['runs'])} photos")
    ratio = out.get("ratio_new_to_baseline")
    print(f"new: photo -> manual p50 {new['manual_p50_s']} s" + (f"  ratio {ratio}x of the anchor "
                                                                f"({1 / ratio:.1f}x faster)" if ratio else ""))
    print(f"new: first tool step visible p50 {new['first_tool_p50_s']} s after sending")
    print(f"new: first answer text after the last tool p50 {new['answer_after_tools_p50_s']} s (code-written "
          f"summary); first model token after the last tool p50 {new['model_token_after_tools_p50_s']} s")
    print(f"new: follow-up from memory p50 {new['followup_p50_s']} s; text-only manual question p50 "
          f"{new['text_question_p50_s']} s; fallbacks {new['fallbacks']}; manual forms {new['manual_forms']}")
    for lever, res in (out.get("levers") or {}).items():
        if "error" in res:
            print(f"lever {lever}: failed: {res['error']}")
            continue
        r = (res["manual_p50_s"] / new["manual_p50_s"]) if res.get("manual_p50_s") and new["manual_p50_s"] else None
        print(f"lever {lever}: photo -> manual p50 {res['manual_p50_s']} s ({r:.2f}x of the default)"
              if r else f"lever {lever}: photo -> manual p50 {res['manual_p50_s']} s",
              f"; follow-up p50 {res['followup_p50_s']} s; text p50 {res['text_question_p50_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
