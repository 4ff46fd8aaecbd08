"""What every handler of the app shares: error mapping, public JSON, servable files, start-up gate, roles.

* :func:`guarded`: :class:`core.errors.InputError` becomes a ``gr.Error`` with its message;
  any other exception is logged with an error id and the caller gets only that id (no
  internals reach an anonymous visitor).
* :func:`public_json`: results without absolute server paths (a path becomes its name
  relative to the state directory's run / image folder it lives in).
* :func:`servable`: a file the app returns as a Gradio file output. Gradio copies returned
  files into its own cache and serves only that cache, the uploads and ``allowed_paths``
  (which the app leaves empty), so the state directory itself is never reachable by URL.
* :data:`STARTUP`: the first start of an app builds its state in the background; handlers
  call :func:`require_ready` and answer "still starting (n %)" until it is done.
* :class:`Role`: ``operator`` (may write) or ``public`` (reads, own history only).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from core.errors import InputError
from core.settings import get_settings

log = logging.getLogger("dra.app")


# ---------------------------------------------------------------------------- roles
@dataclass(frozen=True)
class Role:
    """Who a Blocks app serves.

    Attributes:
        name: ``operator`` or ``public``.
        writes: events that change stores are registered (register, relabel, delete,
            ingest, fit, corrections) — only for operators.
        own_history: the History tab and endpoints show only the caller's runs.
    """

    name: str

    @property
    def writes(self) -> bool:
        return self.name == "operator"

    @property
    def own_history(self) -> bool:
        return self.name == "public"


OPERATOR = Role("operator")
PUBLIC = Role("public")


def owner_of(request: gr.Request | None, role: Role) -> str | None:
    """The history owner of a caller: the session of a public visitor, None (everyone's) for operators."""
    if not role.own_history:
        return None
    return f"session:{getattr(request, 'session_hash', None) or 'anonymous'}"


def not_an_mcp_tool(fn):
    """Keep an endpoint in the API (documented, defaults known to clients) but out of the MCP tool list.

    Gradio lists as MCP tools every documented endpoint whose function is not marked otherwise
    by its own ``gr.mcp`` decorators (``fn._mcp_type``: ``tool`` / ``resource`` / ``prompt``);
    ``"none"`` is none of them, so the endpoint is neither a tool, a resource nor a prompt.
    """
    fn._mcp_type = "none"
    return fn


# ---------------------------------------------------------------------------- start-up
@dataclass
class Startup:
    """Progress of the state build that the first start of an app runs before serving requests."""

    ready: bool = True
    fraction: float = 1.0
    message: str = ""
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def begin(self) -> None:
        with self._lock:
            self.ready, self.fraction, self.message, self.error = False, 0.0, "starting", None

    def update(self, fraction: float, message: str) -> None:
        with self._lock:
            self.fraction, self.message = max(0.0, min(1.0, float(fraction))), str(message)

    def finish(self, error: str | None = None) -> None:
        with self._lock:
            self.ready, self.fraction, self.error = error is None, 1.0, error
            self.message = "ready" if error is None else "failed"

    def notice(self) -> str:
        """A one-line markdown notice for the UI ("" when ready)."""
        if self.ready:
            return ""
        if self.error:
            return f"⚠️ **The app could not build its data:** {self.error}"
        return (f"⏳ **First start: building the sample data and models — {100 * self.fraction:.0f} %** "
                f"({self.message}). The tools answer when this is done.")


#: the process's start-up state (ready unless ``app.py`` started a build)
STARTUP = Startup()


def require_ready() -> None:
    """Raise :class:`core.errors.InputError` while the first-start build runs (or if it failed)."""
    if not STARTUP.ready:
        raise InputError(STARTUP.notice().replace("**", "").replace("⏳ ", "").replace("⚠️ ", ""))


# ---------------------------------------------------------------------------- errors
def guarded(fn):
    """Wrap a handler: InputError -> ``gr.Error`` (its message); any other error -> logged, and the
    caller gets a short message with an error id (the details stay in the server log)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            require_ready()
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except InputError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception:  # noqa: BLE001 - the server keeps serving
            ref = uuid.uuid4().hex[:8]
            log.exception("%s failed (error id %s)", fn.__name__, ref)
            raise gr.Error(f"{fn.__name__.replace('_', ' ')} failed (error id {ref}); the details are in the "
                           "server log", print_exception=False) from None

    return wrapper


# ---------------------------------------------------------------------------- paths and files
def _roots() -> list[Path]:
    s = get_settings()
    return [Path(s.runs_dir), Path(s.index_dir), Path(s.state_dir)]


def public_path(value: str) -> str:
    """An absolute server path -> its path relative to the state directory's folder it is in (else its name)."""
    p = Path(value)
    for root in _roots():
        try:
            return str(p.resolve().relative_to(root.resolve()))
        except ValueError:
            continue
    return p.name


def public_json(value):
    """``value`` with every absolute path string replaced by :func:`public_path` (recursively)."""
    if isinstance(value, dict):
        return {k: public_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [public_json(v) for v in value]
    if isinstance(value, str) and value.startswith(os.sep) and len(value) < 1024 and Path(value).suffix:
        return public_path(value)
    return value


_OUT_DIR = Path(tempfile.gettempdir()) / "dra-files"


def servable(path: str | Path | None) -> str | None:
    """A path Gradio may copy into its cache and serve: the file itself when it is under the working
    directory (Gradio's rule), else a copy under the system temp folder; None if it does not exist."""
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        return None
    cwd = Path(os.getcwd()).resolve()
    rp = p.resolve()
    if rp.is_relative_to(cwd) and not any(part.startswith(".") for part in rp.relative_to(cwd).parts):
        return str(rp)
    digest = hashlib.sha256(str(rp).encode()).hexdigest()[:16]
    dst = _OUT_DIR / digest / p.name
    if not dst.is_file() or dst.stat().st_mtime < p.stat().st_mtime:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dst)
    return str(dst)
