"""Conversation memory: a chat session loaded from the session store, turned into the model's context.

:class:`Conversation` wraps one session of :class:`stores.sessions.SessionStore`:

* :meth:`Conversation.start_turn` builds the turn's :class:`tools.context.RunContext` from the
  message and the session: a new photo replaces the old one (its copy is kept with the session),
  otherwise the session's photo, its facts (anomaly scoring, similar-defect search) and every
  manual passage retrieved so far are loaded, so a follow-up needs no tool for what is known;
* :meth:`Conversation.history_messages` renders earlier turns for the model, exactly as the
  model saw them (its tool-call lists, the short observations, its answers), so llama.cpp reuses
  the KV cache of the previous turn; when the history passes :data:`HISTORY_BUDGET` (estimated
  tokens) the oldest turns are folded into one code-written summary line each;
* :meth:`Conversation.commit` stores the turn and the new session state; :meth:`undo` drops the
  last turn (retry and undo in the chat) and restores the state before it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from agent.answers import to_labels
from agent.types import AgentResult
from core.catalog import parse_product
from core.errors import InputError
from core.imageio import load_rgb
from core.uploads import check_photo_file
from services.container import Services
from stores.sessions import ANY
from tools.context import RunContext

#: estimated tokens of earlier turns kept verbatim in the model's context (older ones are summarised)
HISTORY_BUDGET = 1800


def estimate_tokens(text: str) -> int:
    """A cheap token estimate: ASCII characters / 4 + other characters (Hangul ~1 token per 1.3 chars)."""
    ascii_n = sum(1 for c in text if ord(c) < 128)
    return ascii_n // 4 + int((len(text) - ascii_n) / 1.3) + 1


def _one_line(text: str, n: int) -> str:
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= n else flat[: n - 1].rsplit(" ", 1)[0] + " …"


def turn_summary(i: int, turn: dict) -> str:
    """One code-written line about an earlier turn (for folded history)."""
    tools = [s.get("tool") for s in turn.get("steps") or [] if s.get("tool")]
    photo = f"[photo {turn.get('image_name') or ''}] ".replace(" ]", "]") if turn.get("image_sha256") else ""
    answer = turn.get("answer") or ""
    return (f"- turn {i + 1}: user: {photo}{_one_line(turn.get('question') or '(no question)', 90)}"
            f" | tools: {', '.join(tools) or 'none'} | answer: {_one_line(answer, 160)}")


class Conversation:
    """One chat session: its turns, its photo and facts, and how the model sees it.

    Args:
        services: the process's services (``services.sessions`` stores the conversation).
        session: the session row (:meth:`stores.sessions.SessionStore.get`).
        turns: its turns (:meth:`stores.sessions.SessionStore.turns`).

    Create with :meth:`open`.
    """

    def __init__(self, services: Services, session: dict, turns: list[dict]):
        self.services = services
        self.session = session
        self.turns = turns

    # ------------------------------------------------------------------ loading
    @classmethod
    def open(cls, services: Services, session_id: str | None = None, owner: str | None = None, *,
             create: bool = True, lang: str = "en") -> "Conversation":
        """The conversation ``session_id`` of ``owner`` (created when missing and ``create``).

        Without ``session_id``: the owner's latest conversation, or a new one.

        Raises:
            InputError: the session belongs to another owner, or is missing and ``create`` is False.
        """
        store = services.sessions
        session = None
        if session_id:
            session = store.get(session_id)
            if session is not None and owner is not None and session.get("owner") not in (owner, None):
                raise InputError(f"session {session_id!r} belongs to another user")
        elif owner is not None:
            session = store.latest(owner)
        if session is None:
            if not create:
                raise InputError(f"no session {session_id!r}")
            try:
                session = store.create(owner, session_id=session_id, lang=lang)
            except ValueError as exc:
                raise InputError(str(exc)) from None
        return cls(services, session, store.turns(session["id"]))

    @classmethod
    def new(cls, services: Services, owner: str | None, lang: str = "en") -> "Conversation":
        """A fresh, empty conversation of ``owner``."""
        session = services.sessions.create(owner, lang=lang)
        return cls(services, session, [])

    def reload(self) -> "Conversation":
        """Read the session and its turns again (another process may have added turns)."""
        store = self.services.sessions
        self.session = store.get(self.id) or self.session
        self.turns = store.turns(self.id)
        return self

    @property
    def id(self) -> str:
        """The session id."""
        return self.session["id"]

    @property
    def has_photo(self) -> bool:
        """The conversation has a photo (kept until a new one is attached)."""
        path = self.session.get("photo_path")
        return bool(path) and Path(path).is_file()

    # ------------------------------------------------------------------ turns
    def start_turn(self, question: str | None = None, image=None, *, image_name: str | None = None,
                   product: str | None = None, ui_lang: str = "en", writes: bool = False,
                   max_bytes: float | None = None) -> RunContext:
        """The turn's context: the message, the photo (new or the conversation's) and what is known.

        Args:
            question: the message text ("" / None for a photo alone).
            image: a newly attached photo (path, bytes, PIL image or array), or None.
            image_name: its display name (default: the file name).
            product: product id, or None / ``auto`` to infer it.
            ui_lang: the UI language (the answer's language when the message has no words).
            writes: the session may write (register corrections).
            max_bytes: refuse image files larger than this (the app's upload limit).

        Raises:
            InputError: neither a photo nor a question (and no photo in the conversation to talk about),
                or an unknown product. InvalidImageError: missing, oversized, non-image or truncated file.
        """
        q = (question or "").strip() or None
        prod = parse_product(product)
        if image is None or (isinstance(image, str) and not image):
            image = None
        if image is None and q is None:
            raise InputError("send a photo of the part or a question")
        s = self.session
        facts = dict(s.get("facts") or {})
        if image is not None:
            if isinstance(image, (str, Path)):
                image_name = image_name or check_photo_file(image, max_bytes).name
            rgb = load_rgb(image, max_pixels=self.services.settings.max_image_pixels)
            facts = {"topic": facts.get("topic") or {}}
            source, conf, known_product = ("user" if prod else None), None, prod
            new_photo = True
        elif self.has_photo:
            rgb = load_rgb(s["photo_path"])
            image_name = s.get("photo_name")
            known_product, source, conf = s.get("product"), s.get("product_source"), s.get("product_confidence")
            if prod and prod != known_product:  # the user names another product: the photo's facts are void
                facts = {"topic": facts.get("topic") or {}}
                known_product, source, conf = prod, "user", None
            new_photo = False
        else:
            rgb, known_product, source, conf, new_photo = None, prod, ("user" if prod else None), None, False
        ctx = RunContext(image=rgb, image_path=image_name, product=known_product, product_source=source,
                         product_confidence=conf, question=q, ui_lang=ui_lang, new_photo=new_photo, writes=writes,
                         inspection=facts.get("inspection"), search=facts.get("search"),
                         defect_type=facts.get("defect_type"), passages=list(s.get("passages") or []),
                         topic=dict(facts.get("topic") or {}),
                         out_dir=self.services.runs.new_run("chat"))  # pruned with the app's other runs
        amap = (ctx.inspection or {}).get("anomaly_map")
        if amap and Path(amap).is_file():
            try:
                ctx.anomaly_map = np.load(amap)
            except (OSError, ValueError):
                ctx.anomaly_map = None
        return ctx

    def history_messages(self, budget: int = HISTORY_BUDGET) -> list[dict]:
        """Earlier turns as chat messages ``{"role", "content"}`` for the model (oldest first).

        The newest turns that fit ``budget`` estimated tokens are rendered as the model saw them;
        older ones are folded into one user message of summary lines (followed by a short
        assistant acknowledgement, so roles alternate).
        """
        rendered = [list(t.get("messages") or []) for t in self.turns]
        keep, used = len(rendered), 0
        for i in range(len(rendered) - 1, -1, -1):
            cost = sum(estimate_tokens(m.get("content") or "") for m in rendered[i])
            if used + cost > budget and i < len(rendered) - 1:
                break
            used += cost
            keep = i
        out: list[dict] = []
        if keep > 0:
            lines = [turn_summary(i, self.turns[i]) for i in range(keep)]
            out.append({"role": "user", "content": "Earlier in this conversation (summary):\n" + "\n".join(lines)})
            out.append({"role": "assistant", "content": "Noted."})
        for msgs in rendered[keep:]:
            out.extend({"role": m["role"], "content": m.get("content") or ""} for m in msgs)
        return out

    def commit(self, ctx: RunContext, result: AgentResult, turn_text: str, *, run_id: str | None = None) -> int:
        """Store the turn (question, the model's view of it, steps, answer, citations) and the new state.

        Returns:
            the turn's index in the conversation.
        """
        messages = [{"role": "user", "content": turn_text}]
        if result.messages:
            messages += [dict(m) for m in result.messages]
        else:  # the fallback answered: the model reads that answer (labels, no note) next time
            messages.append({"role": "assistant", "content": to_labels(result.answer, ctx)[:1500]})
        state: dict[str, Any] = {
            "lang": ctx.ui_lang, "passages": ctx.passages,
            "facts": {"inspection": ctx.inspection, "search": ctx.search, "defect_type": ctx.defect_type,
                      "topic": ctx.topic},
            "product": ctx.product, "product_source": ctx.product_source,
            "product_confidence": ctx.product_confidence,
        }
        if ctx.new_photo and ctx.image is not None:
            path, sha = self.services.sessions.save_photo(self.id, ctx.image)
            state.update(photo_path=str(path), photo_sha256=sha, photo_name=Path(ctx.image_path).name
                         if ctx.image_path else path.name)
        turn = {
            "question": ctx.question, "lang": ctx.lang,
            "image_sha256": ctx.image_sha256 if ctx.new_photo else None,
            "image_name": (Path(ctx.image_path).name if ctx.image_path else None) if ctx.new_photo else None,
            "kind": result.kind, "messages": messages, "steps": [s.to_json() for s in result.steps],
            "answer": result.answer, "citations": list(result.citations or []), "product": result.product,
            "defect_type": result.defect_type, "model": result.model, "fallback": result.fallback,
            "fallback_reason": result.fallback_reason, "elapsed_s": round(float(result.elapsed_s), 3),
            "run_id": run_id,
        }
        idx = self.services.sessions.add_turn(self.id, turn, state)
        self.reload()
        return idx

    def undo(self) -> dict | None:
        """Drop the last turn (and restore the photo and facts it replaced); returns it, None if none."""
        last = self.services.sessions.pop_turn(self.id)
        self.reload()
        return last

    def photo_path(self) -> str | None:
        """Path of the conversation's photo copy, or None."""
        return self.session.get("photo_path") if self.has_photo else None


def owner_sessions(services: Services, owner=ANY, limit: int = 20) -> list[dict]:
    """The owner's conversations, newest first (``{"id", "title", "updated_at", "n_turns"}``)."""
    return services.sessions.list(owner, limit=limit)
