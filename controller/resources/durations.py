"""Durations as users write them (``700ms``, ``30s``, ``1h30m``), kept as strings in resources."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, WithJsonSchema

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_WHOLE = re.compile(DURATION_PATTERN)


def parse_duration(text: str) -> float:
    """Return the duration in seconds; raise ValueError naming the accepted forms."""
    if not isinstance(text, str) or not _WHOLE.match(text):
        raise ValueError(f"invalid duration {text!r}: expected a number and a unit (ms, s, m, h), e.g. 700ms, 30s, 24h")
    return sum(float(value) * _UNIT_SECONDS[unit] for value, unit in _PART.findall(text))


def _check_positive(text: str) -> str:
    if parse_duration(text) <= 0:
        raise ValueError(f"duration {text!r} must be greater than zero")
    return text


Duration = Annotated[
    str,
    AfterValidator(_check_positive),
    WithJsonSchema(
        {"type": "string", "pattern": DURATION_PATTERN, "description": "a duration such as 700ms, 30s, 24h"}
    ),
]
