"""Ingest: validates submitted tasks, makes them durable in batches, and offers the ones due
soon to the timer."""
from taskwheel.ingest.servicer import IngestServicer

__all__ = ["IngestServicer"]
