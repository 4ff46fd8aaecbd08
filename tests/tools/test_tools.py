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
    assert obs.startswith("grass (inferred") and "vs threshold" in obs and ("ANOMALOUS" in obs or "NORMAL" in obs)
    insp = ctx.inspection
    assert Path(insp["overlay"]).is_file() and Path(insp["comparison"]).is_file()
    amap = np.load(insp["anomaly_map"])
    assert amap.shape == ctx.image.shape[:2] and amap.dtype == np.float32

    obs = search.forward(k=5)
    assert "majority defect type" in obs
    from tools.similar_defects import NOT_A_FINDING

    normal = not insp["is_anomalous"] and not insp["uncertain"]
    assert (NOT_A_FINDING in obs) == normal
    assert len(ctx.search["hits"]) == 5 and all(h["product"] == "grass" for h in ctx.search["hits"])
    assert ctx.defect_type in {"scratch", "crack", "hole", "stain", "contamination"}
    # the metric's probabilities of the photo, and how sure it is of the majority type, in the observation
    probs = ctx.search["type_probabilities"]
    assert set(probs) == {"scratch", "crack", "hole", "stain", "contamination"} and abs(sum(probs.values()) - 1) < 0.01
    conf = ctx.search["type_confidence"]
    assert conf["p"] == pytest.approx(probs[ctx.defect_type], abs=1e-3)
    from services.search import TYPE_CONFIDENT

    assert conf["confident"] == (conf["p"] >= TYPE_CONFIDENT)
    assert ("type uncertain" in obs) == (not conf["confident"] and not normal)
    assert (f"defect metric {conf['p']:.0%}" in obs) == (not conf["confident"] and not normal)

    obs = manual.forward("cause action prevention")
    assert ctx.manual_hits, obs
    for h in ctx.manual_hits:
        assert f"[{h['label']}] {h['source']} p.{h['page']}" in obs and f"- " in obs
        assert h["product"] == "grass" and h["defect"] == ctx.defect_type  # the photo's defect type
    sections = {h["section"] for h in ctx.manual_hits}
    assert {"cause", "action", "prevention"} <= sections
    assert ctx.tool_calls == ["anomaly_scoring", "similar_defect_search", "manual_retrieval"]
    assert [p["label"] for p in ctx.passages] == [f"P{i + 1}" for i in range(len(ctx.passages))]
    # the same photo again: nothing is computed twice
    assert scoring.forward() == obs_score(ctx) and len(ctx.passages) == len(ctx.manual_hits)


def test_similar_search_of_a_part_scored_normal_says_it_is_not_a_finding(built_state, services):
    """A good part's nearest past defects are not its defects: the observation says so, and claims no type doubt."""
    from tools import RunContext, build_tools
    from tools.similar_defects import NOT_A_FINDING

    manifest = json.loads((built_state / "data" / "manifest.json").read_text())
    normals = [it for it in manifest["items"] if it["split"] == "train" and it["product"] == "brick"][:10]
    for item in normals:
        ctx = RunContext.from_path(built_state / "data" / item["image"], product="brick")
        scoring, search, _ = build_tools(ctx, services)
        scoring.forward()
        if not ctx.inspection["is_anomalous"] and not ctx.inspection["uncertain"]:
            break
    else:
        pytest.fail("no brick train normal scored NORMAL outside the uncertain band")
    obs = search.forward()
    assert obs.endswith(NOT_A_FINDING) and "type uncertain" not in obs
    assert search.forward() == obs  # the cached search of the same photo says the same
    # the same photo searched without scoring: the votes are all there is, no such note
    fresh = RunContext.from_path(built_state / "data" / item["image"], product="brick")
    assert NOT_A_FINDING not in build_tools(fresh, services)[1].forward()


def obs_score(ctx):
    from tools.anomaly_scoring import verdict_line

    return verdict_line(ctx.inspection)


def test_text_question_without_photo(built_state, services):
    """No photo: image tools refuse clearly, manual retrieval takes product and defect from the question."""
    from tools import RunContext, build_tools

    ctx = RunContext(image=None, question="How do I prevent stains on gravel?")
    scoring, search, manual = build_tools(ctx, services)
    with pytest.raises(ValueError, match="no photo"):
        scoring.forward()
    with pytest.raises(ValueError, match="no photo"):
        search.forward()
    obs = manual.forward("prevent stain")
    assert ctx.manual_hits and all(h["product"] == "gravel" and h["defect"] == "stain" for h in ctx.manual_hits)
    assert {h["section"] for h in ctx.manual_hits} == {"prevention"} and "[P1]" in obs
    assert ctx.topic == {"product": "gravel", "defect_type": "stain"}
    follow = RunContext(image=None, question="And for grass?", topic=ctx.topic, passages=list(ctx.passages))
    build_tools(follow, services)[2].forward("prevent")
    assert all(h["product"] == "grass" and h["defect"] == "stain" for h in follow.manual_hits)
    assert follow.passages[0]["label"] == "P1" and follow.manual_hits[0]["label"] == f"P{len(ctx.passages) + 1}"


def test_register_correction_needs_a_writing_session(writable_state):
    from services.container import Services
    from core.settings import get_settings
    from tools import RunContext, build_tools

    services = Services(get_settings())
    item = _val_defect(writable_state, "brick", "hole")
    ctx = RunContext.from_path(writable_state / "data" / item["image"], product="brick")
    assert [t.name for t in build_tools(ctx, services)][-1] == "manual_retrieval"  # no write tool
    ctx.writes = True
    register = build_tools(ctx, services)[-1]
    assert register.name == "register_correction"
    before = len(services.image_index)
    obs = register.forward("stain")
    assert "registered as brick / stain" in obs and len(services.image_index) == before + 1
    ctx.writes = False
    with pytest.raises(PermissionError):
        register.forward("hole")


def test_user_product_wins_and_unknown_product_is_an_error(built_state, services):
    from tools import RunContext, build_tools

    item = _val_defect(built_state, "brick", "crack")
    ctx = RunContext.from_path(built_state / "data" / item["image"], product="brick")
    scoring, search, manual = build_tools(ctx, services)
    obs = scoring.forward(product="gravel")  # the model's guess must not override the user
    assert obs.startswith("brick:")
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


def test_uncertain_verdict_is_said_in_words():
    """A verdict inside the bank's uncertain band says so in the observation and in the code-written verdict."""
    from types import SimpleNamespace

    from agent.answers import summary_line, uncertainty_note
    from tools.anomaly_scoring import verdict_line

    insp = {"product": "gravel", "product_source": "user", "score": 30.1, "threshold": 30.5, "is_anomalous": False,
            "margin": -0.4, "uncertain": True, "regions": []}
    assert "uncertain: -0.4 normal spreads" in verdict_line(insp)
    ctx = SimpleNamespace(inspection=insp, product="gravel", product_source="user", product_confidence=None,
                          defect_type=None, search=None, lang="en")
    assert "**Uncertain**: the score is within 0.4 normal spreads" in summary_line(ctx, "en")
    assert "불확실" in uncertainty_note(insp, "ko")
    sure = {**insp, "margin": -3.0, "uncertain": False}
    assert "uncertain" not in verdict_line(sure) and uncertainty_note(sure) == ""
