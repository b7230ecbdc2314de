"""How the CLI shows resources: kubectl-like tables, YAML/JSON, and describe."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Sequence
from typing import Any

import yaml

Row = Callable[[dict[str, Any]], str]


def _spec(key: str) -> Row:
    return lambda r: _text(r.get("spec", {}).get(key))


def _ready(resource: dict[str, Any]) -> str:
    for cond in (resource.get("status") or {}).get("conditions", []):
        if cond.get("type") == "Ready":
            return str(cond.get("status"))
    return "-"


def _checker_target(resource: dict[str, Any]) -> str:
    spec = resource.get("spec", {})
    if spec.get("host") and spec.get("port"):
        return f"{spec['host']}:{spec['port']}"
    for key in ("host", "interface", "address", "command", "targetModule", "witness"):
        if spec.get(key):
            return _text(spec[key])
    return "-"


def age(resource: dict[str, Any], now: datetime.datetime | None = None) -> str:
    created = resource.get("metadata", {}).get("creationTimestamp")
    if not created:
        return "-"
    then = datetime.datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    seconds = int(((now or datetime.datetime.now(datetime.UTC)) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _text(value: Any) -> str:
    if value is None or value == [] or value == {}:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(_text(v) for v in value)
    return str(value)


COLUMNS: dict[str, list[tuple[str, Row]]] = {
    "Cluster": [
        ("NETWORKS", _spec("networks")),
        ("NODES", lambda r: ",".join(n["name"] for n in r["spec"]["nodes"])),
    ],
    "Module": [("MODE", _spec("mode")), ("NODES", _spec("nodes")), ("READY", _ready)],
    "ReplicatedDir": [("MODULE", _spec("module")), ("PATH", _spec("path")), ("ACK", _spec("ack"))],
    "VirtualIP": [("MODULE", _spec("module")), ("ADDRESS", _spec("address")), ("INTERFACE", _spec("interface"))],
    "Checker": [("MODULE", _spec("module")), ("TYPE", _spec("type")), ("TARGET", _checker_target)],
}
WIDE: dict[str, list[tuple[str, Row]]] = {
    "Cluster": [("SECRET", _spec("secretFile"))],
    "Module": [
        ("PREFERRED", _spec("preferredPrimary")),
        ("AUTOSWAP", _spec("autoSwap")),
        ("BOOTSTART", _spec("bootStart")),
        ("PULSE/TIMEOUT", lambda r: "{pulse}/{timeout}".format(**r["spec"]["heartbeat"])),
    ],
    "ReplicatedDir": [("SPLITBRAIN", _spec("splitBrain")), ("EXCLUDE", _spec("exclude"))],
    "VirtualIP": [("GARP", lambda r: "{count}x{interval}".format(**r["spec"]["gratuitousArp"]))],
    "Checker": [("INTERVAL", _spec("interval")), ("FAILURES", _spec("failures")), ("ONFAILURE", _spec("onFailure"))],
}
COMMON_WIDE: list[tuple[str, Row]] = [
    ("GENERATION", lambda r: _text(r["metadata"].get("generation"))),
    ("VERSION", lambda r: _text(r["metadata"].get("resourceVersion"))),
]


def table(kind: str, items: Sequence[dict[str, Any]], *, wide: bool = False, with_kind: bool = False) -> str:
    columns: list[tuple[str, Row]] = [
        ("NAME", lambda r: (f"{r['kind']}/" if with_kind else "") + r["metadata"]["name"])
    ]
    columns += COLUMNS[kind]
    if wide:
        columns += WIDE[kind] + COMMON_WIDE
    columns.append(("AGE", age))
    rows = [[title for title, _ in columns]] + [[fn(item) for _, fn in columns] for item in items]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join("   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def dump(data: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip()


def describe(resource: dict[str, Any]) -> str:
    meta = resource["metadata"]
    lines = [
        f"Name:             {meta['name']}",
        f"Kind:             {resource['kind']}",
        f"Labels:           {_pairs(meta.get('labels'))}",
        f"Annotations:      {_pairs(meta.get('annotations'))}",
        f"Generation:       {meta.get('generation', '-')}",
        f"Resource version: {meta.get('resourceVersion', '-')}",
        f"Created:          {meta.get('creationTimestamp', '-')} ({age(resource)} ago)",
        "Spec:",
        _indent(dump(resource.get("spec", {}), "yaml")),
    ]
    status = resource.get("status") or {}
    lines.append(f"Observed generation: {status.get('observedGeneration', '-')}")
    conditions = status.get("conditions") or []
    lines.append("Conditions:" + ("" if conditions else " <none>"))
    if conditions:
        rows = [["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"]] + [
            [c["type"], c["status"], c.get("reason", ""), c.get("lastTransitionTime", ""), c.get("message", "")]
            for c in conditions
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines += [
            "  " + "  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows
        ]
    return "\n".join(lines)


def _pairs(values: dict[str, str] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (values or {}).items()) or "<none>"


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def status_table(rows: Sequence[dict[str, Any]]) -> str:
    """`tandem status`: one line per module and node."""
    header = ["MODULE", "NODE", "STATE", "SERVING", "REPLICATION", "REASON", "MESSAGE"]
    lines = [header] + [
        [
            r["module"],
            r["node"],
            r["state"] + (f" -> {r['transition']['to']} ({r['transition']['step']})" if r.get("transition") else ""),
            "yes" if r["serving"] else "no",
            r["replication"]["state"],
            r.get("reason", ""),
            r.get("message", ""),
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "   ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True)) + "   " + line[-1]
        for line in lines
    )
