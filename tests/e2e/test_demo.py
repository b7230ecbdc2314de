"""README's main command: `tandem demo` runs a lab cluster a user can crash, restore and remove."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.daemons import tandem, wait_for

pytestmark = pytest.mark.slow


def demo(root: Path, *args: str) -> str:
    return tandem("demo", "--root", str(root), *args).stdout


def states(root: Path) -> dict[str, str]:
    rows = demo(root, "--status").splitlines()[1:]
    return {cols[1]: cols[2] for cols in (row.split() for row in rows) if cols and cols[0] == "notes"}


def test_the_demo_serves_through_the_vip_fails_over_returns_and_goes_away(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    try:
        out = demo(root)
        assert "notes    node1   PRIM" in out and "notes    node2   SECOND" in out
        assert "from the client host: node1: note 1 saved" in out
        lab = json.loads((root / "demo.json").read_text())["lab"]

        assert demo(root, "--client") == "node1: 1 notes\n"
        demo(root, "--crash", "node1")
        wait_for("node2 to serve through the VIP", lambda: demo(root, "--client").startswith("node2:"), timeout=30)
        assert demo(root, "--client") == "node2: 1 notes\n"  # the note node1 acknowledged is on node2
        demo(root, "--restore", "node1")
        wait_for("node1 back as SECOND", lambda: states(root) == {"node1": "SECOND", "node2": "PRIM"}, timeout=30)
        demo(root, "--swap")
        wait_for("node1 primary again", lambda: demo(root, "--client") == "node1: 1 notes\n", timeout=30)

        again = tandem("demo", "--root", str(root), check=False)
        assert again.returncode == 1 and "a demo is recorded" in again.stderr
    finally:
        tandem("demo", "--root", str(root), "--down", check=False)
    assert not root.exists()
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert lab not in namespaces
