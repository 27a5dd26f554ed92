"""PendingTasks in plain Python, a test oracle: the timer's two dicts as the timer once kept them.
The tests run the same behaviours against it and the compiled taskwheel.timer.pending."""
from __future__ import annotations

from typing import Any, Iterable


class ReferencePendingTasks:
    """PendingTasks in Python: the timer's bookkeeping as it was before it was compiled."""

    def __init__(self, wheel: Any) -> None:
        if len(wheel):
            raise ValueError("the wheel must be empty: keys already in it would have no record")
        self.wheel = wheel
        self._records: dict[int, Any] = {}
        self._keys: dict[str, int] = {}
        self._next_key = 1

    def admit(self, records: Iterable[Any], skip: Any = None) -> int | None:
        keys: list[int] = []
        deadlines: list[int] = []
        for rec in records:
            if skip and rec.task_id in skip:
                continue
            key = self._keys.get(rec.task_id)
            if key is not None:
                if self._records[key].gen >= rec.gen:
                    continue
            else:
                key = self._next_key
                self._next_key += 1
                self._keys[rec.task_id] = key
            self._records[key] = rec
            keys.append(key)
            deadlines.append(rec.due_ms)
        if not keys:
            return None
        self.wheel.schedule_many(keys, deadlines)
        return min(deadlines)

    def fire(self, now_ms: int) -> list[Any]:
        fired = [self._records.pop(key) for key in self.wheel.advance(now_ms)]
        for rec in fired:
            del self._keys[rec.task_id]
        return fired

    def forget(self, task_ids: Iterable[str]) -> int:
        keys = []
        for task_id in task_ids:
            key = self._keys.pop(task_id, None)
            if key is not None:
                del self._records[key]
                keys.append(key)
        if keys:
            self.wheel.cancel_many(keys)
        return len(keys)

    def get(self, task_id: str) -> Any:
        key = self._keys.get(task_id)
        return None if key is None else self._records[key]

    def records(self) -> list[Any]:
        return list(self._records.values())

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._keys
