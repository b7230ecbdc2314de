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
from controller.resources import Module, Resource, VirtualIP
from controller.resources.kinds import Scripts
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


DEFAULT_PORTS = (9011, 9012)
START_DEADLINE = 20.0


def demo_nodes(ports: tuple[int, int] = DEFAULT_PORTS) -> tuple[DemoNode, DemoNode]:
    return DemoNode("node1", "127.0.0.1", ports[0]), DemoNode("node2", "127.0.0.2", ports[1])


class DemoError(Exception):
    """The demo cannot start or stop; the message says what to do."""


def cluster_manifest(nodes: tuple[DemoNode, ...]) -> dict[str, object]:
    return {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "Cluster",
        "metadata": {"name": "demo"},
        "spec": {
            "networks": ["lan"],
            "nodes": [{"name": n.name, "addresses": {"lan": n.address}, "apiPort": n.port} for n in nodes],
        },
    }


def _example_resources(root: Path, manifests: Path, nodes: tuple[DemoNode, ...]) -> list[Resource]:
    """The examples on the demo's own loopback Cluster, without anything that would act on this host.

    Both daemons run on this machine, not in a lab: a virtual IP would land on its real interface
    and the examples' scripts would start its services. So the demo keeps the modules and their
    roles, heartbeats and health URLs, and leaves out the addresses, scripts and process watches.
    """
    cluster_file = root / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump(cluster_manifest(nodes), sort_keys=False))
    examples = [p for p in sorted(manifests.iterdir()) if p.name != "cluster.yaml"]
    resources = load([cluster_file, *examples], state_dir=str(root))
    return [_inert(r) for r in resources if not isinstance(r, VirtualIP)]


def _inert(resource: Resource) -> Resource:
    if not isinstance(resource, Module):
        return resource
    spec = resource.spec.model_copy(update={"scripts": Scripts(), "processes": []})
    return resource.model_copy(update={"spec": spec})


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _pids(root: Path) -> dict[str, int]:
    pids = {}
    for pidfile in sorted(root.glob("*/demo.pid")):
        pids[pidfile.parent.name] = int(pidfile.read_text().strip())
    return pids


def _daemon_command(root: Path, node: DemoNode) -> list[str]:
    return [
        sys.executable,
        "-m",
        "controller.cli",
        "node",
        "run",
        "--node",
        node.name,
        "--state-dir",
        str(root / node.name),
        "--listen",
        f"{node.address}:{node.port}",
    ]


def _restart_command(root: Path, node: DemoNode) -> str:
    return " ".join(["tandem", *_daemon_command(root, node)[3:]]) + f" >> {root / node.name / 'daemon.out'} 2>&1 &"


def _start_daemon(root: Path, node: DemoNode) -> int:
    state = root / node.name
    state.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / "cluster.key", state / "cluster.key")
    (state / "cluster.key").chmod(0o600)
    cmd = _daemon_command(root, node)
    with open(state / "daemon.out", "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    (state / "demo.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def _wait_healthy(root: Path, node: DemoNode, pid: int) -> None:
    deadline = time.monotonic() + START_DEADLINE
    client = Client(node.url, timeout=1.0)
    while time.monotonic() < deadline:
        if not pid_alive(pid):
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


def up(root: Path, *, manifests: Path, ports: tuple[int, int] = DEFAULT_PORTS) -> int:
    """Start the demo, apply the examples on node1, show them as node2 sees them."""
    nodes = demo_nodes(ports)
    root = root.resolve()
    running = {name: pid for name, pid in _pids(root).items() if pid_alive(pid)}
    if running:
        raise DemoError(f"the demo already runs in {root} (pids {running}): `tandem demo --down` first")
    root.mkdir(parents=True, exist_ok=True)
    (root / "ports").write_text(f"{ports[0]},{ports[1]}\n")
    resources = _example_resources(root, manifests, nodes)
    if not (root / "cluster.key").exists():
        generate_key(root / "cluster.key")
    print(f"Starting two tandemd daemons on loopback, state in {root} ...")
    try:
        for node in nodes:
            _wait_healthy(root, node, _start_daemon(root, node))
            print(f"  {node.name}: {node.url} (log: {root / node.name / 'tandemd.log'})")
        first, second = nodes
        result = Client(first.url).request("POST", "/api/v1/apply", {"items": [r.to_dict() for r in resources]})
        print(f"\nApplied {len(resources)} resources on {first.name}:")
        for item in result["results"]:
            print(f"  {item['kind'].lower()}/{item['name']} {item['action']}")
        _wait_synced(second, {(i["kind"], i["name"]): i["resourceVersion"] for i in result["results"]})
    except (DemoError, ClientError) as exc:
        _stop_daemons(root)
        raise DemoError(f"{exc} (the daemons' logs are in {root})") from None
    modules = Client(second.url).get("/api/v1/modules")["items"]
    print(f"\n$ TANDEM_SERVER={second.url} tandem get modules")
    print(table("Module", modules))
    print("\n(On loopback the demo leaves out the examples' virtual IPs and scripts, which would act on this "
          "host;\n modules still elect a primary over heartbeats: see `tandem status`.)")
    tandem = _tandem_command()
    print(
        "\nBoth daemons hold the same resources at the same resourceVersion. Try:\n"
        f"  TANDEM_SERVER={first.url} {tandem} get all -o wide\n"
        f"  TANDEM_SERVER={second.url} {tandem} describe module notes\n"
        f"  TANDEM_SERVER={first.url} {tandem} status\n"
        f"  {tandem} demo --stop node2                                  # node2 goes down\n"
        f"  TANDEM_SERVER={first.url} {tandem} delete checker notes-http   # a change while it is away\n"
        f"  {tandem} demo --start node2                                 # node2 returns and catches up\n"
        f"  TANDEM_SERVER={second.url} {tandem} get checkers\n"
        f"  {tandem} demo --down                                        # stop both, remove the demo's state"
    )
    return 0


def _tandem_command() -> str:
    """How the user can call this CLI: plain `tandem` if that is on PATH, else its full path."""
    here = Path(sys.executable).parent / "tandem"
    found = shutil.which("tandem")
    if found and (not here.exists() or Path(found).resolve() == here.resolve()):
        return "tandem"
    return str(here) if here.exists() else f"{sys.executable} -m controller.cli"


def _saved_nodes(root: Path) -> tuple[DemoNode, DemoNode]:
    try:
        first, second = (int(p) for p in (root / "ports").read_text().split(","))
    except (OSError, ValueError):
        raise DemoError(f"no demo in {root}: start one with `tandem demo`") from None
    return demo_nodes((first, second))


def stop_node(root: Path, name: str) -> int:
    """Stop one demo node's daemon, keeping its state, as a crash or maintenance would."""
    root = root.resolve()
    node = _demo_node(root, name)
    _stop_daemons(root, only=node.name)
    return 0


def start_node(root: Path, name: str) -> int:
    """Start a stopped demo node's daemon again; it catches up with what changed meanwhile."""
    root = root.resolve()
    node = _demo_node(root, name)
    pid = _pids(root).get(node.name)
    if pid is not None and pid_alive(pid):
        raise DemoError(f"{node.name} already runs (pid {pid})")
    _wait_healthy(root, node, _start_daemon(root, node))
    print(f"started {node.name} on {node.url}")
    return 0


def _demo_node(root: Path, name: str) -> DemoNode:
    nodes = {n.name: n for n in _saved_nodes(root)}
    if name not in nodes:
        raise DemoError(f"the demo has no node {name!r}: it has {', '.join(nodes)}")
    return nodes[name]


def _stop_daemons(root: Path, *, only: str | None = None) -> None:
    for name, pid in _pids(root).items():
        if only is not None and name != only:
            continue
        if pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
            print(f"stopped {name} (pid {pid})")
        (root / name / "demo.pid").unlink()


def down(root: Path) -> int:
    """Stop the demo's daemons by their recorded PIDs and remove its state."""
    root = root.resolve()
    if not root.is_dir():
        print(f"no demo in {root}")
        return 0
    _stop_daemons(root)
    shutil.rmtree(root)
    print(f"removed {root}")
    return 0
