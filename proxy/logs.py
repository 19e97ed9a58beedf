"""Logging: one JSON object a line (or plain text), level and format from config.

The access log, one line per request, is the one log on the request path: in JSON it
is written by ``AccessLog`` straight to standard error in batches (at most a quarter
second late, or 64 KiB at a time) instead of through ``logging``, whose record, lock
and write per line cost about a sixth of a request's CPU. Its lines have the same
shape as every other JSON log line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any

import orjson

from .config import LogSettings


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update(access)
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type and message only: a traceback's locals could hold secrets.
            entry["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return orjson.dumps(entry).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        access = getattr(record, "access", None)
        line = super().format(record)
        if isinstance(access, dict):
            line += " " + " ".join(f"{k}={v}" for k, v in access.items())
        return line


def setup(settings: LogSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("apiyi_proxy")
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    root.propagate = False
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
    logging.getLogger("uvicorn.access").disabled = True


ACCESS_LOGGER = "apiyi_proxy.access"
FLUSH_SECONDS = 0.25
FLUSH_BYTES = 64 * 1024


class AccessLog:
    """Access lines as JSON, written to a file descriptor a batch at a time."""

    def __init__(self, settings: LogSettings, fd: int | None = None) -> None:
        level = logging.getLevelName(settings.level.upper())
        self.enabled = settings.access_log and level <= logging.INFO
        self._json = settings.format == "json"
        self._fd = sys.stderr.fileno() if fd is None else fd
        self._lines: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    def write(self, access: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if not self._json:  # plain text goes the ordinary way
            logging.getLogger(ACCESS_LOGGER).info("request", extra={"access": access})
            return
        now = time.time()
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            + f".{int(now * 1000) % 1000:03d}Z",
            "level": "info",
            "logger": ACCESS_LOGGER,
            "msg": "request",
            **access,
        }
        line = orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE)
        self._lines.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines.clear()
        self._size = 0
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            pass  # nowhere to write (a closed stream): the lines are lost, the call is not
