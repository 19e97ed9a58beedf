"""History ranges at the edges of the calendar (found by the schemathesis run)."""

from __future__ import annotations

from datetime import date

import httpx
import pytest

from proxy.usage import months, parse_query
from tests.conftest import Proxy


def test_the_last_month_of_the_calendar_is_a_range_not_a_crash() -> None:
    query = parse_query({"from": "9999-12", "to": "9999-12", "period": "month"}, "2026-11-05")
    assert (query.start, query.end) == (date(9999, 12, 1), date(9999, 12, 31))
    assert query.periods() == ["9999-12"]
    assert months(date(1, 1, 5), date(1, 2, 1)) == ["0001-01", "0001-02"]
    assert months(date(2025, 11, 30), date(2026, 2, 1)) == [
        "2025-11", "2025-12", "2026-01", "2026-02",
    ]  # fmt: skip


@pytest.mark.parametrize("params", [{"to": "9999-12"}, {"to": "9999-12-31", "period": "month"}])
def test_a_history_ending_in_december_9999_answers_not_500(
    proxy: Proxy, params: dict[str, str]
) -> None:
    admin = proxy.admin("GET", "/admin/usage", params={"from": "9999-12", **params})
    assert admin.status_code == 200, admin.text
    assert admin.json()["to"] == "9999-12-31"
    auth = {"authorization": f"Bearer {proxy.default_key}"}

    own = httpx.get(proxy.url + "/v1/usage", params={"from": "9999-12", **params}, headers=auth)
    assert own.status_code == 200, own.text
