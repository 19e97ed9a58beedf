"""The overview chart's layout: a round axis, bars in proportion, the uncertain part on top."""

from __future__ import annotations

import pytest

from proxy.console.chart import BOTTOM, HEIGHT, TOP, Day, axis_step, dollars, layout


@pytest.mark.parametrize(
    ("micros", "text"),
    [(0, "$0.00"), (30_000, "$0.03"), (1_000_000, "$1.00"), (1_234_567_890, "$1,234.56789"),
     (5, "$0.000005")],
)  # fmt: skip
def test_dollars_show_cents_and_every_place_the_amount_has(micros: int, text: str) -> None:
    assert dollars(micros) == text


@pytest.mark.parametrize(
    ("most", "step"),
    [(0, 10_000), (30_000, 10_000), (50_000, 20_000), (90_000, 50_000), (3_999_999, 1_000_000)],
)
def test_the_axis_step_is_round_and_four_steps_reach_the_largest_day(most: int, step: int) -> None:
    assert axis_step(most) == step
    assert step * 4 >= most


def test_bars_are_in_proportion_and_the_uncertain_part_sits_on_top() -> None:
    days = [
        Day("2026-12-01", 0, 0),
        Day("2026-12-02", 30_000, 0),
        Day("2026-12-03", 60_000, 30_000),
    ]
    chart = layout(days)
    empty, small, big = chart.bars
    assert empty.height == 0
    assert big.height == pytest.approx(2 * small.height)
    assert big.y < big.uncertain_y < chart.bottom
    assert big.uncertain_y - big.y == pytest.approx(small.height)
    assert chart.bottom == HEIGHT - BOTTOM and big.y >= TOP
    assert chart.total == 90_000
    assert [t.label for t in chart.ticks] == ["$0.00", "$0.02", "$0.04", "$0.06"]
    assert "of it uncertain" in big.title and "uncertain" not in small.title


def test_a_month_of_nothing_still_draws_an_axis() -> None:
    chart = layout([Day(f"2026-11-{d:02d}", 0, 0) for d in range(1, 31)])
    assert len(chart.bars) == 30 and all(b.height == 0 for b in chart.bars)
    assert [t.label for t in chart.ticks] == ["$0.00", "$0.01"]
    assert [b.label for b in chart.bars if b.label] == [
        "11-01",
        "11-06",
        "11-11",
        "11-16",
        "11-21",
        "11-26",
        "11-30",
    ]
