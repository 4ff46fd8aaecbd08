"""Similar-defect search latency, side by side in one process.

    python bench/bench_search.py [--n 40] [--k 5]

Figures (per query, p50 / p95 in ms):
* ``ImageIndex.search`` end to end (global embedding + PatchCore anomaly map + defect descriptor +
  FAISS + filters + metadata), what a user waits for;
* the query embedding alone (EfficientNet-Lite0 forward): the anchor for the end-to-end figure;
* FAISS ``IndexFlatIP`` search alone vs a NumPy brute-force cosine top-k (``argpartition``) over the
  same gallery vectors: the anchor for the vector search.
Queries are the validation-split defect photos, never in the gallery.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.settings import apply_runtime_env  # noqa: E402

apply_runtime_env()  # before torch / faiss / transformers load

import numpy as np  # noqa: E402

from core.settings import get_settings  # noqa: E402


def stats(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95))}


def timed(fn, items) -> list[float]:
    out = []
    for it in items:
        t0 = time.perf_counter()
        fn(it)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--k", type=int, default=5)
    args = ap.parse_args()

    from core.blas import import_faiss

    faiss = import_faiss()

    from data.build import load_manifest
    from models.embedders import get_image_embedder
    from core.imageio import load_rgb
    from services.container import get_services

    settings = get_settings()
    manifest = load_manifest(settings.data_dir)
    queries = [load_rgb(settings.data_dir / it["image"]) for it in manifest["items"]
               if it["split"] == "val" and it["label"] == "defect"][: args.n]
    gallery = [load_rgb(settings.data_dir / it["image"]) for it in manifest["items"] if it["split"] == "gallery"]
    index = get_services().image_index
    embedder = get_image_embedder()

    for q in queries[:3]:
        index.search(q, k=args.k)
    e2e = timed(lambda q: index.search(q, k=args.k), queries)
    emb = timed(lambda q: embedder.embed([q]), queries)

    gvec = np.ascontiguousarray(np.concatenate([embedder.embed(gallery[i:i + 16]) for i in range(0, len(gallery), 16)]))
    qvec = np.ascontiguousarray(embedder.embed(queries))
    flat = faiss.IndexFlatIP(gvec.shape[1])
    flat.add(gvec)
    fa = timed(lambda v: flat.search(v[None], args.k), qvec)

    def brute(v: np.ndarray):
        s = gvec @ v
        top = np.argpartition(-s, args.k)[: args.k]
        return top[np.argsort(-s[top])]

    npb = timed(brute, qvec)
    agree = np.mean([set(flat.search(v[None], args.k)[1][0]) == set(brute(v)) for v in qvec])

    rows = {"index_search_end_to_end": stats(e2e), "query_embedding_only": stats(emb),
            "faiss_flat_ip_only": stats(fa), "numpy_bruteforce_only": stats(npb)}
    print(f"search latency: {len(queries)} queries, gallery {len(gallery)} x {gvec.shape[1]}-d, k={args.k}, "
          f"embedder {embedder.name}")
    print(f"{'stage':28s} {'p50 ms':>9s} {'p95 ms':>9s}")
    for name, r in rows.items():
        print(f"{name:28s} {r['p50']:9.3f} {r['p95']:9.3f}")
    r1 = rows["index_search_end_to_end"]["p50"] / rows["query_embedding_only"]["p50"]
    r2 = rows["numpy_bruteforce_only"]["p50"] / rows["faiss_flat_ip_only"]["p50"]
    print(f"ratio end-to-end / embedding-only (p50): {r1:.2f}x   (extra: PatchCore anomaly map + defect descriptor + FAISS + metadata)")
    print(f"ratio numpy brute force / FAISS (p50): {r2:.2f}x   (top-{args.k} agreement {agree:.2f})")
    print(json.dumps({**rows, "ratio_e2e_over_embedding": r1, "ratio_numpy_over_faiss": r2, "topk_agreement": agree}))


if __name__ == "__main__":
    main()
