"""Packaging: the build requirement, constraints.txt against pyproject, the Dockerfile, CI.

constraints.txt is made by ``uv pip compile`` (the command is in its header) for Python 3.11 on
Linux; the Dockerfile and the README's test command install with it, so what the tests ran
with is what the image runs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from .conftest import ROOT

PYPROJECT = ROOT / "pyproject.toml"
CONSTRAINTS = ROOT / "constraints.txt"
DOCKERFILE = ROOT / "Dockerfile"
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
# What `via` names in constraints.txt for a requirement pyproject.toml states itself.
PYPROJECT_VIA = "apiyi-proxy (pyproject.toml)"
# The environment constraints.txt is compiled for (uv's --python-version 3.11, Linux).
LOCKED_FOR: dict[str, str] = {
    **{name: str(value) for name, value in default_environment().items()},
    "python_version": "3.11",
    "python_full_version": "3.11.0",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
# setuptools 77.0.0 first read an SPDX `license` string (PEP 639); it is not on PyPI, so
# 77.0.1 is the first release a build can get. 76.1.0 refuses the string.
FIRST_SETUPTOOLS_WITH_LICENSE_EXPRESSIONS = Version("77.0.1")


def pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


def asked_for() -> list[Requirement]:
    """The runtime and test requirements pyproject states, those that apply on the lock's
    platform."""
    project = pyproject()["project"]
    stated = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    requirements = [Requirement(line) for line in stated]
    return [r for r in requirements if r.marker is None or r.marker.evaluate(LOCKED_FOR)]


def pins() -> dict[str, tuple[Version, set[str]]]:
    """constraints.txt: each package's pinned version and the names its `via` lines give."""
    pinned: dict[str, tuple[Version, set[str]]] = {}
    current: set[str] | None = None
    for line in CONSTRAINTS.read_text().splitlines():
        if match := re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line):
            current = set()
            pinned[canonicalize_name(match[1])] = (Version(match[2]), current)
        elif current is not None and (via := re.fullmatch(r"\s+#\s+(?:via\s+)?(.+)", line)):
            if via[1].strip() != "via":
                current.add(via[1].strip())
    return pinned


def test_build_requirement_admits_only_setuptools_that_reads_the_license_string() -> None:
    project = pyproject()
    assert isinstance(project["project"]["license"], str)  # a PEP 639 license expression
    [setuptools] = [
        Requirement(line)
        for line in project["build-system"]["requires"]
        if Requirement(line).name == "setuptools"
    ]
    assert FIRST_SETUPTOOLS_WITH_LICENSE_EXPRESSIONS in setuptools.specifier
    assert Version("76.1.0") not in setuptools.specifier
    assert Version("75.8.0") not in setuptools.specifier
    for name in project["project"]["license-files"]:
        assert (ROOT / name).is_file(), name


def test_constraints_pin_every_requirement_within_its_specifier() -> None:
    pinned = pins()
    for requirement in asked_for():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement} is not pinned in constraints.txt"
        version, via = pinned[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"constraints.txt pins {name}=={version}, outside {requirement.specifier}"
        )
        assert PYPROJECT_VIA in via, f"constraints.txt does not know pyproject asks for {name}"


def test_constraints_pin_nothing_pyproject_no_longer_asks_for() -> None:
    pinned = pins()
    top_level = {canonicalize_name(r.name) for r in asked_for()}
    for name, (version, via) in pinned.items():
        assert via, f"{name}=={version} says nothing of why it is pinned (regenerate the file)"
        if PYPROJECT_VIA in via:
            assert name in top_level, f"pyproject no longer asks for {name}=={version}"
        # Pinned for another package: that package is pinned too.
        others = {canonicalize_name(v) for v in via - {PYPROJECT_VIA}}
        assert others <= pinned.keys(), f"{name} is pinned for {others - pinned.keys()}"


def test_constraints_header_says_how_to_regenerate_them() -> None:
    header = CONSTRAINTS.read_text().splitlines()[:2]
    command = header[1].lstrip("# ").split()
    assert command[:3] == ["uv", "pip", "compile"]
    assert "pyproject.toml" in command and ["--extra", "test"] == command[4:6]
    assert command[command.index("--python-version") + 1] == "3.11"
    assert command[command.index("--python-platform") + 1] == "linux"
    assert command[command.index("-o") + 1] == CONSTRAINTS.name


def hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed: pip install -c constraints.txt -e '.[test]'")
    return found


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile_runs() -> list[str]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.strip()[4:] for line in text.splitlines() if line.strip().startswith("RUN ")]


def test_dockerfile_installs_with_the_constraints_from_its_context() -> None:
    pip_runs = [run for run in dockerfile_runs() if re.search(r"\bpip (wheel|install)\b", run)]
    assert len(pip_runs) == 2  # wheels built in one stage, installed in the other
    for run in pip_runs:
        assert re.search(r"--constraint \S*constraints\.txt\b", run), run
    copied = [
        name
        for line in DOCKERFILE.read_text().splitlines()
        if line.startswith("COPY ") and "--from" not in line
        for name in line.split()[1:-1]
    ]
    assert {"constraints.txt", "LICENSE", "pyproject.toml", "README.md", "proxy"} <= set(copied)
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert not ignored & set(copied)


def fenced_commands(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)\n```", text, flags=re.DOTALL)


def test_ci_runs_the_readme_test_command_exactly() -> None:
    run, test = fenced_commands(README.read_text())[:2]
    assert "apiyi-proxy serve" in run
    lines = [line for line in CI_RUN.read_text().splitlines() if line and line[0] != "#"]
    assert lines[-1] == test
    for step in ("-c constraints.txt", "npm ci --prefix tests/node", "python -m pytest"):
        assert step in test


def test_changelog_has_unreleased_and_the_current_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    version = pyproject()["project"]["version"]
    sections = re.findall(r"^## \[([^\]]+)\]", changelog, flags=re.MULTILINE)
    assert sections[:2] == ["Unreleased", version]
    dated = rf"^## \[{re.escape(version)}\] - \d{{4}}-\d{{2}}-\d{{2}}$"
    assert re.search(dated, changelog, flags=re.MULTILINE)


def test_node_sdk_is_pinned_exactly_and_locked() -> None:
    package = json.loads((ROOT / "tests" / "node" / "package.json").read_text())
    lock = json.loads((ROOT / "tests" / "node" / "package-lock.json").read_text())
    pinned = package["dependencies"]["openai"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", pinned), pinned  # an exact version, no range
    assert lock["packages"][""]["dependencies"] == package["dependencies"]
    assert lock["packages"]["node_modules/openai"]["version"] == pinned
    assert lock["packages"]["node_modules/openai"]["integrity"].startswith("sha512-")
    assert "node_modules/" in (ROOT / ".gitignore").read_text().splitlines()
