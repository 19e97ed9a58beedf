"""deploy/: Prometheus config and rules, the dashboard, Kubernetes, compose, the Dockerfile.

Metric names are checked against what a running proxy really exposes on /metrics, and
environment names against what ``proxy.config`` really reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy import config

from .conftest import ROOT, Proxy

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "apiyi-proxy.json"
DOCKERFILE = ROOT / "Dockerfile"

METRIC = re.compile(r"\bapiyi_proxy_[A-Za-z0-9_]+")
# The series names Prometheus stores for each family type.
SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}
# Read by proxy.config before any other setting: the YAML file to load.
CONFIG_ENV = "APIYI_PROXY_CONFIG"
SECTION_ENV = re.compile(r"APIYI_PROXY_([A-Z]+)__([A-Z_]+)")
DEPLOYMENT = "apiyi-proxy"


def defaults() -> config.Settings:
    return config.load(path=os.devnull, env={})


# metrics -----------------------------------------------------------------------------


def scrape_after_traffic(proxy: Proxy) -> str:
    """Generations, a refusal and a budget through the proxy, then its exposition."""
    team = proxy.admin("POST", "/admin/teams", json={"name": "design", "daily_usd": 5})
    assert team.status_code == 201, team.text
    headers = {"authorization": f"Bearer {proxy.new_key(team='design')}"}
    url = proxy.url + "/v1/images/generations"
    for size in ("1024x1024", "2048×1152", "auto"):
        answer = httpx.post(url, json={"prompt": "a lighthouse", "size": size}, headers=headers)
        assert answer.status_code == 200, answer.text
    refused = httpx.post(url, json={"prompt": "two", "n": 2}, headers=headers)
    assert refused.status_code == 400
    metrics = httpx.get(proxy.url + "/metrics")
    assert metrics.status_code == 200
    return metrics.text


def exported(exposition: str) -> tuple[set[str], set[str]]:
    """(family names, every series name Prometheus would store) of an exposition."""
    families: set[str] = set()
    series: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        families.add(family.name)
        series.update(family.name + s for s in SERIES_SUFFIXES.get(family.type, ("",)))
        series.update(sample.name for sample in family.samples)
    return families, series


def sample_value(exposition: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    found = [
        float(sample.value)
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]
    if not found:
        raise AssertionError(f"no sample {name}{labels} in the exposition")
    return sum(found)


def family_of(name: str, families: set[str]) -> str:
    for suffix in ("_total", "_bucket", "_sum", "_count", "_created", ""):
        if name.endswith(suffix) and name.removesuffix(suffix) in families:
            return name.removesuffix(suffix)
    raise AssertionError(f"{name} belongs to no exported family")


def rule_expressions() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [str(r["expr"]) for group in rules["groups"] for r in group["rules"]]


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        str(target["expr"])
        for panel in dashboard_panels(dashboard["panels"])
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        exprs.append(str(query.get("query", "") if isinstance(query, dict) else query or ""))
        exprs.append(str(variable.get("definition", "")))
    return exprs


def metric_names(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in METRIC.findall(expr)}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: apt-get install prometheus (.ci/run does)")
    return subprocess.run(
        [binary, *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_accepts_the_scrape_config_and_the_alert_rules() -> None:
    scrape = yaml.safe_load(PROMETHEUS.read_text())
    assert [(PROMETHEUS.parent / f).resolve() for f in scrape["rule_files"]] == [ALERTS]
    checked = promtool("check", "config", str(PROMETHEUS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = promtool("check", "rules", str(ALERTS))
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_alert_rules_use_only_metrics_the_proxy_exports(proxy: Proxy) -> None:
    exposition = scrape_after_traffic(proxy)
    families, series = exported(exposition)
    assert sample_value(exposition, "apiyi_proxy_spend_usd_total", team="design") > 0
    used = metric_names(rule_expressions())
    assert not used - series, f"not exported by the proxy: {sorted(used - series)}"
    covered = {family_of(name, families) for name in used}
    for needed in (
        "apiyi_proxy_budget_remaining_usd",
        "apiyi_proxy_upstream_calls",
        "apiyi_proxy_store_errors",
        "apiyi_proxy_uncertain_spend_usd",
        "apiyi_proxy_overhead_seconds",
    ):
        assert needed in covered, f"no alert rule on {needed}"


def test_dashboard_uses_only_metrics_the_proxy_exports(proxy: Proxy) -> None:
    exposition = scrape_after_traffic(proxy)
    families, series = exported(exposition)
    assert (
        sample_value(exposition, "apiyi_proxy_budget_remaining_usd", team="design", period="day")
        < 5
    )
    used = metric_names(dashboard_expressions())
    assert not used - series, f"not exported by the proxy: {sorted(used - series)}"
    covered = {family_of(name, families) for name in used}
    for needed in (
        "apiyi_proxy_spend_usd",
        "apiyi_proxy_budget_remaining_usd",
        "apiyi_proxy_requests",
        "apiyi_proxy_upstream_duration_seconds",
        "apiyi_proxy_upstream_calls",
        "apiyi_proxy_overhead_seconds",
        "apiyi_proxy_in_flight_requests",
        "apiyi_proxy_holds_outstanding",
        "apiyi_proxy_holds_resolved",
        "apiyi_proxy_uncertain_spend_usd",
        "apiyi_proxy_rejections",
        "apiyi_proxy_store_errors",
        "apiyi_proxy_store_duration_seconds",
        "apiyi_proxy_images_billed",
        "apiyi_proxy_images_returned",
        "apiyi_proxy_top_key_spend_usd",
        "apiyi_proxy_upstream_balance_usd",
        "apiyi_proxy_upstream_drift_usd",
    ):
        assert needed in covered, f"no dashboard panel on {needed}"


# environment names -------------------------------------------------------------------


def is_setting_env(name: str) -> bool:
    """Whether proxy.config reads this variable."""
    if name == CONFIG_ENV or name in config.FIXED_ENV or name in config.SECRET_ENV:
        return True
    match = SECTION_ENV.fullmatch(name)
    if match is None:
        return False
    sections = typing.get_type_hints(config.Settings)
    section, field = match.group(1).lower(), match.group(2).lower()
    if section not in sections:
        return False
    return field in {f.name for f in dataclasses.fields(sections[section])}


def test_env_name_check_refuses_names_the_app_does_not_read() -> None:
    assert is_setting_env("APIYI_PROXY_STORE__RESULTS_URL")
    assert is_setting_env("APIYI_PROXY_KEY_PEPPER")
    assert not is_setting_env("APIYI_PROXY_STORE__RESULT_URL")
    assert not is_setting_env("APIYI_PROXY_RESULTS_URL")
    assert not is_setting_env("APIYI_PROXY_SERVERS__PORT")


# kubernetes --------------------------------------------------------------------------


def k8s_objects() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = {K8S / name for name in kustomization["resources"]}
    on_disk = {p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == on_disk, "kustomization.yaml resources and the files differ"
    objects = []
    for path in sorted(listed):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                assert {"apiVersion", "kind", "metadata"} <= document.keys(), path
                objects.append(document)
    return objects


def k8s_object(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> Any:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def proxy_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    for declared in container["ports"]:
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise AssertionError(f"no container port named {port!r}")


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def test_deployment_serves_the_proxy_port_with_probes_and_a_service() -> None:
    objects = k8s_objects()
    deployment = k8s_object(objects, "Deployment", DEPLOYMENT)
    service = k8s_object(objects, "Service", DEPLOYMENT)
    container = proxy_container(deployment)
    port = defaults().server.port
    assert [p["containerPort"] for p in container["ports"]] == [port]
    [service_port] = service["spec"]["ports"]
    assert port_number(container, service_port["targetPort"]) == port
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert matches(service["spec"]["selector"], pod_labels)
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert port_number(container, get["port"]) == port


def test_deployment_drains_generations_and_runs_locked_down() -> None:
    objects = k8s_objects()
    deployment = k8s_object(objects, "Deployment", DEPLOYMENT)
    pod = deployment["spec"]["template"]["spec"]
    container = proxy_container(deployment)
    settings = defaults()
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > settings.upstream.read_timeout
    assert grace > settings.server.graceful_timeout_seconds
    security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    assert security.get("runAsNonRoot") is True
    assert container["securityContext"].get("readOnlyRootFilesystem") is True
    assert security.get("runAsUser", 0) != 0
    volumes = {v["name"]: v for v in pod["volumes"]}
    [tmp] = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][kind].keys()


def test_deployment_env_secrets_and_config_map_load(tmp_path: Path) -> None:
    objects = k8s_objects()
    deployment = k8s_object(objects, "Deployment", DEPLOYMENT)
    container = proxy_container(deployment)
    pod = deployment["spec"]["template"]["spec"]
    env: dict[str, str] = {}
    for variable in container["env"]:
        name = variable["name"]
        if name.startswith("APIYI_"):
            assert is_setting_env(name), f"{name}: not a setting proxy.config reads"
        if "valueFrom" in variable:
            ref = variable["valueFrom"]["secretKeyRef"]
            secret = k8s_object(objects, "Secret", ref["name"])
            values = {**secret.get("data", {}), **secret.get("stringData", {})}
            assert ref["key"] in values, f"{name}: key {ref['key']} not in the Secret"
            env[name] = str(values[ref["key"]])
        else:
            env[name] = str(variable["value"])
    assert {"APIYI_API_KEY", "APIYI_PROXY_ADMIN_TOKEN", "APIYI_PROXY_KEY_PEPPER"} <= env.keys()

    # APIYI_PROXY_CONFIG names the ConfigMap's file as mounted in the pod.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    [volume] = [v for v in pod["volumes"] if "configMap" in v]
    config_map = k8s_object(objects, "ConfigMap", volume["configMap"]["name"])
    directory, _, file_name = env[CONFIG_ENV].rpartition("/")
    assert directory == mounts[volume["name"]]
    assert file_name in config_map["data"]

    path = tmp_path / file_name
    path.write_text(config_map["data"][file_name])
    alone = config.load(path=path, env={})
    # As shipped, the Secret holds placeholders: the proxy refuses to start with them.
    with pytest.raises(config.ConfigError, match="placeholder"):
        config.load(path=path, env=env)
    env.update(
        APIYI_API_KEY="sk-" + "a" * 40,
        APIYI_PROXY_ADMIN_TOKEN="b" * 64,
        APIYI_PROXY_KEY_PEPPER="c" * 64,
    )
    deployed = config.load(path=path, env=env)
    assert alone.server.host == "0.0.0.0"
    assert port_number(container, "http") == deployed.server.port
    assert deployed.store.url.startswith("redis://")
    assert deployed.store.results_url.startswith("redis://")
    assert deployed.store.results_url != deployed.store.url
    assert pod["terminationGracePeriodSeconds"] > deployed.server.graceful_timeout_seconds


def test_hpa_and_pdb_select_the_deployment() -> None:
    objects = k8s_objects()
    deployment = k8s_object(objects, "Deployment", DEPLOYMENT)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpa = k8s_object(objects, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        DEPLOYMENT,
    )
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdb = k8s_object(objects, "PodDisruptionBudget")
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert matches(selector, pod_labels)
    others = [
        o["spec"]["template"]["metadata"]["labels"]
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet") and o is not deployment
    ]
    assert not any(matches(selector, labels) for labels in others)


# compose -----------------------------------------------------------------------------


def interpolate(value: Any) -> str:
    """Compose's ${VAR:-default} / ${VAR:?message}, with a placeholder for required ones."""

    def one(match: re.Match[str]) -> str:
        name, op, rest = match.group(1), match.group(2) or "", match.group(3) or ""
        return rest if op.endswith("-") else f"placeholder-{name.lower()}"

    return re.sub(r"\$\{([A-Z0-9_]+)(:?[-?])?([^}]*)\}", one, str(value))


def test_compose_runs_two_replicas_with_both_redis_and_monitoring() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services: dict[str, Any] = compose["services"]
    replicas = {name: s for name, s in services.items() if "build" in s}
    assert len(replicas) == 2
    for name, service in replicas.items():
        assert (DEPLOY / service["build"]["context"]).resolve() == ROOT
        assert "/healthz" in " ".join(service["healthcheck"]["test"])
        env = {k: interpolate(v) for k, v in service["environment"].items()}
        unread = [k for k in env if k.startswith("APIYI_") and not is_setting_env(k)]
        assert not unread, f"{name}: not settings proxy.config reads: {unread}"
        settings = config.load(path=os.devnull, env=env)
        assert settings.server.host == "0.0.0.0"
        assert settings.server.port == defaults().server.port
        ledger = services[httpx.URL(settings.store.url).host]
        results = services[httpx.URL(settings.store.results_url).host]
        ledger_args = " ".join(map(interpolate, ledger["command"]))
        assert "--maxmemory-policy noeviction" in ledger_args
        assert "--appendonly yes" in ledger_args
        results_args = " ".join(map(interpolate, results["command"]))
        assert "--maxmemory-policy allkeys-lru" in results_args
        assert re.search(r"--maxmemory \d+[kmg]b", results_args)

    scrape = yaml.safe_load(PROMETHEUS.read_text())
    targets = {
        t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    }
    assert {f"{name}:{defaults().server.port}" for name in replicas} <= targets

    mounts = {
        target: (DEPLOY / source).resolve()
        for service in services.values()
        for source, _, target in (
            str(v).removesuffix(":ro").partition(":") for v in service.get("volumes", [])
        )
        if source.startswith(".")
    }
    assert all(source.exists() for source in mounts.values()), mounts
    assert mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS
    assert mounts["/etc/prometheus/alerts.yml"] == ALERTS
    assert {"prometheus", "grafana"} <= services.keys()
    provisioning = mounts["/etc/grafana/provisioning"]
    assert list(provisioning.glob("datasources/*.yml"))
    [dashboards] = provisioning.glob("dashboards/*.yml")
    [provider] = yaml.safe_load(dashboards.read_text())["providers"]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent

    nginx = mounts["/etc/nginx/nginx.conf"].read_text()
    read_timeout = re.search(r"proxy_read_timeout\s+(\d+)s;", nginx)
    assert read_timeout and int(read_timeout.group(1)) > defaults().upstream.read_timeout
    assert re.search(r"proxy_buffering\s+off;", nginx)
    assert re.search(r"client_max_body_size\s+64m;", nginx)
    assert all(f"server {name}:" in nginx for name in replicas)


# dockerfile --------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_builds_a_wheel_and_runs_it_as_non_root() -> None:
    instructions = dockerfile_instructions()
    args = dict(arg.split("=", 1) for op, arg in instructions if op == "ARG" and "=" in arg)
    stages = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    assert len(stages) >= 2, "not a multi-stage build"
    for i in stages:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], instructions[i][1].split()[0])
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", image), image
    final = instructions[stages[-1] :]
    users = [arg.split(":")[0] for op, arg in final if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(op == "HEALTHCHECK" and "/healthz" in arg for op, arg in final)
    assert ("EXPOSE", str(defaults().server.port)) in final
    [cmd] = [json.loads(arg) for op, arg in final if op == "CMD"]
    assert cmd[:2] == ["apiyi-proxy", "serve"] and "0.0.0.0" in cmd
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".git", ".venv"} <= set(ignored)
    assert not {"proxy", "pyproject.toml", "README.md"} & set(ignored)


def duration_seconds(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"([0-9.]+)([smh])", text))


def test_the_quota_and_key_alerts_fire_within_two_minutes_at_the_deployed_intervals() -> None:
    scrape = yaml.safe_load(PROMETHEUS.read_text())["global"]
    rules = {
        r["alert"]: r
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for r in group["rules"]
    }
    for name, outcome in (
        ("ApiyiProxyUpstreamQuotaExhausted", "quota"),
        ("ApiyiProxyUpstreamKeyRefused", "auth"),
    ):
        rule = rules[name]
        assert f'outcome="{outcome}"' in rule["expr"] and rule["labels"]["severity"] == "critical"
        # The next scrape sees the refusal, the next evaluation fires (or starts waiting).
        worst = (
            duration_seconds(scrape["scrape_interval"])
            + duration_seconds(scrape["evaluation_interval"])
            + duration_seconds(rule.get("for", "0s"))
        )
        assert worst <= 120, (name, worst)
