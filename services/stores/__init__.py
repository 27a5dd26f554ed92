"""Durable task stores behind one interface (see base.py); open_store() picks one from a URL."""
from taskwheel.stores.base import (
    AlreadyEnded,
    InsertOutcome,
    Store,
    StoreUnavailable,
    TaskRecord,
    TaskState,
    Transition,
    TransitionKind,
    TERMINAL_STATES,
    bucket_of,
)
from taskwheel.stores.factory import open_store

__all__ = [
    "AlreadyEnded",
    "InsertOutcome",
    "Store",
    "StoreUnavailable",
    "TaskRecord",
    "TaskState",
    "Transition",
    "TransitionKind",
    "TERMINAL_STATES",
    "bucket_of",
    "open_store",
]
