"""HyDE for manual retrieval: the agent's model writes a passage that would answer a question.

Gao et al. 2022, "Precise Zero-Shot Dense Retrieval without Relevance Labels": a language model writes a
hypothetical answer, and the retriever ranks by it, so the query speaks the manual's words ("set logscale"
for "make the y axis logarithmic"). The passage may be wrong; it is only a query, never shown as a claim.
Chosen on the 59 read questions of ``bench/manual_eval`` (docs/benchmarks.md "A passage written by the
offline LLM as a second query"); the prompt below is the one measured there.
"""

from __future__ import annotations

import time

from smolagents import Model

from agent.models import get_agent_model
from core.settings import Settings, get_settings

#: the prompt measured by ``bench/manual_variants.py --hyde`` (product-filtered scope)
HYDE_PROMPT = ("Write a short passage, as it would appear in {what}, that answers the question below. "
               "Use the manual's own terms, commands and option names. At most 60 words, no preamble.\n\n"
               "Question: {question}")
#: tokens the passage may take (about 60 words)
MAX_TOKENS = 96


def hyde_prompt(question: str, product: str | None) -> str:
    """The user message that asks for a passage: names ``the {product} manual`` when a product is known."""
    what = f"the {product} manual" if product else "a software manual"
    return HYDE_PROMPT.format(what=what, question=question.strip())


class PassageWriter:
    """``(question, product) -> passage`` with the agent's model (:func:`agent.models.get_agent_model`).

    The model is loaded on the first call (the process's agent model is shared, so the chat and the
    writer load it once); generation is greedy (the offline GGUF's default), at most :data:`MAX_TOKENS`
    tokens, and stops at ``timeout_s`` where the backend supports a deadline.

    Args:
        settings: selects the agent backend and model (default: the process's settings).
        model: a smolagents ``Model`` to use instead (tests, or a model already loaded).
        timeout_s: seconds the passage may take.

    Raises (from ``__call__``): whatever the backend raises (``agent.models.GenerationTimeout`` past the
    deadline, the model-assembly errors of a missing GGUF); :func:`services.manuals.query_manual` catches
    them and ranks without a passage.
    """

    def __init__(self, settings: Settings | None = None, model: Model | None = None, timeout_s: float = 30.0):
        self.settings = settings
        self._model = model
        self._name = getattr(model, "model_id", None) if model is not None else None
        self.timeout_s = float(timeout_s)

    @property
    def name(self) -> str:
        """The writing model's display name (``llamacpp:<gguf>`` for the offline default); "" before loading."""
        return str(self._name or "")

    def model(self) -> Model:
        """The model, loaded on first use."""
        if self._model is None:
            self._model, self._name = get_agent_model(self.settings or get_settings())
        return self._model

    def __call__(self, question: str, product: str | None = None) -> str:
        """The passage (plain text, stripped); ``""`` for an empty question."""
        if not question or not question.strip():
            return ""
        model = self.model()
        kwargs = {"max_tokens": MAX_TOKENS}
        if getattr(model, "supports_deadline", False):
            kwargs["deadline"] = time.monotonic() + self.timeout_s
        msg = model.generate([{"role": "user", "content": hyde_prompt(question, product)}], **kwargs)
        return str(msg.content or "").strip()
