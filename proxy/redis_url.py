"""Where a single-node Redis store URL points and how to reach it, read once.

``redis://[[username]:password@]host[:port][/db][?option=value&...]``, and ``rediss://``
for TLS. The money scripts' own connection (``store/resp.py``) and redis-py's clients
both connect from one ``RedisTarget``: the same address, database and credentials,
and the same ``ssl.SSLContext``. So ``/readyz`` and the request path cannot disagree
about whether the store can be reached.

The options are those redis-py reads from a URL, each meaning what redis-py makes of it:

    db                          the database; wins over the path
    ssl_cert_reqs               none | optional | required (default required)
    ssl_check_hostname          true or false (default true; false under cert_reqs none)
    ssl_ca_certs                a PEM file of CAs to trust, besides the system's
    ssl_ca_path, ssl_ca_data    a directory of them, or the PEM text itself
    ssl_certfile, ssl_keyfile   a client certificate and its key (mutual TLS)
    ssl_password                the password of that key
    ssl_min_version             ``ssl.TLSVersion`` by number (771 = TLS 1.2, 772 = 1.3)
    ssl_ciphers                 an OpenSSL cipher list
    ssl_include_verify_flags, ssl_exclude_verify_flags
                                ``ssl.VerifyFlags`` names, comma-separated

Refused, with a message that names the option and never the URL (it may carry a
password): an unknown option, one given twice or empty, a value redis-py would fail
on, a bool redis-py would misread (it takes ``off`` for true), TLS options on
``redis://``, and certificate files that cannot be loaded.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

DEFAULT_PORT = 6379
# redis-py's spellings of false; anything else is true there. Only these and their
# opposites are taken here, so a value never means something its writer did not.
FALSE = ("0", "f", "false", "n", "no")
TRUE = ("1", "t", "true", "y", "yes")
CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
# Never repeated in a message.
SECRET_OPTIONS = frozenset({"ssl_password", "ssl_ca_data"})


class RedisURLError(ValueError):
    """A store URL that cannot be used; the message names the part, never the password."""


@dataclass(frozen=True)
class RedisTarget:
    """One Redis server, as a ``redis://`` or ``rediss://`` URL names it."""

    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    # None for redis://. Built once: every connection to this target shares it.
    tls: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_url(cls, url: str) -> RedisTarget:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise RedisURLError("the scheme must be redis:// or rediss://")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise RedisURLError("the port must be a number from 1 to 65535") from None
        options = _options(parts.query)
        db = options.pop("db", None) or parts.path.strip("/") or "0"
        if not (db.isascii() and db.isdigit()):
            raise RedisURLError(f"the database must be a number, got {db!r}")
        if options and parts.scheme != "rediss":
            raise RedisURLError(f"{min(options)} needs a rediss:// URL (TLS)")
        return cls(
            host=unquote(parts.hostname or "localhost"),
            port=port,
            db=int(db),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls_context(options) if parts.scheme == "rediss" else None,
        )


def _options(query: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name != "db" and name not in TLS_OPTIONS:
            known = ", ".join(["db", *TLS_OPTIONS])
            raise RedisURLError(f"unknown option {name!r}; known: {known}")
        if name in options:
            raise RedisURLError(f"{name} is given twice")
        if not value:
            raise RedisURLError(f"{name} is empty")
        options[name] = value
    return options


def to_bool(value: str) -> bool:
    if value.lower() in FALSE:
        return False
    if value.lower() in TRUE:
        return True
    raise ValueError("must be true or false (also 1/0, yes/no, y/n, t/f)")


def cert_reqs(value: str) -> ssl.VerifyMode:
    if value not in CERT_REQS:
        raise ValueError("must be none, optional or required")
    return CERT_REQS[value]


def tls_version(value: str) -> ssl.TLSVersion:
    try:
        return ssl.TLSVersion(int(value))
    except ValueError:
        known = ", ".join(f"{v.value} ({v.name})" for v in ssl.TLSVersion if v.value > 0)
        raise ValueError(f"must be the number of a TLS version: {known}") from None


def verify_flags(value: str) -> ssl.VerifyFlags:
    flags = ssl.VerifyFlags(0)
    for name in value.replace("[", "").replace("]", "").split(","):
        if name.strip() not in ssl.VerifyFlags.__members__:
            raise ValueError(f"must name ssl.VerifyFlags members; {name.strip()!r} is not one")
        flags |= ssl.VerifyFlags[name.strip()]
    return flags


# How each TLS option's value is read; the context is built from what they give.
TLS_OPTIONS: dict[str, Callable[[str], Any]] = {
    "ssl_cert_reqs": cert_reqs,
    "ssl_check_hostname": to_bool,
    "ssl_ca_certs": str,
    "ssl_ca_path": str,
    "ssl_ca_data": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_password": str,
    "ssl_min_version": tls_version,
    "ssl_ciphers": str,
    "ssl_include_verify_flags": verify_flags,
    "ssl_exclude_verify_flags": verify_flags,
}


def tls_context(options: dict[str, str]) -> ssl.SSLContext:
    """The context redis-py's ``SSLConnection`` builds from these same options."""
    read: dict[str, Any] = {}
    for name, value in options.items():
        try:
            read[name] = TLS_OPTIONS[name](value)
        except ValueError as exc:
            shown = "" if name in SECRET_OPTIONS else f", got {value!r}"
            raise RedisURLError(f"{name} {exc}{shown}") from None
    context = ssl.create_default_context()
    mode = read.get("ssl_cert_reqs", ssl.CERT_REQUIRED)
    # In this order: a context that checks names refuses to stop verifying.
    context.check_hostname = mode != ssl.CERT_NONE and read.get("ssl_check_hostname", True)
    context.verify_mode = mode
    context.verify_flags |= read.get("ssl_include_verify_flags", 0)
    context.verify_flags &= ~read.get("ssl_exclude_verify_flags", 0)
    certfile, keyfile = read.get("ssl_certfile"), read.get("ssl_keyfile")
    if keyfile and not certfile:
        raise RedisURLError("ssl_keyfile needs ssl_certfile")
    if certfile:
        shown = " and ".join(repr(path) for path in (certfile, keyfile) if path)
        with _loading("ssl_certfile/ssl_keyfile", shown):
            context.load_cert_chain(certfile, keyfile, read.get("ssl_password", _no_password))
    cas = {k: read[k] for k in ("ssl_ca_certs", "ssl_ca_path", "ssl_ca_data") if k in read}
    if "ssl_ca_path" in cas and not os.path.isdir(cas["ssl_ca_path"]):
        # OpenSSL looks in it only when verifying: say so now, not at every connection.
        raise RedisURLError(f"ssl_ca_path: cannot use {cas['ssl_ca_path']!r}: not a directory")
    if cas:
        shown = ", ".join(repr(v) for k, v in cas.items() if k not in SECRET_OPTIONS) or "them"
        with _loading("/".join(cas), shown):
            context.load_verify_locations(
                cas.get("ssl_ca_certs"), cas.get("ssl_ca_path"), cas.get("ssl_ca_data")
            )
    if "ssl_min_version" in read:
        with _loading("ssl_min_version", read["ssl_min_version"].name):
            context.minimum_version = read["ssl_min_version"]
    if "ssl_ciphers" in read:
        with _loading("ssl_ciphers", repr(read["ssl_ciphers"])):
            context.set_ciphers(read["ssl_ciphers"])
    return context


def _no_password() -> str:
    # Asked only for an encrypted key: fail, rather than have OpenSSL prompt on a terminal.
    raise ValueError("the key is encrypted; give ssl_password")


@contextlib.contextmanager
def _loading(names: str, what: str) -> Iterator[None]:
    """A failure to load TLS material, reported under the options that named it."""
    try:
        yield
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or (exc.args[-1] if exc.args else repr(exc))
        raise RedisURLError(f"{names}: cannot use {what}: {reason}") from None
