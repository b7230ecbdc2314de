"""Logging set-up for the daemon: sentences with key=value facts, written off the event loop."""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys
import time
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class _UTCFormatter(logging.Formatter):
    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created)) + f".{int(record.msecs):03d}Z"


def setup_daemon_logging(state_dir: Path, *, level: int = logging.INFO) -> logging.handlers.QueueListener:
    """Log to stderr and ``<state-dir>/tandemd.log`` through a queue, so a slow disk never stalls the loop."""
    formatter = _UTCFormatter(FORMAT)
    targets: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    state_dir.mkdir(parents=True, exist_ok=True)
    targets.append(logging.handlers.RotatingFileHandler(state_dir / "tandemd.log", maxBytes=20 << 20, backupCount=3))
    for handler in targets:
        handler.setFormatter(formatter)
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(records)]
    root.setLevel(level)
    for noisy in ("aiohttp.access", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    listener = logging.handlers.QueueListener(records, *targets, respect_handler_level=True)
    listener.start()
    return listener
