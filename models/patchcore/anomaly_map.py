"""Pictures of a PatchCore inspection: heat map, overlay, mask, side-by-side comparison.

Heat maps use a FIXED per-product colour scale (``InspectionResult.color_scale``,
calibrated on the validation split) rather than per-image min-max scaling, so a
normal part stays cold and a defect is hot (anomalib's per-image normalisation
makes every image look "anomalous somewhere"). Colours: matplotlib's ``jet``
colormap (no pyplot, no display needed); drawing: Pillow; contours: scikit-image.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:  # pragma: no cover
    from models.patchcore.model import InspectionResult

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


def heatmap_rgb(anomaly_map: np.ndarray, color_scale: tuple[float, float] | None) -> np.ndarray:
    """Colour an anomaly map ``(H, W)`` with ``jet`` on the fixed scale -> RGB uint8 ``(H, W, 3)``."""
    from matplotlib import colormaps

    rgba = colormaps["jet"](_scale(anomaly_map, color_scale))
    return (rgba[..., :3] * 255.0 + 0.5).astype(np.uint8)


def overlay_rgb(rgb: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray, regions: list[dict],
                color_scale: tuple[float, float] | None) -> np.ndarray:
    """Heat map blended on the photo (alpha grows with the score), mask contour, region boxes.

    Args:
        rgb: photo, uint8 ``(H, W, 3)``; ``anomaly_map`` / ``mask`` must be ``(H, W)``.
        regions: ``[{"bbox": [x0, y0, x1, y1], "area_frac": ...}]`` boxes, labelled with area %.

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
            x0, y0, x1, y1 = reg["bbox"]
            draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=BOX_COLOUR, width=2)
            label = f"{100.0 * float(reg['area_frac']):.1f}%"
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


def write_artifacts(result: InspectionResult, rgb: np.ndarray, out_dir: Path) -> dict[str, str]:
    """Write anomaly_map.npy, mask.png, heatmap.png, overlay.png, comparison.png; return their paths.

    Raises:
        ValueError: ``rgb`` and ``result.anomaly_map`` sizes differ.
    """
    from core.imageio import load_rgb, save_png

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rgb.shape[:2] != result.anomaly_map.shape:
        raise ValueError(f"image {rgb.shape[:2]} and anomaly map {result.anomaly_map.shape} differ in size")
    paths = {
        "anomaly_map": out_dir / "anomaly_map.npy",
        "mask": out_dir / "mask.png",
        "heatmap": out_dir / "heatmap.png",
        "overlay": out_dir / "overlay.png",
        "comparison": out_dir / "comparison.png",
    }
    np.save(paths["anomaly_map"], result.anomaly_map.astype(np.float32))
    save_png((result.mask.astype(np.uint8) * 255), paths["mask"])
    save_png(heatmap_rgb(result.anomaly_map, result.color_scale), paths["heatmap"])
    over = overlay_rgb(rgb, result.anomaly_map, result.mask, result.regions, result.color_scale)
    save_png(over, paths["overlay"])
    reference = None
    if result.nearest_normal and Path(result.nearest_normal).is_file():
        try:
            reference = load_rgb(result.nearest_normal)
        except ValueError:
            reference = None
    save_png(comparison_rgb(rgb, reference, over), paths["comparison"])
    return {k: str(v) for k, v in paths.items()}
