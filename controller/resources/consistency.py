"""Rules that span resources: references exist, paths do not overlap, addresses do not collide.

Pure: a list of resources in, a list of findings out. ``tandem validate`` runs it over the files it
is given; the daemon runs it over the store's content plus what is being applied.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from controller.resources.kinds import Checker, Cluster, Module, ReplicatedDir, VirtualIP
from controller.resources.meta import Resource

# Kernel-provided trees: replicating them would replicate the machine's own state, never the user's.
SYSTEM_TREES = ("/proc", "/sys", "/dev")


@dataclass(frozen=True)
class Finding:
    key: tuple[str, str]  # (kind, name) of the object the finding is about
    field: str
    message: str
    missing: tuple[str, str] | None = None  # for a dangling reference: the (kind, name) it names; name "*": any


def check_consistency(resources: Sequence[Resource], *, state_dir: str | None = None) -> list[Finding]:
    """Every cross-resource problem in the set, in a stable order."""
    clusters = [r for r in resources if isinstance(r, Cluster)]
    modules = {r.name: r for r in resources if isinstance(r, Module)}
    findings = _check_clusters(clusters)
    cluster = clusters[0] if clusters else None
    for module in modules.values():
        findings += _check_module(module, cluster)
    dirs = [r for r in resources if isinstance(r, ReplicatedDir)]
    findings += _check_dirs(dirs, modules, state_dir)
    findings += _check_vips([r for r in resources if isinstance(r, VirtualIP)], modules, cluster)
    for checker in (r for r in resources if isinstance(r, Checker)):
        findings += _check_checker(checker, modules)
    return findings


def _check_clusters(clusters: Sequence[Cluster]) -> list[Finding]:
    return [
        Finding(extra.key, "metadata.name", f"there is one Cluster per installation and {clusters[0].name!r} is it")
        for extra in clusters[1:]
    ]


def _check_module(module: Module, cluster: Cluster | None) -> list[Finding]:
    if cluster is None:
        return [
            Finding(
                module.key, "spec.nodes", "no Cluster resource declares the nodes this module names", ("Cluster", "*")
            )
        ]
    known = {n.name for n in cluster.spec.nodes}
    findings = [
        Finding(module.key, f"spec.nodes[{i}]", f"node {node!r} is not a node of Cluster {cluster.name!r}")
        for i, node in enumerate(module.spec.nodes)
        if node not in known
    ]
    for i, net in enumerate(module.spec.heartbeat.networks or []):
        if net not in cluster.spec.networks:
            findings.append(
                Finding(
                    module.key, f"spec.heartbeat.networks[{i}]", f"network {net!r} is not in Cluster {cluster.name!r}"
                )
            )
    return findings


def _module_ref(obj: Resource, module: str, modules: dict[str, Module]) -> list[Finding]:
    if module in modules:
        return []
    return [Finding(obj.key, "spec.module", f"Module {module!r} does not exist", ("Module", module))]


def _check_dirs(dirs: Sequence[ReplicatedDir], modules: dict[str, Module], state_dir: str | None) -> list[Finding]:
    findings = []
    for rdir in dirs:
        findings += _module_ref(rdir, rdir.spec.module, modules)
        owner = modules.get(rdir.spec.module)
        if owner is not None and owner.spec.mode != "mirror":
            findings.append(
                Finding(rdir.key, "spec.module", f"Module {owner.name!r} is a farm: only mirror modules replicate")
            )
        path = PurePosixPath(rdir.spec.path)
        for tree in SYSTEM_TREES:
            if _overlaps(path, PurePosixPath(tree)):
                findings.append(Finding(rdir.key, "spec.path", f"{path} overlaps {tree}, which the kernel provides"))
        if state_dir is not None and _overlaps(path, PurePosixPath(state_dir)):
            findings.append(Finding(rdir.key, "spec.path", f"{path} overlaps Tandem's state directory {state_dir}"))
    for i, a in enumerate(dirs):
        for b in dirs[i + 1 :]:
            pa, pb = PurePosixPath(a.spec.path), PurePosixPath(b.spec.path)
            if pa == pb:
                findings.append(Finding(b.key, "spec.path", f"{pb} is already replicated by ReplicatedDir {a.name!r}"))
            elif _overlaps(pa, pb):
                inner, outer = (a, b) if pa.is_relative_to(pb) else (b, a)
                findings.append(
                    Finding(
                        inner.key,
                        "spec.path",
                        f"{inner.spec.path} is nested in {outer.spec.path} (ReplicatedDir {outer.name!r})",
                    )
                )
    return findings


def _overlaps(a: PurePosixPath, b: PurePosixPath) -> bool:
    return a.is_relative_to(b) or b.is_relative_to(a)


def _check_vips(vips: Sequence[VirtualIP], modules: dict[str, Module], cluster: Cluster | None) -> list[Finding]:
    findings = []
    node_addresses = {}
    if cluster is not None:
        node_addresses = {
            ipaddress.ip_address(addr): node.name for node in cluster.spec.nodes for addr in node.addresses.values()
        }
    seen: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
    for vip in vips:
        findings += _module_ref(vip, vip.spec.module, modules)
        ip = ipaddress.ip_interface(vip.spec.address).ip
        if ip in node_addresses:
            findings.append(Finding(vip.key, "spec.address", f"{ip} is node {node_addresses[ip]!r}'s own address"))
        if ip in seen:
            findings.append(Finding(vip.key, "spec.address", f"{ip} is already VirtualIP {seen[ip]!r}'s address"))
        seen[ip] = vip.name
    return findings


def _check_checker(checker: Checker, modules: dict[str, Module]) -> list[Finding]:
    findings = _module_ref(checker, checker.spec.module, modules)
    target = checker.spec.target_module
    if target is not None:
        if target == checker.spec.module:
            findings.append(Finding(checker.key, "spec.targetModule", "a module cannot depend on itself"))
        elif target not in modules:
            findings.append(
                Finding(checker.key, "spec.targetModule", f"Module {target!r} does not exist", ("Module", target))
            )
    return findings
