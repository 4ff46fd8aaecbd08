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

from core.blas import import_faiss
from core.imageio import load_rgb
from core.profiles import require_available
from core.types import InspectionResult
from models.backbones import LITE_MEAN, LITE_STD, load_lite0, load_lite0_onnx, to_tensor
from models.patchcore.anomaly_map import SeparableGaussianBlur, _NoBlurMapGenerator, find_regions
from models.patchcore.calibration import (calibrate_threshold, fpr_threshold, normal_spread, pixel_calibration,
                                          size_slope, verdict_margin)
from models.patchcore.config import (AUGMENTATIONS, BATCH_SIZE, CORESET_CANDIDATES, CORESET_PROJ_DIM,
                                     DEFAULT_LITE0_BLOCKS, DEFAULT_POOL_SIZE, DEFAULT_SIGMA, IMAGENET_MEAN,
                                     IMAGENET_STD, MAX_FOLD_BANK, MIN_INPUT_SIDE, NUM_NEIGHBORS, PIXEL_QUANTILE, SEED,
                                     UNCERTAIN_BAND, PatchCoreConfig)
from models.patchcore.coreset import greedy_coreset_indices
from models.patchcore.simplenet import NOISE_SIGMA, STEPS, SimpleNetHead, train_head
from models.patchcore.texture import LAYER as TEXTURE_LAYER
from models.patchcore.texture import TextureFeatures

#: row / column step of the texture features (every 2nd pixel; the anomaly map is upsampled back)
TEXTURE_STRIDE = 2

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
    if name == "texture":  # pixel-level texture statistics (models.patchcore.texture), RGB in 0..1
        return BackboneSpec(name, (TEXTURE_LAYER,), f"texture[hessian+gradient+local stats, stride {TEXTURE_STRIDE}]",
                            (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    if name == "efficientnet-lite0":
        blocks = tuple(sorted(blocks or DEFAULT_LITE0_BLOCKS))
        return BackboneSpec(name, tuple(f"_blocks.{b}" for b in blocks),
                            f"efficientnet-lite0[blocks {','.join(map(str, blocks))}]", LITE_MEAN, LITE_STD)
    # timm model (hub weights from the HF cache); "<name>@random" = random init (tests)
    return BackboneSpec(name, ("layer2", "layer3"), f"{name}[layer2,layer3]", IMAGENET_MEAN, IMAGENET_STD)


@lru_cache(maxsize=1)
def faiss_patchcore_class() -> type:
    """The :class:`FaissPatchcoreModel` class (built lazily: importing anomalib takes seconds)."""
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    faiss = import_faiss()

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
    if spec.name == "texture":  # anomalib's model around the Lite0 module, its extractor swapped for ours
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = cls(layers=["_blocks.0"], backbone=load_lite0(blocks=(0,), pretrained=False).net,
                        pre_trained=False, num_neighbors=NUM_NEIGHBORS, **extra)
        model.layers = list(spec.layers)
        model.feature_extractor = TextureFeatures(TEXTURE_STRIDE)
    elif spec.name == "efficientnet-lite0":
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


def image_score_rule(cfg: PatchCoreConfig) -> str:
    """How a bank's image score is computed, in words (recorded in meta.json)."""
    views = len(AUGMENTATIONS[cfg.tta])
    what = "SimpleNet head's patch scores" if cfg.scorer == "simplenet" else "patch distances"
    if cfg.tta != "none":
        rule = f"max of the {what} averaged over {views} test-time views ({cfg.tta})"
    elif cfg.score_norm == "median" or cfg.scorer == "simplenet":  # one view through _views_forward: no Eq. 7
        rule = "max SimpleNet head's patch score" if cfg.scorer == "simplenet" else "max patch distance"
    else:
        return "paper Eq. 7 re-weighted max patch distance (9 neighbours)" if cfg.reweight else "max patch distance"
    med = " minus the photo's median patch " + ("score" if cfg.scorer == "simplenet" else "distance")
    return rule + (med if cfg.score_norm == "median" else "")


def model_label(spec: BackboneSpec, cfg: PatchCoreConfig) -> str:
    """The model label stored in meta.json and reported with every result."""
    aug = "" if cfg.augment == "none" else f"/aug-{cfg.augment}"
    tta = "" if cfg.tta == "none" else f"/tta-{cfg.tta}"
    if cfg.image_size > 0:
        size = f"{cfg.image_size}px"
    else:
        size = "native" if cfg.pixel_scale == 1.0 else f"native-x{cfg.pixel_scale:g}"
    gray = "/gray" if cfg.input_norm == "gray" else ""
    rel = "/relative" if cfg.score_norm == "median" else ""
    scorer = "/simplenet" if cfg.scorer == "simplenet" else ""
    return (f"patchcore/{spec.label}@{size}{gray}/pool{cfg.pool_size}/coreset{cfg.coreset_ratio:g}"
            f"{aug}{tta}{rel}{scorer}")


def new_model(spec: BackboneSpec, cfg: PatchCoreConfig, rt: Runtime, guard: BuildGuard | None = None):
    """:func:`build_model` for a configuration and runtime (under ``guard()``); Eq. 7 on or off."""
    with (guard or contextlib.nullcontext)():
        model = build_model(spec, cfg.pool_size, sigma=cfg.sigma, search=rt.search, bank_dtype=rt.bank_dtype,
                            runtime=rt.runtime)
    if not cfg.reweight:
        model.num_neighbors = 1  # anomalib: image score = max patch distance
    return model


def config_from_meta(meta: dict) -> PatchCoreConfig:
    """The :class:`PatchCoreConfig` recorded in a bank's meta.json (banks before native scale: fixed size)."""
    return PatchCoreConfig(blocks=tuple(meta.get("blocks") or PatchCoreConfig().blocks),
                           image_size=int(meta["image_size"]), pixel_scale=float(meta.get("pixel_scale", 1.0)),
                           input_norm=str(meta.get("input_norm", "rgb")), pool_size=int(meta.get("pool_size", 3)),
                           coreset_ratio=float(meta["coreset_ratio"]), augment=meta.get("augment", "none"),
                           sigma=float(meta.get("sigma", DEFAULT_SIGMA)),
                           reweight=bool(meta.get("reweight", True)), tta=meta.get("tta", "none"),
                           fold_bank=int(meta.get("fold_bank", MAX_FOLD_BANK)),
                           score_norm=str(meta.get("score_norm", "none")),
                           features=str(meta.get("features", "lite0")),
                           scorer=str(meta.get("scorer", "knn")), head_steps=int(meta.get("head_steps", STEPS)))


def model_input_size(height: int, width: int, cfg: PatchCoreConfig) -> tuple[int, int]:
    """``(h, w)`` in pixels of the model input for a ``height x width`` photo under ``cfg``.

    Native scale (``image_size == 0``): ``round(side * pixel_scale)``; else the square
    ``image_size``.
    """
    if cfg.image_size > 0:
        return cfg.image_size, cfg.image_size
    s = float(cfg.pixel_scale)
    return max(1, int(round(height * s))), max(1, int(round(width * s)))


def prepare(rgb: np.ndarray, cfg: PatchCoreConfig, spec: BackboneSpec) -> torch.Tensor:
    """One RGB uint8 photo ``(H, W, 3)`` -> the normalised float32 model input ``(1, 3, h, w)``.

    Steps: to 0..1; with ``cfg.input_norm == "gray"`` Rec. 601 luminance in all three
    channels; resize (bilinear, antialiased) to :func:`model_input_size` (nothing at
    native scale with ``pixel_scale`` 1); normalise with the backbone's mean / std.

    Raises:
        ValueError: the model input would have a side below ``MIN_INPUT_SIDE`` (64 px).
    """
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255.0
    if cfg.input_norm == "gray":
        x = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]).repeat(1, 3, 1, 1)
    h, w = model_input_size(x.shape[-2], x.shape[-1], cfg)
    if min(h, w) < MIN_INPUT_SIDE:
        raise ValueError(f"the photo is too small: {rgb.shape[0]}x{rgb.shape[1]} px gives a {h}x{w} px model input "
                         f"(at least {MIN_INPUT_SIDE} px per side)")
    if (h, w) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (x - mean) / std


def shape_groups(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of same-shaped tensors, in first-seen order, each group split into ``BATCH_SIZE`` chunks."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(tuple(t.shape), []).append(i)
    return [idx[j:j + BATCH_SIZE] for idx in groups.values() for j in range(0, len(idx), BATCH_SIZE)]


def _forward(model, images, spec: BackboneSpec, size: int | None = None):
    """Run anomalib's PatchcoreModel on a batch; returns (output, descriptors (B, C)).

    ``images`` is a normalised float32 batch ``(B, 3, h, w)``, or RGB uint8 arrays that are
    resized to the square ``size`` (:func:`preprocess`, the fixed-size path). In training mode
    the output is the patch embedding ``(B*h*w, D)`` (also appended to
    ``model.embedding_store``); in eval mode an ``InferenceBatch`` whose anomaly map has
    the batch's size.
    """
    captured: list[torch.Tensor] = []

    def hook(_module, _inp, out):
        captured.append(torch.cat([f.mean(dim=(2, 3)) for f in out.values()], dim=1))

    x = images if isinstance(images, torch.Tensor) else preprocess(images, size, spec.mean, spec.std)
    handle = model.feature_extractor.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            out = model(x)
    finally:
        handle.remove()
    return out, captured[0]


#: patches per nearest-neighbour query of :func:`_views_forward` (float32 rows of the embedding:
#: 32,768 x 120 dims = 15.7 MB; 2 photos x 8 views at 256 px = 16,384 rows)
SEARCH_ROWS = 32_768


def _views_forward(model, x: torch.Tensor, views: Sequence[tuple[bool, int]], relative: bool = False,
                   head: SimpleNetHead | None = None):
    """Test-time symmetry views of a same-shaped batch ``x (B, 3, h, w)``: averaged patch-distance map.

    Each view (``np.rot90(transpose?(img), k)``) goes through anomalib's feature extractor,
    pooling and embedding; faiss gives each patch its nearest memory-bank distance; the
    view's ``(h', w')`` map is turned back to the image's orientation and the views are
    averaged. The photos run ``BATCH_SIZE`` at a time; the patches of all views of those
    photos go to the search as one query of up to ``SEARCH_ROWS`` patches (on 2 cores faiss
    answers 8 views' patches at once in about a quarter of the time of 8 separate queries:
    ``docs/benchmarks.md``; the cap bounds the memory of large photos). A
    transposed view of a non-square input has the other grid shape; its rows are split off
    by their own shape. Image score: the maximum of the averaged map (Eq. 7 needs one nearest
    bank patch per location, which an average of views does not have). With ``relative`` each
    photo's averaged map is moved by its own median patch distance
    (:attr:`PatchCoreConfig.score_norm` ``median``), so maps and scores may be negative. With a
    ``head`` (:mod:`models.patchcore.simplenet`) a patch's score is the head's instead of its
    nearest-neighbour distance; everything else is the same.

    Returns:
        ``(scores (B,), averaged patch maps (B, h', w'), anomaly maps (B, h, w), descriptors (B, C))``,
        float32; descriptors are the global-pooled features of the identity view.
    """
    b = x.shape[0]
    means, descs = [], []
    with torch.inference_mode():
        for start in range(0, b, BATCH_SIZE):  # a few photos at a time: all their views, one search
            xc = x[start:start + BATCH_SIZE]
            bc = xc.shape[0]
            embs, grids, dists = [], [], []
            for transpose, k in views:
                v = xc.transpose(2, 3) if transpose else xc
                v = torch.rot90(v, k, dims=(2, 3))
                feats = model.feature_extractor(v)
                if not grids:  # the identity view comes first
                    descs.append(torch.cat([f.mean(dim=(2, 3)) for f in feats.values()], dim=1))
                feats = {layer: model.feature_pooler(f) for layer, f in feats.items()}
                emb = model.generate_embedding(feats)
                grids.append(tuple(emb.shape[-2:]))
                embs.append(model.reshape_embedding(emb))
                last = len(grids) == len(views)
                if last or sum(e.shape[0] for e in embs) >= SEARCH_ROWS:  # one query per SEARCH_ROWS patches
                    q = torch.cat(embs)
                    dists.append(head.patch_scores(q) if head is not None
                                 else model.nearest_neighbors(q, n_neighbors=1)[0])
                    embs = []
            dist = torch.cat(dists)
            back, offset = [], 0
            for (transpose, k), (h, w) in zip(views, grids):
                m = dist[offset:offset + bc * h * w].reshape(bc, h, w)
                offset += bc * h * w
                m = torch.rot90(m, -k, dims=(1, 2))  # inverse of rot90(transpose?(img), k)
                back.append(m.transpose(1, 2) if transpose else m)
            means.append(torch.stack(back).mean(dim=0))  # (bc, h', w')
        mean = torch.cat(means)
        desc = torch.cat(descs)
        if relative:  # image-relative: distance above the photo's own median patch distance
            mean = mean - mean.reshape(b, -1).median(dim=1).values.view(b, 1, 1)
        scores = mean.reshape(b, -1).amax(dim=1)
        amap = model.anomaly_map_generator(mean[:, None], tuple(x.shape[-2:]))[:, 0]
    return scores.float(), mean.float(), amap.float(), desc


def _forward_views(model, images: Sequence[np.ndarray], spec: BackboneSpec, size: int,
                   views: Sequence[tuple[bool, int]]):
    """:func:`_views_forward` on RGB uint8 images resized to the square ``size`` (the fixed-size path).

    Returns:
        ``(scores (B,) float32, anomaly maps (B, size, size) float32, descriptors (B, C))``.
    """
    scores, _, amap, desc = _views_forward(model, preprocess(images, size, spec.mean, spec.std), views)
    return scores, amap, desc


def _patch_embeddings(model, images: list[np.ndarray], cfg: PatchCoreConfig, spec: BackboneSpec) -> torch.Tensor:
    """``(N, D)`` float32 patch embeddings of ``images`` (identity view, :func:`prepare`d as the bank's inputs).

    The same features the memory bank holds: the model's feature extractor, pooling and
    ``generate_embedding`` (anomalib's ``PatchcoreModel``); N = the patches of all images.
    """
    xs = [prepare(im, cfg, spec) for im in images]
    rows = []
    with torch.inference_mode():
        for idx in shape_groups(xs):
            feats = model.feature_extractor(torch.cat([xs[i] for i in idx]))
            feats = {layer: model.feature_pooler(f) for layer, f in feats.items()}
            rows.append(model.reshape_embedding(model.generate_embedding(feats)).float())
    return torch.cat(rows).clone()


def _coreset_bank(model, images: list[np.ndarray], n_desc: int, cfg: PatchCoreConfig, spec: BackboneSpec,
                  cap: int | None, report: Progress) -> tuple[torch.Tensor, int, torch.Tensor, bool]:
    """Patch embeddings of ``images`` in every bank view (``cfg.augment``), subsampled by the greedy coreset.

    Returns:
        ``(bank (M, D) float32, number of patches, descriptors (n_desc, C) of the first n_desc images,
        whether the coreset ran over a random subset)``. ``M = int(patches * cfg.coreset_ratio)``,
        at most ``cap`` (and at most ``CORESET_CANDIDATES``).

    Raises:
        ValueError: the ratio keeps no patch.
    """
    model.train()
    model.feature_extractor.eval()  # BatchNorm keeps its running statistics
    model.embedding_store.clear()
    n_views = len(AUGMENTATIONS[cfg.augment])
    total, done = len(images) * n_views, 0
    descs: dict[int, torch.Tensor] = {}
    for view in range(n_views):  # view 0 = the images themselves (their descriptors are kept)
        xs = [prepare(augment_views(im, cfg.augment)[view] if view else im, cfg, spec) for im in images]
        for idx in shape_groups(xs):
            _, desc = _forward(model, torch.cat([xs[i] for i in idx]), spec)
            if view == 0:
                descs.update({i: d for i, d in zip(idx, desc) if i < n_desc})
            done += len(idx)
            report(0.6 * done / total, f"patch features {done}/{total}")
    n_patches = sum(e.shape[0] for e in model.embedding_store)
    n_select = int(n_patches * cfg.coreset_ratio)
    if n_select < 1:
        raise ValueError(f"coreset ratio {cfg.coreset_ratio} keeps no patch of {n_patches}")
    if cap:
        n_select = min(n_select, int(cap))
    report(0.6, f"coreset subsampling {n_patches} patches x {cfg.coreset_ratio}")
    # same steps as anomalib's PatchcoreModel.subsample_embedding, with the O(N) greedy coreset
    embedding = torch.vstack(model.embedding_store)
    model.embedding_store.clear()
    sampled = bool(CORESET_CANDIDATES and n_patches > CORESET_CANDIDATES)
    if sampled:  # the greedy coreset over a seeded random subset of the patches
        gen = torch.Generator().manual_seed(SEED)
        embedding = embedding[torch.randperm(n_patches, generator=gen)[:CORESET_CANDIDATES]]
        n_select = min(n_select, int(CORESET_CANDIDATES))
    picks = greedy_coreset_indices(embedding, n_select, seed=SEED, proj_dim=CORESET_PROJ_DIM,
                                   progress=lambda f: report(0.6 + 0.4 * f, "coreset subsampling"))
    bank = embedding[torch.as_tensor(picks)].contiguous()
    desc = torch.stack([descs[i] for i in range(n_desc)]) if n_desc else torch.zeros(0, 0)
    model.eval()
    return bank, int(n_patches), desc, sampled


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
        head: the SimpleNet-style patch scorer of a ``scorer="simplenet"`` bank (else None).

    Thread safety: one lock serialises the model's forward passes (anomalib's model keeps
    per-call state); share one instance between threads.
    """

    def __init__(self, model, spec: BackboneSpec, meta: dict, descriptors: torch.Tensor,
                 train_paths: list[str | None], head: SimpleNetHead | None = None):
        self.model, self.spec, self.meta = model, spec, meta
        self.head = head
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
                    train_paths: list[str | None], rt: Runtime, guard: BuildGuard | None = None,
                    head: SimpleNetHead | None = None) -> "PatchCore":
        """Rebuild a fitted bank from its stored arrays (same scores as when it was fitted).

        Args:
            meta: the bank's meta.json dict (its ``backbone`` and configuration are used).
            memory_bank: float ``(M, D)``; descriptors: float32 ``(N_train, C)``.
            train_paths: absolute paths of the training images (or None entries).
            rt: runtime choices (search, dtype, feature runtime); ``rt.backbone`` is ignored.
            guard: held while the model is built (see :data:`BuildGuard`).
            head: the stored SimpleNet-style head of a ``scorer="simplenet"`` bank.

        Raises:
            ValueError: a ``simplenet`` bank without its head.
        """
        if meta.get("scorer", "knn") == "simplenet" and head is None:
            raise ValueError("a bank with scorer 'simplenet' needs its head (head.safetensors)")
        spec = backbone_spec(meta["backbone"], meta.get("blocks"))
        model = new_model(spec, config_from_meta(meta), rt, guard)
        model.memory_bank = torch.from_numpy(np.asarray(memory_bank, dtype=np.float32))
        return cls(model, spec, meta, torch.from_numpy(np.asarray(descriptors, dtype=np.float32)), train_paths, head)

    # ---- fitting
    @classmethod
    def fit(cls, product: str, train_images: list[np.ndarray], val_normal: list[np.ndarray],
            val_defect: list[np.ndarray] | None = None, *, cfg: PatchCoreConfig, rt: Runtime,
            train_paths: list[str | None] | None = None, symmetry: str | None = None,
            bank_extra: list[np.ndarray] | None = None, head_extra: list[np.ndarray] | None = None,
            target_fpr: float | None = None, cross_fit: bool = False, uncertain_band: float = UNCERTAIN_BAND,
            progress: Progress | None = None, guard: BuildGuard | None = None) -> tuple["PatchCore", dict]:
        """Build the memory bank of ``product`` from normal images and calibrate its thresholds.

        Args:
            product: product id (letters, digits, ``-``, ``_``).
            train_images: normal RGB uint8 images ``(H, W, 3)`` (any sizes; at native scale
                they are used as they are, times ``cfg.pixel_scale``).
            val_normal: normal calibration images (>= 2) the bank of ``train_images`` does not
                contain, ideally under the acquisition changes a line sees. With ``cross_fit`` they
                also form a second bank (see below).
            val_defect: defective validation images (optional): reported (``image_auroc``)
                and, without ``target_fpr``, used by the legacy Youden rule.
            cfg: the configuration (:func:`models.patchcore.config.config_for`).
            rt: backbone and runtime choices.
            train_paths: file path of each training image (for ``nearest_normal``).
            symmetry: the symmetry name the views came from (recorded only).
            bank_extra: more normal images for the memory bank only (e.g. acquisition changes
                of ``train_images``); not nearest-normal references.
            head_extra: with ``cfg.scorer == "simplenet"``: more normal images the head is trained
                on besides ``train_images`` (e.g. acquisition changes of them); unused otherwise.
            target_fpr: the false-positive rate the image threshold aims at on the
                calibration normals (:func:`models.patchcore.calibration.fpr_threshold`);
                None: the legacy rule (:func:`models.patchcore.calibration.calibrate_threshold`).
            cross_fit: two-fold calibration: the memory bank is bank A (``train_images`` +
                ``bank_extra``) and bank B (``val_normal``), each a coreset of at most
                ``cfg.fold_bank`` patches, so the bank covers every normal given; the threshold comes
                from out-of-fold scores only: bank A on ``val_normal``, bank B on as many of
                ``train_images + bank_extra``. Without it the bank is bank A and the calibration
                normals are scored by it. Ignored with ``cfg.scorer == "simplenet"``: the head is
                trained on ``train_images + head_extra`` and scores the calibration normals, which
                it has not seen.
            uncertain_band: a verdict whose margin is within this many normal spreads of the
                threshold is reported as uncertain (recorded in meta.json).
            progress: ``progress(fraction 0..1, message)``; the message of the coreset
                step starts with ``"coreset subsampling"``.
            guard: held while the model is built (only then: feature extraction and the
                coreset run outside it, so inspections go on during a fit).

        Thresholds: image threshold, normal score spread; pixel threshold and colour scale by
        :func:`models.patchcore.calibration.pixel_calibration`.

        Returns:
            ``(patchcore, summary)`` with summary ``{"bank_size", "threshold",
            "pixel_threshold", "coreset_s", "image_auroc" (if defects)}``.

        Raises:
            ValueError: bad product id, no training images, < 2 val normals, too few
                patches for the coreset ratio, a train_paths list of the wrong length, a
                photo too small for the model input.
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
        simplenet = cfg.scorer == "simplenet"
        cross_fit = cross_fit and not simplenet
        train_images = [load_rgb(im) for im in train_images]
        extra = [load_rgb(im) for im in (bank_extra or [])]
        val_normal = [load_rgb(im) for im in val_normal]
        val_defect = [load_rgb(im) for im in (val_defect or [])]

        spec = backbone_spec("texture" if cfg.features == "texture" else rt.backbone, cfg.blocks)
        model = new_model(spec, cfg, rt, guard)
        n = len(train_images)
        t_core = time.perf_counter()
        cap = cfg.fold_bank if cross_fit else None
        bank_a, n_a, descs, cand_a = _coreset_bank(model, train_images + extra, n, cfg, spec, cap,
                                                   lambda f, m: report((0.45 if cross_fit else 0.75) * f, m))
        folds = [bank_a]
        n_patches, sampled = n_a, cand_a
        if cross_fit:
            bank_b, n_b, _, cand_b = _coreset_bank(model, val_normal, 0, cfg, spec, cap,
                                                   lambda f, m: report(0.45 + 0.3 * f, f"calibration fold: {m}"))
            folds.append(bank_b)
            n_patches, sampled = n_a + n_b, cand_a or cand_b
        coreset_s = time.perf_counter() - t_core
        model.eval()
        head, head_s, head_rows = None, 0.0, 0
        if simplenet:
            report(0.76, "training the SimpleNet head on the train normals' patches")
            t_head = time.perf_counter()
            rows = _patch_embeddings(model, train_images + [load_rgb(im) for im in (head_extra or [])], cfg, spec)
            head, head_rows = train_head(rows, NOISE_SIGMA, cfg.head_steps, seed=SEED), int(rows.shape[0])
            head_s = time.perf_counter() - t_head
        pc = cls(model, spec, {"image_size": cfg.image_size, "pixel_scale": cfg.pixel_scale,
                               "input_norm": cfg.input_norm, "pool_size": cfg.pool_size, "tta": cfg.tta,
                               "score_norm": cfg.score_norm, "scorer": cfg.scorer},
                 descs, list(train_paths or [None] * n), head)

        report(0.8, "calibrating thresholds on the calibration normals")
        # out-of-fold scores: bank A (train normals) scores the calibration normals; with cross-fitting
        # bank B (the calibration normals) scores as many of the train normals and their copies
        model.memory_bank = bank_a
        scores_a, maps_a, _, pm_a = pc.predict_maps(val_normal, patch_maps=True)
        normal_scores, normal_maps = scores_a.numpy().astype(np.float64), [m.numpy() for m in maps_a]
        patch_maps = [m.numpy() for m in pm_a]
        defect_scores, defect_maps = np.zeros(0), []
        if val_defect:  # by bank A too: the same (out-of-fold) footing as the calibration normals
            ds, dm, _ = pc.predict_maps(val_defect)
            defect_scores, defect_maps = ds.numpy().astype(np.float64), [m.numpy() for m in dm]
        if cross_fit:
            model.memory_bank = folds[1]
            side = (train_images + extra)[:len(val_normal)]
            scores_b, maps_b, _, pm_b = pc.predict_maps(side, patch_maps=True)
            normal_scores = np.r_[normal_scores, scores_b.numpy().astype(np.float64)]
            normal_maps += [m.numpy() for m in maps_b]
            patch_maps += [m.numpy() for m in pm_b]
        model.memory_bank = torch.cat(folds).contiguous()
        nn_ = len(normal_scores)
        # the image score is a max over patches: it grows with the photo's area; calibrate at a reference
        # area and move the threshold with ln(area) (size_slope from the calibration maps themselves)
        areas = np.array([float(m.shape[0] * m.shape[1]) for m in normal_maps])
        slope = size_slope(patch_maps) if target_fpr is not None else 0.0
        ref_area = float(np.median(areas))
        adjusted = normal_scores - slope * np.log(areas / ref_area)
        if target_fpr is not None:
            threshold, spread, rule = fpr_threshold(adjusted.tolist(), target_fpr)
            if slope > 0:
                rule += f"; at a reference area of {ref_area:.0f} px, + {slope:.3f} x ln(area / reference) per photo"
        else:
            threshold, rule = calibrate_threshold(normal_scores.tolist(), defect_scores.tolist())
            spread = normal_spread(normal_scores.tolist())
        if cross_fit:
            rule += "; out-of-fold: bank of the train normals on the calibration normals and bank of the " \
                    "calibration normals on as many train normals"
        pixel_threshold, vmin, vmax = pixel_calibration(normal_maps, defect_maps if len(val_defect) else None)
        scores = np.r_[normal_scores, defect_scores]
        summary = {"bank_size": int(model.memory_bank.shape[0]), "threshold": threshold,
                   "pixel_threshold": pixel_threshold, "coreset_s": round(coreset_s, 2)}
        if len(val_defect):
            from sklearn.metrics import roc_auc_score

            labels = np.r_[np.zeros(nn_), np.ones(len(val_defect))]
            summary["image_auroc"] = float(roc_auc_score(labels, scores))
            d_areas = np.array([float(m.shape[0] * m.shape[1]) for m in defect_maps])
            summary["recall"] = float((defect_scores >= threshold + slope * np.log(d_areas / ref_area)).mean())
        summary["fpr"] = float((adjusted >= threshold).mean())
        views = len(AUGMENTATIONS[cfg.tta])
        pc.meta = {
            "format_version": FORMAT_VERSION,
            "product": product,
            "method": "PatchCore (Roth et al. 2022), anomalib 2.7 PatchcoreModel"
                      + ("; patches scored by a SimpleNet-style head (Liu et al. 2023)" if simplenet else ""),
            "model": model_label(spec, cfg),
            "backbone": spec.name,
            "layers": list(spec.layers),
            "blocks": list(cfg.blocks) if spec.name == "efficientnet-lite0" else None,
            "image_size": cfg.image_size,
            "pixel_scale": cfg.pixel_scale,
            "scale_rule": ("native: photos scored at their own size x pixel_scale" if cfg.image_size == 0
                           else f"every photo resized to {cfg.image_size} x {cfg.image_size} px"),
            "input_norm": cfg.input_norm,
            "pool_size": cfg.pool_size,
            "coreset_ratio": cfg.coreset_ratio,
            "augment": cfg.augment,
            "augment_views": len(AUGMENTATIONS[cfg.augment]),
            "sigma": cfg.sigma,
            "reweight": cfg.reweight,
            "tta": cfg.tta,
            "fold_bank": cfg.fold_bank,
            "score_norm": cfg.score_norm,
            "features": cfg.features,
            "scorer": cfg.scorer,
            "head_steps": cfg.head_steps,
            "head_rule": (f"adaptor + discriminator, truncated L1 (margin 0.5), Gaussian noise sigma {NOISE_SIGMA} "
                          f"(standardised units), {cfg.head_steps} steps, seed {SEED}, on {head_rows} patches of "
                          f"{n} train normals and {len(head_extra or [])} extra normals; {head_s:.1f} s")
                         if simplenet else None,
            "tta_views": views,
            "symmetry": symmetry,
            "image_score_rule": image_score_rule(cfg),
            "bank_dtype": rt.bank_dtype,
            "coreset_rule": (f"k-center greedy, seed {SEED}"
                             + (f", random projection to {CORESET_PROJ_DIM} dims" if CORESET_PROJ_DIM else "")
                             + (f", over a seeded random {CORESET_CANDIDATES} of the patches" if sampled
                                else "")),
            "num_neighbors": NUM_NEIGHBORS,
            "bank_size": summary["bank_size"],
            "n_patches": int(n_patches),
            "embedding_dim": int(model.memory_bank.shape[1]),
            "n_train": n,
            "n_bank_extra": len(extra),
            "n_val_normal": len(val_normal),
            "n_calibration_scores": nn_,
            "n_val_defect": len(val_defect),
            "threshold": threshold,
            "threshold_rule": rule,
            "calibration": "cross-fit" if cross_fit else "held-out",
            "fold_bank_sizes": [int(f.shape[0]) for f in folds],
            "target_fpr": target_fpr,
            "normal_spread": spread,
            "uncertain_band": float(uncertain_band),
            "size_slope": float(slope),
            "reference_area": ref_area,
            "calibration_fpr": summary["fpr"],
            "calibration_recall": summary.get("recall"),
            "pixel_threshold": pixel_threshold,
            "pixel_threshold_rule": f"quantile {PIXEL_QUANTILE} of normal val pixel scores",
            "color_scale": [vmin, vmax],
            "color_scale_rule": "vmin = median normal val pixel; vmax = q0.995 defect val pixels (>= 1.25 x pixel thr)",
            "val_normal_scores": [round(float(s), 6) for s in normal_scores],
            # the calibration scores moved to the reference area (the threshold's and the spread's input)
            "calibration_scores_at_reference_area": [round(float(s), 6) for s in adjusted],
            "val_defect_scores": [round(float(s), 6) for s in defect_scores],
            "image_auroc_val": summary.get("image_auroc"),
            "image_auroc_val_rule": "val defects and calibration normals scored by bank A (out of fold)",
            "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        return pc, summary

    # ---- inference
    @property
    def config(self) -> PatchCoreConfig:
        """The bank's :class:`PatchCoreConfig` (from its meta)."""
        meta = {"coreset_ratio": 0.01, **self.meta}
        return config_from_meta(meta)

    def predict_maps(self, images: Sequence[np.ndarray], patch_maps: bool = False):
        """Scores ``(B,)``, anomaly maps at each model input's size (list of ``(h, w)``) and descriptors ``(B, C)``.

        At native scale the model input of a ``H x W`` photo is ``round(H * pixel_scale) x
        round(W * pixel_scale)``; photos of different sizes run in separate batches. With
        ``patch_maps`` a fourth item is returned: each photo's patch-distance map at the patch
        grid (the map the image score is the maximum of; without test-time views, the anomaly map).

        Raises:
            ValueError: a photo too small for the model input (:func:`prepare`).
        """
        cfg = self.config
        tta = cfg.tta
        xs = [prepare(im, cfg, self.spec) for im in images]
        scores: list = [None] * len(xs)
        maps: list = [None] * len(xs)
        pmaps: list = [None] * len(xs)
        descs: list = [None] * len(xs)
        with self._lock:
            for idx in shape_groups(xs):
                x = torch.cat([xs[i] for i in idx])
                if tta != "none" or cfg.score_norm == "median" or self.head is not None:
                    score, pmap, amap, desc = _views_forward(self.model, x, AUGMENTATIONS[tta],
                                                             relative=cfg.score_norm == "median", head=self.head)
                else:
                    out, desc = _forward(self.model, x, self.spec)
                    score, amap = out.pred_score.reshape(-1), out.anomaly_map[:, 0]
                    pmap = amap
                for j, i in enumerate(idx):
                    scores[i], maps[i], descs[i], pmaps[i] = score[j], amap[j].float(), desc[j], pmap[j].float()
        if not xs:
            empty = (torch.zeros(0), [], torch.zeros(0, 0))
            return empty + ([],) if patch_maps else empty
        out = (torch.stack(scores).float(), maps, torch.stack(descs))
        return out + (pmaps,) if patch_maps else out

    def threshold_for(self, height: int, width: int) -> float:
        """The image threshold for a ``height x width`` photo (the calibrated false-positive rate at its size).

        The image score is a maximum over the photo's patches, so a larger photo of a normal part
        scores higher: ``threshold + size_slope * ln(area / reference_area)`` with the model-input
        area in pixels (:func:`models.patchcore.calibration.size_slope`); banks without a
        ``size_slope`` use the plain threshold.
        """
        meta = self.meta
        thr = float(meta["threshold"])
        slope, ref = float(meta.get("size_slope") or 0.0), float(meta.get("reference_area") or 0.0)
        if slope <= 0 or ref <= 0:
            return thr
        h, w = model_input_size(height, width, self.config)
        return thr + slope * float(np.log(max(h * w, 1) / ref))

    def verdict(self, score: float, threshold: float | None = None) -> tuple[bool, float, bool]:
        """``(is_anomalous, margin, uncertain)`` of an image score under the bank's calibration.

        ``margin = (score - threshold) / normal_spread`` (the spread of the calibration
        normals' scores; banks without it: 1); ``uncertain = |margin| < uncertain_band``.
        ``threshold``: the photo's size-adjusted threshold (:meth:`threshold_for`; default the
        bank's reference threshold).
        """
        thr = float(self.meta["threshold"]) if threshold is None else float(threshold)
        margin = verdict_margin(score, thr, float(self.meta.get("normal_spread") or 0.0))
        band = float(self.meta.get("uncertain_band", UNCERTAIN_BAND))
        return bool(score >= thr), margin, bool(abs(margin) < band)

    def predict(self, images: Sequence[np.ndarray]) -> list[InspectionResult]:
        """Score RGB uint8 images ``(H, W, 3)`` of any size; results in input order.

        Anomaly maps come back at each input's resolution (bilinear from the model input).
        ``elapsed_ms`` of each result is the batch wall time divided by its length.

        Raises:
            core.imageio.InvalidImageError: an input that is not an image.
            ValueError: a photo too small for the model input.
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
        out = []
        for rgb, (s, a, m, r, nn_) in zip(rgbs, partial):
            thr = self.threshold_for(*rgb.shape[:2])
            bad, margin, uncertain = self.verdict(s, thr)
            out.append(InspectionResult(product=self.product, score=s, threshold=thr, is_anomalous=bad,
                                        anomaly_map=a, mask=m, regions=r, nearest_normal=nn_, model=meta["model"],
                                        elapsed_ms=per, pixel_threshold=pthr, color_scale=cscale, margin=margin,
                                        uncertain=uncertain))
        return out
