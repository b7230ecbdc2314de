"""Conditions follow the Kubernetes rules: lastTransitionTime moves only when the status flips."""

from controller.conditions import set_condition, status_with
from controller.resources import Condition


def cond(status: str, reason: str = "R", message: str = "m", type_: str = "Ready") -> Condition:
    return Condition(type=type_, status=status, reason=reason, message=message)


def test_a_new_condition_gets_the_time_of_its_first_observation() -> None:
    out, changed = set_condition([], cond("False"), now="t1")
    assert changed and out[0].last_transition_time == "t1"


def test_the_same_observation_changes_nothing() -> None:
    first, _ = set_condition([], cond("False"), now="t1")
    again, changed = set_condition(first, cond("False"), now="t2")
    assert not changed and again == first


def test_a_new_reason_keeps_the_transition_time_and_a_flip_moves_it() -> None:
    first, _ = set_condition([], cond("False", "Starting"), now="t1")
    reasoned, changed = set_condition(first, cond("False", "Syncing", "37% done"), now="t2")
    assert changed and reasoned[0].last_transition_time == "t1" and reasoned[0].reason == "Syncing"
    flipped, changed = set_condition(reasoned, cond("True", "InSync"), now="t3")
    assert changed and flipped[0].last_transition_time == "t3"


def test_other_types_keep_their_place() -> None:
    conds, _ = set_condition([], cond("True", type_="Ready"), now="t1")
    conds, _ = set_condition(conds, cond("False", type_="Stalled"), now="t1")
    conds, _ = set_condition(conds, cond("False", type_="Ready"), now="t2")
    assert [(c.type, c.status) for c in conds] == [("Ready", "False"), ("Stalled", "False")]


def test_status_writes_observed_generation_and_reports_change_once() -> None:
    status, changed = status_with(None, [cond("False")], generation=1, now="t1")
    assert changed and status.observed_generation == 1 and status.conditions[0].type == "Ready"
    same, changed = status_with(status, [cond("False")], generation=1, now="t2")
    assert not changed and same == status
    newer, changed = status_with(status, [cond("False")], generation=2, now="t3")
    assert changed and newer.observed_generation == 2
