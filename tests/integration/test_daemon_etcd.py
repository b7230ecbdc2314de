"""Two daemons on one real etcd: `--store etcd://...` is configuration, not code."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.daemons import Daemon, free_port, inert_manifest, tandem, wait_for
from tests.integration.etcd_server import EtcdServer

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.etcd]


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


def test_an_apply_through_one_daemon_is_read_through_the_other(etcd: EtcdServer, tmp_path: Path) -> None:
    url = f"{etcd.url}/tandem-e2e"
    daemons = [
        Daemon(name, tmp_path / name, free_port(), address=address, store=url)
        for name, address in (("node1", "127.0.0.1"), ("node2", "127.0.0.2"))
    ]
    try:
        for daemon in daemons:
            daemon.start()
        first, second = daemons
        cluster = {
            "apiVersion": "tandem.dev/v1alpha1",
            "kind": "Cluster",
            "metadata": {"name": "test"},
            "spec": {
                "networks": ["lan"],
                "nodes": [{"name": d.node, "addresses": {"lan": d.address}, "apiPort": d.port} for d in daemons],
            },
        }
        (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster))
        notes = tmp_path / "notes.yaml"
        notes.write_text(inert_manifest(ROOT / "manifests/notes-sqlite/module.yaml"))
        out = tandem("apply", "-f", str(tmp_path / "cluster.yaml"), "-f", str(notes), server=first.url).stdout
        assert "module/notes created" in out

        def read(daemon: Daemon) -> dict[str, object]:
            return yaml.safe_load(tandem("get", "module", "notes", "-o", "yaml", server=daemon.url).stdout)

        # one store: the same object at the same resourceVersion, once both daemons wrote their status entry
        wait_for(
            "both daemons to read the same module with both status entries",
            lambda: (a := read(first)) == read(second) and len(a.get("status", {}).get("nodes", {})) == 2,
        )
        second.stop()
        tandem("delete", "checker", "notes-http", server=first.url)
        second.start()
        assert second.get_or_none("/api/v1/checkers/notes-http") is None
        etcd.pause()
        refused = tandem("get", "modules", server=first.url, check=False)
        assert refused.returncode == 1 and "etcd at" in refused.stderr and "retry later" in refused.stderr
        etcd.resume()
        wait_for("the store to answer again", lambda: "notes" in tandem("get", "modules", server=first.url).stdout)
    finally:
        for daemon in daemons:
            daemon.stop(signal.SIGKILL)
