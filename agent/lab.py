"""A network-namespace lab: nodes, a client and a witness on virtual switches, torn down without a trace."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

log = logging.getLogger("tandem.lab")

HostKind = Literal["node", "client", "witness"]
Command = str | Sequence[str]

NETNS_DIR = Path("/run/netns")
REGISTRY = Path("/run/tandem-lab")
SWITCH = "switch"
_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
_IP_TIMEOUT = 10.0
_GRACE = 3.0
# Rounds of stopping processes that were started while the lab stopped.
_LATE_ROUNDS = 5
# Copies of these mounts in a node's namespace would keep other people's namespaces and FUSE daemons alive.
_PINNING_FSTYPES = "nsfs,fuse,fuseblk"
_SLEEPER = (
    f'for m in $(findmnt -rn -t {_PINNING_FSTYPES} -o TARGET | sort -r); do umount -l "$m"; done; exec sleep infinity'
)
_PING = """\
import os, socket, struct, sys, time
addr, timeout = sys.argv[1], float(sys.argv[2])
ident = os.getpid() & 0xFFFF
def checksum(b):
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF
body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"tandem-lab-ping!"
packet = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
deadline = time.monotonic() + timeout
try:
    s.sendto(packet, (addr, 0))
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        data, (src, _) = s.recvfrom(2048)
        icmp = data[(data[0] & 0x0F) * 4:]
        if src == addr and icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
            sys.exit(0)
except OSError:
    pass
sys.exit(1)
"""


@dataclass(frozen=True)
class _Attached:
    """The sleeper of a lab brought up by another process: only its PID is known here."""

    pid: int


class LabError(Exception):
    """The lab could not be built, driven or removed; the message says which object and what failed."""


def _ip(*args: str) -> None:
    """Run one `ip` command; namespaces are named with `-n`, so the host's own links are never addressed."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False)
    if proc.returncode:
        raise LabError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")


@dataclass(frozen=True)
class Network:
    """One lab network: a subnet on a bridge inside the lab's switch namespace."""

    name: str
    subnet: ipaddress.IPv4Network
    bridge: str

    def address(self, n: int) -> str:
        """The n-th address of the subnet, e.g. for a virtual IP that no host holds."""
        addr = self.subnet.network_address + n
        if addr not in self.subnet or addr in (self.subnet.network_address, self.subnet.broadcast_address):
            raise LabError(f"host number {n} is outside network {self.name} ({self.subnet})")
        return str(addr)


@dataclass
class Host:
    """One lab host: its own network namespace and its own mount namespace, pinned by a sleeper process."""

    name: str
    kind: HostKind
    netns: str
    addresses: dict[str, str]
    prefixlen: dict[str, int]
    sleeper: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    mount_ns: tuple[int, int] | None = field(default=None, repr=False)
    processes: list[LabProcess] = field(default_factory=list, repr=False)

    @property
    def netns_path(self) -> str:
        """The file that names this host's network namespace (for ``nsenter --net`` or pyroute2)."""
        return str(NETNS_DIR / self.netns)

    @property
    def pid(self) -> int:
        """The sleeper's PID: it holds the host's mount namespace (``nsenter --target PID`` enters the host)."""
        return self._sleeper_pid()

    @property
    def root(self) -> Path:
        """The host's file system as its own processes see it (with its bind mounts)."""
        return Path(f"/proc/{self._sleeper_pid()}/root")

    def address(self, network: str) -> str:
        """This host's address on a network."""
        try:
            return self.addresses[network]
        except KeyError:
            raise LabError(f"host {self.name} is not on network {network}") from None

    def interface(self, network: str) -> str:
        """The name of this host's interface on a network (the network's name)."""
        self.address(network)
        return network

    def argv(self, cmd: Command, cwd: str | os.PathLike[str] | None = None) -> list[str]:
        """The argv that runs ``cmd`` inside this host (a string runs with /bin/sh -c)."""
        inner = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        wd = os.fspath(cwd) if cwd is not None else os.getcwd()
        return [
            "nsenter",
            f"--mount=/proc/{self._sleeper_pid()}/ns/mnt",
            f"--net={self.netns_path}",
            f"--wdns={wd}",
            "--",
            *inner,
        ]

    def run(
        self,
        cmd: Command,
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside this host; on timeout its process group is killed."""
        argv = self.argv(cmd, cwd)
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=_GRACE)
            proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
            raise LabError(f"{cmd!r} on {self.name} did not finish in {timeout}s and was killed") from None
        if check and proc.returncode:
            raise LabError(f"{cmd!r} on {self.name} exited {proc.returncode}: {err.strip() or out.strip()}")
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def spawn(
        self,
        cmd: Command,
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> LabProcess:
        """Start a long-running process inside this host, output appended to ``log_path``; Lab.down() stops it."""
        argv = self.argv(cmd, cwd)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        proc = LabProcess(self.name, popen, log_path)
        self.processes.append(proc)
        log.info("Spawned a process in the lab. netns=%s pid=%d cmd=%r", self.netns, proc.pid, cmd)
        return proc

    def _sleeper_pid(self) -> int:
        if self.sleeper is None:
            raise LabError(f"host {self.name} is not up: call Lab.up() first")
        return self.sleeper.pid


class LabProcess:
    """A long-running process inside a lab host, in its own process group, stopped by PID."""

    def __init__(self, host: str, popen: subprocess.Popen[bytes], log_path: Path) -> None:
        self.host = host
        self.log_path = log_path
        self._popen = popen

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def alive(self) -> bool:
        """Whether the process has not exited yet."""
        return self._popen.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        """Send a signal to the process group (e.g. SIGKILL to simulate a crash)."""
        _signal_group(self.pid, sig)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit; raises subprocess.TimeoutExpired."""
        return self._popen.wait(timeout)

    def stop(self, grace: float = _GRACE) -> int:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds; returns the exit code."""
        _terminate([self], [], grace)
        return self._popen.wait(_GRACE)


class Lab:
    """Hosts in network namespaces joined by one bridge per network, in a switch namespace of their own."""

    def __init__(
        self,
        name_prefix: str = "tlab-",
        nodes: Sequence[str] = ("node1", "node2"),
        networks: Sequence[str] = ("lan", "backup"),
        *,
        client: bool = True,
        witness: bool = False,
        subnets: Mapping[str, str] | None = None,
        workdir: Path | None = None,
    ) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9-]{1,19}", name_prefix):
            raise LabError(f"name prefix {name_prefix!r} must be 2-20 characters of a-z, 0-9 and '-'")
        self.name = f"{name_prefix}{secrets.token_hex(3)}"
        self._layout = {
            "nodes": list(nodes),
            "networks": list(networks),
            "client": client,
            "witness": witness,
            "subnets": dict(subnets or {}),
        }
        self.networks = _networks(networks, subnets or {})
        self.hosts = _hosts(self.name, nodes, client, witness, self.networks)
        self._ports = _ports(self.hosts, self.networks)
        self._own_workdir = workdir is None
        self.workdir = workdir if workdir is not None else Path(tempfile.gettempdir()) / self.name
        self._created_dirs: list[Path] = []
        self._up = False

    @property
    def nodes(self) -> list[Host]:
        """The cluster nodes, in the order given."""
        return [h for h in self.hosts.values() if h.kind == "node"]

    @property
    def switch_netns(self) -> str:
        """The namespace that holds the bridges and the switch-side ends of every cable."""
        return f"{self.name}-{SWITCH}"

    def network(self, name: str) -> Network:
        """A network by name."""
        for net in self.networks:
            if net.name == name:
                return net
        raise LabError(f"lab {self.name} has no network {name}")

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    def up(self) -> Lab:
        """Build every namespace, bridge, link and address; on any failure remove what was built, then raise."""
        if self._up:
            raise LabError(f"lab {self.name} is already up")
        self._up = True
        try:
            self._register()
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._build_switch()
            for host in self.hosts.values():
                self._build_host(host)
            for host in self.hosts.values():
                self._start_sleeper(host)
            self._save_layout()
        except BaseException:
            try:
                self.down()
            except LabError as exc:
                log.warning("A lab that failed to come up was not fully removed. lab=%s error=%s", self.name, exc)
            raise
        log.info(
            "Lab is up. lab=%s hosts=%s networks=%s",
            self.name,
            ",".join(self.hosts),
            ",".join(f"{n.name}:{n.subnet}" for n in self.networks),
        )
        return self

    def down(self) -> None:
        """Kill every process inside the lab, delete its namespaces and the directories it created; idempotent."""
        if not self._up:
            return
        hosts = self.hosts.values()
        sleepers = [h.sleeper for h in hosts if h.sleeper is not None]
        mount_ns = [h.mount_ns for h in hosts if h.mount_ns is not None]
        spawned = [p for h in hosts for p in h.processes]
        errors = _kill_inside(_lab_netns(self.name), mount_ns, spawned, [p.pid for p in sleepers])
        for popen in sleepers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(_GRACE)
        for host in hosts:
            host.sleeper, host.mount_ns = None, None
            host.processes.clear()
        errors += _delete_netns(_lab_netns(self.name))
        errors += _remove_dirs(self._created_dirs)
        self._created_dirs.clear()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        shutil.rmtree(REGISTRY / self.name, ignore_errors=True)
        self._up = False
        if errors:
            raise LabError(f"lab {self.name} was not fully removed: {'; '.join(errors)}")
        log.info("Lab is down. lab=%s", self.name)

    def spawn(
        self,
        host: str,
        cmd: Command,
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> LabProcess:
        """Start a long-running process inside a host (see Host.spawn)."""
        return self[host].spawn(cmd, log_path, env=env, cwd=cwd)

    def __getitem__(self, host: str) -> Host:
        try:
            return self.hosts[host]
        except KeyError:
            raise LabError(f"lab {self.name} has no host {host}") from None

    def ping(self, host: str, address: str, timeout: float = 1.0) -> bool:
        """Whether one ICMP echo from ``host`` to ``address`` is answered within ``timeout`` seconds."""
        cmd = [sys.executable, "-c", _PING, address, str(timeout)]
        return self.hosts[host].run(cmd, check=False, timeout=timeout + 10).returncode == 0

    def cut(self, host: str, network: str | None = None) -> None:
        """Pull the host's cable on one network (all when None): its switch port goes down, carrier is lost."""
        for net in self._networks_of(host, network):
            _ip("-n", self.switch_netns, "link", "set", self._ports[host, net], "down")
            log.info("Cut a link. lab=%s host=%s network=%s", self.name, host, net)

    def heal(self, host: str, network: str | None = None) -> None:
        """Plug the host's cable back on one network (all when None)."""
        for net in self._networks_of(host, network):
            _ip("-n", self.switch_netns, "link", "set", self._ports[host, net], "up")
            log.info("Healed a link. lab=%s host=%s network=%s", self.name, host, net)

    def isolate(self, host: str) -> None:
        """Cut the host from every network it is on."""
        self.cut(host)

    def bind(self, host: str, source: Path, target: str | os.PathLike[str]) -> None:
        """Bind-mount ``source`` at ``target`` inside one host only; missing target directories are created."""
        h = self.hosts[host]
        target_path = Path(target)
        if not target_path.is_absolute():
            raise LabError(f"bind target {target} must be an absolute path")
        self._make_dirs(h, target_path)
        h.run(["mount", "--bind", os.fspath(source), os.fspath(target_path)])
        log.info("Bound a directory. lab=%s host=%s source=%s target=%s", self.name, host, source, target_path)

    def private_path(self, target: str | os.PathLike[str], hosts: Sequence[str] | None = None) -> dict[str, Path]:
        """Give each node (or each of ``hosts``) its own empty directory at ``target``; returns the backing dirs."""
        rel = Path(target).relative_to("/")
        backing: dict[str, Path] = {}
        for name in hosts if hosts is not None else [h.name for h in self.nodes]:
            source = self.workdir / "private" / name / rel
            source.mkdir(parents=True, exist_ok=True)
            self.bind(name, source, target)
            backing[name] = source
        return backing

    def _networks_of(self, host: str, network: str | None) -> list[str]:
        h = self.hosts[host]
        return [h.interface(network)] if network is not None else list(h.addresses)

    def _make_dirs(self, host: Host, target: Path) -> None:
        missing = [p for p in [target, *target.parents] if not (host.root / p.relative_to("/")).exists()]
        for path in reversed(missing):
            (host.root / path.relative_to("/")).mkdir()
            self._created_dirs.append(path)
            with open(REGISTRY / self.name / "created-dirs", "a") as f:
                f.write(f"{path}\n")

    def _save_layout(self) -> None:
        sleepers = {h.name: h.pid for h in self.hosts.values()}
        (REGISTRY / self.name / "layout.json").write_text(json.dumps({**self._layout, "sleepers": sleepers}))

    @classmethod
    def attach(cls, name: str) -> Lab:
        """The lab ``name`` that another process brought up and left running, to drive it (not to own it)."""
        try:
            layout = json.loads((REGISTRY / name / "layout.json").read_text())
        except (OSError, ValueError) as exc:
            raise LabError(f"no running lab {name!r} to attach to: {exc}") from None
        lab = cls(
            "x-",
            layout["nodes"],
            layout["networks"],
            client=layout["client"],
            witness=layout["witness"],
            subnets=layout["subnets"],
        )
        lab.name = name
        lab.hosts = _hosts(name, layout["nodes"], layout["client"], layout["witness"], lab.networks)
        lab._ports = _ports(lab.hosts, lab.networks)
        for host_name, pid in layout["sleepers"].items():
            if _comm(pid) != "sleep":
                raise LabError(f"lab {name} is not running: the holder of host {host_name}'s namespaces is gone")
            lab.hosts[host_name].sleeper = _Attached(pid)  # type: ignore[assignment]
        lab._own_workdir, lab._up = False, False  # attached: down() is the owner's, or remove_lab(name)
        return lab

    def _register(self) -> None:
        entry = REGISTRY / self.name
        entry.mkdir(parents=True)
        (entry / "owner").write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
        if self._own_workdir:
            (entry / "workdir").write_text(f"{self.workdir}\n")

    def _build_switch(self) -> None:
        _ip("netns", "add", self.switch_netns)
        _ip("-n", self.switch_netns, "link", "set", "lo", "up")
        for net in self.networks:
            _ip("-n", self.switch_netns, "link", "add", net.bridge, "type", "bridge", "stp_state", "0")
            _ip("-n", self.switch_netns, "link", "set", net.bridge, "up")

    def _build_host(self, host: Host) -> None:
        sw = self.switch_netns
        _ip("netns", "add", host.netns)
        _ip("-n", host.netns, "link", "set", "lo", "up")
        for net in self.networks:
            if net.name not in host.addresses:
                continue
            port = self._ports[host.name, net.name]
            _ip("-n", sw, "link", "add", port, "type", "veth", "peer", "name", net.name, "netns", host.netns)
            _ip("-n", sw, "link", "set", port, "master", net.bridge, "up")
            cidr = f"{host.addresses[net.name]}/{host.prefixlen[net.name]}"
            _ip("-n", host.netns, "addr", "add", cidr, "dev", net.name)
            _ip("-n", host.netns, "link", "set", net.name, "up")

    def _start_sleeper(self, host: Host) -> None:
        # `ip netns exec` mounts the namespace's own /sys; unshare then makes the whole tree private to the host.
        argv = ["ip", "netns", "exec", host.netns, "unshare", "--mount", "--propagation", "private"]
        host.sleeper = subprocess.Popen(
            [*argv, "/bin/sh", "-c", _SLEEPER],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        pid = host.sleeper.pid
        deadline = time.monotonic() + _IP_TIMEOUT
        while _comm(pid) != "sleep":
            if host.sleeper.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"the mount namespace of host {host.name} could not be created (pid {pid})")
            time.sleep(0.005)
        st = os.stat(f"/proc/{pid}/ns/mnt")
        host.mount_ns = (st.st_dev, st.st_ino)


def cleanup_stale(prefix: str = "tlab-") -> list[str]:
    """Remove labs whose names start with ``prefix`` and whose owning process is gone; returns their names."""
    if not re.fullmatch(r"[a-z][a-z0-9-]{1,}", prefix):
        raise LabError(f"refusing to clean up with prefix {prefix!r}: give a lab name prefix such as 'tlab-'")
    lab_name = re.compile(rf"^{re.escape(prefix)}[0-9a-f]{{6}}(?=-|$)")
    found = [lab_name.match(p.name) for p in [*REGISTRY.glob(f"{prefix}*"), *NETNS_DIR.glob(f"{prefix}*")]]
    stale = sorted({m.group(0) for m in found if m} - {m.group(0) for m in found if m and _owner_alive(m.group(0))})
    for name in stale:
        remove_lab(name)
        log.info("Removed a stale lab. lab=%s", name)
    return stale


def remove_lab(name: str) -> None:
    """Tear down a lab by its full name from any process: its processes, namespaces, directories, registry."""
    if not re.fullmatch(r"[a-z][a-z0-9-]{1,19}[0-9a-f]{6}", name):
        raise LabError(f"{name!r} is not a lab name (a prefix followed by 6 hex digits)")
    errors = _kill_inside(_lab_netns(name), [], [], [])
    errors += _delete_netns(_lab_netns(name))
    entry = REGISTRY / name
    with contextlib.suppress(FileNotFoundError):
        dirs = [Path(line) for line in (entry / "created-dirs").read_text().splitlines() if line]
        errors += _remove_dirs(dirs)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree((entry / "workdir").read_text().strip(), ignore_errors=True)
    shutil.rmtree(entry, ignore_errors=True)
    if errors:
        raise LabError(f"lab {name} was not fully removed: {'; '.join(errors)}")


def _networks(names: Sequence[str], subnets: Mapping[str, str]) -> list[Network]:
    if not names:
        raise LabError("a lab needs at least one network")
    if unknown := set(subnets) - set(names):
        raise LabError(f"subnets given for unknown networks: {', '.join(sorted(unknown))}")
    nets = []
    for i, name in enumerate(names):
        if not _NAME.fullmatch(name) or len(name) > 12 or name == "lo":
            raise LabError(f"network name {name!r} must be 1-12 characters of a-z, 0-9 and '-', and not 'lo'")
        subnet = ipaddress.IPv4Network(subnets.get(name, f"10.77.{i + 1}.0/24"))
        nets.append(Network(name, subnet, f"br-{name}"))
    if len({n.name for n in nets}) != len(nets):
        raise LabError(f"network names must be unique: {', '.join(names)}")
    return nets


def _hosts(lab: str, nodes: Sequence[str], client: bool, witness: bool, nets: list[Network]) -> dict[str, Host]:
    specs: list[tuple[str, HostKind, int, list[Network]]] = [(n, "node", 11 + i, nets) for i, n in enumerate(nodes)]
    # The client and the witness stand on the first network, the one users reach the service on.
    if client:
        specs.append(("client", "client", 100, nets[:1]))
    if witness:
        specs.append(("witness", "witness", 200, nets[:1]))
    hosts: dict[str, Host] = {}
    for name, kind, n, on in specs:
        if not _NAME.fullmatch(name) or name == SWITCH or name in hosts:
            raise LabError(f"host name {name!r} must be unique, of a-z, 0-9 and '-', and not {SWITCH!r}")
        addresses = {net.name: net.address(n) for net in on}
        prefixlen = {net.name: net.subnet.prefixlen for net in on}
        hosts[name] = Host(name, kind, f"{lab}-{name}", addresses, prefixlen)
    return hosts


def _ports(hosts: Mapping[str, Host], nets: list[Network]) -> dict[tuple[str, str], str]:
    """Names of the switch-side veth ends: readable `host-network` when all fit in 15 characters and differ."""
    keys = [(h, n.name) for h in hosts for n in nets]
    readable = {(h, n): f"{h}-{n}" for h, n in keys}
    if len(set(readable.values())) == len(keys) and all(len(v) <= 15 for v in readable.values()):
        return readable
    return {(h, n.name): f"h{i}n{j}" for i, h in enumerate(hosts) for j, n in enumerate(nets)}


def _lab_netns(lab: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(f"{lab}-"))


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def _start_time(pid: int) -> str:
    fields = _stat_fields(pid)
    return fields[19] if fields else "?"


def _owner_alive(lab: str) -> bool:
    try:
        pid, start = (REGISTRY / lab / "owner").read_text().split()
    except (OSError, ValueError):
        return False
    return _start_time(int(pid)) == start


def _gone(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is None or fields[0] in ("Z", "X")


def _ns_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _pids_inside(netns: Sequence[str], mount_ns: Sequence[tuple[int, int]]) -> list[int]:
    """Every process in one of these network or mount namespaces: all of them were started through the lab."""
    keys = {k for k in (_ns_key(str(NETNS_DIR / n)) for n in netns) if k} | set(mount_ns)
    if not keys:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        if _ns_key(f"{entry}/ns/net") in keys or _ns_key(f"{entry}/ns/mnt") in keys:
            pids.append(int(entry.name))
    return pids


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _terminate(groups: Sequence[LabProcess], pids: Sequence[int], grace: float) -> None:
    """SIGTERM process groups and processes, SIGKILL whatever is left after ``grace``, wait until all are gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, _IP_TIMEOUT)):
        for proc in groups:
            _signal_group(proc.pid, sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            for proc in groups:
                proc.returncode  # noqa: B018 (reaps a child that exited)
            if all(_gone(p) for p in [*pids, *(g.pid for g in groups)]):
                # The leaders are gone; what is left of their groups goes too.
                for proc in groups:
                    _signal_group(proc.pid, signal.SIGKILL)
                return
            time.sleep(0.01)
    raise LabError(f"processes survived SIGKILL: {[p for p in pids if not _gone(p)]}")


def _kill_inside(
    netns: Sequence[str], mount_ns: Sequence[tuple[int, int]], spawned: Sequence[LabProcess], children: Sequence[int]
) -> list[str]:
    """Stop the spawned process groups, then every other process in the namespaces; returns what failed."""
    pids = sorted({*_pids_inside(netns, mount_ns), *children})
    if pids or spawned:
        log.info("Stopping lab processes. pids=%s", ",".join(map(str, pids)))
    try:
        _terminate(spawned, pids, _GRACE)
        # A process started while the others stopped (a daemon that starts a script in a session of
        # its own as it is told to stop) was not in that list: stop those too, until none is left.
        for _ in range(_LATE_ROUNDS):
            late = [pid for pid in _pids_inside(netns, mount_ns) if not _gone(pid)]
            if not late:
                break
            log.info("Stopping lab processes started during the stop. pids=%s", ",".join(map(str, late)))
            _terminate([], late, _GRACE)
        else:
            late = [pid for pid in _pids_inside(netns, mount_ns) if not _gone(pid)]
            if late:
                return [f"processes kept starting while the lab stopped: {late}"]
    except LabError as exc:
        return [str(exc)]
    for proc in spawned:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(_GRACE)
    return []


def _delete_netns(names: Sequence[str]) -> list[str]:
    errors = []
    for name in names:
        try:
            _ip("netns", "delete", name)
        except (LabError, subprocess.TimeoutExpired) as exc:
            errors.append(str(exc))
    return errors


def _remove_dirs(dirs: Sequence[Path]) -> list[str]:
    """Remove directories the lab created for bind targets, deepest first, only when empty."""
    errors = []
    for path in sorted(set(dirs), key=lambda p: len(p.parts), reverse=True):
        try:
            path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                errors.append(f"could not remove {path}: {exc.strerror}")
            else:
                log.info("Left a directory the lab created in place: something else wrote into it. path=%s", path)
    return errors
