"""An asyncio HTTP/1.1 load generator, run as its own process: ``python -m bench.loadgen CONF``.

wrk measures throughput; this measures what wrk cannot: thousands of connections held
open at once (``hold``), large bodies read at full speed next to one slow reader
(``bodies``), and every single answer time and status under load (``burst``). ``CONF`` is
a JSON file; the records go as JSON to the file named by its ``out`` field, one record per
request: ``[status, start, end, body_bytes, note]`` (monotonic seconds, comparable across
processes; status 0 when the request failed below HTTP, ``note`` then names the error,
else it holds the first bytes of the body).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .procs import raise_nofile

Record = list[Any]
READ_SIZE = 64 * 1024
HEAD_BYTES = 128


@dataclass
class Target:
    host: str
    port: int
    request: bytes

    @classmethod
    def of(cls, conf: dict[str, Any]) -> Target:
        url = urlsplit(conf["url"])
        body = conf["body"].encode()
        head = (
            f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Authorization: Bearer {conf['key']}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return cls(url.hostname or "127.0.0.1", url.port or 80, head.encode() + body)


@dataclass
class Answer:
    status: int = 0
    size: int = 0
    head: bytes = b""
    keep_alive: bool = True
    read_rate: float = 0.0  # bytes per second; 0 reads as fast as it can
    started: float = field(default_factory=time.monotonic)

    async def take(self, reader: asyncio.StreamReader, n: int) -> None:
        while n > 0:
            chunk = await reader.read(min(READ_SIZE, n))
            if not chunk:
                raise ConnectionError("closed mid-body")
            n -= len(chunk)
            self.keep(chunk)
            if self.read_rate:
                ahead = self.size / self.read_rate - (time.monotonic() - self.started)
                if ahead > 0:
                    await asyncio.sleep(ahead)

    def keep(self, chunk: bytes) -> None:
        if len(self.head) < HEAD_BYTES:
            self.head += chunk[: HEAD_BYTES - len(self.head)]
        self.size += len(chunk)


async def read_answer(reader: asyncio.StreamReader, read_rate: float = 0.0) -> Answer:
    answer = Answer(read_rate=read_rate)
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    answer.status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    answer.keep_alive = headers.get("connection") != "close"
    if "content-length" in headers:
        await answer.take(reader, int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await answer.take(reader, size)
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
    else:
        while chunk := await reader.read(READ_SIZE):
            answer.keep(chunk)
        answer.keep_alive = False
    return answer


async def one_request(target: Target, limit_s: float, read_rate: float = 0.0) -> Record:
    """One request on a connection of its own."""
    start = time.monotonic()
    writer = None
    try:
        async with asyncio.timeout(limit_s):
            reader, writer = await asyncio.open_connection(target.host, target.port)
            writer.write(target.request)
            answer = await read_answer(reader, read_rate)
        return [answer.status, start, time.monotonic(), answer.size, _text(answer.head)]
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        return [0, start, time.monotonic(), 0, type(exc).__name__]
    finally:
        if writer is not None:
            writer.close()


async def hold(conf: dict[str, Any]) -> list[Record]:
    """``count`` requests at once, each on its own connection, opened in batches."""
    target = Target.of(conf)
    tasks = []
    batch = int(conf.get("batch", 250))
    for i in range(conf["count"]):
        tasks.append(asyncio.create_task(one_request(target, conf["timeout"])))
        if (i + 1) % batch == 0:
            await asyncio.sleep(0.05)
    return list(await asyncio.gather(*tasks))


async def bodies(conf: dict[str, Any]) -> list[Record]:
    """``count`` full-speed readers and, with ``slow_rate``, one slow reader (recorded last)."""
    target = Target.of(conf)
    jobs = [one_request(target, conf["timeout"]) for _ in range(conf["count"])]
    if conf.get("slow_rate"):
        jobs.append(one_request(target, conf["timeout"], read_rate=float(conf["slow_rate"])))
    return list(await asyncio.gather(*jobs))


async def burst(conf: dict[str, Any]) -> list[Record]:
    """``concurrency`` keep-alive clients sending back to back for ``seconds``."""
    target = Target.of(conf)
    deadline = time.monotonic() + conf["seconds"]
    records: list[Record] = []

    async def client() -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while time.monotonic() < deadline:
            start = time.monotonic()
            try:
                async with asyncio.timeout(conf["timeout"]):
                    if conn is None:
                        conn = await asyncio.open_connection(target.host, target.port)
                    conn[1].write(target.request)
                    answer = await read_answer(conn[0])
                records.append([answer.status, start, time.monotonic(), answer.size, ""])
                if not answer.keep_alive:
                    conn[1].close()
                    conn = None
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                records.append([0, start, time.monotonic(), 0, type(exc).__name__])
                if conn is not None:
                    conn[1].close()
                conn = None
                await asyncio.sleep(0.01)
        if conn is not None:
            conn[1].close()

    await asyncio.gather(*(client() for _ in range(conf["concurrency"])))
    return records


MODES = {"hold": hold, "bodies": bodies, "burst": burst}


def _text(head: bytes) -> str:
    return head.decode("latin-1")


def main(argv: list[str]) -> int:
    raise_nofile()
    with open(argv[0]) as f:
        conf = json.load(f)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        records = runner.run(MODES[conf["mode"]](conf))
    with open(conf["out"], "w") as f:
        json.dump(records, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
