"""Follow the alias: the served model is swapped for the version ``@champion`` points at, without a restart.

A background thread asks the registry every ``serving.reload_seconds`` which version the alias names. When it
moved, the new version is loaded beside the old one (the old keeps answering meanwhile) and swapped in with one
reference assignment. A request takes the current model once when it starts, so requests in flight finish on the
version they started with, and every answer names the version that produced it. A failed load is logged and
retried at the next check; the old version keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from bonetumor.errors import BoneTumorError
from bonetumor.serving.served import ServedModel

log = logging.getLogger(__name__)


class ModelHolder:
    """Holds the served model and replaces it when the registry's alias moves.

    Args:
        initial: The model loaded at start-up.
        resolve: Returns the version the alias names now (asks the registry).
        load: Loads a version as a :class:`ServedModel`.
        reload_seconds: Seconds between checks; 0 never checks (a pinned version, or reloading switched off).
    """

    def __init__(
        self,
        initial: ServedModel,
        resolve: Callable[[], str],
        load: Callable[[str], ServedModel],
        reload_seconds: float,
    ) -> None:
        self._current = initial
        self._resolve = resolve
        self._load = load
        self.reload_seconds = reload_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._swap_lock = threading.Lock()
        self.last_check: dict[str, Any] = {"time": None, "error": None, "version": initial.version}

    @property
    def current(self) -> ServedModel:
        """The model new requests are answered by (take it once per request)."""
        return self._current

    def check_now(self) -> bool:
        """Ask where the alias points and load that version when it moved; return whether it swapped."""
        with self._swap_lock:
            try:
                version = self._resolve()
                swapped = False
                if version != self._current.version:
                    log.info("alias moved: version %s -> %s; loading it", self._current.version, version)
                    loaded = self._load(version)
                    previous, self._current = self._current.version, loaded
                    log.info("now serving version %s (was %s)", loaded.version, previous)
                    swapped = True
                self.last_check = {"time": time.time(), "error": None, "version": self._current.version}
                return swapped
            except (BoneTumorError, OSError) as exc:
                # The registry is unreachable or the new version does not load: keep serving the old one.
                log.warning("alias check failed, still serving version %s: %s", self._current.version, exc)
                self.last_check = {"time": time.time(), "error": str(exc), "version": self._current.version}
                return False

    def start(self) -> None:
        """Start the background checks (nothing when ``reload_seconds`` is 0)."""
        if self.reload_seconds <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="bonetumor-alias-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.reload_seconds):
            self.check_now()

    def stop(self) -> None:
        """Stop the background checks."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
