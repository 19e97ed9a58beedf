"""``apiyi-proxy``: serve, fake-upstream, keys, teams, usage, check-config.

One flag maps to one settings field; everything else comes from the config file and
the environment (see ``proxy.config``).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import orjson
import yaml

from . import config as config_module
from .config import ConfigError, Settings
from .keys import KeyHasher, issue_key
from .limits import (
    KEY_LIMIT_FIELDS,
    TEAM_LIMIT_FIELDS,
    LimitError,
    limit_changes,
    team_name,
    usd_to_micros,
    whole_count,
)
from .store import Limits, Store, Team, open_store


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except ConfigError as exc:
        print(f"apiyi-proxy: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apiyi-proxy", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="YAML config file (default: $APIYI_PROXY_CONFIG)")
    serve.add_argument("--host", help="listen address (server.host)")
    serve.add_argument("--port", type=int, help="listen port (server.port)")
    serve.add_argument("--workers", type=int, help="worker processes (server.workers)")
    serve.add_argument(
        "--fake-upstream",
        action="store_true",
        default=None,
        help="answer from the built-in fake upstream (no key, no network needed)",
    )
    serve.set_defaults(run=_serve)

    fake = commands.add_parser("fake-upstream", help="run a local stand-in for the upstream")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8090)
    fake.add_argument("--latency", type=float, default=0.0, help="seconds per image")
    fake.add_argument("--fail-rate", type=float, default=0.0, help="share of calls that fail")
    fake.add_argument("--api-key", default=None, help="bearer key to require (default: accept any)")
    fake.add_argument("--image-bytes", type=int, default=0, help="pad images to this size")
    fake.set_defaults(run=_fake_upstream)

    check = commands.add_parser(
        "check-config",
        help="validate as serve does, then print the resolved config, secrets masked",
    )
    check.add_argument("--config")
    check.add_argument(
        "--fake-upstream",
        action="store_true",
        default=None,
        help="check the settings of `serve --fake-upstream`",
    )
    check.set_defaults(run=_check_config)

    keys = commands.add_parser("keys", help="manage client keys in the store")
    keys.add_argument("--config")
    key_commands = keys.add_subparsers(required=True, metavar="ACTION")
    create = key_commands.add_parser("create", help="issue a key (shown once)")
    create.add_argument("--name", required=True)
    create.add_argument("--team", type=_team_flag)
    _key_flags(create)
    create.set_defaults(run=_keys_create)
    listing = key_commands.add_parser("list", help="list keys")
    listing.set_defaults(run=_keys_list)
    revoke = key_commands.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key_id")
    revoke.set_defaults(run=_keys_revoke)
    update = key_commands.add_parser("update", help="change a key's name, team or limits")
    update.add_argument("key_id")
    update.add_argument("--name")
    update.add_argument("--team", type=_team_flag, help="only to confirm it: fixed at creation")
    _key_flags(update)
    update.set_defaults(run=_keys_update)

    teams = commands.add_parser("teams", help="set a team's budgets")
    teams.add_argument("--config")
    teams.add_argument("name", type=_team_flag)
    _limit_flags(teams, TEAM_LIMIT_FIELDS)
    teams.set_defaults(run=_teams_set)

    usage = commands.add_parser("usage", help="spend per key and team, today and this month")
    usage.add_argument("--config")
    usage.add_argument("--key")
    usage.add_argument("--team")
    usage.set_defaults(run=_usage)
    return parser


def _key_flags(parser: argparse.ArgumentParser) -> None:
    _limit_flags(parser, KEY_LIMIT_FIELDS)
    parser.add_argument("--model", action="append", dest="models", help="allowed model (repeat)")


def _limit_flags(parser: argparse.ArgumentParser, fields: tuple[str, ...]) -> None:
    """One flag per limit: a number, 0 (allows nothing) or ``none`` (no limit); a flag
    left out leaves the limit as it is."""
    for name in fields:
        usd = name.endswith("_usd")
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=_limit_flag(usd_to_micros if usd else whole_count),
            default=argparse.SUPPRESS,
            metavar="USD|none" if usd else "N|none",
        )


_DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?|\.[0-9]+([eE][+-]?[0-9]+)?")


def _limit_flag(rule: Callable[[object], int | None]) -> Callable[[str], object]:
    def parse(text: str) -> object:
        if text.strip().lower() == "none":
            return None
        value: object
        # Plain ASCII decimals only: int() and float() also take other scripts' digits and "1_0".
        if not _DECIMAL.fullmatch(text.strip()):
            raise argparse.ArgumentTypeError("must be a number, or none for no limit")
        try:
            value = int(text)
        except ValueError:
            value = float(text)
        try:
            rule(value)
        except LimitError as error:
            raise argparse.ArgumentTypeError(f"{error.reason}, or none for no limit") from None
        return value

    return parse


def _team_flag(text: str) -> str:
    try:
        return team_name(text)
    except LimitError as error:
        raise argparse.ArgumentTypeError(error.reason) from None


def _settings(args: argparse.Namespace, **server: Any) -> Settings:
    return config_module.load(getattr(args, "config", None), overrides={"server": server})


def _serve(args: argparse.Namespace) -> int:
    from .server import serve

    settings = _settings(
        args, host=args.host, port=args.port, workers=args.workers, fake_upstream=args.fake_upstream
    )
    serve(settings, config_path=args.config)
    return 0


def _fake_upstream(args: argparse.Namespace) -> int:
    from .fake_upstream import run

    run(
        args.host,
        args.port,
        latency=args.latency,
        fail_rate=args.fail_rate,
        api_key=args.api_key,
        image_bytes=args.image_bytes,
    )
    return 0


def _check_config(args: argparse.Namespace) -> int:
    settings = _settings(args, fake_upstream=args.fake_upstream)
    config_module.check_serving(settings)
    print(yaml.safe_dump(_plain(settings.masked()), sort_keys=False), end="")
    return 0


def _plain(value: Any) -> Any:
    if isinstance(value, dict) or hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# store commands ----------------------------------------------------------------------


def _with_store(args: argparse.Namespace, action: Any) -> int:
    settings = _settings(args)
    if settings.store.url.startswith("memory"):
        print(
            "apiyi-proxy: the memory:// store lives inside the server process; use the admin "
            "API (POST /admin/keys) or configure a redis:// store (APIYI_PROXY_STORE_URL).",
            file=sys.stderr,
        )
        return 2

    async def run() -> int:
        store = open_store(settings.store)
        try:
            result: int = await action(settings, store)
            return result
        finally:
            await store.close()

    return asyncio.run(run())


def _limits_from(
    args: argparse.Namespace, base: Limits, fields: tuple[str, ...] = KEY_LIMIT_FIELDS
) -> Limits:
    """``base`` with the limits given on the command line (already checked by their flags)."""
    return replace(base, **limit_changes(vars(args), fields))


def _print(value: Any) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def _keys_create(args: argparse.Namespace) -> int:
    async def action(settings: Settings, store: Store) -> int:
        secret, record = issue_key(
            KeyHasher(settings.auth.key_pepper),
            args.name,
            team=args.team,
            limits=_limits_from(args, settings.ledger.default_limits()),
            models=tuple(args.models or ()),
        )
        seeds = settings.ledger.team_seeds()
        if args.team in seeds:
            # As the admin API does: a config team the store lost binds its new key.
            await store.seed_team(Team(args.team, seeds[args.team]))
        await store.add_key(record)
        _print({**record.public(), "key": secret})
        print("The key is shown this once; store it now.", file=sys.stderr)
        return 0

    return _with_store(args, action)


def _keys_list(args: argparse.Namespace) -> int:
    async def action(settings: Settings, store: Store) -> int:
        _print([k.public() for k in await store.keys()])
        return 0

    return _with_store(args, action)


def _keys_revoke(args: argparse.Namespace) -> int:
    async def action(settings: Settings, store: Store) -> int:
        record = await store.update_key(args.key_id, revoked=True)
        if record is None:
            print(f"apiyi-proxy: no key {args.key_id}", file=sys.stderr)
            return 1
        _print(record.public())
        return 0

    return _with_store(args, action)


def _keys_update(args: argparse.Namespace) -> int:
    async def action(settings: Settings, store: Store) -> int:
        record = await store.key(args.key_id)
        if record is None:
            print(f"apiyi-proxy: no key {args.key_id}", file=sys.stderr)
            return 1
        changes: dict[str, Any] = {"limits": _limits_from(args, record.limits)}
        if args.name:
            changes["name"] = args.name
        if args.team and args.team != record.team:
            print("apiyi-proxy: a key's team is fixed at creation", file=sys.stderr)
            return 2
        if args.models:
            changes["models"] = tuple(args.models)
        updated = await store.update_key(args.key_id, **changes)
        assert updated is not None
        _print(updated.public())
        return 0

    return _with_store(args, action)


def _teams_set(args: argparse.Namespace) -> int:
    async def action(settings: Settings, store: Store) -> int:
        current = await store.team(args.name)
        base = current.limits if current else Limits()
        team = Team(args.name, _limits_from(args, base, TEAM_LIMIT_FIELDS))
        await store.put_team(team)
        _print(team.public())
        return 0

    return _with_store(args, action)


def _usage(args: argparse.Namespace) -> int:
    async def action(settings: Settings, store: Store) -> int:
        from .ledger import Ledger
        from .metrics import Metrics

        periods = Ledger(store, settings, Metrics()).periods()
        rows: list[dict[str, Any]] = []
        for key in await store.keys():
            if (args.key and key.id != args.key) or (args.team and key.team != args.team):
                continue
            day = await store.tally("key", key.id, periods.day)
            month = await store.tally("key", key.id, periods.month)
            rows.append({**key.public(), "today": day.as_usd(), "this_month": month.as_usd()})
        teams = sorted({k.team for k in await store.keys() if k.team})
        team_rows = []
        for name in teams:
            if args.team and name != args.team:
                continue
            day = await store.tally("team", name, periods.day)
            month = await store.tally("team", name, periods.month)
            team_rows.append({"team": name, "today": day.as_usd(), "this_month": month.as_usd()})
        _print({"day": periods.day, "month": periods.month, "keys": rows, "teams": team_rows})
        return 0

    return _with_store(args, action)
