"""The edge (proxy/edge.py) against a real ``serve`` process: head cap, head, body and
idle deadlines, the connection cap, and slow clients that must not slow the rest."""

from __future__ import annotations

import contextlib
import http.client
import os
import selectors
import socket
import threading
import time
from collections.abc import Iterable, Iterator

import httpx
import orjson
import pytest

from .conftest import ADMIN_TOKEN, ProxyProcess

MB = 1024 * 1024
HEAD_LIMIT = 16 * 1024  # the default server.max_header_bytes
TIMEOUT = 1.0  # head, body and idle deadlines of the module's proxy
SLACK = 1.5  # for a loaded CI machine


def edge_env(**server: str) -> dict[str, str]:
    fields = {
        "head_timeout_seconds": str(TIMEOUT),
        "keepalive_timeout_seconds": str(TIMEOUT),
        "body_timeout_seconds": str(TIMEOUT),
        "body_min_bytes_per_second": "1000",
        **server,
    }
    env = {f"APIYI_PROXY_SERVER__{name.upper()}": value for name, value in fields.items()}
    return {"APIYI_PROXY_ADMIN_TOKEN": ADMIN_TOKEN, **env}


@contextlib.contextmanager
def serving(env: dict[str, str]) -> Iterator[ProxyProcess]:
    proxy = ProxyProcess(env, ["--fake-upstream"])
    try:
        yield proxy
    finally:
        proxy.stop()
        with contextlib.suppress(OSError):
            os.unlink(proxy.log.name)


@pytest.fixture(scope="module")
def proxy() -> Iterator[ProxyProcess]:
    with serving(edge_env()) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def key(proxy: ProxyProcess) -> str:
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    response = httpx.post(proxy.url + "/admin/keys", json={"name": "edge"}, headers=headers)
    assert response.status_code == 201, response.text
    secret: str = response.json()["key"]
    return secret


def connect(proxy: ProxyProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=5)


def seconds_until_closed(sock: socket.socket, limit: float) -> float:
    """How long the server takes to close ``sock`` (whatever it sends is dropped)."""
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        pytest.fail(f"the connection is still open after {limit} s")
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def read_to_close(sock: socket.socket) -> bytes:
    parts = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            parts.append(chunk)
    return b"".join(parts)


def head_of(size: int) -> bytes:
    """A complete GET /healthz head of exactly ``size`` bytes."""
    start, end = b"GET /healthz HTTP/1.1\r\nhost: edge\r\nx-pad: ", b"\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# the head cap ----------------------------------------------------------------------


def test_a_head_over_the_cap_is_answered_431_and_one_at_the_cap_is_served(
    proxy: ProxyProcess,
) -> None:
    with connect(proxy) as sock:
        sock.sendall(head_of(HEAD_LIMIT).replace(b"HTTP/1.1", b"HTTP/1.0"))
        assert read_to_close(sock).startswith(b"HTTP/1.1 200 ")
    with connect(proxy) as sock:
        sock.sendall(head_of(HEAD_LIMIT + 1))
        answer = read_to_close(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"connection: close" in head.lower() and b"x-request-id: " in head.lower()
    error = orjson.loads(body)["error"]
    assert error["code"] == "request_header_too_large" and str(HEAD_LIMIT) in error["message"]


def send_huge_header(proxy: ProxyProcess, size: int, outcome: list[tuple[int, bytes]]) -> None:
    """Send a head with one ``size``-byte header, until the server stops taking it."""
    chunk = b"a" * (256 * 1024)
    sent = 0
    answer = b""
    with connect(proxy) as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: edge\r\nx-huge: ")
            while sent < size:
                sock.sendall(chunk)
                sent += len(chunk)
            sock.sendall(b"\r\n\r\n")
        except OSError:
            pass
        with contextlib.suppress(OSError):
            answer = read_to_close(sock)
    outcome.append((sent, answer))


def dripped_until_closed(sock: socket.socket, pieces: Iterable[bytes]) -> bool:
    """Send one piece about every 0.1 s; True once the server has closed the connection."""
    sock.settimeout(0.1)
    for piece in pieces:
        try:
            sock.sendall(piece)
            if sock.recv(1024) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


@pytest.mark.cases(9)
def test_huge_heads_are_refused_early_and_memory_stays_bounded(proxy: ProxyProcess) -> None:
    pid = proxy.process.pid
    one: list[tuple[int, bytes]] = []
    send_huge_header(proxy, 64 * MB, one)
    [(sent, answer)] = one
    # Refused (431, or closed while the client was still sending), never read whole.
    assert sent < 64 * MB and not answer.startswith(b"HTTP/1.1 200"), (sent, answer[:100])

    baseline = peak = vm_rss(pid)
    outcomes: list[tuple[int, bytes]] = []
    senders = [
        threading.Thread(target=send_huge_header, args=(proxy, 32 * MB, outcomes)) for _ in range(8)
    ]
    for sender in senders:
        sender.start()
    while any(sender.is_alive() for sender in senders):
        peak = max(peak, vm_rss(pid))
        time.sleep(0.005)
    assert len(outcomes) == 8
    assert all(sent < 32 * MB for sent, _ in outcomes), [sent for sent, _ in outcomes]
    growth = (peak - baseline) / MB
    print(f"eight 32 MB heads: peak RSS {baseline / MB:.1f} -> {peak / MB:.1f} MB (+{growth:.1f})")
    assert peak - baseline < 50 * MB, f"RSS grew by {growth:.1f} MB"
    assert httpx.get(proxy.url + "/healthz").status_code == 200


# deadlines -------------------------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed_at_the_head_deadline(
    proxy: ProxyProcess,
) -> None:
    with connect(proxy) as sock:
        elapsed = seconds_until_closed(sock, TIMEOUT + SLACK)
    assert elapsed > TIMEOUT / 2


def test_a_head_sent_a_byte_at_a_time_is_closed_at_the_head_deadline(
    proxy: ProxyProcess,
) -> None:
    head = b"GET /healthz HTTP/1.1\r\nhost: edge\r\nx-slow: " + b"a" * 100
    start = time.monotonic()
    with connect(proxy) as sock:
        assert dripped_until_closed(sock, (bytes([byte]) for byte in head)), "never cut"
    assert TIMEOUT / 2 < time.monotonic() - start < TIMEOUT + SLACK


def test_an_idle_kept_alive_connection_is_closed_at_the_idle_deadline(
    proxy: ProxyProcess,
) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    for _ in range(2):  # reused within the deadline: still open, and the head timer re-armed
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("connection") != "close"
        response.read()
        time.sleep(TIMEOUT / 2)
    assert connection.sock is not None
    assert TIMEOUT / 4 < seconds_until_closed(connection.sock, TIMEOUT + SLACK)
    connection.close()


def test_a_trickled_body_is_cut_and_a_slow_steady_one_is_not(proxy: ProxyProcess) -> None:
    head = (
        b"POST /v1/images/generations HTTP/1.1\r\nhost: edge\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n"
    )
    # 10 bytes a second, far below the floor of 1000: cut once the first second is out.
    start = time.monotonic()
    with connect(proxy) as sock:
        sock.sendall(head % 1000)
        assert dripped_until_closed(sock, (b" " for _ in range(100))), "never cut"
    assert time.monotonic() - start < TIMEOUT + SLACK
    # 1500 bytes a second for two seconds, above the floor: read whole and answered.
    body = b'{"prompt": "' + b"a" * 2986 + b'"}'
    with connect(proxy) as sock:
        sock.sendall(head % len(body))
        for offset in range(0, len(body), 150):
            sock.sendall(body[offset : offset + 150])
            time.sleep(0.1)
        assert sock.recv(1024).startswith(b"HTTP/1.1 401 ")  # no key: read, then refused


def test_a_long_call_is_never_cut_by_the_deadlines(proxy: ProxyProcess, key: str) -> None:
    start = time.monotonic()
    response = httpx.post(
        proxy.url + "/v1/images/generations",
        json={"prompt": "slow [fake:latency=2.5]", "response_format": "url"},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert time.monotonic() - start > 2 * TIMEOUT


# slow clients and the connection cap ------------------------------------------------


@pytest.mark.cases(500)
def test_calls_stay_fast_while_500_slow_heads_are_held_and_dropped(
    proxy: ProxyProcess, key: str
) -> None:
    selector = selectors.DefaultSelector()
    slow: set[socket.socket] = set()
    start = time.monotonic()
    for _ in range(500):
        sock = connect(proxy)
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nhost: edge\r\nx-slow: ")
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, sock)
        slow.add(sock)
    health: list[float] = []
    images: list[float] = []
    last_dropped = 0.0
    with httpx.Client(timeout=10) as client:
        while slow and time.monotonic() - start < TIMEOUT + 2 * SLACK:
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.send(b"a")
            began = time.monotonic()
            assert client.get(proxy.url + "/healthz").status_code == 200
            health.append(time.monotonic() - began)
            began = time.monotonic()
            response = client.post(
                proxy.url + "/v1/images/generations",
                json={"prompt": "a cat", "response_format": "url"},
                headers={"authorization": f"Bearer {key}"},
            )
            assert response.status_code == 200, response.text
            images.append(time.monotonic() - began)
            for ready, _ in selector.select(timeout=0.1):
                sock = ready.data
                with contextlib.suppress(OSError):
                    if sock.recv(1024):
                        continue
                selector.unregister(sock)
                sock.close()
                slow.discard(sock)
                last_dropped = time.monotonic() - start
    for sock in slow:
        sock.close()
    selector.close()
    assert not slow, f"{len(slow)} slow connections still open"
    print(
        f"500 slow heads: all dropped {last_dropped:.2f} s after opening; "
        f"/healthz median {sorted(health)[len(health) // 2] * 1000:.1f} ms, "
        f"max {max(health) * 1000:.1f} ms; image call median "
        f"{sorted(images)[len(images) // 2] * 1000:.1f} ms, max {max(images) * 1000:.1f} ms"
    )
    assert last_dropped < TIMEOUT + SLACK
    assert len(health) >= 3 and max(health) < 1.0 and max(images) < 1.0, (health, images)


def test_connections_over_the_cap_are_closed_at_once_while_open_ones_work() -> None:
    env = edge_env(max_connections="8", head_timeout_seconds="30")
    with serving(env) as proxy:
        time.sleep(0.2)  # the readiness probe's connection has gone
        held = [connect(proxy) for _ in range(8)]
        try:
            with connect(proxy) as extra:
                assert seconds_until_closed(extra, SLACK) < SLACK
            held[0].sendall(b"GET /healthz HTTP/1.1\r\nhost: edge\r\n\r\n")
            assert held[0].recv(1024).startswith(b"HTTP/1.1 200 ")
            held.pop().close()
            time.sleep(0.2)
            assert httpx.get(proxy.url + "/healthz").status_code == 200
        finally:
            for sock in held:
                sock.close()
        assert "server.max_connections" in proxy.output()
