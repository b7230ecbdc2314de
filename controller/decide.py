"""decide: the failover logic as a pure function from what one node observes to what it should be.

No I/O, no clock, no randomness: the reconcile loop builds one frozen ``Observed`` per module per
tick (with ``now`` inside) and carries out the ``Decision``. Every rule of the architecture lives
here, so the whole of it is tested exhaustively in milliseconds (tests/unit/test_decide.py).

Rules, in the order they are applied:
1. Never two writers: a node serves only if its peer is known not to serve, or, with the peer
   silent for a whole timeout, only if the split-brain witness (when configured) answers. A node
   that has listened for less than a timeout never serves alone.
2. The newest data wins: a node whose data is older than its peer's never serves unless forced;
   when both serve (a healed partition), the one with the older data, or else the one that is not
   preferred, steps down to SECOND.
3. Failback is online: a returning node becomes SECOND; it swaps roles only once in sync.
4. Restart before failover: local failures restart the application up to maxLoop times.

Heartbeats arrive late and out of step, so "the peer is known not to serve" is a handshake, not a
reading: a connected node that wants to serve first *claims* (a flag in its heartbeats) and serves
only once the peer's latest heartbeat *grants* that claim. A node grants only while it does not
serve and does not itself claim with a higher rank, and a serving node never grants, so two claims
that cross resolve to one by the nodes' names, whatever each side believed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


class State(StrEnum):
    STOP = "STOP"
    WAIT = "WAIT"
    ALONE = "ALONE"
    PRIM = "PRIM"
    SECOND = "SECOND"
    UP = "UP"

    @property
    def serving(self) -> bool:
        return self in (State.ALONE, State.PRIM, State.UP)


# How this node's replicated data compares with the peer's, from the generation histories.
DataRelation = Literal["same", "newer", "older", "diverged", "unknown"]
Replication = Literal["in-sync", "syncing", "disconnected", "none"]
FailureAction = Literal["restart", "failover", "stop"]


@dataclass(frozen=True)
class PeerView:
    """The peer's module state as its latest heartbeat told it."""

    state: State
    handover: bool = False  # the peer is stepping down so that this node takes over (swap)
    claiming: bool = False  # the peer wants to serve and asks this node's grant
    grants: bool = False  # the peer grants this node's claim: it will not serve while this node does


@dataclass(frozen=True)
class Observed:
    """Everything decide may know about one module on this node, at one instant."""

    node: str
    nodes: tuple[str, ...]  # the module's nodes, in order of preference
    state: State
    enabled: bool  # started by the operator or bootStart, and not stopped since
    now: float = 0.0
    mode: Literal["mirror", "farm"] = "mirror"
    preferred: str | None = None  # preferredPrimary; default: the first node
    auto_swap: bool = False
    failover: bool = True
    peer: PeerView | None = None  # None: no heartbeat on any network for a whole timeout
    listening_since: float = 0.0  # when this node started listening (daemon start, links back)
    timeout: float = 30.0
    witness: bool | None = None  # a splitbrain witness answers; None: none configured
    data: DataRelation = "unknown"
    replication: Replication = "none"  # none: the module replicates no directory
    waiting_on: tuple[str, ...] = ()  # what keeps this node from serving: failing wait-checkers, failed starts
    failure: FailureAction | None = None  # a process or checker failure asks for this action
    failure_cause: str = ""
    restarts: int = 0  # local restarts already made within restart.loopInterval
    max_loop: int = 3
    forced: Literal["prim", "second"] | None = None  # `tandem prim|second MODULE --node N`
    swap: bool = False  # `tandem swap MODULE` asked for a role swap
    claiming: bool = False  # this node's previous decision claimed (fed back by the loop)
    handing_over: bool = False  # this node's previous decision handed over (fed back by the loop)


@dataclass(frozen=True)
class Decision:
    state: State
    reason: str  # CamelCase, for conditions and tests
    message: str  # a sentence for operators
    restart: bool = False  # restart the application in place (stop then start scripts)
    handover: bool = False  # announce in heartbeats that the peer should take over
    claim: bool = False  # announce in heartbeats that this node wants to serve
    grant: bool = False  # announce in heartbeats that the peer's claim is granted

    @property
    def serving(self) -> bool:
        return self.state.serving


def decide(o: Observed) -> Decision:
    """The state this node should be in for one module, and why."""
    grant = o.peer is not None and o.peer.claiming
    if not o.enabled:
        return Decision(State.STOP, "Stopped", f"{o.node} is stopped by the operator", grant=grant)
    if o.waiting_on:
        return Decision(State.WAIT, "CheckerWaiting", f"{o.node} waits: {'; '.join(o.waiting_on)}", grant=grant)
    if o.failure is not None:
        failed = _after_failure(o)
        if failed is not None:
            return failed
    if o.mode == "farm":
        return _serve(o, State.UP, "Serving", f"{o.node} is UP in the farm")
    if o.peer is None:
        return _peer_lost(o)
    return _connected(o, o.peer)


def _serve(o: Observed, state: State, reason: str, message: str) -> Decision:
    return Decision(state, reason, message if o.state == state else f"{message} (was {o.state})")


def _after_failure(o: Observed) -> Decision | None:
    cause = o.failure_cause or "a failure"
    grant = o.peer is not None and o.peer.claiming
    if o.failure == "stop":
        return Decision(State.STOP, "StoppedOnFailure", f"{o.node} stopped the module after {cause}", grant=grant)
    if o.failure == "restart" and o.restarts < o.max_loop and o.state.serving:
        return Decision(
            o.state,
            "Restarting",
            f"{o.node} restarts the application after {cause} ({o.restarts + 1} of {o.max_loop})",
            restart=True,
        )
    if not o.state.serving:
        return None  # nothing runs here to restart or fail over
    if o.mode == "farm":
        return Decision(State.WAIT, "FailedTooOften", f"{o.node} stops serving after {cause}: {o.restarts} restarts")
    if o.peer is not None and o.peer.state == State.SECOND and o.data != "older":
        return Decision(
            State.SECOND,
            "FailingOver",
            f"{o.node} hands the module to its peer after {cause}: {o.restarts} restarts",
            handover=True,
        )
    return Decision(State.WAIT, "FailedTooOften", f"{o.node} stops serving after {cause}; no peer can take over")


def _peer_lost(o: Observed) -> Decision:
    if o.now - o.listening_since < o.timeout:
        if o.state.serving:
            return _serve(o, State.ALONE, "PeerLost", f"{o.node} serves alone: its peer is silent")
        left = o.timeout - (o.now - o.listening_since)
        return Decision(State.WAIT, "Listening", f"{o.node} listens for its peer {left:.1f}s more before serving alone")
    if o.witness is False:
        return Decision(State.WAIT, "WitnessUnreachable", f"{o.node} may not serve alone: no witness answers")
    if o.state.serving:
        return _serve(o, State.ALONE, "PeerLost", f"{o.node} serves alone: its peer is silent")
    if o.forced == "prim":
        return Decision(State.ALONE, "ForcedPrimary", f"{o.node} serves alone, forced by the operator")
    if o.forced == "second":
        return Decision(State.WAIT, "ForcedSecondary", f"{o.node} is forced secondary and its peer is silent")
    if o.data == "older" or (o.state == State.SECOND and o.replication == "syncing"):
        return Decision(State.WAIT, "NotInSync", f"{o.node} may not take over: its copy of the data is incomplete")
    if not o.failover and o.state in (State.SECOND, State.WAIT):
        return Decision(State.WAIT, "FailoverDisabled", f"{o.node} keeps waiting: failover is off")
    reason = "FailedOver" if o.state == State.SECOND else "StartedAlone"
    return Decision(State.ALONE, reason, f"{o.node} serves alone: its peer is silent for {o.timeout:g}s")


def _connected(o: Observed, peer: PeerView) -> Decision:
    if o.state.serving:
        if peer.state.serving:
            if _wins_conflict(o):
                return _serving_role(o, peer, "KeptPrimary", f"{o.node} keeps serving; its peer steps down")
            return _yield(o, peer, "SteppedDown", f"{o.node} steps down: both served and its peer's data wins")
        if _should_hand_over(o, peer):
            return _yield(o, peer, "Swapping", f"{o.node} hands over to its peer (role swap)", handover=True)
        return _serving_role(o, peer, "Serving", f"{o.node} serves")
    if peer.state.serving:
        return _yield(o, peer, "PeerServes", f"{o.node} is secondary to its peer")
    return _nobody_serves(o, peer)


def _yield(o: Observed, peer: PeerView, reason: str, message: str, *, handover: bool = False) -> Decision:
    """Not serving, as SECOND: the peer's claim, if any, is granted."""
    message = message if o.state == State.SECOND else f"{message} (was {o.state})"
    return Decision(State.SECOND, reason, message, handover=handover, grant=peer.claiming)


def _serving_role(o: Observed, peer: PeerView, reason: str, message: str) -> Decision:
    if peer.state == State.SECOND and _in_sync(o):
        synced = "peer in sync" if o.replication == "in-sync" else "peer SECOND (no directory to replicate)"
        return _serve(o, State.PRIM, reason, f"{message}, {synced}")
    return _serve(o, State.ALONE, reason, f"{message}, peer not in sync ({peer.state}, replication {o.replication})")


def _should_hand_over(o: Observed, peer: PeerView) -> bool:
    if peer.state != State.SECOND or not _in_sync(o) or o.forced == "prim":
        return False
    return o.swap or o.forced == "second" or (o.auto_swap and _preferred(o) != o.node)


def _in_sync(o: Observed) -> bool:
    """The secondary holds everything: replication caught up, or nothing to replicate."""
    return o.replication in ("in-sync", "none")


def _nobody_serves(o: Observed, peer: PeerView) -> Decision:
    """Neither node serves: one may start, through the claim-and-grant handshake."""
    wish = _wish(o, peer)
    if isinstance(wish, Decision):
        return wish
    reason, message = wish
    if peer.claiming and not _outranks(o):
        return _yield(o, peer, "PeerClaims", f"{o.node} grants its peer's claim to serve")
    if o.claiming and peer.grants:
        return Decision(State.ALONE, reason, message)
    return Decision(State.SECOND, "Claiming", f"{o.node} asks its peer's grant to serve: {message}", claim=True)


def _wish(o: Observed, peer: PeerView) -> Decision | tuple[str, str]:
    """(reason, message) if this node should serve, else the non-serving decision."""
    if o.handing_over:
        return _yield(o, peer, "HandingOver", f"{o.node} waits for its peer to take over", handover=True)
    if o.forced == "second":
        return _yield(o, peer, "ForcedSecondary", f"{o.node} is forced secondary")
    if peer.handover:
        return "TookOver", f"{o.node} takes over from its peer"
    if o.forced == "prim":
        return "ForcedPrimary", f"{o.node} serves, forced by the operator"
    if peer.state != State.SECOND:  # the peer cannot serve: it is stopped or waiting
        if o.data == "older":
            return Decision(
                State.WAIT,
                "PeerHasNewerData",
                f"{o.node} may not serve: its peer holds newer data",
                grant=peer.claiming,
            )
        return "Started", f"{o.node} starts serving; its peer is {peer.state}"
    if o.state != State.SECOND:
        return _yield(o, peer, "Joining", f"{o.node} joins as secondary")
    if _is_candidate(o):
        return "Elected", f"{o.node} starts serving: {_candidate_reason(o)}"
    return _yield(o, peer, "PeerElected", f"{o.node} stays secondary")


def _preferred(o: Observed) -> str:
    return o.preferred or o.nodes[0]


def _peer_name(o: Observed) -> str:
    return next(n for n in o.nodes if n != o.node)


def _outranks(o: Observed) -> bool:
    """Static and the same from both sides: settles two claims that cross."""
    return o.node < _peer_name(o)


def _is_candidate(o: Observed) -> bool:
    """Symmetric: the peer, deciding from its side with the same facts, picks the same node."""
    if o.data in ("newer", "older"):
        return o.data == "newer"
    preferred = _preferred(o)
    if preferred in (o.node, _peer_name(o)):
        return preferred == o.node
    return _outranks(o)


def _candidate_reason(o: Observed) -> str:
    return "its data is newer" if o.data == "newer" else "it is the preferred primary"


def _wins_conflict(o: Observed) -> bool:
    """When both serve, the newer data wins; otherwise the preferred node (the same on both sides)."""
    return _is_candidate(o)
