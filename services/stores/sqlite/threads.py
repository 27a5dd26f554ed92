"""The embedded store's own threads and background jobs: how each thread starts (its name and
priority), the WAL checkpointer and its settings, and ``Every``, which starts purging and
promoting."""
from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import sys
import threading
import time
from typing import Any, Callable

from taskwheel.stores.base import StoreUnavailable

log = logging.getLogger(__name__)

# Checkpoints (copying the WAL back into the database file) run on their own thread, so a
# commit returns as soon as it is in the WAL. A checkpoint copies each page once however often
# it changed since the last one, so one every quarter second writes far less than SQLite's
# default (one per 4 MiB of WAL, run by the committing writer).
CHECKPOINT_EVERY_S = 0.25
WAL_AUTOCHECKPOINT_PAGES = 100_000  # the writer checkpoints itself only if that thread lags
WAL_RESTART_PAGES = 32_768  # past ~128 MiB, make the writer pause so the WAL can start over
WAL_KEEP_BYTES = 64 << 20  # a restarted WAL file is truncated back to this


def configure_wal(conn: sqlite3.Connection) -> None:
    """Leaves checkpoints to the Checkpointer on a connection that writes: the connection
    checkpoints by itself only if that thread lags, and a WAL file that started over is cut
    back to WAL_KEEP_BYTES."""
    conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
    conn.execute(f"PRAGMA journal_size_limit = {WAL_KEEP_BYTES}")


def start_store_thread(label: str, nice: int) -> None:
    """Run first on each of the store's threads. On Linux it names the thread ``label`` (at
    most 15 characters) where top -H, ps -L and perf show it, instead of the process's name
    on every thread, and gives it ``nice`` more than the process's niceness (per thread on
    Linux), so a busy core runs the event loop before the store's threads."""
    if not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        with open(f"/proc/self/task/{tid}/comm", "w") as comm:
            comm.write(label)
    except OSError as e:
        log.debug("store thread keeps its name: %s", e)
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        except OSError as e:
            log.warning("store thread keeps its priority: %s", e)


class Checkpointer:
    """A thread that copies committed WAL pages into the database file, a few times a second
    while writes come in and not at all while none do."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], description: str, nice: int):
        self._connect = connect
        self._description = description
        self._nice = nice
        self._written = threading.Event()
        self._stopping = threading.Event()
        self.restart_wanted = False
        self._thread = threading.Thread(
            target=self._run, name="taskwheel-sqlite-checkpoint", daemon=True
        )
        self._thread.start()

    def wake(self) -> None:
        self._written.set()

    def restart_if_wanted(self, writer: sqlite3.Connection) -> None:
        """Called by the writer between transactions. PASSIVE checkpoints copy up to the last
        commit but cannot rewind a WAL that is written without pause; only a checkpoint that
        holds off writers can. The writer runs it itself, between two of its own transactions,
        so there is no writer to wait for, and the copying is mostly done already."""
        if self.restart_wanted:
            try:
                busy, _, _ = writer.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
                self.restart_wanted = bool(busy)  # readers in the way: try after the next write
            except sqlite3.Error as e:
                log.warning("%s: checkpoint failed: %s", self._description, e)

    def stop(self) -> None:
        self._stopping.set()
        self._written.set()
        self._thread.join()

    def _run(self) -> None:
        start_store_thread("tw-sqlite-ckpt", self._nice)
        try:
            conn = self._connect()
        except StoreUnavailable as e:
            log.warning("%s: no background checkpoints: %s", self._description, e)
            return
        try:
            # Checked at the top as well: a stop() landing between the wait below timing out
            # and the clear has its wake-up cleared, and would leave this thread waiting for a
            # write that never comes.
            while not self._stopping.is_set():
                self._written.wait()
                if self._stopping.wait(CHECKPOINT_EVERY_S):
                    return
                self._written.clear()
                try:
                    _, wal_pages, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.restart_wanted = wal_pages > WAL_RESTART_PAGES
                except sqlite3.Error as e:
                    log.warning("%s: checkpoint failed: %s", self._description, e)
        finally:
            conn.close()


class Every:
    """A background job the store's own calls start: at most once per ``every_s`` (0: never),
    and never while the last one still runs."""

    __slots__ = ("every_s", "task", "_next_at")

    def __init__(self, every_s: float):
        self.every_s = every_s
        self.task: asyncio.Task | None = None
        self._next_at = 0.0

    def start(self, job: Callable[[], Any]) -> None:
        if not self.every_s or (self.task is not None and not self.task.done()):
            return
        now = time.monotonic()
        if now < self._next_at:
            return
        self._next_at = now + self.every_s
        self.task = asyncio.get_running_loop().create_task(job())

    async def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None
