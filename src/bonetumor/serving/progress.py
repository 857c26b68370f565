"""Progress of the whole-slide assessments a service runs, for the page's progress bar.

Kept apart from the BentoML adapter (``serving/service.py``) so that it is plain, testable Python.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any


class AssessProgress:
    """How far each running assessment is, for the page's progress bar; thread-safe, in the worker's memory.

    BentoML's task status says only ``in_progress``, ``completed`` or ``failed``. BentoML 1.4 puts the task id on
    the request state (``ctx.request.state.task_id``) before it runs the task, so the task keys its progress by
    it; the page has that id from ``/assess/submit`` and polls ``GET /ui/assess/progress/<task_id>`` beside
    ``/assess/status``. The store lives in the worker that ran the task: with several workers (not the default)
    a poll may reach another one and get a 404, and the page then shows the status alone. The newest
    :attr:`KEPT` entries are kept.

    An entry: ``state`` (``queued``: waiting for another assessment; ``opening``: reading the slide and its
    tissue mask; ``tiles``: classifying, ``done`` of ``total`` tiles read; ``summarising``; ``completed``;
    ``failed`` with ``error``), ``filename``, ``done``, ``total``, ``started`` and ``updated`` (Unix seconds).
    """

    KEPT = 256

    def __init__(self) -> None:
        self._entries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, task_id: str, filename: str) -> None:
        """A new assessment, waiting for its turn."""
        now = time.time()
        with self._lock:
            self._entries[task_id] = {
                "task_id": task_id,
                "filename": filename,
                "state": "queued",
                "done": 0,
                "total": None,
                "started": now,
                "updated": now,
            }
            while len(self._entries) > self.KEPT:
                self._entries.popitem(last=False)

    def update(self, task_id: str, state: str, **fields: Any) -> None:
        """Move an assessment on (unknown ids are ignored)."""
        with self._lock:
            entry = self._entries.get(task_id)
            if entry is not None:
                entry.update(fields, state=state, updated=time.time())

    def tiles(self, task_id: str, done: int, total: int) -> None:
        """``on_progress`` of :func:`bonetumor.slide.assess.assess_slide`."""
        self.update(task_id, "tiles" if done < total else "summarising", done=done, total=total)

    def get(self, task_id: str) -> dict[str, Any] | None:
        """A copy of the entry, or None."""
        with self._lock:
            entry = self._entries.get(task_id)
            return None if entry is None else dict(entry)
