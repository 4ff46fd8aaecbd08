"""Pixel-level texture features: a PatchCore feature extractor for stochastic textures.

Why: on gravel and grass the defects PatchCore misses (thin low-contrast scratches and cracks,
soft stains) are thinner than EfficientNet-Lite0's stride-8 blocks, and they sit within the
texture's own gray-level spread (``docs/benchmarks.md``, "Why gravel and grass stay low"). These
features describe every pixel by the local structure around it instead: second-order (Hessian)
structure finds lines and blobs, the gradient finds edges, local means and spread find soft stains.

The method is classical scale-space filtering (Lindeberg, "Feature detection with automatic scale
selection", IJCV 1998: scale-normalised Hessian eigenvalues and gradients) used as the patch features
of PatchCore's memory bank and nearest-neighbour scoring (Roth et al. 2022); the bench that chose it
is ``bench/bench_texture.py`` (a kNN over these features, eighth session) and
``bench/bench_texture_patchcore.py`` (this module inside the shipped PatchCore path).

:class:`TextureFeatures` is an ``nn.Module`` with the interface of anomalib's feature extractor
(``forward(x) -> {layer name: (B, C, h, w)}``), so the PatchCore model, its memory bank, coreset,
calibration, test-time views and anomaly map are the project's usual ones
(:func:`models.patchcore.model.build_model` swaps it in for a bank whose
:attr:`~models.patchcore.config.PatchCoreConfig.features` is ``texture``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

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


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """1-D float32 Gaussian kernel of ``2 * round(TRUNCATE * sigma) + 1`` taps summing to 1."""
    radius = max(1, int(TRUNCATE * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``x (B, C, H, W)`` with reflected borders (same shape).

    Raises:
        ValueError: a side not larger than the kernel radius (reflection needs ``radius < side``).
    """
    k = gaussian_kernel(sigma).to(x.dtype)
    r = (k.numel() - 1) // 2
    if min(x.shape[-2:]) <= r:
        raise ValueError(f"input {tuple(x.shape[-2:])} too small for a Gaussian of sigma {sigma} (radius {r})")
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _d_rows(x: torch.Tensor) -> torch.Tensor:
    """Central difference along rows (``numpy.gradient``'s interior rule, edge rows replicated)."""
    p = F.pad(x, (0, 0, 1, 1), mode="replicate")
    return (p[..., 2:, :] - p[..., :-2, :]) * 0.5


def _d_cols(x: torch.Tensor) -> torch.Tensor:
    """Central difference along columns."""
    p = F.pad(x, (1, 1, 0, 0), mode="replicate")
    return (p[..., :, 2:] - p[..., :, :-2]) * 0.5


def robust_gray(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` RGB in 0..1 -> ``(B, 1, H, W)`` gray minus its median, over its inter-quartile range.

    Removes exposure and contrast: a brighter, darker or flatter photo of the same texture gives
    the same values (up to the change's nonlinearity). The range is floored at 1e-3.
    """
    w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    g = (x * w).sum(dim=1, keepdim=True)
    flat = g.flatten(1)
    q = torch.quantile(flat, torch.tensor([0.25, 0.5, 0.75], dtype=x.dtype, device=x.device), dim=1)
    q25, q50, q75 = (v.view(-1, 1, 1, 1) for v in q)
    return (g - q50) / (q75 - q25).clamp_min(1e-3)


def texture_maps(x: torch.Tensor) -> torch.Tensor:
    """``(B, CHANNELS, H, W)`` float32 texture features of RGB ``x (B, 3, H, W)`` in 0..1.

    Channels, on the robust gray image (:func:`robust_gray`): for each sigma in :data:`SCALES` the two
    eigenvalues of the Hessian of the Gaussian-smoothed image (larger first) times sigma^2 and the
    gradient magnitude times sigma (scale-normalised derivatives); the local mean at each sigma of
    :data:`MEAN_SCALES`; the local standard deviation at the first of them.
    """
    g = robust_gray(x.float())
    out = []
    for s in SCALES:
        gs = blur(g, s)
        dr, dc = _d_rows(gs), _d_cols(gs)
        hrr, hrc, hcc = _d_rows(dr), _d_cols(dr), _d_cols(dc)
        half_trace = 0.5 * (hrr + hcc)
        root = torch.sqrt((0.5 * (hrr - hcc)) ** 2 + hrc ** 2)
        out += [(half_trace + root) * s * s, (half_trace - root) * s * s, torch.hypot(dr, dc) * s]
    means = [blur(g, s) for s in MEAN_SCALES]
    spread = torch.sqrt((blur(g * g, MEAN_SCALES[0]) - means[0] ** 2).clamp_min(0.0))
    return torch.cat(out + means + [spread], dim=1)


class TextureFeatures(nn.Module):
    """Pixel-level texture features as a PatchCore feature extractor (no learned weights).

    Args:
        stride: keep every ``stride``-th row and column of the per-pixel features (1: every pixel;
            2: a quarter of the patches, the anomaly map is upsampled back to the input size).

    ``forward(x)``: ``x`` float ``(B, 3, H, W)``, the photo's RGB in 0..1 (the bank's
    :class:`~models.patchcore.model.BackboneSpec` has mean 0 and std 1) -> ``{"texture": (B, 12,
    ceil(H / stride), ceil(W / stride))}`` float32. The smallest side must exceed 32 px (the widest
    Gaussian's radius); the bank's minimum input side is 64 px.
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

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` of the feature map for a ``height x width`` input."""
        return math.ceil(height / self.stride), math.ceil(width / self.stride)
