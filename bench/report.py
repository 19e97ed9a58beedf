"""Result rows, printed as one table per scenario and saved as JSON and Markdown."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

Value = float | int | str | None


@dataclass
class Row:
    scenario: str
    target: str
    values: dict[str, Value] = field(default_factory=dict)


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or not baseline:
        return None
    return value / baseline


def fmt(value: Value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool | int | str):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}" if magnitude < 1 else f"{value:.2f}"


@dataclass
class Report:
    title: str
    environment: dict[str, str]
    rows: list[Row] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        cells = ", ".join(f"{k}={fmt(v)}" for k, v in row.values.items())
        print(f"  [{row.scenario}] {row.target}: {cells}", flush=True)

    def note(self, scenario: str, text: str) -> None:
        self.notes.setdefault(scenario, []).append(text)
        print(f"  [{scenario}] note: {text}", flush=True)

    def table(self, scenario: str) -> str:
        rows = [r for r in self.rows if r.scenario == scenario]
        columns: list[str] = []
        for row in rows:
            columns += [c for c in row.values if c not in columns]
        lines = [
            "| target | " + " | ".join(columns) + " |",
            "| --- |" + " ---: |" * len(columns),
        ]
        for row in rows:
            cells = [fmt(row.values.get(c)) for c in columns]
            lines.append(f"| {row.target} | " + " | ".join(cells) + " |")
        lines += [f"\n{n}" for n in self.notes.get(scenario, [])]
        return "\n".join(lines)

    def markdown(self) -> str:
        parts = [f"# {self.title}", ""]
        parts += [f"- {k}: {v}" for k, v in self.environment.items()]
        for scenario in dict.fromkeys(r.scenario for r in self.rows):
            parts += ["", f"## {scenario}", "", self.table(scenario)]
        return "\n".join(parts) + "\n"

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        data = {
            "title": self.title,
            "environment": self.environment,
            "rows": [asdict(r) for r in self.rows],
            "notes": self.notes,
        }
        (directory / f"{stamp}.json").write_text(json.dumps(data, indent=1))
        path = directory / f"{stamp}.md"
        path.write_text(self.markdown())
        return path
