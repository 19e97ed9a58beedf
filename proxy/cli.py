"""The apiyi-proxy command: serve, fake-upstream, keys, teams, usage, check-config.

One flag maps to one settings field; everything else comes from the config file and
the environment (see proxy.config). The keys, teams and usage commands work through a
running proxy's admin API when given its address (--url or APIYI_PROXY_URL), whatever
its store; without one, directly on a shared (Redis) store.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import orjson
import yaml

from . import __version__
from . import config as config_module
from .admin_client import AdminAPIError, AdminClient
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

DESCRIPTION = (
    "An OpenAI-compatible, validating reverse proxy for the apiyi image API. "
    "Start with: apiyi-proxy serve --fake-upstream"
)
EPILOG = (
    "The keys, teams and usage commands reach a running proxy through its admin API "
    "when given its address (--url or APIYI_PROXY_URL) and its admin token "
    "(APIYI_PROXY_ADMIN_TOKEN); without an address they work directly on a redis:// store."
)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except ConfigError as exc:
        print(f"apiyi-proxy: configuration error: {exc}", file=sys.stderr)
        return 2
    except AdminAPIError as exc:
        print(f"apiyi-proxy: {exc}", file=sys.stderr)
        # A request the proxy found wrong is the caller's to fix, as a bad flag is.
        return 2 if exc.status in (400, 409, 422) else 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apiyi-proxy", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
    fake.add_argument(
        "--balance-usd",
        type=float,
        default=100.0,
        help="the account's quota, as GET /v1/dashboard/billing/subscription shows it",
    )
    fake.add_argument(
        "--no-account",
        dest="account",
        action="store_false",
        help="answer 404 on the account endpoints, as a provider that lacks them does",
    )
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
        help="check the settings of serve --fake-upstream",
    )
    check.set_defaults(run=_check_config)

    keys = commands.add_parser(
        "keys", help="manage client keys", description=STORE_COMMANDS, epilog=EPILOG
    )
    _where_flags(keys)
    key_commands = keys.add_subparsers(required=True, metavar="ACTION")
    create = key_commands.add_parser("create", help="issue a key (shown once)")
    create.add_argument("--name", required=True)
    create.add_argument("--team", type=_team_flag)
    _key_flags(create)
    _where_flags(create)
    create.set_defaults(run=_keys_create)
    listing = key_commands.add_parser("list", help="list keys")
    _where_flags(listing)
    listing.set_defaults(run=_keys_list)
    revoke = key_commands.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key_id")
    _where_flags(revoke)
    revoke.set_defaults(run=_keys_revoke)
    update = key_commands.add_parser("update", help="change a key's name, team or limits")
    update.add_argument("key_id")
    update.add_argument("--name")
    update.add_argument("--team", type=_team_flag, help="only to confirm it: fixed at creation")
    _key_flags(update)
    _where_flags(update)
    update.set_defaults(run=_keys_update)

    teams = commands.add_parser(
        "teams", help="set a team's budgets", description=STORE_COMMANDS, epilog=EPILOG
    )
    teams.add_argument("name", type=_team_flag)
    _limit_flags(teams, TEAM_LIMIT_FIELDS)
    _where_flags(teams)
    teams.set_defaults(run=_teams_set)

    usage = commands.add_parser(
        "usage",
        help="spend per key and team, today and this month",
        description=STORE_COMMANDS,
        epilog=EPILOG,
    )
    usage.add_argument("--key", help="one key's spend only")
    usage.add_argument("--team", help="one team's (and its keys') spend only")
    usage.add_argument(
        "--from", dest="start", metavar="DAY", help="first day (or month) of a history"
    )
    usage.add_argument("--to", dest="end", metavar="DAY", help="last day (or month); default today")
    usage.add_argument(
        "--by", choices=("key", "team", "model"), help="history rows per key, team or model"
    )
    usage.add_argument("--period", choices=("day", "month"), help="history rows per day or month")
    usage.add_argument("--csv", action="store_true", help="history as CSV")
    _where_flags(usage)
    usage.set_defaults(run=_usage)
    return parser


STORE_COMMANDS = "Works through a running proxy (--url), or directly on a redis:// store."


def _where_flags(parser: argparse.ArgumentParser) -> None:
    """--url and --config, taken before or after the action (keys --url U list, or
    keys list --url U): suppressed defaults, so a level that does not see them keeps
    what another level read."""
    parser.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help="a running proxy's address, to work through its admin API "
        "(default: $APIYI_PROXY_URL; the token comes from $APIYI_PROXY_ADMIN_TOKEN)",
    )
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="YAML config file, to work on its store directly (default: $APIYI_PROXY_CONFIG)",
    )


def _key_flags(parser: argparse.ArgumentParser) -> None:
    _limit_flags(parser, KEY_LIMIT_FIELDS)
    parser.add_argument("--model", action="append", dest="models", help="allowed model (repeat)")


LIMIT_HELP = {
    "daily_usd": "budget per day in USD (0 allows nothing, none: no limit)",
    "monthly_usd": "budget per month in USD (0 allows nothing, none: no limit)",
    "rpm": "requests per minute (none: no limit)",
    "concurrency": "calls at once (none: no limit)",
}


def _limit_flags(parser: argparse.ArgumentParser, fields: tuple[str, ...]) -> None:
    """One flag per limit: a number, 0 (allows nothing) or none (no limit); a flag
    left out leaves the limit as it is."""
    for name in fields:
        usd = name.endswith("_usd")
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=_limit_flag(usd_to_micros if usd else whole_count),
            default=argparse.SUPPRESS,
            metavar="USD|none" if usd else "N|none",
            help=LIMIT_HELP.get(name),
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
    from .server import CannotListen, serve

    settings = _settings(
        args, host=args.host, port=args.port, workers=args.workers, fake_upstream=args.fake_upstream
    )
    try:
        serve(settings, config_path=args.config)
    except CannotListen as error:
        print(f"apiyi-proxy: {error}", file=sys.stderr)
        return 1
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
        balance_usd=args.balance_usd,
        account=args.account,
    )
    return 0


def _check_config(args: argparse.Namespace) -> int:
    settings = _settings(args, fake_upstream=args.fake_upstream)
    config_module.check_serving(settings)
    print(yaml.safe_dump(settings.masked(), sort_keys=False), end="")
    return 0


# keys, teams, usage --------------------------------------------------------------------
# Each command is one direct action on a store and one call of the admin API, with the
# same output: the admin API answers in the shapes the store's records print in.

StoreAction = Callable[[Settings, Store], Awaitable[int]]


def _run(
    args: argparse.Namespace, direct: StoreAction, remote: Callable[[AdminClient], int]
) -> int:
    target = config_module.admin_target(getattr(args, "url", None))
    if target is not None:
        return remote(AdminClient(target))
    return _with_store(args, direct)


def _with_store(args: argparse.Namespace, action: StoreAction) -> int:
    settings = _settings(args)
    if not settings.store.shared:
        server = settings.server
        print(
            "apiyi-proxy: the store is memory://, inside the running proxy; reach it "
            f"through its admin API: --url http://{server.host}:{server.port} "
            "(or APIYI_PROXY_URL) with APIYI_PROXY_ADMIN_TOKEN set to the proxy's admin "
            "token. Or give the proxy a redis:// store (APIYI_PROXY_STORE_URL).",
            file=sys.stderr,
        )
        return 2

    async def run() -> int:
        store = open_store(settings.store)
        try:
            return await action(settings, store)
        finally:
            await store.close()

    return asyncio.run(run())


def _limits_from(
    args: argparse.Namespace, base: Limits, fields: tuple[str, ...] = KEY_LIMIT_FIELDS
) -> Limits:
    """base with the limits given on the command line (already checked by their flags)."""
    return replace(base, **limit_changes(vars(args), fields))


def _limit_body(args: argparse.Namespace, fields: tuple[str, ...]) -> dict[str, Any]:
    """The limits given on the command line, as the admin API takes them (none is null)."""
    given = vars(args)
    return {name: given[name] for name in fields if name in given}


def _print(value: Any) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def _shown_once(created: dict[str, Any]) -> int:
    _print(created)
    print("The key is shown this once; store it now.", file=sys.stderr)
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    async def direct(settings: Settings, store: Store) -> int:
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
        return _shown_once({**record.public(), "key": secret})

    def remote(client: AdminClient) -> int:
        body: dict[str, Any] = {"name": args.name, **_limit_body(args, KEY_LIMIT_FIELDS)}
        if args.team:
            body["team"] = args.team
        if args.models:
            body["models"] = args.models
        return _shown_once(client.call("POST", "/admin/keys", body))

    return _run(args, direct, remote)


def _keys_list(args: argparse.Namespace) -> int:
    async def direct(settings: Settings, store: Store) -> int:
        _print([k.public() for k in await store.keys()])
        return 0

    def remote(client: AdminClient) -> int:
        _print(client.listing("/admin/keys"))
        return 0

    return _run(args, direct, remote)


def _keys_revoke(args: argparse.Namespace) -> int:
    async def direct(settings: Settings, store: Store) -> int:
        record = await store.update_key(args.key_id, revoked=True)
        if record is None:
            print(f"apiyi-proxy: no key {args.key_id}", file=sys.stderr)
            return 1
        _print(record.public())
        return 0

    def remote(client: AdminClient) -> int:
        # PATCH rather than DELETE: it answers with the whole record, as printed here.
        _print(client.call("PATCH", f"/admin/keys/{args.key_id}", {"revoked": True}))
        return 0

    return _run(args, direct, remote)


def _keys_update(args: argparse.Namespace) -> int:
    async def direct(settings: Settings, store: Store) -> int:
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

    def remote(client: AdminClient) -> int:
        body = _limit_body(args, KEY_LIMIT_FIELDS)
        for name in ("name", "team", "models"):
            if getattr(args, name):
                body[name] = getattr(args, name)
        _print(client.call("PATCH", f"/admin/keys/{args.key_id}", body))
        return 0

    return _run(args, direct, remote)


def _teams_set(args: argparse.Namespace) -> int:
    async def direct(settings: Settings, store: Store) -> int:
        current = await store.team(args.name)
        base = current.limits if current else Limits()
        team = Team(args.name, _limits_from(args, base, TEAM_LIMIT_FIELDS))
        await store.put_team(team)
        _print(team.public())
        return 0

    def remote(client: AdminClient) -> int:
        body = _limit_body(args, TEAM_LIMIT_FIELDS)
        _print(client.call("PATCH", f"/admin/teams/{args.name}", body))
        return 0

    return _run(args, direct, remote)


def _usage(args: argparse.Namespace) -> int:
    """What ``GET /admin/usage`` answers: today's and this month's totals, or with
    ``--from``/``--to``/``--by``/``--period`` the history; ``--csv`` writes its rows."""
    from .errors import InvalidRequest
    from .usage import as_csv, report

    flags = {"from": args.start, "to": args.end, "by": args.by, "period": args.period}
    params = {name: value for name, value in flags.items() if value}
    if args.csv:
        params["format"] = "json"  # rows come as JSON and are written here as CSV
    params.update({name: getattr(args, name) for name in ("key", "team") if getattr(args, name)})

    def show(answer: dict[str, Any]) -> int:
        if args.csv:
            sys.stdout.write(as_csv(answer["rows"], answer["by"]))
        else:
            _print(answer)
        return 0

    async def direct(settings: Settings, store: Store) -> int:
        from .ledger import Ledger
        from .metrics import Metrics

        ledger = Ledger(store, settings, Metrics())
        try:
            _, answer = await report(ledger, params, [m.name for m in settings.policy.models])
        except InvalidRequest as error:
            print(f"apiyi-proxy usage: {error.message}", file=sys.stderr)
            return 2
        return show(answer)

    def remote(client: AdminClient) -> int:
        return show(client.call("GET", "/admin/usage", query=params))

    return _run(args, direct, remote)
