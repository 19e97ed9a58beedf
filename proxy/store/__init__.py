"""Store backends, chosen by the URL scheme of ``store.url``."""

from __future__ import annotations

from ..config import StoreSettings
from ..limits import Limits
from .base import (
    ClaimRequest,
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
    keys_by_group,
)
from .memory import MemoryStore
from .requests import BadCursor, RequestRecord

__all__ = [
    "BadCursor",
    "ClaimRequest",
    "Crossing",
    "HoldRequest",
    "IdemRecord",
    "IdemState",
    "KeyRecord",
    "Limits",
    "MemoryStore",
    "Periods",
    "Refusal",
    "RequestRecord",
    "Reservation",
    "Settlement",
    "Spend",
    "Store",
    "StoreError",
    "Tally",
    "Team",
    "group_of",
    "hold_group",
    "keys_by_group",
    "open_store",
]


def open_store(settings: StoreSettings) -> Store:
    scheme = settings.url.partition("://")[0]
    if scheme == "memory":
        return MemoryStore(request_log_max=settings.request_log_cap)
    from .redis import RedisStore  # the redis client loads only when a Redis store is used

    return RedisStore.from_settings(settings)
