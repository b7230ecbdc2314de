import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.resources.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("700ms", 0.7), ("30s", 30), ("24h", 86400), ("1h30m", 5400), ("1.5s", 1.5), ("2m10s", 130)],
)
def test_durations_parse_to_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "30", "7 seconds", "s", "-1s", "1d", "30S", "1h 30m", "ms100"])
def test_malformed_durations_are_refused_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"invalid duration .*e\.g\. 700ms, 30s, 24h"):
        parse_duration(text)


@given(st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(["ms", "s", "m", "h"])), min_size=1, max_size=4))
def test_any_sum_of_parts_parses_to_the_sum(parts: list[tuple[int, str]]) -> None:
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    text = "".join(f"{n}{u}" for n, u in parts)
    assert parse_duration(text) == pytest.approx(sum(n * unit[u] for n, u in parts))
