"""Which FUSE requests a benchmark sends through a mount, how many per operation, and how long each takes.

The cost of a Python FUSE data path is per request (PERFORMANCE.md). This makes the requests of a
workload visible, from the kernel's own tracepoints (`fuse:fuse_request_send`, `fuse:fuse_request_end`)
recorded with perf (Debian's `linux-perf`). A request's time runs from the kernel queuing it to the
daemon's reply: the daemon's work, the wake-ups on the way, and for the primary the peer's ack.
Recording costs a few µs per request, so the figures of a profiled run are a little slower.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

EVENTS = ("fuse:fuse_request_send", "fuse:fuse_request_end")
_SEND = re.compile(r"^\s*(\d+\.\d+):\s+fuse:fuse_request_send: connection (\d+) req (\d+) opcode \d+ \(FUSE_(\w+)\)")
_END = re.compile(r"^\s*(\d+\.\d+):\s+fuse:fuse_request_end: connection (\d+) req (\d+) ")
_ACK_SECONDS = 10.0
RARE = 0.05


class ProfileError(RuntimeError):
    """perf could not record the FUSE tracepoints here."""


@dataclass
class Profile:
    """The FUSE requests of one workload on one mount: count and total seconds for each kind."""

    operations: int
    kinds: dict[str, tuple[int, float]] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return sum(count for count, _ in self.kinds.values())

    def render(self) -> str:
        """`2.00 per operation: FSYNC 1.00 (912 µs), WRITE 1.00 (330 µs)`: kinds by the time they took.

        Kinds of fewer than one request per 20 operations (the tree's own set-up) are summed as "other".
        """
        if not self.operations:
            return "-"
        parts, other = [], 0
        for name, (n, seconds) in sorted(self.kinds.items(), key=lambda kv: -kv[1][1]):
            if n / self.operations < RARE:
                other += n
            else:
                parts.append(f"{name} {n / self.operations:.2f} ({seconds / n * 1e6:.0f} µs)")
        if other:
            parts.append(f"other {other / self.operations:.2f}")
        return f"{self.requests / self.operations:.2f} per operation: " + ", ".join(parts)


def connection(mount: Path) -> int:
    """The FUSE connection number of a mount, as the tracepoints print it (the kernel's dev_t)."""
    dev = os.stat(mount).st_dev
    return (os.major(dev) << 20) | os.minor(dev)


def parse(lines: Iterator[str], conn: int, operations: int) -> Profile:
    """A Profile of `perf script -F time,event,trace` output, for one connection."""
    sent: dict[int, tuple[str, float]] = {}
    kinds: dict[str, tuple[int, float]] = {}
    for line in lines:
        if (hit := _SEND.match(line)) is not None:
            if int(hit.group(2)) == conn:
                sent[int(hit.group(3))] = (hit.group(4), float(hit.group(1)))
        elif (hit := _END.match(line)) is not None and int(hit.group(2)) == conn:
            start = sent.pop(int(hit.group(3)), None)
            if start is not None:
                count, seconds = kinds.get(start[0], (0, 0.0))
                kinds[start[0]] = (count + 1, seconds + float(hit.group(1)) - start[1])
    return Profile(operations, kinds)


def check() -> None:
    """Raise ProfileError naming what is missing (perf, tracefs, or the kernel's FUSE tracepoints).

    Mounts tracefs at /sys/kernel/tracing first if nothing is mounted there.
    """
    if shutil.which("perf") is None:
        raise ProfileError("--fuse-profile needs perf (apt-get install linux-perf)")
    tracing = Path("/sys/kernel/tracing")
    if not (tracing / "events").exists():
        # A booted system has tracefs there; a fresh VM or container may not have mounted it yet.
        mounted = subprocess.run(["mount", "-t", "tracefs", "nodev", str(tracing)], capture_output=True, text=True)
        if mounted.returncode != 0:
            raise ProfileError(f"--fuse-profile needs tracefs at {tracing}: mount failed: {mounted.stderr.strip()}")
    if not (tracing / "events/fuse/fuse_request_send").exists():
        raise ProfileError("--fuse-profile needs the FUSE tracepoints (fuse:fuse_request_send); this kernel has none")


def require(parser: argparse.ArgumentParser) -> None:
    """Exit through `parser` with check()'s reason when the FUSE requests cannot be profiled here."""
    try:
        check()
    except ProfileError as exc:
        parser.error(str(exc))


@contextlib.contextmanager
def recording(mount: Path, operations: int, results: list[Profile]) -> Iterator[None]:
    """Record the FUSE requests of `mount` during the block; append their Profile to `results`.

    perf starts with its events off and is told through its control pipe to turn them on (so the
    block's first request is not missed while perf starts), off, and to stop (writing its data).
    """
    conn = connection(mount)
    with tempfile.TemporaryDirectory(prefix="tandem-fuse-profile-") as tmp:
        data = Path(tmp) / "perf.data"
        ctl_r, ctl_w = os.pipe()
        ack_r, ack_w = os.pipe()
        events = [arg for event in EVENTS for arg in ("-e", event)]
        perf = subprocess.Popen(
            ["perf", "record", "-q", "-a", "-D", "-1", "--control", f"fd:{ctl_r},{ack_w}", *events, "-o", str(data)],
            pass_fds=(ctl_r, ack_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(ctl_r)
        os.close(ack_w)
        started = stopped = False
        try:
            started = _command(ctl_w, ack_r, "enable")
            if started:
                yield
                stopped = _command(ctl_w, ack_r, "disable") and _command(ctl_w, ack_r, "stop")
        finally:
            os.close(ctl_w)
            os.close(ack_r)
            if not stopped:
                perf.kill()
            _, err = perf.communicate(timeout=60)
        if not stopped or perf.returncode != 0:
            why = err.decode(errors="replace").strip() or "no message"
            raise ProfileError(f"perf record failed (exit {perf.returncode}): {why}")
        script = subprocess.run(
            ["perf", "script", "-i", str(data), "-F", "time,event,trace"], capture_output=True, text=True, check=True
        )
        results.append(parse(iter(script.stdout.splitlines()), conn, operations))


def _command(ctl: int, ack: int, command: str) -> bool:
    """Send perf one control command; whether it acknowledged it in time."""
    try:
        os.write(ctl, command.encode() + b"\n")
    except OSError:  # perf is gone
        return False
    ready, _, _ = select.select([ack], [], [], _ACK_SECONDS)
    return bool(ready) and os.read(ack, 16).startswith(b"ack")


class Recorder:
    """Profiles of named sections of a run on one mount; does nothing when not enabled."""

    def __init__(self, mount: Path, *, enabled: bool) -> None:
        self.mount = mount
        self.enabled = enabled
        self.sections: list[tuple[str, Profile]] = []

    @contextlib.contextmanager
    def section(self, name: str, operations: int) -> Iterator[None]:
        """Record the block as `name`, of `operations` operations, when enabled."""
        if not self.enabled:
            yield
            return
        results: list[Profile] = []
        with recording(self.mount, operations, results):
            yield
        self.sections.append((name, results[0]))

    def render(self) -> str:
        """A markdown table of the sections recorded; empty when none."""
        if not self.sections:
            return ""
        out = ["| benchmark | FUSE requests through the mount, and of each kind (mean time) |", "|---|---|"]
        out += [f"| {name} | {profile.render()} |" for name, profile in self.sections]
        return "\n".join(out)
