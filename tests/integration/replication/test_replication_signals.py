"""Writers that keep getting signals: every interrupted request is still served, and no worker dies.

A signal to a process blocked in a FUSE request makes the kernel queue an INTERRUPT request, and
withdraw it again when the interrupted request is answered first. A pyfuse3 worker woken by that
INTERRUPT then found nothing to read: on the blocking /dev/fuse of stock pyfuse3 the read stopped the
event loop (the mount hung), on a non-blocking one (uvloop makes it so) the worker died of EAGAIN.
Tandem's pyfuse3 patch answers INTERRUPT with ENOSYS, so the kernel sends no more, and waits for the
next request after EAGAIN.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.replication.pairs import Pair

WRITES = 2000
WRITER = f"""
import os, signal, sys
signal.signal(signal.SIGUSR1, lambda *_: None)
print("ready", flush=True)
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
for i in range({WRITES}):
    os.pwrite(fd, i.to_bytes(4, "big") * 1024, (i % 64) * 4096)
    if i % 50 == 0:
        os.fsync(fd)
os.close(fd)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])  # the default action returns at exit
print("done", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_writers_interrupted_by_signals_are_served_and_replicated(pair: Pair, loop: str) -> None:
    pair.extra += ["--event-loop", loop]
    pair.start("received")
    files = [pair.primary_dir / f"w{n}" for n in range(2)]
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(f)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for f in files
    ]
    sent, deadline = 0, time.monotonic() + 30
    try:
        for w in writers:  # signals only once the handler is in place
            assert w.stdout is not None and w.stdout.readline() == b"ready\n"
        while any(w.poll() is None for w in writers) and time.monotonic() < deadline and sent < 200_000:
            for w in writers:
                if w.poll() is None:
                    os.kill(w.pid, signal.SIGUSR1)  # by PID: our own child
                    sent += 1
            time.sleep(0.0002)
        results = [w.communicate(timeout=30) for w in writers]
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait()
    assert [w.returncode for w in writers] == [0, 0], results
    assert sent > 100, "the writers ended before they got signals"
    assert pair.stop("primary") == 0, pair.log("primary")
    assert pair.stop("secondary") == 0, pair.log("secondary")
    for f in files:
        assert (pair.secondary_dir / f.name).read_bytes() == f.read_bytes()
    logs = pair.log("primary") + pair.log("secondary")
    assert "ERROR" not in logs and "Traceback" not in logs, logs
