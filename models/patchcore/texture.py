"""Pixel-level texture features: a PatchCore feature extractor for stochastic textures.

Why: on gravel and grass the defects PatchCore misses (thin low-contrast scratches and cracks,
soft stains) are thinner than EfficientNet-Lite0's stride-8 blocks, and they sit within the
texture's own gray-level spread (``docs/benchmarks.md``, "Why gravel and grass stay low"). These
features describe every pixel by the local structure around it instead: second-order (Hessian)
structure finds lines and blobs, the gradient finds edges, local means and spread find soft stains.

The method is classical scale-space filtering (Lindeberg, "Feature detection with automatic scale
selection", IJCV 1998: scale-normalised Hessian eigenvalues and gradients) used as the patch features
of PatchCore's memory bank and nearest-neighbour scoring (Roth et al. 2022); the benches that measured
it are ``bench/bench_texture.py`` (a kNN over these features, eighth session) and
``bench/bench_texture_patchcore.py`` (this module inside the shipped PatchCore path). No product uses
it: on grass it gained on a tuning set, lost on the val split and did not gain on the unseen one
(the notes above :data:`models.patchcore.config.PRODUCT_CONFIGS`, ``docs/benchmarks.md``).

:class:`TextureFeatures` is an ``nn.Module`` with the interface of anomalib's feature extractor
(``forward(x) -> {layer name: (B, C, h, w)}``), so the PatchCore model, its memory bank, coreset,
calibration, test-time views and anomaly map are the project's usual ones
(:func:`models.patchcore.model.build_model` swaps it in for a bank whose
:attr:`~models.patchcore.config.PatchCoreConfig.features` is ``texture``).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage as ndi
from torch import nn

#: the feature map's name in the extractor's output (the bank's "layer")
LAYER = "texture"
#: Gaussian scales (pixels) of the Hessian and gradient features
SCALES = (1.0, 2.0, 4.0)
#: Gaussian scales (pixels) of the local mean; the local standard deviation uses the first
MEAN_SCALES = (3.0, 8.0)
#: number of channels: 3 per scale (two Hessian eigenvalues, gradient magnitude) + 2 means + 1 spread
CHANNELS = 3 * len(SCALES) + len(MEAN_SCALES) + 1
#: Rec. 601 luminance weights
LUMA = (0.299, 0.587, 0.114)
#: Gaussian kernels reach this many sigmas (scipy.ndimage's default ``truncate``)
TRUNCATE = 4.0


def robust_gray(rgb: np.ndarray) -> np.ndarray:
    """``(3, H, W)`` RGB in 0..1 -> ``(H, W)`` float32 gray minus its median, over its inter-quartile range.

    Removes exposure and contrast: a brighter, darker or flatter photo of the same texture gives
    the same values (up to the change's nonlinearity). The range is floored at 1e-3.
    """
    g = np.tensordot(np.asarray(LUMA, np.float32), np.asarray(rgb, np.float32), axes=1)
    q25, q50, q75 = np.percentile(g, [25, 50, 75])
    return ((g - q50) / max(float(q75 - q25), 1e-3)).astype(np.float32)


def texture_channels(g: np.ndarray) -> np.ndarray:
    """``(CHANNELS, H, W)`` float32 texture features of a robust gray image ``g (H, W)``.

    For each sigma in :data:`SCALES`: the two eigenvalues of the Hessian of the Gaussian-smoothed
    image (larger first; second differences by ``numpy.gradient``, as scikit-image's ``hessian_matrix``
    with ``use_gaussian_derivatives=False``) times sigma^2, and the gradient magnitude times sigma
    (scale-normalised derivatives); then the local mean at each sigma of :data:`MEAN_SCALES` and the
    local standard deviation at the first of them. Gaussians: ``scipy.ndimage.gaussian_filter``
    (reflected borders, 4 sigmas).
    """
    out = []
    for s in SCALES:
        gs = ndi.gaussian_filter(g, s, mode="reflect", truncate=TRUNCATE)
        dr, dc = np.gradient(gs)
        hrr, hrc = np.gradient(dr)
        hcc = np.gradient(dc, axis=1)
        half_trace = 0.5 * (hrr + hcc)
        root = np.sqrt((0.5 * (hrr - hcc)) ** 2 + hrc ** 2)
        out += [(half_trace + root) * s * s, (half_trace - root) * s * s, np.hypot(dr, dc) * s]
    means = [ndi.gaussian_filter(g, s, mode="reflect", truncate=TRUNCATE) for s in MEAN_SCALES]
    local_sq = ndi.gaussian_filter(g * g, MEAN_SCALES[0], mode="reflect", truncate=TRUNCATE)
    spread = np.sqrt(np.maximum(local_sq - means[0] ** 2, 0.0))
    return np.stack(out + means + [spread]).astype(np.float32)


def texture_maps(x: torch.Tensor) -> torch.Tensor:
    """``(B, CHANNELS, H, W)`` float32 texture features of RGB ``x (B, 3, H, W)`` in 0..1.

    Each photo: :func:`robust_gray`, then :func:`texture_channels`.
    """
    arr = x.detach().float().cpu().numpy()
    return torch.from_numpy(np.stack([texture_channels(robust_gray(a)) for a in arr]))


class TextureFeatures(nn.Module):
    """Pixel-level texture features as a PatchCore feature extractor (no learned weights).

    Args:
        stride: keep every ``stride``-th row and column of the per-pixel features (1: every pixel;
            2: a quarter of the patches, the anomaly map is upsampled back to the input size).

    ``forward(x)``: ``x`` float ``(B, 3, H, W)``, the photo's RGB in 0..1 (the bank's
    :class:`~models.patchcore.model.BackboneSpec` has mean 0 and std 1) -> ``{"texture": (B, 12,
    ceil(H / stride), ceil(W / stride))}`` float32. The filtering runs in numpy / scipy, one photo at a
    time (no gradients).
    """

    def __init__(self, stride: int = 2) -> None:
        super().__init__()
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.stride = int(stride)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """See the class docstring."""
        f = texture_maps(x)
        if self.stride > 1:
            f = f[..., ::self.stride, ::self.stride]
        return {LAYER: f.contiguous()}
