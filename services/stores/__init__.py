"""Durable task stores behind one interface (see base.py); open_store() picks one from a URL."""
from taskwheel.stores.base import AlreadyEnded, InsertOutcome, Store, StoreUnavailable, Transition, TransitionKind
from taskwheel.stores.factory import open_store

__all__ = [
    "AlreadyEnded",
    "InsertOutcome",
    "Store",
    "StoreUnavailable",
    "Transition",
    "TransitionKind",
    "open_store",
]
