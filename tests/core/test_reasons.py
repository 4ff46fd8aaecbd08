"""The fallback's reason in the user's language (``core.reasons``), and where it is shown."""

from __future__ import annotations

import pytest

from core.reasons import REASON_KO_OTHER, localize_reason


@pytest.mark.parametrize("reason,korean", [
    ("the model's answer failed the checks after one retry: no citation", "검사를 통과하지 못했습니다"),
    ("timeout: the model did not finish within 180 s", "제한 시간"),
    ("the model could not be loaded (FileNotFoundError: x.gguf)", "불러오지 못했습니다"),
    ("the model's output was cut: length", "잘렸습니다"),
    ("the model failed 3 steps (last: bad json)", "실행이 실패했습니다"),
    ("something new", REASON_KO_OTHER),
])
def test_korean_reason_starts_in_korean_and_keeps_the_details(reason, korean):
    out = localize_reason(reason, "ko")
    assert korean in out.split(" (세부 정보: ")[0]
    assert "\uac00" <= out[0] <= "\ud7a3"
    assert out.endswith(f"(세부 정보: {reason})")


def test_english_reason_is_the_diagnostic_cut_to_the_limit():
    assert localize_reason("timeout: x", "en") == "timeout: x"
    assert localize_reason("a" * 500, "en", limit=200) == "a" * 200
    assert localize_reason(None, "ko") == "" and localize_reason("", "en") == ""

