"""The error a person can act on: bad input or a state that prevents an action.

Every use case (``services/``) raises :class:`InputError` (a ``ValueError``) or one of its
subclasses (:class:`core.catalog.UnknownProductError`, :class:`core.imageio.InvalidImageError`,
``core.uploads.UploadError``) with a message that says what is wrong; the edges turn it into
``{"error": ...}`` with exit code 2 (``cli.py``) or a ``gr.Error`` (the app). Any other
exception is a bug or an outage and is reported without its internals.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input or a state that prevents the action; the message is shown to the user."""
