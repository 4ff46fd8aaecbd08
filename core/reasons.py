"""Why an answer came from the deterministic fallback, in the user's language.

The agent records the reason it fell back as an English diagnostic (``agent/agents.py``: the
model could not be loaded, a timeout, a cut output, an answer that failed the checks twice,
...). A Korean conversation gets a Korean sentence for each of these, with the English
diagnostic kept after it as the details an operator needs. Importing this module has no
side effects.
"""

from __future__ import annotations

#: (prefix of the English reason, Korean sentence); the first matching prefix wins
REASONS_KO: tuple[tuple[str, str], ...] = (
    ("the model could not be loaded", "언어 모델을 불러오지 못했습니다"),
    ("timeout", "언어 모델이 제한 시간 안에 답변을 끝내지 못했습니다"),
    ("the model reached the maximum", "언어 모델이 최대 단계 수 안에 올바른 답변을 내지 못했습니다"),
    ("the model's output was cut", "언어 모델의 출력이 중간에 잘렸습니다"),
    ("the model's answer failed the checks", "언어 모델의 답변이 다시 시도한 뒤에도 검사를 통과하지 못했습니다"),
    ("the model gave no final answer", "언어 모델이 최종 답변을 내지 않았습니다"),
    ("the model failed", "언어 모델 실행이 실패했습니다"),
    ("the model run failed", "언어 모델 실행이 실패했습니다"),
)
#: Korean sentence for a reason no prefix matches
REASON_KO_OTHER = "언어 모델의 답변을 사용할 수 없었습니다"


def localize_reason(reason: str | None, lang: str, limit: int = 200) -> str:
    """The fallback ``reason`` for a reader of ``lang``.

    Args:
        reason: the agent's English diagnostic (None or "" gives "").
        lang: ``"ko"`` gives ``"<Korean sentence> (세부 정보: <reason>)"``; any other value the
            reason itself.
        limit: the diagnostic is cut to this many characters.

    Returns:
        one line of text.
    """
    reason = (reason or "").strip()[:limit]
    if not reason or lang != "ko":
        return reason
    low = reason.lower()
    ko = next((k for prefix, k in REASONS_KO if low.startswith(prefix)), REASON_KO_OTHER)
    return f"{ko} (세부 정보: {reason})"
