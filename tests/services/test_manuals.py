"""Manual use cases (services/manuals.py) and their CLI edge: real PDFs, real Chroma, real cli.py subprocesses."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pdfs import text_pdf

from core.catalog import UnknownProductError
from core.errors import InputError
from core.settings import Settings
from services.container import Services
from services.manuals import ingest_manual, manual_products, parse_manual_product, query_manual

pymupdf = pytest.importorskip("pymupdf")
REPO = Path(__file__).resolve().parents[2]

VALVE_PAGES = [
    "Valve manual. Scope: gate valves of the cooling line.\n\nSafety: close the line before any work.",
    "Packing leaks. When the stem packing leaks, tighten the gland nuts a quarter turn.\n\n"
    "If it still leaks, replace the packing rings.\n\n" * 6,
    "Actuator wiring. Terminal 3 carries the 24 V supply of the actuator.\n\n"
    "Check the fuse F2 before replacing the actuator board.",
    "Stem lubrication. Grease the stem thread every 500 operating hours with lithium grease.",
]


_pdf = text_pdf


@pytest.fixture()
def services(tmp_path) -> Services:
    return Services(dataclasses.replace(Settings.from_env(), state_dir=tmp_path / "state"))


def run_cli(args: list[str], state: Path) -> tuple[int, dict, str]:
    env = dict(os.environ, DRA_STATE_DIR=str(state), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"stdout is not one JSON line: {proc.stdout[:500]!r}\n{proc.stderr[-2000:]}"
    return proc.returncode, json.loads(lines[0]), proc.stderr


def test_cli_ingested_product_is_a_filter_and_pages_are_distinct(built_state, tmp_path):
    """Issue 15 (a) and (c) through cli.py: ingest under a new product, then filter by it; top 3 = 3 pages."""
    state = tmp_path / "state"
    shutil.copytree(built_state, state)
    pdf = _pdf(tmp_path / "valve_manual.pdf", VALVE_PAGES)
    rc, out, err = run_cli(["ingest", str(pdf), "--product", "valve", "--json"], state)
    assert rc == 0, err
    assert out["documents"] == 1 and out["pages"] == 4 and out["files"][0]["product"] == "valve"
    rc, out, err = run_cli(["manual", "the stem packing is leaking, what do I do?", "--product", "valve", "-k", "3",
                            "--json"], state)
    assert rc == 0, (out, err)
    results = out["results"]
    assert results[0]["source"] == "valve_manual.pdf" and results[0]["page"] == 2
    assert all(r["source"] == "valve_manual.pdf" for r in results)
    pages = [r["page"] for r in results]
    assert len(results) == 3 and len(set(pages)) == 3, pages
    # with --product the agent's model wrote a passage the store ranked by (HyDE), and says so; --no-hyde skips it
    assert out["hyde"]["model"].startswith("llamacpp:") and out["hyde"]["passage"], out["hyde"]
    rc, plain, err = run_cli(["manual", "the stem packing is leaking, what do I do?", "--product", "valve", "-k", "3",
                              "--no-hyde", "--json"], state)
    assert rc == 0 and "hyde" not in plain and plain["results"][0]["page"] == 2, (plain, err)
    # a product nobody ingested is still refused, with the ingested one listed
    rc, out, err = run_cli(["manual", "packing", "--product", "pumpz", "--json"], state)
    assert rc != 0 and "unknown product" in out["error"] and "valve" in out["error"]


def test_ingested_product_filter_and_caps_as_input_errors(services, tmp_path):
    ingest_manual(services, _pdf(tmp_path / "valve.pdf", VALVE_PAGES), product="Valve")
    assert "valve" in manual_products(services) and parse_manual_product(services, "VALVE") == "valve"
    with pytest.raises(UnknownProductError, match="unknown product 'pumpz'"):
        parse_manual_product(services, "pumpz")
    rep = query_manual(services, "fuse of the actuator board", product="valve", k=2)
    assert rep.passages[0].page == 3 and rep.passages[0].product == "valve"
    many = pymupdf.open()
    for _ in range(2001):
        many.new_page(width=100, height=100)
    many.save(tmp_path / "many.pdf")
    many.close()
    with pytest.raises(InputError, match="has 2001 pages; at most 2000 pages per PDF"):
        ingest_manual(services, tmp_path / "many.pdf", product="valve")
    assert not (services.manuals.files_dir / "many.pdf").exists()


def test_huge_page_preview_is_refused_and_query_still_answers(services, tmp_path):
    huge = pymupdf.open()
    huge.new_page(width=14400, height=14400).insert_text((72, 200), "Poster: flange bolt torque sequence", fontsize=60)
    huge.save(tmp_path / "poster.pdf")
    huge.close()
    ingest_manual(services, tmp_path / "poster.pdf", product="flange")
    rep = query_manual(services, "flange bolt torque", product="flange", k=1, previews=True)
    assert rep.passages[0].source == "poster.pdf" and rep.passages[0].preview is None  # refused, not rendered
    from stores.manual_store import PreviewTooLargeError

    with pytest.raises(PreviewTooLargeError, match="pixel preview limit"):
        services.manuals.render_page("poster.pdf", 1)


def test_shipped_manuals_and_products_are_not_replaced_without_confirmation(services, tmp_path):
    """Uploads live beside the shipped manuals and products: same names are refused unless confirmed."""
    from services.manuals import delete_manual, shipped_manuals
    from services.products import fit_product

    data = services.settings.data_dir
    data.mkdir(parents=True)
    (data / "manifest.json").write_text(json.dumps({"manuals": [{"product": "brick", "lang": "en",
                                                                  "path": "manuals/brick_manual_en.pdf"}]}))
    assert shipped_manuals(services) == {"brick_manual_en.pdf"}
    pdf = _pdf(tmp_path / "upload.pdf", VALVE_PAGES)
    with pytest.raises(InputError, match="shipped manual"):
        ingest_manual(services, pdf, product="brick", name="brick_manual_en.pdf")
    assert services.manuals.list_documents() == []
    r = ingest_manual(services, pdf, product="brick", name="brick_manual_en.pdf", replace_shipped=True)
    assert r["source"] == "brick_manual_en.pdf"
    with pytest.raises(InputError, match="shipped manual"):
        delete_manual(services, "brick_manual_en.pdf")
    assert delete_manual(services, "brick_manual_en.pdf", replace_shipped=True)["removed_chunks"] == r["chunks"]
    with pytest.raises(InputError, match="shipped product"):
        fit_product(services, "Brick", [str(pdf)])
