"""The defect response chat agent: a smolagents ``ToolCallingAgent`` that converses and decides.

One turn (:meth:`DefectAgent.stream`) answers one message of a conversation. The model reads the
system prompt, the conversation so far (:class:`agent.memory.Conversation`: earlier questions,
its tool calls, the short observations and its answers) and the new message, and decides:
reply with a list of tool calls (several in one generation run in order: smolagents' parallel
tool calls with one worker), or answer. It may call tools again after their observations and
stops when it answers. :mod:`agent.policy` keeps a small model safe (offered tools, argument
enums, a grammar for the answer, a photo is looked at before it is answered), :mod:`agent.checks`
checks the answer by the kind of message (one retry with the problems stated), and
:mod:`agent.fallback` answers deterministically when the model fails.

Why ``ToolCallingAgent`` and not ``CodeAgent``: the offline model is a 1.5B model on a 2-core
CPU. Its output is constrained by a llama.cpp grammar (:class:`agent.models.ChatGrammar`): a
schema-valid call list of offered tools, or an answer; writing Python instead would need a
sandbox and fails far more often at this size, and each failed step costs seconds here.

Streaming: the model streams (``generate_stream``, llama.cpp in a worker thread); the turn
yields :class:`agent.types.ToolStarted` as soon as the model has named a tool,
:class:`agent.types.AgentStep` when a call finished, :class:`agent.types.AnswerDelta` while the
answer is written (for a response manual the code-written summary and location come first, then
the model's items), and the :class:`agent.types.AgentResult`. A ``threading.Event`` passed as
``cancel`` stops the generation within a token (the chat's stop button).

Prompts are YAML (``agent/prompts/toolcalling_agent.yaml``) layered over smolagents' defaults.
"""

from __future__ import annotations

import importlib.resources
import io
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from PIL import Image
from rich.console import Console
from smolagents import Model, ToolCallingAgent
from smolagents.agents import ToolOutput, populate_template
from smolagents.memory import ActionStep, FinalAnswerStep, ToolCall
from smolagents.models import (
    ChatMessage,
    ChatMessageStreamDelta,
    ChatMessageToolCall,
    ChatMessageToolCallFunction,
    ChatMessageToolCallStreamDelta,
    MessageRole,
    agglomerate_stream_deltas,
)
from smolagents.monitoring import AgentLogger, LogLevel
from smolagents.utils import AgentError, AgentMaxStepsError

from agent.answers import render_answer
from agent.checks import check_turn, find_citations, required_tools
from agent.fallback import run_missing_tools, write_answer
from agent.models import ChatGrammar, GenerationCancelled, GenerationTimeout, get_agent_model
from agent.policy import answer_form, answer_gbnf, classify, offered_tools
from agent.types import AgentResult, AgentStep, AnswerDelta, ToolStarted
from core.settings import Settings, get_settings
from services.container import get_services
from tools import TOOL_CLASSES, RegisterCorrectionTool, build_tools

if TYPE_CHECKING:  # pragma: no cover
    from smolagents import Tool

    from tools.context import RunContext

PROMPTS_PATH = Path(__file__).resolve().parent / "prompts" / "toolcalling_agent.yaml"
_EXTRA_PROMPT_KEYS = ("turn", "answer_problems")
#: every tool the system prompt describes (the same text for every conversation, so its KV cache is reused)
PROMPT_TOOLS = (*TOOL_CLASSES, RegisterCorrectionTool)
#: most generated tokens of one step (a call list, or an answer: a manual's items or a short reply)
STEP_MAX_TOKENS = 360
_NAME_RE = re.compile(r'"name"\s*:\s*"([A-Za-z_]+)"')


def load_prompts(path: Path = PROMPTS_PATH) -> tuple[dict, dict]:
    """smolagents' default ToolCallingAgent templates overridden by our YAML.

    Returns:
        ``(prompt_templates for ToolCallingAgent, extra templates {"turn", "answer_problems"})``.
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


def known_facts(ctx: "RunContext") -> str:
    """What the conversation already knows, in one line for the turn message (a small model then does not
    call tools again for it): the photo's verdict and defect type, the passages retrieved so far."""
    parts = []
    insp = ctx.inspection or {}
    if ctx.has_photo and not ctx.new_photo and insp:
        verdict = "ANOMALOUS" if insp.get("is_anomalous") else "NORMAL"
        parts.append(f"photo {insp.get('product')} {verdict} (score {float(insp['score']):.2f} vs "
                     f"{float(insp['threshold']):.2f})")
    if ctx.has_photo and not ctx.new_photo and ctx.search and ctx.reported_defect_type:
        parts.append(f"defect type {ctx.reported_defect_type}")
    if ctx.passages:
        groups: dict[str, list[str]] = {}
        for p in ctx.passages:
            what = " ".join(x for x in (p.get("product"), p.get("defect")) if x) or p["source"]
            groups.setdefault(what, []).append(f"{p['label']} {p.get('section') or ''}".strip())
        parts.append("passages " + "; ".join(f"{k}: {', '.join(v)}" for k, v in groups.items()))
    return "; ".join(parts)


class _PromptTool:
    """Name and description of a tool class for the system prompt."""

    def __init__(self, cls):
        self.name, self.description, self.inputs = cls.name, cls.description, cls.inputs


def system_prompt(templates: dict) -> str:
    """The system prompt: the same for every conversation (all tools described; which ones may be called
    is decided per step by the grammar)."""
    tools = {cls.name: _PromptTool(cls) for cls in PROMPT_TOOLS}
    return populate_template(templates["system_prompt"],
                             variables={"tools": tools, "managed_agents": {}, "custom_instructions": None})


def _text(content) -> str:
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content or "")


def _message(role: str, text: str, images: list | None = None) -> ChatMessage:
    """A smolagents message: image parts (PIL images) first, then the text."""
    parts = [{"type": "image", "image": im} for im in images or []]
    return ChatMessage(role=MessageRole(role), content=parts + [{"type": "text", "text": text}])


def _error_text(error) -> str:
    msg = str(error)
    msg = re.sub(r"^Check \w+ failed with error: ", "", msg)
    return msg.strip()[:600]


def step_messages(step: ActionStep, final: bool = False) -> list[dict]:
    """The model's view of one step: its output, then the observation or the error (``{"role", "content"}``)."""
    out = []
    if step.model_output:
        out.append({"role": "assistant", "content": _text(step.model_output).strip()})
    if step.error is not None:
        out.append({"role": "user", "content": f"Error: {_error_text(step.error)}"})
    elif step.tool_calls and not final and step.observations is not None and not step.is_final_answer:
        out.append({"role": "user", "content": f"Observation:\n{step.observations}"})
    return out


class _ChatToolCallingAgent(ToolCallingAgent):
    """ToolCallingAgent of one turn: the conversation in its messages, a constant system prompt, and
    an error instead of a free-text answer at max steps (the fallback is better and faster)."""

    def __init__(self, *args, history: list[dict], turn_text: str, system_text: str, photo: list | None = None,
                 **kwargs):
        self._history, self._turn_text, self._system_text = history, turn_text, system_text
        self._photo = list(photo or [])
        super().__init__(*args, **kwargs)

    def initialize_system_prompt(self) -> str:
        return self._system_text

    def write_memory_to_messages(self, summary_mode: bool = False) -> list[ChatMessage]:
        """System prompt, the conversation, this turn's message (with the photo for a model that sees
        images) and this turn's steps (an observation carries the overlay image once, see
        :func:`_overlay_callback`)."""
        msgs = [_message("system", self._system_text)]
        msgs += [_message(m["role"], m["content"]) for m in self._history]
        msgs.append(_message("user", self._turn_text, images=self._photo))
        for step in self.memory.steps:
            if isinstance(step, ActionStep):
                parts = step_messages(step)
                for i, m in enumerate(parts):
                    images = step.observations_images if m["content"].startswith("Observation:") else None
                    msgs.append(_message(m["role"], m["content"], images=images))
        return msgs

    def _handle_max_steps_reached(self, task: str) -> Any:
        raise AgentMaxStepsError(f"reached max steps ({self.max_steps}) without a final answer", self.logger)


class _TurnModel(Model):
    """The model as the agent sees it during one turn: per-step grammar, deadline, cancel, timings.

    For backends with chat grammars (:class:`agent.models.LlamaCppModel`) each step offers the
    tools of :func:`agent.policy.offered_tools` and the answer shape of
    :func:`agent.policy.answer_form` as one grammar; other backends (Qwen2-VL, OpenAI-compatible
    servers) get the offered tools plus ``final_answer``. A plain-text reply becomes a
    ``final_answer`` call (:meth:`parse_tool_calls`).
    """

    def __init__(self, inner: Model, ctx, tools: list, deadline: float, cancel: threading.Event | None,
                 timings: dict, max_calls: int = 3, kind: str | None = None):
        super().__init__(model_id=getattr(inner, "model_id", None))
        self.inner, self.ctx, self.tools, self.kind = inner, ctx, tools, kind
        self.deadline, self.cancel, self.timings = deadline, cancel, timings
        self.rounds = 0
        self.max_calls = max_calls
        self.form = "text"
        self.needs_evidence: list[str] = []  # tools the answer checks found missing: the next step calls them
        self.chat = bool(getattr(inner, "supports_chat_grammar", False))

    def step_grammar(self) -> ChatGrammar:
        """The grammar of the next step (tools offered, answer allowed and its shape)."""
        ctx = self.ctx
        self.form = answer_form(ctx, self.kind)
        views = self.views()
        # a new photo is looked at first; an answer that lacked evidence is followed by a call of what it lacked
        must_call = bool(views) and ((ctx.new_photo and self.rounds == 0) or bool(self.needs_evidence))
        self.needs_evidence = []
        return ChatGrammar(tools=views, answer_gbnf=None if must_call else answer_gbnf(ctx, self.form),
                           max_calls=self.max_calls)

    def views(self) -> list:
        """The tools offered at this step (:func:`agent.policy.offered_tools`; none once the answer is a manual)."""
        if self.form == "manual":
            return []
        return offered_tools(self.tools, self.ctx, self.rounds, only=self.needs_evidence or None)

    def _check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise GenerationCancelled("stopped by the user")
        if time.monotonic() > self.deadline:
            raise GenerationTimeout("agent deadline passed")

    def _on_prompt(self, n_prompt: int, reused: int) -> None:
        self.timings.setdefault("prompt_tokens", []).append(int(n_prompt))
        self.timings.setdefault("reused_tokens", []).append(int(reused))

    def generate_stream(self, messages, stop_sequences=None, response_format=None, tools_to_call_from=None,
                        **kwargs) -> Iterator[ChatMessageStreamDelta]:
        self._check()
        if self.chat:
            grammar = self.step_grammar()
            calls = False
            for delta in self.inner.generate_stream(
                    messages, stop_sequences=stop_sequences, chat_grammar=grammar, deadline=self.deadline,
                    cancel=self.cancel, on_prompt=self._on_prompt,
                    max_tokens=min(STEP_MAX_TOKENS, int(getattr(self.inner, "max_tokens", STEP_MAX_TOKENS)))):
                calls = calls or bool(delta.tool_calls)
                yield delta
            if calls:
                self.rounds += 1
            return
        self.form = answer_form(self.ctx, self.kind)
        views = self.views()
        self.needs_evidence = []
        final = [t for t in (tools_to_call_from or []) if t.name == "final_answer"]
        kw = {"deadline": self.deadline} if getattr(self.inner, "supports_deadline", False) else {}
        msg = self.inner.generate(messages, stop_sequences=stop_sequences, response_format=response_format,
                                  tools_to_call_from=views + final, **kw)
        if msg.tool_calls:
            if any(c.function.name != "final_answer" for c in msg.tool_calls):
                self.rounds += 1
            yield ChatMessageStreamDelta(content=msg.content or "", tool_calls=[
                ChatMessageToolCallStreamDelta(index=i, id=c.id, type="function", function=c.function)
                for i, c in enumerate(msg.tool_calls)], token_usage=msg.token_usage)
        else:
            yield ChatMessageStreamDelta(content=msg.content or "", token_usage=msg.token_usage)

    def generate(self, messages, stop_sequences=None, response_format=None, tools_to_call_from=None, **kwargs):
        return agglomerate_stream_deltas(list(self.generate_stream(
            messages, stop_sequences=stop_sequences, response_format=response_format,
            tools_to_call_from=tools_to_call_from, **kwargs)))

    def parse_tool_calls(self, message: ChatMessage) -> ChatMessage:
        if message.tool_calls:
            return message
        text = _text(message.content).strip()
        if not self.chat and text.startswith(("{", "[", "<tool_call>")):
            try:
                return self.inner.parse_tool_calls(message)
            except Exception:  # noqa: BLE001 - not a call: treat it as the answer
                pass
        message.tool_calls = [ChatMessageToolCall(
            id=f"answer_{self.rounds}", type="function",
            function=ChatMessageToolCallFunction(name="final_answer", arguments={"answer": text}))]
        return message


class DefectAgent:
    """Runs the chat agent for one turn of a conversation at a time.

    Args:
        tools_factory: ``factory(ctx) -> list[Tool]``: the tools bound to a turn's context
            (e.g. ``lambda ctx: tools.build_tools(ctx, services)``).
        model: a smolagents ``Model``; default: :func:`agent.models.get_agent_model` (loaded on
            first use, then the system prompt is evaluated into its KV cache).
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
        self.system_text = system_prompt(self.prompt_templates)
        self._warm = False
        #: most tool calls the model may write in one generation (they run in order)
        self.max_calls = 3

    def _resolve_model(self) -> tuple[Model, str]:
        if self._model is None:
            self._model, self._model_name = get_agent_model(self.settings)
        return self._model, self._model_name

    @property
    def model_name(self) -> str:
        """Display name of the model ("" before it is loaded)."""
        return self._model_name or ""

    def warm(self) -> int:
        """Load the model and evaluate the system prompt into its KV cache; returns the prompt's tokens (0 if
        the backend has no prefill)."""
        model, _ = self._resolve_model()
        self._warm = True
        if hasattr(model, "prefill"):
            return int(model.prefill([{"role": "system", "content": self.system_text}]))
        return 0

    def turn_text(self, ctx: "RunContext") -> str:
        """The user message of a turn as the model reads it (photo marker, question, language hint)."""
        photo = "new" if ctx.new_photo else ("same" if ctx.has_photo else "none")
        return populate_template(self.extra_prompts["turn"], variables={
            "photo": photo, "photo_name": Path(ctx.image_path).name if ctx.image_path else None,
            "product": ctx.product, "product_source": ctx.product_source, "question": ctx.question,
            "answer_lang": ctx.lang, "known": known_facts(ctx)}).strip()

    # backwards-compatible name of the one-shot task text
    task_text = turn_text

    def run(self, ctx: "RunContext", **kwargs) -> AgentResult:
        """Run the turn to the end; returns the final :class:`AgentResult` (see :meth:`stream`)."""
        result = None
        for item in self.stream(ctx, **kwargs):
            result = item
        assert isinstance(result, AgentResult)
        return result

    def stream(self, ctx: "RunContext", history: list[dict] | None = None, turn_text: str | None = None,
               kind: str | None = None, cancel: threading.Event | None = None
               ) -> Iterator[ToolStarted | AgentStep | AnswerDelta | AgentResult]:
        """Answer one message; yields the turn's events, the :class:`AgentResult` last.

        Args:
            ctx: the turn's context (:meth:`agent.memory.Conversation.start_turn`, or a one-shot
                ``RunContext`` with a photo).
            history: the conversation so far as messages (:meth:`agent.memory.Conversation.history_messages`).
            turn_text: the user message as the model reads it (default :meth:`turn_text`).
            kind: the message kind for the checks and the fallback (default :func:`agent.policy.classify`).
            cancel: set it to stop the turn (the result then has ``cancelled=True`` and the partial answer).

        Never raises for model failures: they lead to the fallback, whose reason is in
        ``AgentResult.fallback_reason``. Tool errors appear as steps with ``error`` set.
        """
        t0 = time.monotonic()
        history = list(history or [])
        turn_text = turn_text or self.turn_text(ctx)
        kind = kind or classify(ctx.question, has_photo=ctx.has_photo, new_photo=ctx.new_photo,
                                has_history=bool(history), writes=ctx.writes)
        tools = self.tools_factory(ctx)
        steps: list[AgentStep] = []
        timings: dict = {}
        run: dict = {"raw": None, "reason": None, "form": "text", "messages": [], "cancelled": False,
                     "partial": ""}
        try:
            model, name = self._resolve_model()
            if not self._warm:
                self.warm()
        except Exception as exc:  # missing weights, llama.cpp not installed, ...
            model, name = None, f"{self.settings.agent_backend}:unavailable"
            run["reason"] = f"the model could not be loaded ({type(exc).__name__}: {exc})"

        if model is not None:
            yield from self._model_run(ctx, tools, model, steps, t0, history, turn_text, kind, cancel, timings, run)

        if run["cancelled"]:
            answer = run["partial"] or ""
            fallback = False
        else:
            fallback = run["reason"] is not None
            timings["model_steps"] = len(steps)
            if fallback:
                for step in run_missing_tools(ctx, tools, kind):
                    steps.append(step)
                    timings["tools_done_s"] = time.monotonic() - t0
                    yield step
                answer = write_answer(ctx, kind, run["reason"])
                timings.setdefault("first_answer_s", time.monotonic() - t0)
                yield AnswerDelta(text=answer, restart=True, elapsed_s=time.monotonic() - t0)
            else:
                answer = render_answer(run["raw"], ctx, run["form"], final=True)
        timings["total_s"] = time.monotonic() - t0
        citations = [{"source": s, "page": p} for s, p in find_citations(answer or "")]
        yield AgentResult(
            steps=steps, answer=answer or "", citations=citations,
            model=(name or self.model_name) + (" + deterministic fallback" if fallback else ""),
            elapsed_s=time.monotonic() - t0, fallback=fallback, fallback_reason=run["reason"] if fallback else None,
            product=getattr(ctx, "product", None), defect_type=getattr(ctx, "reported_defect_type", None),
            kind=kind, form=("manual" if fallback and answer.count("\n## ") >= 5 else run["form"]),
            raw_answer="" if fallback else (run["raw"] or ""),
            messages=[] if fallback or run["cancelled"] else run["messages"], timings=timings,
            cancelled=run["cancelled"])

    # ------------------------------------------------------------------ internals
    def _model_run(self, ctx, tools, model, steps: list[AgentStep], t0: float, history: list[dict], turn_text: str,
                   kind: str, cancel, timings: dict, run: dict):
        """Generator of the model's part of a turn; fills ``run`` (raw answer, form, messages, or the reason to
        fall back, or cancelled)."""
        settings = self.settings
        deadline = t0 + settings.agent_timeout_s
        turn_model = _TurnModel(model, ctx, tools, deadline, cancel, timings, max_calls=self.max_calls,
                                kind=kind)
        state = {"failures": 0, "problems": []}
        template = self.extra_prompts["answer_problems"]

        def turn_check(final_answer, memory, agent=None) -> bool:
            raw = str(final_answer)
            problems = check_turn(raw, render_answer(raw, ctx, turn_model.form), ctx, kind, turn_model.form)
            state["problems"] = problems
            if not problems:
                return True
            state["failures"] += 1
            if state["failures"] >= 2:  # second failure: accept, the caller falls back
                return True
            turn_model.needs_evidence = [need.split()[0] for need in required_tools(kind, ctx)]
            raise ValueError(populate_template(template, variables={"problems": "; ".join(problems)}))

        agent = _ChatToolCallingAgent(
            tools=tools, model=turn_model, prompt_templates=self.prompt_templates, max_steps=settings.agent_max_steps,
            final_answer_checks=[turn_check], stream_outputs=True, max_tool_threads=1,
            logger=AgentLogger(level=LogLevel.OFF, console=Console(file=io.StringIO(), quiet=True)),
            history=history, turn_text=turn_text, system_text=self.system_text, photo=_task_images(ctx, model),
            step_callbacks=[_overlay_callback(ctx)] if getattr(model, "accepts_images", False) else None,
        )
        pending: dict[str, tuple[ToolCall, float]] = {}
        turn_named = step_named = step_calls = 0
        buf = ""
        answers = 0
        answer, errors = None, 0

        def fail(reason: str) -> None:
            run["reason"] = reason

        try:
            for event in agent.run(turn_text, stream=True):
                now = time.monotonic() - t0
                if isinstance(event, ChatMessageStreamDelta):
                    if not event.content:
                        continue
                    buf += event.content
                    head = buf.lstrip()
                    if head.startswith(("[", "{")):
                        names = _NAME_RE.findall(buf)
                        while step_named < len(names):
                            timings.setdefault("first_tool_s", now)
                            yield ToolStarted(tool=names[step_named], index=turn_named, elapsed_s=now)
                            step_named += 1
                            turn_named += 1
                    elif head:
                        if not run.get("_answering"):
                            run["_answering"] = True
                            answers += 1
                            timings.setdefault("first_model_token_s", now)
                            if turn_model.form == "manual" and "first_answer_s" not in timings:
                                timings["first_answer_s"] = run.get("_facts_at", now)
                        text = render_answer(buf, ctx, turn_model.form, final=False)
                        run["partial"] = text
                        timings.setdefault("first_answer_s", now)
                        yield AnswerDelta(text=text, restart=answers > 1 and len(buf) == len(event.content),
                                          elapsed_s=now)
                elif isinstance(event, ToolCall):
                    pending[event.id] = (event, time.perf_counter())
                    step_calls += 1
                    if event.name != "final_answer" and step_calls > step_named:  # not streamed: announce it now
                        timings.setdefault("first_tool_s", now)
                        yield ToolStarted(tool=event.name, index=turn_named, elapsed_s=now)
                        step_named += 1
                        turn_named += 1
                elif isinstance(event, ToolOutput):
                    call, started = pending.pop(event.id, (event.tool_call, time.perf_counter()))
                    if not event.is_final_answer:
                        step = AgentStep(tool=call.name, arguments=dict(call.arguments or {}),
                                         observation=event.observation, duration_s=time.perf_counter() - started)
                        steps.append(step)
                        timings["tools_done_s"] = time.monotonic() - t0
                        yield step
                        if not pending and answer_form(ctx, kind) == "manual" and "_facts_at" not in run:
                            # the evidence of a response manual is complete: its code-written facts show now
                            run["_facts_at"] = time.monotonic() - t0
                            timings.setdefault("first_answer_s", run["_facts_at"])
                            run["partial"] = render_answer("", ctx, "manual", final=False)
                            yield AnswerDelta(text=run["partial"], elapsed_s=run["_facts_at"])
                elif isinstance(event, ActionStep):
                    buf = ""
                    run["_answering"] = False
                    step_named = step_calls = 0
                    if event.error is not None:
                        errors += 1
                        if pending:
                            for call, started in pending.values():
                                step = AgentStep(tool=call.name,
                                                 arguments=dict(call.arguments) if isinstance(call.arguments, dict)
                                                 else {"raw": str(call.arguments)},
                                                 observation="", duration_s=time.perf_counter() - started,
                                                 error=_error_text(event.error))
                                if call.name != "final_answer":
                                    steps.append(step)
                                    yield step
                            pending.clear()
                        else:
                            checked = "turn_check" in str(event.error)  # the answer check failed: one retry
                            step = AgentStep(tool="answer_check" if checked else "invalid_tool_call", arguments={},
                                             observation="", duration_s=0.0, error=_error_text(event.error))
                            yield step  # shown in the chat; not a tool call, so not in the result's steps
                        cause = getattr(event.error, "__cause__", None)
                        if isinstance(cause, GenerationCancelled) or (cancel is not None and cancel.is_set()):
                            run["cancelled"] = True
                            return
                        if errors > 2:
                            fail(f"the model failed {errors} steps (last: {_error_text(event.error)[:300]})")
                            return
                elif isinstance(event, FinalAnswerStep):
                    answer = event.output
                if answer is None and time.monotonic() > deadline:
                    fail(f"timeout: the model did not finish within {settings.agent_timeout_s:.0f} s")
                    return
        except AgentMaxStepsError:
            fail(f"the model reached the maximum of {settings.agent_max_steps} steps without a valid answer")
            return
        except AgentError as exc:
            cause = exc.__cause__
            if isinstance(cause, GenerationCancelled) or (cancel is not None and cancel.is_set()):
                run["cancelled"] = True
                return
            if isinstance(cause, TimeoutError):
                fail(f"timeout: the model did not finish within {settings.agent_timeout_s:.0f} s")
            elif cause is not None and type(cause).__name__ == "ToolCallTruncated":
                fail(f"the model's output was cut: {cause}")
            else:
                fail(f"the model failed: {type(exc).__name__}: {str(exc)[:300]}")
            return
        except GenerationCancelled:
            run["cancelled"] = True
            return
        except Exception as exc:  # tool or model crash outside smolagents' handling
            fail(f"the model run failed: {type(exc).__name__}: {str(exc)[:300]}")
            return
        if cancel is not None and cancel.is_set():
            run["cancelled"] = True
            return
        if answer is None:
            fail("the model gave no final answer")
            return
        if state["problems"]:
            fail("the model's answer failed the checks after one retry: " + "; ".join(state["problems"]))
            return
        run["raw"] = str(answer)
        run["form"] = turn_model.form
        msgs: list[dict] = []
        action_steps = [s for s in agent.memory.steps if isinstance(s, ActionStep)]
        for i, s in enumerate(action_steps):
            msgs += step_messages(s, final=i == len(action_steps) - 1)
        run["messages"] = msgs


def _task_images(ctx, model) -> list | None:
    """The conversation's photo as a PIL image on the turn message, for models that see images
    (``accepts_images``: the Qwen2-VL backend); None otherwise."""
    if not getattr(model, "accepts_images", False) or getattr(ctx, "image", None) is None:
        return None
    return [Image.fromarray(ctx.image).convert("RGB")]


def _overlay_callback(ctx):
    """smolagents step callback: after the anomaly-scoring step, attach the overlay PNG to that
    step's observation images, so a vision model sees it once (in that step's messages only)."""
    sent: set[str] = set()

    def attach_overlay(step, agent=None) -> None:
        overlay = (getattr(ctx, "inspection", None) or {}).get("overlay")
        if not isinstance(step, ActionStep) or not overlay or overlay in sent or not Path(overlay).is_file():
            return
        with Image.open(overlay) as im:
            step.observations_images = [*(step.observations_images or []), im.convert("RGB")]
        sent.add(overlay)

    return attach_overlay


_DEFAULT_AGENT: DefectAgent | None = None
_DEFAULT_LOCK = threading.Lock()


def get_default_agent() -> DefectAgent:
    """The process's agent, created on first call (thread-safe; the model loads once).

    Its tools are bound per turn to the turn's context and to :func:`services.container.get_services`,
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
