"""Qwen2-VL / Qwen2.5-VL agent backend: a smolagents ``Model`` that really shows the model the images.

smolagents' own ``TransformersModel`` renders the chat but never hands ``pixel_values`` to
``generate``, so a VLM run through it is blind. :class:`Qwen2VLModel` does the whole round
itself with transformers' auto classes:

1. smolagents messages -> Qwen chat messages. Image parts (``{"type": "image", "image": PIL}``)
   stay where smolagents put them: the photo on the task message (``agent.run(images=...)``),
   the anomaly overlay on the observation of the step that produced it
   (``ActionStep.observations_images``, see :mod:`agent.agents`). Each image therefore appears
   once in the conversation, not once per step.
2. Tool schemas go into the system message in Qwen's function-calling format (``<tools>`` JSON
   signatures, answers as ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``), the format
   Qwen2-VL / Qwen2.5-VL instruct models were trained on; it is added here, not left to the chat
   template, because the Qwen2-VL template has no tools section.
3. ``processor.apply_chat_template`` renders the prompt (``<|vision_start|><|image_pad|>
   <|vision_end|>`` per image); ``processor(text, images)`` expands the image pads and computes
   ``pixel_values`` / ``image_grid_thw`` (Qwen2VLImageProcessor, dynamic resolution bounded by
   ``max_pixels``); these go to ``model.generate`` with greedy decoding.
4. ``<tool_call>`` blocks in the output become ``ChatMessage.tool_calls``.

Precision is chosen from the hardware (``precision="auto"``): on CUDA, 4-bit NF4 with bitsandbytes
(double quantisation, bf16 compute) when bitsandbytes is installed, else bf16; on CPU bf16. The
choice is in :attr:`Qwen2VLModel.display_name`, e.g. ``qwen2-vl:Qwen2-VL-2B-Instruct [4-bit nf4, cuda]``.

Source: Qwen2-VL (Wang et al., 2024, arXiv:2409.12191) through transformers
(``AutoModelForImageTextToText``, ``AutoProcessor``); 4-bit NF4 from QLoRA (Dettmers et al., 2023)
via bitsandbytes.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from smolagents.models import (
    ChatMessage,
    ChatMessageToolCall,
    ChatMessageToolCallFunction,
    MessageRole,
    Model,
    get_tool_json_schema,
    remove_content_after_stop_sequences,
    tool_role_conversions,
)
from smolagents.monitoring import TokenUsage

from agent.models import GenerationTimeout, register_agent_backend
from core.profiles import QWEN2_VL_DEFAULT, require_available
from core.settings import Settings

PRECISIONS = ("auto", "4bit", "bf16", "fp32")
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_END_TOKENS = ("<|im_end|>", "<|endoftext|>")

TOOLS_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def choose_precision(requested: str = "auto") -> tuple[str, str]:
    """``(precision, device)`` for loading: see the module docstring for the ``auto`` rule.

    Raises:
        ValueError: unknown precision, or ``4bit`` without CUDA / bitsandbytes.
    """
    import importlib.util

    import torch

    if requested not in PRECISIONS:
        raise ValueError(f"DRA_VLM_PRECISION={requested!r}; use one of {', '.join(PRECISIONS)}")
    cuda = torch.cuda.is_available()
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if requested == "auto":
        if cuda and has_bnb and not os.environ.get("SPACES_ZERO_GPU"):  # ZeroGPU: bf16 (no bnb at start-up)
            return "4bit", "cuda"
        return "bf16", "cuda" if cuda else "cpu"
    if requested == "4bit" and not (cuda and has_bnb):
        raise ValueError("DRA_VLM_PRECISION=4bit needs a CUDA GPU and bitsandbytes; use bf16 or auto")
    return requested, "cuda" if cuda else "cpu"


def parse_qwen_tool_calls(text: str, start_id: int = 0) -> tuple[str, list[ChatMessageToolCall]]:
    """Split Qwen output into ``(content without the calls, tool calls)``.

    Qwen's format: ``<tool_call>\\n{"name": "tool", "arguments": {...}}\\n</tool_call>`` (one block
    per call; a last block cut before ``</tool_call>`` is still read when its JSON is complete).
    ``arguments`` given as a JSON string is decoded. Blocks that are not valid JSON objects with a
    ``name`` are left in the content (smolagents then reports a parsing error to the model).
    """
    calls: list[ChatMessageToolCall] = []
    kept: list[str] = []
    pos = 0
    for match in _TOOL_CALL.finditer(text):
        body = match.group(1).strip()
        try:
            obj = json.loads(body, strict=False)
            name = obj["name"]
            args = obj.get("arguments", obj.get("parameters", {}))
            if isinstance(args, str):
                args = json.loads(args, strict=False) if args.strip().startswith("{") else args
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        kept.append(text[pos : match.start()])
        pos = match.end()
        calls.append(ChatMessageToolCall(
            id=f"call_{start_id + len(calls)}", type="function",
            function=ChatMessageToolCallFunction(name=str(name), arguments=args if args is not None else {}),
        ))
    kept.append(text[pos:])
    return "".join(kept).strip(), calls


def _to_pil(image: Any):
    """A PIL RGB image from PIL / smolagents AgentImage / numpy array / path."""
    import numpy as np
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raw = getattr(image, "to_raw", None)
    if callable(raw):
        return raw().convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image.astype("uint8")).convert("RGB")
    with Image.open(Path(str(image))) as im:
        return im.convert("RGB")


def image_key(image) -> str:
    """Content hash of a PIL image (size, mode and pixels), to recognise an image sent before."""
    import hashlib

    return hashlib.sha1(f"{image.size}{image.mode}".encode() + image.tobytes()).hexdigest()


def to_qwen_messages(messages: list[ChatMessage | dict], tools: list | None = None) -> tuple[list[dict], list]:
    """smolagents messages -> ``(Qwen chat messages, PIL images in order of appearance)``.

    Roles: tool-call -> assistant, tool-response -> user (smolagents' ``tool_role_conversions``);
    consecutive messages of one role are merged. Each image part becomes ``{"type": "image"}``
    in the chat and its PIL image is appended to the list (the processor pairs them in order).
    An image already in the conversation is dropped: smolagents 1.26 attaches the task images
    to every ``ActionStep`` again (``observations_images=images``), so without this the photo
    would be encoded once per step.
    With ``tools``, their JSON schemas are appended to the system message in Qwen's format.
    """
    chat: list[dict] = []
    images: list = []
    seen: set[str] = set()
    for msg in messages:
        role = msg.role if isinstance(msg, ChatMessage) else msg["role"]
        content = msg.content if isinstance(msg, ChatMessage) else msg.get("content")
        role = MessageRole(role) if not isinstance(role, MessageRole) else role
        role = tool_role_conversions.get(role, role)
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        out_parts: list[dict] = []
        for part in parts:
            kind = part.get("type")
            if kind == "text":
                out_parts.append({"type": "text", "text": part.get("text") or ""})
            elif kind in ("image", "image_url") or "image" in part:
                img = part.get("image")
                if img is None and kind == "image_url":
                    url = (part.get("image_url") or {}).get("url", "")
                    img = _decode_data_uri(url) if url.startswith("data:") else url
                pil = _to_pil(img)
                key = image_key(pil)
                if key in seen:  # smolagents repeats the task images on every step: keep the first
                    continue
                seen.add(key)
                images.append(pil)
                out_parts.append({"type": "image"})
        role_name = str(role.value)
        if chat and chat[-1]["role"] == role_name:
            chat[-1]["content"].extend(out_parts)
        else:
            chat.append({"role": role_name, "content": out_parts})
    if tools:
        # JSON-schema "pattern"s (the agent's manual regex) are for grammar backends; the prompt omits them
        schemas = "\n".join(json.dumps(_without_patterns(get_tool_json_schema(t)), ensure_ascii=False)
                             for t in tools)
        block = {"type": "text", "text": TOOLS_PROMPT.format(tools=schemas)}
        if chat and chat[0]["role"] == "system":
            chat[0]["content"].append(block)
        else:
            chat.insert(0, {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."},
                                                          block]})
    # adjacent text parts read as one text (the Qwen template prints parts back to back)
    for m in chat:
        merged: list[dict] = []
        for p in m["content"]:
            if p["type"] == "text" and merged and merged[-1]["type"] == "text":
                merged[-1] = {"type": "text", "text": merged[-1]["text"] + "\n" + p["text"]}
            else:
                merged.append(p)
        m["content"] = merged
    return chat, images


def _without_patterns(obj):
    if isinstance(obj, dict):
        return {k: _without_patterns(v) for k, v in obj.items() if k != "pattern"}
    if isinstance(obj, list):
        return [_without_patterns(v) for v in obj]
    return obj


def _decode_data_uri(url: str):
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def _gpu_decorator(fn):
    """``spaces.GPU`` (Hugging Face ZeroGPU) when the ``spaces`` package is installed, else ``fn``."""
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return fn
    return spaces.GPU(duration=int(os.environ.get("DRA_ZEROGPU_DURATION_S", "120")))(fn)


class Qwen2VLModel(Model):
    """smolagents ``Model`` for Qwen2-VL / Qwen2.5-VL that passes images into ``generate``.

    Args:
        model_id: hub id (``Qwen/Qwen2-VL-2B-Instruct``) or local folder; used to load model and
            processor unless ``model`` / ``processor`` are given.
        precision: ``auto`` | ``4bit`` | ``bf16`` | ``fp32`` (see :func:`choose_precision`).
        max_tokens: default cap on new tokens per call.
        max_pixels: upper bound on image pixels after Qwen's dynamic resize (``28*28`` per
            visual token after 2x2 merging; 512*28*28 -> at most 512 visual tokens per image).
        model, processor: an already built model / processor (tests; precision then ``as given``).

    ``generate(messages, stop_sequences, response_format, tools_to_call_from, max_tokens=...,
    deadline=...)`` returns a ``ChatMessage``: ``tool_calls`` from the ``<tool_call>`` blocks (the
    rest in ``content``); ``raw`` holds the decoded text, the prompt length and the image grids.
    ``last_inputs`` keeps the tensors of the last call (``pixel_values`` ``(patches, C*T*P*P)``
    float, ``image_grid_thw`` ``(n_images, 3)`` int64) for inspection.

    Raises:
        core.profiles.MissingModelError: the weights are neither local nor in the HF cache.
        GenerationTimeout: the ``deadline`` passed (checked after every token).
        ValueError: unknown precision.
    """

    accepts_images = True
    supports_deadline = True

    def __init__(self, model_id: str = "Qwen/Qwen2-VL-2B-Instruct", precision: str = "auto", max_tokens: int = 700,
                 max_pixels: int = 512 * 28 * 28, min_pixels: int = 4 * 28 * 28, model=None, processor=None,
                 **kwargs):
        import torch

        super().__init__(flatten_messages_as_text=False, model_id=model_id, **kwargs)
        self.max_tokens = int(max_tokens)
        self._lock = threading.RLock()
        self._n_calls = 0
        self.last_inputs: dict | None = None
        if model is not None and processor is not None:
            self.model, self.processor = model, processor
            self.device = str(next(model.parameters()).device)
            self.precision = f"as given ({next(model.parameters()).dtype})".replace("torch.", "")
        else:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            if not Path(model_id).expanduser().is_dir():
                require_available("agent", model_id)
            precision, device = choose_precision(precision)
            load: dict[str, Any] = {}
            if precision == "4bit":
                from transformers import BitsAndBytesConfig

                load["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.bfloat16)
                load["device_map"] = {"": 0}
            else:
                load["dtype"] = torch.float32 if precision == "fp32" else torch.bfloat16
            self.processor = AutoProcessor.from_pretrained(
                model_id, size={"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)})
            self.model = AutoModelForImageTextToText.from_pretrained(model_id, **load)
            if precision != "4bit":
                self.model.to(device)
            self.model.eval()
            self.device = device
            self.precision = {"4bit": "4-bit nf4", "bf16": "bf16", "fp32": "fp32"}[precision]
        self._generate_ids = _gpu_decorator(self._generate_ids_impl)

    @property
    def display_name(self) -> str:
        """``qwen2-vl:<name> [<precision>, <device>]``."""
        return f"qwen2-vl:{Path(str(self.model_id)).name} [{self.precision}, {self.device}]"

    def render(self, messages: list[ChatMessage | dict], tools: list | None = None) -> tuple[str, list]:
        """Chat-templated prompt text and the images, in order (see :func:`to_qwen_messages`)."""
        chat, images = to_qwen_messages(messages, tools)
        prompt = self.processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return prompt, images

    def _generate_ids_impl(self, inputs: dict, gen_kwargs: dict):
        import torch

        with torch.inference_mode():
            return self.model.generate(**inputs, **gen_kwargs)

    def generate(self, messages: list[ChatMessage | dict], stop_sequences: list[str] | None = None,
                 response_format: dict | None = None, tools_to_call_from: list | None = None,
                 deadline: float | None = None, **kwargs) -> ChatMessage:
        """One chat completion; see the class docstring."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        max_tokens = int(kwargs.get("max_tokens") or kwargs.get("max_new_tokens") or self.max_tokens)
        timed_out = [False]

        class _Deadline(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                if deadline is not None and time.monotonic() > deadline:
                    timed_out[0] = True
                    return True
                return False

        if deadline is not None and time.monotonic() > deadline:
            raise GenerationTimeout("agent deadline passed before generation started")
        with self._lock:
            prompt, images = self.render(messages, tools_to_call_from)
            inputs = self.processor(text=[prompt], images=images or None, return_tensors="pt")
            inputs = inputs.to(self.model.device)
            self.last_inputs = {k: v for k, v in inputs.items()}
            tok = self.processor.tokenizer
            gen_kwargs: dict[str, Any] = {
                "max_new_tokens": max_tokens, "do_sample": False,
                "stopping_criteria": StoppingCriteriaList([_Deadline()]),
                "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            }
            stops = [s for s in (stop_sequences or []) if s]
            if stops and not tools_to_call_from:
                gen_kwargs.update(stop_strings=stops, tokenizer=tok)
            out = self._generate_ids(dict(inputs), gen_kwargs)
            self._n_calls += 1
        if timed_out[0]:
            raise GenerationTimeout("agent deadline passed during generation")
        n_prompt = int(inputs["input_ids"].shape[1])
        new_ids = out[0, n_prompt:]
        text = tok.decode(new_ids, skip_special_tokens=False)
        for end in _END_TOKENS:
            text = text.split(end)[0]
        raw = {"text": text, "prompt_tokens": n_prompt, "images": len(images),
               "image_grid_thw": inputs["image_grid_thw"].tolist() if "image_grid_thw" in inputs else []}
        usage = TokenUsage(input_tokens=n_prompt, output_tokens=int(new_ids.shape[0]))
        content, calls = parse_qwen_tool_calls(text, start_id=self._n_calls * 100)
        if tools_to_call_from and calls:
            return ChatMessage(role=MessageRole.ASSISTANT, content=content, tool_calls=calls, raw=raw,
                               token_usage=usage)
        if stop_sequences:
            text = remove_content_after_stop_sequences(text, stop_sequences)
        return ChatMessage(role=MessageRole.ASSISTANT, content=text, raw=raw, token_usage=usage)


@register_agent_backend("qwen2-vl")
def _qwen2_vl_backend(settings: Settings) -> tuple[Model, str]:
    """Qwen2-VL / Qwen2.5-VL from ``settings.agent_model`` (hub id or local folder)."""
    model = Qwen2VLModel(
        settings.agent_model or QWEN2_VL_DEFAULT,
        precision=settings.vlm_precision,
        max_tokens=settings.agent_max_tokens,
        max_pixels=settings.vlm_max_pixels,
    )
    return model, model.display_name
