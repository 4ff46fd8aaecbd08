"""Test helper: the sample data's defect photos ordered by whether the product's bank flags them.

The calibrated threshold targets a low false-positive rate on parts from regions the bank has
not seen (issue 15), so on the textured products most val defects score NORMAL. Tests that need
the agent's full response manual take a defect the bank flags; this scores each val defect once
per state (PatchCore through :func:`services.inspect.inspect_image`'s model, no artifacts).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path


@functools.lru_cache(maxsize=8)
def _flags(state: str) -> dict[str, float]:
    """``{image: margin}`` of every val defect of a built state (margin > 0: flagged)."""
    from core.imageio import load_rgb
    from core.settings import Settings
    from services.container import Services

    services = Services(dataclasses.replace(Settings.from_env(), state_dir=Path(state)))
    manifest = json.loads((Path(state) / "data" / "manifest.json").read_text(encoding="utf-8"))
    out = {}
    for it in manifest["items"]:
        if it["split"] == "val" and it["label"] == "defect":
            r = services.banks.get(it["product"]).predict([load_rgb(Path(state) / "data" / it["image"])])[0]
            out[it["image"]] = float(r.score - r.threshold)
    return out


def flagged_first(state: Path, items: list[dict]) -> list[dict]:
    """``items`` (val defects of ``state``) with the ones the bank flags first, each group in the given order."""
    flags = _flags(str(Path(state).resolve()))
    return sorted(items, key=lambda it: flags.get(it["image"], -1.0) <= 0)
