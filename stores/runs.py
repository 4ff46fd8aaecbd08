"""Per-run artifact folders under ``Settings.runs_dir``: the files a request leaves behind.

Each inspection writes ``anomaly_map.npy`` (float32 ``(H, W)``), ``mask.png``, ``heatmap.png``,
``overlay.png`` and ``comparison.png`` into its own folder (:func:`write_inspection_artifacts`).
:class:`RunStore` hands out fresh folders and prunes the oldest ones by count and by bytes,
so a busy app cannot fill the disk.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from core.imageio import load_rgb, save_png
from core.types import InspectionResult
from models.patchcore.anomaly_map import comparison_rgb, heatmap_rgb, overlay_rgb

#: newest run folders kept (older ones are pruned when a new one is made)
KEEP_RUNS = 200
#: at most this many bytes of run folders are kept (oldest pruned first)
KEEP_BYTES = 2 * 1024**3


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


class RunStore:
    """Artifact folders ``<runs_dir>/<prefix>-<time>-<8 hex>``, pruned by count and bytes.

    Args:
        runs_dir: the folder holding the run folders.
        keep_runs: most folders kept; keep_bytes: most bytes kept (both across prefixes).
    """

    def __init__(self, runs_dir: Path, keep_runs: int = KEEP_RUNS, keep_bytes: int = KEEP_BYTES):
        self.runs_dir = Path(runs_dir)
        self.keep_runs, self.keep_bytes = int(keep_runs), int(keep_bytes)

    def new_run(self, prefix: str) -> Path:
        """A fresh (not yet created) folder path; prunes old folders first."""
        self.prune()
        return self.runs_dir / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"

    def prune(self) -> int:
        """Delete the oldest run folders beyond ``keep_runs`` or ``keep_bytes``; returns how many."""
        if not self.runs_dir.is_dir():
            return 0
        folders = sorted((p for p in self.runs_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        removed = 0
        while len(folders) > self.keep_runs:
            shutil.rmtree(folders.pop(0), ignore_errors=True)
            removed += 1
        sizes = [_folder_bytes(p) for p in folders]
        total = sum(sizes)
        while folders and total > self.keep_bytes:
            shutil.rmtree(folders.pop(0), ignore_errors=True)
            total -= sizes.pop(0)
            removed += 1
        return removed


def _display(result: InspectionResult, rgb: np.ndarray, max_side: int) -> tuple[InspectionResult, np.ndarray]:
    """The result and photo scaled down so that the longer side is ``max_side`` (maps bilinear, mask
    nearest, region boxes scaled); unchanged when already small enough."""
    h, w = rgb.shape[:2]
    scale = max_side / float(max(h, w))
    if scale >= 1.0:
        return result, rgb
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR))
    amap = np.asarray(Image.fromarray(result.anomaly_map.astype(np.float32)).resize((nw, nh), Image.BILINEAR))
    mask = np.asarray(Image.fromarray(result.mask.astype(np.uint8) * 255).resize((nw, nh), Image.NEAREST)) > 0
    regions = [replace(r, bbox=(int(r.bbox[0] * scale), int(r.bbox[1] * scale), max(1, int(r.bbox[2] * scale)),
                                max(1, int(r.bbox[3] * scale)))) for r in result.regions]
    return replace(result, anomaly_map=amap.astype(np.float32), mask=mask, regions=regions), small


def write_inspection_artifacts(result: InspectionResult, rgb: np.ndarray, out_dir: Path,
                               display_max_side: int | None = None) -> dict[str, str]:
    """Write the pictures of one inspection into ``out_dir`` (created if missing).

    Files: ``anomaly_map.npy`` (float32 ``(H, W)``), ``mask.png`` (0/255), ``heatmap.png`` (fixed
    per-product colour scale), ``overlay.png`` (heat map blended on the photo, mask contour, region
    boxes labelled with area %), ``comparison.png`` (input | nearest normal | overlay).

    Args:
        display_max_side: None: every file at the input's resolution (the CLI contract); else the
            pictures and the stored map are scaled down to this longer side (the app: a 6000 px
            photo must not cost hundreds of MB per run).

    Returns:
        ``{"anomaly_map", "mask", "heatmap", "overlay", "comparison"}`` -> path strings.

    Raises:
        ValueError: ``rgb`` and ``result.anomaly_map`` sizes differ.
    """
    rgb = load_rgb(rgb)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rgb.shape[:2] != result.anomaly_map.shape:
        raise ValueError(f"image {rgb.shape[:2]} and anomaly map {result.anomaly_map.shape} differ in size")
    if display_max_side:
        result, rgb = _display(result, rgb, int(display_max_side))
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
