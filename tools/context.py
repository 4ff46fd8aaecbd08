"""Per-run state shared by the tools of one agent run (one uploaded photo).

The photo is implicit: tools take no image argument, they read ``RunContext.image``.
Each tool records what it returned here, so the agent's answer checks can verify
citations and the UI can show overlays and similar cases.
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


@dataclass
class RunContext:
    """State of one analysis.

    Attributes:
        image: the photo, RGB uint8 ``(H, W, 3)``.
        image_path: where the photo came from (display only; may be None).
        product: product id given by the user, or set by the first tool that infers it.
        product_source: ``"user"``, ``"model"`` (the agent named it) or ``"inferred"``
            (from the nearest gallery images); None until known.
        product_confidence: vote share of the inferred product (0..1), else None.
        question: the user's question, if any.
        lang: ``"ko"`` when the question is Korean, else ``"en"``.
        out_dir: per-run folder for artifacts (anomaly map .npy, overlay, ...).
        inspection: the anomaly-scoring record (score, threshold, regions, artifact paths).
        search: the similar-defect search record (hits, majority defect type).
        defect_type: defect type inferred from similar cases (taxonomy id) or None.
        manual_hits: every passage returned by manual retrieval in this run
            (``{"source","page","section","text","product","defect","score"}``).
        tool_calls: names of tools called, in order.
    """

    image: np.ndarray
    image_path: str | None = None
    product: str | None = None
    product_source: str | None = None
    product_confidence: float | None = None
    question: str | None = None
    lang: str = "en"
    out_dir: Path | None = None
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8])
    inspection: dict | None = None
    search: dict | None = None
    defect_type: str | None = None
    manual_hits: list[dict] = field(default_factory=list)
    tool_calls: list[str] = field(default_factory=list)
    image_sha256: str = ""
    anomaly_map: np.ndarray | None = field(default=None, repr=False)  # float32 (H, W) from anomaly scoring

    def __post_init__(self) -> None:
        if self.out_dir is None:
            self.out_dir = get_settings().runs_dir / self.run_id
        self.out_dir = Path(self.out_dir)
        if not self.image_sha256:
            self.image_sha256 = content_hash(self.image)
        if self.question and _HANGUL.search(self.question):
            self.lang = "ko"
        if self.product and not self.product_source:
            self.product_source = "user"

    @classmethod
    def from_path(cls, path: str | Path, product: str | None = None, question: str | None = None) -> "RunContext":
        """Load the photo with :func:`core.imageio.load_rgb` (raises InvalidImageError)."""
        return cls(image=load_rgb(path), image_path=str(path), product=product, question=question)

    def cited_pages(self) -> set[tuple[str, int]]:
        """(source, page) pairs returned by manual retrieval in this run."""
        return {(h["source"], int(h["page"])) for h in self.manual_hits}

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
