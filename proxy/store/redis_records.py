"""How key and team records are written in Redis hashes, and read back.

A limit left out of a record is no limit. Records carry ``format``: one written before
it existed stored 0 for "no limit", and is still read that way (here and by
``reserve.lua``), so an upgrade never turns every limit into "nothing allowed".
"""

from __future__ import annotations

from typing import Any

from ..limits import Limits
from .base import KeyRecord, Team

# Marks a key or team record whose 0 allows nothing (the scripts know it too).
RECORD_FORMAT = "2"


def key_fields(record: KeyRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "name": record.name,
        "key_hash": record.key_hash,
        "last4": record.last4,
        "created": record.created,
        "team": record.team or "",
        "format": RECORD_FORMAT,
        "daily": record.limits.daily_micros,
        "monthly": record.limits.monthly_micros,
        "rpm": record.limits.rpm,
        "concurrency": record.limits.concurrency,
        "models": ",".join(record.models),
        "revoked": 1 if record.revoked else 0,
    }


def script_fields(fields: dict[str, Any]) -> list[Any]:
    """A record's fields as ``key_write.lua`` takes them: how many are set, those
    field/value pairs, then the fields to drop (limits with none)."""
    present = [
        item for name, value in fields.items() if value is not None for item in (name, value)
    ]
    absent = [name for name, value in fields.items() if value is None]
    return [len(present) // 2, *present, *absent]


def team_fields(team: Team) -> dict[str, Any]:
    return {
        "format": RECORD_FORMAT,
        "daily": team.limits.daily_micros,
        "monthly": team.limits.monthly_micros,
    }


def team_record(name: str, fields: dict[str, str]) -> Team | None:
    if not fields:
        return None
    return Team(name, Limits(_limit(fields, "daily"), _limit(fields, "monthly")))


def _limit(fields: dict[str, str], name: str) -> int | None:
    """A stored limit: absent is no limit; 0 is no limit too in a record written
    before the format mark (as reserve.lua reads it)."""
    value = fields.get(name, "")
    if value == "":
        return None
    limit = int(value)
    if limit == 0 and fields.get("format") != RECORD_FORMAT:
        return None
    return limit


def key_record(fields: dict[str, str]) -> KeyRecord | None:
    if not fields:
        return None
    return KeyRecord(
        id=fields["id"],
        name=fields["name"],
        key_hash=fields["key_hash"],
        last4=fields["last4"],
        created=int(fields["created"]),
        team=fields.get("team") or None,
        limits=Limits(
            _limit(fields, "daily"),
            _limit(fields, "monthly"),
            _limit(fields, "rpm"),
            _limit(fields, "concurrency"),
        ),
        models=tuple(m for m in fields.get("models", "").split(",") if m),
        revoked=fields.get("revoked") == "1",
    )
