"""Qwen2-VL backend on a tiny random-init Qwen2-VL built from a config (tests/tiny_models.py; no download).

Checks that the photo and the overlay really reach ``generate`` as ``pixel_values`` (forward
hook on the vision tower), that each image is in the conversation once, that Qwen's
``<tool_call>`` output becomes a smolagents action (a tiny model trained in the test to emit
one, run by a real ``ToolCallingAgent``), and the backend registration / precision report.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata
from smolagents.models import ChatMessage, MessageRole

from tests.tiny_models import build_tiny_qwen2_vl, save_tiny_qwen2_vl

ROWS = 320  # rows >= 320 of the sample photos are reserved and never read


def _photo(y: int = 0, x: int = 0, size: int = 96) -> Image.Image:
    g = skdata.brick()[:ROWS]
    return Image.fromarray(np.repeat(g[y : y + size, x : x + size, None], 3, axis=2))


@pytest.fixture()
def tiny():
    from agent.qwen2_vl import Qwen2VLModel

    model, processor = build_tiny_qwen2_vl()
    return Qwen2VLModel("tiny-qwen2-vl", model=model, processor=processor, max_tokens=8)


def _vision_hook(vlm):
    """Record the ``pixel_values`` and ``grid_thw`` the vision tower receives."""
    seen = []

    def hook(module, args, kwargs):
        pixels = args[0] if args else kwargs.get("hidden_states", kwargs.get("pixel_values"))
        grid = args[1] if len(args) > 1 else kwargs.get("grid_thw")
        seen.append((tuple(pixels.shape), grid.tolist()))

    handle = vlm.model.model.visual.register_forward_pre_hook(hook, with_kwargs=True)
    return seen, handle


def test_qwen2_vl_image_reaches_generate(tiny):
    seen, handle = _vision_hook(tiny)
    try:
        msgs = [ChatMessage(role=MessageRole.SYSTEM, content=[{"type": "text", "text": "You inspect parts."}]),
                ChatMessage(role=MessageRole.USER, content=[{"type": "text", "text": "What is wrong?"},
                                                           {"type": "image", "image": _photo()}])]
        out = tiny.generate(msgs, max_tokens=4)
    finally:
        handle.remove()
    grid = tiny.last_inputs["image_grid_thw"].tolist()
    assert len(grid) == 1 and out.raw["images"] == 1
    t, h, w = grid[0]
    # the vision tower saw every patch of the photo: (t*h*w, 3 * temporal 2 * 14 * 14)
    assert seen == [((t * h * w, 3 * 2 * 14 * 14), grid)]
    assert tuple(tiny.last_inputs["pixel_values"].shape) == (t * h * w, 1176)
    # one <|image_pad|> per merged 2x2 patch group in the prompt
    pad = tiny.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((tiny.last_inputs["input_ids"] == pad).sum()) == t * h * w // 4
    assert out.token_usage.output_tokens >= 1 and isinstance(out.content, str)


def test_qwen2_vl_photo_and_overlay_each_sent_once(tiny, tmp_path):
    """The agent's two image paths (task photo, overlay after anomaly scoring) reach the model once each."""
    from smolagents import ToolCallingAgent
    from smolagents.memory import ActionStep, TaskStep

    from agent.agents import _overlay_callback, _task_images
    from agent.qwen2_vl import to_qwen_messages

    class Ctx:  # the fields of tools.context.RunContext these helpers read
        image = np.asarray(_photo())
        inspection = None

    ctx = Ctx()
    photo = _task_images(ctx, tiny)
    assert len(photo) == 1 and photo[0].size == (96, 96)
    overlay_path = tmp_path / "overlay.png"
    _photo(100, 100).save(overlay_path)
    ctx.inspection = {"overlay": str(overlay_path)}
    callback = _overlay_callback(ctx)
    agent = ToolCallingAgent(tools=[], model=tiny, max_steps=1)
    agent.memory.steps.append(TaskStep(task="inspect", task_images=photo))
    step1 = ActionStep(step_number=1, timing=None, observations="product=brick score=0.9")
    callback(step1)
    step2 = ActionStep(step_number=2, timing=None, observations="similar: crack")
    callback(step2)  # same overlay: not attached again
    agent.memory.steps += [step1, step2]
    chat, images = to_qwen_messages(agent.write_memory_to_messages())
    assert len(images) == 2 and step2.observations_images is None
    assert sum(p["type"] == "image" for m in chat for p in m["content"]) == 2
    seen, handle = _vision_hook(tiny)
    try:
        tiny.generate(agent.write_memory_to_messages(), max_tokens=2)
    finally:
        handle.remove()
    assert len(tiny.last_inputs["image_grid_thw"]) == 2 and len(seen) == 1


def test_qwen2_vl_tool_call_text_parsed():
    from agent.qwen2_vl import parse_qwen_tool_calls

    text = ('Let me score it.\n<tool_call>\n{"name": "anomaly_scoring", "arguments": {"product": "brick"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "manual_retrieval", "arguments": "{\\"query\\": \\"crack\\"}"}')
    content, calls = parse_qwen_tool_calls(text)
    assert content == "Let me score it."
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        ("anomaly_scoring", {"product": "brick"}), ("manual_retrieval", {"query": "crack"})]
    assert parse_qwen_tool_calls("<tool_call>not json</tool_call>")[1] == []


def test_qwen2_vl_generated_tool_call_runs_as_smolagents_action(tiny):
    """Train the tiny model to emit one Qwen tool call for the agent's real prompt (photo included),
    then run a real smolagents ToolCallingAgent: the call is parsed and executed as its action."""
    import torch
    from smolagents import ToolCallingAgent
    from smolagents.memory import ActionStep

    answer = "crack on brick"
    target = f'<tool_call>\n{{"name": "final_answer", "arguments": {{"answer": "{answer}"}}}}\n</tool_call>'
    task, photo = "Inspect the photo.", [_photo()]

    def make_agent():
        agent = ToolCallingAgent(tools=[], model=tiny, max_steps=1, verbosity_level=0)
        agent.prompt_templates["system_prompt"] = "You inspect parts. Answer with a tool call."  # short prompt
        return agent

    captured = []
    generate = tiny.generate

    def recording(messages, **kwargs):  # records the agent's first prompt, then generates for real
        if not captured:
            captured.append((list(messages), kwargs.get("tools_to_call_from")))
        return generate(messages, **kwargs)

    tiny.generate = recording
    try:
        make_agent().run(task, images=photo, max_steps=1)  # untrained: no valid call
    except Exception:  # noqa: BLE001 - the untrained model's failure is expected here
        pass
    finally:
        del tiny.generate
    prompt, images = tiny.render(*captured[0])
    assert len(images) == 1  # the agent's first prompt carried the photo
    first = dict(tiny.processor(text=[prompt], images=images, return_tensors="pt"))
    prompt_ids = first["input_ids"]
    tok = tiny.processor.tokenizer
    target_ids = torch.tensor([tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    ids = torch.cat([prompt_ids, target_ids], dim=1)
    labels = ids.clone()
    labels[:, : prompt_ids.shape[1]] = -100
    extra = {k: first[k] for k in ("pixel_values", "image_grid_thw") if first.get(k) is not None}
    assert "pixel_values" in extra  # the agent's first prompt carried the photo
    if first.get("mm_token_type_ids") is not None:
        extra["mm_token_type_ids"] = torch.cat(
            [first["mm_token_type_ids"], torch.zeros_like(target_ids)], dim=1)
    model = tiny.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(300):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **extra).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    model.eval()
    tiny.max_tokens = target_ids.shape[1] + 4
    seen, handle = _vision_hook(tiny)
    try:
        agent = make_agent()
        output = agent.run(task, images=photo, max_steps=1)
    finally:
        handle.remove()
    assert output == answer
    (step,) = [s for s in agent.memory.steps if isinstance(s, ActionStep)]
    assert step.error is None and step.is_final_answer
    assert [(c.name, c.arguments) for c in step.tool_calls] == [("final_answer", {"answer": answer})]
    assert "<tool_call>" in step.model_output_message.raw["text"]  # parsed from Qwen's own format
    assert seen and seen[0][0][1] == 1176  # the image went through the vision tower in that run


def test_qwen2_vl_backend_from_local_path(tmp_path, monkeypatch):
    from agent.models import get_agent_model
    from agent.qwen2_vl import Qwen2VLModel
    from core.settings import Settings

    folder = save_tiny_qwen2_vl(tmp_path / "tiny-qwen2-vl")
    for k in ("DRA_AGENT_BACKEND", "DRA_AGENT_MODEL"):
        monkeypatch.delenv(k, raising=False)
    settings = dataclasses.replace(Settings.from_env(profile="hub", agent_model=str(folder)), agent_max_tokens=3)
    assert settings.agent_backend == "qwen2-vl"
    model, name = get_agent_model(settings)
    assert isinstance(model, Qwen2VLModel)
    # no CUDA here: auto precision is bf16 on the CPU, and the display name says so
    assert name == "qwen2-vl:tiny-qwen2-vl [bf16, cpu]" and next(model.model.parameters()).dtype.is_floating_point
    out = model.generate([ChatMessage(role=MessageRole.USER, content=[
        {"type": "text", "text": "hi"}, {"type": "image", "image": _photo()}])], max_tokens=2)
    assert out.raw["images"] == 1 and len(out.raw["image_grid_thw"]) == 1


def test_qwen2_vl_precision_rule():
    import torch

    from agent.qwen2_vl import choose_precision

    if not torch.cuda.is_available():
        assert choose_precision("auto") == ("bf16", "cpu")
        assert choose_precision("fp32") == ("fp32", "cpu")
        with pytest.raises(ValueError, match="4bit needs a CUDA GPU"):
            choose_precision("4bit")
    with pytest.raises(ValueError, match="DRA_VLM_PRECISION"):
        choose_precision("int3")


def test_qwen2_vl_missing_hub_model_names_the_setting(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    from agent.qwen2_vl import Qwen2VLModel
    from core.profiles import MissingModelError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(MissingModelError, match="DRA_AGENT_MODEL"):
        Qwen2VLModel("Qwen/Qwen2-VL-2B-Instruct")
