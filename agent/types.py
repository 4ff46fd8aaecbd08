"""Typed events and results of an agent turn (shared by the loop, the fallback and the edges).

:meth:`agent.agents.DefectAgent.stream` yields, in order of occurrence: :class:`ToolStarted` (the
model has named a tool it is about to call), :class:`AgentStep` (a tool call finished),
:class:`AnswerDelta` (the answer so far, while it is written), and last one :class:`AgentResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ToolStarted:
    """The model's output names a tool call (the call is still being written or run).

    Attributes:
        tool: tool name. index: position of the call in this turn (0-based).
        elapsed_s: seconds since the turn started.
    """

    tool: str
    index: int
    elapsed_s: float


@dataclass
class AnswerDelta:
    """The answer as shown so far (markdown; citations expanded); replaces the previous one.

    Attributes:
        text: the whole answer so far (not only the new part).
        restart: the answer was started again (an answer check asked the model to redo it).
        elapsed_s: seconds since the turn started.
    """

    text: str
    restart: bool = False
    elapsed_s: float = 0.0


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
        kind: the message kind (:data:`agent.policy.KINDS`) the checks and the fallback used.
        form: ``"manual"`` (six-section response manual) or ``"text"`` (a short answer).
        raw_answer: what the model wrote (labels ``[P<n>]`` not expanded; "" when the fallback wrote it).
        messages: the model's view of the turn after its user message (``{"role", "content"}``:
            tool-call lists, observations, the answer), kept as the conversation's memory.
        timings: seconds from the start of the turn: ``first_tool_s`` (a tool named),
            ``tools_done_s`` (last tool finished), ``first_answer_s`` (first answer text shown),
            ``first_model_token_s`` (first answer text the model wrote), ``total_s``; plus
            ``prompt_tokens`` / ``reused_tokens`` of each generation.
        cancelled: the user stopped the turn (the answer is what was written until then).
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
    kind: str = "manual"
    form: str = "manual"
    raw_answer: str = ""
    messages: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    cancelled: bool = False

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
            "kind": self.kind,
            "form": self.form,
        }
