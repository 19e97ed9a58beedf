"""Shared fixtures: real servers on loopback ports, the fake upstream, a private Redis."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from proxy import config
from proxy.app import create_app
from proxy.fake_upstream import FakeUpstream, create_fake_app
from proxy.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
# Shaped like a key of the upstream's family, as passthrough mode requires; put together
# here so that no literal in the source looks like a leaked key.
UPSTREAM_KEY = "sk-" + "UpstreamSecretKeyForTests" + "0123456789"
ADMIN_TOKEN = "admin-token-for-tests-0123456789"
# The key pepper of every proxy process a test starts: replicas of one test share it.
PEPPER = "pepper-shared-by-replicas-0123456"


# secrets in output -------------------------------------------------------------------
# Every test's captured output and log, and every proxy child process's output, is
# searched for the upstream key, the admin token and anything shaped like a client
# key; one find fails the whole run. (test_logs.py checks the same per request path.)
CLIENT_KEY = re.compile(r"sk-[A-Za-z0-9_-]{43}")
# The one place a key is meant to be shown: serve's first key on a memory store.
FIRST_KEY_BANNER = "export OPENAI_API_KEY="
_leaks: list[str] = []


def search_for_secrets(text: str, where: str) -> None:
    for number, line in enumerate(text.splitlines(), 1):
        if FIRST_KEY_BANNER in line:
            continue
        if UPSTREAM_KEY in line or ADMIN_TOKEN in line or CLIENT_KEY.search(line):
            _leaks.append(f"{where}, line {number}")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for section, text in report.sections:
        search_for_secrets(text, f"{report.nodeid} ({section})")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _leaks:
        print("\nsecrets found in output (the lines are not repeated here):", *_leaks, sep="\n  ")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThreadServer:
    """A uvicorn server running an ASGI app in a background thread."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def fake() -> Iterator[tuple[FakeUpstream, ThreadServer]]:
    """The project's fake upstream on a real socket."""
    state = FakeUpstream(api_key=UPSTREAM_KEY)
    with ThreadServer(create_fake_app(state)) as server:
        yield state, server


@pytest.fixture
def upstream() -> Iterator[ThreadServer]:
    """The project's fake upstream on a real socket, for proxy processes to reach."""
    with ThreadServer(create_fake_app(FakeUpstream(api_key=UPSTREAM_KEY))) as server:
        yield server


def process_env(upstream_url: str, **extra: str) -> dict[str, str]:
    """A proxy process's environment: the fake upstream at ``upstream_url`` and its key,
    the admin token and the shared pepper, then ``extra``."""
    return {
        "APIYI_PROXY_UPSTREAM_URL": upstream_url + "/v1",
        "APIYI_API_KEY": UPSTREAM_KEY,
        "APIYI_PROXY_ADMIN_TOKEN": ADMIN_TOKEN,
        "APIYI_PROXY_KEY_PEPPER": PEPPER,
        **extra,
    }


def billing(server: ThreadServer) -> dict[str, Any]:
    log: dict[str, Any] = httpx.get(server.url + "/_fake/billing").json()
    return log


def settings_for(upstream_url: str, **sections: dict[str, Any]) -> config.Settings:
    env = {
        "APIYI_PROXY_UPSTREAM_URL": upstream_url + "/v1",
        "APIYI_API_KEY": UPSTREAM_KEY,
        "APIYI_PROXY_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    return config.load(path=os.devnull, env=env, overrides=sections)


class Proxy:
    def __init__(self, server: ThreadServer, app: Any, metrics: Metrics) -> None:
        self.server = server
        self.url = server.url
        self.app = app
        self.metrics = metrics
        self._clients: list[openai.OpenAI] = []

    def sdk(self, key: str, **options: Any) -> openai.OpenAI:
        """The openai SDK pointed at this proxy; closed with the proxy."""
        client = openai.OpenAI(base_url=self.url + "/v1", api_key=key, **options)
        self._clients.append(client)
        return client

    def close_clients(self) -> None:
        for client in self._clients:
            client.close()

    @property
    def services(self) -> Any:
        app = self.app
        while not hasattr(app, "state"):  # through the ASGI layers to the Starlette app
            app = app.app
        return app.state.services

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        return httpx.request(method, self.url + path, headers=headers, timeout=10, **kwargs)

    @functools.cached_property
    def default_key(self) -> str:
        return self.new_key()

    def new_key(self, **fields: Any) -> str:
        response = self.admin("POST", "/admin/keys", json={"name": "test", **fields})
        assert response.status_code == 201, response.text
        key: str = response.json()["key"]
        return key


@pytest.fixture
def start_proxy() -> Iterator[Callable[..., Proxy]]:
    """Start the proxy app (in-process, real socket) against a given upstream URL."""
    stack = contextlib.ExitStack()

    def start(upstream_url: str, **sections: dict[str, Any]) -> Proxy:
        settings = settings_for(upstream_url, **sections)
        metrics = Metrics()
        app = create_app(settings, metrics=metrics)
        server = stack.enter_context(ThreadServer(app))
        proxy = Proxy(server, app, metrics)
        stack.callback(proxy.close_clients)
        return proxy

    with stack:
        yield start


@pytest.fixture
def proxy(fake: tuple[FakeUpstream, ThreadServer], start_proxy: Callable[..., Proxy]) -> Proxy:
    return start_proxy(fake[1].url)


# processes ---------------------------------------------------------------------------


def generate_at(base_url: str, key: str) -> httpx.Response:
    """One plain generation (a URL answer) through a proxy at ``base_url``."""
    return httpx.post(
        base_url + "/v1/images/generations",
        json={"prompt": "p", "response_format": "url"},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


class ProxyProcess:
    """``python -m proxy serve`` in a child process, for RSS, signals and replicas."""

    def __init__(self, env: dict[str, str], args: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="proxy-", suffix=".log", delete=False)
        full_env = {**os.environ, **env, "APIYI_PROXY_CONFIG": os.devnull}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--port", str(self.port), *(args or [])],
            env=full_env,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("proxy exited:\n" + self.output())
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("proxy did not start:\n" + self.output())

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def new_key(self, name: str, **fields: Any) -> str:
        """A client key made through the admin API (the process needs ADMIN_TOKEN)."""
        created = httpx.post(
            self.url + "/admin/keys",
            json={"name": name, **fields},
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=10,
        )
        assert created.status_code == 201, created.text
        key: str = created.json()["key"]
        return key

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()
        search_for_secrets(self.output(), f"proxy process on port {self.port}")


@pytest.fixture
def proxy_process() -> Iterator[Callable[..., ProxyProcess]]:
    started: list[ProxyProcess] = []

    def start(env: dict[str, str], args: list[str] | None = None) -> ProxyProcess:
        p = ProxyProcess(env, args)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()
        with contextlib.suppress(OSError):
            os.unlink(p.log.name)


# redis -------------------------------------------------------------------------------


class RedisServer:
    """A private redis-server on a free loopback port, nothing kept on disk."""

    def __init__(self, extra: list[str] | None = None, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (the test suite needs it)")
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="redis-test-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                *(extra or []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.wait()

    def wait(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):  # up, maybe with a password
                    return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


class RedisSentinel:
    """A private master watched by one sentinel (``redis-server --sentinel``)."""

    def __init__(self, service: str = "apiyi") -> None:
        self.master = RedisServer()
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="sentinel-test-")
        conf = Path(self.dir) / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {service} 127.0.0.1 {self.master.port} 1\n"
        )
        binary = shutil.which("redis-server")
        assert binary is not None
        self.process = subprocess.Popen(
            [binary, str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"redis+sentinel://127.0.0.1:{self.port}/{service}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            answer = subprocess.run(
                ["redis-cli", "-p", str(self.port), "sentinel", "get-master-addr-by-name", service],
                capture_output=True, text=True, timeout=5,
            ).stdout  # fmt: skip
            if str(self.master.port) in answer:
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis sentinel did not start")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.master.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinel]:
    sentinel = RedisSentinel()
    yield sentinel
    sentinel.stop()


def replace_settings(settings: config.Settings, **sections: Any) -> config.Settings:
    return replace(settings, **sections)


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class RedisCluster:
    """Three private cluster-enabled redis-servers joined into a 3-master cluster."""

    def __init__(self) -> None:
        self.nodes = [
            RedisServer(
                ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{i}.conf"],
                port=cluster_port(),
            )
            for i in range(3)
        ]
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            states = [
                subprocess.run(
                    ["redis-cli", "-p", str(n.port), "cluster", "info"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                for n in self.nodes
            ]
            if all("cluster_state:ok" in s for s in states):
                break
            time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError("redis cluster did not form")
        self.url = f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    cluster = RedisCluster()
    yield cluster
    cluster.stop()
