"""State shared by the tools of one chat turn: the conversation's photo, facts and manual passages.

The photo is implicit: tools take no image argument, they read ``RunContext.image`` (the photo
of the conversation, kept until a new one is attached; None when there is none). Each tool
records what it found here, so the agent's answer checks can verify citations, the UI can show
overlays and similar cases, and the next turn of the conversation starts from it
(:mod:`agent.memory` saves ``inspection``, ``search`` and ``passages`` with the session).
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.imageio import content_hash, load_rgb
from core.settings import get_settings

_HANGUL = re.compile(r"[\uac00-\ud7a3]")


def text_lang(text: str | None, default: str = "en") -> str:
    """``"ko"`` when ``text`` contains Hangul, ``"en"`` when it has other letters, else ``default``."""
    if text and _HANGUL.search(text):
        return "ko"
    if text and re.search(r"[A-Za-z]", text):
        return "en"
    return default


@dataclass
class RunContext:
    """State of one chat turn (and of a one-shot analysis).

    Attributes:
        image: the conversation's photo, RGB uint8 ``(H, W, 3)``, or None (no photo yet).
        image_path: where the photo came from (display only; may be None).
        product: product id given by the user, or set by the first tool that infers it.
        product_source: ``"user"``, ``"model"`` (the agent named it) or ``"inferred"``
            (from the nearest gallery images); None until known.
        product_confidence: vote share of the inferred product (0..1), else None.
        question: the user's message text, if any.
        lang: answer language: the question's (Hangul: ``"ko"``), else ``ui_lang``.
        out_dir: per-run folder for artifacts (anomaly map .npy, overlay, ...).
        inspection: the anomaly-scoring record of the current photo (this turn or earlier).
        search: the similar-defect search record of the current photo (hits, majority defect type).
        defect_type: defect type of the current photo from similar cases (taxonomy id) or None.
        manual_hits: passages manual retrieval returned in this turn (labelled, see ``passages``).
        passages: every passage retrieved in the conversation, ``{"label": "P<n>", "source", "page",
            "section", "text", "product", "defect", "lang", "score"}``; answers may cite these pages.
        tool_calls: names of tools called in this turn, in order.
        new_photo: a photo was attached with this message.
        writes: this session may write (register a photo with a corrected label).
        topic: ``{"product", "defect_type"}`` of the last manual retrieval (for follow-ups such as
            "and for grass?").
        registered: gallery rows registered in this turn.
    """

    image: np.ndarray | None = None
    image_path: str | None = None
    product: str | None = None
    product_source: str | None = None
    product_confidence: float | None = None
    question: str | None = None
    lang: str = "en"
    ui_lang: str = "en"
    out_dir: Path | None = None
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8])
    inspection: dict | None = None
    search: dict | None = None
    defect_type: str | None = None
    manual_hits: list[dict] = field(default_factory=list)
    passages: list[dict] = field(default_factory=list)
    tool_calls: list[str] = field(default_factory=list)
    image_sha256: str = ""
    anomaly_map: np.ndarray | None = field(default=None, repr=False)  # float32 (H, W) from anomaly scoring
    new_photo: bool = False
    writes: bool = False
    topic: dict = field(default_factory=dict)
    registered: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.out_dir is None:
            self.out_dir = get_settings().runs_dir / self.run_id
        self.out_dir = Path(self.out_dir)
        if self.image is not None and not self.image_sha256:
            self.image_sha256 = content_hash(self.image)
        self.lang = text_lang(self.question, "ko" if "ko" in (self.lang, self.ui_lang) else "en")
        if self.product and not self.product_source:
            self.product_source = "user"

    @classmethod
    def from_path(cls, path: str | Path, product: str | None = None, question: str | None = None) -> "RunContext":
        """Load the photo with :func:`core.imageio.load_rgb` (raises InvalidImageError)."""
        return cls(image=load_rgb(path), image_path=str(path), product=product, question=question,
                   new_photo=True)

    @property
    def reported_defect_type(self) -> str | None:
        """The defect type the turn reports: the similar-defect vote (``defect_type``), or None when anomaly
        scoring called the photo NORMAL (the nearest past defects of a normal part name no defect of it; the
        ``search`` hits keep their own types)."""
        if self.inspection and self.inspection.get("is_anomalous") is False:
            return None
        return self.defect_type

    @property
    def has_photo(self) -> bool:
        """A photo is in the conversation (image tools can run)."""
        return self.image is not None

    def cited_pages(self) -> set[tuple[str, int]]:
        """(source, page) pairs an answer may cite: every page retrieved in this conversation."""
        return {(h["source"], int(h["page"])) for h in self.passages} | {
            (h["source"], int(h["page"])) for h in self.manual_hits}

    def add_passages(self, hits: list[dict]) -> list[dict]:
        """Label new passages ``P<n>`` (a passage retrieved before keeps its label); records them in
        ``passages`` and this turn's ``manual_hits``; returns the labelled passages in order."""
        out = []
        for h in hits:
            key = (h["source"], int(h["page"]), h.get("section"), str(h.get("text", ""))[:80])
            old = next((p for p in self.passages if (p["source"], int(p["page"]), p.get("section"),
                                                     str(p.get("text", ""))[:80]) == key), None)
            if old is None:
                old = {**h, "label": f"P{len(self.passages) + 1}"}
                self.passages.append(old)
            if all(m["label"] != old["label"] for m in self.manual_hits):
                self.manual_hits.append(old)
            out.append(old)
        return out

    def passage(self, label: str) -> dict | None:
        """The passage with this label (``"P3"``), or None."""
        return next((p for p in self.passages if p.get("label") == label), None)

    def set_product(self, product: str, source: str) -> None:
        if not self.product:
            self.product, self.product_source = product, source

    def summary(self) -> dict[str, Any]:
        """JSON-friendly digest of what the tools found."""
        return {
            "product": self.product,
            "product_source": self.product_source,
            "defect_type": self.defect_type,
            "inspection": self.inspection,
            "search": self.search,
            "manual_hits": self.manual_hits,
        }
