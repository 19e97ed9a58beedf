"""A ``rediss://`` store, against a real TLS redis-server with certificates made here.

Readiness and the request path must agree: whatever TLS options the store URL carries,
``/readyz`` answers ready exactly when image calls can be booked, because the money
scripts' own connection and redis-py's are built from one reading of the URL.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import openai
import pytest

from .conftest import Proxy, free_port

PRICE = 0.03


# certificates ------------------------------------------------------------------------


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def make_leaf(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    cert, key, request = folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr"
    ext = folder / f"{name}.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "authorityKeyIdentifier=keyid\n" + extensions + "\n"
    )
    openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", key, "-out", request, "-subj", f"/CN={name}",
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", ext,
    )  # fmt: skip
    return cert, key


@dataclass(frozen=True)
class Certificates:
    ca: Path
    other_ca: Path  # a CA that signed nothing the server shows
    server: tuple[Path, Path]  # for IP 127.0.0.1
    localhost: tuple[Path, Path]  # for the name localhost only
    client: tuple[Path, Path]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed (these tests make their certificates with it)")
    folder = tmp_path_factory.mktemp("tls")
    ca = make_ca(folder, "private-ca")
    other = make_ca(folder, "other-ca")
    server_ext = "extendedKeyUsage=serverAuth\nsubjectAltName="
    return Certificates(
        ca=ca[0],
        other_ca=other[0],
        server=make_leaf(folder, "server", ca, server_ext + "IP:127.0.0.1"),
        localhost=make_leaf(folder, "localhost", ca, server_ext + "DNS:localhost"),
        client=make_leaf(folder, "client", ca, "extendedKeyUsage=clientAuth"),
    )


# a TLS redis-server ------------------------------------------------------------------


class TLSRedis:
    """A private redis-server that speaks only TLS, on a free loopback port."""

    def __init__(
        self, folder: Path, ca: Path, cert: tuple[Path, Path], auth_clients: str = "no"
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (the test suite needs it)")
        self.port = free_port()
        self.ca = ca
        self.process = subprocess.Popen(
            [
                binary,
                "--port", "0",
                "--tls-port", str(self.port),
                "--bind", "127.0.0.1",
                "--tls-cert-file", str(cert[0]),
                "--tls-key-file", str(cert[1]),
                "--tls-ca-cert-file", str(ca),
                "--tls-auth-clients", auth_clients,
                "--save", "",
                "--appendonly", "no",
                "--dir", str(folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.wait()

    def url(self, **options: str | Path) -> str:
        query = "&".join(f"{name}={quote(str(value))}" for name, value in options.items())
        return f"rediss://127.0.0.1:{self.port}/0" + (f"?{query}" if query else "")

    def wait(self) -> None:
        # Up once a TLS handshake completes; nothing checked, nothing else asked.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw,
                context.wrap_socket(raw),
            ):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server (TLS) did not start")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def tls_redis(tmp_path: Path, certs: Certificates) -> Iterator[Callable[..., TLSRedis]]:
    started: list[TLSRedis] = []

    def start(cert: tuple[Path, Path] | None = None, auth_clients: str = "no") -> TLSRedis:
        folder = tmp_path / f"redis-{len(started)}"
        folder.mkdir()
        server = TLSRedis(folder, certs.ca, cert or certs.server, auth_clients)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# the proxy over it -------------------------------------------------------------------


def proxy_on(start_proxy: Callable[..., Proxy], fake: Any, store_url: str) -> Proxy:
    # A generous store timeout: this machine may be busy, and TLS handshakes are slow
    # next to a Redis command. A refused certificate fails at once whatever the bound.
    return start_proxy(
        fake[1].url,
        store={"url": store_url, "timeout_seconds": 5},
        auth={"key_pepper": "pepper-for-tls-tests-0123456789abcdef"},
    )


def ready(proxy: Proxy) -> int:
    return httpx.get(proxy.url + "/readyz", timeout=10).status_code


def spent_today(proxy: Proxy, key: str) -> float:
    headers = {"authorization": f"Bearer {key}"}
    response = httpx.get(proxy.url + "/v1/usage", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    spent: float = response.json()["today"]["spent_usd"]
    return spent


def assert_serves_and_books(proxy: Proxy) -> None:
    """Ready, and an image call through the SDK succeeds and is booked."""
    assert ready(proxy) == 200
    key = proxy.new_key()
    image = proxy.sdk(key, max_retries=0).images.generate(
        prompt="a lighthouse", response_format="url"
    )
    assert image.data and image.data[0].url
    assert spent_today(proxy, key) == pytest.approx(PRICE)


def assert_not_ready_and_refuses(proxy: Proxy) -> None:
    """Not ready, and image calls fail closed: /readyz and the request path agree."""
    assert ready(proxy) == 503
    # No key can be made without the store; any presented key is looked up there first.
    sdk = proxy.sdk("a-key-the-store-would-look-up", max_retries=0)
    with pytest.raises(openai.InternalServerError) as failure:
        sdk.images.generate(prompt="a lighthouse", response_format="url")
    assert failure.value.status_code == 503


def test_cert_reqs_none_is_ready_and_books_calls(
    fake: Any, start_proxy: Callable[..., Proxy], tls_redis: Callable[..., TLSRedis]
) -> None:
    server = tls_redis()
    proxy = proxy_on(start_proxy, fake, server.url(ssl_cert_reqs="none"))
    assert_serves_and_books(proxy)


def test_a_private_ca_with_the_hostname_checked(
    fake: Any,
    start_proxy: Callable[..., Proxy],
    tls_redis: Callable[..., TLSRedis],
    certs: Certificates,
) -> None:
    server = tls_redis()  # its certificate names 127.0.0.1, the host in the URL
    proxy = proxy_on(start_proxy, fake, server.url(ssl_ca_certs=certs.ca))
    assert_serves_and_books(proxy)


def test_a_certificate_for_another_name_needs_the_hostname_check_off(
    fake: Any,
    start_proxy: Callable[..., Proxy],
    tls_redis: Callable[..., TLSRedis],
    certs: Certificates,
) -> None:
    server = tls_redis(certs.localhost)  # names localhost; the URL says 127.0.0.1
    checked = proxy_on(start_proxy, fake, server.url(ssl_ca_certs=certs.ca))
    assert_not_ready_and_refuses(checked)
    unchecked = proxy_on(
        start_proxy, fake, server.url(ssl_ca_certs=certs.ca, ssl_check_hostname="false")
    )
    assert_serves_and_books(unchecked)


def test_a_client_certificate_for_mutual_tls(
    fake: Any,
    start_proxy: Callable[..., Proxy],
    tls_redis: Callable[..., TLSRedis],
    certs: Certificates,
) -> None:
    server = tls_redis(auth_clients="yes")
    without = proxy_on(start_proxy, fake, server.url(ssl_ca_certs=certs.ca))
    assert_not_ready_and_refuses(without)
    cert, key = certs.client
    proxy = proxy_on(
        start_proxy,
        fake,
        server.url(ssl_ca_certs=certs.ca, ssl_certfile=cert, ssl_keyfile=key),
    )
    assert_serves_and_books(proxy)


def test_a_wrong_ca_is_not_ready_and_calls_fail_closed(
    fake: Any,
    start_proxy: Callable[..., Proxy],
    tls_redis: Callable[..., TLSRedis],
    certs: Certificates,
) -> None:
    server = tls_redis()
    proxy = proxy_on(start_proxy, fake, server.url(ssl_ca_certs=certs.other_ca))
    assert_not_ready_and_refuses(proxy)
    # Nothing in the answer or the log names more than the failure's kind.
    assert str(certs.other_ca) not in httpx.get(proxy.url + "/readyz", timeout=10).text
