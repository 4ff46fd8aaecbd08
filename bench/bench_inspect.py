"""Inspect latency: our PatchCore path vs anomalib's default PatchCore pipeline, side by side.

    python bench/bench_inspect.py [--product brick] [--n 30] [--train 40]

Figure: ``PatchCoreStore.inspect`` (EfficientNet-Lite0 backbone, bank from the
build) per 256x256 image, p50 / p95 in ms, with and without writing the artifacts.
Anchor: anomalib 2.7's default ``PatchcoreModel`` (wide_resnet50_2, layers
layer2+layer3, 10 % coreset) fitted on the same training images in this process.
Its ImageNet weights cannot be downloaded here, so it runs with random init;
latency does not depend on the weight values. Prints ratio = anchor / ours.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from stores.settings import get_settings  # noqa: E402


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--product", default="brick")
    ap.add_argument("--n", type=int, default=30, help="timed images")
    ap.add_argument("--train", type=int, default=40, help="training images for the anchor's memory bank")
    args = ap.parse_args()

    from data.build import load_manifest
    from stores.imageio import load_rgb
    from stores.patchcore import save_artifacts
    from stores.services import get_services

    settings = get_settings()
    manifest = load_manifest(settings.data_dir)
    items = [it for it in manifest["items"] if it["product"] == args.product]
    val = [load_rgb(settings.data_dir / it["image"]) for it in items if it["split"] == "val"][: args.n]
    train = [load_rgb(settings.data_dir / it["image"]) for it in items if it["split"] == "train"][: args.train]
    store = get_services().patchcore

    for im in val[:3]:
        store.inspect(im, args.product)
    ours, ours_art = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, im in enumerate(val):
            t0 = time.perf_counter()
            res = store.inspect(im, args.product)
            t1 = time.perf_counter()
            save_artifacts(res, im, Path(tmp) / str(i))
            t2 = time.perf_counter()
            ours.append((t1 - t0) * 1000)
            ours_art.append((t2 - t0) * 1000)

    # anchor: anomalib's default PatchCore (wide_resnet50_2, layer2+layer3)
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    anchor = PatchcoreModel(layers=["layer2", "layer3"], backbone="wide_resnet50_2", pre_trained=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def tens(ims: list[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float() / 255.0
        return (x - mean) / std

    t0 = time.perf_counter()
    anchor.train()
    for i in range(0, len(train), 8):
        anchor(tens(train[i:i + 8]))
    anchor.subsample_embedding(0.1)
    anchor_fit_s = time.perf_counter() - t0
    anchor.eval()
    for im in val[:2]:
        anchor(tens([im]))
    anch = []
    for im in val:
        t0 = time.perf_counter()
        anchor(tens([im]))
        anch.append((time.perf_counter() - t0) * 1000)

    rows = {
        "ours_inspect_ms": {"p50": pct(ours, 50), "p95": pct(ours, 95)},
        "ours_inspect_plus_artifacts_ms": {"p50": pct(ours_art, 50), "p95": pct(ours_art, 95)},
        "anchor_anomalib_default_ms": {"p50": pct(anch, 50), "p95": pct(anch, 95)},
    }
    ratio = rows["anchor_anomalib_default_ms"]["p50"] / rows["ours_inspect_ms"]["p50"]
    print(f"inspect latency, product={args.product}, {len(val)} images 256x256, torch threads={torch.get_num_threads()}")
    print(f"{'pipeline':42s} {'p50 ms':>9s} {'p95 ms':>9s}")
    for name, r in rows.items():
        print(f"{name:42s} {r['p50']:9.1f} {r['p95']:9.1f}")
    print(f"anchor bank: {tuple(anchor.memory_bank.shape)} from {len(train)} images, fit {anchor_fit_s:.1f} s")
    print(f"ratio anchor/ours (p50): {ratio:.2f}x")
    print(json.dumps({"product": args.product, "n": len(val), **rows, "ratio_anchor_over_ours_p50": ratio}))


if __name__ == "__main__":
    main()
