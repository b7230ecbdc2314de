"""How long the primary's writes stall when the secondary's host vanishes, in the network-namespace lab.

Run as root from the repository: `.venv/bin/python -m bench.secondary_loss [--runs N]`.

Two tandemd nodes (pulse 100 ms, timeout 1 s) serve the demo's notes app with its SQLite database in
a ReplicatedDir (tests/e2e/test_replicated_failover.py), node1 primary and node2 in sync. The client
host POSTs notes through the VIP one after another (2 s timeout each); after ten, every cable of
node2 is cut (`Lab.isolate`: no reset, no FIN, its processes keep running). The stall is the time from
the cut to the end of the first POST that succeeds after it: that write waited for the vanished
secondary until node1 declared it lost. Every lab and process is removed on exit. All traffic stays
inside the lab's namespaces.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tests.e2e.test_replicated_failover import notes_cluster

WRITES_BEFORE = 10
# A run that sees no successful write this long after the cut has failed.
GIVE_UP = 120.0


def one_run(work: Path) -> float:
    """One lab: seconds from the cut to the end of the first write that succeeds after it."""
    with notes_cluster(work) as cluster:
        for i in range(WRITES_BEFORE):
            if cluster.post(f"before {i}") is None:
                raise RuntimeError("a write failed before the cut")
        cluster.lab.isolate("node2")
        cut = time.monotonic()
        while time.monotonic() - cut < GIVE_UP:
            if cluster.post("after the cut") is not None:
                return time.monotonic() - cut
        raise RuntimeError(f"no write succeeded within {GIVE_UP:g} s of the cut")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.secondary_loss", description=__doc__)
    p.add_argument("--runs", type=int, default=5, help="labs, one after another (default 5)")
    args = p.parse_args(argv)
    stalls = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="tandem-secondary-loss-") as tmp:
            stalls.append(one_run(Path(tmp)))
        print(f"run {run + 1}: first write after the cut {stalls[-1]:.2f} s", flush=True)
    print(
        f"write stall after the secondary's host vanished: min {min(stalls):.2f} / "
        f"median {statistics.median(stalls):.2f} / max {max(stalls):.2f} s over {len(stalls)} runs"
    )


if __name__ == "__main__":
    main()
