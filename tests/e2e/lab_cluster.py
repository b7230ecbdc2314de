"""A Tandem cluster in the network-namespace lab: real daemons, a sample app, a client host."""

from __future__ import annotations

import json
import signal
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from agent.lab import Lab, LabProcess
from controller.daemon import command_line
from tests.daemons import wait_for

API_PORT = 9010
APP_PORT = 8080

# The sample application: a tiny HTTP server answering with the node it runs on.
START_APP = textwrap.dedent(
    """\
    mkdir -p {www}/$TANDEM_NODE && echo $TANDEM_NODE > {www}/$TANDEM_NODE/index.html
    {python} -m http.server {port} --bind 0.0.0.0 --directory {www}/$TANDEM_NODE > /dev/null 2>&1 &
    echo $! > {www}/$TANDEM_NODE.pid
    """
)
STOP_APP = "kill $(cat {www}/$TANDEM_NODE.pid) && rm -f {www}/$TANDEM_NODE.pid"


class LabCluster:
    """Two tandemd nodes in a lab on two networks, a client host, and the module `app` with a VIP."""

    def __init__(self, lab: Lab, work: Path, *, pulse: str = "100ms", timeout: str = "1s") -> None:
        self.lab, self.work, self.pulse, self.timeout = lab, work, pulse, timeout
        self.www = work / "www"
        self.vip = lab.network("lan").address(250)
        self.daemons: dict[str, LabProcess] = {}

    def url(self, node: str, path: str = "") -> str:
        return f"http://{self.lab[node].address('lan')}:{API_PORT}{path}"

    def manifests(self, **module: Any) -> Path:
        """The Cluster, the module `app` (spec fields in ``module`` override the defaults) and its VIP."""
        nodes = [
            {"name": n.name, "addresses": {net: n.address(net) for net in ("lan", "backup")}} for n in self.lab.nodes
        ]
        fmt = {"www": self.www, "python": sys.executable, "port": APP_PORT}
        docs: list[dict[str, Any]] = [
            {"kind": "Cluster", "metadata": {"name": "lab"}, "spec": {"networks": ["lan", "backup"], "nodes": nodes}},
            {
                "kind": "Module",
                "metadata": {"name": "app"},
                "spec": {
                    "nodes": ["node1", "node2"],
                    "preferredPrimary": "node1",
                    "bootStart": True,
                    "heartbeat": {"pulse": self.pulse, "timeout": self.timeout},
                    "scripts": {
                        "startPrim": START_APP.format(**fmt),
                        "stopPrim": STOP_APP.format(**fmt),
                        **module.pop("scripts", {}),
                    },
                    "stopTimeouts": {"graceful": "5s", "force": "5s"},
                    **module,
                },
            },
            {
                "kind": "VirtualIP",
                "metadata": {"name": "app-vip"},
                "spec": {"module": "app", "address": f"{self.vip}/24"},
            },
        ]
        path = self.work / "cluster.yaml"
        path.write_text(yaml.safe_dump_all([{"apiVersion": "tandem.dev/v1alpha1", **d} for d in docs]))
        return path

    def start(self, node: str) -> None:
        state = self.work / node
        state.mkdir(parents=True, exist_ok=True)
        key = self.work / "cluster.key"
        if not key.exists():
            key.write_text("e2e" * 16 + "\n")
        (state / "cluster.key").write_text(key.read_text())
        cmd = command_line(node=node, state_dir=state, listen=f"{self.lab[node].address('lan')}:{API_PORT}")
        self.daemons[node] = self.lab[node].spawn(cmd, state / "daemon.out")
        wait_for(f"{node}'s daemon to answer", lambda: self.cli(node, "get", "clusters", check=False).returncode == 0)

    def kill(self, node: str) -> None:
        """SIGKILL the node's daemon and the app it started: a crash, not a stop."""
        self.daemons[node].signal(signal.SIGKILL)
        pidfile = self.www / f"{node}.pid"
        if pidfile.exists():
            self.lab[node].run(["kill", "-9", pidfile.read_text().strip()], check=False)

    def cli(self, node: str, *args: str, check: bool = True) -> Any:
        cmd = [sys.executable, "-m", "controller.cli", *args, "--server", self.url(node)]
        return self.lab[node].run(cmd, check=check, timeout=60)

    def status(self, via: str) -> dict[str, str]:
        rows = json.loads(self.cli(via, "status", "-o", "json").stdout)
        return {r["node"]: r["state"] for r in rows if r["module"] == "app"}

    def client_get(self, url: str) -> str | None:
        """One HTTP GET from the client host: the body, or None if it failed."""
        code = (
            f"import urllib.request, urllib.error, sys\n"
            f"try:\n    r = urllib.request.urlopen({url!r}, timeout=1)\n"
            f"    print(r.status, r.read().decode().strip())\n"
            f"except urllib.error.HTTPError as e:\n    print(e.code)\n"
            f"except OSError:\n    sys.exit(1)\n"
        )
        done = self.lab["client"].run([sys.executable, "-c", code], check=False, timeout=15)
        return done.stdout.strip() if done.returncode == 0 else None

    def app_answer(self) -> str | None:
        return self.client_get(f"http://{self.vip}:{APP_PORT}/")


@contextmanager
def lab_cluster(work: Path, **kw: Any) -> Iterator[LabCluster]:
    with Lab("tlab-", nodes=["node1", "node2"], networks=["lan", "backup"], client=True) as lab:
        cluster = LabCluster(lab, work, **kw)
        yield cluster
