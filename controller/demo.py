"""`tandem demo`: a two-node cluster in a network-namespace lab, serving a sample app through a VIP.

The lab (agent/lab.py) gives each node its own network and mount namespace on two networks, plus a
client host; nothing touches this machine's own interfaces. Each node runs a real tandemd on the
embedded store; the module `notes` runs the sample app (controller/demoapp.py, SQLite under
/var/lib/tandem-demo/notes, a path each node has its own copy of, kept equal by replication) and
follows the VIP. The demo
leaves the lab running and records it in ``<root>/demo.json``; the other verbs drive it from there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from agent.lab import Lab, LabError, remove_lab
from controller.daemon import command_line
from controller.secret import generate_key

PREFIX = "tdemo-"
NODES = ("node1", "node2")
API_PORT, APP_PORT = 9010, 8080
APP_DIR = "/var/lib/tandem-demo/notes"
DEADLINE = 30.0


class DemoError(Exception):
    """The demo cannot do what was asked; the message says what to do."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _manifests(lab: Lab, root: Path, vip: str) -> list[dict[str, Any]]:
    nodes = [{"name": n.name, "addresses": {net: n.address(net) for net in ("lan", "backup")}} for n in lab.nodes]
    app = f"{sys.executable} -m controller.demoapp --db {APP_DIR}/notes.db --port {APP_PORT}"
    pidfile = f"{root}/$TANDEM_NODE.app.pid"
    docs = [
        {"kind": "Cluster", "metadata": {"name": "demo"}, "spec": {"networks": ["lan", "backup"], "nodes": nodes}},
        {
            "kind": "Module",
            "metadata": {"name": "notes"},
            "spec": {
                "nodes": list(NODES),
                "preferredPrimary": "node1",
                "bootStart": True,
                "heartbeat": {"pulse": "200ms", "timeout": "2s"},
                "scripts": {
                    "startPrim": f"nohup {app} > /dev/null 2>&1 & echo $! > {pidfile}",
                    "stopPrim": f"kill $(cat {pidfile}) && rm -f {pidfile}",
                },
                "stopTimeouts": {"graceful": "10s", "force": "5s"},
            },
        },
        {"kind": "VirtualIP", "metadata": {"name": "notes-vip"}, "spec": {"module": "notes", "address": f"{vip}/24"}},
        {"kind": "ReplicatedDir", "metadata": {"name": "notes-data"}, "spec": {"module": "notes", "path": APP_DIR}},
    ]
    return [{"apiVersion": "tandem.dev/v1alpha1", **d} for d in docs]


class Demo:
    """A running demo: its lab, its root directory, its daemons."""

    def __init__(self, root: Path, lab: Lab, record: dict[str, Any]) -> None:
        self.root, self.lab, self.record = root, lab, record

    @classmethod
    def load(cls, root: Path) -> Demo:
        try:
            record = json.loads((root / "demo.json").read_text())
        except (OSError, ValueError):
            raise DemoError(f"no demo in {root}: start one with `tandem demo`") from None
        try:
            lab = Lab.attach(record["lab"])
        except LabError as exc:
            raise DemoError(
                f"the demo in {root} is not running ({exc}): `tandem demo --down` removes what is left"
            ) from None
        return cls(root, lab, record)

    def save(self) -> None:
        (self.root / "demo.json").write_text(json.dumps(self.record, indent=2))

    def url(self, node: str) -> str:
        return f"http://{self.lab[node].address('lan')}:{API_PORT}"

    def cli(self, node: str, *args: str, check: bool = True) -> str:
        cmd = [sys.executable, "-m", "controller.cli", *args, "--server", self.url(node)]
        done = self.lab[node].run(cmd, check=False, timeout=60)
        if check and done.returncode:
            raise DemoError(f"tandem {' '.join(args)} on {node}: {done.stderr.strip()}")
        return done.stdout

    def start_daemon(self, node: str) -> None:
        state = self.root / node
        cmd = command_line(node=node, state_dir=state, listen=f"{self.lab[node].address('lan')}:{API_PORT}")
        self.record["daemons"][node] = self.lab[node].spawn(cmd, state / "daemon.out").pid
        self.save()
        _wait(f"{node}'s daemon to answer", lambda: self.answers(node))

    def answers(self, node: str) -> bool:
        cmd = [sys.executable, "-m", "controller.cli", "get", "clusters", "--server", self.url(node)]
        return self.lab[node].run(cmd, check=False, timeout=30).returncode == 0

    def status(self) -> list[dict[str, Any]]:
        for node in NODES:
            if self.lab[node].run(["true"], check=False).returncode == 0 and pid_alive(self.record["daemons"][node]):
                out = self.cli(node, "status", "-o", "json", check=False)
                if out:
                    rows: list[dict[str, Any]] = json.loads(out)
                    return rows
        return []

    def client(self, note: str | None = None) -> str:
        """One request through the VIP from the client host (a POST when ``note`` is given)."""
        url = f"http://{self.record['vip']}:{APP_PORT}/" + ("notes" if note is not None else "")
        data = "None" if note is None else repr(note.encode())
        code = (
            "import urllib.request\n"
            f"req = urllib.request.Request({url!r}, data={data})\n"
            "try:\n    print(urllib.request.urlopen(req, timeout=2).read().decode().strip())\n"
            "except OSError as exc:\n    print(f'no answer through the VIP: {exc}')\n"
        )
        return self.lab["client"].run([sys.executable, "-c", code], check=False, timeout=15).stdout.strip()


def _wait(what: str, probe: Any, timeout: float = DEADLINE) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")


def up(root: Path) -> int:
    """Build the lab, start both daemons, apply the demo's resources, wait for PRIM and SECOND."""
    root = root.resolve()
    if (root / "demo.json").exists():
        raise DemoError(f"a demo is recorded in {root}: `tandem demo --down` first")
    root.mkdir(parents=True, exist_ok=True)
    lab = Lab(PREFIX, nodes=NODES, networks=["lan", "backup"], client=True).up()
    demo = Demo(root, lab, {"lab": lab.name, "vip": lab.network("lan").address(250), "daemons": {}})
    try:
        demo.save()
        lab.private_path(APP_DIR)
        generate_key(root / "cluster.key")
        for node in NODES:
            (root / node).mkdir()
            shutil.copyfile(root / "cluster.key", root / node / "cluster.key")
            demo.start_daemon(node)
        (root / "demo.yaml").write_text(yaml.safe_dump_all(_manifests(lab, root, demo.record["vip"]), sort_keys=False))
        print(demo.cli("node1", "apply", "-f", str(root / "demo.yaml")), end="")
        _wait("node1 PRIM and node2 SECOND", lambda: _states(demo) == {"node1": "PRIM", "node2": "SECOND"})
    except BaseException:
        lab.down()
        shutil.rmtree(root, ignore_errors=True)
        raise
    print(f"\nA two-node cluster runs in lab {lab.name} (state and logs in {root}):\n")
    print(demo.cli("node1", "status"))
    print(f"Through the VIP {demo.record['vip']}, from the client host: {demo.client('hello')}")
    _instructions()
    return 0


def _states(demo: Demo) -> dict[str, str]:
    return {r["node"]: r["state"] for r in demo.status() if r["module"] == "notes"}


def _tandem() -> str:
    """How the user calls this CLI: `tandem` when that is on PATH and is this one, else its full path."""
    here = Path(sys.executable).with_name("tandem")
    found = shutil.which("tandem")
    if found and (not here.exists() or Path(found).resolve() == here.resolve()):
        return "tandem"
    return str(here) if here.exists() else f"{sys.executable} -m controller.cli"


def _instructions() -> None:
    t = f"{_tandem()} demo"
    print(
        "\nTry:\n"
        f"  {t} --client [TEXT]     # one request through the VIP (TEXT: add a note)\n"
        f"  {t} --status            # tandem status, from a node\n"
        f"  {t} --crash node1       # SIGKILL node1's tandemd and app, pull its cables: node2 takes over\n"
        f"  {t} --restore node1     # plug node1 back and start its daemon: it returns as SECOND\n"
        f"  {t} --swap              # give the primary role back to the other node\n"
        f"  {t} --down              # remove the lab and everything in it\n"
        "Every note a client got an OK for is on both nodes: after --crash node1, node2 answers with them all."
    )


def act(root: Path, verb: str, node: str | None = None, text: str | None = None) -> int:
    """One of --client, --status, --crash, --restore, --swap on a running demo."""
    demo = Demo.load(root.resolve())
    if verb == "client":
        print(demo.client(text))
    elif verb == "status":
        rows = demo.status()
        print(
            demo.cli(next(r["node"] for r in rows if r["node"]) if rows else "node2", "status")
            if rows
            else "no daemon answers"
        )
    elif verb == "crash":
        node = _node(node)
        os.kill(demo.record["daemons"][node], signal.SIGKILL)
        app = root.resolve() / f"{node}.app.pid"
        if app.exists():
            demo.lab[node].run(["kill", "-9", app.read_text().strip()], check=False)
        demo.lab.isolate(node)
        print(f"{node}: tandemd and the app killed, cables pulled. Watch: {_tandem()} demo --status")
    elif verb == "restore":
        node = _node(node)
        demo.lab.heal(node)
        if pid_alive(demo.record["daemons"][node]):
            raise DemoError(f"{node}'s daemon still runs")
        demo.start_daemon(node)
        print(f"{node}: cables back, tandemd started; it resyncs and joins as SECOND. Watch: {_tandem()} demo --status")
    elif verb == "swap":
        print(demo.cli("node1", "swap", "notes"), end="")
    return 0


def _node(node: str | None) -> str:
    if node not in NODES:
        raise DemoError(f"name a node of the demo: {', '.join(NODES)}")
    return node


def down(root: Path) -> int:
    """Remove the demo's lab (its processes, namespaces, mounts) and its state."""
    root = root.resolve()
    try:
        name = json.loads((root / "demo.json").read_text())["lab"]
    except (OSError, ValueError, KeyError):
        name = None
    if name is not None:
        remove_lab(name)
        print(f"removed lab {name}")
    if root.exists():
        shutil.rmtree(root)
        print(f"removed {root}")
    elif name is None:
        print(f"no demo in {root}")
    return 0
