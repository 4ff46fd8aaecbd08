"""PatchCore anomaly scoring: one memory bank per product, anomaly maps, regions.

Method: PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly
Detection", CVPR 2022, https://arxiv.org/abs/2106.08265) as implemented by
anomalib 2.7 (``anomalib.models.image.patchcore.torch_model.PatchcoreModel``):
locally aware patch features (3x3 average pooling of backbone feature maps,
deeper map bilinearly upsampled and concatenated), memory bank built by
k-center-greedy coreset subsampling (``anomalib.models.components.KCenterGreedy``,
O(N) memory per step, no N x N distance matrix), nearest-neighbour patch
distances, the paper's re-weighted image score (9 neighbours) and the
anomaly map generator (nearest upsampling + Gaussian blur, sigma 4).

Backbone: EfficientNet-Lite0 with its packaged ImageNet weights
(``models.backbones``); anomalib builds its ``TimmFeatureExtractor`` around our
``nn.Module`` (torchvision FX ``create_feature_extractor``, layer names
``_blocks.<i>``), so nothing is downloaded. With ``DRA_PATCHCORE_RUNTIME=onnxruntime``
(default) that extractor is replaced by :class:`models.backbones.OnnxBlockFeatures`:
the same module exported by ``torch.onnx`` and run by ONNX Runtime (same block
outputs up to float32 rounding; 2-2.3x faster inspection on this CPU, README
"Speed"). ``DRA_PATCHCORE_BACKBONE`` may name
a timm model instead (e.g. ``wide_resnet50_2``, anomalib's default, hub
weights; only where the hub is reachable).

Persistence: ``banks_dir/<product>/`` holds ``memory_bank.npy`` (float32
``(M, D)``), ``train_descriptors.npy`` (float32 ``(N_train, C)``, global
features used to find the nearest normal training image) and ``meta.json``
(backbone, layers, image size, coreset ratio, thresholds and their rules,
colour scale, training image paths). The folder is written to a temporary
directory and swapped in with ``os.replace`` (the previous folder is first renamed
to ``.old-<product>-*``); a store opened after a crash between the two renames puts
the previous bank back (:meth:`PatchCoreStore.recover`), so a killed refit always
leaves a usable bank. Banks are loaded lazily and cached per product; a new store
instance gives identical scores.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from core.catalog import UnknownProductError
from core.imageio import load_rgb
from core.settings import Settings, get_settings

log = logging.getLogger("dra.patchcore")

MANIFEST_NAME = "manifest.json"
META_NAME = "meta.json"
BANK_NAME = "memory_bank.npy"
DESCRIPTORS_NAME = "train_descriptors.npy"
FORMAT_VERSION = 1

# Lite0 blocks 4 and 7 (40 + 80 channels, strides 8 and 16). Chosen on the sample data's
# val split (80 train normals, 30 normal + 40 defect val, coreset 1 %): image AUROC
# gravel 0.709 -> 0.752, grass 0.662 -> 0.752 against blocks (4, 10); blocks (2, 4, 10)
# (stride 4 added) gave gravel 0.729 at 6x the fit and inference time.
DEFAULT_LITE0_BLOCKS = (4, 7)
# Tuning on the val split of the earlier data version (before the defects' visibility floor;
# bench/bench_patchcore_tuning.py; image AUROC brick / gravel / grass; current figures: PRODUCT_CONFIGS):
# * pooling 3 beats 1 and 5 (256 px, blocks 4,7, random 1 % bank: pool 1 .75/.52/.62,
#   pool 3 .96/.70/.61, pool 5 .91/.69/.59; pool 5 raises pixel AUROC a little);
# * k-center-greedy coreset beats a random bank of the same size (.968/.760/.751 vs
#   .961/.698/.613); a 3 % coreset gives no image-AUROC gain (.974/.741/.750) at 3x the time;
# * upscaling the 256 crop to 512 (blocks 4,7) helps brick (.979) but hurts gravel
#   (.569, random bank): the receptive field covers fewer stones; blocks (2,4,7) at 256
#   gave .961/.753/.645 (random bank) at a larger bank and slower inference.
DEFAULT_POOL_SIZE = 3  # anomalib's AvgPool2d(3, 1, 1)
NUM_NEIGHBORS = 9  # anomalib / paper default for the re-weighted image score
DEFAULT_SIGMA = 4.0  # anomalib's AnomalyMapGenerator Gaussian sigma (pixels at the model input size)
# images per backbone call: on this 2-core CPU a Lite0 forward at 256 px of 8 stacked
# images took 210-236 ms, 4 x 2 images 83 ms, 8 x 1 image 90 ms (the activations of
# larger batches fall out of the cache); measured with /work state banks, 2 torch threads
BATCH_SIZE = 2
SEED = 0
# coreset selection in a random projection of this many dims (None: exact features)
CORESET_PROJ_DIM: int | None = None
# pixel threshold: this quantile of all normal validation pixel scores
PIXEL_QUANTILE = 0.999
# image threshold without defects: mean + 3 sigma of normal val scores, at least max(normal) * margin
NORMAL_MARGIN = 1.05
# regions smaller than this fraction of the image are dropped (speckle)
MIN_REGION_FRAC = 0.0005
MAX_REGIONS = 10

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BankNotFoundError(UnknownProductError, KeyError):
    """No fitted PatchCore memory bank exists for the requested product.

    Subclasses both ``core.catalog.UnknownProductError`` (a ``ValueError``)
    and ``KeyError``; ``str()`` gives the readable message.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "no memory bank"


@dataclass
class InspectionResult:
    """PatchCore verdict for one image.

    Attributes:
        product: product id whose memory bank scored the image.
        score: image anomaly score (PatchCore re-weighted max patch distance,
            feature-space Euclidean units, >= 0).
        threshold: calibrated image threshold; ``is_anomalous = score >= threshold``.
        is_anomalous: the verdict.
        anomaly_map: float32 ``(H, W)`` at the input image resolution, raw
            PatchCore patch distances (blurred, bilinearly resized).
        mask: bool ``(H, W)``: ``anomaly_map >= pixel_threshold``.
        regions: connected components of ``mask``:
            ``[{"bbox": [x0, y0, x1, y1] (int pixels, x1/y1 exclusive),
            "area_frac": float (0..1), "peak": float (max map value)}]``,
            sorted by peak, highest first; at most 10, specks dropped.
        nearest_normal: path of the most similar normal training image
            (global feature distance), or None when unknown / missing.
        model: model label, e.g. ``patchcore/efficientnet-lite0[blocks 4,7]/coreset0.01``.
        elapsed_ms: wall time spent on this image (ms).
        pixel_threshold: the calibrated pixel threshold used for ``mask``.
        color_scale: fixed per-product ``(vmin, vmax)`` for heat maps.
    """

    product: str
    score: float
    threshold: float
    is_anomalous: bool
    anomaly_map: np.ndarray
    mask: np.ndarray
    regions: list[dict]
    nearest_normal: str | None
    model: str
    elapsed_ms: float
    pixel_threshold: float = float("nan")
    color_scale: tuple[float, float] | None = None

    def summary(self) -> dict:
        """JSON-ready fields (no arrays): product, score, threshold, is_anomalous, regions, ..."""
        return {
            "product": self.product,
            "score": round(float(self.score), 4),
            "threshold": round(float(self.threshold), 4),
            "is_anomalous": bool(self.is_anomalous),
            "regions": self.regions,
            "nearest_normal": self.nearest_normal,
            "model": self.model,
            "elapsed_ms": round(float(self.elapsed_ms), 1),
        }


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class PatchCoreConfig:
    """The tunable PatchCore choices of one product's memory bank (stored in its meta.json).

    Attributes:
        blocks: EfficientNet-Lite0 block indices whose outputs form the patch
            features (``models.backbones.LITE0_BLOCKS``: block 4 = stride 8, 7 = stride 16).
        image_size: square model input size in pixels (inputs are resized to it).
        pool_size: neighbourhood average pooling (odd; 3 = the paper's 3x3).
        coreset_ratio: fraction of training patches kept by the greedy coreset (0..1].
        augment: symmetry views of train normals added to the bank (``AUGMENTATIONS``).
        sigma: anomaly-map Gaussian blur sigma, pixels at ``image_size`` (0: none).
        reweight: image score by the paper's Eq. 7 re-weighting (True) or the
            plain maximum patch distance (False); ignored with test-time views.
        tta: test-time symmetry views (``AUGMENTATIONS`` key): each image is scored
            in every view, the patch-distance maps are turned back and averaged,
            and the image score is the maximum of the averaged map. ``none``: one view.
    """

    blocks: tuple[int, ...] = (4, 7)
    image_size: int = 256
    pool_size: int = 3
    coreset_ratio: float = 0.01
    augment: str = "none"
    sigma: float = 4.0
    reweight: bool = True
    tta: str = "none"

    def as_dict(self) -> dict:
        """JSON-ready dict (``blocks`` as a list)."""
        return {"blocks": list(self.blocks), "image_size": self.image_size, "pool_size": self.pool_size,
                "coreset_ratio": self.coreset_ratio, "augment": self.augment, "sigma": self.sigma,
                "reweight": self.reweight, "tta": self.tta}


#: configuration of products without a tuned entry (e.g. uploaded from the UI)
DEFAULT_CONFIG = PatchCoreConfig()
#: per-product configurations chosen on the validation split (bench/bench_patchcore_tuning.py,
#: coreset sampler, 30 normal + 40 defect val images; README "PatchCore tuning"). Image / pixel AUROC:
#: * bank augmentation with the product's symmetry views (train normals only) at the same 1 % ratio:
#:   gravel flips .820/.868 -> .888/.926, grass flips .853/.845 -> .883/.910; brick hflip .975/.980 ->
#:   .972/.982 (no gain, 2x fit time: not used). A 4 % bank without views is worse for image AUROC
#:   (gravel .798/.904, grass .818/.909): the views, not the bank size, make the gain.
#: * anomaly-map blur sigma 2/4/8 (pixel AUROC only): brick .979/.980/.982, grass .825/.845/.877;
#:   with flips sigma 8/12/16: gravel .941/.945/.943, grass .938/.950/.953. On the final banks with
#:   their test-time views, sigma 6/8/10/12/16: brick .9792/.9795/.9797/.9797/.9792, gravel
#:   .9698/.9704/.9697/.9681/.9626, grass .9562/.9600/.9619/.9625/.9612 -> grass 12, others 8
#:   (the similar-defect descriptor is pooled under this map: grass Recall@1 .675 -> .625).
#: * pooling 5 instead of 3: image AUROC drops (brick .975 -> .953, grass .853 -> .807).
#: * Eq. 7 re-weighting vs max: within +-0.006 everywhere (kept: the paper's score).
#: * coreset selection in a 32-d random projection: gravel flips .888 -> .803 (exact greedy kept).
#: * test-time symmetry views (``tta``; the averaged patch map, its max as image score; sigma 8,
#:   bench/bench_patchcore_tuning.py tta): brick none-bank hflip views .975/.982 -> .981/.980;
#:   grass flips-bank flips views .884/.938 -> .923/.960 (dihedral views .831: grass is not
#:   rotation-symmetric); gravel flips-bank dihedral views .887/.941 -> .930/.965 (flips views
#:   .888, 4 rotations .903; the gravel data holds 90-degree turns). Cost: one forward per view.
PRODUCT_CONFIGS: dict[str, PatchCoreConfig] = {
    "brick": PatchCoreConfig(sigma=8.0, tta="hflip"),
    "gravel": PatchCoreConfig(augment="flips", sigma=8.0, tta="dihedral"),
    "grass": PatchCoreConfig(augment="flips", sigma=12.0, tta="flips"),
}

#: symmetry of a product's photos -> (bank views ``augment``, test-time views ``tta``), for products
#: fitted from the UI / API. The views must be real symmetries of the product (dihedral views cost
#: grass 0.09 image AUROC); the pairs are the tuned ones: ``mirror`` = brick (mirror views at test
#: time only; the mirrored bank gave no gain), ``flips`` = grass, ``turns`` = gravel (a dihedral
#: bank was not better than the flips bank and took 2x the fit time).
SYMMETRIES: dict[str, tuple[str, str]] = {
    "none": ("none", "none"),      # orientation matters (text, arrows, a part with a fixed pose)
    "mirror": ("none", "hflip"),   # looks the same mirrored left-right
    "flips": ("flips", "flips"),   # mirrored left-right and up-down (and turned 180 degrees)
    "turns": ("flips", "dihedral"),  # any 90-degree turn and mirror (isotropic textures)
}


def _test_pause(stage: str) -> None:
    """Crash-safety test hook: with ``DRA_PATCHCORE_PAUSE_AT=<stage>`` print ``paused <stage>``
    and sleep ``DRA_PATCHCORE_PAUSE_S`` seconds (default 60) so a test can SIGKILL the process
    there. Stages: ``coreset`` (features extracted, nothing written yet) and ``swap`` (between
    renaming the old bank away and moving the new one in)."""
    if os.environ.get("DRA_PATCHCORE_PAUSE_AT") == stage:
        print(f"paused {stage}", flush=True)
        time.sleep(float(os.environ.get("DRA_PATCHCORE_PAUSE_S", "60")))


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
        from models.backbones import LITE_MEAN, LITE_STD

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
        from models.backbones import load_lite0

        blocks = tuple(int(layer.split(".")[1]) for layer in spec.layers)
        backbone = load_lite0(blocks=blocks, pretrained=True, with_head=False).net
        with warnings.catch_warnings():  # torchvision FX: "nodes ... in eval mode are a subsequence ..."
            warnings.simplefilter("ignore", UserWarning)
            model = cls(layers=list(spec.layers), backbone=backbone, pre_trained=False,
                        num_neighbors=NUM_NEIGHBORS, **extra)
        if runtime == "onnxruntime":
            from models.backbones import load_lite0_onnx

            model.feature_extractor = load_lite0_onnx(blocks, pretrained=True)
    else:  # a timm backbone through anomalib's TimmFeatureExtractor (hub profile: wide_resnet50_2)
        timm_name, _, init = spec.name.partition("@")
        if init != "random":  # "<name>@random": random init (tests); else the pretrained weights
            from core.profiles import require_available

            require_available("patchcore_backbone", timm_name)  # cached / local, or a clear error
        model = cls(layers=list(spec.layers), backbone=timm_name, pre_trained=init != "random",
                    num_neighbors=NUM_NEIGHBORS, **extra)
    model.feature_pooler = torch.nn.AvgPool2d(pool_size, 1, pool_size // 2) if pool_size > 1 else torch.nn.Identity()
    if sigma != 4:
        model.anomaly_map_generator = AnomalyMapGenerator(sigma=sigma) if sigma > 0 else _NoBlurMapGenerator()
    if search == "faiss" and sigma > 0:  # our path: same blur as two 1-D passes
        model.anomaly_map_generator.blur = SeparableGaussianBlur(sigma)
    return model.eval()


class SeparableGaussianBlur(torch.nn.Module):
    """anomalib's ``GaussianBlur2d`` (kornia kernel, reflect padding, 'same' size) as two 1-D passes.

    The 2-D Gaussian kernel anomalib convolves with is the outer product of two
    normalised 1-D Gaussians (``kornia.filters.get_gaussian_kernel2d``), so the
    same result (up to float rounding) comes from a vertical then a horizontal
    1-D convolution of the same reflect-padded map: ``2k`` instead of ``k^2``
    multiply-adds per pixel (k = 65 at sigma 8: 130 vs 4,225).

    Args:
        sigma: standard deviation in pixels (> 0); kernel size ``2 * int(4 sigma + 0.5) + 1``
            as in anomalib's ``compute_kernel_size``.
    """

    def __init__(self, sigma: float) -> None:
        super().__init__()
        from kornia.filters import get_gaussian_kernel1d

        size = 2 * int(4.0 * sigma + 0.5) + 1
        k = get_gaussian_kernel1d(size, float(sigma)).reshape(-1)
        k = k / k.sum()
        self.register_buffer("kv", k.view(1, 1, size, 1))
        self.register_buffer("kh", k.view(1, 1, 1, size))
        self.pad = size // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` float -> blurred ``(B, 1, H, W)`` (H, W > kernel radius)."""
        p = self.pad
        x = F.pad(x, (p, p, p, p), mode="reflect")
        return F.conv2d(F.conv2d(x, self.kv), self.kh)


class _NoBlurMapGenerator(torch.nn.Module):
    """anomalib's AnomalyMapGenerator without the Gaussian blur (nearest upsampling only)."""

    @staticmethod
    def forward(patch_scores: torch.Tensor, image_size=None) -> torch.Tensor:
        return patch_scores if image_size is None else F.interpolate(patch_scores, size=tuple(image_size))


def preprocess(images: Sequence[np.ndarray], size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB uint8 images of any sizes -> normalised float32 batch ``(B, 3, size, size)``.

    Each image is resized on its own (bilinear, antialiased) so sizes may differ.
    """
    from models import backbones

    batch = torch.cat([backbones.to_tensor(im, size) for im in images])
    lite_mean = torch.tensor(backbones.LITE_MEAN).view(1, 3, 1, 1)
    lite_std = torch.tensor(backbones.LITE_STD).view(1, 3, 1, 1)
    if tuple(mean) == tuple(backbones.LITE_MEAN) and tuple(std) == tuple(backbones.LITE_STD):
        return batch
    x01 = batch * lite_std + lite_mean
    return (x01 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# --------------------------------------------------------------------------- augmentation

# Symmetry views of a normal training image added to the memory bank (train normals only).
# Each view is (transpose?, k rot90) applied as np.rot90(img.T?, k); "flips" = identity,
# horizontal, vertical and both flips; "dihedral" = all 8 rotations / reflections.
AUGMENTATIONS: dict[str, tuple[tuple[bool, int], ...]] = {
    "none": ((False, 0),),
    "hflip": ((False, 0), (True, 3)),  # rot90(transpose, 3) = left-right mirror
    "flips": ((False, 0), (True, 3), (True, 1), (False, 2)),  # + up-down mirror, both (= rot 180)
    "dihedral": tuple((t, k) for t in (False, True) for k in range(4)),
}


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


# --------------------------------------------------------------------------- calibration


def calibrate_threshold(normal_scores: Sequence[float], defect_scores: Sequence[float] | None = None) -> tuple[float, str]:
    """Image threshold from validation scores; returns ``(threshold, rule)``.

    Rule with defects (balanced): every midpoint between consecutive distinct
    sorted scores is a candidate; take the one with the highest Youden's J
    (TPR - FPR, i.e. balanced accuracy; defect = positive), ties broken by F1,
    then by the larger threshold. Plain F1-max was tried first and rejected:
    on a weakly separable product (gravel, 30 normals / 40 defects) it chose a
    threshold flagging 73 % of normal parts. Midpoints keep a margin on both
    sides instead of sitting on a sample (anomalib's "min score of the set"
    failure mode is avoided).
    Rule without defects: ``max(mean + 3 * std, max(normal) * 1.05)``.

    Raises:
        ValueError: fewer than 2 normal scores.
    """
    normal = np.asarray(normal_scores, dtype=np.float64)
    if normal.size < 2:
        raise ValueError("threshold calibration needs at least 2 normal validation images")
    fallback = max(float(normal.mean() + 3 * normal.std()), float(normal.max()) * NORMAL_MARGIN)
    if not defect_scores:
        return fallback, "normal-only: max(mean+3std, 1.05*max) of normal val scores"
    defect = np.asarray(defect_scores, dtype=np.float64)
    values = np.unique(np.concatenate([normal, defect]))
    candidates = (values[:-1] + values[1:]) / 2 if values.size > 1 else values
    best, best_key = fallback, (-2.0, -1.0, 0.0)
    for t in candidates:
        tp = float((defect >= t).sum())
        fp = float((normal >= t).sum())
        fn = defect.size - tp
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        j = tp / defect.size - fp / normal.size
        key = (round(j, 9), round(f1, 9), float(t))
        if key > best_key:
            best, best_key = float(t), key
    return best, "youden-J-max midpoint on val normals+defects (ties: F1, higher)"


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """F1 / precision / recall / FPR of ``scores >= threshold`` against bool ``labels``."""
    pred = scores >= threshold
    tp = int((pred & labels).sum())
    fp = int((pred & ~labels).sum())
    fn = int((~pred & labels).sum())
    tn = int((~pred & ~labels).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    fpr = fp / (fp + tn) if fp + tn else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "fpr": fpr}


def find_regions(mask: np.ndarray, anomaly_map: np.ndarray) -> list[dict]:
    """Connected components (8-connectivity, skimage) of a bool mask as region dicts.

    Returns ``[{"bbox": [x0, y0, x1, y1], "area_frac", "peak"}]`` sorted by peak
    (descending), components below 0.05 % of the image dropped, at most 10.
    """
    from skimage.measure import label, regionprops

    if not mask.any():
        return []
    h, w = mask.shape
    labelled = label(mask, connectivity=2)
    out = []
    for prop in regionprops(labelled, intensity_image=anomaly_map):
        frac = float(prop.area) / float(h * w)
        if frac < MIN_REGION_FRAC:
            continue
        r0, c0, r1, c1 = prop.bbox
        out.append({"bbox": [int(c0), int(r0), int(c1), int(r1)], "area_frac": round(frac, 5),
                    "peak": round(float(prop.intensity_max), 4)})
    out.sort(key=lambda r: -r["peak"])
    return out[:MAX_REGIONS]


# --------------------------------------------------------------------------- coreset


class _IdentityProjection:
    """Stand-in for anomalib's SparseRandomProjection when it would not reduce dimensions."""

    def fit(self, embedding: torch.Tensor) -> _IdentityProjection:
        return self

    @staticmethod
    def transform(embedding: torch.Tensor) -> torch.Tensor:
        return embedding


def greedy_coreset_indices(features: torch.Tensor, n_select: int, *, seed: int | None = SEED,
                           start: int | None = None, proj_dim: int | None = None,
                           progress: Callable[[float], None] | None = None) -> list[int]:
    """k-center-greedy coreset (Sener & Savarese 2018; PatchCore Alg. 1) in O(N) memory.

    Repeatedly picks the row farthest from all rows picked so far. Each step is
    one fused matrix-vector product over the float32 features
    (``|x|^2 - 2 x.c + |c|^2`` with cached squared norms, ``torch.addmv``) and an
    in-place running minimum of SQUARED distances (same argmax as distances, no
    sqrt); no ``N x N`` (or ``N x d`` temporary) matrix is ever allocated. The
    loop runs on one torch thread: it is memory-bound, and on a loaded 2-core
    machine a second thread made each step ~5x slower (thread hand-off), not faster.

    Args:
        features: float ``(N, D)`` patch features.
        n_select: number of rows to keep (1..N).
        seed: seeds the random first centre and the projection (None: torch's global RNG).
        start: explicit first centre (overrides the random one).
        proj_dim: if set and smaller than ``D``, select in a Gaussian random
            projection to ``proj_dim`` dims (Johnson-Lindenstrauss; the paper's
            approximate greedy coreset) to cut the per-step cost.
        progress: optional ``progress(fraction 0..1)``.

    Returns:
        ``n_select`` distinct row indices, in pick order.

    Raises:
        ValueError: ``n_select`` outside ``1..N`` or features not 2-D.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    n = int(features.shape[0])
    if not 1 <= n_select <= n:
        raise ValueError(f"n_select must be in 1..{n}, got {n_select}")
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    x = features.detach().float()
    if proj_dim is not None and proj_dim < x.shape[1]:
        proj = torch.randn(x.shape[1], proj_dim, generator=gen) / float(np.sqrt(proj_dim))
        x = x @ proj
    x = x.contiguous()
    if start is None:
        start = int(torch.randint(n, (1,), generator=gen)) if gen is not None else int(torch.randint(n, (1,)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sq = x.pow(2).sum(dim=1)
        min_d2 = torch.full((n,), float("inf"))
        picks = [int(start)]
        idx = int(start)
        step = max(1, n_select // 20)
        for i in range(1, n_select):
            center = x[idx]
            d2 = torch.addmv(sq, x, center, alpha=-2.0)
            d2.add_(torch.dot(center, center))
            torch.minimum(min_d2, d2, out=min_d2)
            min_d2[idx] = 0.0
            idx = int(torch.argmax(min_d2))
            picks.append(idx)
            if progress is not None and i % step == 0:
                progress(i / n_select)
    finally:
        torch.set_num_threads(threads)
    return picks


@lru_cache(maxsize=1)
def coreset_sampler_class() -> type:
    """The :class:`CoresetSampler` class (built lazily: importing anomalib takes seconds)."""
    from anomalib.models.components.sampling import KCenterGreedy

    class CoresetSampler(KCenterGreedy):
        """anomalib's k-center-greedy coreset sampler (``KCenterGreedy``), CPU-friendlier.

        Same algorithm as anomalib 2.7 (Sener & Savarese 2018, as used by
        PatchCore): sparse random projection (Johnson-Lindenstrauss, eps 0.9),
        random first centre included, then repeatedly the point farthest from the
        chosen centres. Memory is O(N) (one distance vector, never an N x N
        matrix). Differences: the greedy loop is :func:`greedy_coreset_indices`
        (one fused matrix-vector product per step with cached squared norms,
        instead of materialising ``features - center`` (N x d) each step); the projection is skipped when the JL dimension is not
        smaller than the embedding dimension (it would only add noise and cost);
        progress goes to a callback instead of a tqdm bar.

        Args:
            embedding: float32 ``(N, D)`` patch features.
            sampling_ratio: fraction of rows kept (``int(N * ratio)`` >= 1).
            progress: optional ``progress(fraction 0..1)``.
        """

        def __init__(self, embedding: torch.Tensor, sampling_ratio: float,
                     progress: Callable[[float], None] | None = None) -> None:
            super().__init__(embedding=embedding, sampling_ratio=sampling_ratio)
            jl_dim = self.model._johnson_lindenstrauss_min_dim(n_samples=embedding.shape[0], eps=self.model.eps)
            if embedding.ndim == 2 and jl_dim >= embedding.shape[1]:
                self.model = _IdentityProjection()
            self._progress = progress

        def select_coreset_idxs(self) -> list[int]:
            """Indices of the coreset rows: :func:`greedy_coreset_indices` after the projection.

            The first centre is drawn from torch's global RNG (as anomalib does).
            """
            if self.embedding.ndim == 2:
                self.model.fit(self.embedding)
                self.features = self.model.transform(self.embedding)
            else:
                self.features = self.embedding.reshape(self.embedding.shape[0], -1)
            start = int(torch.randint(high=self.n_observations, size=(1,)))
            return greedy_coreset_indices(self.features, self.coreset_size, seed=None, start=start,
                                          progress=self._progress)

    return CoresetSampler


# --------------------------------------------------------------------------- the store


@dataclass
class _Bank:
    model: object  # anomalib PatchcoreModel with memory_bank set
    spec: BackboneSpec
    meta: dict
    descriptors: torch.Tensor  # (N_train, C)
    train_paths: list[str | None]
    lock: threading.Lock = field(default_factory=threading.Lock)


class PatchCoreStore:
    """Per-product PatchCore memory banks under ``settings.banks_dir/<product>/``.

    The configuration of a fit (:class:`PatchCoreConfig`) is, field by field:
    the constructor argument if given, else the ``DRA_PATCHCORE_IMAGE_SIZE`` /
    ``DRA_PATCHCORE_CORESET_RATIO`` setting if non-zero, else the product's tuned
    entry in ``PRODUCT_CONFIGS``, else ``DEFAULT_CONFIG``. Scoring always uses
    the configuration stored in the bank's meta.json.

    Args:
        settings: project settings (default ``get_settings()``): backbone name,
            search backend, bank dtype and the overrides above.
        blocks: Lite0 block indices (e.g. (4, 7): strides 8 and 16).
        coreset_ratio: fraction of patches kept (0..1].
        image_size: model input size (pixels, square; every input is resized to
            it before the backbone, e.g. a 256 crop upscaled to 320).
        pool_size: neighbourhood average-pooling size (odd).
        augment: bank augmentation (``AUGMENTATIONS`` key).
        sigma: anomaly-map blur sigma (pixels at ``image_size``).
        reweight: paper Eq. 7 image score (True) or max patch distance (False).
        tta: test-time views averaged at inference (``AUGMENTATIONS`` key).
    """

    def __init__(self, settings: Settings | None = None, *, blocks: Sequence[int] | None = None,
                 coreset_ratio: float | None = None, image_size: int | None = None,
                 pool_size: int | None = None, augment: str | None = None, sigma: float | None = None,
                 reweight: bool | None = None, tta: str | None = None):
        self.settings = settings or get_settings()
        self.banks_dir = Path(self.settings.banks_dir)
        over = {"blocks": tuple(blocks) if blocks else None, "coreset_ratio": coreset_ratio,
                "image_size": image_size, "pool_size": pool_size, "augment": augment, "sigma": sigma,
                "reweight": reweight, "tta": tta}
        if not over["image_size"] and self.settings.patchcore_image_size:
            over["image_size"] = int(self.settings.patchcore_image_size)
        if over["coreset_ratio"] is None and self.settings.patchcore_coreset_ratio:
            over["coreset_ratio"] = float(self.settings.patchcore_coreset_ratio)
        self._overrides = {k: v for k, v in over.items() if v is not None}
        for key in ("augment", "tta"):
            if key in self._overrides and self._overrides[key] not in AUGMENTATIONS:
                raise ValueError(f"unknown {key} views {self._overrides[key]!r}; choose from {sorted(AUGMENTATIONS)}")
        self._banks: dict[str, _Bank] = {}
        self._lock = threading.Lock()
        self.recover()

    def recover(self) -> list[str]:
        """Repair ``banks_dir`` after a process died inside :meth:`_save`.

        ``.old-<product>-*`` folders are previous banks renamed just before the new one
        was moved in: if ``<product>/`` is missing (killed between the two renames) the
        old folder is moved back, else it is deleted. ``.tmp-*`` folders are unfinished
        writes and are deleted.

        Returns:
            the products whose previous bank was restored.
        """
        restored: list[str] = []
        if not self.banks_dir.is_dir():
            return restored
        for d in sorted(self.banks_dir.iterdir()):
            if not d.is_dir():
                continue
            if d.name.startswith(".old-"):
                product = d.name[len(".old-"):].rsplit("-", 1)[0]
                target = self.banks_dir / product
                if not (target / META_NAME).is_file() and (d / META_NAME).is_file():
                    if target.exists():
                        shutil.rmtree(target, ignore_errors=True)
                    os.replace(d, target)
                    restored.append(product)
                    log.warning("PatchCore bank of %r restored after an interrupted refit", product)
                else:
                    shutil.rmtree(d, ignore_errors=True)
            elif d.name.startswith(".tmp-"):
                shutil.rmtree(d, ignore_errors=True)
        return restored

    def config_for(self, product: str, symmetry: str | None = None) -> PatchCoreConfig:
        """The :class:`PatchCoreConfig` a fit of ``product`` uses (overrides applied).

        Args:
            symmetry: a :data:`SYMMETRIES` key; when given it sets the bank and
                test-time views (``augment``, ``tta``) of the product's entry.

        Raises:
            ValueError: unknown symmetry.
        """
        base = PRODUCT_CONFIGS.get(product, DEFAULT_CONFIG)
        if symmetry is not None:
            if symmetry not in SYMMETRIES:
                raise ValueError(f"unknown symmetry {symmetry!r}; choose from {', '.join(SYMMETRIES)}")
            augment, tta = SYMMETRIES[symmetry]
            base = replace(base, augment=augment, tta=tta)
        return replace(base, **self._overrides)

    # ---- catalogue
    def products(self) -> list[str]:
        """Sorted product ids that have a fitted bank (``<banks_dir>/<p>/meta.json``)."""
        if not self.banks_dir.is_dir():
            return []
        return sorted(p.name for p in self.banks_dir.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / META_NAME).is_file())

    def meta(self, product: str) -> dict:
        """The bank's meta.json content (thresholds, colour scale, model label ...)."""
        return dict(self._bank(product).meta)

    # ---- features
    def _forward(self, model, images: Sequence[np.ndarray], spec: BackboneSpec, size: int):
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

    def _predict(self, bank: _Bank, images: Sequence[np.ndarray]):
        """Scores (B,), anomaly maps (B, S, S) at model resolution and descriptors (B, C)."""
        size = int(bank.meta["image_size"])
        tta = bank.meta.get("tta", "none")
        scores, maps, descs = [], [], []
        with bank.lock:
            for i in range(0, len(images), BATCH_SIZE):
                if tta != "none":
                    score, amap, desc = self._forward_views(bank.model, images[i:i + BATCH_SIZE], bank.spec,
                                                            size, AUGMENTATIONS[tta])
                    scores.append(score)
                    maps.append(amap)
                else:
                    out, desc = self._forward(bank.model, images[i:i + BATCH_SIZE], bank.spec, size)
                    scores.append(out.pred_score.reshape(-1))
                    maps.append(out.anomaly_map[:, 0])
                descs.append(desc)
        return torch.cat(scores), torch.cat(maps), torch.cat(descs)

    @staticmethod
    def _forward_views(model, images: Sequence[np.ndarray], spec: BackboneSpec, size: int,
                       views: Sequence[tuple[bool, int]]):
        """Test-time symmetry views: score every view, turn the patch maps back, average.

        The ``V`` views of the ``B`` preprocessed images (square ``size``) go through
        anomalib's feature extractor (``BATCH_SIZE`` images per call), pooling and
        embedding; faiss gives
        each patch its nearest memory-bank distance; each view's ``(h, w)`` map is
        mapped back to the image's orientation and the ``V`` maps are averaged.
        Image score: the maximum of the averaged map (Eq. 7 needs one nearest bank
        patch per location, which an average of views does not have). The anomaly
        map is anomalib's generator (blur, resize) applied to the averaged map. When
        the views form a group (``hflip``, ``flips``, ``dihedral``), a turned or mirrored
        image gets the same score and the turned map.

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

    # ---- fitting
    def fit(self, product: str, train_images: list[np.ndarray], val_normal: list[np.ndarray],
            val_defect: list[np.ndarray] | None = None, train_paths: list[str] | None = None,
            progress: Callable[[float, str], None] | None = None, symmetry: str | None = None) -> dict:
        """Build and save the memory bank of ``product``; calibrate its thresholds.

        Args:
            product: product id (folder name; letters, digits, ``-``, ``_``).
            train_images: normal RGB uint8 images ``(H, W, 3)`` (any sizes).
            val_normal: normal validation images (>= 2) for calibration.
            val_defect: defective validation images; with them the image
                threshold maximises Youden's J (see :func:`calibrate_threshold`).
            train_paths: file path of each training image (for ``nearest_normal``).
            progress: ``progress(fraction 0..1, message)`` callback.
            symmetry: :data:`SYMMETRIES` key (``none`` / ``mirror`` / ``flips`` /
                ``turns``) choosing the bank and test-time views; None: the
                product's configured ones. Stored in meta.json.

        Configuration: :meth:`config_for` (blocks, input size, pooling, coreset
        ratio, blur sigma, Eq. 7 on/off, and the symmetry views of each training
        image added to the bank, :func:`augment_views`); stored in meta.json.

        Thresholds: image threshold by :func:`calibrate_threshold` (balanced:
        Youden's J on val normals + defects; normal-only fallback); pixel
        threshold = 99.9th percentile of all normal validation pixel scores
        (so ~0.1 % of normal pixels light up); colour scale vmin = median
        normal pixel score, vmax = 99.5th percentile of defect pixel scores
        (normal-only: 2 x pixel threshold - vmin), at least 1.25 x pixel threshold.

        Returns:
            ``{"bank_size", "threshold", "pixel_threshold", "fit_s", "image_auroc" (if defects)}``.

        Raises:
            ValueError: bad product id, no training images, < 2 val normals,
                too few patches for the coreset ratio, unknown symmetry.
        """
        t0 = time.perf_counter()
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

        cfg = self.config_for(product, symmetry)
        spec = backbone_spec(self.settings.patchcore_backbone, cfg.blocks)
        model = self._new_model(spec, cfg)
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
                _, desc = self._forward(model, batch, spec, cfg.image_size)
                if view == 0:
                    descs.append(desc)
                done += len(batch)
                report(0.5 * done / total, f"patch features {done}/{total}")
        n_patches = sum(e.shape[0] for e in model.embedding_store)
        if int(n_patches * cfg.coreset_ratio) < 1:
            raise ValueError(f"coreset ratio {cfg.coreset_ratio} keeps no patch of {n_patches}")
        report(0.5, f"coreset subsampling {n_patches} patches x {cfg.coreset_ratio}")
        _test_pause("coreset")
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
        bank = _Bank(model=model, spec=spec, meta={"image_size": cfg.image_size, "pool_size": cfg.pool_size,
                                                   "tta": cfg.tta},
                     descriptors=torch.cat(descs), train_paths=list(train_paths or [None] * n))

        report(0.8, "calibrating thresholds on the validation split")
        val = val_normal + val_defect
        scores, maps, _ = self._predict(bank, val)
        scores = scores.numpy().astype(np.float64)
        maps = maps.numpy()
        nn_ = len(val_normal)
        normal_scores, defect_scores = scores[:nn_], scores[nn_:]
        threshold, rule = calibrate_threshold(normal_scores.tolist(), defect_scores.tolist())
        normal_px = maps[:nn_].reshape(-1)
        pixel_threshold = float(np.quantile(normal_px, PIXEL_QUANTILE))
        vmin = float(np.median(normal_px))
        if len(val_defect):
            vmax = float(np.quantile(maps[nn_:].reshape(-1), 0.995))
        else:
            vmax = 2 * pixel_threshold - vmin
        vmax = max(vmax, vmin + 1.25 * (pixel_threshold - vmin), pixel_threshold * 1.25)
        out = {"bank_size": int(model.memory_bank.shape[0]), "threshold": threshold,
               "pixel_threshold": pixel_threshold, "coreset_s": round(coreset_s, 2)}
        if len(val_defect):
            from sklearn.metrics import roc_auc_score

            labels = np.r_[np.zeros(nn_), np.ones(len(val_defect))]
            out["image_auroc"] = float(roc_auc_score(labels, scores))

        meta = {
            "format_version": FORMAT_VERSION,
            "product": product,
            "method": "PatchCore (Roth et al. 2022), anomalib 2.7 PatchcoreModel",
            "model": self._label(spec, cfg),
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
            "bank_dtype": self.settings.patchcore_bank_dtype,
            "coreset_rule": f"k-center greedy, seed {SEED}, random projection to {CORESET_PROJ_DIM} dims"
                            if CORESET_PROJ_DIM else f"k-center greedy, seed {SEED}",
            "num_neighbors": NUM_NEIGHBORS,
            "bank_size": out["bank_size"],
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
            "image_auroc_val": out.get("image_auroc"),
            "train_paths": [self._rel_path(p) for p in bank.train_paths],
            "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        self._save(product, model.memory_bank, bank.descriptors, meta)
        with self._lock:
            self._banks.pop(product, None)  # reload from disk: identical numbers after a restart
        out["fit_s"] = round(time.perf_counter() - t0, 2)
        report(1.0, f"{product}: bank {out['bank_size']} patches, threshold {threshold:.3f}")
        return out

    def fit_from_manifest(self, product: str, data_dir: Path | None = None,
                          progress: Callable[[float, str], None] | None = None) -> dict:
        """Fit ``product`` from ``{data_dir}/manifest.json`` (train normals, val normals + defects).

        Raises:
            FileNotFoundError: no manifest; ValueError: no train items for the product.
        """
        data_dir = Path(data_dir or self.settings.data_dir)
        items = [it for it in _read_manifest(data_dir) if it.get("product") == product]
        train = [it for it in items if it.get("split") == "train" and it.get("label") == "good"]
        if not train:
            raise ValueError(f"manifest in {data_dir} has no train images for product {product!r}")
        val_good = [it for it in items if it.get("split") == "val" and it.get("label") == "good"]
        val_bad = [it for it in items if it.get("split") == "val" and it.get("label") == "defect"]
        paths = [str(data_dir / it["image"]) for it in train]
        return self.fit(product, [load_rgb(p) for p in paths],
                        [load_rgb(data_dir / it["image"]) for it in val_good],
                        [load_rgb(data_dir / it["image"]) for it in val_bad] or None,
                        train_paths=paths, progress=progress)

    # ---- inference
    def inspect(self, rgb: np.ndarray, product: str) -> InspectionResult:
        """Score one RGB uint8 image ``(H, W, 3)`` of any size against ``product``'s bank.

        Raises:
            BankNotFoundError: ``product`` has no fitted bank (KeyError and ValueError subclass).
            core.imageio.InvalidImageError: not an image array.
        """
        return self.inspect_batch([rgb], product)[0]

    def inspect_batch(self, images: list[np.ndarray], product: str) -> list[InspectionResult]:
        """Score several images (batched feature extraction); results in input order.

        ``elapsed_ms`` of each result is the batch wall time divided by its length.
        """
        bank = self._bank(product)
        t0 = time.perf_counter()
        rgbs = [load_rgb(im) for im in images]
        if not rgbs:
            return []
        scores, maps, descs = self._predict(bank, rgbs)
        nearest = torch.cdist(descs, bank.descriptors).argmin(dim=1).tolist() if bank.descriptors.numel() else []
        meta = bank.meta
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
            near = bank.train_paths[nearest[i]] if nearest else None
            if near is not None and not Path(near).is_file():
                near = None
            score = float(scores[i])
            partial.append((score, amap, mask, find_regions(mask, amap), near))
        per = (time.perf_counter() - t0) * 1000.0 / len(rgbs)
        return [InspectionResult(product=product, score=s, threshold=thr, is_anomalous=bool(s >= thr),
                                 anomaly_map=a, mask=m, regions=r, nearest_normal=nn_, model=meta["model"],
                                 elapsed_ms=per, pixel_threshold=pthr, color_scale=cscale)
                for s, a, m, r, nn_ in partial]

    def evaluate(self, product: str, data_dir: Path | None = None, limit: int | None = None) -> dict:
        """Image AUROC, pixel AUROC, per-defect-type image AUROC, F1 and FPR on the val split.

        AUROCs by sklearn's ``roc_auc_score``. Pixel AUROC pools every pixel of
        every val image at its own resolution (anomaly maps are resized to the
        input; normal images count as all-negative), masks from the manifest
        (non-zero = defect). Per-defect-type image AUROC: the images of one
        defect type against all normal val images. F1 / precision / recall /
        FPR: image verdicts at the bank's calibrated threshold.

        Args:
            product: product with a fitted bank.
            data_dir: folder of ``manifest.json`` (default ``settings.data_dir``).
            limit: evaluate only the first ``limit`` normal and the first
                ``limit`` images of each defect type (a fast CI mode; None = all).

        Returns:
            ``{"image_auroc", "pixel_auroc", "per_type_image_auroc": {type: auroc},
            "n_normal", "n_defect", "threshold", "f1", "precision", "recall", "fpr",
            "pixel_threshold", "ms_per_image", "model"}`` (AUROCs are None when a
            class is missing).

        Raises:
            FileNotFoundError: no manifest; ValueError: no val images for the product;
            BankNotFoundError: no bank.
        """
        from sklearn.metrics import roc_auc_score

        data_dir = Path(data_dir or self.settings.data_dir)
        items = [it for it in _read_manifest(data_dir) if it.get("product") == product and it.get("split") == "val"]
        if not items:
            raise ValueError(f"manifest in {data_dir} has no val images for product {product!r}")
        if limit is not None:
            counts: dict[str, int] = {}
            kept = []
            for it in items:
                key = (it.get("defect_type") or "defect") if it.get("label") == "defect" else "good"
                if counts.get(key, 0) < limit:
                    kept.append(it)
                    counts[key] = counts.get(key, 0) + 1
            items = kept
        images = [load_rgb(data_dir / it["image"]) for it in items]
        labels = np.array([it.get("label") == "defect" for it in items])
        self._bank(product)  # load the bank before timing
        t0 = time.perf_counter()
        results = self.inspect_batch(images, product)
        ms = (time.perf_counter() - t0) * 1000.0 / len(images)
        scores = np.array([r.score for r in results])
        px_scores, px_labels = [], []
        for it, r in zip(items, results, strict=True):
            if it.get("mask"):
                m = np.asarray(load_rgb(data_dir / it["mask"]))[..., 0] > 0
            else:
                m = np.zeros(r.anomaly_map.shape, dtype=bool)
            px_scores.append(r.anomaly_map.reshape(-1))
            px_labels.append(m.reshape(-1))
        px_l = np.concatenate(px_labels)
        both = labels.any() and (~labels).any()
        types = [it.get("defect_type") if it.get("label") == "defect" else None for it in items]
        per_type = {}
        for t in sorted({t for t in types if t}):
            sel = np.array([tt is None or tt == t for tt in types])
            per_type[t] = float(roc_auc_score(labels[sel], scores[sel])) if (~labels[sel]).any() else None
        out = {
            "image_auroc": float(roc_auc_score(labels, scores)) if both else None,
            "per_type_image_auroc": per_type,
            "pixel_auroc": float(roc_auc_score(px_l, np.concatenate(px_scores))) if px_l.any() and (~px_l).any() else None,
            "n_normal": int((~labels).sum()),
            "n_defect": int(labels.sum()),
            "threshold": results[0].threshold,
            "pixel_threshold": results[0].pixel_threshold,
            "ms_per_image": round(ms, 1),
            "model": results[0].model,
        }
        out.update(binary_metrics(labels, scores, results[0].threshold))
        return out

    # ---- persistence
    @staticmethod
    def _label(spec: BackboneSpec, cfg: PatchCoreConfig) -> str:
        aug = "" if cfg.augment == "none" else f"/aug-{cfg.augment}"
        tta = "" if cfg.tta == "none" else f"/tta-{cfg.tta}"
        return (f"patchcore/{spec.label}@{cfg.image_size}px/pool{cfg.pool_size}/coreset{cfg.coreset_ratio:g}"
                f"{aug}{tta}")

    def _new_model(self, spec: BackboneSpec, cfg: PatchCoreConfig):
        """:func:`build_model` with the settings' search backend and bank dtype; Eq. 7 on/off."""
        model = build_model(spec, cfg.pool_size, sigma=cfg.sigma, search=self.settings.patchcore_search,
                            bank_dtype=self.settings.patchcore_bank_dtype, runtime=self.settings.patchcore_runtime)
        if not cfg.reweight:
            model.num_neighbors = 1  # anomalib: image score = max patch distance
        return model

    def _rel_path(self, path: str | None) -> str | None:
        """Store paths under the state dir relative to it (state copies stay valid)."""
        if path is None:
            return None
        p = Path(path).resolve()
        try:
            return "state:" + str(p.relative_to(Path(self.settings.state_dir).resolve()))
        except ValueError:
            return str(p)

    def _abs_path(self, path: str | None) -> str | None:
        if path is None:
            return None
        if path.startswith("state:"):
            return str(Path(self.settings.state_dir) / path[len("state:"):])
        return path

    def _save(self, product: str, memory_bank: torch.Tensor, descriptors: torch.Tensor, meta: dict) -> None:
        self.banks_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{product}-", dir=self.banks_dir))
        try:
            dtype = np.float16 if meta.get("bank_dtype") == "float16" else np.float32
            np.save(tmp / BANK_NAME, memory_bank.detach().cpu().numpy().astype(dtype))
            np.save(tmp / DESCRIPTORS_NAME, descriptors.detach().cpu().numpy().astype(np.float32))
            (tmp / META_NAME).write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
            target = self.banks_dir / product
            old = None
            if target.exists():
                old = self.banks_dir / f".old-{product}-{uuid.uuid4().hex[:8]}"
                os.replace(target, old)
                _test_pause("swap")
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _bank(self, product: str) -> _Bank:
        """Lazily load and cache the bank of ``product``."""
        with self._lock:
            bank = self._banks.get(product)
            if bank is not None:
                return bank
            folder = self.banks_dir / str(product)
            if not (folder / META_NAME).is_file():
                known = self.products()
                raise BankNotFoundError(
                    f"no PatchCore memory bank for product {product!r}; fitted products: {known or 'none'} "
                    f"(run `python cli.py build` or fit the product first)")
            meta = json.loads((folder / META_NAME).read_text(encoding="utf-8"))
            spec = backbone_spec(meta["backbone"], meta.get("blocks"))
            cfg = PatchCoreConfig(blocks=tuple(meta.get("blocks") or DEFAULT_CONFIG.blocks),
                                  image_size=int(meta["image_size"]), pool_size=int(meta.get("pool_size", 3)),
                                  coreset_ratio=float(meta["coreset_ratio"]), augment=meta.get("augment", "none"),
                                  sigma=float(meta.get("sigma", DEFAULT_SIGMA)),
                                  reweight=bool(meta.get("reweight", True)), tta=meta.get("tta", "none"))
            model = self._new_model(spec, cfg)
            model.memory_bank = torch.from_numpy(np.load(folder / BANK_NAME).astype(np.float32))
            descriptors = torch.from_numpy(np.load(folder / DESCRIPTORS_NAME))
            paths = [self._abs_path(p) for p in meta.get("train_paths", [])]
            bank = _Bank(model=model, spec=spec, meta=meta, descriptors=descriptors, train_paths=paths)
            self._banks[product] = bank
            return bank


def _read_manifest(data_dir: Path) -> list[dict]:
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no sample-data manifest at {path} (run `python cli.py build`)")
    data = json.loads(path.read_text(encoding="utf-8"))
    return data["items"] if isinstance(data, dict) else data


def save_artifacts(result: InspectionResult, rgb: np.ndarray, out_dir: Path) -> dict[str, str]:
    """Write the visual artefacts of one inspection into ``out_dir``.

    Files: ``anomaly_map.npy`` (float32 ``(H, W)``), ``mask.png`` (0/255),
    ``heatmap.png`` (fixed per-product colour scale), ``overlay.png`` (heat map
    blended on the photo, mask contour, region boxes labelled with area %),
    ``comparison.png`` (input | nearest normal | overlay).

    Returns:
        ``{"anomaly_map", "mask", "heatmap", "overlay", "comparison"}`` -> path strings.
    """
    from models.patchcore import anomaly_map as anomaly_viz

    return anomaly_viz.write_artifacts(result, load_rgb(rgb), Path(out_dir))


__all__ = [
    "BankNotFoundError", "InspectionResult", "PatchCoreStore", "backbone_spec", "build_model",
    "calibrate_threshold", "find_regions", "save_artifacts",
]
