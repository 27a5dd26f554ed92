"""Dispatch: streams fired tasks to workers and records their leases, acks and retries.

service.py holds dispatch itself (its tables, workers and loops), servicer.py its RPCs,
writer.py its transition writer, finished.py its memory of finished tasks, and the compiled
leases.pyx and deliveries.pyx the loops that run once per task."""
from taskwheel.dispatch.service import DispatchService
from taskwheel.dispatch.servicer import DispatchInternalServicer, DispatchServicer

__all__ = ["DispatchInternalServicer", "DispatchService", "DispatchServicer"]
