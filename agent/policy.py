"""Tool policy of the chat agent: what the model is offered at each step, and the guards around it.

The model decides which tools to call, in which order, and when to answer. This module only
keeps a small model safe:

* **offered tools** (:func:`offered_tools`): image tools only when the conversation has a photo;
  the writing tool only where the session may write and the user asked to register; a tool that
  already ran on this photo in this turn is not offered again, manual retrieval at most twice
  per turn; arguments narrowed to what cannot be guessed wrong (product and defect-type enums,
  a one-line query, the configured ``k``);
* **nothing more for a normal part**: once the photo sent with this message scored NORMAL outside
  the uncertain band, manual retrieval is offered only if the message asks about the manual
  (:func:`asks_manual`: it names a defect type, a manual section or the manual itself) and
  similar-defect search only if it asks for similar cases: a good part needs no response manual, the
  nearest past defects of a good part name no defect of it (the 1.5B model then wrote about them as
  if they were found), and each such step costs the small model 15-20 s;
* **one rule before the first step**: a newly attached photo is looked at before it is answered
  (the first reply must be a call of the tools that use the photo: scoring, similar-defect
  search, or a registration the user asked for);
* **the answer's shape** (:func:`answer_form`, :func:`answer_gbnf`): once the turn has scored an
  anomalous photo (or the message asks what to do about a photo scored earlier), found its defect
  type and retrieved its manual, the answer is the response
  manual and the model writes only its causes, actions and prevention, each item ending with a
  label ``[P<n>]`` of a passage of that section; after a manual retrieval otherwise, one to three
  items, each ending with a label; any other answer is free text without headings (no ``#``: a
  short answer cannot pose as a manual) whose only brackets are such labels; a Korean message gets
  an answer that starts in Hangul;
* **evidence first**: when the answer checks found that the message needs a tool result the
  turn does not have (:func:`agent.checks.required_tools`), the next reply must be a call of
  those tools and only those (a manual retrieval narrowed to the turn's product and defect type);
* **the message kind** (:func:`classify`), a keyword reading of the message (English and
  Korean) used by the answer checks (which evidence an answer to this kind of message needs) and
  by the deterministic fallback (which answer to write when the model fails). It never chooses
  the model's tools.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core import catalog
from tools import IMAGE_TOOLS, WRITE_TOOLS
from tools.anomaly_scoring import clearly_normal
from tools.manual_retrieval import named_defects, named_products

KINDS = ("manual", "verdict", "similar", "manual_question", "followup", "capabilities", "offtopic", "register")
#: tool rounds per turn before the model must answer
MAX_TOOL_ROUNDS = 2
#: manual retrieval calls per turn
MAX_MANUAL_CALLS = 2

#: a follow-up about one part of the answer ("What should I do first?") rather than the whole manual
_DETAIL = ("why", "which", "first", "more", "explain", "왜", "어떤", "어느", "먼저", "자세히", "설명")

_WORDS = {
    "register": ("register", "add it to the gallery", "add this to the gallery", "save it as", "label it",
                 "relabel", "correct label", "wrong label", "등록", "라벨"),
    "capabilities": ("what can you do", "what do you do", "what can this", "who are you", "how does this work",
                     "how do i use", "what is this system", "help me use", "capabilit", "features", "무엇을 할 수",
                     "뭘 할 수", "무엇을 하", "뭐 하는", "뭘 하는", "할 수 있나", "할 수 있어", "기능", "사용법", "도움말"),
    "greeting": ("hi", "hello", "hey", "good morning", "안녕"),
    "similar": ("similar", "like this", "past case", "past defect", "previous case", "comparable", "other cases",
                "비슷한", "유사", "사례"),
    "verdict": (" ok", "okay", "fine", "good to ship", "good to go", "defective", "is it normal", "normal?",
                "pass", "reject", "acceptable", "any defect", "is it bad", "is there a defect", "broken",
                "괜찮", "정상", "불량", "문제가 있", "문제 있", "합격", "이상 있", "결함이 있"),
    "analyse": ("analy", "inspect", "check this", "look at", "what should i do", "what do i do", "what to do",
                "what should we do", "how should", "handle", "deal with", "response manual", "report",
                "분석", "검사", "조치", "처리", "어떻게 해", "대응"),
    # asks what to do about the part: after a verdict turn this is still a request for the response manual
    "act": ("what should i do", "what do i do", "what to do", "what should we do", "what can i do",
            "deal with", "handle it", "handle this", "handle that", "response manual",
            "어떻게 해야", "어떻게 하면", "어떻게 처리", "어떻게 조치", "조치해야", "대응해야"),
    "detail": _DETAIL,
    "followup": _DETAIL + ("and for", "what about", "that", "it?", "this?", "그럼", "그러면", "그건", "그것"),
    "domain": ("defect", "part", "manual", "cause", "prevent", "action", "inspection", "anomal", "quality",
               "결함", "부품", "매뉴얼", "원인", "예방", "조치", "검사", "품질", "제품"),
}


def _has(text: str, key: str) -> bool:
    low = f" {text.lower()} "
    for w in _WORDS[key]:
        if w.isascii() and w.strip().isalpha() and len(w.strip()) <= 5:
            if re.search(rf"(?<![a-z]){re.escape(w.strip())}(?![a-z])", low):
                return True
        elif w in low:
            return True
    return False


def classify(question: str | None, *, has_photo: bool, new_photo: bool, has_history: bool,
             writes: bool = False) -> str:
    """The kind of a message (one of :data:`KINDS`), from its words (English and Korean) and the conversation.

    Args:
        question: the message text ("" / None: a photo without words).
        has_photo: the conversation has a photo (attached now or earlier).
        new_photo: a photo was attached with this message.
        has_history: earlier turns exist.
        writes: the session may write (``register`` needs it).
    """
    q = (question or "").strip()
    if not q:
        return "manual" if new_photo else ("followup" if has_history else "capabilities")
    sections = bool(re.search(r"cause|why|reason|action|prevent|avoid|원인|왜|조치|예방|방지", q.lower()))
    names = bool(named_products(q) or named_defects(q))
    if writes and has_photo and _has(q, "register"):
        return "register"
    if _has(q, "capabilities"):
        return "capabilities"
    if has_photo and _has(q, "similar"):
        return "similar"
    if has_photo and _has(q, "verdict") and not _has(q, "analyse"):
        return "verdict"
    if new_photo:
        return "manual" if _has(q, "analyse") or sections or not _has(q, "followup") else "verdict"
    short = len(q.split()) <= 8
    if has_photo and _has(q, "act") and not _has(q, "detail") and not names:
        return "manual"
    if has_history and short and _has(q, "followup") and not names:
        return "followup"
    if has_photo and _has(q, "analyse") and not names:
        return "manual"
    if names or sections:
        return "manual_question"
    if has_history and (short or _has(q, "followup")) and _has(q, "followup"):
        return "followup"
    if _has(q, "greeting") and len(q.split()) <= 4:
        return "capabilities"
    if _has(q, "domain"):
        return "followup" if has_history else "manual_question"
    return "offtopic"


_MANUAL_WORDS = re.compile(r"cause|action|prevent|avoid|procedure|manual|repair|원인|조치|예방|방지|매뉴얼|절차|수리")


def asks_manual(question: str | None) -> bool:
    """Whether a message asks about the manuals: it names a defect type (:func:`named_defects`), a manual
    section (cause, action, prevention, in English or Korean) or the manual or a procedure itself."""
    q = (question or "").lower()
    return bool(named_defects(q)) or bool(_MANUAL_WORDS.search(q))


def scored_normal(ctx) -> bool:
    """Whether the photo sent with this message scored NORMAL outside the uncertain band (``ctx.inspection``).
    False in a later turn about that photo: the model chooses its tools there."""
    return bool(getattr(ctx, "new_photo", False)) and clearly_normal(getattr(ctx, "inspection", None))


@dataclass
class ToolView:
    """What the model sees of a tool at one step: name, description and a narrowed input schema."""

    name: str
    description: str
    inputs: dict
    output_type: str = "string"

    @classmethod
    def of(cls, tool, inputs: dict | None = None) -> "ToolView":
        """A view of a smolagents tool, optionally with other inputs."""
        return cls(tool.name, tool.description, dict(tool.inputs if inputs is None else inputs),
                   getattr(tool, "output_type", "string"))


def _products() -> list[str]:
    try:
        return list(catalog.products())
    except Exception:  # noqa: BLE001 - no enum then; the tool checks the value
        return []


def _defects() -> list[str]:
    try:
        return list(catalog.defect_types())
    except Exception:  # noqa: BLE001
        return []


def offered_tools(tools: list, ctx, rounds: int, only: list[str] | None = None) -> list[ToolView]:
    """The tools (as :class:`ToolView`) offered at a step of the turn; see the module docstring.

    Args:
        tools: the turn's smolagents tools.
        ctx: the turn's :class:`tools.context.RunContext`.
        rounds: tool-call rounds already done in this turn.
        only: tool names the answer checks found missing (:func:`agent.checks.required_tools`): only
            these are offered, also after :data:`MAX_TOOL_ROUNDS`, and a manual retrieval is narrowed
            to the product and defect type this turn found.
    """
    if rounds >= MAX_TOOL_ROUNDS and not only:
        return []
    called = list(ctx.tool_calls)
    # a newly attached photo is looked at first: its first step offers the tools that use it
    photo_first = bool(getattr(ctx, "new_photo", False)) and ctx.has_photo and rounds == 0 and not only
    asked_register = ctx.writes and bool(ctx.question) and _has(ctx.question, "register")
    named = named_products(ctx.question)
    offered = []
    for tool in tools:
        name = tool.name
        if name in ("final_answer",):
            continue
        if name in IMAGE_TOOLS and not ctx.has_photo:
            continue
        if name in WRITE_TOOLS and not asked_register:
            continue
        if name in IMAGE_TOOLS and name in called:
            continue
        if name == "manual_retrieval" and called.count(name) >= MAX_MANUAL_CALLS:
            continue
        if scored_normal(ctx) and not (only and name in only) and (
                (name == "manual_retrieval" and not asks_manual(ctx.question))
                or (name == "similar_defect_search" and not _has(ctx.question or "", "similar"))):
            continue  # a good part needs no response manual, and its nearest past defects are not its defects
        if (only and name not in only) or (photo_first and name not in IMAGE_TOOLS):
            continue
        narrow = bool(only) and name == "manual_retrieval"
        inputs = {}
        for key, spec in tool.inputs.items():
            spec = dict(spec)
            if key == "product":
                if name == "manual_retrieval":
                    if narrow and ctx.product:
                        spec["enum"] = [ctx.product]
                    elif _products():
                        spec["enum"] = _products()
                else:
                    # the text model cannot see the photo: a product it names is a guess unless the user named it
                    if ctx.product or not named:
                        continue
                    spec["enum"] = named
            elif key == "k":
                continue  # a vote needs the configured k (the model tends to ask for 1)
            elif key == "defect_type" and narrow and getattr(ctx, "defect_type", None):
                spec["enum"] = [ctx.defect_type]
            elif key == "defect_type" and _defects():
                spec["enum"] = _defects()
            elif key == "query":
                spec["pattern"] = r'^[^"\\\n]{2,80}$'
            inputs[key] = spec
        offered.append(ToolView.of(tool, inputs))
    return offered


def answer_form(ctx, kind: str | None = None) -> str:
    """The shape of the answer at this point of the turn.

    ``"manual"``: the photo scored ANOMALOUS, its defect type is known, this turn called manual
    retrieval and scoring or similar-defect search (or the message asks for the response manual,
    ``kind == "manual"``, about a photo scored in an earlier turn: "What should I do about it?" after
    "Is this part OK?"), and passages of that defect were retrieved: the response manual.
    ``"cited"``: this turn retrieved manual passages (otherwise, and the photo, if
    scored, is not a normal part): one to three items ``- <text> [P<n>]``, like the passage lines of
    the observation. ``"text"``: anything else (a normal part gets a short verdict, which may still cite
    labels, never defect items).
    """
    insp = ctx.inspection or {}
    called = set(ctx.tool_calls)
    retrieved = "manual_retrieval" in called and bool(ctx.manual_hits)
    if (ctx.has_photo and insp.get("is_anomalous") and ctx.defect_type and retrieved
            and (kind == "manual" or called & {"anomaly_scoring", "similar_defect_search"})
            and any(h.get("defect") == ctx.defect_type for h in ctx.manual_hits)):
        return "manual"
    if ctx.has_photo and insp and not insp.get("is_anomalous"):
        return "text"
    return "cited" if retrieved else "text"


def section_labels(ctx, section: str) -> list[str]:
    """Labels of this turn's passages of one manual section (``cause``, ``action``, ``prevention``) for the
    photo's defect type; all of this turn's labels when there are none."""
    key = "prevent" if section.startswith("prevent") else section
    labels = [h["label"] for h in ctx.manual_hits
              if key in str(h.get("section", "")).lower() and h.get("defect") in (ctx.defect_type, None)]
    return labels or [h["label"] for h in ctx.manual_hits]


def _alt(labels: list[str]) -> str:
    return "(" + " | ".join(f'"{lab}"' for lab in labels) + ")"


#: most characters of one item of a manual or cited answer
ITEM_CHARS = 160


def answer_gbnf(ctx, form: str, max_items: int = 2) -> str:
    """GBNF rules defining ``answer`` for this step (see the module docstring).

    ``manual``: ``## Likely causes`` / ``## Immediate actions`` / ``## Prevention``, 1..``max_items``
    items each, every item ``- <text> [P<n>]`` (at most :data:`ITEM_CHARS` characters) with a label
    of a passage of that section. ``cited``: one to three such items citing this turn's passages. ``text``: no ``#`` and no ``[`` except labels of passages retrieved in this
    conversation; it does not start with ``[``, ``{`` or white space (a call list starts with ``[``).
    A Korean turn (``ctx.lang == "ko"``) starts every answer and item with a Hangul syllable.
    """
    ko = getattr(ctx, "lang", "en") == "ko"
    first = "[가-힣]" if ko else '[^\\[\\]\\n#{}`"\\\\ \\t-]'
    body = f"[^\\[\\]\\n#{{}}`\\\\]{{4,{ITEM_CHARS}}}"
    rules = [f"item-text ::= {first} {body}"]
    if form == "manual":
        rules.insert(0, 'answer ::= "## Likely causes\\n" cause-item{1,%d} "## Immediate actions\\n" '
                        'action-item{1,%d} "## Prevention\\n" prevent-item{1,%d}' % (max_items, max_items, max_items))
        for sec, rule in (("cause", "cause"), ("action", "action"), ("prevention", "prevent")):
            rules.append(f'{rule}-item ::= "- " item-text " [" {_alt(section_labels(ctx, sec))} "]\\n"')
        return "\n".join(rules)
    turn = [h["label"] for h in ctx.manual_hits] or [p["label"] for p in ctx.passages]
    if form == "cited" and turn:
        rules.insert(0, "answer ::= cited-item{1,3}")
        rules.append(f'cited-item ::= "- " item-text " [" {_alt(turn)} "]\\n"')
        return "\n".join(rules)
    labels = [p["label"] for p in ctx.passages]
    char = f'[^\\[\\]{{}}#`] | "[" {_alt(labels)} "]"' if labels else "[^\\[\\]{}#`]"
    start = "[가-힣]" if ko else "[^\\[\\]{}#` \\t\\n-]"
    return "\n".join([f"answer ::= {start} answer-char*", f"answer-char ::= {char}"])
