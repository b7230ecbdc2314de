"""The replicator command line the agent's supervisor builds from a ReplicatedDir's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.replication.replicator import parse_args
from agent.replication.supervisor import Replicator


def test_keep_cpus_awake_false_turns_the_pm_qos_request_off() -> None:
    on = Replicator(directory=Path("/srv/d"), role="secondary", node="n2", listen=("127.0.0.1", 7000))
    off = Replicator(
        directory=Path("/srv/d"), role="primary", node="n1", peer=("127.0.0.1", 7000), keep_cpus_awake=False
    )
    assert "--keep-cpus-awake" not in on.args()
    assert parse_args(on.args()).keep_cpus_awake > 0
    assert parse_args(off.args()).keep_cpus_awake == 0


def test_exclude_patterns_reach_the_primary_as_given_and_bad_ones_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    patterns = ("*.tmp", "-odd name*", "cache/*")
    primary = Replicator(
        directory=Path("/srv/d"), role="primary", node="n1", peer=("127.0.0.1", 7000), exclude=patterns
    )
    assert parse_args(primary.args()).exclude == list(patterns)
    assert parse_args(["--role", "primary", "--dir", "/srv/d", "--peer", "127.0.0.1:1"]).exclude == []
    with pytest.raises(SystemExit) as exited:
        parse_args(["--role", "primary", "--dir", "/srv/d", "--peer", "127.0.0.1:1", "--exclude", "../x"])
    assert exited.value.code == 2
    assert "'..' component" in capsys.readouterr().err
