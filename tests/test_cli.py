"""CLI contract tests (design.md "The CLI contract"): real subprocesses on a built state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.flagged import flagged_first

REPO = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], state: Path, timeout: float = 600, extra_env: dict | None = None):
    env = dict(os.environ, DRA_STATE_DIR=str(state), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra_env or {})
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines, f"no output; stderr:\n{proc.stderr[-3000:]}"
    if "--json" in args:  # the contract: stdout is exactly one JSON object
        assert len(lines) == 1, f"stdout is not one JSON line: {proc.stdout[:500]!r}"
    return proc.returncode, json.loads(lines[-1]), proc.stderr


def _items(state: Path, split: str, label: str, product: str | None = None) -> list[dict]:
    manifest = json.loads((state / "data" / "manifest.json").read_text())
    return [it for it in manifest["items"] if it["split"] == split and it["label"] == label
            and (product is None or it["product"] == product)]


def test_inspect_single_and_batch_with_glob(built_state):
    defect = _items(built_state, "val", "defect", "gravel")[0]
    good = _items(built_state, "val", "good", "gravel")[0]
    d_path = str(built_state / "data" / defect["image"])
    rc, out, err = run_cli(["inspect", d_path, "--json"], built_state)
    assert rc == 0, err
    assert out["product"] == "gravel" and out["product_source"] == "inferred"
    for key in ("score", "threshold", "is_anomalous", "anomaly_map", "mask", "overlay", "regions", "model",
                "elapsed_ms"):
        assert key in out
    amap = np.load(out["anomaly_map"])
    assert amap.dtype == np.float32 and amap.shape == (256, 256)
    assert Path(out["overlay"]).is_file() and Path(out["mask"]).is_file()
    for r in out["regions"]:
        x0, y0, x1, y1 = r["bbox"]
        assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256 and 0 < r["area_frac"] <= 1

    glob_pat = str(built_state / "data" / "gravel" / "val" / "good" / "00[0-1].png")
    rc, out, err = run_cli(["inspect", d_path, glob_pat, "--product", "gravel", "--json"], built_state)
    assert rc == 0, err
    assert [r["image"] for r in out["results"]][0] == d_path
    assert len(out["results"]) == 3
    assert all(r["product"] == "gravel" and r["product_source"] == "user" for r in out["results"])
    assert good["image"].startswith("gravel/val/good/")


def test_search_image_batch_and_text(built_state):
    queries = _items(built_state, "val", "defect", "brick")[:2]
    paths = [str(built_state / "data" / q["image"]) for q in queries]
    rc, out, err = run_cli(["search", "--image", *paths, "-k", "3", "--json"], built_state)
    assert rc == 0, err
    assert len(out["results"]) == 2
    for res in out["results"]:
        assert res["product"] == "brick" and len(res["results"]) == 3
        for hit in res["results"]:
            assert {"id", "product", "defect_type", "score", "image"} <= set(hit)
            assert Path(hit["image"]).is_file()
        scores = [h["score"] for h in res["results"]]
        assert scores == sorted(scores, reverse=True)
    rc, out, err = run_cli(["search", "--text", "crack in a brick", "-k", "4", "--json"], built_state)
    assert rc == 0, err
    assert len(out["results"]) == 4 and "model" in out


def test_manual_query_and_ingest(built_state, tmp_path):
    rc, out, err = run_cli(["manual", "how to repair a crack", "--product", "brick", "--defect", "crack",
                            "--json"], built_state)
    assert rc == 0, err
    assert out["results"], out
    hit = out["results"][0]
    assert {"text", "source", "page", "section", "score"} <= set(hit)
    assert hit["page"] >= 1 and hit["source"].endswith(".pdf")

    import pymupdf

    pdf = tmp_path / "pump_manual.pdf"
    doc = pymupdf.open()
    for i in range(2):
        page = doc.new_page()
        page.insert_text((72, 72), f"Pump housing inspection, page {i + 1}.\nCause\nCavitation erodes the impeller.")
    doc.save(pdf)
    state = tmp_path / "state"
    import shutil

    shutil.copytree(built_state, state)
    rc, out, err = run_cli(["ingest", str(pdf), "--product", "pump", "--json"], state)
    assert rc == 0, err
    assert out["documents"] == 1 and out["pages"] == 2 and out["chunks"] >= 2 and "elapsed_ms" in out
    rc, out, err = run_cli(["manual", "impeller cavitation", "--json"], state)
    assert rc == 0, err
    assert out["results"][0]["source"] == "pump_manual.pdf"


@pytest.mark.parametrize("kind", ["not_image", "truncated", "missing", "unknown_product"])
def test_bad_input_gives_json_error(built_state, tmp_path, kind):
    good = built_state / "data" / _items(built_state, "val", "good", "brick")[0]["image"]
    args = ["inspect"]
    if kind == "not_image":
        p = tmp_path / "notes.png"
        p.write_text("this is not an image")
        args.append(str(p))
    elif kind == "truncated":
        p = tmp_path / "cut.png"
        p.write_bytes(good.read_bytes()[:400])
        args.append(str(p))
    elif kind == "missing":
        args.append(str(tmp_path / "nope.png"))
    else:
        args += [str(good), "--product", "teapot"]
    rc, out, _ = run_cli([*args, "--json"], built_state)
    assert rc != 0
    assert "error" in out and isinstance(out["error"], str) and out["error"]
    if kind == "unknown_product":
        assert "teapot" in out["error"] and "brick" in out["error"]


def test_usage_error_is_json(built_state):
    rc, out, _ = run_cli(["search", "--json"], built_state)
    assert rc != 0 and "error" in out


@pytest.mark.slow
def test_ask_end_to_end_with_offline_model(built_state):
    """`cli.py ask IMAGE --json` without --product, real Qwen2.5-Coder-1.5B GGUF via llama.cpp."""
    holes = [it for it in _items(built_state, "val", "defect", "brick") if it["defect_type"] == "hole"]
    item = flagged_first(built_state, holes)[0]  # a hole the bank flags: the full response manual
    rc, out, err = run_cli(["ask", str(built_state / "data" / item["image"]), "--json"], built_state, timeout=900)
    assert rc == 0, err
    assert out["product"] == "brick"
    tools = {s["tool"] for s in out["steps"]}
    assert {"anomaly_scoring", "similar_defect_search", "manual_retrieval"} <= tools
    for section in ("## Defect summary", "## Location and extent", "## Likely causes", "## Immediate actions",
                    "## Prevention", "## Sources"):
        assert section in out["answer"]
    assert out["citations"] and all(c["source"].endswith(".pdf") and c["page"] >= 1 for c in out["citations"])
    assert "qwen2.5-coder" in out["model"].lower()
    assert out["defect_type"] == "hole"


def test_register_search_modes_relabel_delete(built_state, tmp_path):
    import shutil

    state = tmp_path / "state"
    shutil.copytree(built_state, state)
    query = _items(state, "val", "defect", "grass")[0]
    path = str(state / "data" / query["image"])
    rc, reg, err = run_cli(["register", path, "--product", "grass", "--defect", query["defect_type"],
                            "--note", "reported by line 3", "--json"], state)
    assert rc == 0, err
    assert reg["duplicate"] is False and reg["product"] == "grass" and Path(reg["image"]).is_file()
    rc, dup, err = run_cli(["register", path, "--product", "grass", "--defect", "crack", "--json"], state)
    assert rc == 0 and dup["duplicate"] is True and dup["id"] == reg["id"], err
    # image -> image finds the registered image first; fused and text modes carry "matched"
    rc, out, err = run_cli(["search", "--image", path, "--text", "reported by line 3", "-k", "3", "--json"], state)
    assert rc == 0, err
    assert out["mode"] == "fused" and out["results"][0]["id"] == reg["id"]
    assert all(h["matched"] == "fused" for h in out["results"])
    rc, out, err = run_cli(["search", "--image", path, "--mode", "image", "-k", "1", "--json"], state)
    assert rc == 0 and out["results"][0]["id"] == reg["id"] and out["results"][0]["matched"] == "image", err
    rc, out, err = run_cli(["relabel", reg["id"], "--defect", "contamination", "--note", "oil drop", "--json"], state)
    assert rc == 0 and out["defect_type"] == "contamination" and out["note"] == "oil drop", err
    rc, out, err = run_cli(["search", "--text", "oil drop", "--defect", "contamination", "--product", "grass",
                            "-k", "1", "--json"], state)
    assert rc == 0 and out["results"][0]["id"] == reg["id"] and out["results"][0]["matched"] == "caption", err
    rc, out, err = run_cli(["delete", reg["id"], "--json"], state)
    assert rc == 0 and out == {"id": reg["id"], "deleted": True}, err
    for args in (["delete", reg["id"]], ["relabel", reg["id"], "--note", "x"],
                 ["register", path, "--product", "teapot", "--defect", "crack"],
                 ["search", "--text", "crack", "--mode", "fused"]):
        rc, out, _ = run_cli([*args, "--json"], state)
        assert rc != 0 and out["error"], args
