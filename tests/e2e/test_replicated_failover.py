"""The mirror promise, end to end: every write a client got an OK for survives the primary's death.

The sample app (controller/demoapp.py) keeps notes in SQLite in a ReplicatedDir; each node has its
own copy of that path in its mount namespace, and only replication makes them equal.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.daemons import wait_for
from tests.e2e.lab_cluster import APP_PORT, LabCluster, lab_cluster

pytestmark = pytest.mark.slow
DATA = "/var/lib/tandem-e2e/notes"


class NotesCluster(LabCluster):
    def manifests(self, **module: object) -> Path:
        app = f"nohup {sys.executable} -m controller.demoapp --db {DATA}/notes.db --port {APP_PORT}"
        pidfile = f"{self.www}/$TANDEM_NODE.pid"
        path = super().manifests(
            scripts={"startPrim": f"mkdir -p {self.www}; {app} > /dev/null 2>&1 & echo $! > {pidfile}"}, **module
        )
        rdir = {
            "apiVersion": "tandem.dev/v1alpha1",
            "kind": "ReplicatedDir",
            "metadata": {"name": "notes-data"},
            "spec": {"module": "app", "path": DATA},
        }
        path.write_text(path.read_text() + "---\n" + yaml.safe_dump(rdir))
        return path

    def post(self, text: str) -> str | None:
        code = (
            "import urllib.request, sys\n"
            f"req = urllib.request.Request('http://{self.vip}:{APP_PORT}/notes', data={text.encode()!r})\n"
            "try:\n    print(urllib.request.urlopen(req, timeout=2).read().decode().strip())\n"
            "except OSError:\n    sys.exit(1)\n"
        )
        done = self.lab["client"].run([sys.executable, "-c", code], check=False, timeout=15)
        return done.stdout.strip() if done.returncode == 0 else None


@contextmanager
def notes_cluster(work: Path) -> Iterator[NotesCluster]:
    """A lab with node1 PRIM and node2 SECOND in sync, the notes app answering through the VIP."""
    with lab_cluster(work) as base:
        cluster = NotesCluster(base.lab, work)
        cluster.lab.private_path(DATA)
        cluster.start("node1")
        cluster.start("node2")
        cluster.cli("node1", "apply", "-f", str(cluster.manifests()))
        wait_for(
            "node1 PRIM, node2 SECOND, in sync",
            lambda: cluster.status("node1") == {"node1": "PRIM", "node2": "SECOND"},
            timeout=60,
        )
        # startPrim returns once the app is spawned: PRIM can come before the app listens.
        wait_for("the app answers through the VIP", lambda: (cluster.app_answer() or "").startswith("200 node1"))
        yield cluster


@pytest.fixture
def notes(tmp_path: Path) -> Iterator[NotesCluster]:
    with notes_cluster(tmp_path) as cluster:
        yield cluster


def test_every_acknowledged_write_survives_the_primarys_death(notes: NotesCluster) -> None:
    acknowledged = [n for n in (notes.post(f"note {i}") for i in range(20)) if n is not None]
    assert len(acknowledged) == 20 and acknowledged[-1].startswith("node1: note")
    notes.kill("node1")
    notes.lab.isolate("node1")
    answer = wait_for(
        "node2 to answer through the VIP",
        lambda: (a := notes.app_answer()) and a.startswith("200 node2") and a,
        timeout=60,
    )
    assert answer == "200 node2: 20 notes"


def test_the_old_primary_resyncs_online_and_takes_the_app_back(notes: NotesCluster) -> None:
    for i in range(5):
        assert notes.post(f"before {i}") is not None
    notes.kill("node1")
    notes.lab.isolate("node1")
    wait_for("node2 serving", lambda: (notes.app_answer() or "").startswith("200 node2"), timeout=60)
    for i in range(5):
        assert notes.post(f"while node1 is away {i}") is not None
    notes.lab.heal("node1")
    notes.start("node1")
    during: list[str | None] = []

    def back() -> bool:
        during.append(notes.post("during the return"))
        return notes.status("node2") == {"node1": "SECOND", "node2": "PRIM"}

    wait_for("node1 back as SECOND, in sync", back, timeout=90)
    assert None not in during  # the primary's application never stopped
    notes.cli("node1", "swap", "app")
    wait_for("node1 PRIM again", lambda: notes.status("node1") == {"node1": "PRIM", "node2": "SECOND"}, timeout=60)
    answer = wait_for("node1 answering", lambda: (a := notes.app_answer()) and a.startswith("200 node1") and a)
    # everything written on node1 before, and on node2 while node1 was away and while it came back
    assert answer == f"200 node1: {10 + len(during)} notes"


def test_the_primary_goes_on_writing_when_the_secondarys_host_vanishes(notes: NotesCluster) -> None:
    assert notes.post("before") is not None
    # Its cables pulled: no reset, no FIN, its replicator still holds the stream.
    notes.lab.isolate("node2")
    wait_for("node1 serving alone", lambda: notes.status("node1").get("node1") == "ALONE", timeout=60)
    answer = wait_for("a write through the VIP", lambda: notes.post("while node2 is gone"), timeout=60)
    assert answer.startswith("node1: ")
    # The heartbeats declared the peer lost before any replication timeout ran out.
    log = (notes.work / "node1" / "logs" / "notes-data.replicator.log").read_text()
    assert "the agent declared the peer lost" in log, log[-2000:]
