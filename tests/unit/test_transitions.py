"""The steps between module states, as golden lists."""

import pytest

from controller.decide import State as S
from controller.transitions import Step, plan, stages, undo

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


@pytest.mark.parametrize(
    ("current", "target", "expected"),
    [
        (S.SECOND, S.ALONE, [(R, UP), (SP,)]),  # the address comes up while the mount changes hands
        (S.WAIT, S.ALONE, [(R, UP), (SP,)]),
        (S.STOP, S.ALONE, [(P,), (B,), (R, UP), (SP,)]),
        (S.PRIM, S.SECOND, [(XP,), (DOWN,), (R,)]),  # stopping keeps its order: the app, the address, the mount
        (S.PRIM, S.STOP, [(XP,), (DOWN,), (R,), (XB,), (PS,)]),
        (S.STOP, S.SECOND, [(P,), (B,), (R,)]),
    ],
)
def test_stages_overlap_only_the_address_with_the_mount_when_taking_over(
    current: S, target: S, expected: list[tuple[Step, ...]]
) -> None:
    assert stages(plan(current, target, replicated=True)) == expected


def test_without_replicated_directories_every_step_is_its_own_stage() -> None:
    steps = plan(S.SECOND, S.ALONE)
    assert stages(steps) == [(UP,), (SP,)]


def test_a_failed_mount_undoes_the_address_it_brought_up_without_a_stop_script() -> None:
    # replication+vipUp: the address came up, the primary's mount failed; startPrim never ran
    assert undo(S.ALONE, done=[UP], attempted={R, UP}, replicated=True) == [DOWN, R]


def test_a_failed_start_script_is_stopped_and_the_address_and_mount_go() -> None:
    assert undo(S.ALONE, done=[R, UP], attempted={R, UP, SP}, replicated=True) == [XP, DOWN, R]
    assert undo(S.ALONE, done=[UP], attempted={UP, SP}) == [XP, DOWN]


def test_nothing_to_undo_when_neither_the_address_nor_the_mount_changed() -> None:
    assert undo(S.ALONE, done=[], attempted={R, UP}, replicated=True) == []
    assert undo(S.ALONE, done=[P, B], attempted={P, B, UP}) == []
