"""Control channel v1: one JSON object per line on stdout, read by the supervisor (logs go to stderr)."""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

SYNC_INTERVAL = 0.5


class Events:
    """Writes events as flushed JSON lines; `syncing` progress is throttled to ~2 per second."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self.out = out if out is not None else sys.stdout
        self._last_progress = 0.0

    def emit(self, event: str, **fields: Any) -> None:
        """Write one event line now."""
        self.out.write(json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n")
        self.out.flush()

    def peer(self, state: str, **fields: Any) -> None:
        """A change of the peer link's state."""
        self.emit("peer", state=state, **fields)

    def progress(self, remaining_bytes: int, remaining_files: int, *, force: bool = False) -> None:
        """Resync progress, at most every SYNC_INTERVAL seconds unless forced."""
        now = time.monotonic()
        if force or now - self._last_progress >= SYNC_INTERVAL:
            self._last_progress = now
            self.peer("syncing", remainingBytes=max(0, remaining_bytes), remainingFiles=max(0, remaining_files))


class NoEvents(Events):
    """Drops every event (library use and tests)."""

    def emit(self, event: str, **fields: Any) -> None:
        """Nothing to write."""
