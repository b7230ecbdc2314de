"""Keep idle CPUs polling while replication traffic flows, so that waking the next process stays cheap.

A replicated write waits for at least four wake-ups in a row (the application wakes the primary's FUSE
loop, which wakes the network peer, whose ack wakes the primary, whose reply wakes the application).
A CPU that went idle in between sleeps: on a VM whose vCPU halts (guest_halt_poll_ns=0, as here) waking
it goes through the host and costs 50-700 µs, more than the work itself. The kernel's PM QoS interface
(/dev/cpu_dma_latency) lets a process ask for an idle exit latency of 0 µs: idle CPUs then poll instead
of halting, for as long as the request stands. The replicator holds that request only while frames
flow or its mount serves requests, and for `hold` seconds after the last, so an idle node sleeps as
before.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct

log = logging.getLogger(__name__)

DEVICE = "/dev/cpu_dma_latency"
HOLD_SECONDS = 0.01
# The request that makes idle CPUs poll (0 µs of exit latency).
POLL = struct.pack("=i", 0)
# PM_QOS_CPU_LATENCY_DEFAULT_VALUE (2000 s): a request of this value constrains nothing.
_RELEASED = struct.pack("=i", 2_000_000_000)


class Awake:
    """One PM QoS CPU-latency request of this process: 0 µs while `touch()` was called in the last `hold` s."""

    def __init__(self, hold: float = HOLD_SECONDS, device: str = DEVICE) -> None:
        self.hold = hold
        self.device = device
        self.active = False
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last = 0.0

    def open(self) -> Awake:
        """Open the request (it constrains nothing yet); without one (logged), `touch()` does nothing."""
        if self.hold <= 0:
            return self
        self._loop = asyncio.get_running_loop()
        try:
            self._fd = os.open(self.device, os.O_WRONLY | os.O_CLOEXEC)
            os.write(self._fd, _RELEASED)
        except OSError as exc:
            log.info("Idle CPUs will sleep during replication (no PM QoS request: %s: %s)", self.device, exc.strerror)
            self.close()
            return self
        log.info("Idle CPUs poll while replication traffic flows and %.0f ms after (%s)", self.hold * 1000, self.device)
        return self

    @property
    def requested(self) -> bool:
        """Whether this process holds a request (touch() will set it)."""
        return self._fd is not None

    def __enter__(self) -> Awake:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def touch(self) -> None:
        """Traffic now: keep idle CPUs polling until `hold` seconds after the last call."""
        if self._fd is None:
            return
        assert self._loop is not None
        self._last = self._loop.time()
        if not self.active and self._set(POLL):
            self.active = True
            self._loop.call_at(self._last + self.hold, self._expire)

    def _expire(self) -> None:
        assert self._loop is not None
        due = self._last + self.hold
        if self._fd is None:
            self.active = False
        elif self._loop.time() < due:
            self._loop.call_at(due, self._expire)
        else:
            self.active = False
            self._set(_RELEASED)

    def _set(self, value: bytes) -> bool:
        assert self._fd is not None
        try:
            os.write(self._fd, value)
        except OSError as exc:
            log.warning("PM QoS request refused (%s: %s); idle CPUs will sleep during replication", self.device, exc)
            self.close()
            return False
        return True

    def close(self) -> None:
        """Drop the request: the kernel forgets it with the fd."""
        fd, self._fd, self.active = self._fd, None, False
        if fd is not None:
            os.close(fd)


def current(device: str = DEVICE) -> int:
    """The CPU latency the kernel honours now, in µs: the smallest request of all processes."""
    with open(device, "rb") as f:
        return int(struct.unpack("=i", f.read(4))[0])
