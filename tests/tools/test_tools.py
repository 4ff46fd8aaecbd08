"""The three smolagents tools against a real built state (no mocks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.catalog import UnknownProductError


@pytest.fixture(scope="module")
def services(built_state):
    from services.container import Services
    from core.settings import get_settings

    return Services(get_settings())


def _val_defect(state: Path, product: str, defect: str) -> dict:
    manifest = json.loads((state / "data" / "manifest.json").read_text())
    return next(it for it in manifest["items"] if it["split"] == "val" and it["product"] == product
                and it["defect_type"] == defect)


def test_tools_chain_records_context(built_state, services, tmp_path):
    from tools import RunContext, build_tools

    item = _val_defect(built_state, "grass", "stain")
    ctx = RunContext.from_path(built_state / "data" / item["image"])
    scoring, search, manual = build_tools(ctx, services)

    obs = scoring.forward()
    assert ctx.product == "grass" and ctx.product_source == "inferred"
    assert "product=grass" in obs and "threshold=" in obs and ("ANOMALOUS" in obs or "NORMAL" in obs)
    insp = ctx.inspection
    assert Path(insp["overlay"]).is_file() and Path(insp["comparison"]).is_file()
    amap = np.load(insp["anomaly_map"])
    assert amap.shape == ctx.image.shape[:2] and amap.dtype == np.float32

    obs = search.forward(k=5)
    assert "majority defect type" in obs
    assert len(ctx.search["hits"]) == 5 and all(h["product"] == "grass" for h in ctx.search["hits"])
    assert ctx.defect_type in {"scratch", "crack", "hole", "stain", "contamination"}

    obs = manual.forward("cause and immediate action", defect_type="stain")
    assert ctx.manual_hits, obs
    for h in ctx.manual_hits:
        assert f"[{h['source']} p.{h['page']}" in obs
        assert h["product"] == "grass"
    sections = {h["section"] for h in ctx.manual_hits}
    assert {"cause", "action", "prevention"} <= sections
    assert ctx.tool_calls == ["anomaly_scoring", "similar_defect_search", "manual_retrieval"]


def test_user_product_wins_and_unknown_product_is_an_error(built_state, services):
    from tools import RunContext, build_tools

    item = _val_defect(built_state, "brick", "crack")
    ctx = RunContext.from_path(built_state / "data" / item["image"], product="brick")
    scoring, search, manual = build_tools(ctx, services)
    obs = scoring.forward(product="gravel")  # the model's guess must not override the user
    assert "product=brick" in obs
    ctx2 = RunContext.from_path(built_state / "data" / item["image"])
    scoring2 = build_tools(ctx2, services)[0]
    with pytest.raises(UnknownProductError):
        scoring2.forward(product="teapot")


def test_korean_question_prefers_korean_manual(built_state, services):
    from tools import RunContext, build_tools

    item = _val_defect(built_state, "brick", "crack")
    ctx = RunContext.from_path(built_state / "data" / item["image"], product="brick",
                               question="균열의 원인과 조치 방법은?")
    assert ctx.lang == "ko"
    manual = build_tools(ctx, services)[2]
    manual.forward("균열 원인 즉시 조치", defect_type="균열")
    assert ctx.manual_hits and all(h.get("lang") == "ko" for h in ctx.manual_hits)
