"""decide, table by table (a situation in, the exact state and reason out), then as a property."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.decide import Observed, PeerView, State, decide

S = State


def obs(state: State = S.STOP, peer: State | None = None, **kw: Any) -> Observed:
    base = dict(node="node1", nodes=("node1", "node2"), state=state, enabled=True, now=100.0, timeout=30.0)
    view = {k: kw.pop(f"peer_{k}") for k in ("handover", "claiming", "grants") if f"peer_{k}" in kw}
    return Observed(**{**base, "peer": None if peer is None else PeerView(peer, **view), **kw})


def outcome(o: Observed) -> tuple[State, str]:
    d = decide(o)
    return d.state, d.reason


CASES = [
    # (situation, expected state, reason)
    (obs(S.PRIM, S.SECOND, enabled=False), S.STOP, "Stopped"),
    (obs(S.PRIM, S.SECOND, waiting_on=("db",)), S.WAIT, "CheckerWaiting"),
    # both connected, nobody serving: the preferred node (node1) claims once both are SECOND, and
    # serves only when the peer's latest heartbeat grants the claim
    (obs(S.STOP, S.STOP), S.SECOND, "Claiming"),
    (obs(S.SECOND, S.STOP, claiming=True), S.SECOND, "Claiming"),
    (obs(S.SECOND, S.STOP, claiming=True, peer_grants=True), S.ALONE, "Started"),
    (obs(S.STOP, S.SECOND), S.SECOND, "Joining"),
    (obs(S.SECOND, S.SECOND), S.SECOND, "Claiming"),
    (obs(S.SECOND, S.SECOND, claiming=True, peer_grants=True), S.ALONE, "Elected"),
    (obs(S.SECOND, S.SECOND, node="node2"), S.SECOND, "PeerElected"),
    (obs(S.SECOND, S.SECOND, node="node2", peer_claiming=True), S.SECOND, "PeerElected"),
    (obs(S.SECOND, S.SECOND, preferred="node2"), S.SECOND, "PeerElected"),
    (obs(S.SECOND, S.SECOND, data="older"), S.SECOND, "PeerElected"),
    (obs(S.SECOND, S.SECOND, node="node2", data="newer"), S.SECOND, "Claiming"),
    (obs(S.STOP, S.WAIT, data="older"), S.WAIT, "PeerHasNewerData"),
    (obs(S.SECOND, S.WAIT, data="older", forced="prim", claiming=True, peer_grants=True), S.ALONE, "ForcedPrimary"),
    (obs(S.SECOND, S.SECOND, forced="second"), S.SECOND, "ForcedSecondary"),
    # two claims that cross: node1 outranks node2 by name, whatever each believed
    (obs(S.SECOND, S.SECOND, node="node2", data="newer", claiming=True, peer_claiming=True), S.SECOND, "PeerClaims"),
    (obs(S.SECOND, S.SECOND, data="older", claiming=True, peer_claiming=True), S.SECOND, "PeerElected"),
    (obs(S.SECOND, S.STOP, claiming=True, peer_claiming=True), S.SECOND, "Claiming"),
    # a serving node is PRIM only with its peer SECOND and in sync
    (obs(S.ALONE, S.SECOND, replication="syncing"), S.ALONE, "Serving"),
    (obs(S.ALONE, S.SECOND, replication="in-sync"), S.PRIM, "Serving"),
    (obs(S.ALONE, S.SECOND, replication="none"), S.PRIM, "Serving"),  # nothing to replicate
    (obs(S.PRIM, S.STOP, replication="disconnected"), S.ALONE, "Serving"),
    (obs(S.SECOND, S.PRIM), S.SECOND, "PeerServes"),
    (obs(S.STOP, S.ALONE), S.SECOND, "PeerServes"),
    # both serve (a healed partition): the newer data, else the preferred node, keeps serving
    (obs(S.ALONE, S.ALONE), S.ALONE, "KeptPrimary"),
    (obs(S.ALONE, S.ALONE, node="node2"), S.SECOND, "SteppedDown"),
    (obs(S.ALONE, S.ALONE, node="node2", data="newer"), S.ALONE, "KeptPrimary"),
    (obs(S.ALONE, S.ALONE, data="older"), S.SECOND, "SteppedDown"),
    # role swap: only once in sync, and the peer takes over when it sees the handover
    (obs(S.PRIM, S.SECOND, replication="in-sync", swap=True), S.SECOND, "Swapping"),
    (obs(S.ALONE, S.SECOND, replication="syncing", swap=True), S.ALONE, "Serving"),
    (obs(S.SECOND, S.SECOND, node="node2", peer_handover=True), S.SECOND, "Claiming"),
    (obs(S.SECOND, S.SECOND, node="node2", peer_handover=True, claiming=True, peer_grants=True), S.ALONE, "TookOver"),
    (obs(S.SECOND, S.SECOND, handing_over=True, peer_claiming=True), S.SECOND, "HandingOver"),
    (obs(S.PRIM, S.SECOND, replication="in-sync", auto_swap=True, preferred="node2"), S.SECOND, "Swapping"),
    (obs(S.PRIM, S.SECOND, replication="in-sync", auto_swap=True), S.PRIM, "Serving"),
    # the peer is lost
    (obs(S.PRIM, None, now=200.0), S.ALONE, "PeerLost"),
    (obs(S.SECOND, None, now=200.0, data="same"), S.ALONE, "FailedOver"),
    (obs(S.SECOND, None, now=200.0, replication="syncing", data="unknown"), S.WAIT, "NotInSync"),
    (obs(S.SECOND, None, now=200.0, data="older"), S.WAIT, "NotInSync"),
    (obs(S.SECOND, None, now=200.0, failover=False), S.WAIT, "FailoverDisabled"),
    (obs(S.WAIT, None, now=200.0, failover=False), S.WAIT, "FailoverDisabled"),  # it stays waiting
    (obs(S.SECOND, None, now=200.0, witness=False), S.WAIT, "WitnessUnreachable"),
    (obs(S.PRIM, None, now=200.0, witness=False), S.WAIT, "WitnessUnreachable"),
    (obs(S.SECOND, None, now=200.0, witness=True), S.ALONE, "FailedOver"),
    (obs(S.STOP, None, now=10.0), S.WAIT, "Listening"),
    (obs(S.STOP, None, now=10.0, witness=True), S.WAIT, "Listening"),  # a witness is no proof the peer is gone
    (obs(S.STOP, None, now=31.0), S.ALONE, "StartedAlone"),
    (obs(S.STOP, None, now=31.0, forced="second"), S.WAIT, "ForcedSecondary"),
    # restart before failover
    (obs(S.PRIM, S.SECOND, failure="restart", restarts=2), S.PRIM, "Restarting"),
    (obs(S.PRIM, S.SECOND, failure="restart", restarts=3), S.SECOND, "FailingOver"),
    (obs(S.ALONE, None, now=200.0, failure="restart", restarts=3), S.WAIT, "FailedTooOften"),
    (obs(S.PRIM, S.SECOND, failure="failover"), S.SECOND, "FailingOver"),
    (obs(S.PRIM, S.SECOND, failure="stop"), S.STOP, "StoppedOnFailure"),
    # farm
    (obs(S.STOP, None, mode="farm"), S.UP, "Serving"),
    (obs(S.UP, S.UP, mode="farm", failure="restart", restarts=3), S.WAIT, "FailedTooOften"),
]


@pytest.mark.parametrize(("situation", "state", "reason"), CASES, ids=[f"{c[0].state}-{c[2]}" for c in CASES])
def test_decide_table(situation: Observed, state: State, reason: str) -> None:
    assert outcome(situation) == (state, reason)


def test_a_restart_asks_for_a_restart_and_a_swap_announces_a_handover() -> None:
    assert decide(obs(S.PRIM, S.SECOND, failure="restart", restarts=0)).restart
    assert decide(obs(S.PRIM, S.SECOND, replication="in-sync", swap=True)).handover


def test_non_serving_nodes_grant_claims_and_serving_nodes_never_do() -> None:
    for state in (S.STOP, S.WAIT, S.SECOND):
        assert decide(obs(state, S.SECOND, node="node2", peer_claiming=True)).grant, state
        assert decide(obs(state, S.SECOND, node="node2", peer_claiming=True, enabled=False)).grant, state
    assert not decide(obs(S.PRIM, S.SECOND, peer_claiming=True)).grant
    assert not decide(obs(S.SECOND, S.SECOND, claiming=True, peer_claiming=True)).grant  # node1 outranks


def test_every_decision_says_why_in_a_sentence_naming_the_node() -> None:
    for situation, _, _ in CASES:
        d = decide(situation)
        assert d.reason[0].isupper() and " " not in d.reason
        assert situation.node in d.message


# --- property: a connected pair never has two writers, however late heartbeats arrive ------------------

NODES = ("node1", "node2")
EVENTS = ("tick", "tick", "tick", "deliver", "deliver", "deliver", "toggle", "swap", "fail", "sync", "data")
events = st.lists(st.tuples(st.sampled_from(EVENTS), st.sampled_from(NODES)), max_size=80)


@settings(max_examples=600, deadline=None)
@given(events, st.sampled_from(["node1", "node2", None]), st.booleans())
def test_for_any_sequence_of_events_at_most_one_node_of_a_connected_pair_serves(
    sequence: list[tuple[str, str]], preferred: str | None, auto_swap: bool
) -> None:
    """Each node decides from the last heartbeat it received; heartbeats are delivered at any time."""
    last = {n: decide(obs(S.STOP, S.STOP, node=n, enabled=False)) for n in NODES}  # what each announces
    view = {n: PeerView(S.STOP) for n in NODES}  # what each last heard from its peer
    enabled = dict.fromkeys(NODES, True)
    swap = dict.fromkeys(NODES, False)
    failure = dict.fromkeys(NODES, False)
    newer: str | None = None  # which node's data is newer, if any: the facts both sides learn
    in_sync = False
    for kind, node in sequence:
        other = NODES[1 - NODES.index(node)]
        if kind == "deliver":  # node's latest announcement reaches its peer
            d = last[node]
            view[other] = PeerView(d.state, handover=d.handover, claiming=d.claim, grants=d.grant)
            continue
        if kind == "toggle":
            enabled[node] = not enabled[node]
        elif kind == "swap":
            swap[node] = True
        elif kind == "fail":
            failure[node] = True
        elif kind == "sync":
            in_sync = any(last[n].state.serving for n in NODES) and any(last[n].state == S.SECOND for n in NODES)
        elif kind == "data":
            newer = None if newer else node
        relation = "same" if newer is None else ("newer" if newer == node else "older")
        situation = Observed(
            node=node,
            nodes=NODES,
            state=last[node].state,
            enabled=enabled[node],
            now=1000.0,
            timeout=30.0,
            preferred=preferred,
            auto_swap=auto_swap,
            peer=view[node],
            data=relation,
            replication="in-sync" if in_sync else "syncing",
            failure="restart" if failure[node] else None,
            restarts=3,
            swap=swap[node],
            claiming=last[node].claim,
            handing_over=last[node].handover,
        )
        d = decide(situation)
        if d.state != last[node].state:
            in_sync = False
        last[node] = d
        swap[node] = failure[node] = False
        serving = [n for n in NODES if last[n].state.serving]
        assert len(serving) < 2, f"two writers after {kind} on {node}: {last}"


def test_the_handshake_elects_one_node_within_a_few_heartbeats() -> None:
    """Liveness: with heartbeats flowing, two stopped nodes end with exactly one serving."""
    last = {n: decide(obs(S.STOP, S.STOP, node=n, enabled=False)) for n in NODES}
    for _ in range(6):
        for node in NODES:
            other = NODES[1 - NODES.index(node)]
            p = last[other]
            situation = obs(
                last[node].state,
                p.state,
                node=node,
                claiming=last[node].claim,
                peer_claiming=p.claim,
                peer_grants=p.grant,
                peer_handover=p.handover,
            )
            last[node] = decide(situation)
    assert [last[n].state for n in NODES] == [S.PRIM, S.SECOND]  # no directory to replicate: in sync at once


def test_after_a_partition_heals_exactly_one_keeps_serving() -> None:
    for data1, data2 in (("same", "same"), ("newer", "older"), ("older", "newer"), ("diverged", "diverged")):
        one = decide(obs(S.ALONE, S.ALONE, data=data1))
        two = decide(replace(obs(S.ALONE, S.ALONE, data=data2), node="node2"))
        assert [one.serving, two.serving].count(True) == 1, (data1, data2)
