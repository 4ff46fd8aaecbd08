"""PatchCore: building the model, fitting a memory bank, scoring images.

Method: PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly
Detection", CVPR 2022, https://arxiv.org/abs/2106.08265) as implemented by
anomalib 2.7 (``anomalib.models.image.patchcore.torch_model.PatchcoreModel``):
locally aware patch features (3x3 average pooling of backbone feature maps,
deeper map bilinearly upsampled and concatenated), memory bank built by
k-center-greedy coreset subsampling (:mod:`models.patchcore.coreset`), nearest-neighbour
patch distances (faiss), the paper's re-weighted image score (9 neighbours) and the
anomaly map generator (nearest upsampling + Gaussian blur).

Backbone: EfficientNet-Lite0 with its packaged ImageNet weights
(:mod:`models.backbones`); anomalib builds its ``TimmFeatureExtractor`` around our
``nn.Module`` (torchvision FX ``create_feature_extractor``, layer names
``_blocks.<i>``), so nothing is downloaded. With runtime ``onnxruntime`` (default) that
extractor is replaced by :class:`models.backbones.OnnxBlockFeatures`: the same module
exported by ``torch.onnx`` and run by ONNX Runtime (same block outputs up to float32
rounding; 2-2.3x faster inspection on this CPU, ``docs/benchmarks.md``). The backbone
may instead name a timm model (e.g. ``wide_resnet50_2``, anomalib's default, hub weights).

:class:`PatchCore` is one fitted memory bank with its thresholds: :meth:`PatchCore.fit`
builds it from images, :meth:`PatchCore.predict` scores images. Persistence is
:mod:`stores.banks`; this module knows no file layout.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import ContextManager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from core.imageio import load_rgb
from core.profiles import require_available
from core.types import InspectionResult
from models.backbones import LITE_MEAN, LITE_STD, load_lite0, load_lite0_onnx, to_tensor
from models.patchcore.anomaly_map import SeparableGaussianBlur, _NoBlurMapGenerator, find_regions
from models.patchcore.calibration import calibrate_threshold, pixel_calibration
from models.patchcore.config import (AUGMENTATIONS, BATCH_SIZE, CORESET_PROJ_DIM, DEFAULT_LITE0_BLOCKS,
                                     DEFAULT_POOL_SIZE, DEFAULT_SIGMA, IMAGENET_MEAN, IMAGENET_STD,
                                     NUM_NEIGHBORS, PIXEL_QUANTILE, SEED, PatchCoreConfig)
from models.patchcore.coreset import greedy_coreset_indices

FORMAT_VERSION = 1
Progress = Callable[[float, str], None]
#: a context manager factory held while a model is built (torch.fx tracing patches torch
#: process-wide; the services pass their model lock's ``exclusive``)
BuildGuard = Callable[[], ContextManager]


# --------------------------------------------------------------------------- backbones


@dataclass(frozen=True)
class BackboneSpec:
    """How to build anomalib's PatchcoreModel for one backbone choice."""

    name: str
    layers: tuple[str, ...]
    label: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def backbone_spec(name: str, blocks: Sequence[int] | None = None) -> BackboneSpec:
    """Resolve a backbone name (``efficientnet-lite0`` or a timm model id).

    Args:
        name: ``efficientnet-lite0`` (offline, packaged weights) or a timm name
            such as ``wide_resnet50_2`` (hub weights; anomalib's default).
        blocks: Lite0 MBConv block indices to take features from (default (4, 7)).
    """
    if name == "efficientnet-lite0":
        blocks = tuple(sorted(blocks or DEFAULT_LITE0_BLOCKS))
        return BackboneSpec(name, tuple(f"_blocks.{b}" for b in blocks),
                            f"efficientnet-lite0[blocks {','.join(map(str, blocks))}]", LITE_MEAN, LITE_STD)
    # timm model (hub weights from the HF cache); "<name>@random" = random init (tests)
    return BackboneSpec(name, ("layer2", "layer3"), f"{name}[layer2,layer3]", IMAGENET_MEAN, IMAGENET_STD)


@lru_cache(maxsize=1)
def faiss_patchcore_class() -> type:
    """The :class:`FaissPatchcoreModel` class (built lazily: importing anomalib takes seconds)."""
    import faiss
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    class FaissPatchcoreModel(PatchcoreModel):
        """anomalib 2.7's ``PatchcoreModel`` with nearest-neighbour search by faiss.

        Everything (feature extraction, pooling, embedding, paper Eq. 7 score,
        anomaly-map generator) is anomalib's; only :meth:`nearest_neighbors` is
        replaced: anomalib computes chunked ``(n, M)`` torch distance matrices
        (``euclidean_dist``, chunks of ``DEFAULT_CHUNK_SIZE`` rows) and takes
        ``min`` / ``topk``; here an exact faiss index over the memory bank
        (``IndexFlatL2``, or ``IndexScalarQuantizer(QT_fp16)`` for a float16
        bank) answers the k-NN query with squared L2 distances, square-rooted.
        The index is rebuilt lazily whenever ``memory_bank`` is replaced.

        Args (besides anomalib's): ``bank_dtype``: ``"float32"`` (exact) or
        ``"float16"`` (half the index memory; distances differ by the fp16
        rounding of the bank, ~1e-3 relative).
        """

        def __init__(self, *args, bank_dtype: str = "float32", **kwargs) -> None:
            if bank_dtype not in ("float32", "float16"):
                raise ValueError(f"bank_dtype must be float32 or float16, got {bank_dtype!r}")
            super().__init__(*args, **kwargs)
            self.bank_dtype = bank_dtype
            self._faiss_index = None
            self._faiss_key: tuple | None = None

        def faiss_index(self):
            """The faiss index over the current ``memory_bank`` (float32 ``(M, D)``), built on first use."""
            bank = self.memory_bank
            key = (bank.data_ptr(), tuple(bank.shape), self.bank_dtype)
            if self._faiss_key != key:
                d = int(bank.shape[1])
                if self.bank_dtype == "float16":
                    index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
                else:
                    index = faiss.IndexFlatL2(d)
                index.add(np.ascontiguousarray(bank.detach().float().cpu().numpy()))
                self._faiss_index, self._faiss_key = index, key
            return self._faiss_index

        def nearest_neighbors(self, embedding: torch.Tensor, n_neighbors: int) -> tuple[torch.Tensor, torch.Tensor]:
            """k nearest memory-bank rows of each embedding row (faiss, exact).

            Args:
                embedding: float ``(n, D)`` patch embeddings.
                n_neighbors: k >= 1.

            Returns:
                ``(distances, indices)``: Euclidean distances (float32) and int64
                bank row indices, shape ``(n,)`` for k = 1 and ``(n, k)`` otherwise
                (anomalib's convention).
            """
            if self.memory_bank.numel() == 0:
                return super().nearest_neighbors(embedding, n_neighbors)
            index = self.faiss_index()
            query = np.ascontiguousarray(embedding.detach().float().cpu().numpy())
            d2, idx = index.search(query, int(n_neighbors))
            dist = torch.from_numpy(d2).clamp_min_(0).sqrt_()
            loc = torch.from_numpy(idx)
            if n_neighbors == 1:
                return dist[:, 0], loc[:, 0]
            return dist, loc

    return FaissPatchcoreModel


#: backbone runtimes of :func:`build_model` (``DRA_PATCHCORE_RUNTIME``)
RUNTIMES = ("onnxruntime", "torch")


def build_model(spec: BackboneSpec, pool_size: int = DEFAULT_POOL_SIZE, *, sigma: float = DEFAULT_SIGMA,
                search: str = "faiss", bank_dtype: str = "float32", runtime: str = "torch"):
    """A fresh PatchCore model (eval mode, empty memory bank) for ``spec``.

    Args:
        spec: backbone and layers (:func:`backbone_spec`).
        pool_size: side of the local neighbourhood average pooling of the
            feature maps (anomalib / the paper use 3, i.e. ``AvgPool2d(3, 1, 1)``;
            odd sizes keep the map size, 1 disables it).
        sigma: Gaussian blur sigma of the anomaly map in pixels of the model
            input (anomalib's ``AnomalyMapGenerator``, default 4; 0 disables it).
        search: ``"faiss"`` (ours: :func:`faiss_patchcore_class` and the map blur
            as :class:`SeparableGaussianBlur`) or ``"torch"`` (anomalib's own
            ``PatchcoreModel``: chunked torch distances, 2-D blur), the reference.
        bank_dtype: ``"float32"`` or ``"float16"`` faiss index (faiss search only).
        runtime: feature extraction of the EfficientNet-Lite0 backbone: ``"torch"``
            (anomalib's ``TimmFeatureExtractor`` around the eager module, the
            reference) or ``"onnxruntime"`` (:class:`models.backbones.OnnxBlockFeatures`,
            same outputs up to float32 rounding, several times faster on this CPU).
            timm backbones always run in torch.

    Raises:
        ValueError: even or non-positive ``pool_size``, negative ``sigma``, unknown ``search``
            or ``runtime``.
    """
    if pool_size < 1 or pool_size % 2 == 0:
        raise ValueError(f"pool_size must be an odd integer >= 1, got {pool_size}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if search not in ("faiss", "torch"):
        raise ValueError(f"search must be 'faiss' or 'torch', got {search!r}")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    from anomalib.models.image.patchcore.anomaly_map import AnomalyMapGenerator
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    cls = faiss_patchcore_class() if search == "faiss" else PatchcoreModel
    extra = {"bank_dtype": bank_dtype} if search == "faiss" else {}
    if spec.name == "efficientnet-lite0":
        blocks = tuple(int(layer.split(".")[1]) for layer in spec.layers)
        backbone = load_lite0(blocks=blocks, pretrained=True, with_head=False).net
        with warnings.catch_warnings():  # torchvision FX: "nodes ... in eval mode are a subsequence ..."
            warnings.simplefilter("ignore", UserWarning)
            model = cls(layers=list(spec.layers), backbone=backbone, pre_trained=False,
                        num_neighbors=NUM_NEIGHBORS, **extra)
        if runtime == "onnxruntime":
            model.feature_extractor = load_lite0_onnx(blocks, pretrained=True)
    else:  # a timm backbone through anomalib's TimmFeatureExtractor (hub profile: wide_resnet50_2)
        timm_name, _, init = spec.name.partition("@")
        if init != "random":  # "<name>@random": random init (tests); else the pretrained weights
            require_available("patchcore_backbone", timm_name)  # cached / local, or a clear error
        model = cls(layers=list(spec.layers), backbone=timm_name, pre_trained=init != "random",
                    num_neighbors=NUM_NEIGHBORS, **extra)
    model.feature_pooler = torch.nn.AvgPool2d(pool_size, 1, pool_size // 2) if pool_size > 1 else torch.nn.Identity()
    if sigma != 4:
        model.anomaly_map_generator = AnomalyMapGenerator(sigma=sigma) if sigma > 0 else _NoBlurMapGenerator()
    if search == "faiss" and sigma > 0:  # our path: same blur as two 1-D passes
        model.anomaly_map_generator.blur = SeparableGaussianBlur(sigma)
    return model.eval()


def preprocess(images: Sequence[np.ndarray], size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB uint8 images of any sizes -> normalised float32 batch ``(B, 3, size, size)``.

    Each image is resized on its own (bilinear, antialiased) so sizes may differ.
    """
    batch = torch.cat([to_tensor(im, size) for im in images])
    lite_mean = torch.tensor(LITE_MEAN).view(1, 3, 1, 1)
    lite_std = torch.tensor(LITE_STD).view(1, 3, 1, 1)
    if tuple(mean) == tuple(LITE_MEAN) and tuple(std) == tuple(LITE_STD):
        return batch
    x01 = batch * lite_std + lite_mean
    return (x01 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def augment_views(rgb: np.ndarray, mode: str = "none") -> list[np.ndarray]:
    """The symmetry views of one image used to enlarge the memory bank.

    Args:
        rgb: uint8 ``(H, W, 3)``.
        mode: key of ``AUGMENTATIONS``: ``none`` (the image), ``hflip`` (+ mirror
            left-right), ``flips`` (+ up-down and both), ``dihedral`` (8 views:
            4 rotations x transpose). PatchCore has no rotation invariance; a
            product photographed in any orientation needs these views in its bank.

    Returns:
        list of contiguous uint8 arrays (views of non-square images are ``(W, H, 3)``
        where transposed / rotated by 90 degrees).

    Raises:
        ValueError: unknown mode.
    """
    if mode not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {mode!r}; choose from {sorted(AUGMENTATIONS)}")
    out = []
    for transpose, k in AUGMENTATIONS[mode]:
        v = np.swapaxes(rgb, 0, 1) if transpose else rgb
        out.append(np.ascontiguousarray(np.rot90(v, k)))
    return out



# --------------------------------------------------------------------------- the fitted model


@dataclass(frozen=True)
class Runtime:
    """How a bank runs on this machine (from the settings; not part of what was fitted).

    Attributes:
        backbone: ``efficientnet-lite0`` or a timm model id (``<id>@random``: random init).
        search: ``faiss`` or ``torch`` (anomalib's chunked distances, the reference).
        bank_dtype: ``float32`` or ``float16`` (faiss index precision).
        runtime: ``onnxruntime`` or ``torch`` feature extraction of EfficientNet-Lite0.
    """

    backbone: str = "efficientnet-lite0"
    search: str = "faiss"
    bank_dtype: str = "float32"
    runtime: str = "onnxruntime"


def model_label(spec: BackboneSpec, cfg: PatchCoreConfig) -> str:
    """The model label stored in meta.json and reported with every result."""
    aug = "" if cfg.augment == "none" else f"/aug-{cfg.augment}"
    tta = "" if cfg.tta == "none" else f"/tta-{cfg.tta}"
    return (f"patchcore/{spec.label}@{cfg.image_size}px/pool{cfg.pool_size}/coreset{cfg.coreset_ratio:g}"
            f"{aug}{tta}")


def new_model(spec: BackboneSpec, cfg: PatchCoreConfig, rt: Runtime, guard: BuildGuard | None = None):
    """:func:`build_model` for a configuration and runtime (under ``guard()``); Eq. 7 on or off."""
    with (guard or contextlib.nullcontext)():
        model = build_model(spec, cfg.pool_size, sigma=cfg.sigma, search=rt.search, bank_dtype=rt.bank_dtype,
                            runtime=rt.runtime)
    if not cfg.reweight:
        model.num_neighbors = 1  # anomalib: image score = max patch distance
    return model


def config_from_meta(meta: dict) -> PatchCoreConfig:
    """The :class:`PatchCoreConfig` recorded in a bank's meta.json."""
    return PatchCoreConfig(blocks=tuple(meta.get("blocks") or PatchCoreConfig().blocks),
                           image_size=int(meta["image_size"]), pool_size=int(meta.get("pool_size", 3)),
                           coreset_ratio=float(meta["coreset_ratio"]), augment=meta.get("augment", "none"),
                           sigma=float(meta.get("sigma", DEFAULT_SIGMA)),
                           reweight=bool(meta.get("reweight", True)), tta=meta.get("tta", "none"))


def _forward(model, images: Sequence[np.ndarray], spec: BackboneSpec, size: int):
    """Run anomalib's PatchcoreModel on images; returns (output, descriptors (B, C)).

    In training mode the output is the patch embedding ``(B*h*w, D)`` (also
    appended to ``model.embedding_store``); in eval mode an ``InferenceBatch``.
    """
    captured: list[torch.Tensor] = []

    def hook(_module, _inp, out):
        captured.append(torch.cat([f.mean(dim=(2, 3)) for f in out.values()], dim=1))

    handle = model.feature_extractor.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            out = model(preprocess(images, size, spec.mean, spec.std))
    finally:
        handle.remove()
    return out, captured[0]


def _forward_views(model, images: Sequence[np.ndarray], spec: BackboneSpec, size: int,
                   views: Sequence[tuple[bool, int]]):
    """Test-time symmetry views: score every view, turn the patch maps back, average.

    The ``V`` views of the ``B`` preprocessed images (square ``size``) go through
    anomalib's feature extractor (``BATCH_SIZE`` images per call), pooling and
    embedding; faiss gives each patch its nearest memory-bank distance; each view's
    ``(h, w)`` map is mapped back to the image's orientation and the ``V`` maps are
    averaged. Image score: the maximum of the averaged map (Eq. 7 needs one nearest bank
    patch per location, which an average of views does not have). The anomaly map is
    anomalib's generator (blur, resize) applied to the averaged map. When the views form
    a group (``hflip``, ``flips``, ``dihedral``), a turned or mirrored image gets the same
    score and the turned map.

    Returns:
        ``(scores (B,) float32, anomaly maps (B, size, size) float32, descriptors (B, C))``;
        descriptors are the global-pooled features of the identity view.
    """
    x = preprocess(images, size, spec.mean, spec.std)
    b = x.shape[0]
    stacked = []
    for transpose, k in views:
        v = x.transpose(2, 3) if transpose else x
        stacked.append(torch.rot90(v, k, dims=(2, 3)))
    with torch.inference_mode():
        x = torch.cat(stacked)
        parts = [model.feature_extractor(x[i:i + BATCH_SIZE]) for i in range(0, x.shape[0], BATCH_SIZE)]
        feats = {layer: torch.cat([p[layer] for p in parts]) for layer in parts[0]}
        desc = torch.cat([f[:b].mean(dim=(2, 3)) for f in feats.values()], dim=1)
        feats = {layer: model.feature_pooler(f) for layer, f in feats.items()}
        emb = model.generate_embedding(feats)
        _, _, h, w = emb.shape
        dist, _ = model.nearest_neighbors(model.reshape_embedding(emb), n_neighbors=1)
        pmaps = dist.reshape(len(views), b, h, w)
        back = []
        for j, (transpose, k) in enumerate(views):  # inverse of rot90(transpose?(img), k)
            m = torch.rot90(pmaps[j], -k, dims=(1, 2))
            back.append(m.transpose(1, 2) if transpose else m)
        mean = torch.stack(back).mean(dim=0)  # (B, h, w)
        scores = mean.reshape(b, -1).amax(dim=1)
        amap = model.anomaly_map_generator(mean[:, None], (size, size))[:, 0]
    return scores.float(), amap.float(), desc


class PatchCore:
    """One fitted PatchCore memory bank with its calibrated thresholds, ready to score images.

    Args:
        model: anomalib ``PatchcoreModel`` (eval mode) with ``memory_bank`` set.
        spec: its backbone (:func:`backbone_spec`).
        meta: the bank's record (the meta.json content: ``threshold``, ``pixel_threshold``,
            ``color_scale``, ``image_size``, ``tta``, ``model``, ...).
        descriptors: float32 ``(N_train, C)`` global features of the training images (to
            find the nearest normal training image).
        train_paths: the training images' file paths (entries may be None).

    Thread safety: one lock serialises the model's forward passes (anomalib's model keeps
    per-call state); share one instance between threads.
    """

    def __init__(self, model, spec: BackboneSpec, meta: dict, descriptors: torch.Tensor,
                 train_paths: list[str | None]):
        self.model, self.spec, self.meta = model, spec, meta
        self.descriptors = descriptors
        self.train_paths = list(train_paths)
        self._lock = threading.Lock()

    @property
    def memory_bank(self) -> torch.Tensor:
        """float32 ``(M, D)`` patch features."""
        return self.model.memory_bank

    @property
    def product(self) -> str:
        """The product id the bank was fitted for."""
        return str(self.meta.get("product", ""))

    @classmethod
    def from_arrays(cls, meta: dict, memory_bank: np.ndarray, descriptors: np.ndarray,
                    train_paths: list[str | None], rt: Runtime, guard: BuildGuard | None = None) -> "PatchCore":
        """Rebuild a fitted bank from its stored arrays (same scores as when it was fitted).

        Args:
            meta: the bank's meta.json dict (its ``backbone`` and configuration are used).
            memory_bank: float ``(M, D)``; descriptors: float32 ``(N_train, C)``.
            train_paths: absolute paths of the training images (or None entries).
            rt: runtime choices (search, dtype, feature runtime); ``rt.backbone`` is ignored.
            guard: held while the model is built (see :data:`BuildGuard`).
        """
        spec = backbone_spec(meta["backbone"], meta.get("blocks"))
        model = new_model(spec, config_from_meta(meta), rt, guard)
        model.memory_bank = torch.from_numpy(np.asarray(memory_bank, dtype=np.float32))
        return cls(model, spec, meta, torch.from_numpy(np.asarray(descriptors, dtype=np.float32)), train_paths)

    # ---- fitting
    @classmethod
    def fit(cls, product: str, train_images: list[np.ndarray], val_normal: list[np.ndarray],
            val_defect: list[np.ndarray] | None = None, *, cfg: PatchCoreConfig, rt: Runtime,
            train_paths: list[str | None] | None = None, symmetry: str | None = None,
            progress: Progress | None = None, guard: BuildGuard | None = None) -> tuple["PatchCore", dict]:
        """Build the memory bank of ``product`` from normal images and calibrate its thresholds.

        Args:
            product: product id (letters, digits, ``-``, ``_``).
            train_images: normal RGB uint8 images ``(H, W, 3)`` (any sizes).
            val_normal: normal validation images (>= 2) for calibration.
            val_defect: defective validation images; with them the image threshold
                maximises Youden's J (:func:`models.patchcore.calibration.calibrate_threshold`).
            cfg: the configuration (:func:`models.patchcore.config.config_for`).
            rt: backbone and runtime choices.
            train_paths: file path of each training image (for ``nearest_normal``).
            symmetry: the symmetry name the views came from (recorded only).
            progress: ``progress(fraction 0..1, message)``; the message of the coreset
                step starts with ``"coreset subsampling"``.
            guard: held while the model is built (only then: feature extraction and the
                coreset run outside it, so inspections go on during a fit).

        Thresholds: image threshold by ``calibrate_threshold``; pixel threshold and colour
        scale by :func:`models.patchcore.calibration.pixel_calibration`.

        Returns:
            ``(patchcore, summary)`` with summary ``{"bank_size", "threshold",
            "pixel_threshold", "coreset_s", "image_auroc" (if defects)}``.

        Raises:
            ValueError: bad product id, no training images, < 2 val normals, too few
                patches for the coreset ratio, a train_paths list of the wrong length.
        """
        if not product or not all(c.isalnum() or c in "-_" for c in product):
            raise ValueError(f"invalid product id {product!r}: use letters, digits, '-' or '_'")
        if not train_images:
            raise ValueError(f"no training images for product {product!r}")
        if len(val_normal) < 2:
            raise ValueError("fit needs at least 2 normal validation images for threshold calibration")
        if train_paths is not None and len(train_paths) != len(train_images):
            raise ValueError("train_paths must have one entry per training image")
        report = progress or (lambda _f, _m: None)
        train_images = [load_rgb(im) for im in train_images]
        val_normal = [load_rgb(im) for im in val_normal]
        val_defect = [load_rgb(im) for im in (val_defect or [])]

        spec = backbone_spec(rt.backbone, cfg.blocks)
        model = new_model(spec, cfg, rt, guard)
        model.train()
        model.feature_extractor.eval()  # BatchNorm keeps its running statistics
        descs = []
        n = len(train_images)
        n_views = len(AUGMENTATIONS[cfg.augment])
        total = n * n_views
        done = 0
        for view in range(n_views):  # view 0 = the images themselves (their descriptors are kept)
            for i in range(0, n, BATCH_SIZE):
                batch = [augment_views(im, cfg.augment)[view] if view else im for im in train_images[i:i + BATCH_SIZE]]
                _, desc = _forward(model, batch, spec, cfg.image_size)
                if view == 0:
                    descs.append(desc)
                done += len(batch)
                report(0.5 * done / total, f"patch features {done}/{total}")
        n_patches = sum(e.shape[0] for e in model.embedding_store)
        if int(n_patches * cfg.coreset_ratio) < 1:
            raise ValueError(f"coreset ratio {cfg.coreset_ratio} keeps no patch of {n_patches}")
        report(0.5, f"coreset subsampling {n_patches} patches x {cfg.coreset_ratio}")
        t_core = time.perf_counter()
        # same steps as anomalib's PatchcoreModel.subsample_embedding, with the O(N) greedy coreset
        embedding = torch.vstack(model.embedding_store)
        model.embedding_store.clear()
        picks = greedy_coreset_indices(embedding, int(n_patches * cfg.coreset_ratio), seed=SEED,
                                       proj_dim=CORESET_PROJ_DIM,
                                       progress=lambda f: report(0.5 + 0.3 * f, "coreset subsampling"))
        model.memory_bank = embedding[torch.as_tensor(picks)].contiguous()
        del embedding
        coreset_s = time.perf_counter() - t_core
        model.eval()
        pc = cls(model, spec, {"image_size": cfg.image_size, "pool_size": cfg.pool_size, "tta": cfg.tta},
                 torch.cat(descs), list(train_paths or [None] * n))

        report(0.8, "calibrating thresholds on the validation split")
        scores, maps, _ = pc.predict_maps(val_normal + val_defect)
        scores = scores.numpy().astype(np.float64)
        maps = maps.numpy()
        nn_ = len(val_normal)
        normal_scores, defect_scores = scores[:nn_], scores[nn_:]
        threshold, rule = calibrate_threshold(normal_scores.tolist(), defect_scores.tolist())
        pixel_threshold, vmin, vmax = pixel_calibration(maps[:nn_], maps[nn_:] if len(val_defect) else None)
        summary = {"bank_size": int(model.memory_bank.shape[0]), "threshold": threshold,
                   "pixel_threshold": pixel_threshold, "coreset_s": round(coreset_s, 2)}
        if len(val_defect):
            from sklearn.metrics import roc_auc_score

            labels = np.r_[np.zeros(nn_), np.ones(len(val_defect))]
            summary["image_auroc"] = float(roc_auc_score(labels, scores))
        pc.meta = {
            "format_version": FORMAT_VERSION,
            "product": product,
            "method": "PatchCore (Roth et al. 2022), anomalib 2.7 PatchcoreModel",
            "model": model_label(spec, cfg),
            "backbone": spec.name,
            "layers": list(spec.layers),
            "blocks": list(cfg.blocks) if spec.name == "efficientnet-lite0" else None,
            "image_size": cfg.image_size,
            "pool_size": cfg.pool_size,
            "coreset_ratio": cfg.coreset_ratio,
            "augment": cfg.augment,
            "augment_views": n_views,
            "sigma": cfg.sigma,
            "reweight": cfg.reweight,
            "tta": cfg.tta,
            "tta_views": len(AUGMENTATIONS[cfg.tta]),
            "symmetry": symmetry,
            "image_score_rule": (f"max of the patch distances averaged over {len(AUGMENTATIONS[cfg.tta])} "
                                 f"test-time views ({cfg.tta})") if cfg.tta != "none"
                                else "paper Eq. 7 re-weighted max patch distance (9 neighbours)" if cfg.reweight
                                else "max patch distance",
            "bank_dtype": rt.bank_dtype,
            "coreset_rule": f"k-center greedy, seed {SEED}, random projection to {CORESET_PROJ_DIM} dims"
                            if CORESET_PROJ_DIM else f"k-center greedy, seed {SEED}",
            "num_neighbors": NUM_NEIGHBORS,
            "bank_size": summary["bank_size"],
            "n_patches": int(n_patches),
            "embedding_dim": int(model.memory_bank.shape[1]),
            "n_train": n,
            "n_val_normal": nn_,
            "n_val_defect": len(val_defect),
            "threshold": threshold,
            "threshold_rule": rule,
            "pixel_threshold": pixel_threshold,
            "pixel_threshold_rule": f"quantile {PIXEL_QUANTILE} of normal val pixel scores",
            "color_scale": [vmin, vmax],
            "color_scale_rule": "vmin = median normal val pixel; vmax = q0.995 defect val pixels (>= 1.25 x pixel thr)",
            "val_normal_scores": [round(float(s), 6) for s in normal_scores],
            "val_defect_scores": [round(float(s), 6) for s in defect_scores],
            "image_auroc_val": summary.get("image_auroc"),
            "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        return pc, summary

    # ---- inference
    def predict_maps(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores ``(B,)``, anomaly maps ``(B, S, S)`` at the model's input size ``S`` and descriptors ``(B, C)``."""
        size = int(self.meta["image_size"])
        tta = self.meta.get("tta", "none")
        scores, maps, descs = [], [], []
        with self._lock:
            for i in range(0, len(images), BATCH_SIZE):
                if tta != "none":
                    score, amap, desc = _forward_views(self.model, images[i:i + BATCH_SIZE], self.spec, size,
                                                       AUGMENTATIONS[tta])
                    scores.append(score)
                    maps.append(amap)
                else:
                    out, desc = _forward(self.model, images[i:i + BATCH_SIZE], self.spec, size)
                    scores.append(out.pred_score.reshape(-1))
                    maps.append(out.anomaly_map[:, 0])
                descs.append(desc)
        return torch.cat(scores), torch.cat(maps), torch.cat(descs)

    def predict(self, images: Sequence[np.ndarray]) -> list[InspectionResult]:
        """Score RGB uint8 images ``(H, W, 3)`` of any size; results in input order.

        Anomaly maps come back at each input's resolution (bilinear). ``elapsed_ms`` of
        each result is the batch wall time divided by its length.

        Raises:
            core.imageio.InvalidImageError: an input that is not an image.
        """
        t0 = time.perf_counter()
        rgbs = [load_rgb(im) for im in images]
        if not rgbs:
            return []
        scores, maps, descs = self.predict_maps(rgbs)
        nearest = (torch.cdist(descs, self.descriptors).argmin(dim=1).tolist()
                   if self.descriptors.numel() else [])
        meta = self.meta
        thr, pthr = float(meta["threshold"]), float(meta["pixel_threshold"])
        cscale = (float(meta["color_scale"][0]), float(meta["color_scale"][1]))
        partial = []
        for i, rgb in enumerate(rgbs):
            h, w = rgb.shape[:2]
            amap = maps[i]
            if tuple(amap.shape) != (h, w):
                amap = F.interpolate(amap[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            amap = amap.numpy().astype(np.float32)
            mask = amap >= pthr
            near = self.train_paths[nearest[i]] if nearest else None
            partial.append((float(scores[i]), amap, mask, find_regions(mask, amap), near))
        per = (time.perf_counter() - t0) * 1000.0 / len(rgbs)
        return [InspectionResult(product=self.product, score=s, threshold=thr, is_anomalous=bool(s >= thr),
                                 anomaly_map=a, mask=m, regions=r, nearest_normal=nn_, model=meta["model"],
                                 elapsed_ms=per, pixel_threshold=pthr, color_scale=cscale)
                for s, a, m, r, nn_ in partial]
