"""What a system under test implements to run in the benchmark (taskwheel, or a peer).

``perf/run_bench.py`` drives every system the same way, so that their figures compare:

1. In the harness process: ``driver = DriverClass(run_dir, options)`` then ``driver.setup()``.
   ``setup`` starts the servers and the workers and returns once workers are consuming.
   ``run_dir`` is a fresh directory the run owns; ``options`` are the ``--opt key=value``
   strings from the command line (strings; a driver documents its own keys).
   The driver is then pickled into the submitter processes: keep what they need (addresses,
   settings) in public attributes and runtime handles (Popen objects, clients, channels) in
   attributes whose names start with "_", which are not pickled.
2. ``server_pids()`` is polled every 0.5 s: ``{label: pid}`` of each server process whose
   memory counts (its RSS and peak RSS are sampled). Include worker processes when the system
   keeps pending tasks in them (Celery does); the label is what the report shows.
3. ``pending()`` is polled every 2 s (optional): the system's own count of tasks it holds that
   are not yet fired, or None when it has no cheap way to tell.
4. In each of N submitter processes (started with the "spawn" method, after ``setup``):
   ``submitter = driver.connect(index)``,
   then ``submitter.submit(batch)`` many times, then ``submitter.close()``. ``batch`` is a list of
   ``(task_seq, fire_at_ms)``; ``submit`` returns once the system has accepted every task of it
   (durably, as far as the system promises durability) and raises when any was refused.
   Each task must carry its ``task_seq`` and ``fire_at_ms`` to the worker (``encode_payload``).
5. Workers, in whatever process the system delivers to, call
   ``ReceiptLog.for_current_process(receipts_dir(run_dir)).record(task_seq, fire_at_ms)`` the
   moment a task is handed to them (before acking), with the time the system fired it when
   the delivery says (``fired_ms``). The log stamps the wall clock and the pid
   and appends to a per-process file that the harness reads while the run goes (progress) and
   after it (the report). Record every delivery, redeliveries included: that is how duplicates
   are counted.
6. ``teardown()`` stops everything ``setup`` started, whatever state it is in; it is called
   once, also after a failed run, and must not raise for a process that already exited.

A driver is registered in ``perf/run_bench.py``'s ``DRIVERS`` by "module:Class" path.
"""
from __future__ import annotations

import abc
import os
import struct
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

# One record per submitted task, written by the load generator's submitter processes.
# ``phase`` indexes Scenario.phases; ``submitted_ms`` is when submit() returned for its batch.
SUBMIT_DTYPE = np.dtype([("seq", "<i8"), ("fire_at_ms", "<i8"), ("submitted_ms", "<f8"),
                         ("phase", "<i4")])
# One record per delivery, written by the system's workers. ``fired_ms`` is when the system
# says it fired the task (taskwheel's Delivery.fired_at), NaN when it does not say: it splits
# the lateness into the scheduler's share and the delivery's.
RECEIPT_DTYPE = np.dtype([("seq", "<i8"), ("fire_at_ms", "<i8"), ("received_ms", "<f8"),
                          ("pid", "<i4"), ("fired_ms", "<f8")])
_UNKNOWN = float("nan")

_PAYLOAD = struct.Struct("<qq")


def encode_payload(task_seq: int, fire_at_ms: int) -> bytes:
    """The 16 bytes a task carries so that its worker can record it."""
    return _PAYLOAD.pack(task_seq, fire_at_ms)


def decode_payload(payload: bytes) -> tuple[int, int]:
    return _PAYLOAD.unpack_from(payload)


def receipts_dir(run_dir: Path | str) -> Path:
    return Path(run_dir) / "receipts"


def submits_dir(run_dir: Path | str) -> Path:
    return Path(run_dir) / "submits"


class Submitter(abc.ABC):
    """A client of the system under test, living in one submitter process."""

    @abc.abstractmethod
    def submit(self, batch: Sequence[tuple[int, int]]) -> None:
        """Submit ``(task_seq, fire_at_ms)`` tasks; return when all are accepted."""

    def close(self) -> None:
        """Release connections."""


class Driver(abc.ABC):
    """The system under test as the harness sees it. See the module docstring for the contract."""

    name: str = "?"

    def __init__(self, run_dir: Path, options: dict[str, str] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.options = dict(options or {})

    def __getstate__(self) -> dict:
        # Submitter processes get the configuration, never the runtime handles.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    @abc.abstractmethod
    def setup(self) -> None:
        """Start servers and workers; return once workers consume."""

    @abc.abstractmethod
    def connect(self, index: int = 0) -> Submitter:
        """A submitter for the calling process (called in each submitter process, ``index``
        counting them from 0)."""

    @abc.abstractmethod
    def server_pids(self) -> dict[str, int]:
        """{label: pid} of the processes whose memory the report shows."""

    def pending(self) -> int | None:
        """Tasks the system holds that have not fired yet, if it can tell cheaply."""
        return None

    def describe(self) -> dict[str, str]:
        """Versions and settings recorded with the results."""
        return {}

    @abc.abstractmethod
    def teardown(self) -> None:
        """Stop everything setup started; never raises for already-exited processes."""


class ReceiptLog:
    """Appends delivery records to ``<dir>/<pid>.bin``; safe to use from several threads.

    Records are buffered and written with one ``os.write`` at most every 0.1 s (or 4096
    records); a daemon thread flushes a quiet buffer within 0.2 s, so the harness sees every
    record shortly after it happens even when the worker is killed rather than stopped.
    """

    _current: "ReceiptLog | None" = None
    _current_lock = threading.Lock()

    FLUSH_RECORDS = 4096
    FLUSH_SECONDS = 0.1

    def __init__(self, directory: Path | str) -> None:
        self.pid = os.getpid()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{self.pid}.bin"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._buffer: list[tuple[int, int, float, int, float]] = []
        self._lock = threading.Lock()
        self._last_flush = time.monotonic()
        self._flusher = threading.Thread(target=self._flush_periodically, daemon=True,
                                         name="receipt-flusher")
        self._flusher.start()

    @classmethod
    def for_current_process(cls, directory: Path | str) -> "ReceiptLog":
        """The process's log, opened anew in a forked child (each pid writes its own file)."""
        log = cls._current
        if log is None or log.pid != os.getpid():
            with cls._current_lock:
                log = cls._current
                if log is None or log.pid != os.getpid():
                    log = cls._current = cls(directory)
        return log

    def record(self, task_seq: int, fire_at_ms: int, received_ms: float | None = None,
               fired_ms: float = _UNKNOWN) -> None:
        if received_ms is None:
            received_ms = time.time() * 1000.0
        with self._lock:
            self._buffer.append((task_seq, fire_at_ms, received_ms, self.pid, fired_ms))
            if (len(self._buffer) >= self.FLUSH_RECORDS
                    or time.monotonic() - self._last_flush >= self.FLUSH_SECONDS):
                self._flush_locked()

    def record_many(self, records: Sequence[tuple[int, int]],
                    fired_ms: Sequence[float] | None = None) -> None:
        """Record a batch delivered at one instant (a gRPC message of several deliveries);
        ``fired_ms``, when given, lines up with ``records``."""
        now = time.time() * 1000.0
        pid = self.pid
        with self._lock:
            if fired_ms is None:
                self._buffer.extend((seq, fire_at, now, pid, _UNKNOWN) for seq, fire_at in records)
            else:
                self._buffer.extend((seq, fire_at, now, pid, fired)
                                    for (seq, fire_at), fired in zip(records, fired_ms, strict=True))
            if (len(self._buffer) >= self.FLUSH_RECORDS
                    or time.monotonic() - self._last_flush >= self.FLUSH_SECONDS):
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        data = np.array(self._buffer, dtype=RECEIPT_DTYPE).tobytes()
        self._buffer.clear()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def _flush_periodically(self) -> None:
        while True:
            time.sleep(0.2)
            if os.getpid() != self.pid:
                return  # a forked copy of this thread never runs, but be explicit
            self.flush()


def read_records(directory: Path | str, dtype: np.dtype) -> np.ndarray:
    """Every complete record in the directory's ``*.bin`` files, concatenated."""
    parts = []
    for path in sorted(Path(directory).glob("*.bin")):
        raw = path.read_bytes()
        usable = len(raw) - len(raw) % dtype.itemsize
        parts.append(np.frombuffer(raw[:usable], dtype=dtype))
    if not parts:
        return np.empty(0, dtype=dtype)
    return np.concatenate(parts)


def count_records(directory: Path | str, dtype: np.dtype) -> int:
    """Records written so far (from file sizes: cheap enough for a progress bar)."""
    total = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.endswith(".bin"):
                    total += entry.stat().st_size // dtype.itemsize
    except FileNotFoundError:
        return 0
    return total
