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
