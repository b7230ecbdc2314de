"""Two real daemons on loopback keep their embedded stores in step, and one that was down catches up."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.daemons import Daemon, free_port, inert_manifest, tandem, wait_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

ADDRESSES = {"node1": "127.0.0.1", "node2": "127.0.0.2"}


def cluster(ports: dict[str, int]) -> dict[str, Any]:
    return {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "Cluster",
        "metadata": {"name": "test"},
        "spec": {
            "networks": ["lan"],
            "nodes": [
                {"name": name, "addresses": {"lan": ADDRESSES[name]}, "apiPort": port} for name, port in ports.items()
            ],
        },
    }


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon, Path]]:
    ports = {"node1": free_port(), "node2": free_port()}
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "cluster.yaml").write_text(yaml.safe_dump(cluster(ports)))
    (manifests / "notes.yaml").write_text(inert_manifest(ROOT / "manifests/notes-sqlite/module.yaml"))
    daemons = [Daemon(name, tmp_path / name, port, address=ADDRESSES[name]) for name, port in ports.items()]
    try:
        for daemon in daemons:
            daemon.start()
        yield daemons[0], daemons[1], manifests
    finally:
        for daemon in daemons:
            daemon.stop(signal.SIGKILL)


def version_on(daemon: Daemon, plural: str, name: str) -> str | None:
    item = daemon.get_or_none(f"/api/v1/{plural}/{name}")
    return item["metadata"]["resourceVersion"] if item else None


def test_an_apply_on_one_node_shows_on_the_other_with_the_same_resource_version(
    pair: tuple[Daemon, Daemon, Path],
) -> None:
    node1, node2, manifests = pair
    out = tandem("apply", "-f", str(manifests), server=node1.url).stdout
    assert "module/notes created" in out and "cluster/test created" in out

    def both() -> tuple[dict[str, Any], dict[str, Any]]:
        return tuple(  # type: ignore[return-value]
            yaml.safe_load(tandem("get", "module", "notes", "-o", "yaml", server=n.url).stdout) for n in (node1, node2)
        )

    # Each daemon also writes its own entry in the module's status, so the object moves for a moment
    # after the apply; once both entries are in, both nodes hold it at the same resourceVersion.
    on_node1, on_node2 = wait_for(
        "both nodes to hold the same module notes with both status entries",
        lambda: (pair := both())[0] == pair[1] and len(pair[0].get("status", {}).get("nodes", {})) == 2 and pair,
    )
    assert on_node2["metadata"]["resourceVersion"] == on_node1["metadata"]["resourceVersion"]
    assert on_node2["spec"]["nodes"] == ["node1", "node2"]
    again = tandem("apply", "-f", str(manifests), server=node2.url).stdout
    assert again.count("unchanged") == 6 and "created" not in again


def test_a_node_that_was_down_catches_up_when_it_returns(pair: tuple[Daemon, Daemon, Path]) -> None:
    node1, node2, manifests = pair
    tandem("apply", "-f", str(manifests), server=node1.url)
    wait_for("node2 to hold module notes", lambda: version_on(node2, "modules", "notes"))
    node2.stop()
    module = yaml.safe_load((manifests / "cluster.yaml").read_text())  # keep the file set intact
    assert module["kind"] == "Cluster"
    changed = manifests.parent / "changed.yaml"
    docs = list(yaml.safe_load_all((manifests / "notes.yaml").read_text()))
    docs[0]["spec"]["autoSwap"] = True
    changed.write_text(yaml.safe_dump(docs[0]))
    assert "module/notes configured" in tandem("apply", "-f", str(changed), server=node1.url).stdout
    tandem("delete", "checker", "notes-http", server=node1.url)
    node2.start()
    wait_for(
        "node2 to catch up",
        lambda: (
            version_on(node2, "modules", "notes") == version_on(node1, "modules", "notes")
            and node2.get("/api/v1/modules/notes")["spec"]["autoSwap"]
        ),
    )
    assert node2.get("/api/v1/modules/notes")["spec"]["autoSwap"] is True
    assert node2.get_or_none("/api/v1/checkers/notes-http") is None  # the deletion reached it too


def test_changes_flow_both_ways_and_the_newest_wins(pair: tuple[Daemon, Daemon, Path]) -> None:
    node1, node2, manifests = pair
    tandem("apply", "-f", str(manifests), server=node1.url)
    wait_for("node2 to hold module notes", lambda: version_on(node2, "modules", "notes"))
    node1.stop()
    vip = node2.get("/api/v1/virtualips/notes-vip")
    vip["spec"]["address"] = "192.0.2.150/24"
    (manifests.parent / "vip.yaml").write_text(yaml.safe_dump(vip))
    tandem("apply", "-f", str(manifests.parent / "vip.yaml"), server=node2.url)
    node1.start()
    wait_for(
        "node1 to take node2's change",
        lambda: node1.get("/api/v1/virtualips/notes-vip")["spec"]["address"] == "192.0.2.150/24",
    )
    assert version_on(node1, "virtualips", "notes-vip") == version_on(node2, "virtualips", "notes-vip")


def test_with_a_cluster_key_a_peer_with_another_key_is_refused(tmp_path: Path) -> None:
    ports = {"node1": free_port(), "node2": free_port()}
    for name, key in (("node1", "a" * 64), ("node2", "b" * 64)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cluster.key").write_text(key + "\n")
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster(ports)))
    daemons = [Daemon(name, tmp_path / name, port, address=ADDRESSES[name]) for name, port in ports.items()]
    try:
        for daemon in daemons:
            daemon.start()
        tandem("apply", "-f", str(tmp_path / "cluster.yaml"), server=daemons[0].url)
        wait_for("node1 to report the refusal", lambda: "Store sync with peer failed" in daemons[0].output())
        assert "signature does not match the cluster key" in daemons[1].output()
        assert daemons[1].get("/api/v1/clusters")["items"] == []
    finally:
        for daemon in daemons:
            daemon.stop(signal.SIGKILL)
