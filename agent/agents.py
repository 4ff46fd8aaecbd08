"""The defect response agent: a smolagents ``ToolCallingAgent`` run with checks and a fallback.

Why ``ToolCallingAgent`` and not ``CodeAgent``: the offline model is a 1.5B model on a
2-core CPU. Asked for JSON tool calls it can be *grammar-constrained* (llama.cpp
JSON-schema grammar, see :mod:`agent.models`), so every step is a syntactically valid
call of an existing tool with schema-valid arguments; writing Python instead would
need a code sandbox and fails far more often at this size (syntax errors, invented
helpers), and each failed step costs tens of seconds here.

One run (:meth:`DefectAgent.stream`):

1. the model calls tools (anomaly scoring, similar-defect search, manual retrieval;
   the photo is implicit in the run context) and ends with ``final_answer`` — the
   response manual in markdown with six fixed sections and ``[file p.N]`` citations;
2. :func:`agent.checks.check_answer` verifies the manual; on problems the model gets
   them back once (smolagents ``final_answer_checks``) and retries;
3. if it still fails, or the model fails (invalid tool calls, exception, timeout
   ``settings.agent_timeout_s``, max steps), :mod:`agent.fallback` writes the manual
   deterministically from the tools' records and says so at the top.

Prompts are YAML (``agent/prompts/toolcalling_agent.yaml``) layered over smolagents'
default ``toolcalling_agent.yaml``.
"""

from __future__ import annotations

import importlib.resources
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from smolagents import Model, ToolCallingAgent
from smolagents.agents import ToolOutput, populate_template
from smolagents.memory import ActionStep, FinalAnswerStep, ToolCall
from smolagents.monitoring import LogLevel
from smolagents.utils import AgentError, AgentMaxStepsError

from agent.checks import check_answer, complete_sources, find_citations, manual_pattern
from agent.fallback import run_missing_tools, write_manual
from agent.models import GenerationTimeout, get_agent_model
from agent.types import AgentResult, AgentStep
from core import catalog
from core.settings import Settings, get_settings
from services.container import get_services
from tools import build_tools

if TYPE_CHECKING:  # pragma: no cover
    from smolagents import Tool

    from tools.context import RunContext

PROMPTS_PATH = Path(__file__).resolve().parent / "prompts" / "toolcalling_agent.yaml"
_EXTRA_PROMPT_KEYS = ("task", "answer_problems")


def load_prompts(path: Path = PROMPTS_PATH) -> tuple[dict, dict]:
    """smolagents' default ToolCallingAgent templates overridden by our YAML.

    Returns:
        ``(prompt_templates for ToolCallingAgent, extra templates {"task", "answer_problems"})``.
    """
    base = yaml.safe_load(
        importlib.resources.files("smolagents.prompts").joinpath("toolcalling_agent.yaml").read_text()
    )
    ours = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    extra = {k: ours.pop(k) for k in _EXTRA_PROMPT_KEYS if k in ours}
    for key, value in ours.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base, extra


class _DefectToolCallingAgent(ToolCallingAgent):
    """ToolCallingAgent that raises at max steps instead of asking the model for a free-text answer
    (that extra generation would cost a minute on a 2-core CPU; the fallback is better)."""

    def _handle_max_steps_reached(self, task: str) -> Any:
        raise AgentMaxStepsError(f"reached max steps ({self.max_steps}) without a final answer", self.logger)


class _ToolView:
    """What a model sees of a tool for one step: name, description and a narrowed input schema."""

    def __init__(self, tool, inputs: dict):
        self.name, self.description, self.inputs = tool.name, tool.description, inputs
        self.output_type = getattr(tool, "output_type", "string")


def _known(kind: str) -> list[str]:
    try:
        return list(catalog.products()) if kind == "product" else list(catalog.defect_types())
    except Exception:  # catalog unavailable: no enum, the tool checks the value
        return []


class _RunModel(Model):
    """Per-run view of the agent's model: deadline and tool gating for every generation.

    Deadline: passed to ``generate`` for backends that support it (``supports_deadline``,
    e.g. :class:`agent.models.LlamaCppModel`, which stops mid-generation); checked
    before each call for all.

    Tool gating (what a small model cannot get wrong is not left to it): at each step
    the model is offered only the tools that can still help, with narrowed arguments:

    - ``anomaly_scoring`` / ``similar_defect_search``: until each has succeeded once (the
      photo does not change);
    - ``manual_retrieval``: once similar-defect search ran (the query needs the defect
      type), at most twice;
    - ``final_answer``: once manual retrieval returned citable passages (or when
      nothing else is left);
    - ``product`` arguments: offered only when the user's question names a catalog
      product and the run does not know the product yet (a text-only model cannot see
      the photo, so any other product it names is a guess); ``defect_type`` restricted
      to the taxonomy ids; ``k`` of similar-defect search left to ``settings.search_k``
      (the model tends to ask for 1, too few for a majority vote);
    - ``final_answer``'s ``answer``: constrained by :func:`agent.checks.manual_pattern`
      (six sections in order, summary naming the product and defect type, every item
      ending with a citation of a page retrieved in this run) for backends that honour
      JSON-schema ``pattern`` (llama.cpp grammars).

    The model still chooses the order, the arguments (query, k) and writes the manual.
    """

    def __init__(self, inner: Model, deadline: float, ctx: Any = None):
        super().__init__(model_id=getattr(inner, "model_id", None))
        self.inner, self.deadline, self.ctx = inner, deadline, ctx

    def gate_tools(self, tools: list) -> list:
        """The tools (as :class:`_ToolView`) offered at this step; see the class docstring."""
        ctx = self.ctx
        if ctx is None or not tools:
            return tools
        called = list(getattr(ctx, "tool_calls", []) or [])
        done = {"anomaly_scoring": getattr(ctx, "inspection", None) is not None,
                "similar_defect_search": getattr(ctx, "search", None) is not None}
        offered = []
        for tool in tools:
            name = tool.name
            if name in done and done[name]:
                continue
            if name == "manual_retrieval" and (
                ("similar_defect_search" in {t.name for t in tools} and not done["similar_defect_search"]
                 and not getattr(ctx, "defect_type", None))
                or called.count(name) >= 2
            ):
                continue
            if name == "final_answer" and not getattr(ctx, "manual_hits", None):
                continue
            inputs = {}
            for key, spec in tool.inputs.items():
                spec = dict(spec)
                if key == "product":
                    # a text-only model cannot see the photo: a product it names is a guess,
                    # unless the user's question names one
                    named = [p for p in _known("product") if p in str(getattr(ctx, "question", "") or "").lower()]
                    if getattr(ctx, "product", None) or not named:
                        continue
                    spec["enum"] = named
                elif key == "k" and name == "similar_defect_search":
                    continue  # the model tends to ask for k=1: a vote needs the configured k
                elif key == "defect_type" and _known("defect"):
                    spec["enum"] = _known("defect")
                elif name == "final_answer" and key == "answer":
                    pattern = manual_pattern(ctx)
                    if pattern:
                        spec = {"type": "string", "description": spec.get("description", ""), "pattern": pattern}
                inputs[key] = spec
            offered.append(_ToolView(tool, inputs))
        if not offered:
            offered = [_ToolView(t, t.inputs) for t in tools if t.name == "final_answer"] or tools
        return offered

    def generate(self, messages, stop_sequences=None, response_format=None, tools_to_call_from=None, **kwargs):
        if time.monotonic() > self.deadline:
            raise GenerationTimeout("agent deadline passed")
        if getattr(self.inner, "supports_deadline", False):
            kwargs["deadline"] = self.deadline
        if tools_to_call_from:
            tools_to_call_from = self.gate_tools(tools_to_call_from)
        return self.inner.generate(messages, stop_sequences=stop_sequences, response_format=response_format,
                                   tools_to_call_from=tools_to_call_from, **kwargs)

    def parse_tool_calls(self, message):
        return self.inner.parse_tool_calls(message)


class DefectAgent:
    """Runs the defect response agent for one photo (a ``RunContext``) at a time.

    Args:
        tools_factory: ``factory(ctx) -> list[Tool]``: the tools bound to a run context
            (e.g. ``lambda ctx: tools.build_tools(ctx, services)``).
        model: a smolagents ``Model``; default: :func:`agent.models.get_agent_model`
            (loaded on first use).
        settings: settings (max steps, timeout, ...); default ``get_settings()``.
    """

    def __init__(
        self,
        tools_factory: Callable[["RunContext"], list["Tool"]],
        model: Model | None = None,
        settings: Settings | None = None,
    ):
        self.tools_factory = tools_factory
        self.settings = settings or get_settings()
        self._model = model
        self._model_name = (getattr(model, "model_id", None) or type(model).__name__) if model is not None else None
        self.prompt_templates, self.extra_prompts = load_prompts()

    def _resolve_model(self) -> tuple[Model, str]:
        if self._model is None:
            self._model, self._model_name = get_agent_model(self.settings)
        return self._model, self._model_name

    @property
    def model_name(self) -> str:
        """Display name of the model ("" before it is loaded)."""
        return self._model_name or ""

    def task_text(self, ctx: "RunContext") -> str:
        """The task message of a run (product if the user gave one, question)."""
        return populate_template(
            self.extra_prompts["task"],
            variables={
                "product": getattr(ctx, "product", None),
                "product_source": getattr(ctx, "product_source", None),
                "question": getattr(ctx, "question", None),
            },
        )

    def run(self, ctx: "RunContext") -> AgentResult:
        """Run to the end; returns the final :class:`AgentResult`."""
        result = None
        for item in self.stream(ctx):
            result = item
        assert isinstance(result, AgentResult)
        return result

    def stream(self, ctx: "RunContext") -> Iterator[AgentStep | AgentResult]:
        """Yield each tool step as it finishes, then the final :class:`AgentResult`.

        Never raises for model failures: they lead to the fallback, whose reason is in
        ``AgentResult.fallback_reason``. Tool errors appear as steps with ``error`` set.
        """
        t0 = time.monotonic()
        tools = self.tools_factory(ctx)
        steps: list[AgentStep] = []
        answer: str | None = None
        reason: str | None = None
        try:
            model, name = self._resolve_model()
        except Exception as exc:  # missing weights, llama.cpp not installed, ...
            model, name = None, f"{self.settings.agent_backend}:unavailable"
            reason = f"the model could not be loaded ({type(exc).__name__}: {exc})"

        if model is not None:
            answer, reason = yield from self._model_run(ctx, tools, model, steps, t0)

        fallback = reason is not None
        if fallback:
            for step in run_missing_tools(ctx, tools):
                steps.append(step)
                yield step
            answer = write_manual(ctx, reason)
        citations = [{"source": s, "page": p} for s, p in find_citations(answer or "")]
        yield AgentResult(
            steps=steps,
            answer=answer or "",
            citations=citations,
            model=(name or self.model_name) + (" + deterministic fallback" if fallback else ""),
            elapsed_s=time.monotonic() - t0,
            fallback=fallback,
            fallback_reason=reason,
            product=getattr(ctx, "product", None),
            defect_type=getattr(ctx, "defect_type", None),
        )

    # ------------------------------------------------------------------ internals
    def _problems(self, answer: Any, ctx: "RunContext") -> list[str]:
        problems = []
        called = set(getattr(ctx, "tool_calls", []) or [])
        if not getattr(ctx, "product", None):
            problems.append("the product is unknown: call anomaly_scoring or similar_defect_search first")
        if not getattr(ctx, "defect_type", None) and "similar_defect_search" not in called:
            problems.append("the defect type is unknown: call similar_defect_search first")
        if not getattr(ctx, "manual_hits", None):
            problems.append("no manual passages retrieved: call manual_retrieval first")
        return problems + check_answer(answer, ctx)

    def _model_run(self, ctx, tools, model, steps: list[AgentStep], t0: float):
        """Generator: yields AgentSteps of the model's run; returns ``(answer | None, fallback reason | None)``."""
        settings = self.settings
        state = {"failures": 0, "problems": []}
        template = self.extra_prompts["answer_problems"]

        def manual_check(final_answer, memory, agent=None) -> bool:
            problems = self._problems(complete_sources(str(final_answer)), ctx)
            state["problems"] = problems
            if not problems:
                return True
            state["failures"] += 1
            if state["failures"] >= 2:  # second failure: accept, the caller falls back
                return True
            raise ValueError(populate_template(template, variables={"problems": "; ".join(problems)}))

        deadline = t0 + settings.agent_timeout_s
        agent = _DefectToolCallingAgent(
            tools=tools,
            model=_RunModel(model, deadline, ctx),
            prompt_templates=self.prompt_templates,
            max_steps=settings.agent_max_steps,
            final_answer_checks=[manual_check],
            verbosity_level=LogLevel.OFF,
            step_callbacks=[_overlay_callback(ctx)] if getattr(model, "accepts_images", False) else None,
        )
        pending: dict[str, tuple[ToolCall, float]] = {}
        answer, errors = None, 0
        try:
            for event in agent.run(self.task_text(ctx), stream=True, images=_task_images(ctx, model)):
                if isinstance(event, ToolCall):
                    pending[event.id] = (event, time.perf_counter())
                elif isinstance(event, ToolOutput):
                    call, started = pending.pop(event.id, (event.tool_call, time.perf_counter()))
                    if not event.is_final_answer:
                        step = AgentStep(tool=call.name, arguments=dict(call.arguments or {}),
                                         observation=event.observation, duration_s=time.perf_counter() - started)
                        steps.append(step)
                        yield step
                elif isinstance(event, ActionStep) and event.error is not None:
                    errors += 1
                    if pending:
                        for call, started in pending.values():
                            step = AgentStep(tool=call.name,
                                             arguments=dict(call.arguments) if isinstance(call.arguments, dict) else
                                             {"raw": str(call.arguments)},
                                             observation="", duration_s=time.perf_counter() - started,
                                             error=str(event.error))
                            steps.append(step)
                            yield step
                        pending.clear()
                    else:
                        checked = "manual_check" in str(event.error)  # answer check failed: the model retries
                        step = AgentStep(tool="final_answer" if checked else "invalid_tool_call", arguments={},
                                         observation="", duration_s=0.0, error=str(event.error))
                        steps.append(step)
                        yield step
                    if errors > 2:
                        return None, f"the model failed {errors} steps (last: {str(event.error)[:300]})"
                elif isinstance(event, FinalAnswerStep):
                    answer = event.output
                if answer is None and time.monotonic() > deadline:
                    return None, f"timeout: the model did not finish within {settings.agent_timeout_s:.0f} s"
        except AgentMaxStepsError:
            return None, f"the model reached the maximum of {settings.agent_max_steps} steps without a valid answer"
        except AgentError as exc:
            cause = exc.__cause__
            if cause is not None and isinstance(cause, TimeoutError):
                return None, f"timeout: the model did not finish within {settings.agent_timeout_s:.0f} s"
            if cause is not None and type(cause).__name__ == "ToolCallTruncated":
                return None, f"the model's output was cut: {cause}"
            return None, f"the model failed: {type(exc).__name__}: {str(exc)[:300]}"
        except Exception as exc:  # tool or model crash outside smolagents' handling
            return None, f"the model run failed: {type(exc).__name__}: {str(exc)[:300]}"
        if answer is None:
            return None, "the model gave no final answer"
        answer = complete_sources(str(answer))
        problems = self._problems(answer, ctx)
        if problems:
            return None, "the model's manual failed the checks after one retry: " + "; ".join(problems)
        return answer, None


def _task_images(ctx, model) -> list | None:
    """The photo as a PIL image on the task message, for models that see images (``accepts_images``)."""
    if not getattr(model, "accepts_images", False) or getattr(ctx, "image", None) is None:
        return None
    from PIL import Image

    return [Image.fromarray(ctx.image).convert("RGB")]


def _overlay_callback(ctx):
    """smolagents step callback: after the anomaly-scoring step, attach the overlay PNG to that
    step's observation images, so a vision model sees it once (in that step's messages only)."""
    sent: set[str] = set()

    def attach_overlay(step, agent=None) -> None:
        overlay = (getattr(ctx, "inspection", None) or {}).get("overlay")
        if not isinstance(step, ActionStep) or not overlay or overlay in sent or not Path(overlay).is_file():
            return
        from PIL import Image

        with Image.open(overlay) as im:
            step.observations_images = [*(step.observations_images or []), im.convert("RGB")]
        sent.add(overlay)

    return attach_overlay


_DEFAULT_AGENT: DefectAgent | None = None
_DEFAULT_LOCK = threading.Lock()


def get_default_agent() -> DefectAgent:
    """The process's agent, created on first call (thread-safe; the model loads once).

    Its tools are bound per run to the run's context and to :func:`services.container.get_services`,
    resolved at run time so that a changed ``DRA_STATE_DIR`` is honoured.
    """
    global _DEFAULT_AGENT
    with _DEFAULT_LOCK:
        if _DEFAULT_AGENT is None:
            _DEFAULT_AGENT = DefectAgent(tools_factory=lambda ctx: build_tools(ctx, get_services()))
        return _DEFAULT_AGENT


def loaded_default_agent() -> DefectAgent | None:
    """The default agent if it was already created, else None (never loads a model)."""
    return _DEFAULT_AGENT


def reset_default_agent() -> None:
    """Drop the default agent; the next :func:`get_default_agent` builds it from the current settings."""
    global _DEFAULT_AGENT
    with _DEFAULT_LOCK:
        _DEFAULT_AGENT = None
