"""The network-namespace lab: real namespaces, bridges, links, mounts and processes, and nothing left after down()."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.lab import NETNS_DIR, REGISTRY, Host, Lab, LabError, cleanup_stale, remove_lab
from tests.daemons import process_state, wait_for

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "nsenter", "unshare", "findmnt")),
    reason="the lab needs root, iproute2 and util-linux",
)

FUSE_HELLO = """\
import asyncio, errno, stat, sys
import pyfuse3, pyfuse3.asyncio

class Hello(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino, attr.st_mode, attr.st_nlink = inode, stat.S_IFDIR | 0o755, 2
        return attr

async def main(path):
    pyfuse3.init(Hello(), path, {"fsname=tlab-hello"})
    await pyfuse3.main()

pyfuse3.asyncio.enable()
asyncio.run(main(sys.argv[1]))
"""


def ns_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _ns_or_none(path: str) -> tuple[int, int] | None:
    try:
        return ns_id(path)
    except OSError:
        return None


def alive(pid: int) -> bool:
    return process_state(pid) not in ("Z", "X", "")


def traces(name: str) -> list[str]:
    """Everything on the host that still carries the lab's name: namespaces, mounts, registry, work dir."""
    left = [f"netns {p.name}" for p in NETNS_DIR.glob(f"{name}*")]
    left += [f"mount {line}" for line in Path("/proc/mounts").read_text().splitlines() if name in line]
    left += [f"path {p}" for p in (REGISTRY / name, Path("/tmp") / name) if p.exists()]
    return left


@pytest.fixture
def lab() -> Iterator[Lab]:
    the_lab = Lab("tlab-", witness=True)
    with the_lab:
        yield the_lab
    assert traces(the_lab.name) == []


def test_every_host_reaches_every_other_on_every_shared_network(lab: Lab) -> None:
    for src in lab.hosts.values():
        for dst in lab.hosts.values():
            for net in set(src.addresses) & set(dst.addresses):
                if src is not dst:
                    assert lab.ping(src.name, dst.address(net)), f"{src.name} -> {dst.name} on {net}"
    assert lab["client"].addresses == {"lan": "10.77.1.100"}
    assert lab["node1"].addresses == {"lan": "10.77.1.11", "backup": "10.77.2.11"}


def test_a_cut_network_stops_traffic_on_it_only_and_heal_restores_it(lab: Lab) -> None:
    node2 = lab["node2"]
    lab.cut("node2", "lan")
    assert not lab.ping("node1", node2.address("lan"), timeout=0.5)
    assert not lab.ping("client", node2.address("lan"), timeout=0.5)
    assert lab.ping("node1", node2.address("backup"))
    assert "NO-CARRIER" in node2.run(["ip", "-o", "link", "show", "lan"]).stdout
    lab.heal("node2", "lan")
    assert lab.ping("node1", node2.address("lan"))
    assert lab.ping("client", node2.address("lan"))


def test_isolate_cuts_every_network_and_heal_without_network_restores_all(lab: Lab) -> None:
    node1 = lab["node1"]
    lab.isolate("node1")
    for net in ("lan", "backup"):
        assert not lab.ping("node2", node1.address(net), timeout=0.5)
    assert lab.ping("node2", lab["client"].address("lan"))
    lab.heal("node1")
    for net in ("lan", "backup"):
        assert lab.ping("node2", node1.address(net))


def test_the_same_path_shows_each_node_its_own_contents_and_the_host_neither(lab: Lab) -> None:
    target = Path(f"/var/lib/tlab-test-{secrets.token_hex(3)}/data")
    backing = lab.private_path(target)
    assert set(backing) == {"node1", "node2"}
    for node in ("node1", "node2"):
        lab[node].run(f"echo I am {node} > {target}/who")
    for node in ("node1", "node2"):
        assert lab[node].run(["cat", f"{target}/who"]).stdout == f"I am {node}\n"
        assert (backing[node] / "who").read_text() == f"I am {node}\n"
    assert target.is_dir() and list(target.iterdir()) == []
    assert lab["client"].run(["ls", "-A", str(target)]).stdout == ""
    lab.down()
    assert not target.parent.exists()


def test_a_spawned_process_lives_in_its_nodes_namespaces_and_dies_at_down(lab: Lab, tmp_path: Path) -> None:
    node1 = lab["node1"]
    proc = lab.spawn("node1", "ip -o -4 addr; exec sleep 600", tmp_path / "sleeper.log")
    wait_for("the process to print its addresses", lambda: "lan" in proc.log_path.read_text())
    assert node1.address("lan") in proc.log_path.read_text()
    assert node1.address("backup") in proc.log_path.read_text()
    assert ns_id(f"/proc/{proc.pid}/ns/net") == ns_id(node1.netns_path)
    assert ns_id(f"/proc/{proc.pid}/ns/mnt") != ns_id("/proc/self/ns/mnt")
    assert ns_id(f"/proc/{proc.pid}/ns/mnt") != ns_id(f"/proc/{lab['node2'].pid}/ns/mnt")
    # A process that left the lab's process groups is found by its namespaces.
    node1.run("setsid sleep 600 > /dev/null 2>&1 < /dev/null &")
    escaped = wait_for("the escaped process", lambda: _pids_of_in("sleep", node1.netns_path) - {proc.pid, node1.pid})
    lab.down()
    assert not proc.alive()
    assert not any(alive(pid) for pid in escaped)


def _pids_of_in(comm: str, netns_path: str) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if (entry / "comm").read_text().strip() == comm and ns_id(f"{entry}/ns/net") == ns_id(netns_path):
                found.add(int(entry.name))
        except (OSError, ValueError):
            continue
    return found


def test_stop_ends_a_spawned_process_group(lab: Lab, tmp_path: Path) -> None:
    proc = lab["node2"].spawn("sleep 600 & sleep 600 & wait", tmp_path / "group.log")
    sleeper = lab["node2"].pid
    children = wait_for(
        "both children", lambda: len(c := _pids_of_in("sleep", lab["node2"].netns_path) - {sleeper}) == 2 and c
    )
    assert proc.stop(grace=1.0) != 0
    wait_for("the children to go", lambda: not any(alive(pid) for pid in children))
    assert alive(sleeper)


def test_down_leaves_no_namespace_link_mount_or_process_and_may_be_called_twice(tmp_path: Path) -> None:
    lab = Lab("tlab-").up()
    lab.private_path("/srv/tlab-test-down")
    proc = lab.spawn("node1", ["sleep", "600"], tmp_path / "sleep.log")
    assert len(lab["node1"].run(["ip", "-o", "link"]).stdout.splitlines()) == 3
    pids = [proc.pid, *(h.pid for h in lab.hosts.values())]
    assert len(traces(lab.name)) > len(lab.hosts)
    lab.down()
    assert traces(lab.name) == []
    assert not any(alive(p) for p in pids)
    assert not Path("/srv/tlab-test-down").exists()
    lab.down()


def test_down_also_ends_a_process_started_while_the_others_stop(tmp_path: Path) -> None:
    # What a daemon told to stop while it starts a script does: a new session, after down's first look.
    lab = Lab("tlab-").up()
    started = tmp_path / "started"
    script = f"trap 'setsid sleep 600 & echo $! > {started}; exit 0' TERM; while :; do sleep 0.05; done"
    proc = lab.spawn("node1", ["sh", "-c", script], tmp_path / "sh.log")
    wait_for("the shell to run", lambda: _pids_of_in("sh", lab["node1"].netns_path) or None)
    lab.down()
    assert proc.returncode is not None
    late = int(wait_for("the late process to be started", lambda: started.exists() and started.read_text().strip()))
    survived = alive(late)
    if survived:
        os.kill(late, signal.SIGKILL)  # not left behind by a failing run
    assert not survived, "a process started during down survived it"


def test_a_failing_up_removes_what_it_built(monkeypatch: pytest.MonkeyPatch) -> None:
    lab = Lab("tlab-")
    started: list[int] = []
    real = Lab._start_sleeper

    def fail_on_the_second(self: Lab, host: Host) -> None:
        if started:
            raise LabError("injected failure after the namespaces were built")
        real(self, host)
        started.append(lab["node1"].pid)

    monkeypatch.setattr(Lab, "_start_sleeper", fail_on_the_second)
    with pytest.raises(LabError, match="injected failure"):
        lab.up()
    assert traces(lab.name) == []
    assert not alive(started[0])
    lab.down()


def test_an_http_server_on_a_node_answers_the_client(lab: Lab, tmp_path: Path) -> None:
    addr = lab["node1"].address("lan")
    (tmp_path / "index.html").write_text("hello from node1\n")
    lab.spawn(
        "node1", [sys.executable, "-m", "http.server", "--bind", addr, "8080"], tmp_path / "http.log", cwd=tmp_path
    )
    get = f"import urllib.request; print(urllib.request.urlopen('http://{addr}:8080/', timeout=2).read().decode())"

    def answer() -> str | None:
        result = lab["client"].run([sys.executable, "-c", get], check=False, timeout=10)
        return result.stdout if result.returncode == 0 else None

    assert wait_for("the server to answer", answer, timeout=10) == "hello from node1\n\n"
    with pytest.raises(LabError):
        lab["node2"].run([sys.executable, "-c", get.replace(addr, "127.0.0.1")], timeout=10)


def test_a_fuse_mount_in_a_node_is_invisible_elsewhere_and_gone_after_down(lab: Lab, tmp_path: Path) -> None:
    target = f"/run/tlab-test-{secrets.token_hex(3)}"
    lab.private_path(target)
    (tmp_path / "hello.py").write_text(FUSE_HELLO)
    fuse = lab.spawn("node1", [sys.executable, str(tmp_path / "hello.py"), target], tmp_path / "fuse.log")
    wait_for("the FUSE mount", lambda: "tlab-hello" in lab["node1"].run(["cat", "/proc/self/mountinfo"]).stdout)
    mounts = [line.split() for line in lab["node1"].run(["cat", "/proc/self/mountinfo"]).stdout.splitlines()]
    assert any(m[4] == target and m[m.index("-") + 1] == "fuse" for m in mounts)
    assert "tlab-hello" not in lab["node2"].run(["cat", "/proc/self/mountinfo"]).stdout
    assert "tlab-hello" not in Path("/proc/mounts").read_text()
    mount_ns = ns_id(f"/proc/{fuse.pid}/ns/mnt")
    lab.down()
    assert not fuse.alive()
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and _ns_or_none(f"{p}/ns/mnt") == mount_ns]
    assert not Path(target).exists()


def test_nodes_do_not_hold_copies_of_other_namespaces(lab: Lab) -> None:
    assert lab["node1"].run(["findmnt", "-rn", "-t", "nsfs,fuse,fuseblk"], check=False).stdout == ""


def test_cleanup_stale_removes_a_crashed_lab_and_spares_a_live_one() -> None:
    prefix = f"tlab-c{secrets.token_hex(2)}-"
    crash = f"from agent.lab import Lab; import os; print(Lab({prefix!r}).up().name, flush=True); os._exit(1)"
    crashed = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=60).stdout.strip()
    assert traces(crashed)
    with Lab(prefix) as live:
        assert cleanup_stale(prefix) == [crashed]
        assert traces(crashed) == []
        assert live.ping("node1", live["node2"].address("lan"))
        assert cleanup_stale(prefix) == []
    assert traces(live.name) == []
    with pytest.raises(LabError, match="not a lab name"):
        remove_lab("tandem-test-x")


def test_remove_lab_tears_down_a_lab_by_name_from_another_process(tmp_path: Path) -> None:
    lab = Lab("tlab-").up()
    lab.private_path("/srv/tlab-test-remove")
    proc = lab.spawn("node1", ["sleep", "600"], tmp_path / "sleep.log")
    remover = f"from agent.lab import remove_lab; remove_lab({lab.name!r})"
    subprocess.run([sys.executable, "-c", remover], check=True, timeout=60)
    assert traces(lab.name) == []
    assert not Path("/srv/tlab-test-remove").exists()
    proc.wait(5)
    lab.down()


def test_configuration_errors_are_refused_before_anything_is_built() -> None:
    with pytest.raises(LabError, match="network name"):
        Lab("tlab-", networks=["a-very-long-network"])
    with pytest.raises(LabError, match="outside network"):
        Lab("tlab-", subnets={"lan": "10.77.1.0/28"})
    with pytest.raises(LabError, match="host name"):
        Lab("tlab-", nodes=["node1", "node1"])
    with pytest.raises(LabError, match="not up"):
        Lab("tlab-")["node1"].run("true")
    with pytest.raises(LabError, match="prefix"):
        cleanup_stale("")
    lab = Lab("tlab-", nodes=["a-long-node-name"], networks=["lan"], client=False)
    assert lab.network("lan").address(250) == "10.77.1.250"
