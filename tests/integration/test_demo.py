"""README's main command: `tandem demo` brings up two synced daemons and `--down` removes every trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller.demo import pid_alive as alive
from tests.daemons import free_port, tandem, wait_for

pytestmark = pytest.mark.slow


def test_the_demo_comes_up_survives_a_node_restart_and_goes_down(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    ports = f"{free_port()},{free_port()}"
    node1, node2 = (f"http://127.0.0.{i}:{p}" for i, p in zip((1, 2), ports.split(","), strict=True))
    try:
        out = tandem("demo", "--root", str(root), "--ports", ports).stdout
        assert "Applied 13 resources on node1" in out  # the examples less their virtual IPs
        assert "virtualip/" not in out
        assert "tandem get modules" in out and "notes        mirror   node1,node2" in out
        pids = [int(p.read_text()) for p in root.glob("*/demo.pid")]
        assert len(pids) == 2 and all(alive(p) for p in pids)

        status = wait_for(
            "one node to serve notes",
            lambda: (rows := json.loads(tandem("status", "-o", "json", server=node1).stdout))
            and [r["node"] for r in rows if r["module"] == "notes" and r["serving"]] == ["node1"] and rows,
        )
        assert {(r["module"], r["node"]): r["state"] for r in status}[("notes", "node2")] == "SECOND"

        again = tandem("demo", "--root", str(root), "--ports", ports, check=False)
        assert again.returncode == 1 and "the demo already runs" in again.stderr

        tandem("demo", "--root", str(root), "--stop", "node2")
        tandem("delete", "checker", "notes-http", server=node1)
        tandem("demo", "--root", str(root), "--start", "node2")
        wait_for("node2 to catch up", lambda: "notes-http" not in tandem("get", "checkers", server=node2).stdout)
        pids = [int(p.read_text()) for p in root.glob("*/demo.pid")]
    finally:
        tandem("demo", "--root", str(root), "--down", check=False)
    assert not root.exists()
    wait_for("both daemons to be gone", lambda: not any(alive(p) for p in pids))
