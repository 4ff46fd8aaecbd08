"""Fallback manual writing: claims come from passage bullets, never from chunk headings."""

from agent.fallback import _items


def test_chunk_heading_is_not_a_claim():
    text = ("3. Scratch (스크래치) — Prevention\n•  Use timber bearers on every stacking frame.\n"
            " •   Clean the vacuum lifter pads at the start of every shift.")
    assert _items(text) == ["Use timber bearers on every stacking frame.",
                            "Clean the vacuum lifter pads at the start of every shift."]


def test_korean_heading_skipped_and_limit_applied():
    text = "4. 균열 (Crack) — 예방\n• 가마 냉각 곡선을 확인한다.\n• 패널을 양생대에 둔다.\n• 수량을 관리한다.\n• 서리를 막는다."
    items = _items(text, limit=3)
    assert items == ["가마 냉각 곡선을 확인한다.", "패널을 양생대에 둔다.", "수량을 관리한다."]
