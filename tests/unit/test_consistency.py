"""Cross-resource rules: references exist, paths do not overlap, addresses do not collide."""

from typing import Any

from controller.resources import KINDS, Resource
from controller.resources.consistency import check_consistency


def res(kind: str, name: str, **spec: Any) -> Resource:
    return KINDS[kind].model_validate({"kind": kind, "metadata": {"name": name}, "spec": spec})


CLUSTER = res(
    "Cluster",
    "c",
    networks=["lan"],
    nodes=[{"name": "n1", "addresses": {"lan": "192.0.2.1"}}, {"name": "n2", "addresses": {"lan": "192.0.2.2"}}],
)
APP = res("Module", "app", nodes=["n1", "n2"])


def messages(resources: list[Resource], **kw: Any) -> list[str]:
    return [f"{'/'.join(f.key)} {f.field}: {f.message}" for f in check_consistency(resources, **kw)]


def test_a_consistent_set_has_no_findings() -> None:
    rdir = res("ReplicatedDir", "d", module="app", path="/srv/app")
    vip = res("VirtualIP", "v", module="app", address="192.0.2.100/24")
    assert messages([CLUSTER, APP, rdir, vip]) == []


def test_module_nodes_and_networks_must_be_the_clusters() -> None:
    bad = res("Module", "bad", nodes=["n1", "n9"], heartbeat={"networks": ["wan"]})
    assert messages([CLUSTER, bad]) == [
        "Module/bad spec.nodes[1]: node 'n9' is not a node of Cluster 'c'",
        "Module/bad spec.heartbeat.networks[0]: network 'wan' is not in Cluster 'c'",
    ]
    assert messages([APP]) == ["Module/app spec.nodes: no Cluster resource declares the nodes this module names"]


def test_there_is_one_cluster() -> None:
    other = res("Cluster", "d", networks=["lan"], nodes=[{"name": "n1", "addresses": {"lan": "192.0.2.1"}}])
    assert messages([CLUSTER, other, APP]) == [
        "Cluster/d metadata.name: there is one Cluster per installation and 'c' is it"
    ]


def test_replicated_dirs_do_not_overlap_each_other_the_state_dir_or_kernel_trees() -> None:
    dirs = [
        res("ReplicatedDir", "a", module="app", path="/srv/app"),
        res("ReplicatedDir", "b", module="app", path="/srv/app"),
        res("ReplicatedDir", "c", module="app", path="/srv"),
        res("ReplicatedDir", "s", module="app", path="/var/lib/tandem/x"),
        res("ReplicatedDir", "p", module="app", path="/proc/sys"),
        res("ReplicatedDir", "ok", module="app", path="/srv2"),
    ]
    assert messages([CLUSTER, APP, *dirs], state_dir="/var/lib/tandem") == [
        "ReplicatedDir/s spec.path: /var/lib/tandem/x overlaps Tandem's state directory /var/lib/tandem",
        "ReplicatedDir/p spec.path: /proc/sys overlaps /proc, which the kernel provides",
        "ReplicatedDir/b spec.path: /srv/app is already replicated by ReplicatedDir 'a'",
        "ReplicatedDir/a spec.path: /srv/app is nested in /srv (ReplicatedDir 'c')",
        "ReplicatedDir/b spec.path: /srv/app is nested in /srv (ReplicatedDir 'c')",
    ]


def test_a_farm_module_has_no_replicated_dirs() -> None:
    farm = res("Module", "farm", mode="farm", nodes=["n1", "n2"])
    assert messages([CLUSTER, farm, res("ReplicatedDir", "d", module="farm", path="/srv")]) == [
        "ReplicatedDir/d spec.module: Module 'farm' is a farm: only mirror modules replicate"
    ]


def test_a_virtual_ip_is_neither_a_node_address_nor_another_vip() -> None:
    vips = [
        res("VirtualIP", "v1", module="app", address="192.0.2.1/24"),
        res("VirtualIP", "v2", module="app", address="192.0.2.100/24"),
        res("VirtualIP", "v3", module="app", address="192.0.2.100/25"),
        res("VirtualIP", "v4", module="nope", address="192.0.2.101/24"),
    ]
    assert messages([CLUSTER, APP, *vips]) == [
        "VirtualIP/v1 spec.address: 192.0.2.1 is node 'n1''s own address",
        "VirtualIP/v3 spec.address: 192.0.2.100 is already VirtualIP 'v2''s address",
        "VirtualIP/v4 spec.module: Module 'nope' does not exist",
    ]


def test_checker_references() -> None:
    checkers = [
        res("Checker", "self", module="app", type="module", targetModule="app"),
        res("Checker", "gone", module="app", type="module", targetModule="db"),
        res("Checker", "orphan", module="db", type="ping", host="192.0.2.1"),
    ]
    assert messages([CLUSTER, APP, *checkers]) == [
        "Checker/self spec.targetModule: a module cannot depend on itself",
        "Checker/gone spec.targetModule: Module 'db' does not exist",
        "Checker/orphan spec.module: Module 'db' does not exist",
    ]
