"""What it takes to go from one module state to another on a node: an ordered list of steps. Pure.

The reconcile loop carries the steps out in the module's action slot, one at a time. Starting to
serve brings the address up before the application starts (it may bind to it) and announces it
after; stopping to serve stops the application before the address goes, so no client reaches a
half-stopped service through it.
"""

from __future__ import annotations

from enum import StrEnum

from controller.decide import State


class Step(StrEnum):
    PRESTART = "prestart"
    START_BOTH = "startBoth"
    VIP_UP = "vipUp"
    START_PRIM = "startPrim"
    STOP_PRIM = "stopPrim"
    VIP_DOWN = "vipDown"
    STOP_BOTH = "stopBoth"
    POSTSTOP = "poststop"
    RESTART_PRIM = "restartPrim"  # stopPrim then startPrim, the address kept
    REPLICATION = "replication"  # the replicated directories take the role of the target state


RUNNING = frozenset({State.WAIT, State.ALONE, State.PRIM, State.SECOND, State.UP})


def replication_role(state: State) -> str:
    """What the replicated directories are in a state: primary (serving), secondary, or not replicated."""
    if state.serving:
        return "primary"
    return "secondary" if state == State.SECOND else "none"


def plan(current: State, target: State, *, restart: bool = False, replicated: bool = False) -> list[Step]:
    """The steps from ``current`` to ``target``; none between ALONE and PRIM.

    With ``replicated`` directories, the replica role changes after the application stopped
    serving and before it starts: the primary's mount must be in place when startPrim runs.
    """
    steps: list[Step] = []
    if restart and current.serving and target.serving:
        return [Step.RESTART_PRIM]
    if current == State.STOP and target in RUNNING:
        steps += [Step.PRESTART, Step.START_BOTH]
    if current.serving and not target.serving:
        steps += [Step.STOP_PRIM, Step.VIP_DOWN]
    if replicated and replication_role(current) != replication_role(target):
        steps.append(Step.REPLICATION)
    if target == State.STOP and current in RUNNING:
        steps += [Step.STOP_BOTH, Step.POSTSTOP]
    if target.serving and not current.serving:
        steps += [Step.VIP_UP, Step.START_PRIM]
    return steps
