"""Where resources live: one protocol, two implementations (embedded SQLite, etcd)."""

from controller.store.base import (
    AlreadyExists,
    Conflict,
    NotFound,
    Op,
    Store,
    StoreError,
    StoreUnavailable,
    WatchEvent,
)

__all__ = [
    "AlreadyExists",
    "Conflict",
    "NotFound",
    "Op",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "WatchEvent",
]
