"""Text that reaches a rendered page: markdown links, images and HTML removed.

Manual pages, questions and model answers are rendered as markdown in the chat, the
History tab and exported manuals. A hostile PDF or question could carry ``![](https://...)``
(an image fetched by every viewer's browser: tracking, or a request to an internal address)
or a link that looks like a citation. :func:`strip_markup` keeps the words and drops the rest.
"""

from __future__ import annotations

import re

_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]*)\]\(\s*[^)]*\)")
_REF_DEF = re.compile(r"^\s*\[[^\]]+\]:\s*\S+.*$", re.MULTILINE)
_AUTOLINK = re.compile(r"<(?:https?|ftp|file|data|javascript|mailto):[^>]*>", re.IGNORECASE)
_URL = re.compile(r"\b(?:https?|ftp|file|data|javascript):[^\s)\]>]+", re.IGNORECASE)
_HTML = re.compile(r"</?[A-Za-z][^>]*>")


def strip_markup(text: str | None) -> str:
    """``text`` without markdown images, links (their label is kept), reference definitions,
    autolinks, bare URLs (replaced by ``[link removed]``) and HTML tags.

    Args:
        text: any string (None gives "").

    Returns:
        the cleaned string (citations like ``[brick_manual_en.pdf p.3]`` are kept: they have no URL).
    """
    if not text:
        return ""
    out = _IMAGE.sub(lambda m: m.group(1), str(text))
    out = _LINK.sub(lambda m: m.group(1), out)
    out = _REF_DEF.sub("", out)
    out = _AUTOLINK.sub("[link removed]", out)
    out = _URL.sub("[link removed]", out)
    return _HTML.sub("", out)
