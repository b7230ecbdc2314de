"""Failover benchmark: Tandem vs keepalived, side by side in one run, in the network-namespace lab.

Run as root from the repository: `.venv/bin/python -m bench.failover [--runs N | --quick]`.

What is measured, the same way for every system:

- a client host opens a new HTTP connection to the VIP every 20 ms (a small poller inside the client
  namespace, one thread per attempt, 1 s timeout) and logs start/end time, the answering node or the error;
- once node1 has served steadily, node1's daemon (tandemd / keepalived) and its app get SIGKILL and all of
  node1's cables are cut (`Lab.isolate`), at a chosen phase of the sender's cycle: a packet socket on node2
  sees node1's heartbeat (UDP) or advert (VRRP) arrive, and the failure follows a fraction of the pulse /
  advert interval later. The N runs of each system take the N midpoints of N equal slices of the cycle, in
  random order (stratified sampling of a uniformly random phase: the median of a few runs is then the
  median of the distribution, not the luck of the draw; with advert_int 0.31 a random phase alone moves
  the median of 7 runs by about +-0.04 s). `--phases random` keeps the old random 0-1 s delay;
- failover = first reply from node2 through the VIP (end of that request) minus the moment of the failure.

Tandem: two nodes, pulse 100 ms, timeout 1 s (tests/e2e/lab_cluster.py), the sample app started by startPrim at
takeover (cold standby: the data is replicated and must not be written on the secondary). A variant adds a
ReplicatedDir under the demo's notes app (controller/demoapp.py, SQLite), so the takeover also promotes
replication (stop the secondary replicator, mount the primary one).

keepalived (VRRPv3 on `lan` only, unicast peers inside the lab), at three advert intervals:
- the same *expected* detection as Tandem (the like-for-like setting): Tandem declares its peer lost `timeout`
  after the last heartbeat, heartbeats come every `pulse`, so a failure at a random phase is detected after
  timeout - pulse/2 on average; keepalived declares the master down 3 x advert_int + skew after the last advert
  (skew = (256 - priority)/256 x advert_int; keepalived/include/vrrp.h, VRRP_MS_DOWN_TIMER), i.e. after that
  minus advert_int/2 on average; the advert is the centisecond value whose expected detection is closest;
- the same nominal timeout (master-down interval closest to Tandem's timeout) and the same pulse (advert = pulse),
  as context.
Each with the same app running on both nodes all the time (hot standby, keepalived's usual stateless setup), and
at the like-for-like advert also cold: `notify_master` starts the same app with the same commands as Tandem's
startPrim, `notify_backup`/`notify_fault` stop it, as a keepalived user runs a stateful service.
Partition heal (Tandem): isolate node1 without killing it, wait until node2 serves, heal, and measure
until the client gets answers steadily again.

Every run gets a fresh lab; runs of the systems are interleaved; every lab and process is removed on
exit, Ctrl-C or failure. All traffic stays inside the lab's namespaces.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import os
import platform
import random
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # tests/ is a namespace package found from the repository root
    sys.path.insert(0, str(REPO))

from agent.lab import Lab, LabProcess, cleanup_stale  # noqa: E402
from tests.daemons import wait_for  # noqa: E402
from tests.e2e.lab_cluster import APP_PORT, START_APP, STOP_APP, LabCluster  # noqa: E402
from tests.netns import inside  # noqa: E402

PREFIX = "tbfo-"
KEEPALIVED = "/usr/sbin/keepalived"
POLL_INTERVAL = 0.02
POLL_TIMEOUT = 1.0
STEADY = 25  # consecutive answers from one node (0.5 s) count as "serving steadily"
TANDEM_PULSE = 0.1
TANDEM_TIMEOUT = 1.0

# The client: a new TCP connection to the VIP every INTERVAL, one thread per attempt, bounded in count
# and time. One line per attempt: index, start, end (CLOCK_MONOTONIC, shared by every namespace), result.
POLLER = textwrap.dedent(
    """\
    import socket, sys, threading, time
    host, port = sys.argv[1], int(sys.argv[2])
    interval, timeout, duration, limit = map(float, sys.argv[3:7])
    lock = threading.Lock()
    def attempt(i, start):
        try:
            with socket.create_connection((host, port), timeout=timeout) as s:
                s.settimeout(max(0.05, start + timeout - time.monotonic()))
                s.sendall(b"GET / HTTP/1.0\\r\\nHost: vip\\r\\n\\r\\n")
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            head, _, body = data.partition(b"\\r\\n\\r\\n")
            status = head.split(b" ", 2)[1].decode() if head else "?"
            words = body.decode().split()
            result = (words[0].rstrip(":") if words else "") if status == "200" else "!http" + status
        except OSError as exc:
            result = "!" + type(exc).__name__
        end = time.monotonic()
        with lock:
            sys.stdout.write("%d %.6f %.6f %s\\n" % (i, start, end, result or "!empty"))
            sys.stdout.flush()
    t0 = time.monotonic()
    i = 0
    while i < limit and time.monotonic() < t0 + duration:
        start = time.monotonic()
        threading.Thread(target=attempt, args=(i, start), daemon=True).start()
        i += 1
        time.sleep(max(0.0, t0 + i * interval - time.monotonic()))
    time.sleep(timeout + 0.2)
    """
)

APP = (
    "mkdir -p {www}/{node} && echo {node} > {www}/{node}/index.html"
    " && exec {python} -m http.server {port} --bind 0.0.0.0 --directory {www}/{node}"
)

# keepalived's notify script for the cold-standby variant: start = Tandem's startPrim (tests/e2e/lab_cluster.py)
# word for word, stop = its stopPrim.
NOTIFY = textwrap.dedent(
    """\
    #!/bin/sh
    TANDEM_NODE={node}
    case "$1" in
    start)
    {start}
        ;;
    stop)
        [ -f {www}/$TANDEM_NODE.pid ] && {stop}
        ;;
    esac
    exit 0
    """
)

KEEPALIVED_CONF = textwrap.dedent(
    """\
    global_defs {{
        router_id {node}
        vrrp_version 3
        script_user root
    }}
    vrrp_instance app {{
        state {state}
        interface lan
        virtual_router_id 51
        priority {priority}
        advert_int {advert}
        unicast_src_ip {src}
        unicast_peer {{
            {peer}
        }}
        virtual_ipaddress {{
            {vip}/24 dev lan
        }}
    {notify}}}
    """
)


class BenchError(Exception):
    pass


@dataclass(frozen=True)
class Attempt:
    index: int
    start: float
    end: float
    result: str  # the node's name, or "!Error"

    @property
    def ok(self) -> bool:
        return not self.result.startswith("!")


@dataclass
class Poller:
    proc: LabProcess
    path: Path

    def attempts(self) -> list[Attempt]:
        out = []
        for line in self.path.read_text().splitlines():
            parts = line.split(" ", 3)
            if len(parts) == 4 and parts[0].isdigit():
                out.append(Attempt(int(parts[0]), float(parts[1]), float(parts[2]), parts[3]))
        return sorted(out, key=lambda a: a.start)


@dataclass
class Result:
    system: str
    job: Callable[[Path, float | None], dict[str, Any]]  # (work dir, failure phase as a fraction or None: random)
    standby: str  # cold: the app starts at takeover; hot: it runs on both nodes all the time
    nominal: float  # Tandem's timeout; keepalived's master-down interval
    expected: float  # mean failure -> detection at a random phase of the pulse / advert
    failover: list[float] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.failover)


def start_poller(lab: Lab, vip: str, work: Path, name: str, duration: float) -> Poller:
    script = work / "poller.py"
    script.write_text(POLLER)
    path = work / f"{name}.log"
    limit = int(duration / POLL_INTERVAL) + 1
    cmd = [
        sys.executable,
        str(script),
        vip,
        str(APP_PORT),
        str(POLL_INTERVAL),
        str(POLL_TIMEOUT),
        str(duration),
        str(limit),
    ]
    return Poller(lab["client"].spawn(cmd, path), path)


def steady(attempts: list[Attempt], node: str, after: float = 0.0, n: int = STEADY) -> float | None:
    """End time of the n-th consecutive answer from `node` among attempts started after `after`."""
    run = 0
    for a in attempts:
        if a.start < after:
            continue
        run = run + 1 if a.result == node else 0
        if run >= n:
            return a.end
    return None


def first_answer(attempts: list[Attempt], node: str, after: float) -> Attempt | None:
    hits = [a for a in attempts if a.result == node and a.end > after]
    return min(hits, key=lambda a: a.end) if hits else None


def kill_group_and_pid(proc: LabProcess, pidfile: Path | None, app: LabProcess | None) -> None:
    proc.signal(signal.SIGKILL)
    if app is not None:
        app.signal(signal.SIGKILL)
    if pidfile is not None and pidfile.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)


ETH_P_IP = 0x0800
IPPROTO_UDP = 17  # Tandem's heartbeats
IPPROTO_VRRP = 112  # keepalived's adverts
SO_TIMESTAMPNS = 35  # <asm-generic/socket.h>; not in Python's socket module. Its cmsg: struct timespec (64-bit)


@dataclass(frozen=True)
class Phase:
    """Where the failure lands: ``fraction`` of the sender's ``interval`` after a heartbeat / advert reached node2."""

    fraction: float
    interval: float  # Tandem's pulse, keepalived's advert_int
    proto: int  # the IP protocol of the beats: IPPROTO_UDP or IPPROTO_VRRP


class Beats:
    """node1's heartbeats (or adverts) as they arrive on node2's `lan`, with the kernel's receive time.

    A packet socket opened inside node2's namespace; it only listens.
    """

    def __init__(self, lab: Lab, proto: int) -> None:
        with inside(lab["node2"].netns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.bind(("lan", 0))
        self.sock.setblocking(False)
        self.src = ipaddress.IPv4Address(lab["node1"].address("lan")).packed
        self.proto = proto

    def __enter__(self) -> Beats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _read(self) -> list[float]:
        """The receive times (CLOCK_MONOTONIC) of the matching packets queued now."""
        out: list[float] = []
        offset = time.time() - time.monotonic()
        while True:
            try:
                frame, ancillary, _, _ = self.sock.recvmsg(128, socket.CMSG_SPACE(16))
            except BlockingIOError:
                return out
            if len(frame) < 34 or frame[23] != self.proto or frame[26:30] != self.src:
                continue
            stamp = next((data for level, kind, data in ancillary if kind == SO_TIMESTAMPNS), None)
            if stamp is None:
                out.append(time.monotonic())
            else:
                sec, nsec = struct.unpack("qq", stamp[:16])
                out.append(sec + nsec / 1e9 - offset)

    def next(self, timeout: float = 5.0) -> float:
        """Wait for the next beat after the ones already queued; its receive time."""
        self._read()
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            select.select([self.sock], [], [], left)
            if got := self._read():
                return got[-1]
        raise BenchError(f"no packet of IP protocol {self.proto} from node1 on node2's lan for {timeout:g} s")

    def last(self) -> float | None:
        """The receive time of the last beat queued (None if none came)."""
        got = self._read()
        return got[-1] if got else None


def measure_failover(lab: Lab, poller: Poller, kill: Callable[[], None], phase: Phase | None) -> dict[str, Any]:
    """Kill + isolate node1 at the phase (random if None), wait for node2's first answer; the run's figures."""
    wait_for(
        "node1 to serve steadily through the VIP", lambda: steady(poller.attempts(), "node1"), timeout=20, interval=0.02
    )
    since_beat = None
    with contextlib.ExitStack() as stack:
        if phase is None:
            time.sleep(random.uniform(0.0, 1.0))
        else:
            beats = stack.enter_context(Beats(lab, phase.proto))
            beat = beats.next()
            time.sleep(max(0.0, beat + phase.fraction * phase.interval - time.monotonic()))
        t0, wall0 = time.monotonic(), time.time()
        kill()
        lab.isolate("node1")
        t_cut = time.monotonic()
        if phase is not None:
            # node2 counts from the last beat it received, which may have come during the wait (sender jitter)
            # or even just after the kill (in flight): the phase as it happened, negative in the latter case.
            later = beats.last()
            since_beat = t0 - (later if later is not None else beat)
    hit = wait_for(
        "node2 to answer through the VIP",
        lambda: first_answer(poller.attempts(), "node2", t0),
        timeout=30,
        interval=0.02,
    )
    time.sleep(0.3)
    attempts = poller.attempts()
    last1 = max((a.end for a in attempts if a.result == "node1"), default=t0)
    failed = [a for a in attempts if not a.ok and a.start >= t0 - POLL_TIMEOUT and a.end <= hit.end + 0.3]
    # Once node1 is cut off, any answer, even a refused connection (RST), comes from node2: the VIP has
    # moved, whether or not the app listens yet. (Before the cut, node1's kernel refuses for its dead app.)
    moved = [a.end for a in attempts if a.start >= t_cut and a.result in ("node2", "!ConnectionRefusedError")]
    return {
        "failover": hit.end - t0,
        "vip_moved": min(moved) - t0,
        "first_node2_started": hit.start - t0,
        "kill_and_cut": t_cut - t0,
        "since_beat": since_beat,  # the failure's phase as it happened: time since node1's last beat reached node2
        "last_node1_answer": last1 - t0,
        "failed_attempts": len(failed),
        "errors": sorted({a.result for a in failed}),
        "wall0": wall0,
    }


# --- Tandem ---------------------------------------------------------------------------------------------


NOTES = "/var/lib/tandem-bench/notes"  # the replicated variant's data: each node's own copy (Lab.private_path)


def tandem_cluster(lab: Lab, work: Path, garp_count: int | None = None, *, replicated: bool = False) -> LabCluster:
    cluster = LabCluster(lab, work, pulse=f"{TANDEM_PULSE * 1000:g}ms", timeout=f"{TANDEM_TIMEOUT:g}s")
    module: dict[str, Any] = {}
    if replicated:  # the demo's notes app (SQLite) on a ReplicatedDir: the takeover also promotes replication
        lab.private_path(NOTES)
        app = f"nohup {sys.executable} -m controller.demoapp --db {NOTES}/notes.db --port {APP_PORT}"
        pidfile = f"{cluster.www}/$TANDEM_NODE.pid"
        module["scripts"] = {"startPrim": f"mkdir -p {cluster.www}; {app} > /dev/null 2>&1 & echo $! > {pidfile}"}
    manifests = cluster.manifests(**module)
    docs = list(yaml.safe_load_all(manifests.read_text()))
    if garp_count is not None:  # a variant: fewer gratuitous ARPs
        for doc in docs:
            if doc["kind"] == "VirtualIP":
                doc["spec"]["gratuitousArp"] = {"count": garp_count, "interval": "200ms"}
    if replicated:
        docs.append(
            {
                "apiVersion": "tandem.dev/v1alpha1",
                "kind": "ReplicatedDir",
                "metadata": {"name": "notes-data"},
                "spec": {"module": "app", "path": NOTES},
            }
        )
    manifests.write_text(yaml.safe_dump_all(docs))
    cluster.start("node1")
    cluster.start("node2")
    cluster.cli("node1", "apply", "-f", str(manifests))
    wait_for(
        "node1 PRIM and node2 SECOND",
        lambda: cluster.status("node1") == {"node1": "PRIM", "node2": "SECOND"},
        timeout=60,
        interval=0.2,
    )
    return cluster


LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[.,]\d+Z?)")


def tandem_timeline(log_path: Path, wall0: float, until: float = 10.0) -> list[str]:
    """node2's daemon log lines in [failure, failure + until], prefixed with the time since the failure."""
    out = []
    if not log_path.exists():
        return out
    for line in log_path.read_text(errors="replace").splitlines():
        m = LOG_TS.match(line)
        if not m:
            continue
        try:
            ts = datetime.datetime.fromisoformat(m.group(1).replace(",", ".")).timestamp()
        except ValueError:
            continue
        if wall0 - 0.05 <= ts <= wall0 + until:
            out.append(f"+{ts - wall0:6.3f}s {line[m.end() :].strip()[:200]}")
    return out


def run_tandem(
    work: Path, fraction: float | None, garp_count: int | None = None, *, replicated: bool = False
) -> dict[str, Any]:
    with Lab(PREFIX, nodes=["node1", "node2"], networks=["lan", "backup"], client=True) as lab:
        cluster = tandem_cluster(lab, work, garp_count, replicated=replicated)
        poller = start_poller(lab, cluster.vip, work, "poller", 60)

        def kill() -> None:
            kill_group_and_pid(cluster.daemons["node1"], cluster.www / "node1.pid", None)

        phase = None if fraction is None else Phase(fraction, TANDEM_PULSE, IPPROTO_UDP)
        figures = measure_failover(lab, poller, kill, phase)
        figures["timeline"] = tandem_timeline(work / "node2" / "tandemd.log", figures["wall0"])
        figures.update(tandem_breakdown(figures["timeline"]))
        return figures


MARKS = {
    "lost": "lost, no heartbeat on any network",
    "decided": "serves alone: its peer is silent for",
    "vip_added": "Added virtual IP",
    "garp_done": "Announced virtual IP",
    "primary_mounted": "Replicator started",  # the replicated variant: the primary replicator's mount is ready
    "start_done": "Script startPrim succeeded",
}


def tandem_breakdown(timeline: list[str]) -> dict[str, float]:
    """Times since the failure of the milestones in node2's log (first occurrence of each)."""
    out: dict[str, float] = {}
    for line in timeline:
        t = float(line.split("s ", 1)[0].lstrip("+"))
        for key, text in MARKS.items():
            if key not in out and text in line:
                out[key] = t
    return out


def run_tandem_heal(work: Path) -> dict[str, Any]:
    """Isolate node1 (alive), wait until node2 serves, heal, measure until the client is served steadily."""
    with Lab(PREFIX, nodes=["node1", "node2"], networks=["lan", "backup"], client=True) as lab:
        cluster = tandem_cluster(lab, work)
        poller = start_poller(lab, cluster.vip, work, "poller", 60)
        wait_for("node1 to serve steadily", lambda: steady(poller.attempts(), "node1"), timeout=20, interval=0.02)
        time.sleep(random.uniform(0.0, 1.0))
        t_iso = time.monotonic()
        lab.isolate("node1")
        wait_for(
            "node2 to serve steadily", lambda: steady(poller.attempts(), "node2", t_iso), timeout=30, interval=0.02
        )
        time.sleep(random.uniform(1.0, 2.0))  # the partition lasts a while: both sides settle
        split = cluster.status("node2")
        t_heal, wall_heal = time.monotonic(), time.time()
        lab.heal("node1")
        # Settled: one PRIM and one SECOND seen from both nodes, then 3 s of observation.
        wait_for(
            "the partition to resolve",
            lambda: (
                sorted(cluster.status("node1").values())
                == ["PRIM", "SECOND"]
                == sorted(cluster.status("node2").values())
            ),
            timeout=30,
            interval=0.2,
        )
        t_settled = time.monotonic()
        time.sleep(3.0)
        attempts = [a for a in poller.attempts() if a.start >= t_heal]
        end = t_settled + 3.0
        attempts = [a for a in attempts if a.start <= end - POLL_TIMEOUT]
        failed = [a for a in attempts if not a.ok]
        if failed:
            last_fail = max(failed, key=lambda a: a.start)
            after = [a for a in attempts if a.ok and a.start > last_fail.start]
            steady_at = min((a.end for a in after), default=None)
            reachable = (steady_at - t_heal) if steady_at is not None else None
            first_fail = min(failed, key=lambda a: a.start).start - t_heal
        else:
            reachable, first_fail = 0.0, None
        serving = [a.result for a in attempts if a.ok]
        before = [a.result for a in poller.attempts() if a.ok and a.end < t_heal]
        other = [a.end for a in attempts if a.ok and before and a.result != before[-1]]
        return {
            "reachable": reachable,
            "failed_attempts": len(failed),
            "first_failure": first_fail,
            "errors": sorted({a.result for a in failed}),
            "served_by": serving[-1] if serving else None,
            "switched": len(set(serving)) > 1,
            "switch_at": (min(other) - t_heal) if other else None,
            "settled": t_settled - t_heal,
            "split": split,
            "timeline1": tandem_timeline(work / "node1" / "tandemd.log", wall_heal),
            "timeline2": tandem_timeline(work / "node2" / "tandemd.log", wall_heal),
        }


# --- keepalived -----------------------------------------------------------------------------------------


BACKUP_PRIORITY = 100


def detection(advert: float, priority: int = BACKUP_PRIORITY) -> float:
    """VRRPv3 master down interval for the backup: 3 x advert + skew, skew = (256 - priority) x advert / 256."""
    return 3 * advert + (256 - priority) * advert / 256


def expected_detection(advert: float, priority: int = BACKUP_PRIORITY) -> float:
    """Mean failure -> master down: the failure lands uniformly within an advert interval after the last advert."""
    return detection(advert, priority) - advert / 2


def tandem_expected_detection(pulse: float = TANDEM_PULSE, timeout: float = TANDEM_TIMEOUT) -> float:
    """Mean failure -> peer lost: `timeout` after the last heartbeat, which came up to one pulse before the failure."""
    return timeout - pulse / 2


def centisecond_advert(target: float, of: Callable[[float], float]) -> float:
    """The advert_int in centiseconds (VRRPv3's unit) whose ``of(advert)`` is closest to ``target``."""
    return min((c / 100 for c in range(5, 100)), key=lambda x: abs(of(x) - target))


def advert_for(name: str) -> float:
    """`expected`: same expected detection as Tandem; `nominal`: master-down closest to the timeout; `pulse`."""
    if name == "expected":
        return centisecond_advert(tandem_expected_detection(), expected_detection)
    if name == "nominal":
        return centisecond_advert(TANDEM_TIMEOUT, detection)
    if name == "pulse":
        return TANDEM_PULSE
    return float(name)


def run_keepalived(work: Path, fraction: float | None, advert: float, cold: bool = False) -> dict[str, Any]:
    """keepalived with the app on both nodes (hot), or started by notify_master and stopped by notify_backup (cold)."""
    with Lab(PREFIX, nodes=["node1", "node2"], networks=["lan", "backup"], client=True) as lab:
        vip = lab.network("lan").address(250)
        www = work / "www"
        apps: dict[str, LabProcess] = {}
        daemons: dict[str, LabProcess] = {}
        for node, peer, state, prio in (
            ("node1", "node2", "MASTER", 200),
            ("node2", "node1", "BACKUP", BACKUP_PRIORITY),
        ):
            d = work / node
            d.mkdir(parents=True, exist_ok=True)
            notify = ""
            if cold:
                fmt = {"www": www, "python": sys.executable, "port": APP_PORT}
                start = textwrap.indent(START_APP.format(**fmt), "    ")
                script = d / "notify.sh"
                script.write_text(NOTIFY.format(node=node, www=www, start=start, stop=STOP_APP.format(**fmt)))
                script.chmod(0o755)
                notify = "".join(
                    f'    {key} "{script} {verb}"\n'
                    for key, verb in (("notify_master", "start"), ("notify_backup", "stop"), ("notify_fault", "stop"))
                )
            conf = d / "keepalived.conf"
            conf.write_text(
                KEEPALIVED_CONF.format(
                    node=node,
                    state=state,
                    priority=prio,
                    advert=advert,
                    src=lab[node].address("lan"),
                    peer=lab[peer].address("lan"),
                    vip=vip,
                    notify=notify,
                )
            )
            if not cold:
                app = APP.format(www=www, node=node, python=sys.executable, port=APP_PORT)
                apps[node] = lab[node].spawn(app, d / "app.log")
            cmd = [
                KEEPALIVED,
                "-n",
                "-l",
                "-G",
                "-D",
                "-P",
                "-f",
                str(conf),
                "-p",
                str(d / "keepalived.pid"),
                "-r",
                str(d / "vrrp.pid"),
            ]
            daemons[node] = lab[node].spawn(cmd, d / "keepalived.log")
        wait_for(
            "the VIP on node1",
            lambda: vip in lab["node1"].run(["ip", "-o", "addr", "show", "lan"]).stdout,
            timeout=20,
            interval=0.1,
        )
        poller = start_poller(lab, vip, work, "poller", 60)

        def kill() -> None:
            # cold: the app notify_master started, by its pid file, as for Tandem
            kill_group_and_pid(daemons["node1"], www / "node1.pid" if cold else None, apps.get("node1"))

        phase = None if fraction is None else Phase(fraction, advert, IPPROTO_VRRP)
        figures = measure_failover(lab, poller, kill, phase)
        for node in daemons:
            if not daemons[node].alive() and node == "node2":
                raise BenchError(f"keepalived on node2 exited: {(work / node / 'keepalived.log').read_text()[-2000:]}")
        return figures


# --- main -----------------------------------------------------------------------------------------------


def fmt_stats(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def machine() -> str:
    kernel = platform.release()
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ka = subprocess.run([KEEPALIVED, "--version"], capture_output=True, text=True).stderr.splitlines()
    version = ka[0] if ka else "keepalived ?"
    return f"nproc {os.cpu_count()}, kernel {kernel}, {cpu}; {version}; Python {platform.python_version()}"


def variants(args: argparse.Namespace) -> tuple[list[Result], Result | None]:
    """Every system measured, and the keepalived one that is like-for-like with Tandem (if measured)."""
    t_nominal, t_expected = TANDEM_TIMEOUT, tandem_expected_detection()
    name = f"tandem pulse {TANDEM_PULSE:g}s timeout {TANDEM_TIMEOUT:g}s"
    out = [Result(name, run_tandem, "cold", t_nominal, t_expected)]
    if not args.no_replicated:
        out.append(
            Result(
                "tandem + ReplicatedDir (notes app)",
                lambda w, f: run_tandem(w, f, replicated=True),
                "cold+repl",
                t_nominal,
                t_expected,
            )
        )
    if args.garp_count is not None:
        out.append(
            Result(
                f"tandem gratuitousArp.count {args.garp_count}",
                lambda w, f: run_tandem(w, f, args.garp_count),
                "cold",
                t_nominal,
                t_expected,
            )
        )
    like: Result | None = None
    for names, cold in ((args.adverts, False), (args.cold_adverts, True)):
        for name in filter(None, names.split(",")):
            a = advert_for(name)
            setting = {"expected": "same expected detection", "nominal": "same nominal timeout", "pulse": "same pulse"}
            res = Result(
                f"keepalived advert_int {a:g} {'cold' if cold else 'hot'} ({setting.get(name, 'as given')})",
                lambda w, f, a=a, cold=cold: run_keepalived(w, f, a, cold),
                "cold" if cold else "hot",
                detection(a),
                expected_detection(a),
            )
            out.append(res)
            if cold and name == "expected":
                like = res
    return out, like


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per system (default 5)")
    parser.add_argument("--quick", action="store_true", help="2 runs per system")
    parser.add_argument(
        "--adverts",
        default="expected,nominal,pulse",
        help="keepalived advert_int values with the app on both nodes (hot): expected = same expected detection"
        " as Tandem, nominal = master-down closest to Tandem's timeout, pulse = Tandem's pulse, or seconds",
    )
    parser.add_argument(
        "--cold-adverts",
        default="expected",
        help="keepalived advert_int values with the app started by notify_master (cold standby), as --adverts",
    )
    parser.add_argument("--no-replicated", action="store_true", help="skip the Tandem variant with a ReplicatedDir")
    parser.add_argument(
        "--garp-count", type=int, help="also run Tandem with VirtualIP gratuitousArp.count=N (default: not run)"
    )
    parser.add_argument("--no-heal", action="store_true", help="skip the Tandem partition-heal measure")
    parser.add_argument(
        "--phases",
        choices=("stratified", "random"),
        default="stratified",
        help="where in the heartbeat / advert cycle each failure lands: stratified (default) = the N runs of a"
        " system at the N midpoints of N equal slices of its cycle, in random order, timed from a beat seen on"
        " node2; random = after a random 0-1 s delay",
    )
    parser.add_argument("--timelines", action="store_true", help="print node2's daemon log after each Tandem failure")
    parser.add_argument("--keep", type=Path, help="keep every run's work dir (logs) under this directory")
    parser.add_argument("--json", type=Path, help="also write all figures as JSON to this file")
    args = parser.parse_args(argv)
    runs = 2 if args.quick else args.runs
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    if not Path(KEEPALIVED).exists():
        print(f"{KEEPALIVED} is missing: apt-get install -y keepalived", file=sys.stderr)
        return 2
    systems, like = variants(args)
    tandem = systems[0]

    def on_signal(signum: int, frame: object) -> None:
        # The first Ctrl-C or SIGTERM unwinds every `with Lab` (Lab.down); later ones must not interrupt that.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    # Explicitly: a background job started by a non-interactive shell inherits SIGINT ignored.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    cleanup_stale(PREFIX)
    base = args.keep or Path(tempfile.mkdtemp(prefix="tandem-bench-failover-"))
    base.mkdir(parents=True, exist_ok=True)
    heals: list[dict[str, Any]] = []
    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    cmd = " ".join([".venv/bin/python -m bench.failover", *(argv if argv is not None else sys.argv[1:])])
    width = max(len(r.system) for r in systems) + 1
    fractions = {r.system: random.sample([(k + 0.5) / runs for k in range(runs)], runs) for r in systems}
    try:
        for i in range(runs):
            jobs = list(systems)
            random.shuffle(jobs)
            for res in jobs:
                # the work dir appears in shell scripts (startPrim, notify): letters, digits, dots and dashes only
                work = base / f"{re.sub(r'[^A-Za-z0-9.]+', '-', res.system).strip('-')}-{i + 1}"
                work.mkdir(parents=True, exist_ok=True)
                fig = res.job(work, fractions[res.system][i] if args.phases == "stratified" else None)
                res.failover.append(fig["failover"])
                res.details.append(fig)
                marks = " ".join(f"{k}=+{fig[k]:.3f}" for k in MARKS if k in fig)
                marks = f" node2 log: {marks}" if marks else ""
                since = f", {fig['since_beat'] * 1000:.0f} ms after a beat" if fig["since_beat"] is not None else ""
                print(
                    f"run {i + 1}/{runs} {res.system:<{width}} failover {fig['failover']:.3f} s{since}"
                    f" (VIP moved +{fig['vip_moved']:.3f} s, last node1 answer +{fig['last_node1_answer']:.3f} s,"
                    f" {fig['failed_attempts']} failed attempts {','.join(fig['errors'])}){marks}",
                    flush=True,
                )
                if args.timelines and "timeline" in fig:
                    print("\n".join("      " + ln for ln in fig["timeline"]), flush=True)
            if not args.no_heal:
                work = base / f"tandem-heal-{i + 1}"
                work.mkdir(parents=True, exist_ok=True)
                h = run_tandem_heal(work)
                heals.append(h)
                r = "never" if h["reachable"] is None else f"{h['reachable']:.3f} s"
                sw = f"+{h['switch_at']:.3f} s" if h["switch_at"] is not None else "no"
                print(
                    f"run {i + 1}/{runs} {'tandem partition heal':<{width}} reachable steadily after {r}"
                    f" ({h['failed_attempts']} failed attempts, served by {h['served_by']},"
                    f" client switched node {sw}, roles settled +{h['settled']:.2f} s, during split {h['split']})",
                    flush=True,
                )
                if args.timelines:
                    print("\n".join("      node1 " + ln for ln in h["timeline1"]))
                    print("\n".join("      node2 " + ln for ln in h["timeline2"]), flush=True)
    except KeyboardInterrupt:
        print("interrupted; labs removed", file=sys.stderr)
        return 130
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
        cleanup_stale(PREFIX)
    report(systems, like, heals, runs=runs, cmd=cmd, started=started, load=(load_before, os.getloadavg()))
    if args.json:
        data = {
            "command": cmd,
            "date": started.isoformat(),
            "machine": machine(),
            "systems": {
                r.system: {"standby": r.standby, "nominal": r.nominal, "expected": r.expected, "runs": r.details}
                for r in systems
            },
            "like_for_like": [tandem.system, like.system] if like else None,
            "heal": heals,
        }
        args.json.write_text(json.dumps(data, indent=1, default=str))
    return 0


def report(
    systems: list[Result],
    like: Result | None,
    heals: list[dict[str, Any]],
    *,
    runs: int,
    cmd: str,
    started: datetime.datetime,
    load: tuple[tuple[float, ...], tuple[float, ...]],
) -> None:
    """The summary: every system with its detection, then the like-for-like verdict."""
    tandem = systems[0]
    tm = tandem.median
    print()
    print(f"# {cmd}")
    print(f"# {started:%Y-%m-%d %H:%M %Z}; {machine()}")
    print(
        "# machine shared with other benchmarks: load average (1 min) "
        f"{load[0][0]:.2f} at the start, {load[1][0]:.2f} at the end"
    )
    print(f"failover: failure -> first answer from node2 through the VIP, {runs} runs each (s)")
    print(
        "detection: nominal = Tandem's timeout / keepalived's master-down interval (3 x advert + skew);"
        " expected = its mean at a random failure phase (timeout - pulse/2; master-down - advert/2)"
    )
    width = max(len(r.system) for r in systems) + 1
    print(
        f"{'system':<{width}} {'standby':<9} {'detection nominal/expected':<27} {'min / median / max':<20}"
        f" {'median - expected detection':<28} {'Tandem median - this':<21} comparison"
    )
    for r in systems:
        kind = "Tandem" if r is tandem else ("LIKE-FOR-LIKE" if r is like else "context")
        print(
            f"{r.system:<{width}} {r.standby:<9} {f'{r.nominal:.3f} / {r.expected:.3f}':<27}"
            f" {fmt_stats(r.failover):<20} {f'{r.median - r.expected:+.3f}':<28} {f'{tm - r.median:+.3f}':<21} {kind}"
        )
    moved = [f"{r.system}: {statistics.median(d['vip_moved'] for d in r.details):.3f}" for r in systems]
    print(f"median failure -> VIP answers from node2 (a reply or an RST, app up or not): {'; '.join(moved)}")
    for r in systems:
        parts = [(k, [d[k] for d in r.details if k in d]) for k in MARKS]
        if any(v for _, v in parts):
            print(
                f"{r.system}, node2's log, median time since the failure: "
                + ", ".join(f"{k} +{statistics.median(v):.3f}" for k, v in parts if v)
            )
    if heals:
        vals = [h["reachable"] for h in heals if h["reachable"] is not None]
        never = sum(h["reachable"] is None for h in heals)
        nev = f", {never} never recovered" if never else ""
        print(
            f"tandem partition heal -> VIP steadily reachable: {fmt_stats(vals)} s"
            f" ({sum(h['failed_attempts'] for h in heals)} failed attempts in {len(heals)} heals{nev})"
        )
    print(
        "like-for-like: Tandem (cold) vs keepalived cold at the same expected detection: the same app started at"
        " takeover by the same commands. keepalived hot (app already running on the backup, a stateless service)"
        " and the nominal-timeout / same-pulse settings are context, not like-for-like."
    )
    target = TANDEM_TIMEOUT + 0.5
    verdict = f"target median <= timeout + 0.5 s = {target:.1f} s: {'met' if tm <= target else 'NOT met'} ({tm:.3f} s)"
    if like is not None:
        lm = like.median
        word = "met" if tm <= lm else f"NOT met, Tandem {tm - lm:.3f} s slower"
        verdict += f"; no worse than keepalived (like-for-like, {like.system}): {word} ({tm:.3f} vs {lm:.3f} s)"
    print(verdict)


if __name__ == "__main__":
    sys.exit(main())
