"""The `tandem` command: manage resources on a daemon, validate manifests, run a node, run the demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from controller.client import Client, ClientError, server_url
from controller.output import describe, dump, status_table, table
from controller.resources import KINDS, Resource
from controller.resources.manifests import ManifestError, load, read_documents, validate_document

DEFAULT_STATE_DIR = "/var/lib/tandem"


class UsageError(Exception):
    """The command line asks for something that does not exist."""


def resolve_kind(text: str) -> type[Resource]:
    """Accept a kind as kubectl does: Module, module, modules, or a short name (mod)."""
    wanted = text.lower()
    for cls in KINDS.values():
        if wanted in (cls.KIND.lower(), cls.PLURAL, *cls.SHORT_NAMES):
            return cls
    names = ", ".join(c.PLURAL for c in KINDS.values())
    raise UsageError(f"unknown resource type {text!r}: expected one of {names}")


# --- commands that talk to a daemon ----------------------------------------------------------------------


def cmd_apply(args: argparse.Namespace) -> int:
    resources = _read_manifests(args.filename)
    result = _client(args).request(
        "POST",
        "/api/v1/apply",
        {"items": [r.to_dict() for r in resources]},
        query={"dryRun": "true"} if args.dry_run else None,
    )
    suffix = " (dry run)" if args.dry_run else ""
    for item in result["results"]:
        print(f"{item['kind'].lower()}/{item['name']} {item['action']}{suffix}")
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    client = _client(args)
    kinds = list(KINDS.values()) if args.kind == "all" else [resolve_kind(args.kind)]
    if args.name and args.kind == "all":
        raise UsageError("a name needs one resource type, not 'all'")
    if args.name:
        items = [client.get(f"/api/v1/{kinds[0].PLURAL}/{args.name}")]
    else:
        items = [item for cls in kinds for item in client.get(f"/api/v1/{cls.PLURAL}")["items"]]
    if args.output in ("yaml", "json"):
        single = args.name is not None
        print(dump(items[0] if single else {"apiVersion": "v1", "kind": "List", "items": items}, args.output))
    elif args.output == "name":
        for item in items:
            print(f"{item['kind'].lower()}/{item['metadata']['name']}")
    elif not items:
        print("No resources found.", file=sys.stderr)
    else:
        blocks = []
        for cls in kinds:
            mine = [i for i in items if i["kind"] == cls.KIND]
            if mine:
                blocks.append(table(cls.KIND, mine, wide=args.output == "wide", with_kind=args.kind == "all"))
        print("\n\n".join(blocks))
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    cls = resolve_kind(args.kind)
    print(describe(_client(args).get(f"/api/v1/{cls.PLURAL}/{args.name}")))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    cls = resolve_kind(args.kind)
    query = {"resourceVersion": args.resource_version} if args.resource_version else None
    _client(args).request("DELETE", f"/api/v1/{cls.PLURAL}/{args.name}", query=query)
    print(f"{cls.KIND.lower()}/{args.name} deleted")
    return 0


def _node_urls(client: Client) -> dict[str, str]:
    """Every node's API URL from the Cluster, as the server knows it (first network first)."""
    clusters = client.get("/api/v1/clusters")["items"]
    if not clusters:
        return {}
    spec = clusters[0]["spec"]
    urls = {}
    for node in spec["nodes"]:
        address = node["addresses"][spec["networks"][0]]
        host = f"[{address}]" if ":" in address else address
        urls[node["name"]] = f"http://{host}:{node.get('apiPort', 9010)}"
    return urls


def _node_client(client: Client, urls: dict[str, str], node: str) -> Client:
    if node not in urls:
        raise UsageError(f"node {node!r} is not in the Cluster: it has {', '.join(urls) or 'no nodes'}")
    return Client(urls[node], timeout=client.timeout)


def cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)
    urls = _node_urls(client) or {"(this node)": client.server}
    rows: list[dict[str, Any]] = []
    unreachable = []
    for node, url in urls.items():
        try:
            rows += Client(url, timeout=3.0).get("/api/v1/status")["modules"]
        except ClientError as exc:
            unreachable.append(f"{node}: {exc}")
    rows.sort(key=lambda r: (r["module"], r["node"]))
    if args.output == "json":
        keys = ("module", "node", "state", "serving", "replication", "reason", "message")
        print(json.dumps([{k: r[k] for k in keys} for r in rows], indent=2))
    else:
        print(status_table(rows))
    for line in unreachable:
        print(f"warning: cannot read node {line}", file=sys.stderr)
    return 0


def cmd_module(args: argparse.Namespace) -> int:
    """start, stop, restart, swap, prim, second: sent to the nodes of the module that must act."""
    client = _client(args)
    module = client.get(f"/api/v1/modules/{args.module}")
    urls = _node_urls(client)
    nodes = [args.node] if args.node else list(module["spec"]["nodes"])
    command = f"failover-{args.switch}" if args.command == "failover" else args.command
    commands = [(n, command) for n in nodes]
    if args.command == "prim" and args.node:
        commands += [(n, "second") for n in module["spec"]["nodes"] if n != args.node]
    failed = []
    for node, command in commands:
        try:
            answer = _node_client(client, urls, node).request(
                "POST", f"/api/v1/modules/{args.module}/commands", {"command": command}
            )
        except ClientError as exc:
            failed.append(node)
            print(f"error: {command} {args.module} on {node}: {exc}", file=sys.stderr)
            continue
        print(answer["message"])
    return 1 if failed and (args.node or len(failed) == len(commands)) else 0


# --- commands that work locally ----------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    resources = load([Path(f) for f in args.filename], state_dir=args.state_dir)
    print(f"{len(resources)} resources valid in {', '.join(args.filename)}")
    return 0


def cmd_crds(args: argparse.Namespace) -> int:
    from controller.resources.crd import render, write_crds

    directory = Path(args.dir)
    if args.check:
        stale = [
            cls.PLURAL
            for cls in KINDS.values()
            if not (directory / f"{cls.PLURAL}.tandem.dev.yaml").is_file()
            or (directory / f"{cls.PLURAL}.tandem.dev.yaml").read_text() != render(cls)
        ]
        if stale:
            raise UsageError(f"{directory} is out of date for {', '.join(stale)}: run `tandem crds`")
        print(f"{directory} is up to date")
        return 0
    for path in write_crds(directory):
        print(f"wrote {path}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from controller.secret import generate_key

    path = Path(args.output) if args.output else Path(args.state_dir) / "cluster.key"
    generate_key(path, force=args.force)
    print(f"wrote {path}: copy it to the same path on every node")
    return 0


def cmd_node_run(args: argparse.Namespace) -> int:
    from controller.daemon import Listen, run_node
    from controller.logs import setup_daemon_logging

    listen = Listen.parse(args.listen)
    state_dir = Path(args.state_dir).resolve()
    listener = setup_daemon_logging(state_dir, level=logging.DEBUG if args.verbose else logging.INFO)
    try:
        asyncio.run(run_node(node=args.node, state_dir=state_dir, listen=listen, store_url=args.store))
    finally:
        listener.stop()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from controller import demo

    root = Path(args.root)
    if args.down:
        return demo.down(root)
    for verb in ("client", "status", "crash", "restore", "swap"):
        value = getattr(args, verb)
        if value not in (None, False):
            node = value if verb in ("crash", "restore") else None
            text = value if verb == "client" and isinstance(value, str) and value else None
            return demo.act(root, verb, node=node, text=text)
    return demo.up(root)


# --- plumbing ------------------------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    return Client(server_url(args.server))


def _read_manifests(files: Sequence[str]) -> list[Resource]:
    """Parse and check each document locally; the daemon checks the set against what it stores."""
    docs, problems = read_documents([Path(f) for f in files])
    for doc in docs:
        validate_document(doc)
        problems += doc.problems
    if problems:
        raise ManifestError(problems)
    return [d.resource for d in docs if d.resource is not None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--server", help="daemon URL (default: $TANDEM_SERVER or http://127.0.0.1:9010)")

    p = sub.add_parser("apply", parents=[remote], help="create or update resources from manifests")
    p.add_argument("-f", "--filename", action="append", required=True, help="a manifest file or directory")
    p.add_argument("--dry-run", action="store_true", help="check against the cluster, write nothing")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("get", parents=[remote], help="list resources of a type, or show one")
    p.add_argument("kind", help="resource type (modules, virtualips, ... or all)")
    p.add_argument("name", nargs="?")
    p.add_argument("-o", "--output", choices=["table", "wide", "yaml", "json", "name"], default="table")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("describe", parents=[remote], help="show one resource in detail, with its conditions")
    p.add_argument("kind")
    p.add_argument("name")
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("delete", parents=[remote], help="delete a resource no other resource depends on")
    p.add_argument("kind")
    p.add_argument("name")
    p.add_argument("--resource-version", help="delete only if the stored version is still this one")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("status", parents=[remote], help="every module on every node: state, serving, replication")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_status)

    for command, text in (
        ("start", "start a module (on every node of it, or --node)"),
        ("stop", "stop a module (on every node of it, or --node)"),
        ("restart", "restart a module's application where it serves"),
        ("swap", "swap the primary and secondary roles once in sync"),
        ("prim", "force a node to be primary (the other is forced secondary)"),
        ("second", "force a node to be secondary"),
    ):
        p = sub.add_parser(command, parents=[remote], help=text)
        p.add_argument("module")
        p.add_argument("--node", required=command in ("prim", "second"), help="the node that acts")
        p.set_defaults(func=cmd_module, command=command)
    p = sub.add_parser("failover", parents=[remote], help="off: a lone secondary waits instead of taking over")
    p.add_argument("module")
    p.add_argument("switch", choices=["on", "off"])
    p.add_argument("--node", help="the node that acts (default: every node of the module)")
    p.set_defaults(func=cmd_module, command="failover")

    p = sub.add_parser("validate", help="check manifests offline, reporting every problem")
    p.add_argument("-f", "--filename", action="append", required=True, help="a manifest file or directory")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="the nodes' state dir, which no path may overlap")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("crds", help="write the Kubernetes CustomResourceDefinitions")
    p.add_argument("--dir", default="crds", help="output directory (default: crds)")
    p.add_argument("--check", action="store_true", help="fail if the directory is out of date")
    p.set_defaults(func=cmd_crds)

    p = sub.add_parser("keygen", help="write a new cluster key (copy it to every node)")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    p.add_argument("-o", "--output", help="key file (default: <state-dir>/cluster.key)")
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.set_defaults(func=cmd_keygen)

    node = sub.add_parser("node", help="run this node's daemon").add_subparsers(dest="node_command", required=True)
    p = node.add_parser("run", help="run tandemd in the foreground")
    p.add_argument("--node", required=True, help="this node's name in the Cluster")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    p.add_argument("--listen", default="0.0.0.0:9010", help="ADDRESS:PORT for the API (default 0.0.0.0:9010)")
    p.add_argument("--store", default="embedded", help="embedded (default) or etcd://HOST:PORT[/PREFIX]")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_node_run)

    p = sub.add_parser("demo", help="a two-node demo cluster in a network-namespace lab (--down removes it)")
    p.add_argument(
        "--root", default="/tmp/tandem-demo", help="where the demo keeps its state (default: /tmp/tandem-demo)"
    )
    p.add_argument("--down", action="store_true", help="remove the demo's lab and state")
    p.add_argument("--status", action="store_true", help="tandem status, from a node of the demo")
    p.add_argument(
        "--client", nargs="?", const="", metavar="TEXT", help="one request through the VIP; TEXT adds a note"
    )
    p.add_argument("--crash", metavar="NODE", help="SIGKILL a node's tandemd and app and pull its cables")
    p.add_argument("--restore", metavar="NODE", help="plug a crashed node back and start its daemon")
    p.add_argument("--swap", action="store_true", help="swap the primary and secondary roles")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ManifestError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for problem in exc.problems:
            where = ": ".join(p for p in (problem.get("object"), problem.get("field")) if p)
            print(f"  {where}: {problem['message']}" if where else f"  {problem['message']}", file=sys.stderr)
        return 1
    except (UsageError, *_local_errors()) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _local_errors() -> tuple[type[Exception], ...]:
    from controller.daemon import DaemonError
    from controller.demo import DemoError
    from controller.secret import SecretError
    from controller.store import StoreError

    return (DaemonError, DemoError, SecretError, StoreError, OSError)


if __name__ == "__main__":
    sys.exit(main())
