"""Which proxy code a run measures: the working tree, or a fixed git revision.

The working tree may change while a long run is going (a scenario starts fresh proxy
processes), so ``--rev`` extracts ``proxy/`` at one commit with ``git archive`` (read-only
for the repository) and every process of the run imports it from there.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

from .services import ROOT


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout.strip()


def extract(rev: str, into: Path) -> tuple[Path, str]:
    """``proxy/`` at ``rev`` unpacked under ``into``; returns the directory and its label."""
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", commit, "proxy"],
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    subject = _git("log", "-1", "--format=%s", commit)
    return into, f"git {commit[:12]} ({rev}: {subject[:80]})"


def describe_working_tree() -> str:
    try:
        commit = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--", "proxy"))
    except (OSError, subprocess.SubprocessError):
        return f"working tree {ROOT}"
    state = "with uncommitted changes in proxy/" if dirty else "clean proxy/"
    return f"working tree {ROOT} (HEAD {commit[:12]}, {state})"
