"""The agent's evaluation on the project's own validation photos (``cli.py eval ask``)."""

from __future__ import annotations

import statistics

from agent.ask import ask, start_run
from data.build import load_manifest
from services.container import Services

ALL_TOOLS = {"anomaly_scoring", "similar_defect_search", "manual_retrieval"}


def evaluate_ask(services: Services, per_product: int = 2) -> dict:
    """Run the agent on ``per_product`` val defect photos of each fitted product (spread over the types).

    Returns:
        ``{"n", "product_accuracy", "defect_type_accuracy", "all_tools_rate", "fallback_rate",
        "elapsed_s_p50", "elapsed_s_max", "runs": [...]}``.
    """
    manifest = load_manifest(services.settings.data_dir)
    picked: list[dict] = []
    for product in services.banks.products():
        items = [it for it in manifest["items"]
                 if it["product"] == product and it["split"] == "val" and it["label"] == "defect"]
        by_type: dict[str, list[dict]] = {}
        for it in items:
            by_type.setdefault(it["defect_type"], []).append(it)
        order = [v[i] for i in range(max(map(len, by_type.values()), default=0))
                 for v in by_type.values() if i < len(v)]
        picked += order[:per_product]
    runs = []
    for it in picked:
        ctx = start_run(str(services.settings.data_dir / it["image"]))
        result, _ = ask(services, ctx, source="cli")
        tools_called = {s.tool for s in result.steps}
        runs.append({"image": it["image"], "true_product": it["product"], "true_defect": it["defect_type"],
                     "product": result.product or ctx.product, "defect_type": result.defect_type or ctx.defect_type,
                     "fallback": result.fallback, "elapsed_s": round(result.elapsed_s, 2),
                     "all_tools": ALL_TOOLS <= tools_called, "citations": len(result.citations)})
    n = len(runs) or 1
    times = [r["elapsed_s"] for r in runs]
    return {
        "n": len(runs),
        "product_accuracy": round(sum(r["product"] == r["true_product"] for r in runs) / n, 3),
        "defect_type_accuracy": round(sum(r["defect_type"] == r["true_defect"] for r in runs) / n, 3),
        "all_tools_rate": round(sum(r["all_tools"] for r in runs) / n, 3),
        "fallback_rate": round(sum(r["fallback"] for r in runs) / n, 3),
        "elapsed_s_p50": round(statistics.median(times), 1) if times else None,
        "elapsed_s_max": round(max(times), 1) if times else None,
        "runs": runs,
    }
