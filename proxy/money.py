"""What an upstream call's outcome costs: the one rule that decides money.

The forwarding code reports what happened to each upstream call as an ``Outcome``;
``resolution`` says whether that outcome is spent (the upstream billed it),
uncertain (it may have, and we cannot know: kept as spend, marked uncertain) or
released (it certainly did not). ``charge`` adds the calls of one request up in
micro-dollars. Nothing else in the proxy decides what a call costs.

The upstream bills a generation once it starts, whether or not its answer arrives
(SPEC section 2), so anything that may have reached it and not come back with a
certain answer is uncertain; only a refusal or failure it answered, or a request it
never fully received, is released. A client that goes away is no outcome of its
own: the call goes on (the upstream bills it anyway) and costs what its answer says.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class Outcome(enum.Enum):
    """What happened to one upstream call; the value is its metrics label."""

    IMAGE = "ok"  # a 200 whose body carried the image
    REFUSED = "refused"  # a 4xx, 429 included: the upstream said no
    FAILED = "error"  # a 5xx: the upstream failed to serve it
    ERROR_IN_200 = "error_in_200"  # a 200 whose body is an error object
    NOT_SENT = "not_sent"  # no connection, or lost before the request was fully written
    TIMEOUT = "timeout"  # sent, and no answer came within the deadline
    LOST = "lost"  # sent, and the connection broke before an answer
    CUT_AFTER_IMAGE = "cut"  # a 200 whose body broke off once the image had begun
    CUT_BEFORE_IMAGE = "cut_early"  # a 200 whose body broke off before it showed anything
    CRASH = "crash"  # cancelled or failed in a way not foreseen


class Resolution(enum.Enum):
    SPENT = "settled"
    UNCERTAIN = "uncertain"
    RELEASED = "released"


_RESOLUTIONS = {
    Outcome.IMAGE: Resolution.SPENT,
    Outcome.CUT_AFTER_IMAGE: Resolution.SPENT,
    Outcome.REFUSED: Resolution.RELEASED,
    Outcome.FAILED: Resolution.RELEASED,
    Outcome.ERROR_IN_200: Resolution.RELEASED,
    Outcome.NOT_SENT: Resolution.RELEASED,
    Outcome.TIMEOUT: Resolution.UNCERTAIN,
    Outcome.LOST: Resolution.UNCERTAIN,
    Outcome.CUT_BEFORE_IMAGE: Resolution.UNCERTAIN,
    Outcome.CRASH: Resolution.UNCERTAIN,
}


def resolution(outcome: Outcome) -> Resolution:
    return _RESOLUTIONS[outcome]


@dataclass(frozen=True, slots=True)
class Charge:
    """What a request keeps of its hold: ``spent`` micro-dollars, ``uncertain`` of them
    maybe billed and maybe not."""

    spent: int
    uncertain: int

    @property
    def resolution(self) -> Resolution:
        if self.uncertain:
            return Resolution.UNCERTAIN
        return Resolution.SPENT if self.spent else Resolution.RELEASED


def charge(outcomes: Iterable[Outcome], price: int) -> Charge:
    """The charge for a request's upstream calls, each billed at ``price``."""
    spent = uncertain = 0
    for outcome in outcomes:
        kind = _RESOLUTIONS[outcome]
        if kind is not Resolution.RELEASED:
            spent += price
        if kind is Resolution.UNCERTAIN:
            uncertain += price
    return Charge(spent, uncertain)


def usd_text(micros: int) -> str:
    """Micro-dollars as exact decimal text for CSV: ``30000`` is ``0.03``, ``0`` is ``0``."""
    whole, part = divmod(micros, 1_000_000)
    return f"{whole}.{part:06d}".rstrip("0").rstrip(".")
