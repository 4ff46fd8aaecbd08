"""The model lock: every model call in the process holds it shared; building models holds it alone.

Why: building a PatchCore model traces its backbone with torch.fx (torchvision
``create_feature_extractor``), which patches ``torch.nn.Module.__call__`` for the whole
process while it runs, so a forward pass in another thread at that moment fails. Every
use case that runs a vision model (inspect, search, register, the agent's tools) holds
:data:`MODEL_LOCK` shared; creating a PatchCore model (a fit, the first load of a bank)
holds it exclusive for the few seconds the tracing takes. The CLI, the app and the benches
all go through ``services/``, so all of them take it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager


class SharedExclusiveLock:
    """Readers-writer lock (writer preferring) built on :class:`threading.Condition`.

    Re-entrant per thread: a thread that holds the lock shared may take it shared again
    (no wait) or exclusive (its shared holds are given back while it waits and restored
    after, so two such threads cannot deadlock each other).
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer: int | None = None  # thread id of the writer
        self._writer_depth = 0
        self._waiting_writers = 0
        self._local = threading.local()

    def _held(self) -> int:
        return getattr(self._local, "shared", 0)

    @contextmanager
    def shared(self):
        """Hold the lock shared for the ``with`` block (many threads at a time)."""
        me = threading.get_ident()
        with self._cond:
            if self._writer != me and not self._held():
                while self._writer is not None or self._waiting_writers:
                    self._cond.wait()
            self._readers += 1
            self._local.shared = self._held() + 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._local.shared = self._held() - 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        """Hold the lock alone for the ``with`` block (waits for other threads' shared holds)."""
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._writer_depth += 1
            else:
                mine = self._held()
                self._readers -= mine  # give back this thread's shared holds while waiting
                self._waiting_writers += 1
                try:
                    while self._writer is not None or self._readers:
                        self._cond.wait()
                finally:
                    self._waiting_writers -= 1
                self._writer, self._writer_depth = me, 1
                self._local.given_back = mine
        try:
            yield
        finally:
            with self._cond:
                self._writer_depth -= 1
                if self._writer_depth == 0:
                    self._writer = None
                    self._readers += getattr(self._local, "given_back", 0)
                    self._local.given_back = 0
                self._cond.notify_all()


#: the process's model lock (see the module docstring)
MODEL_LOCK = SharedExclusiveLock()
