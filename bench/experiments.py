"""Checks behind BENCHMARKS.md that are not timings of the proxy as it is.

``python -m bench.experiments reset-billing [--rev REV]``: one ``[fake:reset]`` call (the
fake bills, then drops the connection) through the proxy with each upstream client; prints
the answer and what the key was charged.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from . import services, source
from .context import Context, Plan
from .report import Report
from .services import Endpoint
from .wrk import GENERATION


def reset_billing(ctx: Context) -> None:
    with ctx.scope() as scope:
        _, fake_url = scope.fake()
        for client in services.CLIENTS:
            with scope.proxy(fake_url, client=client) as proxy:
                status, answer = _call(proxy, "/images/generations", "a lighthouse [fake:reset]")
                _, usage = _call(proxy, "/usage")
            today = json.loads(usage)["today"]
            code = json.loads(answer).get("error", {}).get("code")
            print(
                f"{client}: {status} {code}; key charged spent ${today['spent_usd']:.2f}, "
                f"uncertain ${today['uncertain_usd']:.2f}, held ${today['held_usd']:.2f}",
                flush=True,
            )


def _call(endpoint: Endpoint, path: str, prompt: str | None = None) -> tuple[int, bytes]:
    body = None if prompt is None else json.dumps(dict(GENERATION, prompt=prompt)).encode()
    request = urllib.request.Request(
        endpoint.base_url + path,
        data=body,
        headers={"authorization": f"Bearer {endpoint.key}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments", description=__doc__)
    parser.add_argument("experiment", choices=("reset-billing",))
    parser.add_argument("--rev", help="proxy/ as of this git revision")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="apiyi-experiment-") as tmp:
        code, label = services.ROOT, source.describe_working_tree()
        if args.rev:
            code, label = source.extract(args.rev, Path(tmp) / "source")
        print(f"proxy source: {label}")
        ctx = Context(Plan.of(True), Report("experiment", {}), Path(tmp), False, source=code)
        reset_billing(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
