"""The overview's chart: spend per day as bars, laid out here and drawn by the template.

Readable without colour: the uncertain part of a day's spend is hatched, not tinted;
the axis is labelled in dollars; every bar has a title, and the page shows the same
figures as a table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

WIDTH, HEIGHT = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 84, 8, 12, 34  # room for the axis labels


@dataclass(frozen=True)
class Day:
    day: str  # 2026-12-07
    spent: int  # micro-dollars, the uncertain part included
    uncertain: int


@dataclass(frozen=True)
class Bar:
    x: float
    width: float
    day: Day
    y: float  # the top of the whole bar
    height: float
    uncertain_y: float  # the top of its certain part: the uncertain part sits above
    label: str | None  # the day's label under the axis, every few days

    @property
    def title(self) -> str:
        text = f"{self.day.day}: {dollars(self.day.spent)}"
        if self.day.uncertain:
            text += f" ({dollars(self.day.uncertain)} of it uncertain)"
        return text


@dataclass(frozen=True)
class Tick:
    y: float
    label: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    left: int
    bottom: float  # the axis line's y
    bars: tuple[Bar, ...]
    ticks: tuple[Tick, ...]
    total: int


def dollars(micros: int) -> str:
    """``$1,234.50``: cents always, more places only where the amount has them."""
    whole, part = divmod(micros, 1_000_000)
    fraction = f"{part:06d}".rstrip("0").ljust(2, "0")
    return f"${whole:,}.{fraction}"


def axis_step(most: int) -> int:
    """A round step for the axis (1, 2 or 5 times a power of ten micro-dollars, at least
    one cent) such that four steps reach ``most``."""
    step = 10_000
    while True:
        for factor in (1, 2, 5):
            if step * factor * 4 >= most:
                return step * factor
        step *= 10


def layout(days: Sequence[Day]) -> Chart:
    most = max((d.spent for d in days), default=0)
    step = axis_step(most)
    steps = max(1, -(-most // step))  # whole steps up to the largest day, at least one
    top = step * steps
    plot_height = HEIGHT - TOP - BOTTOM
    plot_width = WIDTH - LEFT - RIGHT
    slot = plot_width / max(len(days), 1)
    axis = TOP + plot_height

    def y_of(micros: int) -> float:
        return axis - plot_height * micros / top

    bars = tuple(
        Bar(
            x=LEFT + i * slot + slot * 0.1,
            width=slot * 0.8,
            day=d,
            y=y_of(d.spent),
            height=axis - y_of(d.spent),
            uncertain_y=y_of(d.spent - d.uncertain),
            label=d.day[5:] if i % 5 == 0 or i == len(days) - 1 else None,
        )
        for i, d in enumerate(days)
    )
    ticks = tuple(Tick(y_of(step * i), dollars(step * i)) for i in range(steps + 1))
    total = sum(d.spent for d in days)
    return Chart(WIDTH, HEIGHT, LEFT, axis, bars, ticks, total)
