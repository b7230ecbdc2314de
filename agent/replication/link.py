"""The primary's link to its peer: connect forever, resync on every connection, report its state."""

from __future__ import annotations

import asyncio
import logging

from agent.replication.beneath import PathEscape
from agent.replication.events import Events
from agent.replication.exclude import NOTHING, Exclude
from agent.replication.resync import Resync, ResyncError
from agent.replication.sender import Sender
from agent.replication.wire import ProtocolError

log = logging.getLogger(__name__)
RETRY = 0.5
RETRY_AFTER_FAILURE = 2.0


class PeerLink:
    """(Re)connects the Sender to the secondary, runs a resync each time, and emits `peer` events."""

    def __init__(
        self, sender: Sender, root_fd: int, events: Events, peer: tuple[str, int], exclude: Exclude = NOTHING
    ) -> None:
        self.sender = sender
        self.exclude = exclude
        self.root_fd = root_fd
        self.events = events
        self.host, self.port = peer
        self._last_refusal = ""

    async def run(self) -> None:
        """Run until cancelled: while disconnected, writes complete locally."""
        while True:
            self.events.peer("connecting")
            await self._connect()
            reason, failed = await self._session()
            self.events.peer("disconnected", reason=reason)
            await asyncio.sleep(RETRY_AFTER_FAILURE if failed else RETRY)

    async def _connect(self) -> None:
        while True:
            try:
                await self.sender.connect(self.host, self.port)
                self._last_refusal = ""
                return
            except (OSError, TimeoutError, ProtocolError) as exc:
                self._refused(exc)
            await asyncio.sleep(RETRY)

    def _refused(self, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        if reason == self._last_refusal:
            return
        self._last_refusal = reason
        if isinstance(exc, ConnectionRefusedError):
            log.info("Peer %s:%d not listening yet; retrying every %.1fs", self.host, self.port, RETRY)
        else:
            log.warning("Cannot open the replication stream to %s:%d: %s", self.host, self.port, reason)

    async def _session(self) -> tuple[str, bool]:
        """Resync, report in-sync, then wait for the stream to end; return why it ended."""
        self.sender.on_error = None
        try:
            stats = await Resync(self.root_fd, self.sender, self.events, self.exclude).run()
        except (ResyncError, ProtocolError, PathEscape, OSError) as exc:
            if isinstance(exc, ConnectionError) and not self.sender.connected:
                return self.sender.lost_reason or str(exc), False
            message = f"resync failed: {exc}"
            log.error("Replication error: %s", message)
            self.events.emit("error", message=message)
            self.sender.drop(message)
            return message, True
        self.sender.diverged = False
        self.sender.on_error = self._diverged
        log.info("Resync complete: %d files compared, %d data bytes sent", stats.files, stats.data_bytes)
        self.events.peer("in-sync", files=stats.files, dataBytes=stats.data_bytes, wireBytes=stats.wire_bytes)
        await self.sender.closed.wait()
        self.sender.on_error = None
        return self.sender.lost_reason, False

    def _diverged(self, seq: int, status: int, message: str) -> None:
        """An error from the secondary outside a resync: its copy diverged; reconnect and resync."""
        reason = f"secondary diverged at seq {seq}: {message} (errno {status})"
        log.error("Replication error: %s", reason)
        self.events.emit("error", message=reason)
        self.sender.drop(reason)
