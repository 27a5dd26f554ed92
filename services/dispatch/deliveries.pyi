from typing import Any, Protocol

from taskwheel.core import RecordShape

class _DeliveredTask(Protocol):
    task_id: str
    queue: str
    payload: bytes
    fire_at_ms: int
    attempt: int
    max_attempts: int
    headers: dict[str, str]
    traceparent: str

class _Delivery(Protocol):
    @property
    def record(self) -> _DeliveredTask: ...
    delivery_id: str
    fired_at: int
    due_ms: int

def encode_deliveries(sent: list[Any], traceparents: list[str] | None = None,
                      record: RecordShape | None = None) -> bytes:
    """The bytes of one taskwheel.v1.ConsumeResponse, a delivery per item (see _Delivery);
    ``record``, a RecordShape of the records' type, has their fields read from their slots."""
