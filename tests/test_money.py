"""The one rule that decides money: what each upstream outcome costs."""

from __future__ import annotations

import pytest

from proxy.money import Charge, Outcome, Resolution, charge, resolution

PRICE = 30_000


@pytest.mark.parametrize(
    ("case", "outcome", "expected"),
    [
        ("a 200 with its image", Outcome.IMAGE, Resolution.SPENT),
        ("a 4xx: moderation, a bad size, a quota refusal", Outcome.REFUSED, Resolution.RELEASED),
        ("a 429 from the upstream (a 4xx too)", Outcome.REFUSED, Resolution.RELEASED),
        ("a 5xx", Outcome.FAILED, Resolution.RELEASED),
        ("a 200 carrying an error object", Outcome.ERROR_IN_200, Resolution.RELEASED),
        ("connection refused, or reset before the request was fully written",
         Outcome.NOT_SENT, Resolution.RELEASED),
        ("timeout before the response began", Outcome.TIMEOUT, Resolution.UNCERTAIN),
        ("reset after the request was fully written", Outcome.LOST, Resolution.UNCERTAIN),
        ("timeout or reset after the response began, image begun",
         Outcome.CUT_AFTER_IMAGE, Resolution.SPENT),
        ("timeout or cut body after the response began, before the image",
         Outcome.CUT_BEFORE_IMAGE, Resolution.UNCERTAIN),
        ("the process failed or was cancelled mid-call", Outcome.CRASH, Resolution.UNCERTAIN),
    ],
)  # fmt: skip
def test_each_outcome_costs_what_the_upstream_may_have_billed(
    case: str, outcome: Outcome, expected: Resolution
) -> None:
    assert resolution(outcome) is expected, case
    spent, uncertain = {
        Resolution.SPENT: (PRICE, 0),
        Resolution.UNCERTAIN: (PRICE, PRICE),
        Resolution.RELEASED: (0, 0),
    }[expected]
    assert charge([outcome], PRICE) == Charge(spent, uncertain)
    assert charge([outcome], PRICE).resolution is expected


def test_every_outcome_has_a_rule() -> None:
    for outcome in Outcome:
        assert isinstance(resolution(outcome), Resolution)


def test_client_gone_leaves_the_upstream_outcome_to_decide() -> None:
    # A client that leaves does not stop the upstream call (the upstream bills it
    # anyway), so the proxy keeps reading and the call costs what its answer says.
    assert not any(o.name == "CLIENT_GONE" for o in Outcome)
    assert charge([Outcome.IMAGE], PRICE) == Charge(PRICE, 0)


def test_fanout_adds_up_each_call() -> None:
    outcomes = [Outcome.IMAGE, Outcome.REFUSED, Outcome.TIMEOUT, Outcome.CUT_AFTER_IMAGE]
    cost = charge(outcomes, PRICE)
    assert cost == Charge(3 * PRICE, PRICE)
    assert cost.resolution is Resolution.UNCERTAIN
    assert charge([Outcome.REFUSED, Outcome.NOT_SENT], PRICE).resolution is Resolution.RELEASED
    assert charge([], PRICE) == Charge(0, 0)
