"""The steps between module states, as golden lists."""

import pytest

from controller.decide import State as S
from controller.transitions import Step, plan

P, B, UP, SP, XP, DOWN, XB, PS = (
    Step.PRESTART,
    Step.START_BOTH,
    Step.VIP_UP,
    Step.START_PRIM,
    Step.STOP_PRIM,
    Step.VIP_DOWN,
    Step.STOP_BOTH,
    Step.POSTSTOP,
)


@pytest.mark.parametrize(
    ("current", "target", "steps"),
    [
        (S.STOP, S.ALONE, [P, B, UP, SP]),
        (S.STOP, S.SECOND, [P, B]),
        (S.STOP, S.WAIT, [P, B]),
        (S.SECOND, S.ALONE, [UP, SP]),
        (S.WAIT, S.ALONE, [UP, SP]),
        (S.ALONE, S.PRIM, []),
        (S.PRIM, S.ALONE, []),
        (S.SECOND, S.WAIT, []),
        (S.PRIM, S.SECOND, [XP, DOWN]),
        (S.ALONE, S.WAIT, [XP, DOWN]),
        (S.PRIM, S.STOP, [XP, DOWN, XB, PS]),
        (S.SECOND, S.STOP, [XB, PS]),
        (S.STOP, S.STOP, []),
        (S.STOP, S.UP, [P, B, UP, SP]),
        (S.UP, S.STOP, [XP, DOWN, XB, PS]),
    ],
)
def test_plan(current: S, target: S, steps: list[Step]) -> None:
    assert plan(current, target) == steps


def test_a_restart_keeps_the_address_and_restarts_the_application() -> None:
    assert plan(S.PRIM, S.PRIM, restart=True) == [Step.RESTART_PRIM]
    assert plan(S.SECOND, S.SECOND, restart=True) == []


R = Step.REPLICATION


@pytest.mark.parametrize(
    ("current", "target", "steps"),
    [
        (S.STOP, S.SECOND, [P, B, R]),
        (S.SECOND, S.ALONE, [R, UP, SP]),  # the primary's mount is ready before the application starts
        (S.PRIM, S.SECOND, [XP, DOWN, R]),  # the application is stopped before the mount changes hands
        (S.PRIM, S.STOP, [XP, DOWN, R, XB, PS]),
        (S.SECOND, S.WAIT, [R]),
        (S.WAIT, S.SECOND, [R]),
        (S.ALONE, S.PRIM, []),
        (S.STOP, S.WAIT, [P, B]),
    ],
)
def test_plan_with_replicated_directories(current: S, target: S, steps: list[Step]) -> None:
    assert plan(current, target, replicated=True) == steps
