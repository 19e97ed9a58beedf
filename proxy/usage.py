"""Spend history: ``GET /admin/usage``, ``GET /v1/usage`` and ``apiyi-proxy usage``.

The ledger books every key's, team's and model's spend per day and month, kept 400
days. A report reads those counters for a range of days (``period=day``) or months
(``period=month``) and answers one row per name and period that saw any request:
``{"period", "key_id"|"team"|"model", "spent_usd", "uncertain_usd", "requests"}``, or
the same as CSV under the header ``period,<by>,spent_usd,uncertain_usd,requests``.
"""

from __future__ import annotations

import calendar
import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Literal

from .errors import InvalidRequest
from .ledger import Ledger
from .money import usd_text
from .store import KeyRecord, Periods, Spend, Tally, group_of, keys_by_group

By = Literal["key", "team", "model"]
BY: tuple[By, ...] = ("key", "team", "model")
COLUMN = {"key": "key_id", "team": "team", "model": "model"}
HISTORY_DAYS = 400  # how long the ledger keeps its counters
REPORT_TIMEOUT_SECONDS = 30.0  # a report reads many counters; never on the request path
QUERY_FIELDS = ("from", "to", "by", "period", "format")


@dataclass(frozen=True)
class Query:
    """A validated history request."""

    start: date
    end: date
    by: By = "key"
    period: Literal["day", "month"] = "day"
    csv: bool = False

    def periods(self) -> list[str]:
        """The counters' period names in the range, oldest first."""
        if self.period == "month":
            return months(self.start, self.end)
        return days(self.start, self.end)

    def public(self) -> dict[str, str]:
        return {
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "by": self.by,
            "period": self.period,
        }


def next_month(day: date) -> date:
    """The first day of the month after ``day``'s."""
    return (day.replace(day=1) + timedelta(days=32)).replace(day=1)


def days(first: date, last: date) -> list[str]:
    """The names of the days from ``first`` to ``last``, oldest first."""
    return [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


def months(first: date, last: date) -> list[str]:
    """The names of the months from ``first``'s to ``last``'s, oldest first.

    Counted as numbers, not dates: the month after December 9999 is no date at all.
    """
    names, (year, month) = [], (first.year, first.month)
    while (year, month) <= (last.year, last.month):
        names.append(f"{year:04d}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return names


def last_day(month: date) -> date:
    """The last day of ``month``'s month."""
    return month.replace(day=calendar.monthrange(month.year, month.month)[1])


def wants_history(params: Mapping[str, str]) -> bool:
    return any(name in params for name in QUERY_FIELDS)


def parse_query(params: Mapping[str, str], today: str, *, by: bool = True) -> Query:
    """Read ``from``, ``to``, ``by``, ``period`` and ``format``; 400 naming the field.

    ``from`` and ``to`` are days (``2026-11-05``) or months (``2026-11``: its first day
    for ``from``, its last for ``to``); by default this month up to today.
    """
    now = date.fromisoformat(today)
    period = params.get("period", "day")
    if period not in ("day", "month"):
        raise InvalidRequest("'period' must be 'day' or 'month'.", param="period")
    grouping = params.get("by", "key")
    if not by and "by" in params:
        raise InvalidRequest("'by' is not taken here: this is the calling key's usage.", param="by")
    if grouping not in BY:
        raise InvalidRequest("'by' must be 'key', 'team' or 'model'.", param="by")
    as_csv = wants_csv(params)
    end = _day(params["to"], "to", last=True) if "to" in params else now
    start = _day(params["from"], "from", last=False) if "from" in params else end.replace(day=1)
    if start > end:
        raise InvalidRequest("'from' must not be after 'to'.", param="from")
    if (end - start).days >= HISTORY_DAYS + 31:
        raise InvalidRequest(
            f"The range is longer than the {HISTORY_DAYS} days the ledger keeps.", param="from"
        )
    return Query(start, end, grouping, period, as_csv)  # type: ignore[arg-type]


def wants_csv(params: Mapping[str, str]) -> bool:
    """``format``: ``json`` (the default) or ``csv``; 400 naming it otherwise."""
    form = params.get("format", "json")
    if form not in ("json", "csv"):
        raise InvalidRequest("'format' must be 'json' or 'csv'.", param="format")
    return form == "csv"


def _day(value: str, param: str, *, last: bool) -> date:
    try:
        if len(value) == 7:  # a month
            first = date.fromisoformat(value + "-01")
            if not last:
                return first
            return last_day(first)
        if len(value) != 10:
            raise ValueError(value)
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(
            f"'{param}' must be a day (YYYY-MM-DD) or a month (YYYY-MM).", param=param
        ) from None


async def history(
    ledger: Ledger,
    query: Query,
    models: Iterable[str],
    *,
    key: str | None = None,
    team: str | None = None,
    keys: Sequence[KeyRecord] | None = None,
) -> list[dict[str, Any]]:
    """The rows of ``query``, oldest period first, then by name; only the keys of
    ``team`` or the one ``key`` when given (``by=key``), among ``keys`` if given
    (else the store's)."""
    store = ledger.store
    names: dict[str, list[str]] = {}
    if keys is None:
        keys = await ledger.call("usage", store.keys, REPORT_TIMEOUT_SECONDS)
    if query.by == "key":
        names = keys_by_group(
            k for k in keys if (not key or k.id == key) and (not team or k.team == team)
        )
    elif query.by == "team":
        for name in await team_names(ledger, keys):
            if not team or name == team:
                names[group_of("", name)] = [name]
    else:
        # A model's spend is kept in each group it was spent in: every team's, and
        # that of every key without a team.
        teams = [name for name in await team_names(ledger, keys) if not team or name == team]
        groups = {group_of("", name) for name in teams}
        if not team:
            groups |= {group_of(k.id, None) for k in keys if not k.team}
        names = {group: list(models) for group in sorted(groups)}
    periods = query.periods()
    found = await ledger.call(
        "usage", lambda: store.history(query.by, names, periods), REPORT_TIMEOUT_SECONDS
    )
    answer = rows(found, periods, COLUMN[query.by])
    if query.by == "key":
        key_names = {k.id: k.name for k in keys}
        for row in answer:
            row["name"] = key_names[row["key_id"]]
    return answer


async def team_names(ledger: Ledger, keys: Sequence[KeyRecord]) -> list[str]:
    """Every team: those set on their own and those of keys."""
    teams = await ledger.call("usage", ledger.store.teams, REPORT_TIMEOUT_SECONDS)
    return sorted({t.name for t in teams} | {k.team for k in keys if k.team})


async def report(
    ledger: Ledger, params: Mapping[str, str], models: Iterable[str]
) -> tuple[Query, dict[str, Any]]:
    """``GET /admin/usage``: the history ``params`` ask for (``key`` and ``team``
    narrow it); without history parameters, today's and this month's totals too."""
    key, team = params.get("key"), params.get("team")
    query = parse_query(params, ledger.periods().day)
    keys = await ledger.call("usage", ledger.store.keys, REPORT_TIMEOUT_SECONDS)
    rows = await history(ledger, query, models, key=key, team=team, keys=keys)
    result: dict[str, Any] = {"object": "proxy.usage_history", **query.public()}
    if not wants_history(params):
        result.update(await usage_report(ledger, key=key, team=team, keys=keys))
    result["rows"] = rows
    return query, result


def rows(
    found: Mapping[tuple[str, str], Spend], periods: Sequence[str], column: str
) -> list[dict[str, Any]]:
    by_period: dict[str, list[tuple[str, Spend]]] = {period: [] for period in periods}
    for (name, period), spend in found.items():
        by_period[period].append((name, spend))
    return [
        {
            "period": period,
            column: name,
            "spent_usd": spend.spent / 1e6,
            "uncertain_usd": spend.uncertain / 1e6,
            "requests": spend.requests,
        }
        for period, cells in by_period.items()
        for name, spend in sorted(cells, key=_first)
    ]


def _first(cell: tuple[str, Spend]) -> str:
    return cell[0]


def as_csv(rows: Sequence[Mapping[str, Any]], by: str) -> str:
    """``period,<by>,spent_usd,uncertain_usd,requests``, amounts exact (``0.03``)."""
    column = COLUMN[by]
    lines = (
        (row["period"], row[column], _usd(row["spent_usd"]), _usd(row["uncertain_usd"]),
         row["requests"])
        for row in rows
    )  # fmt: skip
    return csv_text([("period", by, "spent_usd", "uncertain_usd", "requests"), *lines])


def csv_text(rows: Iterable[Sequence[Any]]) -> str:
    """``rows`` as CSV lines (``\n`` ends each): both CSV exports write through it."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def _usd(amount: float) -> str:
    return usd_text(round(amount * 1e6))


async def usage_report(
    ledger: Ledger,
    *,
    key: str | None = None,
    team: str | None = None,
    keys: Sequence[KeyRecord] | None = None,
) -> dict[str, Any]:
    """Spend per key and per team, today and this month, as ``GET /admin/usage`` and
    ``apiyi-proxy usage`` show it: the teams of keys and the teams set on their own;
    among ``keys`` if given (else the store's)."""
    periods = ledger.periods()
    if keys is None:
        keys = await ledger.call("admin", ledger.store.keys)
    rows = [
        {**k.public(), **await tallies(ledger, "key", k.id, periods)}
        for k in keys
        if (not key or k.id == key) and (not team or k.team == team)
    ]
    team_rows = [
        {"team": t, **await tallies(ledger, "team", t, periods)}
        for t in await team_names(ledger, keys)
        if not team or t == team
    ]
    return {"day": periods.day, "month": periods.month, "keys": rows, "teams": team_rows}


async def tallies(ledger: Ledger, scope: str, name: str, periods: Periods) -> dict[str, Any]:
    day, month = await day_and_month(ledger, scope, name, periods)
    return {"today": day.as_usd(), "this_month": month.as_usd()}


async def day_and_month(
    ledger: Ledger, scope: str, name: str, periods: Periods
) -> tuple[Tally, Tally]:
    """The money of key or team ``name`` (``scope``) today and this month."""
    store = ledger.store
    day = await ledger.call("usage", lambda: store.tally(scope, name, periods.day))
    month = await ledger.call("usage", lambda: store.tally(scope, name, periods.month))
    return day, month
