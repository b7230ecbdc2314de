"""Scenarios on real daemons in the lab, read like a runbook.

Two nodes on two networks, a client, the module `app` (a small HTTP server) with a virtual IP;
pulse 100 ms, timeout 1 s. Every wait has a deadline; no wall-clock time is asserted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.daemons import wait_for
from tests.e2e.lab_cluster import LabCluster, lab_cluster

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LabCluster]:
    with lab_cluster(tmp_path) as c:
        c.start("node1")
        c.start("node2")
        c.cli("node1", "apply", "-f", str(c.manifests()))
        wait_for("node1 PRIM and node2 SECOND", lambda: c.status("node1") == {"node1": "PRIM", "node2": "SECOND"})
        yield c


def test_one_node_is_primary_and_the_vip_answers_from_it(cluster: LabCluster) -> None:
    assert wait_for("the app to answer through the VIP", cluster.app_answer) == "200 node1"
    assert cluster.client_get(cluster.url("node1", "/health/app")) == "200 OK"
    assert cluster.client_get(cluster.url("node2", "/health/app")) == "404"
    assert cluster.status("node2") == {"node1": "PRIM", "node2": "SECOND"}


def test_the_module_status_in_the_store_says_who_serves_and_ready(cluster: LabCluster) -> None:
    def status() -> dict[str, object]:
        resource = yaml.safe_load(cluster.cli("node2", "get", "module", "app", "-o", "yaml").stdout)
        return resource.get("status") or {}

    wait_for("both nodes' entries", lambda: set(status().get("nodes") or {}) == {"node1", "node2"})
    current = status()
    assert {n: e["state"] for n, e in current["nodes"].items()} == {"node1": "PRIM", "node2": "SECOND"}
    ready = next(c for c in current["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "InSync")
    assert current["observedGeneration"] == 1
    cluster.kill("node1")
    cluster.lab.isolate("node1")
    wait_for(
        "Ready to turn False on node2's word",
        lambda: (
            next(c for c in status()["conditions"] if c["type"] == "Ready")["reason"] == "BothServing"
            or status()["nodes"]["node2"]["state"] == "ALONE"
        ),
        timeout=30,
    )


def test_killing_the_primary_moves_the_vip_and_the_app_to_the_secondary(cluster: LabCluster) -> None:
    wait_for("the app on node1", lambda: cluster.app_answer() == "200 node1")
    cluster.kill("node1")
    cluster.lab.isolate("node1")
    wait_for("node2 to serve alone", lambda: cluster.status("node2").get("node2") == "ALONE", timeout=30)
    assert wait_for("the app through the VIP from node2", lambda: cluster.app_answer() == "200 node2", timeout=30)
    assert cluster.client_get(cluster.url("node2", "/health/app")) == "200 OK"


def test_cutting_one_network_is_no_failover_and_cutting_both_is(cluster: LabCluster) -> None:
    wait_for("the app on node1", lambda: cluster.app_answer() == "200 node1")
    cluster.lab.cut("node1", "backup")
    log = cluster.work / "node2" / "tandemd.log"
    wait_for("node2 to see backup lost", lambda: "network backup lost, heartbeats continue on lan" in log.read_text())
    # For three more timeouts (1 s each), heartbeats on lan keep the roles where they are.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert cluster.status("node2") == {"node1": "PRIM", "node2": "SECOND"}
    assert cluster.app_answer() == "200 node1"
    cluster.lab.cut("node1", "lan")
    wait_for("node2 to take over", lambda: cluster.status("node2").get("node2") == "ALONE", timeout=30)
    assert wait_for("the app through the VIP from node2", lambda: cluster.app_answer() == "200 node2", timeout=30)


def test_the_old_primary_returns_as_secondary_and_swap_moves_the_app_back(cluster: LabCluster) -> None:
    wait_for("the app on node1", lambda: cluster.app_answer() == "200 node1")
    cluster.kill("node1")
    cluster.lab.isolate("node1")
    wait_for("the app on node2", lambda: cluster.app_answer() == "200 node2", timeout=30)
    leftover = cluster.lab["node1"].run(["ip", "-o", "addr", "show", "lan"]).stdout
    assert cluster.vip in leftover  # the crashed daemon left the VIP behind, as a crash does

    cluster.lab.heal("node1")
    cluster.start("node1")
    wait_for("node1 back as SECOND", lambda: cluster.status("node2") == {"node1": "SECOND", "node2": "PRIM"})
    assert cluster.vip not in cluster.lab["node1"].run(["ip", "-o", "addr", "show", "lan"]).stdout
    answers = [cluster.app_answer() for _ in range(5)]
    assert answers == ["200 node2"] * 5  # the returning node never disturbed the service

    cluster.cli("node1", "swap", "app")
    wait_for("the roles swapped", lambda: cluster.status("node1") == {"node1": "PRIM", "node2": "SECOND"}, timeout=30)
    assert wait_for("the app on node1 again", lambda: cluster.app_answer() == "200 node1", timeout=30)


def test_with_auto_swap_the_preferred_primary_takes_the_app_back_by_itself(tmp_path: Path) -> None:
    with lab_cluster(tmp_path) as c:
        c.start("node1")
        c.start("node2")
        c.cli("node1", "apply", "-f", str(c.manifests(autoSwap=True)))
        wait_for("the app on node1", lambda: c.app_answer() == "200 node1")
        c.kill("node1")
        c.lab.isolate("node1")
        wait_for("the app on node2", lambda: c.app_answer() == "200 node2", timeout=30)
        c.lab.heal("node1")
        c.start("node1")
        wait_for("node1 primary again, by itself", lambda: c.status("node2") == {"node1": "PRIM", "node2": "SECOND"})
        assert wait_for("the app on node1 again", lambda: c.app_answer() == "200 node1", timeout=30)


def test_a_stop_script_that_hangs_is_killed_and_the_module_still_stops(tmp_path: Path) -> None:
    with lab_cluster(tmp_path) as c:
        c.start("node1")
        c.start("node2")
        hang = "sleep 1000 & echo $! > " + str(tmp_path / "$TANDEM_STOP_MODE.pid") + "; wait"
        c.cli(
            "node1",
            "apply",
            "-f",
            str(c.manifests(scripts={"stopPrim": hang}, stopTimeouts={"graceful": "1s", "force": "1s"})),
        )
        wait_for("node1 primary", lambda: c.status("node1").get("node1") == "PRIM")
        c.cli("node1", "stop", "app", "--node", "node1")
        wait_for("node1 stopped", lambda: c.status("node1").get("node1") == "STOP", timeout=30)
        app_log = (tmp_path / "node1" / "logs" / "app.app.log").read_text()
        assert "timed out" in app_log
        for mode in ("graceful", "force"):  # both runs of the hung script were killed with their group
            pid = int((tmp_path / f"{mode}.pid").read_text())
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        wait_for("node2 to take over", lambda: c.status("node2").get("node2") in ("ALONE", "PRIM"), timeout=30)


def test_with_failover_off_a_lone_secondary_waits(cluster: LabCluster) -> None:
    wait_for("the app on node1", lambda: cluster.app_answer() == "200 node1")
    cluster.cli("node2", "failover", "app", "off")
    cluster.kill("node1")
    cluster.lab.isolate("node1")
    wait_for("node2 to wait", lambda: cluster.status("node2").get("node2") == "WAIT", timeout=30)
    assert cluster.app_answer() is None
    cluster.cli("node2", "failover", "app", "on")
    wait_for("node2 to take over once failover is on", lambda: cluster.app_answer() == "200 node2", timeout=30)
