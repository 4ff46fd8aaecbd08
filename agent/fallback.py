"""Deterministic fallback: the response manual written without the language model.

Used when the model fails (invalid tool calls, exception, timeout, max steps) or its
answer still fails :func:`agent.checks.check_answer` after one retry. It calls the
tools the model did not get to (anomaly scoring, similar-defect search, manual
retrieval — in that order, with the product and defect type found so far), then fills
the six sections from the tools' records in the run context: the verdict and regions
from ``ctx.inspection``, the defect type from ``ctx.search``, and causes / immediate
actions / prevention from the manual passages of those sections (``ctx.manual_hits``),
each item cited ``[file p.N]``. The manual states at the top that the fallback wrote
it, and why.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

from agent.checks import SECTIONS
from agent.types import AgentStep

_SECTION_KEYS = {"Likely causes": "cause", "Immediate actions": "action", "Prevention": "prevent"}
_BULLET = re.compile(r"^\s*(?:[-*+\u2022\u00b7]|\d+[.)])\s*")
_SENTENCE = re.compile(r"(?<=[.!?。])\s+")


def _tool_done(name: str, ctx: Any) -> bool:
    if name == "anomaly_scoring":
        return getattr(ctx, "inspection", None) is not None
    if name == "similar_defect_search":
        return getattr(ctx, "search", None) is not None
    return False


def _hits_for(ctx: Any, key: str) -> list[dict]:
    """Manual hits of one section kind, best first: matching defect and product preferred."""
    defect, product = getattr(ctx, "defect_type", None), getattr(ctx, "product", None)
    hits = [h for h in getattr(ctx, "manual_hits", []) or [] if key in str(h.get("section", "")).lower()]

    def rank(h: dict) -> tuple:
        return (
            0 if defect and h.get("defect") == defect else 1,
            0 if product and h.get("product") == product else 1,
            -float(h.get("score", 0.0) or 0.0),
        )

    return sorted(hits, key=rank)


def run_missing_tools(ctx: Any, tools: list) -> Iterator:
    """Call the tools the model did not call successfully; yield one ``AgentStep`` per call.

    Args:
        ctx: the run's ``RunContext`` (tools record their results in it).
        tools: the run's smolagents tools (looked up by name; missing ones are skipped).

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

    user_product = ctx.product if getattr(ctx, "product_source", None) == "user" else None
    for name in ("anomaly_scoring", "similar_defect_search"):
        if not _tool_done(name, ctx):
            step = call(name, product=user_product)
            if step is not None:
                yield step
    defect = getattr(ctx, "defect_type", None)
    label = defect or "defect"
    if any(not _hits_for(ctx, key) for key in _SECTION_KEYS.values()):
        step = call("manual_retrieval", query=f"{label} cause immediate action prevention",
                    product=ctx.product, defect_type=defect)
        if step is not None:
            yield step
        for title, key in _SECTION_KEYS.items():
            if not _hits_for(ctx, key):
                step = call("manual_retrieval", query=f"{label} {title.lower()}", product=ctx.product,
                            defect_type=defect)
                if step is not None:
                    yield step


# chunk headings written by the manual store ("3. Scratch (스크래치) — Prevention") are not claims
_CHUNK_HEADING = re.compile(r"^\d+\.\s.*\s[—-]\s*(Cause|Immediate action|Prevention|General|원인|즉시 조치|예방)\s*$")


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


def write_manual(ctx: Any, reason: str) -> str:
    """The response manual (markdown, the six sections of :data:`agent.checks.SECTIONS`) from ``ctx``.

    Args:
        ctx: the run's ``RunContext`` after the tools ran.
        reason: why the fallback was used (shown at the top of the manual).

    Returns:
        Markdown; every cause / action / prevention item cites ``[file p.N]`` of a
        passage that manual retrieval returned in this run.
    """
    insp = getattr(ctx, "inspection", None) or {}
    search = getattr(ctx, "search", None) or {}
    product = getattr(ctx, "product", None) or insp.get("product") or search.get("product") or "unknown"
    source = getattr(ctx, "product_source", None)
    defect = getattr(ctx, "defect_type", None) or search.get("defect_type")
    lines = [f"> Written by the deterministic fallback (no language model): {reason}", ""]

    lines.append(f"## {SECTIONS[0]}")
    prod_note = " (inferred from the nearest gallery images)" if source == "inferred" else (
        " (given by the user)" if source == "user" else "")
    if defect:
        votes, k = search.get("votes"), len(search.get("hits") or [])
        vote_note = f" (majority of similar past defects: {votes}/{k})" if votes and k else ""
        defect_line = f"Defect type: **{defect}**{vote_note}."
    else:
        defect_line = "Defect type: **unknown** (similar-defect search gave no result)."
    lines.append(f"Product: **{product}**{prod_note}. {defect_line}")
    if insp:
        verdict = "ANOMALOUS" if insp.get("is_anomalous") else "NORMAL"
        rel = "above" if insp.get("is_anomalous") else "below"
        lines.append(f"Verdict: **{verdict}**: PatchCore anomaly score {insp.get('score'):.3f} is {rel} "
                     f"the threshold {insp.get('threshold'):.3f}.")
    else:
        lines.append("Verdict: unknown (anomaly scoring failed).")
    lines.append("")

    lines.append(f"## {SECTIONS[1]}")
    regions = insp.get("regions") or []
    if regions:
        size = f" in the {insp.get('width')}x{insp.get('height')} px photo" if insp.get("width") else ""
        for i, r in enumerate(regions[:3]):
            lines.append(f"- Region {i + 1}: bounding box {list(r['bbox'])} (x0, y0, x1, y1 px){size}, "
                         f"{100 * float(r['area_frac']):.1f}% of the image, peak anomaly {float(r['peak']):.2f}.")
    elif insp:
        lines.append("- No region exceeds the anomaly threshold.")
    else:
        lines.append("- Unknown (anomaly scoring failed).")
    lines.append("")

    cited: list[tuple[str, int]] = []
    for title, key in _SECTION_KEYS.items():
        lines.append(f"## {title}")
        hits = _hits_for(ctx, key)[:2]
        items = []
        for h in hits:
            ref = (h["source"], int(h["page"]))
            for claim in _items(h.get("text", "")):
                items.append(f"- {claim} [{ref[0]} p.{ref[1]}]")
            if ref not in cited:
                cited.append(ref)
        lines.extend(items[:4] or [f"- No manual passage for this section was retrieved"
                                   f" for {defect or 'this defect'} on {product}."])
        lines.append("")

    lines.append(f"## {SECTIONS[5]}")
    lines.extend([f"- {s} p.{p}" for s, p in cited] or ["- none retrieved"])
    return "\n".join(lines).rstrip() + "\n"
