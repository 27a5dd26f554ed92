"""Dispatch: streams fired tasks to workers, tracks leases, acks, nacks and redelivery."""
from taskwheel.dispatch.servicer import DispatchService

__all__ = ["DispatchService"]
