"""PatchCore anomaly maps: the map generator's blur, regions of a mask, and their pictures.

* :class:`SeparableGaussianBlur`: anomalib's anomaly-map Gaussian blur as two 1-D passes.
* :func:`find_regions`: connected components of the thresholded map (scikit-image).
* :func:`heatmap_rgb`, :func:`overlay_rgb`, :func:`comparison_rgb`: the pictures shown to the
  user. Heat maps use a FIXED per-product colour scale (``InspectionResult.color_scale``,
  calibrated on the validation split) rather than per-image min-max scaling, so a normal part
  stays cold and a defect is hot (anomalib's per-image normalisation makes every image look
  "anomalous somewhere"). Colours: matplotlib's ``jet`` colormap (no pyplot); drawing: Pillow;
  contours: scikit-image. Arrays in, arrays out: writing files is :mod:`stores.runs`.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.nn import functional as F  # noqa: N812

from core.types import Region
from models.patchcore.config import MAX_REGIONS, MIN_REGION_FRAC


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


def find_regions(mask: np.ndarray, anomaly_map: np.ndarray) -> list[Region]:
    """Connected components (8-connectivity, skimage) of a bool mask as region dicts.

    Args:
        mask: bool ``(H, W)``; anomaly_map: float ``(H, W)`` (same size).

    Returns:
        :class:`core.types.Region` list sorted by peak (descending), components below
        ``MIN_REGION_FRAC`` (0.05 %) of the image dropped, at most ``MAX_REGIONS`` (10).
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
        out.append(Region(bbox=(int(c0), int(r0), int(c1), int(r1)), area_frac=round(frac, 5),
                          peak=round(float(prop.intensity_max), 4)))
    out.sort(key=lambda r: -r.peak)
    return out[:MAX_REGIONS]


BOX_COLOUR = (255, 255, 255)
CONTOUR_COLOUR = (255, 255, 255)
PANEL_GAP = 4


def _scale(anomaly_map: np.ndarray, color_scale: tuple[float, float] | None) -> np.ndarray:
    """Map scores to 0..1 with the fixed scale (fallback: the map's own range)."""
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if color_scale is None or not np.isfinite(color_scale).all() or color_scale[1] <= color_scale[0]:
        lo, hi = float(amap.min()), float(amap.max())
        hi = hi if hi > lo else lo + 1.0
    else:
        lo, hi = float(color_scale[0]), float(color_scale[1])
    return np.clip((amap - lo) / (hi - lo), 0.0, 1.0)


def _jet_lut() -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps["jet"](np.arange(256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


def heatmap_rgb(anomaly_map: np.ndarray, color_scale: tuple[float, float] | None) -> np.ndarray:
    """Colour an anomaly map ``(H, W)`` with ``jet`` on the fixed scale -> RGB uint8 ``(H, W, 3)``.

    Through matplotlib's 256-entry ``jet`` table indexed with uint8 levels (the colormap's own
    quantisation), so a large map costs 4 bytes per pixel, not the 32 of a float64 RGBA array.
    """
    level = np.minimum((_scale(anomaly_map, color_scale) * 256.0).astype(np.int32), 255).astype(np.uint8)
    return _jet_lut()[level]


def overlay_rgb(rgb: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray, regions: list[Region],
                color_scale: tuple[float, float] | None) -> np.ndarray:
    """Heat map blended on the photo (alpha grows with the score), mask contour, region boxes.

    Args:
        rgb: photo, uint8 ``(H, W, 3)``; ``anomaly_map`` / ``mask`` must be ``(H, W)``.
        regions: :class:`core.types.Region` boxes, labelled with their area %.

    Returns:
        uint8 ``(H, W, 3)``.
    """
    from skimage.segmentation import find_boundaries

    level = _scale(anomaly_map, color_scale)[..., None]
    heat = heatmap_rgb(anomaly_map, color_scale).astype(np.float32)
    alpha = 0.15 + 0.5 * level  # cold areas stay close to the photo
    out = (rgb.astype(np.float32) * (1 - alpha) + heat * alpha).clip(0, 255).astype(np.uint8)
    if mask.any():
        out[find_boundaries(mask, mode="outer")] = CONTOUR_COLOUR
    img = Image.fromarray(out)
    if regions:
        draw = ImageDraw.Draw(img)
        font = ImageFont.load_default()
        for reg in regions:
            x0, y0, x1, y1 = reg.bbox
            draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=BOX_COLOUR, width=2)
            label = f"{100.0 * float(reg.area_frac):.1f}%"
            ty = y0 - 12 if y0 >= 12 else min(y1 + 1, img.height - 12)
            tw = int(draw.textlength(label, font=font)) + 4
            draw.rectangle([x0, ty, x0 + tw, ty + 11], fill=(0, 0, 0))
            draw.text((x0 + 2, ty), label, fill=BOX_COLOUR, font=font)
    return np.asarray(img)


def _fit_height(rgb: np.ndarray, height: int) -> Image.Image:
    img = Image.fromarray(rgb)
    if img.height != height:
        width = max(1, round(img.width * height / img.height))
        img = img.resize((width, height), Image.BILINEAR)
    return img


def comparison_rgb(rgb: np.ndarray, nearest_normal: np.ndarray | None, overlay: np.ndarray,
                   titles: tuple[str, str, str] = ("input", "nearest normal", "anomaly overlay")) -> np.ndarray:
    """Side-by-side panel ``input | nearest normal | overlay`` (same height, titled), uint8 RGB."""
    height = min(max(rgb.shape[0], 128), 512)
    if nearest_normal is None:
        nearest_normal = np.full((height, height, 3), 96, dtype=np.uint8)
        titles = (titles[0], "no reference", titles[2])
    panels = [_fit_height(a, height) for a in (rgb, nearest_normal, overlay)]
    title_h = 14
    width = sum(p.width for p in panels) + PANEL_GAP * (len(panels) - 1)
    canvas = Image.new("RGB", (width, height + title_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    x = 0
    for panel, title in zip(panels, titles, strict=True):
        canvas.paste(panel, (x, title_h))
        draw.text((x + 2, 1), title, fill=(0, 0, 0), font=font)
        x += panel.width + PANEL_GAP
    return np.asarray(canvas)
