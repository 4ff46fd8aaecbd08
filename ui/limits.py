"""Per-session share of the app's queue: one client cannot fill the queue for everyone.

Gradio's queue has a global size (``max_size``) and per-event concurrency limits, but no
per-session limit: one client submitting 64 jobs fills it and every other visitor gets
"queue full". :func:`limit_queue_per_session` wraps the queue's ``push`` (the place a new
job joins) and refuses a job when the same session already has ``limit`` jobs queued or
running, with a clear message, before anything is queued. The count is read from the queue's
own structures (events waiting per concurrency id, active jobs), so it cannot drift.
"""

from __future__ import annotations

import gradio as gr


def session_load(queue, session_hash: str | None) -> int:
    """Jobs of ``session_hash`` waiting in or running from a Gradio ``Queue``."""
    if not session_hash:
        return 0
    waiting = sum(1 for q in queue.event_queue_per_concurrency_id.values() for e in q.queue
                  if e.session_hash == session_hash)
    running = sum(1 for job in queue.active_jobs if job for e in job if e.session_hash == session_hash)
    return waiting + running


def limit_queue_per_session(demo: gr.Blocks, limit: int) -> None:
    """Refuse a session's new job while it has ``limit`` jobs queued or running (``limit <= 0``: no limit).

    Call after ``demo.queue(...)``. The refused client gets Gradio's "queue full" error with the message
    "Too many requests from this session at once (limit N): wait for the running ones to finish."
    """
    queue = demo._queue
    if limit <= 0 or getattr(queue, "_dra_session_limit", None) is not None:
        return
    original = queue.push

    async def push(body, request, username):
        if session_load(queue, getattr(body, "session_hash", None)) >= limit:
            return (False, f"Too many requests from this session at once (limit {limit}): wait for the "
                           "running ones to finish.", "queue_full")
        return await original(body, request, username)

    queue.push = push
    queue._dra_session_limit = limit
