"""OpenAI-compatible server backend against a REAL server on 127.0.0.1: llama-cpp-python's
server (``python -m llama_cpp.server``) serving the SmolLM2-135M fixture GGUF with
``--chat_format chatml-function-calling`` (tool calls through the OpenAI ``tools`` API)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from tests.test_app import defect_items
from PIL import Image
from skimage import data as skdata
from smolagents.models import ChatMessage, MessageRole

from agent.models import smollm2_gguf_path

ROWS = 320  # rows >= 320 of the sample photos are reserved and never read


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """``http://127.0.0.1:<port>/v1`` of a llama-cpp-python server process (stopped after the module)."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("llama_server") / "server.log"
    log = open(log_path, "wb")  # a file, not a pipe: llama.cpp's load log would fill a pipe and block
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf_path()), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "8192", "--n_threads", "2", "--chat_format", "chatml-function-calling"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(base + "/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("llama_cpp.server exited: " + log_path.read_text(errors="replace")[-2000:])
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _photo(y: int = 0, x: int = 0, size: int = 24) -> Image.Image:
    g = skdata.brick()[:ROWS]
    return Image.fromarray(np.repeat(g[y : y + size, x : x + size, None], 3, axis=2))


def test_openai_server_sends_each_image_once_as_data_uri(llama_server):
    from agent.openai_server import OpenAIServerVLModel

    model = OpenAIServerVLModel("smollm2", llama_server, tool_choice="auto", max_tokens=8)
    photo, overlay = _photo(), _photo(100, 100)
    messages = [  # the photo twice (smolagents repeats task images on every step), the overlay once
        ChatMessage(role=MessageRole.SYSTEM, content=[{"type": "text", "text": "You inspect parts."}]),
        ChatMessage(role=MessageRole.USER, content=[{"type": "text", "text": "Inspect."},
                                                   {"type": "image", "image": photo}]),
        ChatMessage(role=MessageRole.USER, content=[{"type": "image", "image": photo.copy()},
                                                   {"type": "image", "image": overlay}]),
    ]
    out = model.generate(messages)
    assert out.token_usage.input_tokens > 0  # the server answered
    parts = [p for m in model.last_request["messages"] if isinstance(m["content"], list) for p in m["content"]]
    urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert len(urls) == 2 and all(u.startswith("data:image/png;base64,") for u in urls)
    import base64
    import io

    sent = [np.asarray(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("RGB")) for u in urls]
    assert np.array_equal(sent[0], np.asarray(photo)) and np.array_equal(sent[1], np.asarray(overlay))
    # text-only servers: DRA_OPENAI_SEND_IMAGES=0 sends none
    text_only = OpenAIServerVLModel("smollm2", llama_server, send_images=False, tool_choice="auto", max_tokens=4)
    text_only.generate(messages)
    assert "image_url" not in json.dumps(text_only.last_request["messages"], default=str)


def test_openai_server_agent_turn(llama_server, built_state, monkeypatch):
    """One real DefectAgent run whose model calls go to the server through the registered backend."""
    from agent.agents import DefectAgent
    from agent.models import get_agent_model
    from agent.openai_server import OpenAIServerVLModel
    from services.container import get_services
    from core.settings import get_settings
    from tools import build_tools
    from tools.context import RunContext

    monkeypatch.setenv("DRA_AGENT_BACKEND", "openai-server")
    monkeypatch.setenv("DRA_OPENAI_BASE_URL", llama_server)
    monkeypatch.setenv("DRA_OPENAI_MODEL", "smollm2")
    monkeypatch.setenv("DRA_OPENAI_TOOL_CHOICE", "auto")  # llama-cpp-python's server rejects "required"
    monkeypatch.setenv("DRA_OPENAI_SEND_IMAGES", "0")  # SmolLM2 is text-only
    get_settings.cache_clear()
    try:
        settings = dataclasses.replace(get_settings(), agent_max_steps=2, agent_timeout_s=120, agent_max_tokens=120)
        model, name = get_agent_model(settings)
        assert isinstance(model, OpenAIServerVLModel) and name == f"openai-server:smollm2@{llama_server}"
        item = defect_items(built_state)[0]  # a defect the bank flags: the full manual, with citations
        ctx = RunContext.from_path(built_state / "data" / item["image"], product=item["product"])
        agent = DefectAgent(tools_factory=lambda c: build_tools(c, get_services()), model=model, settings=settings)
        result = agent.run(ctx)
    finally:
        get_settings.cache_clear()
    assert result.model.startswith("smollm2")  # the server model ran the turn (fallback noted after it)
    assert model.last_request is not None and model.last_request["tool_choice"] == "auto"
    offered = {t["function"]["name"] for t in model.last_request["tools"]}
    assert offered <= {"anomaly_scoring", "similar_defect_search", "manual_retrieval", "final_answer"}
    # the server's first answer was a tool call the agent executed (the 135M model cannot finish a
    # manual; the deterministic fallback then completes it, as with the in-process backend)
    assert result.steps and result.steps[0].tool in {"anomaly_scoring", "similar_defect_search"}
    assert result.steps[0].error is None and result.steps[0].observation
    assert result.answer and result.citations
