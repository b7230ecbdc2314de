"""Real applications through the primary's mount: SQLite and PostgreSQL find their data whole on the copy."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.replication.pairs import Pair
from tests.postgres import Postgres, pg_bin

WRITERS, TRANSACTIONS = 3, 200

SQLITE_WRITER = """
import sqlite3, sys
db, writer, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
con = sqlite3.connect(db, timeout=60, isolation_level=None)
con.execute("PRAGMA synchronous=FULL")
for i in range(count):
    con.execute("BEGIN IMMEDIATE")
    con.execute("INSERT INTO t (writer, n, payload) VALUES (?, ?, randomblob(300))", (writer, i))
    con.execute("COMMIT")
con.close()
"""

# Prints each id only after COMMIT returned: the printed ids are the acknowledged ones.
SQLITE_CLIENT = """
import sqlite3, sys
db, acked = sys.argv[1], open(sys.argv[2], "w", buffering=1)
con = sqlite3.connect(db, timeout=60, isolation_level=None)
con.execute("PRAGMA synchronous=FULL")
i = 0
while True:
    i += 1
    con.execute("BEGIN IMMEDIATE")
    con.execute("INSERT INTO t (id, payload) VALUES (?, randomblob(200))", (i,))
    con.execute("COMMIT")
    print(i, file=acked)
"""


def _create_db(path: Path, schema: str) -> None:
    con = sqlite3.connect(path, isolation_level=None)
    try:
        assert con.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
        con.execute(schema)
    finally:
        con.close()


def _check_copy(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path, isolation_level=None)
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    return con


@pytest.mark.slow
def test_sqlite_wal_concurrent_writers_reach_the_copy_whole(pair: Pair) -> None:
    pair.start("received")
    db = pair.primary_dir / "app.db"
    _create_db(db, "CREATE TABLE t (id INTEGER PRIMARY KEY, writer INT, n INT, payload BLOB)")
    writers = [
        subprocess.Popen([sys.executable, "-c", SQLITE_WRITER, str(db), str(w), str(TRANSACTIONS)])
        for w in range(WRITERS)
    ]
    try:
        codes = [p.wait(120) for p in writers]
    finally:
        for p in writers:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0] * WRITERS
    assert pair.stop("primary") == 0, pair.log("primary")
    assert pair.stop("secondary") == 0, pair.log("secondary")
    con = _check_copy(pair.secondary_dir / "app.db")
    try:
        assert con.execute("SELECT count(*) FROM t").fetchone() == (WRITERS * TRANSACTIONS,)
        per_writer = dict(con.execute("SELECT writer, count(DISTINCT n) FROM t GROUP BY writer").fetchall())
        assert per_writer == dict.fromkeys(range(WRITERS), TRANSACTIONS)
    finally:
        con.close()
    logs = pair.log("primary") + pair.log("secondary")
    assert "ERROR" not in logs and "Traceback" not in logs, logs


def _wait_acked(path: Path, at_least: int, client: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while len(path.read_text().split()) < at_least:
        assert client.poll() is None, "the client died before the primary was killed"
        assert time.monotonic() < deadline, "the client made no progress through the mount"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("ack", ["received", "durable", "fsync"])
def test_every_acknowledged_commit_survives_killing_the_primary(pair: Pair, tmp_path: Path, ack: str) -> None:
    pair.start(ack)
    db, acked = pair.primary_dir / "app.db", tmp_path / "acked.txt"
    _create_db(db, "CREATE TABLE t (id INTEGER PRIMARY KEY, payload BLOB)")
    acked.touch()
    client = subprocess.Popen([sys.executable, "-c", SQLITE_CLIENT, str(db), str(acked)], stderr=subprocess.DEVNULL)
    try:
        _wait_acked(acked, 150, client)
        pair.kill("primary")  # the FUSE daemon dies mid-transaction; the client gets errors
        client.wait(30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    pair.stop("primary")  # lazily unmounts the dead mount
    assert pair.stop("secondary") == 0, pair.log("secondary")
    ids = [int(line) for line in acked.read_text().split()]
    con = _check_copy(pair.secondary_dir / "app.db")
    try:
        present = {row[0] for row in con.execute("SELECT id FROM t")}
    finally:
        con.close()
    assert set(ids) <= present, f"acknowledged but lost: {sorted(set(ids) - present)[:20]}"
    assert max(present) <= max(ids) + 1  # at most the commit in flight when the primary died


@pytest.fixture
def pg_pair() -> Iterator[tuple[Pair, Path]]:
    """A pair under a directory the postgres user can traverse (pytest's tmp_path is root-only)."""
    if pg_bin() is None:
        pytest.fail("PostgreSQL is missing: apt-get install -y postgresql")
    base = Path(tempfile.mkdtemp(prefix="tandem-pg-"))
    try:
        base.chmod(0o755)
        p = Pair(base / "node1" / "data", base / "node2" / "data", base)
        for d in (p.primary_dir, p.secondary_dir, base / "run"):
            d.mkdir(parents=True)
            d.chmod(0o755)
        shutil.chown(base / "run", "postgres", "postgres")
        try:
            yield p, base / "run"
        finally:
            p.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_postgresql_pgbench_data_is_whole_on_the_copy(pg_pair: tuple[Pair, Path]) -> None:
    pair, run = pg_pair
    bin_dir = pg_bin()
    assert bin_dir is not None
    pair.start("received")
    pgdata = pair.primary_dir / "pg"
    pgdata.mkdir(mode=0o700)
    shutil.chown(pgdata, "postgres", "postgres")  # through the mount, so the copy gets the owner too
    primary = Postgres(bin_dir, pgdata, run)
    try:
        primary.initdb()
        primary.start()
        primary.client("pgbench", "-U", "postgres", "-i", "-s", "1", "postgres")
        primary.client("pgbench", "-U", "postgres", "-T", "5", "-c", "2", "postgres")
        committed = primary.scalar("SELECT sum(abalance) FROM pgbench_accounts")
        primary.stop()
    finally:
        primary.stop(check=False)
    assert pair.stop("primary") == 0, pair.log("primary")
    assert pair.stop("secondary") == 0, pair.log("secondary")
    copy = Postgres(bin_dir, pair.secondary_dir / "pg", run)
    try:
        copy.start()
        assert copy.scalar("SELECT count(*) FROM pgbench_accounts") == "100000"
        assert copy.scalar("SELECT count(*) FROM pgbench_branches") == "1"
        assert copy.scalar("SELECT sum(abalance) FROM pgbench_accounts") == committed
        copy.stop()
    finally:
        copy.stop(check=False)
    logs = pair.log("primary") + pair.log("secondary")
    assert "ERROR" not in logs and "Traceback" not in logs, logs
