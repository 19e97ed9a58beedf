"""Reading a store URL: every option, read as redis-py reads it, or refused by name."""

from __future__ import annotations

import re
import ssl
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from redis.asyncio.connection import parse_url, to_bool

from proxy.redis_url import FALSE, TRUE, RedisTarget, RedisURLError

PASSWORD = "hunter2-store-secret"
KEY_PASSWORD = "key-password-secret"


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed certificate, its key, and the key encrypted."""
    folder = tmp_path_factory.mktemp("pem")
    cert, key, locked = folder / "cert.pem", folder / "key.pem", folder / "locked.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=store-url-test"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    subprocess.run(
        ["openssl", "pkey", "-in", key, "-out", locked, "-aes256",
         "-passout", f"pass:{KEY_PASSWORD}"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return {"cert": cert, "key": key, "locked": locked}


def redis_py_context(url: str) -> ssl.SSLContext:
    """The context redis-py's own ``SSLConnection`` builds from the same URL."""
    options: dict[str, Any] = dict(parse_url(url))
    connection = options.pop("connection_class")(**options)
    context: ssl.SSLContext = connection.ssl_context.get()
    return context


# where --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://", RedisTarget("localhost")),
        ("redis://10.0.0.7", RedisTarget("10.0.0.7")),
        ("redis://cache:7000/3", RedisTarget("cache", 7000, 3)),
        ("redis://cache/0?db=5", RedisTarget("cache", db=5)),  # the query wins
        ("redis://cache?db=2", RedisTarget("cache", db=2)),
        (f"redis://:{PASSWORD}@cache", RedisTarget("cache", password=PASSWORD)),
        ("redis://app:p%40ss%2Fw@cache/1", RedisTarget("cache", 6379, 1, "app", "p@ss/w")),
        ("redis://app@cache", RedisTarget("cache", username="app")),
        ("redis://[::1]:6380", RedisTarget("::1", 6380)),
        ("rediss://cache:6380/4", RedisTarget("cache", 6380, 4)),
    ],
)
def test_address_database_and_credentials(url: str, expected: RedisTarget) -> None:
    target = RedisTarget.from_url(url)
    assert target == expected
    assert (target.tls is not None) is url.startswith("rediss:")
    # Everything redis-py reads from the same URL, the same.
    theirs = parse_url(url)
    assert theirs.get("host", "localhost") == target.host
    assert theirs.get("port", 6379) == target.port
    assert theirs.get("db", 0) == target.db
    assert theirs.get("username") == target.username
    assert theirs.get("password") == target.password


# TLS ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "mode", "hostname"),
    [
        ("", ssl.CERT_REQUIRED, True),
        ("ssl_cert_reqs=required", ssl.CERT_REQUIRED, True),
        ("ssl_cert_reqs=optional", ssl.CERT_OPTIONAL, True),
        ("ssl_cert_reqs=none", ssl.CERT_NONE, False),
        # Nothing verified, so no name to check, whatever is asked.
        ("ssl_cert_reqs=none&ssl_check_hostname=true", ssl.CERT_NONE, False),
        ("ssl_check_hostname=false", ssl.CERT_REQUIRED, False),
        ("ssl_cert_reqs=optional&ssl_check_hostname=no", ssl.CERT_OPTIONAL, False),
    ],
)
def test_verification_and_hostname_check(query: str, mode: ssl.VerifyMode, hostname: bool) -> None:
    url = "rediss://cache:6380/0" + (f"?{query}" if query else "")
    context = RedisTarget.from_url(url).tls
    assert context is not None
    assert (context.verify_mode, context.check_hostname) == (mode, hostname)
    theirs = redis_py_context(url)
    assert (theirs.verify_mode, theirs.check_hostname) == (mode, hostname)


@pytest.mark.parametrize("spelling", [*FALSE, *TRUE, *(s.upper() for s in FALSE + TRUE), "True"])
def test_bool_spellings_mean_what_they_mean_to_redis_py(spelling: str) -> None:
    context = RedisTarget.from_url(f"rediss://cache?ssl_check_hostname={spelling}").tls
    assert context is not None
    assert context.check_hostname is to_bool(spelling)


def test_verify_flags_and_minimum_version() -> None:
    url = (
        "rediss://cache?ssl_include_verify_flags=[VERIFY_X509_STRICT, VERIFY_X509_PARTIAL_CHAIN]"
        "&ssl_exclude_verify_flags=VERIFY_X509_TRUSTED_FIRST&ssl_min_version=772"
        "&ssl_ciphers=ECDHE+AESGCM"
    )
    context = RedisTarget.from_url(url).tls
    assert context is not None
    assert context.verify_flags & ssl.VERIFY_X509_STRICT
    assert context.verify_flags & ssl.VERIFY_X509_PARTIAL_CHAIN
    assert not context.verify_flags & ssl.VERIFY_X509_TRUSTED_FIRST
    assert context.minimum_version is ssl.TLSVersion.TLSv1_3
    theirs = redis_py_context(url)
    assert (theirs.verify_flags, theirs.minimum_version) == (
        context.verify_flags,
        context.minimum_version,
    )


def test_ca_files_are_trusted(pem: dict[str, Path]) -> None:
    for option, value in [
        ("ssl_ca_certs", str(pem["cert"])),
        ("ssl_ca_path", str(pem["cert"].parent)),  # looked up by hash: loads nothing now
        ("ssl_ca_data", pem["cert"].read_text()),
    ]:
        context = RedisTarget.from_url(f"rediss://cache?{option}={quote(value)}").tls
        assert context is not None
        subjects = [dict(entry[0] for entry in ca["subject"]) for ca in context.get_ca_certs()]
        loaded = {"commonName": "store-url-test"} in subjects
        assert loaded is (option != "ssl_ca_path"), option


def test_a_client_certificate_with_and_without_a_password(pem: dict[str, Path]) -> None:
    cert, key, locked = (quote(str(pem[name])) for name in ("cert", "key", "locked"))
    assert RedisTarget.from_url(f"rediss://cache?ssl_certfile={cert}&ssl_keyfile={key}").tls
    both = f"rediss://cache?ssl_certfile={cert}&ssl_keyfile={locked}"
    assert RedisTarget.from_url(f"{both}&ssl_password={KEY_PASSWORD}").tls
    # An encrypted key and no password: refused, not a prompt on the terminal.
    with pytest.raises(RedisURLError, match="encrypted"):
        RedisTarget.from_url(both)
    with pytest.raises(RedisURLError, match="ssl_certfile/ssl_keyfile") as info:
        RedisTarget.from_url(f"{both}&ssl_password=wrong-{KEY_PASSWORD}")
    assert KEY_PASSWORD not in str(info.value)


# refused ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://cache", "scheme must be redis:// or rediss://"),
        ("redis://cache:99999", "port must be a number"),
        ("redis://cache/first", "database must be a number, got 'first'"),
        ("redis://cache?db=-1", "database must be a number"),
        ("redis://cache?socket_timeout=5", "unknown option 'socket_timeout'"),
        ("redis://cache?ssl_cert_reqs=none", "ssl_cert_reqs needs a rediss:// URL"),
        ("rediss://cache?ssl_cert_reqs=NONE", "ssl_cert_reqs must be none, optional or required"),
        ("rediss://cache?ssl_cert_reqs=maybe", "got 'maybe'"),
        # redis-py reads anything but its false spellings as true: "off" would verify.
        ("rediss://cache?ssl_check_hostname=off", "ssl_check_hostname must be true or false"),
        ("rediss://cache?ssl_check_hostname=", "ssl_check_hostname is empty"),
        ("rediss://cache?ssl_ca_certs=", "ssl_ca_certs is empty"),
        ("rediss://cache?ssl_cert_reqs=none&ssl_cert_reqs=required", "given twice"),
        ("rediss://cache?ssl_min_version=TLSv1_2", "ssl_min_version must be the number"),
        ("rediss://cache?ssl_min_version=12", "771 (TLSv1_2)"),
        ("rediss://cache?ssl_include_verify_flags=VERIFY_NOTHING", "'VERIFY_NOTHING' is not"),
        ("rediss://cache?ssl_exclude_verify_flags=name", "'name' is not"),
        ("rediss://cache?ssl_ciphers=NO-SUCH-CIPHER", "ssl_ciphers: cannot use"),
        ("rediss://cache?ssl_keyfile=/etc/hostname", "ssl_keyfile needs ssl_certfile"),
        ("rediss://cache?ssl_ca_certs=/no/such/ca.pem", "'/no/such/ca.pem': No such file"),
        ("rediss://cache?ssl_ca_path=/no/such/dir", "ssl_ca_path: cannot use"),
        ("rediss://cache?ssl_certfile=/no/such/cert.pem", "ssl_certfile/ssl_keyfile"),
        ("rediss://cache?ssl_ca_data=not-a-pem", "ssl_ca_data: cannot use"),
    ],
)
def test_bad_urls_are_refused_by_name(url: str, message: str) -> None:
    with pytest.raises(RedisURLError, match=re.escape(message)):
        RedisTarget.from_url(url)


@pytest.mark.parametrize(
    "query",
    [
        "ssl_cert_reqs=maybe",
        "nope=1",
        "ssl_ca_certs=/no/such/ca.pem",
        f"ssl_password={KEY_PASSWORD}&ssl_certfile=/no/such/cert.pem",
        f"ssl_ca_data={KEY_PASSWORD}",
        f"ssl_password={KEY_PASSWORD}&ssl_password=again",
    ],
)
def test_no_message_shows_a_password(query: str) -> None:
    url = f"rediss://app:{PASSWORD}@cache:6380/0?{query}"
    with pytest.raises(RedisURLError) as info:
        RedisTarget.from_url(url)
    assert PASSWORD not in str(info.value) and KEY_PASSWORD not in str(info.value)
    assert PASSWORD not in repr(RedisTarget.from_url(f"rediss://app:{PASSWORD}@cache"))
