"""Plain-Python models of the compiled core, used only as test oracles.

They favour being obviously correct over being fast: ReferenceWheel keeps every pending key
in a dict and a heap of (deadline, schedule number, key); ReferenceBatcher keeps a dict of
lists; ReferenceRecordShape builds an instance with object.__new__ and setattr (it cannot take
it out of the GC's view, which the compiled one does). The tests run the same behaviours
against these and the compiled classes. The models of the loops one service owns sit beside
them (taskwheel.timer.reference, taskwheel.dispatch.reference,
taskwheel.stores.sqlite.reference).
"""
from __future__ import annotations

import heapq
import operator
import time
from array import array
from typing import Any, Hashable, Iterable

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1


def _int64(value: object, name: str) -> int:
    try:
        value = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
    if not INT64_MIN <= value <= INT64_MAX:
        raise OverflowError(f"{name} {value} does not fit in int64")
    return int(value)


def _int64s(values: object, name: str) -> list[int]:
    if isinstance(values, (list, tuple)):
        return array("q", values).tolist()  # TypeError / OverflowError like the compiled wheel
    try:
        view = memoryview(values)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int64 buffer or a list of ints, "
                        f"not {type(values).__name__}") from None
    if view.ndim != 1 or view.itemsize != 8 or view.format.lstrip("@=<") not in ("q", "l"):
        raise TypeError(f"{name} must be a one-dimensional int64 buffer, not format {view.format!r}")
    return view.tolist()


class ReferenceWheel:
    """Same behaviour as taskwheel.core.TimingWheel, in the simplest possible way."""

    def __init__(self, tick_ms: int = 1, start_ms: int | None = None) -> None:
        tick_ms = _int64(tick_ms, "tick_ms")
        if tick_ms <= 0:
            raise ValueError(f"tick_ms must be positive, got {tick_ms}")
        if start_ms is None:
            start_ms = time.time_ns() // 1_000_000
        self.tick_ms = tick_ms
        self._now = _int64(start_ms, "start_ms")
        self._pending: dict[int, tuple[int, int]] = {}  # key -> (deadline, schedule number)
        self._heap: list[tuple[int, int, int]] = []  # may hold cancelled and moved entries
        self._scheduled = 0

    @property
    def now_ms(self) -> int:
        return self._now

    def schedule(self, key: int, deadline_ms: int) -> None:
        key = _int64(key, "key")
        deadline_ms = _int64(deadline_ms, "deadline_ms")
        self._scheduled += 1
        self._pending[key] = (deadline_ms, self._scheduled)
        heapq.heappush(self._heap, (deadline_ms, self._scheduled, key))

    def schedule_many(self, keys: Any, deadlines: Any) -> None:
        ks = _int64s(keys, "keys")
        ds = _int64s(deadlines, "deadlines")
        if len(ks) != len(ds):
            raise ValueError(f"keys and deadlines differ in length: {len(ks)} != {len(ds)}")
        for key, deadline in zip(ks, ds):
            self.schedule(key, deadline)

    def cancel(self, key: int) -> bool:
        return self._pending.pop(_int64(key, "key"), None) is not None

    def cancel_many(self, keys: Any) -> int:
        return sum(self.cancel(key) for key in _int64s(keys, "keys"))

    def advance(self, now_ms: int) -> array[int]:
        now_ms = _int64(now_ms, "now_ms")
        fired = []
        while self._heap and self._heap[0][0] <= now_ms:
            deadline, number, key = heapq.heappop(self._heap)
            if self._pending.get(key) == (deadline, number):
                del self._pending[key]
                fired.append(key)
        self._now = max(self._now, now_ms)
        return array("q", fired)

    def next_deadline(self) -> int | None:
        return min((deadline for deadline, _ in self._pending.values()), default=None)

    def deadline_of(self, key: int) -> int | None:
        entry = self._pending.get(_int64(key, "key"))
        return None if entry is None else entry[0]

    def __contains__(self, key: object) -> bool:
        try:
            return operator.index(key) in self._pending  # type: ignore[arg-type]
        except TypeError:
            return False

    def __len__(self) -> int:
        return len(self._pending)


class ReferenceBatcher:
    """Same behaviour as taskwheel.core.Batcher: a dict of (first_ms, items) per partition."""

    def __init__(self, max_items: int, max_delay_ms: int) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        if max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must not be negative, got {max_delay_ms}")
        self.max_items = max_items
        self.max_delay_ms = max_delay_ms
        self._groups: dict[Hashable, tuple[int, int, list[Any]]] = {}  # (first_ms, opened, items)
        self._opened = 0

    def add(self, partition: Hashable, item: Any, now_ms: int) -> tuple[Hashable, list[Any]] | None:
        if partition not in self._groups:
            self._opened += 1
            self._groups[partition] = (now_ms, self._opened, [])
        items = self._groups[partition][2]
        items.append(item)
        if len(items) >= self.max_items:
            del self._groups[partition]
            return partition, items
        return None

    def add_many(self, partitions: Iterable[Hashable], items: Iterable[Any],
                 now_ms: int) -> list[tuple[Hashable, list[Any]]]:
        ps, xs = list(partitions), list(items)
        if len(ps) != len(xs):
            raise ValueError(f"partitions and items differ in length: {len(ps)} != {len(xs)}")
        full = [self.add(p, x, now_ms) for p, x in zip(ps, xs)]
        return [batch for batch in full if batch is not None]

    def _oldest_first(self) -> list[Hashable]:
        return sorted(self._groups, key=lambda p: self._groups[p][:2])

    def due(self, now_ms: int) -> list[tuple[Hashable, list[Any]]]:
        due = [p for p in self._oldest_first() if now_ms - self._groups[p][0] >= self.max_delay_ms]
        return [(p, self._groups.pop(p)[2]) for p in due]

    def drain(self) -> list[tuple[Hashable, list[Any]]]:
        return [(p, self._groups.pop(p)[2]) for p in self._oldest_first()]

    def next_flush_ms(self) -> int | None:
        if not self._groups:
            return None
        return min(min(first for first, _, _ in self._groups.values()) + self.max_delay_ms, INT64_MAX)

    @property
    def groups(self) -> int:
        return len(self._groups)

    def __len__(self) -> int:
        return sum(len(items) for _, _, items in self._groups.values())


class ReferenceRecordShape:
    """RecordShape in Python: the same checks, slots set with setattr."""

    def __init__(self, kind: type, fields: Iterable[str], converters: Any = None,
                 defaults: Any = None) -> None:
        self._defaults = dict(defaults or {})
        names = tuple(fields) + tuple(self._defaults)
        if getattr(kind, "__new__") is not object.__new__ or hasattr(kind, "__post_init__"):
            raise TypeError(f"{kind.__name__} has its own __new__ or __post_init__: call it instead")
        slots: set[str] = set()
        for klass in kind.__mro__:
            declared = klass.__dict__.get("__slots__", ())
            slots.update((declared,) if isinstance(declared, str) else declared)
        if set(names) != slots or len(set(names)) != len(names):
            raise TypeError(f"fields and defaults must name each slot of {kind.__name__} once: "
                            f"{sorted(slots)}")
        names = names[:len(names) - len(self._defaults)]
        for name in names:
            if type(getattr(kind, name)).__name__ != "member_descriptor":
                raise TypeError(f"{kind.__name__}.{name} is not a slot")
        converters = [None] * len(names) if converters is None else list(converters)
        if len(converters) != len(names):
            raise ValueError(f"{len(converters)} converters for {len(names)} fields")
        for name, converter in zip(names, converters):
            if converter is not None and not isinstance(converter, dict) and not callable(converter):
                raise TypeError(f"the converter of {name} is neither a dict nor callable")
        self.kind, self.fields, self.count, self._converters = kind, names, len(names), converters

    def copy(self, obj: Any) -> Any:
        if type(obj) is not self.kind:
            raise TypeError(f"copy takes a {self.kind.__name__}, not {type(obj).__name__}")
        new = self.build([getattr(obj, name) for name in self.fields])
        for name in self._defaults:
            setattr(new, name, getattr(obj, name))
        return new

    def build(self, values: Any) -> Any:
        if len(values) != self.count:
            raise ValueError(f"{len(values)} values for {self.count} fields")
        obj: Any = object.__new__(self.kind)
        for name, value in self._defaults.items():
            setattr(obj, name, value)
        for name, converter, value in zip(self.fields, self._converters, values):
            if converter is not None:
                value = converter[value] if type(converter) is dict else converter(value)
            setattr(obj, name, value)
        return obj
