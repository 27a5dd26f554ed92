"""Dispatch's memory of the tasks it finished lately, so that a row of one that fires in the race
with its ack (a lease row read by the loader before the ack was written) is dropped, not
delivered again."""
from __future__ import annotations

from taskwheel.dispatch.leases import FinishedGeneration

MS_BITS = 44  # an entry is gen << MS_BITS | finished at (ms): wall-clock ms fit until the year 2527


class FinishedMemory:
    """task_id -> gen << MS_BITS | finished at ms, for the tasks finished in the last
    ``memory_ms`` (at most ``memory_ms / GENERATIONS`` more): one int, not a tuple, since a
    tuple stays tracked by the cyclic GC and minutes of finished tasks would make every
    collection walk millions of them.

    In GENERATIONS dicts by time, not one: a dict that grows past its table, or whose deletes
    fill it with dummies, is rebuilt whole in one call, which stalls the event loop for tens
    of milliseconds at a million entries (two minutes of acks at 10K/s). A generation is only
    added to, so it grows to rate x memory_ms / GENERATIONS entries at most and is never
    rebuilt by deletes (and is itself split 64 ways, so it grows a 64th at a time); one past
    the memory is dropped whole and emptied a chunk per call, instead of a delete per task.
    The price: a task not found is looked up in every generation (GENERATIONS + 1 dicts),
    which is every fired task: each generation is a FinishedGeneration, whose Bloom filter
    answers most of those misses without touching the dict (sized at 5/4 of the generation
    before it, since acks come at about the same rate)."""

    GENERATIONS = 8
    _EMPTIED_PER_CALL = 4096  # entries of dropped generations freed per forget_before, at least

    __slots__ = ("_span", "_starts", "_newest_first", "_dropped")
    _MIN_CAPACITY = 65536  # keys a new generation's filter is sized for, at least

    def __init__(self, memory_ms: int) -> None:
        self._span = max(1, memory_ms // self.GENERATIONS)
        # The generations newest first, and when each began, in the same order.
        self._newest_first: list[FinishedGeneration] = []
        self._starts: list[int] = []
        self._dropped: list[FinishedGeneration] = []

    def adding(self, now: int) -> FinishedGeneration:
        """The generation to add the tasks finished at ``now`` to."""
        if not self._starts or now >= self._starts[0] + self._span:
            last = len(self._newest_first[0]) if self._newest_first else 0
            self._starts.insert(0, now)
            self._newest_first.insert(0, FinishedGeneration(max(self._MIN_CAPACITY, last * 5 // 4)))
        return self._newest_first[0]

    def newest_first(self) -> list[FinishedGeneration]:
        """The generations to look a task up in, in this order (the first hit is its latest
        finish); the hot path loops over them itself instead of calling get per task. One list,
        changed in place, so a caller holding it sees a task finished while it loops."""
        return self._newest_first

    def get(self, task_id: str) -> int:
        """The task's latest entry, or 0."""
        for entries in self._newest_first:
            fin = entries.get(task_id)
            if fin is not None:
                return fin
        return 0

    def forget_before(self, horizon: int, added: int) -> None:
        """Drops the generations whose every entry finished before ``horizon``, and frees a
        chunk of the entries of those dropped before: at least twice the ``added`` since the
        last call, so freeing keeps up with acks however many an ack message carries."""
        starts = self._starts
        while starts and starts[-1] + self._span <= horizon:
            starts.pop()
            self._dropped.append(self._newest_first.pop())
        dropped = self._dropped
        left = max(self._EMPTIED_PER_CALL, 2 * added)
        while dropped and left:
            left -= dropped[-1].drain(left)
            if left:  # it had fewer than asked for: it is empty now
                dropped.pop()

    def __iter__(self):
        """The task ids remembered (a task finished twice appears twice)."""
        for entries in self._newest_first:
            yield from entries
