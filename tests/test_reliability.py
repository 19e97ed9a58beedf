"""RELIABILITY.md's figures are the suite's own (see tests/reliability.py)."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def test_reliability_md_counts_are_the_suites() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.reliability", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
