"""What it takes to go from one module state to another on a node: an ordered list of steps. Pure.

The reconcile loop carries the steps out in the module's action slot, stage by stage (``stages``).
Starting to serve brings the address up before the application starts (it may bind to it) and
announces it at once; stopping to serve stops the application before the address goes, so no client
reaches a half-stopped service through it.
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


def stages(steps: list[Step]) -> list[tuple[Step, ...]]:
    """The steps in the order they run: each stage's steps run together, the stages one after another.

    Taking over, the address comes up while the replicated directories change role: the two touch
    different things, and only startPrim, the next stage, needs both in place. Everything else keeps
    the plan's order.
    """
    out: list[tuple[Step, ...]] = []
    for step in steps:
        if step == Step.VIP_UP and out and out[-1] == (Step.REPLICATION,):
            out[-1] = (Step.REPLICATION, Step.VIP_UP)
        else:
            out.append((step,))
    return out


def undo(target: State, *, done: list[Step], attempted: set[Step], replicated: bool = False) -> list[Step]:
    """After a failed transition towards ``target``: the steps that take back what was done.

    Only a transition that brought the address up or changed the replication role has anything to
    take back; stopPrim runs only if startPrim was attempted (it may have started part of the app).
    """
    if Step.REPLICATION not in done and Step.VIP_UP not in done:
        return []
    steps = plan(target, State.WAIT, replicated=replicated)
    if Step.START_PRIM not in attempted:
        steps = [step for step in steps if step != Step.STOP_PRIM]
    return steps
