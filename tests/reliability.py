"""What RELIABILITY.md reports: the fault and bad-input scenarios, counted from the suite.

    python -m tests.reliability           # the table, counted from the collected tests
    python -m tests.reliability --run     # run those tests and rewrite RELIABILITY.md
    python -m tests.reliability --check   # exit 1 if RELIABILITY.md's counts are stale

A scenario names its tests by ``file::function`` patterns. Its cases are counted per
collected test: a parametrized test is one case per parameter set, a hypothesis test
counts its ``max_examples``, and a test that loops over many inputs itself says how
many with ``@pytest.mark.cases(N)``. ``test_reliability_md_counts_are_the_suites``
keeps the document's counts equal to these, so it stays true as tests change.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ROOT / "RELIABILITY.md"
TABLE_START = "<!-- table: python -m tests.reliability --run -->"
TABLE_END = "<!-- end of table -->"


@dataclass(frozen=True)
class Scenario:
    name: str
    holds: str
    tests: tuple[str, ...]


SCENARIOS = (
    Scenario(
        "Bad bodies and fields",
        "a clear OpenAI-shaped 4xx, never a 500; nothing reaches the upstream or holds money",
        (
            "test_bad_input.py::*",
            "test_edits.py::*",
            "test_policy.py::test_any_*",
            "test_policy.py::test_what_passes_*",
            "test_policy.py::test_*_is_400*",
            "test_policy.py::test_form_*",
            "test_admin.py::test_bad_admin_input_is_400",
            "test_admin.py::test_budget_below_one_micro_dollar_*",
            "test_admin.py::test_team_name_with_a_bar_is_refused",
            "test_cli.py::test_cli_refuses_bad_limits_naming_the_flag",
            "test_forward.py::test_an_idempotency_key_too_long_*",
        ),
    ),
    Scenario(
        "Protocol abuse at the edge",
        "oversized heads refused, slow and idle connections dropped, connections capped, "
        "normal calls stay fast; no redirect built from Host; the proxy's request id rules",
        (
            "test_edge.py::*",
            "test_forward.py::test_every_response_has_a_request_id",
            "test_forward.py::test_the_proxys_request_id_*",
            "test_bad_input.py::test_a_trailing_slash_*",
            "test_bad_input.py::test_unknown_route_*",
        ),
    ),
    Scenario(
        "Secrets",
        "the upstream key, client keys and tokens never appear in responses, logs or metrics, "
        "even when the upstream echoes its bearer in every error field; labels stay bounded; "
        "placeholder and short secrets are refused",
        (
            "test_logs.py::test_no_secret_in_any_output",
            "test_upstream_errors.py::*",
            "test_sdk.py::test_upstream_key_refused_*",
            "test_config.py::test_masked_hides_secrets",
            "test_config.py::test_the_shipped_env_example_*",
            "test_config.py::test_placeholder_and_short_secrets_*",
            "test_cli.py::test_check_config_*",
            "test_metrics.py::test_no_raw_path_*",
            "test_metrics.py::test_metrics_can_require_a_bearer_token",
            "test_admin.py::test_admin_needs_the_admin_token",
        ),
    ),
    Scenario(
        "Upstream faults",
        "each outcome costs what the upstream may have billed: released when it certainly "
        "did not bill, kept as uncertain otherwise; the client gets the mapped error",
        (
            "test_money.py::*",
            "test_forward.py::test_upstream_*",
            "test_forward.py::test_unreachable_upstream_*",
            "test_forward.py::test_answer_broken_off_*",
            "test_forward.py::test_client_gone_*",
            "test_forward.py::test_fanout_*",
            "test_money_faults.py::test_trickling_*",
            "test_money_faults.py::test_a_client_that_reads_slowly_*",
            "test_sdk.py::test_upstream_*",
            "test_streaming.py::*",
            "test_rewrite.py::*",
        ),
    ),
    Scenario(
        "Store stall and loss",
        "fail closed with a 503 (never a free call), /readyz agrees with the request path, "
        "and the ledger adds up once the store is back; a store restarted empty still books "
        "what was billed",
        (
            "test_forward.py::test_store_down_*",
            "test_forward.py::test_readyz_*",
            "test_resp.py::test_a_*",
            "test_replicas.py::test_redis_paused_*",
            "test_replicas.py::test_full_replay_space_*",
            "test_replicas.py::test_config_team_is_restored_*",
            "test_money_faults.py::test_store_restarted_empty_*",
            "test_store_tls.py::*",
            "test_redis_url.py::*",
            "test_store.py::test_both_connections_*",
            "test_store.py::test_ping_*",
        ),
    ),
    Scenario(
        "Replica crash and shutdown",
        "a killed replica's holds and slots are resolved as uncertain spend within 30 s; "
        "SIGTERM lets calls in flight finish",
        (
            "test_replicas.py::test_crashed_replica_*",
            "test_store.py::test_expired_hold_*",
            "test_store.py::test_expire_sweep",
            "test_store.py::test_renewed_holds_*",
            "test_store.py::test_a_claim_that_lived_with_a_lapsed_hold_*",
            "test_serve.py::test_sigterm_*",
        ),
    ),
    Scenario(
        "Budgets, limits and changes across replicas",
        "budgets spent exactly, never overdrawn, under concurrency on several replicas and "
        "on a cluster; revocations and limit changes reach every replica within 1 s",
        (
            "test_replicas.py::test_three_replicas_*",
            "test_replicas.py::test_budget_exact_on_a_redis_cluster",
            "test_replicas.py::test_concurrency_and_rpm_*",
            "test_store.py::test_concurrent_reserves_never_overdraw",
            "test_store.py::test_budgets_refuse_at_every_level",
            "test_ledger_stateful.py::*",
            "test_invalidation.py::*",
        ),
    ),
    Scenario(
        "Retries and idempotency",
        "an SDK retry never pays twice for one picture, never replays a delivered one; "
        "an Idempotency-Key replays or refuses, on any replica",
        (
            "test_money_faults.py::test_sdk_*",
            "test_replicas.py::test_sdk_*",
            "test_replicas.py::test_idempotency_*",
            "test_replicas.py::test_replay_*",
            "test_store.py::test_idempotency_records",
            "test_store.py::test_abandon_*",
            "test_store.py::test_reserve_*claim*",
            "test_store.py::test_a_consumed_record_*",
            "test_results.py::*",
        ),
    ),
    Scenario(
        "The console and the API document",
        "a forged, expired or signed-out session opens nothing; a form without its CSRF "
        "token or sent from another site changes nothing; failed sign-ins are limited; bad "
        "form input and a store away are pages that say so, never a 500; generated calls "
        "to every documented operation get no 5xx and no answer the document contradicts",
        (
            "test_console.py::*",
            "test_console_session.py::*",
            "test_console_browser.py::test_a_wrong_token_*",
            "test_schemathesis.py::*",
        ),
    ),
)


@dataclass
class Tally:
    tests: int = 0
    cases: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


def cases_of(item: pytest.Item) -> int:
    marker = item.get_closest_marker("cases")
    if marker is not None:
        return int(marker.args[0])
    function = getattr(item, "obj", None)
    inner = getattr(function, "hypothesis", None)
    if inner is not None:
        settings = getattr(function, "_hypothesis_internal_use_settings", None)
        return int(getattr(settings, "max_examples", 100))
    machine_settings = getattr(getattr(item, "cls", None), "settings", None)
    if machine_settings is not None and hasattr(machine_settings, "max_examples"):
        return int(machine_settings.max_examples)
    return 1


def scenario_of(nodeid: str) -> Scenario | None:
    """The scenario whose most specific (longest) pattern matches the test."""
    path, _, rest = nodeid.partition("::")
    name = Path(path).name + "::" + rest.split("[")[0].split("::")[-1]
    best: tuple[int, Scenario | None] = (0, None)
    for scenario in SCENARIOS:
        for pattern in scenario.tests:
            if fnmatch.fnmatchcase(name, pattern) and len(pattern) > best[0]:
                best = (len(pattern), scenario)
    return best[1]


class Collector:
    """A pytest plugin: which scenario each test belongs to, its cases, its outcome."""

    def __init__(self) -> None:
        self.tallies = {s.name: Tally() for s in SCENARIOS}
        self.selected: list[str] = []

    def pytest_collection_modifyitems(
        self, session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        keep = []
        for item in items:
            scenario = scenario_of(item.nodeid)
            if scenario is None:
                continue
            tally = self.tallies[scenario.name]
            tally.tests += 1
            tally.cases += cases_of(item)
            keep.append(item)
            self.selected.append(item.nodeid)
        items[:] = keep

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            scenario = scenario_of(report.nodeid)
            if scenario is not None:
                outcomes = self.tallies[scenario.name].outcomes
                outcomes[report.outcome] = outcomes.get(report.outcome, 0) + 1


def collect(run: bool) -> tuple[Collector, float]:
    collector = Collector()
    args = ["-q", "-p", "no:cacheprovider", str(ROOT / "tests")]
    started = time.monotonic()
    code = pytest.main([*args] if run else ["--collect-only", *args], plugins=[collector])
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        raise SystemExit(f"pytest could not collect the suite (exit {int(code)})")
    return collector, time.monotonic() - started


def table(collector: Collector, with_results: bool) -> str:
    lines = [
        "| scenario | tests | cases | what must hold | result |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for scenario in SCENARIOS:
        tally = collector.tallies[scenario.name]
        result = "not run"
        if with_results:
            passed = tally.outcomes.get("passed", 0)
            result = f"{passed}/{tally.tests} passed"
        files = sorted({pattern.split("::")[0] for pattern in scenario.tests})
        tests = ", ".join(f"`{f}`" for f in files)
        lines.append(
            f"| {scenario.name} ({tests}) | {tally.tests} | {tally.cases} | "
            f"{scenario.holds} | {result} |"
        )
    return "\n".join(lines)


def counts(text: str) -> list[tuple[str, str, str]]:
    """The (scenario, tests, cases) columns of a table, for comparing two of them."""
    rows = re.findall(r"^\| ([^|]+) \| (\d+) \| (\d+) \|", text, re.MULTILINE)
    return [(name.strip(), tests, cases) for name, tests, cases in rows]


def rewrite(document: str, new_table: str, run_seconds: float, total: int) -> str:
    head, _, rest = document.partition(TABLE_START)
    _, _, tail = rest.partition(TABLE_END)
    today = datetime.date.today().isoformat()
    machine = f"{platform.machine()}, {_cores()} cores, Python {platform.python_version()}"
    stamp = f"Last run: {today}, {total} tests in {run_seconds:.0f} s ({machine})."
    return f"{head}{TABLE_START}\n{new_table}\n\n{stamp}\n{TABLE_END}{tail}"


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability")
    parser.add_argument("--run", action="store_true", help="run the tests, rewrite the document")
    parser.add_argument("--check", action="store_true", help="exit 1 if the counts are stale")
    args = parser.parse_args(argv)
    collector, seconds = collect(run=args.run)
    new_table = table(collector, with_results=args.run)
    if args.check:
        written = DOCUMENT.read_text() if DOCUMENT.exists() else ""
        if counts(written) != counts(new_table):
            print("RELIABILITY.md is stale; run: python -m tests.reliability --run")
            print(new_table)
            return 1
        return 0
    print(new_table)
    if args.run:
        total = len(collector.selected)
        failed = sum(t.outcomes.get("failed", 0) for t in collector.tallies.values())
        DOCUMENT.write_text(rewrite(DOCUMENT.read_text(), new_table, seconds, total))
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
