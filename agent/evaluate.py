"""Evaluations of the agent on the project's own data: ``cli.py eval ask`` and ``cli.py eval chat``.

``eval chat`` runs the conversations of ``agent/scenarios/chat.yaml`` (photos from the built
state's sample crops, English and Korean, one- to three-turn conversations) through the same
use case as the CLI and the app (:func:`agent.ask.ask`), each conversation in a new session,
and scores every turn by its kind:

* **pass**: the answer has what the kind needs (see :func:`check_turn_outcome`) and the model,
  not the fallback, wrote it (``pass_incl_fallback`` also counts fallback answers);
* **tool selection**: the distinct tools called in the turn against the tools the turn needs
  (the kind's, minus results the conversation already had); precision = needed calls / calls,
  recall = needed calls made / needed, micro-averaged (``model_*``: the model's calls only);
* **citation validity**: every citation is a page retrieved in the conversation (and of the
  scenario's product where it names one);
* **latency**: seconds per turn (p50, max), per kind.

Results are given per half (``dev``: may be used to adjust prompts; ``report``: not) and per kind.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import yaml

from agent.ask import ask, open_conversation, start_run, start_turn
from agent.checks import (
    CAPABILITY_WORDS,
    DEFECT_WORDS,
    DOMAIN_WORDS,
    NORMAL_WORDS,
    SECTIONS,
    check_answer,
    find_citations,
)
from core import catalog
from data.build import load_manifest
from services.container import Services

ALL_TOOLS = {"anomaly_scoring", "similar_defect_search", "manual_retrieval"}
SCENARIOS_PATH = Path(__file__).resolve().parent / "scenarios" / "chat.yaml"
#: tools each kind of turn needs (before removing what the conversation already knows)
KIND_NEEDS = {
    "manual": ["anomaly_scoring", "similar_defect_search", "manual_retrieval"],
    "verdict": ["anomaly_scoring"],
    "similar": ["similar_defect_search"],
    "manual_question": ["manual_retrieval"],
    "followup": [],
    "capabilities": [],
    "offtopic": [],
}
OFFTOPIC_WORDS = DOMAIN_WORDS
_HANGUL = re.compile(r"[\uac00-\ud7a3]")


def load_scenarios(path: Path = SCENARIOS_PATH) -> list[dict]:
    """The conversations of the scenario file (``id``, ``half``, ``turns``)."""
    return list((yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).get("conversations") or [])


def _has_manual(answer: str) -> bool:
    return bool(re.search(r"^##\s*Likely causes", answer or "", re.MULTILINE))


def _defect_names() -> list[str]:
    out = []
    for d in catalog.taxonomy()["defect_types"]:
        out += [d["id"], d["ko"]]
    return out


def check_turn_outcome(spec: dict, result, ctx, true_product: str | None) -> list[str]:
    """Why a turn's answer does not do what its kind needs (empty: it does).

    Args:
        spec: the scenario turn (``kind``, optional ``mentions_any``, ``cite_product``).
        result: the turn's :class:`agent.types.AgentResult`.
        ctx: the turn's :class:`tools.context.RunContext` after the turn.
        true_product: the product of the conversation's photo (from its path), if any.
    """
    kind, answer = spec["kind"], result.answer or ""
    low = answer.lower()
    called = {s.tool for s in result.steps if s.error is None}
    problems = []
    cited = find_citations(answer)
    allowed = ctx.cited_pages()
    if any(c not in allowed for c in cited):
        problems.append("cites a page not retrieved in the conversation")
    if spec.get("cite_product") and any(not s.startswith(spec["cite_product"]) for s, _ in cited):
        problems.append(f"cites a manual of another product than {spec['cite_product']}")
    insp = ctx.inspection or {}
    if kind == "manual":
        if insp.get("is_anomalous"):
            problems += [f"manual: {p}" for p in check_answer(answer, ctx)]
        elif insp:
            if _has_manual(answer):
                problems.append("a defect manual for a part scored normal")
            if not any(w in f" {low}" for w in NORMAL_WORDS):
                problems.append("does not say the part is normal")
        else:
            problems.append("the photo was not scored")
        if true_product and (result.product or ctx.product) != true_product:
            problems.append(f"product {result.product or ctx.product} instead of {true_product}")
    elif kind == "verdict":
        if not insp:
            problems.append("the photo was not scored")
        else:
            words = DEFECT_WORDS if insp.get("is_anomalous") else NORMAL_WORDS
            if not any(w in f" {low}" for w in words):
                problems.append(f"does not state the verdict ({'anomalous' if insp.get('is_anomalous') else 'normal'})")
        if _has_manual(answer) and not insp.get("is_anomalous"):
            problems.append("a defect manual for a part scored normal")
        if len(answer) > 1500:
            problems.append("not a short verdict")
    elif kind == "similar":
        if not ctx.search:
            problems.append("no similar-defect search")
        if not any(n in low for n in _defect_names()):
            problems.append("names no defect type")
        if _has_manual(answer):
            problems.append("a full manual instead of the similar cases")
    elif kind == "manual_question":
        if not cited:
            problems.append("no citation")
        if _has_manual(answer) and all(s in answer for s in SECTIONS):
            problems.append("a six-section manual for a question")
    elif kind == "followup":
        if _has_manual(answer) and all(s in answer for s in SECTIONS):
            problems.append("a six-section manual for a follow-up")
    elif kind == "capabilities":
        if called:
            problems.append(f"called tools {sorted(called)}")
        if not any(w in low for w in CAPABILITY_WORDS):
            problems.append("does not say what it can do")
        if len(answer) > 1200:
            problems.append("too long")
    elif kind == "offtopic":
        if called:
            problems.append(f"called tools {sorted(called)}")
        if cited:
            problems.append("cites manual pages")
        if len(answer) > 800:
            problems.append("too long")
        if not any(w in low for w in OFFTOPIC_WORDS):
            problems.append("does not say what it helps with (parts, defects, manuals)")
    if spec.get("mentions_any") and not any(str(m).lower() in low for m in spec["mentions_any"]):
        problems.append(f"mentions none of {spec['mentions_any']}")
    if _HANGUL.search(spec.get("question") or "") and not _HANGUL.search(answer.split("\n## Sources")[0]):
        problems.append("a Korean message answered without Korean")
    if not answer.strip():
        problems.append("empty answer")
    return problems


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 3) if b else None


def _aggregate(rows: list[dict]) -> dict:
    n = len(rows)
    if not n:
        return {"n": 0}
    tp = sum(r["tp"] for r in rows)
    fp = sum(r["fp"] for r in rows)
    fn = sum(r["fn"] for r in rows)
    mtp = sum(r["model_tp"] for r in rows)
    mfp = sum(r["model_fp"] for r in rows)
    mfn = sum(r["model_fn"] for r in rows)
    cites = sum(r["citations"] for r in rows)
    valid = sum(r["valid_citations"] for r in rows)
    times = [r["elapsed_s"] for r in rows]
    return {
        "n": n,
        "pass_rate": _ratio(sum(r["passed"] for r in rows), n),
        "pass_rate_incl_fallback": _ratio(sum(r["ok"] for r in rows), n),
        "tool_precision": _ratio(tp, tp + fp) if tp + fp else 1.0,
        "tool_recall": _ratio(tp, tp + fn) if tp + fn else 1.0,
        "model_tool_precision": _ratio(mtp, mtp + mfp) if mtp + mfp else 1.0,
        "model_tool_recall": _ratio(mtp, mtp + mfn) if mtp + mfn else 1.0,
        "citation_validity": _ratio(valid, cites) if cites else 1.0,
        "fallback_rate": _ratio(sum(r["fallback"] for r in rows), n),
        "latency_p50_s": round(statistics.median(times), 1),
        "latency_max_s": round(max(times), 1),
    }


def evaluate_chat(services: Services, half: str = "all", only: list[str] | None = None, agent=None,
                  path: Path = SCENARIOS_PATH) -> dict:
    """Run the chat scenarios (each conversation in a new session) and score every turn.

    Args:
        half: ``dev``, ``report`` or ``all``.
        only: run only these conversation ids.
        agent: a :class:`agent.agents.DefectAgent` (default: the process's).

    Returns:
        ``{"halves": {half: totals and "per_kind": {kind: totals}}, "all": totals, "turns": [per turn:
        conversation, turn, half, kind, question, image, tools, needs, passed, ok, problems, fallback,
        elapsed_s, answer (first 300 characters)]}``; totals: see :func:`_aggregate`.
    """
    data_dir = services.settings.data_dir
    convs = [c for c in load_scenarios(path) if (half == "all" or c.get("half") == half)
             and (not only or c["id"] in only)]
    rows = []
    for conv_spec in convs:
        conv = open_conversation(services, None, "eval", new=True)
        true_product = None
        for i, spec in enumerate(conv_spec["turns"]):
            image = str(data_dir / spec["image"]) if spec.get("image") else None
            if image:
                true_product = spec["image"].split("/")[0]
            ctx = start_turn(conv, image, spec.get("question") or "", spec.get("product"))
            known = {"anomaly_scoring"} if ctx.inspection else set()
            known |= {"similar_defect_search"} if ctx.search else set()
            result, _ = ask(services, conv, ctx, source="cli", agent=agent, owner="eval")
            needs = set(spec.get("needs") or [t for t in KIND_NEEDS[spec["kind"]] if t not in known])
            ok_steps = [s for s in result.steps if s.error is None]
            called = {s.tool for s in ok_steps}
            model_n = int((result.timings or {}).get("model_steps", len(result.steps)))
            model_called = {s.tool for s in result.steps[:model_n] if s.error is None}
            problems = check_turn_outcome(spec, result, ctx, true_product)
            cited = find_citations(result.answer or "")
            allowed = ctx.cited_pages()
            rows.append({
                "conversation": conv_spec["id"], "turn": i, "half": conv_spec.get("half"), "kind": spec["kind"],
                "question": spec.get("question") or "", "image": spec.get("image"),
                "tools": [s.tool for s in result.steps], "needs": sorted(needs),
                "tp": len(called & needs), "fp": len(called - needs), "fn": len(needs - called),
                "model_tp": len(model_called & needs), "model_fp": len(model_called - needs),
                "model_fn": len(needs - model_called),
                "citations": len(cited), "valid_citations": sum(c in allowed for c in cited),
                "ok": not problems, "passed": not problems and not result.fallback, "problems": problems,
                "fallback": bool(result.fallback), "fallback_reason": result.fallback_reason,
                "elapsed_s": round(float(result.elapsed_s), 2), "answer": (result.answer or "")[:300],
            })
    out: dict = {"halves": {}, "all": _aggregate(rows), "turns": rows}
    for h in sorted({r["half"] for r in rows}):
        sub = [r for r in rows if r["half"] == h]
        agg = _aggregate(sub)
        agg["per_kind"] = {k: _aggregate([r for r in sub if r["kind"] == k])
                           for k in sorted({r["kind"] for r in sub})}
        agg["conversations"] = len({r["conversation"] for r in sub})
        out["halves"][h] = agg
    return out


def evaluate_ask(services: Services, per_product: int = 2, split: str = "val") -> dict:
    """Run the agent on ``per_product`` defect photos of each fitted product (spread over the types).

    Detection and the agent's behaviour are reported apart: a photo that anomaly scoring calls NORMAL gets
    a NORMAL verdict and no defect type (the right behaviour for what the tools said, a detection miss),
    so ``defect_type_accuracy`` over all photos mixes the two.

    Args:
        services: the loaded services (banks, gallery, manuals, agent model).
        per_product: defect photos per product.
        split: ``"val"`` (the tuning split) or ``"unseen"`` (kept out of every fit, second defect generator).

    Returns:
        ``{"split", "n", "product_accuracy", "defect_type_accuracy", "all_tools_rate", "fallback_rate",
        "flagged_rate"`` (photos scored ANOMALOUS), ``"n_flagged", "defect_type_accuracy_flagged",
        "all_tools_rate_flagged"`` (over the flagged photos), ``"no_type_rate_unflagged"`` (NORMAL-scored
        photos answered without a defect type), ``"elapsed_s_p50", "elapsed_s_max", "runs": [...]}``.

    Raises:
        ValueError: an unknown split, or no defect photo of that split.
    """
    if split not in ("val", "unseen"):
        raise ValueError(f"unknown split {split!r} (val or unseen)")
    manifest = load_manifest(services.settings.data_dir)
    picked: list[dict] = []
    for product in services.banks.products():
        items = [it for it in manifest["items"]
                 if it["product"] == product and it["split"] == split and it["label"] == "defect"]
        by_type: dict[str, list[dict]] = {}
        for it in items:
            by_type.setdefault(it["defect_type"], []).append(it)
        order = [v[i] for i in range(max(map(len, by_type.values()), default=0))
                 for v in by_type.values() if i < len(v)]
        picked += order[:per_product]
    if not picked:
        raise ValueError(f"no defect photo in the {split} split of the fitted products")
    runs = []
    for it in picked:
        ctx = start_run(str(services.settings.data_dir / it["image"]))
        result, _ = ask(services, ctx, source="cli")
        tools_called = {s.tool for s in result.steps}
        insp = ctx.inspection or {}
        runs.append({"image": it["image"], "true_product": it["product"], "true_defect": it["defect_type"],
                     "product": result.product or ctx.product,
                     "defect_type": result.defect_type or ctx.reported_defect_type,
                     "flagged": bool(insp.get("is_anomalous")) if insp else None,
                     "fallback": result.fallback, "elapsed_s": round(result.elapsed_s, 2),
                     "all_tools": ALL_TOOLS <= tools_called, "citations": len(result.citations)})
    n = len(runs)
    flagged = [r for r in runs if r["flagged"]]
    unflagged = [r for r in runs if r["flagged"] is False]
    times = [r["elapsed_s"] for r in runs]

    def rate(rows: list[dict], ok) -> float | None:
        return round(sum(bool(ok(r)) for r in rows) / len(rows), 3) if rows else None

    return {
        "split": split,
        "n": n,
        "product_accuracy": rate(runs, lambda r: r["product"] == r["true_product"]),
        "defect_type_accuracy": rate(runs, lambda r: r["defect_type"] == r["true_defect"]),
        "all_tools_rate": rate(runs, lambda r: r["all_tools"]),
        "fallback_rate": rate(runs, lambda r: r["fallback"]),
        "flagged_rate": rate(runs, lambda r: r["flagged"]),
        "n_flagged": len(flagged),
        "defect_type_accuracy_flagged": rate(flagged, lambda r: r["defect_type"] == r["true_defect"]),
        "all_tools_rate_flagged": rate(flagged, lambda r: r["all_tools"]),
        "no_type_rate_unflagged": rate(unflagged, lambda r: r["defect_type"] is None),
        "elapsed_s_p50": round(statistics.median(times), 1) if times else None,
        "elapsed_s_max": round(max(times), 1) if times else None,
        "runs": runs,
    }
