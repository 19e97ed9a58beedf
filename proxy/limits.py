"""Limits of a key or team, and the one reading of what a user gives for them.

The admin API, the command line and the config file all turn user input into limits
here, so that one rule holds everywhere:

- absent or ``null`` (``none`` on the command line) is no limit;
- ``0`` allows nothing: no money spent, no request, no call in flight;
- a positive amount below one micro-dollar cannot be counted and is refused, as are
  negative, non-numeric and absurdly large values; rpm and concurrency are whole numbers.

Team names are ``[A-Za-z0-9._-]{1,64}``: they become part of Redis keys and hash
tags, and the key lookup splits on ``|``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

MICROS_PER_USD = 1_000_000
# Far above any real budget, and far below where a double stops counting micro-dollars
# exactly (the store's scripts add them up as doubles).
MAX_USD = 1_000_000_000
MAX_COUNT = 1_000_000_000
TEAM_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")

# User-facing field -> Limits field.
USD_FIELDS = {"daily_usd": "daily_micros", "monthly_usd": "monthly_micros"}
COUNT_FIELDS = {"rpm": "rpm", "concurrency": "concurrency"}
KEY_LIMIT_FIELDS = (*USD_FIELDS, *COUNT_FIELDS)
TEAM_LIMIT_FIELDS = tuple(USD_FIELDS)


@dataclass(frozen=True)
class Limits:
    """Limits of a key or a team; None means no limit, 0 allows nothing."""

    daily_micros: int | None = None
    monthly_micros: int | None = None
    rpm: int | None = None
    concurrency: int | None = None


class LimitError(ValueError):
    """A value a user gave for a limit or a team name is not acceptable.

    ``field`` names it as the user spelled it (``daily_usd``), when known. The reason
    does not say how to ask for no limit: each caller adds its own spelling of that.
    """

    def __init__(self, reason: str, field: str = "") -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.reason = reason
        self.field = field


def usd_to_micros(value: object) -> int | None:
    """A budget in USD as integer micro-dollars; None (no limit) stays None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise LimitError("must be an amount in USD")
    if value < 0:
        raise LimitError("must be >= 0 (0 allows nothing)")
    if value > MAX_USD:
        raise LimitError(f"must be at most {MAX_USD} USD")
    if 0 < value < 1 / MICROS_PER_USD:
        # It would round to 0, which allows nothing: surely not what was meant.
        raise LimitError("must be 0 (nothing) or at least one micro-dollar (0.000001)")
    return round(value * MICROS_PER_USD)


def whole_count(value: object) -> int | None:
    """An rpm or concurrency limit; None (no limit) stays None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LimitError("must be a whole number")
    if isinstance(value, float) and not value.is_integer():
        raise LimitError("must be a whole number")
    if not 0 <= value <= MAX_COUNT:
        raise LimitError(f"must be 0..{MAX_COUNT} (0 allows nothing)")
    return int(value)


def limit_changes(
    values: Mapping[str, object], fields: tuple[str, ...] = KEY_LIMIT_FIELDS
) -> dict[str, int | None]:
    """The ``Limits`` fields that ``values`` sets (user field names, only ``fields``);
    a field absent from ``values`` is not changed."""
    changes: dict[str, int | None] = {}
    for name in fields:
        if name not in values:
            continue
        try:
            if name in USD_FIELDS:
                changes[USD_FIELDS[name]] = usd_to_micros(values[name])
            else:
                changes[COUNT_FIELDS[name]] = whole_count(values[name])
        except LimitError as error:
            raise LimitError(error.reason, name) from None
    return changes


def team_name(value: object) -> str:
    if not isinstance(value, str) or not TEAM_NAME.fullmatch(value):
        raise LimitError("a team name is 1 to 64 of the characters A-Z a-z 0-9 . _ -")
    return value
