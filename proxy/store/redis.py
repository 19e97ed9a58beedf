"""``redis://``, ``rediss://``, ``redis+cluster://``, ``redis+sentinel://``: the shared store.

Data, all under ``store.key_prefix`` (``apiyi``). ``{g}`` is a key's group hash tag:
``{t:<team>}`` for a key in a team, ``{k:<key id>}`` for one without, so that one
script can touch a key, its team and their money in one cluster slot.

    apiyi:{g}:key:<id>              hash   the key record (limits, revoked, team)
    apiyi:{g}:team                  hash   team budgets
    apiyi:{g}:u:<scope>:<name>:<p>  hash   held, spent, uncertain, requests per period
    apiyi:{g}:hold:<id>             hash   one hold: amount, periods, state, deadline
                                           (leased, renewed), its linked claim
    apiyi:{g}:holds                 zset   open holds by deadline (expiry sweep)
    apiyi:{g}:active:<key id>       zset   a key's open holds (concurrency)
    apiyi:{g}:tat:<key id>          string GCRA theoretical arrival time (ms)
    apiyi:{g}:alerted:<scope>:<name>:<p>  hash  budget thresholds reported in a period
    apiyi:{g}:idem:<scope>          hash   idempotency record (fingerprint, state, owner)
    apiyi:{g}:idem:<scope>:gone:<o> string owner o abandoned before its claim arrived
    apiyi:keyhash:<hmac>            string "<g>|<id>": lookup by presented key
    apiyi:keygroups                 hash   key id -> group
    apiyi:groups, apiyi:teams       sets   for listing
    apiyi:changed                   channel hashes of changed key records (for caches)
    apiyi:activegroups              zset   groups with open holds, by when last noted
                                           (the expiry sweep visits only these)
    apiyi:requests                  stream the per-request log (``redis_requests.py``)
    apiyi:{res}:...                        replay bodies, capped (``proxy/results.py``)

A limit is stored in micro-dollars (or as a count); a limit left out is no limit, and
0 allows nothing. Records written before that rule stored 0 for no limit: every
record now carries ``format`` = ``2``, and one without it is read the old way, so an
upgrade never blocks every key.

The money steps are the Lua scripts in ``proxy/lua`` (``common.lua`` prepended),
loaded once and called by EVALSHA; every call is one round trip. On a single-node
store they go over one pipelined connection of their own (``resp.py``); everything
else, and clusters and sentinels, use redis-py.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
from redis.exceptions import RedisError

from ..config import REQUEST_LOG_MAX_SHARED, StoreSettings
from ..limits import Limits
from ..redis_url import RedisTarget
from .base import (
    ALERT_MARK_SECONDS,
    Crossing,
    HoldRequest,
    IdemRecord,
    IdemState,
    KeyRecord,
    Periods,
    Refusal,
    Reservation,
    Settlement,
    Spend,
    Store,
    StoreError,
    Tally,
    Team,
    group_of,
    hold_group,
)
from .invalidation import Invalidations, channel
from .redis_active import ActiveGroups
from .redis_client import close_client, connect, connect_node, load_script, translated
from .redis_records import key_fields, key_record, script_fields, team_fields, team_record
from .redis_requests import RequestStream
from .requests import RequestRecord
from .resp import MultiplexedConnection

EXPIRE_BATCH = 200
HISTORY_CELLS = 1024  # counters one history call reads, at most (about 5 ms of Redis)
HISTORY_PIPELINE = 256  # history calls sent at once


class RedisStore(Store):
    def __init__(
        self,
        client: Any,
        prefix: str = "apiyi",
        max_connections: int = 64,
        scripts: MultiplexedConnection | None = None,
        subscriber: Callable[[], Any] | None = None,
        request_log_max: int = REQUEST_LOG_MAX_SHARED,
    ) -> None:
        self.r = client
        self.p = prefix
        self.changes = channel(prefix)
        self._subscriber = subscriber  # opens a client to subscribe to ``changes`` with
        self.slots = asyncio.Semaphore(max_connections)
        # The money scripts' own connection (single-node stores); else redis-py's.
        self._scripts = scripts
        self._reserve = client.register_script(load_script("reserve"))
        self._settle = client.register_script(load_script("settle"))
        self._expire = client.register_script(load_script("expire"))
        self._idem_begin = client.register_script(load_script("idem_begin"))
        self._idem_abandon = client.register_script(load_script("idem_abandon"))
        self._idem_consume = client.register_script(load_script("idem_consume"))
        self._renew = client.register_script(load_script("renew"))
        self._key_lookup = client.register_script(load_script("key_lookup"))
        self._seed_team = client.register_script(load_script("seed_team"))
        self._forget_key = client.register_script(load_script("forget_key"))
        self._key_write = client.register_script(load_script("key_write"))
        self._alert_thresholds = client.register_script(load_script("alert_thresholds"))
        self._history = client.register_script(load_script("history"))
        self._groups: dict[str, str] = {}
        self._active = ActiveGroups(client, prefix)
        self._requests = RequestStream(client, prefix, request_log_max)

    @classmethod
    def from_settings(cls, settings: StoreSettings) -> RedisStore:
        scheme = settings.url.partition("://")[0]
        # Key changes are heard on a connection of their own, however the store is reached.
        subscriber = functools.partial(connect, settings.url, settings, decode=False)
        log_max = settings.request_log_cap
        if scheme not in ("redis", "rediss"):
            client = connect(settings.url, settings)
            return cls(
                client,
                settings.key_prefix,
                settings.max_connections,
                subscriber=subscriber,
                request_log_max=log_max,
            )
        # One reading of the URL for both connections: same server, database and TLS.
        target = RedisTarget.from_url(settings.url)
        scripts = MultiplexedConnection(target, settings.timeout_seconds)
        client = connect_node(target, settings)
        return cls(
            client, settings.key_prefix, settings.max_connections, scripts, subscriber, log_max
        )

    def invalidations(self) -> Invalidations | None:
        if self._subscriber is None:
            return None
        return Invalidations(self._subscriber, self.changes)

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """One script call, one round trip."""
        if self._scripts is not None:
            return await self._scripts.evalsha(script.sha, script.script, keys, args)
        async with self.slots:
            try:
                return await script(keys=keys, args=args)
            except (RedisError, OSError) as exc:
                raise StoreError(f"{type(exc).__name__}: {exc}") from exc

    def _base(self, group: str) -> str:
        return f"{self.p}:{{{group}}}:"

    # keys --------------------------------------------------------------------
    @translated
    async def add_key(self, record: KeyRecord) -> None:
        group = group_of(record.id, record.team)
        base = self._base(group)
        await self._write_record(base + "key:" + record.id, key_fields(record))
        await self.r.hset(f"{self.p}:keygroups", record.id, group)
        await self.r.sadd(f"{self.p}:groups", group)
        await self.r.set(f"{self.p}:keyhash:{record.key_hash}", f"{group}|{record.id}")
        self._groups[record.id] = group

    async def key_by_hash(self, key_hash: str) -> KeyRecord | None:
        if self._scripts is not None:  # one round trip on the scripts' connection
            flat = await self._run(self._key_lookup, [f"{self.p}:keyhash:{key_hash}"], [self.p])
            return key_record(dict(zip(flat[::2], flat[1::2], strict=True)))
        return await self._key_by_hash(key_hash)

    @translated
    async def _key_by_hash(self, key_hash: str) -> KeyRecord | None:
        ref = await self.r.get(f"{self.p}:keyhash:{key_hash}")
        if not ref:
            return None
        group, _, key_id = ref.partition("|")
        return key_record(await self.r.hgetall(self._base(group) + "key:" + key_id))

    async def _group(self, key_id: str) -> str | None:
        group = self._groups.get(key_id)
        if group is None:
            group = await self.r.hget(f"{self.p}:keygroups", key_id)
            if group:
                self._groups[key_id] = group
        return group

    @translated
    async def key(self, key_id: str) -> KeyRecord | None:
        return await self._read_key(key_id)

    async def _read_key(self, key_id: str) -> KeyRecord | None:
        group = await self._group(key_id)
        if group is None:
            return None
        return key_record(await self.r.hgetall(self._base(group) + "key:" + key_id))

    @translated
    async def keys(self) -> list[KeyRecord]:
        groups: dict[str, str] = await self.r.hgetall(f"{self.p}:keygroups")
        async with self.r.pipeline(transaction=False) as pipe:
            for key_id, group in groups.items():
                pipe.hgetall(self._base(group) + "key:" + key_id)
            answers = await pipe.execute() if groups else []
        records = [r for r in map(key_record, answers) if r is not None]
        return sorted(records, key=lambda k: (k.created, k.id))

    async def update_key(self, key_id: str, **changes: Any) -> KeyRecord | None:
        current = await self.key(key_id)
        if current is None:
            return None
        if "team" in changes and changes["team"] != current.team:
            raise ValueError("a key's team is fixed at creation")
        updated = current.with_changes(**changes)
        record = self._base(group_of(key_id, current.team)) + "key:" + key_id
        args = [self.changes, current.key_hash, *script_fields(key_fields(updated))]
        await self._run(self._key_write, [record], args)
        return updated

    async def _write_record(self, key: str, fields: dict[str, Any]) -> None:
        """Set a record's fields and drop those that are None (no limit), in one step."""
        absent = [name for name, value in fields.items() if value is None]
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={k: v for k, v in fields.items() if v is not None})
            if absent:
                pipe.hdel(key, *absent)
            await pipe.execute()

    async def forget_key(self, key_id: str, periods: Periods, hold_ids: Sequence[str] = ()) -> bool:
        group = group_of(key_id, None)  # a key of a team is never forgotten
        base = self._base(group)
        holds = [h for h in hold_ids if hold_group(h) == group]
        args = [base, key_id, periods.day, periods.month, self.changes, *holds]
        key_hash = await self._run(self._forget_key, [base + "key:" + key_id], args)
        if not key_hash:
            return False
        # The indexes outside the group's slot go once the record is gone: a lookup in
        # between finds an index pointing at nothing, as for an unknown key.
        await self._unindex(key_id, key_hash, group)
        return True

    @translated
    async def _unindex(self, key_id: str, key_hash: str, group: str) -> None:
        self._groups.pop(key_id, None)
        await self.r.delete(f"{self.p}:keyhash:{key_hash}")
        await self.r.hdel(f"{self.p}:keygroups", key_id)
        await self.r.srem(f"{self.p}:groups", group)  # the key was its group's only member
        await self._active.forget(group)

    # teams -------------------------------------------------------------------
    @translated
    async def put_team(self, team: Team) -> None:
        group = group_of("", team.name)
        await self._write_record(self._base(group) + "team", team_fields(team))
        await self.r.sadd(f"{self.p}:teams", team.name)
        await self.r.sadd(f"{self.p}:groups", group)

    async def seed_team(self, team: Team) -> bool:
        group = group_of("", team.name)
        present = {k: v for k, v in team_fields(team).items() if v is not None}
        flat = [item for pair in present.items() for item in pair]
        created = await self._run(self._seed_team, [self._base(group) + "team"], flat)
        # Listed whatever the answer: a seed that died between the two steps is completed.
        await self._list_team(team.name)
        return bool(created)

    @translated
    async def _list_team(self, name: str) -> None:
        await self.r.sadd(f"{self.p}:teams", name)
        await self.r.sadd(f"{self.p}:groups", group_of("", name))

    @translated
    async def team(self, name: str) -> Team | None:
        return await self._read_team(name)

    async def _read_team(self, name: str) -> Team | None:
        return team_record(name, await self.r.hgetall(self._base(group_of("", name)) + "team"))

    @translated
    async def teams(self) -> list[Team]:
        names = sorted(await self.r.smembers(f"{self.p}:teams"))
        teams = [await self._read_team(n) for n in names]
        return [t for t in teams if t is not None]

    # ledger ------------------------------------------------------------------
    async def reserve(self, request: HoldRequest) -> Reservation:
        group = group_of(request.key_id, request.team)
        base = self._base(group)
        p = request.periods
        args: list[Any] = [
            base,
            request.key_id,
            request.hold_id,
            request.amount,
            p.day,
            p.month,
            int(request.ttl_seconds * 1000),
            request.model,
        ]
        if request.claim is not None:
            c = request.claim
            record = self._idem_key(c.scope)
            gone = f"{record}:gone:{c.owner}"
            args += [
                record,
                gone,
                c.fingerprint,
                int(c.ttl_seconds * 1000),
                c.owner,
                "1" if c.owned else "0",
                max(1, int(c.keep_seconds * 1000)),
            ]
        answer = await self._run(self._reserve, [base + "key:" + request.key_id], args)
        if answer[0] != "ok":
            retry_ms = int(answer[1]) if len(answer) > 1 else None
            return Reservation(
                Refusal(answer[0]), retry_after=None if retry_ms is None else retry_ms / 1000
            )
        self._active.note(group)
        flat = answer[1]
        remaining = {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}
        return Reservation(team_remaining=remaining or None, claimed=answer[2] == 1)

    async def settle(
        self,
        hold_id: str,
        spent: int,
        uncertain: int = 0,
        *,
        request: HoldRequest | None = None,
    ) -> Settlement:
        base = self._base(hold_group(hold_id))
        args: list[Any] = [base, hold_id, spent, uncertain]
        if request is not None:
            p = request.periods
            args += [request.key_id, request.team or "", p.day, p.month, request.amount]
            args.append(request.model)
        done = await self._run(self._settle, [base + "hold:" + hold_id], args)
        return Settlement(int(done))

    async def release(self, hold_id: str) -> bool:
        return bool(await self.settle(hold_id, 0))  # one step: settle takes the slot

    async def renew_holds(self, hold_ids: list[str], lease_seconds: float) -> int:
        by_group: dict[str, list[str]] = {}
        for hold_id in hold_ids:
            by_group.setdefault(hold_group(hold_id), []).append(hold_id)
        lease_ms = max(1, int(lease_seconds * 1000))
        renewed = 0
        for group, ids in by_group.items():
            base = self._base(group)
            renewed += int(await self._run(self._renew, [base + "holds"], [base, lease_ms, *ids]))
        return renewed

    @translated
    async def mark_active(self, groups: list[str]) -> None:
        await self._active.mark(groups)

    @translated
    async def _active_groups(self) -> list[str]:
        return await self._active.groups()

    async def expire_holds(self) -> int:
        total = 0
        for group in await self._active_groups():
            base = self._base(group)
            total += int(await self._run(self._expire, [base + "holds"], [base, EXPIRE_BATCH]))
        return total

    @translated
    async def tally(self, scope: str, name: str, period: str) -> Tally:
        if scope == "key":
            record = await self._read_key(name)
            if record is None:
                # The record is gone (revoked and deleted, or the store lost it): its
                # money may still be here, under the group its hold ids carry.
                group = await self._group(name) or group_of(name, None)
                limits = Limits()
            else:
                group, limits = group_of(name, record.team), record.limits
        else:
            group = group_of("", name)
            team = await self._read_team(name)
            limits = team.limits if team else Limits()
        fields = await self.r.hgetall(f"{self._base(group)}u:{scope}:{name}:{period}")
        limit = limits.daily_micros if len(period) == 10 else limits.monthly_micros
        return Tally(
            limit,
            int(fields.get("held", 0)),
            int(fields.get("spent", 0)),
            int(fields.get("uncertain", 0)),
            int(fields.get("requests", 0)),
        )

    @translated
    async def history(
        self, scope: str, names: Mapping[str, Sequence[str]], periods: Sequence[str]
    ) -> dict[tuple[str, str], Spend]:
        # One script call per group and slice of names, each reading at most
        # HISTORY_CELLS counters so that no call holds the server for long. They go
        # pipelined through redis-py's pool, never on the money scripts' connection,
        # where a long report would queue the request path behind it.
        step = max(1, HISTORY_CELLS // max(1, len(periods)))
        calls = [
            (group, group_names[i : i + step])
            for group, group_names in names.items()
            for i in range(0, len(group_names), step)
        ]
        joined = " ".join(periods)
        answers: list[Any] = []
        for start in range(0, len(calls), HISTORY_PIPELINE):
            async with self.r.pipeline(transaction=False) as pipe:
                for group, part in calls[start : start + HISTORY_PIPELINE]:
                    base = self._base(group)
                    args = [base, scope, joined, *part]
                    await self._history(keys=[base + "team"], args=args, client=pipe)
                answers += await pipe.execute()
        found: dict[tuple[str, str], Spend] = {}
        for (_, part), flat in zip(calls, answers, strict=True):
            for i in range(0, len(flat), 5):
                cell = (part[flat[i] - 1], periods[flat[i + 1] - 1])
                spend = Spend(flat[i + 2], flat[i + 3], flat[i + 4])
                was = found.get(cell)
                if was is not None:  # a model kept in several groups
                    spend = Spend(*(a + b for a, b in zip(was, spend, strict=True)))
                found[cell] = spend
        return found

    @translated
    async def holds_outstanding(self) -> int:
        total = 0
        for group in await self._active_groups():
            total += int(await self.r.zcard(self._base(group) + "holds"))
        return total

    async def cross_thresholds(
        self, request: HoldRequest, thresholds: Sequence[str]
    ) -> list[Crossing]:
        base = self._base(group_of(request.key_id, request.team))
        p = request.periods
        args: list[Any] = [
            base,
            request.key_id,
            request.team or "",
            p.day,
            p.month,
            ALERT_MARK_SECONDS["day"],
            ALERT_MARK_SECONDS["month"],
            *thresholds,
        ]
        rows = await self._run(self._alert_thresholds, [base + "key:" + request.key_id], args)
        return [
            Crossing(scope, id_, name, kind, period, threshold, int(spent), int(limit))
            for scope, id_, name, kind, period, threshold, spent, limit in rows
        ]

    # idempotency -------------------------------------------------------------
    def _idem_key(self, scope: str) -> str:
        return self._base(hold_group(scope)) + "idem:" + scope

    async def idem_begin(
        self,
        scope: str,
        fingerprint: str,
        ttl_seconds: float,
        *,
        owner: str = "",
        join_only: bool = False,
    ) -> IdemRecord:
        key = self._idem_key(scope)
        answer = await self._run(
            self._idem_begin,
            [key, f"{key}:gone:{owner}"],
            [fingerprint, int(ttl_seconds * 1000), "1" if join_only else "0", owner],
        )
        state = IdemState(answer[0])
        if state in (IdemState.NEW, IdemState.MISMATCH, IdemState.IN_FLIGHT):
            return IdemRecord(state)
        headers = tuple(tuple(h) for h in orjson.loads(answer[3] or "[]"))
        return IdemRecord(state, int(answer[1]), answer[2] or None, headers)

    @translated
    async def idem_finish(self, scope: str, record: IdemRecord, ttl_seconds: float) -> None:
        key = self._idem_key(scope)
        await self.r.hset(
            key,
            mapping={
                "state": record.state.value,
                "status": record.status,
                "result": record.result_id or "",
                "headers": orjson.dumps(record.headers).decode(),
            },
        )
        await self.r.pexpire(key, int(ttl_seconds * 1000))

    async def idem_consume(self, scope: str, result_id: str) -> None:
        await self._run(self._idem_consume, [self._idem_key(scope)], [result_id])

    async def idem_abandon(self, scope: str, owner: str, ttl_seconds: float) -> None:
        key = self._idem_key(scope)
        await self._run(
            self._idem_abandon,
            [key, f"{key}:gone:{owner}"],
            [owner, max(1, int(ttl_seconds * 1000))],
        )

    # the per-request log ---------------------------------------------------------
    @translated
    async def append_requests(self, records: Sequence[RequestRecord]) -> None:
        await self._requests.append(records)

    @translated
    async def requests(
        self, key: str | None, team: str | None, limit: int, cursor: str | None
    ) -> tuple[list[RequestRecord], str | None]:
        return await self._requests.page(key, team, limit, cursor)

    # life --------------------------------------------------------------------
    @translated
    async def open(self) -> None:
        scripts = (
            self._reserve,
            self._settle,
            self._expire,
            self._idem_begin,
            self._idem_abandon,
            self._idem_consume,
            self._renew,
            self._key_lookup,
            self._seed_team,
            self._forget_key,
            self._key_write,
            self._alert_thresholds,
        )
        for script in scripts:
            # Loaded on every primary, so EVALSHA never meets NOSCRIPT under load.
            await self.r.script_load(script.script)

    @translated
    async def ping(self) -> None:
        # Ready means the request path can reach the store: both its connections.
        if self._scripts is not None:
            await self._scripts.execute("PING")
        await self.r.ping()

    async def close(self) -> None:
        await self._active.close()
        if self._scripts is not None:
            await self._scripts.close()
        await close_client(self.r)
