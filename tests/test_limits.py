"""The one reading of user-given limits and team names (admin API, CLI and config)."""

from __future__ import annotations

import math

import pytest

from proxy.limits import (
    TEAM_LIMIT_FIELDS,
    LimitError,
    Limits,
    limit_changes,
    team_name,
    usd_to_micros,
    whole_count,
)


@pytest.mark.parametrize(
    ("value", "micros"),
    [
        (None, None),  # no limit
        (0, 0),  # nothing may be spent
        (0.0, 0),
        (0.000001, 1),  # one micro-dollar, the smallest budget
        (0.03, 30_000),
        (5, 5_000_000),
        (1e9, 10**15),
    ],
)
def test_usd_amounts_in_micro_dollars(value: object, micros: int | None) -> None:
    assert usd_to_micros(value) == micros


@pytest.mark.parametrize(
    "value",
    [1e-7, 0.0000009, -0.01, -1, 1e9 + 1, 1e300, math.inf, math.nan, True, "5", [], {}],
)
def test_usd_amounts_refused(value: object) -> None:
    with pytest.raises(LimitError):
        usd_to_micros(value)


@pytest.mark.parametrize(("value", "count"), [(None, None), (0, 0), (1, 1), (60.0, 60)])
def test_whole_counts(value: object, count: int | None) -> None:
    assert whole_count(value) == count


@pytest.mark.parametrize("value", [1.5, -1, 10**10, math.nan, math.inf, False, "3"])
def test_whole_counts_refused(value: object) -> None:
    with pytest.raises(LimitError):
        whole_count(value)


def test_limit_changes_name_the_field_and_leave_absent_ones_alone() -> None:
    assert limit_changes({"daily_usd": 0, "rpm": None, "name": "x"}) == {
        "daily_micros": 0,
        "rpm": None,
    }
    assert Limits(**limit_changes({"monthly_usd": 2})) == Limits(monthly_micros=2_000_000)
    with pytest.raises(LimitError) as info:
        limit_changes({"daily_usd": 0, "monthly_usd": 1e-7})
    assert info.value.field == "monthly_usd"
    # A team has budgets only: other fields are not read.
    assert limit_changes({"rpm": -1, "daily_usd": 1}, TEAM_LIMIT_FIELDS) == {
        "daily_micros": 1_000_000
    }


@pytest.mark.parametrize("name", ["design", "a", "Team_1.eu-west", "x" * 64])
def test_team_names_accepted(name: str) -> None:
    assert team_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "a|b", "a{b}", "a:b", "a b", " design", "x" * 65, "é", None, 5]
)
def test_team_names_refused(name: object) -> None:
    with pytest.raises(LimitError):
        team_name(name)
