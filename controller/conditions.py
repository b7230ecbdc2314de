"""Kubernetes-style conditions, pure: the loop says what is true now, these rules keep the history right."""

from __future__ import annotations

from collections.abc import Sequence

from controller.resources import Condition, Status


def set_condition(conditions: Sequence[Condition], new: Condition, *, now: str) -> tuple[list[Condition], bool]:
    """Put ``new`` in place of the condition of its type; return the list and whether anything changed.

    ``lastTransitionTime`` moves only when the status flips (True/False/Unknown), not when the reason
    or message does, so that "since when" stays meaningful.
    """
    out: list[Condition] = []
    changed = True
    for current in conditions:
        if current.type != new.type:
            out.append(current)
            continue
        since = current.last_transition_time if current.status == new.status else now
        merged = new.model_copy(update={"last_transition_time": since})
        changed = merged != current
        out.append(merged)
        break
    else:
        out.append(new.model_copy(update={"last_transition_time": now}))
    out += [c for c in conditions[len(out) :] if c.type != new.type]
    return out, changed


def status_with(
    status: Status | None, new: Sequence[Condition], *, generation: int | None, now: str
) -> tuple[Status, bool]:
    """``status`` with each of ``new`` set and ``observedGeneration`` written; and whether it changed."""
    current = status or Status()
    conditions = list(current.conditions)
    changed = current.observed_generation != generation or status is None
    for condition in new:
        conditions, flipped = set_condition(conditions, condition, now=now)
        changed = changed or flipped
    updated = current.model_copy(update={"conditions": conditions, "observed_generation": generation})
    return updated, changed
