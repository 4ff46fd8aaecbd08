"""check_answer: good and bad response manuals against a run's retrieved pages."""

from __future__ import annotations

import numpy as np
import pytest

from agent.checks import SECTIONS, check_answer, find_citations, repeated_items, split_sections
from tools.context import RunContext

GOOD = """## Defect summary
Product: brick. Defect type: crack. Verdict: ANOMALOUS, score 3.21 vs threshold 2.10.
## Location and extent
Region 1: bounding box [40, 60, 120, 90] px, 2.3% of the image.
## Likely causes
- Thermal shock during firing [brick_manual_en.pdf p.5]
- Uneven drying [brick_manual_en.pdf p.5 cause]
## Immediate actions
1. Quarantine the batch [brick_manual_en.pdf p.6]
## Prevention
- Control the kiln ramp rate [brick_manual_en.pdf p.7]
## Sources
- brick_manual_en.pdf p.5
- brick_manual_en.pdf p.6
"""


@pytest.fixture()
def ctx():
    c = RunContext(image=np.zeros((8, 8, 3), np.uint8), product="brick")
    c.defect_type = "crack"
    c.manual_hits = [
        {"source": "brick_manual_en.pdf", "page": p, "section": s, "text": "..."}
        for p, s in ((5, "cause"), (6, "action"), (7, "prevention"))
    ]
    return c


def test_good_answer_passes(ctx):
    assert check_answer(GOOD, ctx) == []


def test_find_citations_formats():
    text = "see [a_manual.pdf p.3], [a_manual.pdf p.3 cause], b.pdf page 12 and (c.pdf, p. 4)"
    assert find_citations(text) == [("a_manual.pdf", 3), ("b.pdf", 12), ("c.pdf", 4)]


def test_split_sections_titles():
    assert list(split_sections(GOOD)) == list(SECTIONS)


def test_missing_section(ctx):
    bad = GOOD.replace("## Prevention\n- Control the kiln ramp rate [brick_manual_en.pdf p.7]\n", "")
    problems = check_answer(bad, ctx)
    assert any("missing sections" in p and "Prevention" in p for p in problems)


def test_wrong_order(ctx):
    parts = GOOD.split("## Sources")
    bad = "## Sources" + parts[1] + parts[0]
    assert any("in this order" in p for p in check_answer(bad, ctx))


def test_citation_not_retrieved_in_this_run(ctx):
    bad = GOOD.replace("[brick_manual_en.pdf p.6]", "[brick_manual_en.pdf p.9]")
    problems = check_answer(bad, ctx)
    assert any("did not return" in p and "p.9" in p for p in problems)


def test_uncited_cause_item(ctx):
    bad = GOOD.replace("- Uneven drying [brick_manual_en.pdf p.5 cause]", "- Uneven drying")
    assert any("Likely causes" in p and "every item" in p for p in check_answer(bad, ctx))


def test_a_repeated_item_is_a_problem(ctx):
    again = GOOD.replace("- Control the kiln ramp rate [brick_manual_en.pdf p.7]",
                         "- Control the kiln ramp rate [brick_manual_en.pdf p.7]\n- control the kiln ramp-rate. [P3]")
    problems = check_answer(again, ctx)
    assert any("repeated" in p and "kiln ramp" in p for p in problems), problems
    across = GOOD.replace("1. Quarantine the batch [brick_manual_en.pdf p.6]",
                          "1. Quarantine the batch [brick_manual_en.pdf p.6]\n2. Thermal shock during firing "
                          "[brick_manual_en.pdf p.6]")
    assert repeated_items(split_sections(across)["Likely causes"] + split_sections(across)["Immediate actions"]) == [
        "2. Thermal shock during firing [brick_manual_en.pdf p.6]"]
    assert repeated_items(split_sections(GOOD)["Likely causes"]) == []  # different items pass


def test_actions_without_any_citation(ctx):
    bad = GOOD.replace("1. Quarantine the batch [brick_manual_en.pdf p.6]", "Quarantine the batch.")
    assert any("Immediate actions" in p and "no citation" in p for p in check_answer(bad, ctx))


def test_sources_must_list_cited_pages(ctx):
    bad = GOOD.replace("- brick_manual_en.pdf p.6\n", "")
    assert any("Sources" in p and "p.6" in p for p in check_answer(bad, ctx))


def test_product_and_defect_must_be_named(ctx):
    # the citations still contain "brick": only the summary counts
    bad = GOOD.replace("Product: brick. Defect type: crack.", "Product: ?. Defect type: ?.")
    problems = check_answer(bad, ctx)
    assert any("product 'brick'" in p for p in problems)
    assert any("defect type 'crack'" in p for p in problems)


def test_korean_defect_name_accepted(ctx):
    ok = GOOD.replace("Defect type: crack.", "Defect type: 균열.")
    assert check_answer(ok, ctx) == []


def test_empty_or_non_text(ctx):
    assert check_answer("", ctx)
    assert check_answer(None, ctx)
    assert check_answer({"answer": GOOD}, ctx)


def test_no_retrieval_means_no_citable_page(ctx):
    ctx.manual_hits = []
    problems = check_answer(GOOD, ctx)
    assert any("did not return" in p and "none" in p for p in problems)


def test_korean_headings_keep_the_english_title(ctx):
    ko = GOOD.replace("## Likely causes", "## Likely causes (추정 원인)").replace("## Sources", "## Sources (출처)")
    assert check_answer(ko, ctx) == []


def test_pages_of_earlier_turns_are_citable(ctx):
    """Citations are checked against every page retrieved in the conversation, not only in this turn."""
    ctx.passages = [dict(h, label=f"P{i + 1}") for i, h in enumerate(ctx.manual_hits)]
    ctx.manual_hits = []
    assert check_answer(GOOD, ctx) == []


def test_complete_sources_adds_missing_pages(ctx):
    from agent.checks import complete_sources

    partial = GOOD.replace("- brick_manual_en.pdf p.6\n", "")
    fixed = complete_sources(partial)
    assert check_answer(fixed, ctx) == []
    assert fixed.startswith(partial.rstrip("\n"))
    once = complete_sources(GOOD)
    assert once.endswith("- brick_manual_en.pdf p.7\n") and complete_sources(once) == once
    no_sources = GOOD.split("## Sources")[0]
    assert check_answer(complete_sources(no_sources), ctx) == []
