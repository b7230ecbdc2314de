"""The resource models: SafeKit's defaults, the Kubernetes shape, and per-object validation."""

from typing import Any

import pytest
from pydantic import ValidationError

from controller.resources import Checker, Cluster, Module, ReplicatedDir, VirtualIP


def module(**spec: Any) -> Module:
    return Module.model_validate({"kind": "Module", "metadata": {"name": "app"}, "spec": {"nodes": ["a", "b"], **spec}})


def errors(exc: pytest.ExceptionInfo[ValidationError]) -> list[tuple[tuple[Any, ...], str]]:
    return [(e["loc"], e["msg"]) for e in exc.value.errors()]


def test_a_module_gets_safekit_defaults() -> None:
    spec = module().spec
    assert (spec.heartbeat.pulse, spec.heartbeat.timeout) == ("700ms", "30s")
    assert (spec.restart.max_loop, spec.restart.loop_interval) == (3, "24h")
    assert (spec.stop_timeouts.graceful, spec.stop_timeouts.force) == ("300s", "300s")
    assert spec.mode == "mirror" and spec.failover and not spec.auto_swap and not spec.boot_start


def test_resources_round_trip_in_camel_case() -> None:
    data = module(preferredPrimary="b", autoSwap=True, processes=[{"name": "app", "class": "both"}]).to_dict()
    assert data["apiVersion"] == "tandem.dev/v1alpha1"
    assert data["spec"]["preferredPrimary"] == "b" and data["spec"]["autoSwap"] is True
    assert data["spec"]["processes"][0]["class"] == "both"
    assert Module.model_validate(data).to_dict() == data


def test_unknown_fields_are_errors_even_in_snake_case() -> None:
    with pytest.raises(ValidationError) as exc:
        module(preferred_primary="a")
    assert errors(exc) == [(("spec", "preferred_primary"), "Extra inputs are not permitted")]


def test_a_mirror_module_has_exactly_two_nodes() -> None:
    with pytest.raises(ValidationError, match="a mirror module has exactly 2 nodes, this one has 3"):
        module(nodes=["a", "b", "c"])
    farm = module(mode="farm", nodes=["a", "b", "c"])
    assert farm.spec.nodes == ["a", "b", "c"]


def test_heartbeat_timeout_must_cover_three_pulses_and_names_both_fields() -> None:
    with pytest.raises(
        ValidationError, match=r"heartbeat.timeout \(1s\) must be at least 3 x heartbeat.pulse \(500ms\)"
    ):
        module(heartbeat={"pulse": "500ms", "timeout": "1s"})


def test_preferred_primary_must_be_a_node_of_the_module() -> None:
    with pytest.raises(ValidationError, match="'c' is not one of the module's nodes"):
        module(preferredPrimary="c")


@pytest.mark.parametrize("name", ["Web", "web_1", "-web", "web-", "a" * 64, ""])
def test_names_are_dns_labels(name: str) -> None:
    with pytest.raises(ValidationError, match="DNS-1123 label"):
        Module.model_validate({"kind": "Module", "metadata": {"name": name}, "spec": {"nodes": ["a", "b"]}})


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("var/lib/x", "not an absolute path"),
        ("/", "root directory"),
        ("/var/../etc", "not a normalized path"),
        ("/var//lib", "not a normalized path"),
        ("/var/lib/", "not a normalized path"),
    ],
)
def test_replicated_paths_are_absolute_and_normalized(path: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ReplicatedDir.model_validate(
            {"kind": "ReplicatedDir", "metadata": {"name": "d"}, "spec": {"module": "m", "path": path}}
        )


@pytest.mark.parametrize("address", ["10.0.0.300/24", "10.0.0.1", "fe80::1/200", "vip"])
def test_a_virtual_ip_is_a_valid_cidr(address: str) -> None:
    with pytest.raises(ValidationError, match="CIDR"):
        VirtualIP.model_validate(
            {"kind": "VirtualIP", "metadata": {"name": "v"}, "spec": {"module": "m", "address": address}}
        )


def test_checkers_require_the_fields_of_their_type_and_refuse_others() -> None:
    def checker(**spec: Any) -> Checker:
        return Checker.model_validate({"kind": "Checker", "metadata": {"name": "c"}, "spec": {"module": "m", **spec}})

    with pytest.raises(ValidationError, match="port: required for a checker of type tcp"):
        checker(type="tcp", host="127.0.0.1")
    with pytest.raises(ValidationError, match="command: not used by a checker of type ping"):
        checker(type="ping", host="127.0.0.1", command="true")
    assert checker(type="splitbrain", witness="192.0.2.1").spec.witnesses == ["192.0.2.1"]
    assert checker(type="splitbrain", witness=["192.0.2.1", "2001:db8::1"]).spec.witnesses == [
        "192.0.2.1",
        "2001:db8::1",
    ]
    assert checker(type="module", targetModule="db").spec.failure_action == "wait"
    assert checker(type="tcp", host="h", port=1).spec.failure_action == "restart"


def test_a_cluster_node_needs_an_address_on_every_network() -> None:
    with pytest.raises(ValidationError, match="node 'b' has no address on network 'backup'"):
        Cluster.model_validate(
            {
                "kind": "Cluster",
                "metadata": {"name": "c"},
                "spec": {
                    "networks": ["lan", "backup"],
                    "nodes": [
                        {"name": "a", "addresses": {"lan": "10.0.0.1", "backup": "10.1.0.1"}},
                        {"name": "b", "addresses": {"lan": "10.0.0.2"}},
                    ],
                },
            }
        )


def _rdir(**spec: Any) -> ReplicatedDir:
    return ReplicatedDir.model_validate(
        {"kind": "ReplicatedDir", "metadata": {"name": "d"}, "spec": {"module": "m", "path": "/srv/d", **spec}}
    )


def test_replicated_dirs_keep_cpus_awake_unless_told_not_to() -> None:
    assert _rdir().spec.keep_cpus_awake is True
    assert _rdir(keepCpusAwake=False).spec.keep_cpus_awake is False
    with pytest.raises(ValidationError, match="keepCpusAwake"):
        _rdir(keepCpusAwake="sometimes")


def test_exclude_patterns_are_relative_globs_and_bad_ones_are_named() -> None:
    assert _rdir(exclude=[]).spec.exclude == []
    assert _rdir(exclude=["*.tmp", "cache/*", "logs/"]).spec.exclude == ["*.tmp", "cache/*", "logs/"]
    for bad, problem in [
        ("../etc/*", "has an empty, '.' or '..' component"),
        ("/etc/*", "must be relative to the directory"),
        ("a//b", "has an empty, '.' or '..' component"),
        ("**/*.log", "'\\*\\*' is not supported"),
        ("", "must be relative to the directory"),
    ]:
        with pytest.raises(ValidationError, match=problem):
            _rdir(exclude=["ok", bad])
