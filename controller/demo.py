"""`tandem demo`: two daemons on loopback with the example manifests applied.

Each node gets its own state dir under the demo root, its own loopback address and port, and the
same cluster key. The demo applies everything on node1 and shows it arriving on node2 through the
embedded store's sync. `tandem demo --down` stops the daemons by the PIDs it recorded.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from controller.client import Client, ClientError
from controller.output import table
from controller.resources import Resource
from controller.resources.manifests import load
from controller.secret import generate_key


@dataclass(frozen=True)
class DemoNode:
    name: str
    address: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"


NODES = (DemoNode("node1", "127.0.0.1", 9011), DemoNode("node2", "127.0.0.2", 9012))
START_DEADLINE = 20.0


class DemoError(Exception):
    """The demo cannot start or stop; the message says what to do."""


def cluster_manifest() -> dict[str, object]:
    return {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "Cluster",
        "metadata": {"name": "demo"},
        "spec": {
            "networks": ["lan"],
            "nodes": [{"name": n.name, "addresses": {"lan": n.address}, "apiPort": n.port} for n in NODES],
        },
    }


def _example_resources(root: Path, manifests: Path) -> list[Resource]:
    """The examples with the demo's own loopback Cluster in place of manifests/cluster.yaml."""
    cluster_file = root / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump(cluster_manifest(), sort_keys=False))
    examples = [p for p in sorted(manifests.iterdir()) if p.name != "cluster.yaml"]
    return load([cluster_file, *examples], state_dir=str(root))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _pids(root: Path) -> dict[str, int]:
    pids = {}
    for node in NODES:
        pidfile = root / node.name / "demo.pid"
        if pidfile.is_file():
            pids[node.name] = int(pidfile.read_text().strip())
    return pids


def _start_daemon(root: Path, node: DemoNode) -> int:
    state = root / node.name
    state.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / "cluster.key", state / "cluster.key")
    (state / "cluster.key").chmod(0o600)
    cmd = [sys.executable, "-m", "controller.cli", "node", "run", "--node", node.name,
           "--state-dir", str(state), "--listen", f"{node.address}:{node.port}"]
    with open(state / "daemon.out", "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    (state / "demo.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def _wait_healthy(root: Path, node: DemoNode, pid: int) -> None:
    deadline = time.monotonic() + START_DEADLINE
    client = Client(node.url, timeout=1.0)
    while time.monotonic() < deadline:
        if not _alive(pid):
            log = (root / node.name / "daemon.out").read_text(errors="replace").strip().splitlines()
            raise DemoError(f"{node.name}'s daemon exited: {log[-1] if log else 'no output'}")
        try:
            client.get("/healthz")
            return
        except ClientError:
            time.sleep(0.1)
    raise DemoError(f"{node.name}'s daemon did not answer on {node.url} within {START_DEADLINE:.0f}s")


def _wait_synced(node: DemoNode, expected: dict[tuple[str, str], str]) -> None:
    """Wait until ``node`` holds every expected object at the expected resourceVersion."""
    client = Client(node.url, timeout=1.0)
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        held = {}
        for plural in ("clusters", "modules", "replicateddirs", "virtualips", "checkers"):
            for item in client.get(f"/api/v1/{plural}")["items"]:
                held[(item["kind"], item["metadata"]["name"])] = item["metadata"]["resourceVersion"]
        if all(held.get(key) == version for key, version in expected.items()):
            return
        time.sleep(0.1)
    raise DemoError(f"{node.name} did not receive the resources within {START_DEADLINE:.0f}s")


def up(root: Path, *, manifests: Path) -> int:
    """Start the demo, apply the examples on node1, show them as node2 sees them."""
    root = root.resolve()
    running = {name: pid for name, pid in _pids(root).items() if _alive(pid)}
    if running:
        raise DemoError(f"the demo already runs in {root} (pids {running}): `tandem demo --down` first")
    root.mkdir(parents=True, exist_ok=True)
    resources = _example_resources(root, manifests)
    if not (root / "cluster.key").exists():
        generate_key(root / "cluster.key")
    print(f"Starting two tandemd daemons on loopback, state in {root} ...")
    for node in NODES:
        _wait_healthy(root, node, _start_daemon(root, node))
        print(f"  {node.name}: {node.url} (log: {root / node.name / 'tandemd.log'})")
    first, second = NODES
    result = Client(first.url).request("POST", "/api/v1/apply", {"items": [r.to_dict() for r in resources]})
    print(f"\nApplied {len(resources)} resources on {first.name}:")
    for item in result["results"]:
        print(f"  {item['kind'].lower()}/{item['name']} {item['action']}")
    expected = {(i["kind"], i["name"]): i["resourceVersion"] for i in result["results"]}
    _wait_synced(second, expected)
    modules = Client(second.url).get("/api/v1/modules")["items"]
    print(f"\n$ TANDEM_SERVER={second.url} tandem get modules")
    print(table("Module", modules))
    print(
        "\nBoth daemons hold the same resources at the same resourceVersion. Try:\n"
        f"  TANDEM_SERVER={first.url} tandem get all -o wide\n"
        f"  TANDEM_SERVER={second.url} tandem describe module notes\n"
        f"  kill -TERM $(cat {root / second.name / 'demo.pid'}); edit and apply a manifest on node1; "
        "run `tandem demo` again and see node2 catch up\n"
        "  tandem demo --down          # stop both daemons and remove the demo's state"
    )
    return 0


def down(root: Path) -> int:
    """Stop the demo's daemons by their recorded PIDs and remove its state."""
    root = root.resolve()
    pids = _pids(root)
    for name, pid in pids.items():
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
            print(f"stopped {name} (pid {pid})")
    if root.is_dir():
        shutil.rmtree(root)
        print(f"removed {root}")
    elif not pids:
        print(f"no demo in {root}")
    return 0
