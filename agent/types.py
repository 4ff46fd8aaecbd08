"""Typed steps and results of an agent run (shared by the loop, the fallback and the edges)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AgentStep:
    """One tool call of a run.

    Attributes:
        tool: tool name (``"invalid_tool_call"`` when the model output was not a valid call).
        arguments: the call's arguments.
        observation: what the tool returned to the model ("" on error).
        duration_s: wall time of the tool call in seconds.
        error: error message when the call failed, else None.
    """

    tool: str
    arguments: dict
    observation: str
    duration_s: float
    error: str | None = None

    def to_json(self) -> dict:
        """``{"tool", "arguments", "observation", "duration_s", "error"}`` (the one step format of every edge)."""
        return {"tool": self.tool, "arguments": dict(self.arguments or {}), "observation": self.observation,
                "duration_s": round(float(self.duration_s or 0.0), 3), "error": self.error}


@dataclass
class AgentResult:
    """Outcome of one run.

    Attributes:
        steps: tool calls in order (the model's, then the fallback's if any).
        answer: the response manual (markdown).
        citations: ``[{"source": file, "page": 1-based page}]`` cited in ``answer``, in order.
        model: display name of the model (e.g. ``"llamacpp:qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"``).
        elapsed_s: wall time of the run in seconds.
        fallback: True when :mod:`agent.fallback` wrote the answer.
        fallback_reason: why (None when the model's answer passed the checks).
        product: product id (given or inferred), or None.
        defect_type: defect type id found by similar-defect search, or None.
    """

    steps: list[AgentStep]
    answer: str
    citations: list[dict]
    model: str
    elapsed_s: float
    fallback: bool
    fallback_reason: str | None
    product: str | None
    defect_type: str | None

    def to_dict(self) -> dict:
        """JSON-friendly dict of the run (steps, answer, citations, model, timing, fallback, labels)."""
        return {
            "steps": [s.to_json() for s in self.steps],
            "answer": self.answer,
            "citations": self.citations,
            "model": self.model,
            "elapsed_s": round(self.elapsed_s, 2),
            "fallback": self.fallback,
            "fallback_reason": self.fallback_reason,
            "product": self.product,
            "defect_type": self.defect_type,
        }
