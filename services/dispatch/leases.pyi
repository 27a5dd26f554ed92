from typing import Any, Iterable, Iterator, SupportsIndex

from taskwheel.core import RecordShape

class Fired:
    """A fired task in dispatch: waiting for a worker, then its delivery's lease (see leases.pyx)."""

    record: Any
    batches: list[Any]
    since: int
    fired_at: int
    held_gen: int
    written: bool
    gen: int
    due_ms: int
    consumer: Any
    delivery_id: str | None
    def __init__(
        self, record: Any, batches: list[Any], since: SupportsIndex, fired_at: SupportsIndex
    ) -> None: ...

class FinishedGeneration:
    """Finished tasks of one span of time, a dict with a Bloom filter in front (see leases.pyx)."""

    @property
    def entries(self) -> dict[str, int]: ...
    @property
    def bytes(self) -> int: ...
    def __init__(self, capacity: SupportsIndex = 65536) -> None: ...
    def may_hold(self, task_id: str) -> bool: ...
    def __setitem__(self, task_id: str, value: int) -> None: ...
    def __getitem__(self, task_id: str) -> int: ...
    def get(self, task_id: str, default: int | None = None) -> int | None: ...
    def __contains__(self, task_id: object) -> bool: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[str]: ...
    def popitem(self) -> tuple[str, int]: ...
    def update(self, pairs: Iterable[tuple[str, int]]) -> None: ...

def take_fired(
    records: list[Any], now: SupportsIndex, fired_at: SupportsIndex, batch: Any,
    finished: list[FinishedGeneration], leases: dict[str, Fired], waiting: dict[str, Fired],
    queues: dict[str, Any], unheld: list[str], touched: set[Any], slow: Any,
    record: RecordShape | None = None,
) -> int: ...
def fill(
    ready: Any, waiting: dict[str, Fired], leases: dict[str, Fired], consumer: Any,
    in_flight: dict[str, Fired], room: SupportsIndex, now: SupportsIndex, shortest_lease_ms: SupportsIndex,
    record: RecordShape | None = None,
) -> tuple[list[Fired], int]: ...
def settle_acks(
    delivery_ids: Iterable[str], in_flight: dict[str, Fired], leases: dict[str, Fired],
    finished: FinishedGeneration, now: SupportsIndex, transition: RecordShape,
    succeed: Any, elsewhere: Any, traced: list[Fired] | None = None, record: RecordShape | None = None,
) -> tuple[list[Any], list[list[Any]], list[str], int]: ...
