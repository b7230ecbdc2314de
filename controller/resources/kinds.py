"""The five kinds of resource a Tandem cluster is described with, with SafeKit's defaults."""

from __future__ import annotations

import ipaddress
import posixpath
import re
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field, ValidationInfo, WithJsonSchema, field_validator, model_validator

from agent.replication.exclude import pattern_error
from controller.resources.durations import Duration, parse_duration
from controller.resources.meta import DnsLabel, Model, Resource, raise_problems

INTERFACE_PATTERN = r"^[^/\s:]{1,15}$"


def _check_ip(text: str) -> str:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 or IPv6 address") from None
    return text


def _check_cidr(text: str) -> str:
    if "/" not in text:
        raise ValueError(f"{text!r} is not an address in CIDR form (e.g. 192.0.2.10/24)")
    try:
        ipaddress.ip_interface(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a valid address in CIDR form (e.g. 192.0.2.10/24)") from None
    return text


def _check_absolute_path(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError(f"{text!r} is not an absolute path")
    if "\0" in text:
        raise ValueError("a path cannot contain a NUL byte")
    if text == "/":
        raise ValueError("the root directory '/' cannot be replicated")
    if posixpath.normpath(text) != text or text.startswith("//"):
        raise ValueError(f"{text!r} is not a normalized path (no '.', '..', '//' or trailing '/')")
    return text


def _check_interface(text: str) -> str:
    if not re.match(INTERFACE_PATTERN, text):
        raise ValueError(f"{text!r} is not a network interface name (1 to 15 characters, no '/', ':' or spaces)")
    return text


IPAddress = Annotated[str, AfterValidator(_check_ip), WithJsonSchema({"type": "string"})]
CIDR = Annotated[str, AfterValidator(_check_cidr), WithJsonSchema({"type": "string"})]
AbsolutePath = Annotated[
    str, AfterValidator(_check_absolute_path), WithJsonSchema({"type": "string", "pattern": "^/.+"})
]
InterfaceName = Annotated[
    str, AfterValidator(_check_interface), WithJsonSchema({"type": "string", "pattern": INTERFACE_PATTERN})
]
Port = Annotated[int, Field(ge=1, le=65535)]


# --- Cluster -----------------------------------------------------------------------------------------


class ClusterNode(Model):
    name: DnsLabel
    addresses: dict[str, IPAddress] = Field(description="network name -> this node's address on it")
    api_port: Port = Field(default=9010, description="port of this node's tandemd API")


class ClusterSpec(Model):
    networks: list[DnsLabel] = Field(min_length=1)
    nodes: list[ClusterNode] = Field(min_length=1)
    secret_file: AbsolutePath | None = Field(
        default=None, description="key shared by every node; default <state-dir>/cluster.key"
    )

    @model_validator(mode="after")
    def _nodes_fit_networks(self) -> ClusterSpec:
        problems: list[tuple[str, str]] = []
        if len(set(self.networks)) != len(self.networks):
            problems.append(("networks", "each network is listed once"))
        names = [n.name for n in self.nodes]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            problems.append(("nodes", f"node {dup!r} is listed more than once"))
        seen: dict[tuple[str, str], str] = {}
        for i, node in enumerate(self.nodes):
            for net in node.addresses:
                if net not in self.networks:
                    problems.append((f"nodes[{i}].addresses.{net}", f"network {net!r} is not in spec.networks"))
            for net in self.networks:
                if net not in node.addresses:
                    problems.append((f"nodes[{i}].addresses", f"node {node.name!r} has no address on network {net!r}"))
            for net, addr in node.addresses.items():
                key = (addr, str(node.api_port))
                if key in seen and seen[key] != node.name:
                    problems.append(
                        (f"nodes[{i}].addresses.{net}", f"{addr} port {node.api_port} is already node {seen[key]!r}'s")
                    )
                seen[key] = node.name
        raise_problems(problems)
        return self


class Cluster(Resource):
    KIND: ClassVar[str] = "Cluster"
    PLURAL: ClassVar[str] = "clusters"
    kind: Literal["Cluster"] = "Cluster"
    spec: ClusterSpec


# --- Module ------------------------------------------------------------------------------------------


class Heartbeat(Model):
    pulse: Duration = "700ms"
    timeout: Duration = "30s"
    networks: list[DnsLabel] | None = Field(default=None, description="default: every network of the Cluster")

    @model_validator(mode="after")
    def _timeout_covers_pulses(self) -> Heartbeat:
        if parse_duration(self.timeout) < 3 * parse_duration(self.pulse):
            raise ValueError(
                f"heartbeat.timeout ({self.timeout}) must be at least 3 x heartbeat.pulse ({self.pulse}), "
                "or one lost datagram would fail the module over"
            )
        return self


class Scripts(Model):
    """A value starting with '/' is an executable run with no arguments; anything else is /bin/sh -c."""

    prestart: str | None = None
    start_prim: str | None = None
    stop_prim: str | None = None
    start_both: str | None = None
    stop_both: str | None = None
    poststop: str | None = None


class StopTimeouts(Model):
    graceful: Duration = "300s"
    force: Duration = "300s"


class ProcessWatch(Model):
    name: str = Field(min_length=1, description="process name (comm) to watch")
    cmdline: str | None = Field(default=None, description="regular expression the command line must match")
    at_least: int = Field(default=1, ge=1)
    action: Literal["restart", "failover", "stop"] = "restart"
    class_: Literal["prim", "both"] = Field(default="prim", alias="class")

    @field_validator("cmdline")
    @classmethod
    def _cmdline_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"cmdline {value!r} is not a valid regular expression: {exc}") from None
        return value


class RestartPolicy(Model):
    max_loop: int = Field(default=3, ge=0)
    loop_interval: Duration = "24h"


class ModuleSpec(Model):
    mode: Literal["mirror", "farm"] = "mirror"
    nodes: list[DnsLabel] = Field(min_length=1, description="the module's nodes, in order of preference")
    preferred_primary: DnsLabel | None = None
    auto_swap: bool = False
    failover: bool = True
    heartbeat: Heartbeat = Field(default_factory=Heartbeat)
    scripts: Scripts = Field(default_factory=Scripts)
    stop_timeouts: StopTimeouts = Field(default_factory=StopTimeouts)
    processes: list[ProcessWatch] = Field(default_factory=list)
    restart: RestartPolicy = Field(default_factory=RestartPolicy)
    boot_start: bool = False

    @field_validator("nodes")
    @classmethod
    def _node_count(cls, nodes: list[str], info: ValidationInfo) -> list[str]:
        problems = []
        dups = sorted({n for n in nodes if nodes.count(n) > 1})
        if dups:
            problems.append(("", f"{', '.join(dups)} listed more than once"))
        if info.data.get("mode") == "mirror" and len(nodes) != 2:
            problems.append(("", f"a mirror module has exactly 2 nodes, this one has {len(nodes)}"))
        raise_problems(problems)
        return nodes

    @model_validator(mode="after")
    def _consistent(self) -> ModuleSpec:
        problems = []
        if self.preferred_primary is not None and self.preferred_primary not in self.nodes:
            problems.append(("preferredPrimary", f"{self.preferred_primary!r} is not one of the module's nodes"))
        if self.auto_swap and self.mode == "farm":
            problems.append(("autoSwap", "only a mirror module has a primary to swap"))
        raise_problems(problems)
        return self


class Module(Resource):
    KIND: ClassVar[str] = "Module"
    PLURAL: ClassVar[str] = "modules"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("mod",)
    kind: Literal["Module"] = "Module"
    spec: ModuleSpec


# --- ReplicatedDir -----------------------------------------------------------------------------------


class ReplicatedDirSpec(Model):
    module: DnsLabel
    path: AbsolutePath
    exclude: list[str] = Field(
        default_factory=list,
        description="glob patterns of paths under path that stay on each node and are not replicated: one "
        "without '/' matches a name at any depth ('*.tmp'), one with '/' the leading components ('cache/*'); a "
        "matching directory takes its subtree; the secondary's own copies are never overwritten or removed",
    )
    ack: Literal["received", "durable", "fsync"] = "received"
    split_brain: Literal["keepPreferred", "keepRecent", "manual"] = "keepRecent"
    keep_cpus_awake: bool = Field(
        default=True,
        description="while replication traffic flows or the mount serves requests (and 10 ms after), idle CPUs "
        "poll instead of sleeping (PM QoS): each synchronous write waits for several wake-ups, and waking a "
        "sleeping CPU, above all a halted vCPU, can cost more than the write; false saves that CPU time",
    )

    @field_validator("exclude")
    @classmethod
    def _relative_globs(cls, globs: list[str]) -> list[str]:
        problems = [e for e in map(pattern_error, globs) if e is not None]
        if problems:
            raise ValueError("; ".join(problems))
        return globs


class ReplicatedDir(Resource):
    KIND: ClassVar[str] = "ReplicatedDir"
    PLURAL: ClassVar[str] = "replicateddirs"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("rdir",)
    kind: Literal["ReplicatedDir"] = "ReplicatedDir"
    spec: ReplicatedDirSpec


# --- VirtualIP ---------------------------------------------------------------------------------------


class GratuitousArp(Model):
    count: int = Field(default=3, ge=0, le=100)
    interval: Duration = "200ms"


class VirtualIPSpec(Model):
    module: DnsLabel
    address: CIDR
    interface: InterfaceName | None = Field(default=None, description="default: the interface on that subnet")
    gratuitous_arp: GratuitousArp = Field(default_factory=GratuitousArp)


class VirtualIP(Resource):
    KIND: ClassVar[str] = "VirtualIP"
    PLURAL: ClassVar[str] = "virtualips"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("vip",)
    kind: Literal["VirtualIP"] = "VirtualIP"
    spec: VirtualIPSpec


# --- Checker -----------------------------------------------------------------------------------------

CheckerType = Literal["tcp", "ping", "interface", "ip", "custom", "module", "splitbrain"]
_CHECKER_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # type: (required fields, allowed optional type-specific fields)
    "tcp": (("host", "port"), ()),
    "ping": (("host",), ()),
    "interface": (("interface",), ()),
    "ip": (("address",), ("interface",)),
    "custom": (("command",), ()),
    "module": (("target_module",), ()),
    "splitbrain": (("witness",), ()),
}
_TYPE_SPECIFIC = ("host", "port", "interface", "address", "command", "target_module", "witness")


class CheckerSpec(Model):
    module: DnsLabel
    type: CheckerType
    host: str | None = None
    port: Port | None = None
    interface: InterfaceName | None = None
    address: CIDR | IPAddress | None = None
    command: str | None = None
    target_module: DnsLabel | None = None
    witness: IPAddress | list[IPAddress] | None = None
    interval: Duration = "10s"
    timeout: Duration = "5s"
    failures: int = Field(default=3, ge=1)
    on_failure: Literal["restart", "failover", "stop", "wait"] | None = Field(
        default=None, description="default: wait for a module checker, restart for the others"
    )

    @model_validator(mode="after")
    def _fields_fit_type(self) -> CheckerSpec:
        required, optional = _CHECKER_FIELDS[self.type]
        problems: list[tuple[str, str]] = []
        for field in _TYPE_SPECIFIC:
            alias = _alias(field)
            if field in required and getattr(self, field) in (None, []):
                problems.append((alias, f"required for a checker of type {self.type}"))
            elif field not in required and field not in optional and getattr(self, field) is not None:
                problems.append((alias, f"not used by a checker of type {self.type}"))
        if self.type == "splitbrain" and self.on_failure is not None:
            problems.append(("onFailure", "a splitbrain checker only decides who may serve alone; it has no action"))
        if parse_duration(self.timeout) > parse_duration(self.interval):
            problems.append(("timeout", f"timeout ({self.timeout}) must not exceed interval ({self.interval})"))
        raise_problems(problems)
        return self

    @property
    def witnesses(self) -> list[str]:
        if self.witness is None:
            return []
        return [self.witness] if isinstance(self.witness, str) else list(self.witness)

    @property
    def failure_action(self) -> str:
        if self.on_failure is not None:
            return self.on_failure
        return "wait" if self.type == "module" else "restart"


def _alias(field: str) -> str:
    head, *rest = field.split("_")
    return head + "".join(part.title() for part in rest)


class Checker(Resource):
    KIND: ClassVar[str] = "Checker"
    PLURAL: ClassVar[str] = "checkers"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("chk",)
    kind: Literal["Checker"] = "Checker"
    spec: CheckerSpec


KINDS: dict[str, type[Resource]] = {k.KIND: k for k in (Cluster, Module, ReplicatedDir, VirtualIP, Checker)}
