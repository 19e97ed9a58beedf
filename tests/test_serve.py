"""``python -m proxy serve`` as a child process: first minute, workers, shutdown."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import (
    ADMIN_TOKEN,
    ROOT,
    UPSTREAM_KEY,
    RedisServer,
    ThreadServer,
    billing,
    free_port,
    generate_at,
)

PNG = b"\x89PNG\r\n\x1a\n"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
EXPORT = re.compile(r"^\s*export (OPENAI_API_KEY|OPENAI_BASE_URL)=(\S+)$", re.MULTILINE)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any proxy or SDK setting, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("APIYI_", "OPENAI_", "PROMETHEUS_"))
    }
    return {**env, "APIYI_PROXY_CONFIG": os.devnull, **extra}


class Served:
    """``python -m proxy serve --port P ...`` with its stdout and stderr kept apart."""

    def __init__(
        self, args: list[str], env: dict[str, str], directory: Path, port: int | None = None
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out_path = directory / f"serve-{self.port}.out"
        self.err_path = directory / f"serve-{self.port}.err"
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "--port", str(self.port), *args],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own group, so workers go with it
            )

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30) -> Served:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("serve exited:\n" + self.stderr())
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError("serve did not start:\n" + self.stderr())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(args: list[str], env: dict[str, str]) -> Served:
        served = Served(args, env, tmp_path)
        started.append(served)
        return served.wait_ready()

    yield start
    for served in started:
        served.stop()


def first_key(served: Served) -> dict[str, str]:
    exports = dict(EXPORT.findall(served.stderr()))
    assert set(exports) == {"OPENAI_API_KEY", "OPENAI_BASE_URL"}, served.stderr()
    return exports


# the README's first minute -------------------------------------------------------------


def test_first_minute_runs_the_readme_example(
    serve: Callable[..., Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    served = serve(["--fake-upstream"], clean_env())
    exports = first_key(served)
    key = exports["OPENAI_API_KEY"]
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{43}", key)
    assert exports["OPENAI_BASE_URL"] == served.url + "/v1"
    shown = served.stderr().count(key), served.stdout().count(key)
    assert shown == (1, 0)  # shown once, on stderr only

    # The README's example, word for word but for the file it writes.
    monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.setenv("OPENAI_BASE_URL", exports["OPENAI_BASE_URL"])
    with openai.OpenAI() as client:  # reads OPENAI_API_KEY and OPENAI_BASE_URL
        result = client.images.generate(
            model="gpt-image-2-vip", prompt="a lighthouse at dawn", size="2048x1152"
        )
    assert result.data is not None
    png = base64.b64decode(result.data[0].b64_json or "")
    assert png.startswith(PNG)
    assert result.created > 0


def test_serve_without_an_upstream_key_names_the_setting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--port", str(free_port())],
        env=clean_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "upstream.api_key" in result.stderr
    assert "APIYI_API_KEY" in result.stderr
    assert "Traceback" not in result.stderr


# start-up lines, a port already taken ----------------------------------------------------

REDIS_PASSWORD = "redis-password-for-tests-0123456789"
PEPPER = "pepper-shared-by-workers-01234567"


def startup(served: Served) -> dict[str, str]:
    """The start-up lines, by what they name (two spaces, a label, the value)."""
    lines = served.stderr().splitlines()
    assert lines[0].startswith("apiyi-proxy "), served.stderr()
    said = dict(re.findall(r"^  (\S+(?: \S+)?)  +(.+)$", served.stderr(), re.MULTILINE))
    assert served.stderr().count("  listening  ") == 1  # said once, however many workers
    return said


@pytest.mark.parametrize("workers", ["1", "2"])
def test_startup_says_each_setting_and_no_secret(
    serve: Callable[..., Served], upstream: ThreadServer, workers: str
) -> None:
    redis = RedisServer(["--requirepass", REDIS_PASSWORD])
    try:
        url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis.port}/0"
        env = workers_env(
            redis,
            APIYI_PROXY_STORE_URL=url,
            APIYI_PROXY_UPSTREAM_URL=upstream.url + "/v1",
            APIYI_API_KEY=UPSTREAM_KEY,
            APIYI_PROXY_N_POLICY="strip",
        )
        served = serve(["--workers", workers], env)
        create_key(served)  # the store, password and all, is reached
        said = startup(served)
        output = served.stdout() + served.stderr()
    finally:
        redis.stop()
    processes = "2 workers" if workers == "2" else "1 process"
    assert said["listening"] == f"{served.url} ({processes})"
    assert said["store"] == f"redis://:***@127.0.0.1:{redis.port}/0"
    assert said["auth"].startswith("keys ")
    assert said["admin API"].startswith(f"on at {served.url}/admin")
    assert said["upstream"] == upstream.url
    assert said["n policy"].startswith("strip ")
    assert f"--url {served.url}" in said["keys"]
    for secret in (UPSTREAM_KEY, ADMIN_TOKEN, REDIS_PASSWORD, PEPPER):
        assert secret not in output
    assert "sk-" not in output


def test_startup_on_the_memory_store_comes_before_the_first_key(
    serve: Callable[..., Served],
) -> None:
    served = serve(["--fake-upstream"], clean_env())
    said = startup(served)
    assert said["listening"] == f"{served.url} (1 process)"
    assert said["store"].startswith("memory:// ")
    assert said["auth"].startswith("keys ")
    assert said["admin API"].startswith("off ")
    assert said["upstream"].startswith(f"{served.url} (the built-in fake upstream")
    assert said["n policy"].startswith("reject ")
    text = served.stderr()
    assert text.index("  n policy  ") < text.index("export OPENAI_API_KEY=")
    # No admin API to make more keys with: the hint says how to turn it on.
    hint = text[text.index("More keys: ") :].splitlines()[0]
    assert "set APIYI_PROXY_ADMIN_TOKEN" in hint
    assert f"apiyi-proxy keys create --name NAME --url {served.url}" in hint


def test_first_key_hint_with_an_admin_token_is_a_command_that_works(
    serve: Callable[..., Served],
) -> None:
    served = serve(["--fake-upstream"], clean_env(APIYI_PROXY_ADMIN_TOKEN=ADMIN_TOKEN))
    assert startup(served)["admin API"].startswith("on ")
    text = served.stderr()
    hint = text[text.index("More keys: ") :].splitlines()[0]
    assert "APIYI_PROXY_ADMIN_TOKEN" in hint
    command = re.search(r"apiyi-proxy (keys create --name NAME --url \S+)", hint)
    assert command is not None, hint
    args = command.group(1).replace("NAME", "second").split()
    made = subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        env=clean_env(APIYI_PROXY_ADMIN_TOKEN=ADMIN_TOKEN),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert made.returncode == 0, made.stderr
    second = json.loads(made.stdout)["key"]
    answer = generate_at(served.url, second)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("where", ["port", "port of 2 workers", "metrics port"])
def test_a_taken_port_ends_serve_with_one_line_and_no_key(
    tmp_path: Path, redis_server: RedisServer, where: str
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    args, env = ["--fake-upstream"], clean_env(APIYI_PROXY_ADMIN_TOKEN=ADMIN_TOKEN)
    serve_port = port
    if where == "port of 2 workers":
        args, env = [*args, "--workers", "2"], workers_env(redis_server)
    elif where == "metrics port":
        serve_port = free_port()
        env["APIYI_PROXY_SERVER__METRICS_PORT"] = str(port)
    with taken:
        served = Served(args, env, tmp_path, port=serve_port)
        try:
            status = served.process.wait(30)
        finally:
            served.stop()
    assert status == 1
    lines = served.stderr().splitlines()
    assert len(lines) == 1, served.stderr()
    assert lines[0].startswith("apiyi-proxy: cannot ")
    assert f"127.0.0.1:{port}" in lines[0] and "address already in use" in lines[0]
    assert served.stdout() == ""
    assert "sk-" not in served.stderr()


# workers -------------------------------------------------------------------------------


def workers_env(redis: RedisServer, **extra: str) -> dict[str, str]:
    settings = {
        "APIYI_PROXY_STORE_URL": redis.url,
        "APIYI_PROXY_KEY_PEPPER": PEPPER,
        "APIYI_PROXY_ADMIN_TOKEN": ADMIN_TOKEN,
        "APIYI_PROXY_LOG__LEVEL": "warning",
    }
    return clean_env(**(settings | extra))


def create_key(served: Served) -> str:
    response = httpx.post(served.url + "/admin/keys", json={"name": "w"}, headers=ADMIN)
    assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key


def generations_counted(served: Served) -> float:
    """``apiyi_proxy_requests_total`` of the generations route, as one scrape sees it."""
    response = httpx.get(served.url + "/metrics", timeout=10)
    assert response.status_code == 200
    return sum(
        sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == "apiyi_proxy_requests_total"
        and sample.labels["route"] == "/v1/images/generations"
    )


async def fire(url: str, key: str, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as client:
        return await asyncio.gather(
            *(
                client.post(
                    url + "/v1/images/generations",
                    json={"prompt": "[fake:latency=0.2] p", "response_format": "url"},
                    headers={"authorization": f"Bearer {key}"},
                )
                for _ in range(count)
            )
        )


def test_two_workers_answer_and_metrics_add_up(
    serve: Callable[..., Served], redis_server: RedisServer, upstream: ThreadServer
) -> None:
    env = workers_env(
        redis_server,
        APIYI_PROXY_UPSTREAM_URL=upstream.url + "/v1",
        APIYI_API_KEY=UPSTREAM_KEY,
    )
    served = serve(["--workers", "2"], env)
    key = create_key(served)
    count = 12
    responses = asyncio.run(fire(served.url, key, count))
    assert [r.status_code for r in responses] == [200] * count
    assert billing(upstream)["images_billed"] == count

    # A request is counted just after its last byte: wait for the last ones to land.
    deadline = time.monotonic() + 10
    while generations_counted(served) != count:
        assert time.monotonic() < deadline, generations_counted(served)
        time.sleep(0.1)
    # Each scrape is a new connection, answered by either worker: the sum is the same.
    assert [generations_counted(served) for _ in range(8)] == [count] * 8


def test_two_workers_with_the_fake_upstream_flag(
    serve: Callable[..., Served], redis_server: RedisServer
) -> None:
    served = serve(["--fake-upstream", "--workers", "2"], workers_env(redis_server))
    key = create_key(served)
    response = generate_at(served.url, key)
    assert response.status_code == 200, response.text


# shutdown ------------------------------------------------------------------------------


def test_sigterm_lets_the_call_in_flight_finish(serve: Callable[..., Served]) -> None:
    served = serve(["--fake-upstream"], clean_env())
    key = first_key(served)["OPENAI_API_KEY"]
    answers: list[httpx.Response] = []
    slow = threading.Thread(
        target=lambda: answers.append(
            httpx.post(
                served.url + "/v1/images/generations",
                json={"prompt": "[fake:latency=2] slow"},
                headers={"authorization": f"Bearer {key}"},
                timeout=30,
            )
        )
    )
    slow.start()
    # Signal only once the call is upstream (the fake is mounted in the same server).
    deadline = time.monotonic() + 10
    while not httpx.get(served.url + "/_fake_upstream/_fake/billing").json()["requests"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    served.process.send_signal(signal.SIGTERM)
    slow.join(30)

    assert len(answers) == 1
    answer = answers[0]
    assert answer.status_code == 200, answer.text
    assert base64.b64decode(answer.json()["data"][0]["b64_json"]).startswith(PNG)
    # Then it stops by itself, with status 0.
    assert served.process.wait(15) == 0


def test_sigterm_exit_status_is_zero(serve: Callable[..., Served]) -> None:
    served = serve(["--fake-upstream"], clean_env())
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(15) == 0
