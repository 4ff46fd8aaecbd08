"""OpenAI-compatible server backend ("openai-server"): vLLM, Ollama, llama.cpp's server, ...

:class:`OpenAIServerVLModel` is smolagents' ``OpenAIServerModel`` (``openai`` client, chat
completions with ``tools``) with what this project needs on top:

* images (the photo on the task message, the anomaly overlay after scoring; see
  :mod:`agent.agents`) are sent as content parts ``{"type": "image_url", "image_url": {"url":
  "data:image/png;base64,..."}}`` (smolagents' ``convert_images_to_image_urls``), each image
  once: smolagents repeats the task images on every step, the repeats are dropped here;
  ``DRA_OPENAI_SEND_IMAGES=0`` drops all images for text-only servers;
* messages made only of text parts are sent as one string (llama-cpp-python's server accepts
  part lists on user messages only);
* ``tool_choice`` from ``DRA_OPENAI_TOOL_CHOICE`` (``required`` for vLLM / OpenAI; llama-cpp-python's
  server with ``--chat_format chatml-function-calling`` accepts only ``auto`` or a named function);
* tool calls a server returns as text in Qwen's ``<tool_call>`` format (vLLM without a tool
  parser) are parsed (:func:`agent.qwen2_vl.parse_qwen_tool_calls`);
* the agent deadline becomes the request timeout; a timeout raises
  :class:`agent.models.GenerationTimeout`.

Settings: ``DRA_OPENAI_BASE_URL`` (default ``http://127.0.0.1:8000/v1``), ``DRA_OPENAI_MODEL``
(default ``DRA_AGENT_MODEL``, else ``"default"``), ``DRA_OPENAI_API_KEY``, ``DRA_OPENAI_SEND_IMAGES``,
``DRA_OPENAI_TOOL_CHOICE``. Select with ``DRA_AGENT_BACKEND=openai-server``.
"""

from __future__ import annotations

import time

from smolagents.models import ChatMessage, MessageRole, Model, OpenAIServerModel

from agent.models import GenerationTimeout, register_agent_backend
from agent.qwen2_vl import _to_pil, image_key, parse_qwen_tool_calls
from core.settings import Settings


def dedupe_images(messages: list, keep_images: bool = True) -> list:
    """Copy of smolagents ``messages`` where every image appears once (first occurrence kept);
    with ``keep_images=False`` all image parts are removed. Messages left empty are dropped."""
    seen: set[str] = set()
    out = []
    for msg in messages:
        as_dict = msg.dict() if isinstance(msg, ChatMessage) else dict(msg)
        content = as_dict.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image":
                    if not keep_images:
                        continue
                    pil = _to_pil(part["image"])
                    key = image_key(pil)
                    if key in seen:
                        continue
                    seen.add(key)
                    part = {"type": "image", "image": pil}
                parts.append(part)
            if not parts:
                continue
            as_dict["content"] = parts
        out.append(ChatMessage(role=MessageRole(as_dict["role"]), content=as_dict["content"],
                               tool_calls=msg.tool_calls if isinstance(msg, ChatMessage) else None))
    return out


class OpenAIServerVLModel(OpenAIServerModel):
    """smolagents ``OpenAIServerModel`` sending each image once as an ``image_url`` data URI.

    Args:
        model_id: model name on the server.
        api_base: server URL ending in ``/v1``.
        api_key: key (local servers accept any).
        send_images: send image parts (False for text-only servers).
        tool_choice: ``"required"``, ``"auto"`` or ``None`` (server default).
        max_tokens: cap on generated tokens per call.

    ``generate`` follows smolagents' ``Model.generate``; ``deadline`` (``time.monotonic()``
    seconds) sets the request timeout. ``last_request`` holds the last chat-completions
    payload (messages with their image parts, tools, tool_choice) for inspection.

    Raises (from ``generate``):
        GenerationTimeout: the request outlived the deadline.
        openai.APIError subclasses: the server failed or is unreachable.
    """

    supports_deadline = True

    def __init__(self, model_id: str, api_base: str, api_key: str = "sk-no-key", send_images: bool = True,
                 tool_choice: str | None = "required", max_tokens: int = 700, **kwargs):
        super().__init__(model_id=model_id, api_base=api_base, api_key=api_key,
                         client_kwargs={"max_retries": 0}, max_tokens=max_tokens, **kwargs)
        self.accepts_images = bool(send_images)
        self.tool_choice = tool_choice
        self.last_request: dict | None = None

    @property
    def display_name(self) -> str:
        """``openai-server:<model>@<base url>``."""
        return f"openai-server:{self.model_id}@{self.client_kwargs['base_url']}"

    def _prepare_completion_kwargs(self, *args, **kwargs) -> dict:
        if kwargs.get("tools_to_call_from"):
            kwargs.setdefault("tool_choice", self.tool_choice)
        payload = super()._prepare_completion_kwargs(*args, **kwargs)
        for message in payload.get("messages", []):
            content = message.get("content")
            # text-only parts -> one string: some servers (llama-cpp-python) accept part lists
            # only on user messages; image parts stay as parts
            if isinstance(content, list) and all(p.get("type") == "text" for p in content):
                message["content"] = "\n".join(p.get("text") or "" for p in content)
        self.last_request = payload
        return payload

    def generate(self, messages, stop_sequences=None, response_format=None, tools_to_call_from=None,
                 deadline: float | None = None, **kwargs) -> ChatMessage:
        """One chat completion on the server; see the class docstring."""
        import openai

        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GenerationTimeout("agent deadline passed before the request")
            kwargs["timeout"] = left
        messages = dedupe_images(messages, keep_images=self.accepts_images)
        try:
            msg = super().generate(messages, stop_sequences=stop_sequences, response_format=response_format,
                                   tools_to_call_from=tools_to_call_from, **kwargs)
        except openai.APITimeoutError as exc:
            raise GenerationTimeout(f"the server did not answer before the agent deadline: {exc}") from exc
        if tools_to_call_from and not msg.tool_calls and msg.content and "<tool_call>" in msg.content:
            content, calls = parse_qwen_tool_calls(msg.content)
            msg = ChatMessage(role=msg.role, content=content, tool_calls=calls, raw=msg.raw,
                              token_usage=msg.token_usage)
        return msg


@register_agent_backend("openai-server")
def _openai_server_backend(settings: Settings) -> tuple[Model, str]:
    """The agent on an OpenAI-compatible server (``DRA_OPENAI_*`` settings)."""
    model = OpenAIServerVLModel(
        model_id=settings.openai_model or settings.agent_model or "default",
        api_base=settings.openai_base_url,
        api_key=settings.openai_api_key,
        send_images=settings.openai_send_images,
        tool_choice=settings.openai_tool_choice or None,
        max_tokens=settings.agent_max_tokens,
        temperature=0.0,
    )
    return model, model.display_name
