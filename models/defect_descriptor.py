"""Defect descriptor: what the defect looks like, located by PatchCore's anomaly map.

Global ImageNet features of a textured crop encode the texture (the product), not a
small low-contrast defect. The similar-defect index (:mod:`stores.image_index`)
therefore appends a *defect part* built here from the image and its PatchCore
anomaly map (predicted; ground-truth masks are never used on the query path):

1. :func:`region_stats` - 26 shape / colour / edge statistics of the region where the
   per-image relative anomaly map exceeds 0.5: log area, components, elongation (PCA
   of pixel coordinates), solidity, extent, signed CIELAB deviation vs a 12 px ring
   (dL, da, db, chroma), texture and edge ratios, and the fine structure inside it
   (grey minus Gaussian background beyond 2.5 robust sigmas: dark / bright fraction,
   elongation, thickness = area / skeleton length, components, solidity).
2. :class:`DeepPooler` - EfficientNet-Lite0 blocks 2, 4, 7 (24 + 40 + 80 channels)
   pooled under the squared relative map minus pooled over the rest: texture shared by
   defect and surroundings cancels (an image-local version of the memory-bank residual).
3. optional :func:`tail_stats` - filter-bank tail statistics (Sato ridges, LoG blobs,
   chroma, high-pass; 78 values), unweighted or weighted by the map.
4. :class:`DefectProjection` - a per-product metric learned with scikit-learn on the
   labelled gallery (+ defects synthesized by ``data.synth`` on the val normal images,
   :func:`synthesize_training_defects`), applied within the product (the index filters
   by product first, so the top hit's product accuracy stays 1.0).

Measured (sample data, 120 val-defect queries vs the 150-image gallery, queries never
in the gallery; PatchCore banks Lite0 blocks 4+10, coreset 0.01; defect-type
Recall@1 overall | brick gravel grass; Recall@5; MRR@10; cosine on the final vectors):

====================================================  =====  ==================  =====  =====
variant                                                R@1    br / gv / gs        R@5    MRR
====================================================  =====  ==================  =====  =====
previous index (global Lite0 + normal residual)        0.40   0.62 / 0.22 / 0.35   -      -
region stats, standardised, no metric                  0.40   0.55 / 0.30 / 0.35  0.82   0.57
deep pooled, no metric                                 0.53   0.78 / 0.40 / 0.42  0.88   0.67
stats + deep, no metric                                0.50   0.75 / 0.38 / 0.38  0.88   0.65
stats + deep, gallery uses exact masks (query: map)    0.36   0.50 / 0.28 / 0.30  0.57   0.45
stats + deep, shrinkage LDA on gallery                 0.60   0.90 / 0.42 / 0.47  0.68   0.65
stats + deep, logistic regression on gallery           0.58   0.82 / 0.45 / 0.45  0.65   0.60
tail stats (+map-weighted), LDA                        0.47   0.60 / 0.42 / 0.38  0.63   0.54
stats + deep + tail, LDA + 30 synth/type               0.68   0.88 / 0.53 / 0.62  0.83   0.73
stats + deep, logreg C=0.1 + 15 synth/type             0.64   0.82 / 0.53 / 0.57  0.67   0.66
**stats + deep, logreg C=0.1 + 30 synth/type**         0.69   0.90 / 0.57 / 0.60  0.75   0.72
oracle: exact masks on both sides, stats, no metric    0.78   0.90 / 0.70 / 0.75  0.93   0.85
====================================================  =====  ==================  =====  =====

The bold row is the default (offline evaluation on cached descriptors). End to end
through ``ImageIndex.evaluate()`` (query: PatchCore map predicted, product inferred,
final vector = 0.3 x global part + defect part, other synth seeds): Recall@1 0.61
(brick 0.83, gravel 0.48, grass 0.53), Recall@5 0.71, MRR@10 0.66, product accuracy
1.0; per type R@1: contamination 0.63, crack 0.75, hole 0.67, scratch 0.33, stain 0.67.
The 0.85 goal is NOT reached: PatchCore's map localises
the defect well on brick (argmax inside the dilated true mask for 94 % of queries)
but not on gravel (42 %) / grass (49 %), where many synthesized defects are low
contrast against a busy texture; even the oracle localisation stops at 0.78 with these
features. Multiplying the map with the filter-bank saliency raised gravel / grass
localisation to 53-56 % / 64 % (not adopted yet). Exact gallery masks hurt (0.36): the
query side only has the predicted map, so both sides must use the same map.

Cost per image (2 shared, heavily loaded CPU cores): PatchCore inspect 400-800 ms,
region stats 25-30 ms, deep pooling 220-240 ms, tail stats 280 ms (hence off by
default); a whole query through ``ImageIndex.search`` 1.8 s including PatchCore.
Index build: + ~10 min on that machine for 150 gallery + 450 synthesized images
(``DRA_SYNTH_PER_TYPE``, see :mod:`stores.image_index`; 15 per type halves it, R@1 -0.05).

The figures above are the history of this module. Current ones (README "Similar-defect
search"): with the tuned PatchCore banks, gallery descriptors renewed under the current maps
and 600 synthesized defects per type, Recall@1 0.858, Recall@5 0.908, MRR@10 0.883.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from core.settings import DEFECT_TYPES
from models.backbones import LITE0_BLOCKS, load_lite0_onnx, to_tensor

SIZE = 256  # working resolution (pixels, square) when DescriptorConfig.native is off
MAX_SIDE = 512  # native-scale working resolution: longer sides are scaled down to this
EPS = 1e-6


@dataclass(frozen=True)
class DescriptorConfig:
    """Configuration of :func:`describe` (persisted with the index; changing it re-embeds).

    Attributes:
        blocks: EfficientNet-Lite0 MBConv blocks whose feature maps are pooled under the anomaly map.
        region_quantile: relative map level (0..1 between image median and peak) that delimits the region.
        ring_px: width (pixels at 256 px) of the surrounding ring used as local reference.
        highpass_sigma: Gaussian sigma (pixels) of the local background removed for fine structure.
        fine_k: fine-structure pixels are ``|highpass| > fine_k * robust sigma``.
        use_deep / use_stats: feature groups to include.
        deep_weight / stats_weight: group weights after standardisation.
        native: describe at the photo's own scale (sides capped at ``MAX_SIDE``; issue 15) instead
            of resizing every photo to ``SIZE`` x ``SIZE`` (which magnified small photos: a 128 px
            defect looked twice as wide as the same defect in a 256 px crop).
    """

    blocks: tuple[int, ...] = (2, 4, 7)
    region_quantile: float = 0.5
    ring_px: int = 12
    highpass_sigma: float = 6.0
    fine_k: float = 2.5
    use_deep: bool = True
    use_stats: bool = True
    use_tail: bool = False
    use_tail_weighted: bool = False
    deep_weight: float = 1.0
    stats_weight: float = 1.0
    native: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blocks"] = list(self.blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DescriptorConfig":
        d = dict(d)
        d["blocks"] = tuple(d.get("blocks", cls.blocks))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


STAT_NAMES = (
    "log_area", "n_components", "elongation", "solidity", "extent", "map_peak_rel",
    "dL", "da", "db", "dchroma", "std_ratio_L", "std_ratio_ab", "edge_in", "edge_ratio",
    "fine_frac", "fine_dark", "fine_bright", "fine_elong", "fine_thick", "fine_ncomp", "fine_largest",
    "fine_solidity", "hp_mean", "hp_absmean", "lowfreq_dL", "abs_dL",
)


def _relative_map(anomaly_map: np.ndarray) -> np.ndarray:
    """Anomaly map rescaled per image: 0 at its median, 1 at its peak (float32, clipped 0..1)."""
    a = np.asarray(anomaly_map, np.float32)
    med = float(np.median(a))
    peak = float(a.max())
    return np.clip((a - med) / max(peak - med, EPS), 0.0, 1.0)


def _resize(x: np.ndarray, size, order: int = 1) -> np.ndarray:
    """``x`` (``(H, W)`` or ``(H, W, C)``) resized to ``size`` (int: square; or ``(h, w)``), float32."""
    from skimage.transform import resize

    hw = (size, size) if isinstance(size, (int, np.integer)) else tuple(int(v) for v in size)
    if x.shape[:2] == hw:
        return np.asarray(x, np.float32)
    return resize(x, hw + x.shape[2:], order=order, preserve_range=True, anti_aliasing=order > 0).astype(np.float32)


def work_shape(shape: tuple[int, ...], cfg: "DescriptorConfig") -> tuple[int, int]:
    """``(h, w)`` at which a photo of ``shape`` is described: native (longer side capped at
    ``MAX_SIDE``) or the square ``SIZE`` when ``cfg.native`` is off."""
    if not cfg.native:
        return SIZE, SIZE
    h, w = int(shape[0]), int(shape[1])
    f = min(1.0, MAX_SIDE / max(h, w))
    return max(32, int(round(h * f))), max(32, int(round(w * f)))


def _shape_stats(mask: np.ndarray) -> tuple[float, float, float, float, float]:
    """(n_components, elongation, solidity, extent, largest_frac) of a bool mask."""
    from skimage.measure import label, regionprops

    if not mask.any():
        return 0.0, 1.0, 1.0, 1.0, 0.0
    lab = label(mask, connectivity=2)
    props = regionprops(lab)
    n = len(props)
    big = max(props, key=lambda p: p.area)
    ys, xs = np.nonzero(mask)
    if len(ys) >= 3:
        cov = np.cov(np.stack([ys, xs]).astype(np.float64))
        ev = np.sort(np.linalg.eigvalsh(cov))
        elong = float(np.sqrt((ev[1] + 1.0) / (ev[0] + 1.0)))
    else:
        elong = 1.0
    return float(n), elong, float(big.solidity), float(big.extent), float(big.area) / float(mask.sum())


def region_stats(rgb: np.ndarray, anomaly_map: np.ndarray, cfg: DescriptorConfig) -> np.ndarray:
    """Shape / colour / edge statistics of the anomalous region, float32 ``(len(STAT_NAMES),)``.

    The region is where the per-image relative anomaly map (see :func:`_relative_map`)
    exceeds ``cfg.region_quantile``; the reference is a ring of ``cfg.ring_px`` around it.
    Colour differences are in CIELAB (skimage ``rgb2lab``). Fine structure is the
    grey image minus its Gaussian-blurred background, thresholded at ``cfg.fine_k``
    robust sigmas (MAD of the whole image) inside the dilated region.
    """
    from scipy import ndimage as ndi
    from skimage.color import rgb2lab
    from skimage.morphology import skeletonize

    hw = work_shape(np.shape(rgb), cfg)
    img = _resize(np.asarray(rgb, np.float32) / 255.0, hw)
    rel = _resize(_relative_map(anomaly_map), hw)
    lab = rgb2lab(np.clip(img, 0, 1)).astype(np.float32)
    L = lab[..., 0]
    region = rel >= cfg.region_quantile
    if region.sum() < 4:
        region = rel >= np.quantile(rel, 0.99)
    dil = ndi.binary_dilation(region, iterations=cfg.ring_px)
    ring = dil & ~region
    if ring.sum() < 4:
        ring = ~region
    if ring.sum() < 4:  # flat map: no region stands out; compare the image with itself
        region = np.ones_like(region)
        ring = region
    n_comp, elong, solidity, extent, _ = _shape_stats(region)
    reg_lab, ring_lab = lab[region], lab[ring]
    d = reg_lab.mean(0) - ring_lab.mean(0)
    std_L = (reg_lab[:, 0].std() + EPS) / (ring_lab[:, 0].std() + EPS)
    std_ab = (reg_lab[:, 1:].std(0).mean() + EPS) / (ring_lab[:, 1:].std(0).mean() + EPS)
    gy, gx = np.gradient(ndi.gaussian_filter(L, 1.0))
    grad = np.hypot(gx, gy)
    edge_in, edge_ring = float(grad[region].mean()), float(grad[ring].mean())
    # fine structure: grey minus local background
    hp = L - ndi.gaussian_filter(L, cfg.highpass_sigma)
    sigma = 1.4826 * float(np.median(np.abs(hp - np.median(hp)))) + EPS
    hpn = hp / sigma
    win = ndi.binary_dilation(region, iterations=4)
    fine = (np.abs(hpn) > cfg.fine_k) & win
    fine_dark = float(((hpn < -cfg.fine_k) & win).sum()) / max(1.0, float(win.sum()))
    fine_bright = float(((hpn > cfg.fine_k) & win).sum()) / max(1.0, float(win.sum()))
    f_n, f_elong, f_sol, _, f_largest = _shape_stats(fine)
    if fine.any():
        skel = skeletonize(fine).sum()
        thick = float(fine.sum()) / max(1.0, float(skel))
    else:
        thick = 0.0
    low = ndi.gaussian_filter(L, cfg.highpass_sigma)
    lowfreq_dL = float(low[region].mean() - low[ring].mean())
    stats = [
        np.log(region.mean() + 1e-4), np.log1p(n_comp), np.log(elong), solidity, extent,
        float(np.log1p(rel[region].mean())),
        d[0], d[1], d[2], float(np.hypot(d[1], d[2])), np.log(std_L), np.log(std_ab),
        edge_in, np.log((edge_in + EPS) / (edge_ring + EPS)),
        float(fine.sum()) / max(1.0, float(win.sum())), fine_dark, fine_bright, np.log(f_elong), thick,
        np.log1p(f_n), f_largest, f_sol, float(hpn[win].mean()), float(np.abs(hpn[win]).mean()),
        lowfreq_dL, abs(float(d[0])),
    ]
    return np.asarray(stats, np.float32)


class DeepPooler:
    """EfficientNet-Lite0 feature maps pooled under the anomaly map, minus the surroundings.

    For each block ``b`` in ``blocks`` with feature map ``F_b (C_b, h, w)``:
    ``v_b = sum(w * F_b) / sum(w) - sum(r * F_b) / sum(r)`` where ``w`` is the relative
    anomaly map (resized to ``h x w``, squared) and ``r = 1 - w`` (the normal
    surroundings). The texture common to the defect and its surroundings cancels.
    Output: float32 ``(N, sum C_b)``.
    """

    def __init__(self, blocks: tuple[int, ...] = (2, 4, 7), pretrained: bool = True, native: bool = True):
        self.blocks = tuple(sorted(blocks))
        self.native = native
        # EfficientNet-Lite0 in ONNX Runtime (same block outputs as the eager module up to float32 rounding)
        self._net = load_lite0_onnx(self.blocks, pretrained=pretrained)
        self._lock = threading.Lock()

    def __call__(self, images: list[np.ndarray], maps: list[np.ndarray]) -> np.ndarray:
        out = []
        cfg = DescriptorConfig(native=self.native)
        with self._lock, torch.inference_mode():
            for im, m in zip(images, maps):  # one photo at a time: native sizes differ
                hw = work_shape(np.shape(im), cfg)
                x = to_tensor(np.asarray(im), None)
                if tuple(x.shape[-2:]) != hw:
                    x = F.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False)
                feats = self._net(x)
                rel = torch.from_numpy(_resize(_relative_map(m), hw))[None, None]
                parts = []
                for b in self.blocks:
                    f = feats[f"_blocks.{b}"]
                    w = F.interpolate(rel, size=f.shape[-2:], mode="area") ** 2
                    r = 1.0 - w
                    pin = (f * w).sum((2, 3)) / (w.sum((2, 3)) + EPS)
                    pout = (f * r).sum((2, 3)) / (r.sum((2, 3)) + EPS)
                    parts.append(pin - pout)
                out.append(torch.cat(parts, 1).float().numpy())
        return np.concatenate(out).astype(np.float32)


class DefectDescriber:
    """Raw defect descriptor of images given their anomaly maps: float32 ``(N, dim)``.

    ``[stats_weight * region_stats, deep_weight * DeepPooler]`` (groups per ``cfg``).
    Not standardised: :class:`DefectProjection` standardises on the gallery.
    """

    def __init__(self, cfg: DescriptorConfig | None = None, pretrained: bool = True):
        self.cfg = cfg or DescriptorConfig()
        self._pool = DeepPooler(self.cfg.blocks, pretrained=pretrained, native=self.cfg.native) \
            if self.cfg.use_deep else None

    @property
    def dim(self) -> int:
        d = len(STAT_NAMES) if self.cfg.use_stats else 0
        if self.cfg.use_deep:
            d += sum(LITE0_BLOCKS[b][0] for b in self.cfg.blocks)
        n_tail = len(RESPONSE_NAMES) * len(TAIL_NAMES) + len(SHAPE_RESPONSES) * len(SHAPE_NAMES)
        return d + n_tail * (int(self.cfg.use_tail) + int(self.cfg.use_tail_weighted))

    def __call__(self, images: list[np.ndarray], maps: list[np.ndarray]) -> np.ndarray:
        if len(images) != len(maps):
            raise ValueError("one anomaly map per image is required")
        if not images:
            return np.zeros((0, self.dim), np.float32)
        parts = []
        if self.cfg.use_stats:
            parts.append(self.cfg.stats_weight * np.stack([region_stats(im, m, self.cfg) for im, m in zip(images, maps)]))
        if self._pool is not None:
            parts.append(self.cfg.deep_weight * self._pool(images, maps))
        if self.cfg.use_tail:
            parts.append(np.stack([tail_stats(im) for im in images]))
        if self.cfg.use_tail_weighted:
            parts.append(np.stack([tail_stats(im, _relative_map(m)) for im, m in zip(images, maps)]))
        return np.nan_to_num(np.hstack(parts).astype(np.float32))


class DefectProjection:
    """Per-product learned metric on raw descriptors, applied with numpy from stored arrays.

    Fitted with scikit-learn on the product's labelled descriptors after
    ``StandardScaler``; ``kind``:

    * ``"logreg"`` (default, measured best): multinomial ``LogisticRegression(C=0.1)``;
      the vector is the class-probability vector ``softmax(Z @ W + b)`` (5-d), so two
      images are close when the classifier sees the same defect type in both.
    * ``"lda"``: ``LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto")``
      (Ledoit-Wolf shrinkage), ``(Z - zbar) @ scalings`` (n_types - 1 dims).

    ``transform`` reproduces sklearn's outputs from the stored arrays, so a reloaded
    projection gives identical vectors without pickles.

    Attributes:
        kind: ``"logreg"`` or ``"lda"``; mean, scale: float32 ``(D,)``; xbar: float32 ``(D,)``
        (LDA centring; zeros for logreg); weights: float32 ``(D, K)``; bias: float32 ``(K,)``;
        classes: the defect types in the order of the ``K`` outputs (sklearn's ``classes_``),
        or None for projections saved before the field (their order was the sorted labels).
    """

    KINDS = ("logreg", "lda")

    def __init__(self, mean: np.ndarray, scale: np.ndarray, xbar: np.ndarray, weights: np.ndarray,
                 bias: np.ndarray | None = None, kind: str = "lda", classes: tuple[str, ...] | None = None):
        if kind not in self.KINDS:
            raise ValueError(f"unknown projection kind {kind!r}; known: {self.KINDS}")
        self.kind = kind
        self.mean, self.scale = np.asarray(mean, np.float32), np.asarray(scale, np.float32)
        self.xbar, self.weights = np.asarray(xbar, np.float32), np.asarray(weights, np.float32)
        self.bias = np.zeros(self.weights.shape[1], np.float32) if bias is None else np.asarray(bias, np.float32)
        self.classes = tuple(str(c) for c in classes) if classes is not None else None

    @property
    def out_dim(self) -> int:
        return int(self.weights.shape[1])

    @classmethod
    def fit(cls, X: np.ndarray, y: list[str], kind: str = "logreg", C: float = 0.1) -> "DefectProjection":
        """Fit on descriptors ``X (N, D)`` with defect-type labels ``y``.

        Raises:
            ValueError: fewer than 2 classes or fewer than 3 samples; unknown kind.
        """
        from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        X = np.asarray(X, np.float64)
        if len(set(y)) < 2 or len(X) < 3:
            raise ValueError("the projection needs at least 2 defect types and 3 labelled images")
        sc = StandardScaler().fit(X)
        scale = np.where(sc.scale_ > 0, sc.scale_, 1.0)
        Z = np.nan_to_num((X - sc.mean_) / scale)
        if kind == "logreg":
            lr = LogisticRegression(C=C, max_iter=5000).fit(Z, y)
            coef, icpt = lr.coef_, lr.intercept_
            if coef.shape[0] == 1:  # binary: sklearn keeps one row; expand to two softmax logits
                coef, icpt = np.vstack([-coef / 2, coef / 2]), np.r_[-icpt / 2, icpt / 2]
            return cls(sc.mean_, scale, np.zeros(X.shape[1]), coef.T, icpt, kind, tuple(lr.classes_))
        if kind == "lda":
            lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto").fit(Z, y)
            return cls(sc.mean_, scale, Z.mean(axis=0), lda.scalings_[:, : lda._max_components], None, kind,
                       tuple(lda.classes_))
        raise ValueError(f"unknown projection kind {kind!r}; known: {cls.KINDS}")

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Project descriptors ``(N, D)`` -> float32 ``(N, K)``."""
        Z = np.nan_to_num((np.asarray(X, np.float32) - self.mean) / self.scale)
        if self.kind == "logreg":
            logits = Z @ self.weights + self.bias
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
        return np.nan_to_num((Z - self.xbar) @ self.weights).astype(np.float32)

    def class_probabilities(self, X: np.ndarray) -> list[dict[str, float]] | None:
        """Per-row defect-type probabilities ``{type: p}`` (summing to 1) of a ``logreg`` projection.

        None for ``lda`` (its outputs are coordinates, not probabilities) and for an older
        projection without ``classes`` whose width is not one output per type of
        :data:`core.settings.DEFECT_TYPES` (then sklearn's order was the sorted types).
        """
        if self.kind != "logreg":
            return None
        classes = self.classes
        if classes is None:
            if self.out_dim != len(DEFECT_TYPES):
                return None
            classes = tuple(sorted(DEFECT_TYPES))
        P = self.transform(X)
        return [{c: float(p) for c, p in zip(classes, row)} for row in P]

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        out = {f"{prefix}/mean": self.mean, f"{prefix}/scale": self.scale, f"{prefix}/xbar": self.xbar,
               f"{prefix}/weights": self.weights, f"{prefix}/bias": self.bias,
               f"{prefix}/kind": np.array(self.KINDS.index(self.kind))}
        if self.classes is not None:
            out[f"{prefix}/classes"] = np.array(self.classes, dtype=str)
        return out

    @classmethod
    def from_arrays(cls, arrays, prefix: str) -> "DefectProjection":
        classes = arrays[f"{prefix}/classes"] if f"{prefix}/classes" in arrays else None
        return cls(arrays[f"{prefix}/mean"], arrays[f"{prefix}/scale"], arrays[f"{prefix}/xbar"],
                   arrays[f"{prefix}/weights"], arrays[f"{prefix}/bias"], cls.KINDS[int(arrays[f"{prefix}/kind"])],
                   None if classes is None else tuple(str(c) for c in classes))


RESPONSE_NAMES = ("dark_fine", "bright_fine", "dark_mid", "bright_mid", "dark_ridge", "bright_ridge", "dark_blob",
                  "bright_blob", "chroma", "dark_low", "bright_low", "texture")
TAIL_NAMES = ("q99", "q999", "max", "frac3", "frac5")
SHAPE_RESPONSES = ("dark_ridge", "bright_ridge", "dark_blob", "chroma", "dark_low", "bright_low")
SHAPE_NAMES = ("log_ncomp", "log_area", "log_elong")


def _robust(r: np.ndarray) -> np.ndarray:
    """Response in robust units of the image itself: (r - median) / (1.4826 * MAD)."""
    med = float(np.median(r))
    mad = 1.4826 * float(np.median(np.abs(r - med))) + EPS
    return (r - med) / mad


def filter_responses(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pixel filter-bank responses at 256 px in robust units of the image (float32 ``(256, 256)`` each).

    Fine/mid high-pass of CIELAB lightness (Gaussian sigma 2 / 6), Sato ridge filter
    (skimage ``sato``, dark and bright ridges, sigmas 1-2), Laplacian-of-Gaussian blobs
    (sigma 4), chroma distance from the image's median (a, b), low-frequency lightness
    (sigma 8) and local texture energy. The defect is a small part of the image, so
    the image's own median / MAD is the normal reference.
    """
    from scipy import ndimage as ndi
    from skimage.color import rgb2lab
    from skimage.filters import sato

    img = _resize(np.asarray(rgb, np.float32) / 255.0, SIZE)
    lab = rgb2lab(np.clip(img, 0, 1)).astype(np.float32)
    L = lab[..., 0]
    hp2 = L - ndi.gaussian_filter(L, 2)
    hp6 = L - ndi.gaussian_filter(L, 6)
    low = ndi.gaussian_filter(L, 8)
    ab = lab[..., 1:]
    chroma = np.linalg.norm(ndi.gaussian_filter(ab, (1, 1, 0)) - np.median(ab.reshape(-1, 2), 0), axis=-1)
    log4 = ndi.gaussian_laplace(L, 4)
    r = {
        "dark_fine": _robust(-hp2), "bright_fine": _robust(hp2), "dark_mid": _robust(-hp6), "bright_mid": _robust(hp6),
        "dark_ridge": _robust(sato(L, sigmas=(1, 2), black_ridges=True)),
        "bright_ridge": _robust(sato(L, sigmas=(1, 2), black_ridges=False)),
        "dark_blob": _robust(log4), "bright_blob": _robust(-log4), "chroma": _robust(chroma),
        "dark_low": _robust(-low), "bright_low": _robust(low),
        "texture": _robust(np.sqrt(ndi.gaussian_filter(hp2 ** 2, 4))),
    }
    return {k: v.astype(np.float32) for k, v in r.items()}


def tail_stats(rgb: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """Tail statistics of :func:`filter_responses`: float32 ``(12 * 5 + 6 * 3,)``.

    Per response: 99th / 99.9th percentile, max, fraction above 3 and above 5 robust
    sigmas; for the responses in ``SHAPE_RESPONSES`` the shape of the pixels above 5
    sigmas (number of components, area, elongation). With ``weight`` (e.g. the
    relative anomaly map, ``(H, W)`` in 0..1) the responses are multiplied by
    ``0.25 + 0.75 * weight`` first, so pixels PatchCore flags count more.
    """
    resp = filter_responses(rgb)
    w = None if weight is None else 0.25 + 0.75 * _resize(np.asarray(weight, np.float32), SIZE)
    feats = []
    masks = {}
    for name in RESPONSE_NAMES:
        r = resp[name] if w is None else resp[name] * w
        q99, q999 = np.quantile(r, (0.99, 0.999))
        feats += [q99, q999, r.max(), (r > 3).mean(), (r > 5).mean()]
        masks[name] = r > 5
    for name in SHAPE_RESPONSES:
        n, elong, _, _, _ = _shape_stats(masks[name])
        feats += [np.log1p(n), np.log(masks[name].mean() + 1e-5), np.log(elong)]
    return np.nan_to_num(np.asarray(feats, np.float32))
