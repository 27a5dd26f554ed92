"""The peer: Celery with a Redis broker, running the scenario's tasks as ETA tasks.

This is how most Python shops schedule "run this at T": ``task.apply_async(eta=T)``. The
worker fetches ETA tasks as soon as they are published, holds them in memory (Redis keeps each
one in its ``unacked`` hash meanwhile) and runs each when its ETA comes. So the worker's memory
grows with the pending tasks, and lateness is the worker's timer plus its pool's dispatch.

What the driver runs (all on 127.0.0.1, all stopped by ``teardown``):

* Debian's ``redis-server`` on a free port, its files in the run's temp dir. Persistence as a
  durable deployment would set it: ``appendonly yes``, ``appendfsync everysec`` (``--opt
  persistence=none`` turns it off); no RDB snapshots, so no fork pauses in the middle of a run.
* One ``celery worker`` process with ``--pool prefork --concurrency 2`` (Celery's default here:
  one child per core). ``--opt pool=solo`` runs the tasks in the consumer process itself.
  Gossip, mingle and heartbeats are off (one worker; they only add broker traffic).
  ``visibility_timeout`` is 2 h (default 1 h), so that no ETA task of the pending scenario
  (due up to 60 min out) is redelivered while held.
* Submitters: each submitter process its own Celery app, one producer per batch, and one
  ``apply_async(args=(seq, fire_at_ms), eta=...)`` per task (Celery has no batch publish; each
  call is one LPUSH round trip to Redis).

The task records its delivery (perf/drivers.py ReceiptLog) as the first thing it does, in the
pool process that runs it. Reported processes: ``redis-server``, ``celery worker`` (the consumer,
which holds the ETA tasks) and each pool child.

Options (``--opt key=value``): ``pool`` (prefork|solo), ``concurrency`` (pool children),
``persistence`` (aof|none), ``visibility_timeout`` (seconds), ``prefetch_multiplier``.
"""
from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import psutil
from celery import Celery

from perf.drivers import Driver, ReceiptLog, Submitter, receipts_dir

REPO = Path(__file__).resolve().parents[2]
QUEUE = "perf"
TASK_NAME = "perf.record"
ENV_BROKER = "PERF_CELERY_BROKER"
ENV_RUN_DIR = "PERF_RUN_DIR"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


def record(task_seq: int, fire_at_ms: int) -> None:
    """The benchmark task: note when it ran, nothing else."""
    received_ms = time.time() * 1000.0
    log = ReceiptLog.for_current_process(receipts_dir(os.environ[ENV_RUN_DIR]))
    log.record(task_seq, fire_at_ms, received_ms)


def make_app(broker_url: str, visibility_timeout: float = 7200.0,
             prefetch_multiplier: int = 4) -> Celery:
    app = Celery("taskwheel_perf", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        enable_utc=True,
        timezone="UTC",
        task_default_queue=QUEUE,
        broker_transport_options={"visibility_timeout": visibility_timeout},
        worker_prefetch_multiplier=prefetch_multiplier,
        broker_connection_retry_on_startup=True,
        worker_redirect_stdouts=False,
    )
    app.task(name=TASK_NAME)(record)
    return app


def _worker_app() -> Celery:
    """The app ``celery -A perf.peers.celery_eta:worker_app worker`` loads, from the env."""
    return make_app(
        os.environ.get(ENV_BROKER, "redis://127.0.0.1:6379/0"),
        float(os.environ.get("PERF_CELERY_VISIBILITY_TIMEOUT", "7200")),
        int(os.environ.get("PERF_CELERY_PREFETCH", "4")),
    )


worker_app = _worker_app() if os.environ.get(ENV_BROKER) else None


class CelerySubmitter(Submitter):
    def __init__(self, broker_url: str) -> None:
        self.app = make_app(broker_url)
        self.task = self.app.tasks[TASK_NAME]
        # Connect and declare the queue now: the first publish would otherwise spend ~0.1 s
        # on it inside the timed run.
        with self.app.producer_or_acquire() as producer:
            producer.maybe_declare(self.app.amqp.queues[QUEUE])

    def submit(self, batch: Sequence[tuple[int, int]]) -> None:
        utc = dt.timezone.utc
        with self.app.producer_or_acquire() as producer:
            for seq, fire_at_ms in batch:
                self.task.apply_async(
                    args=(seq, fire_at_ms),
                    eta=dt.datetime.fromtimestamp(fire_at_ms / 1000.0, tz=utc),
                    producer=producer,
                )

    def close(self) -> None:
        self.app.close()


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    try:
        return sorted(child.pid for child in psutil.Process(pid).children())
    except psutil.Error:
        return []


def _stop(proc: subprocess.Popen | None, timeout: float, group: bool = False) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        if group:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the worker and its pool
            except ProcessLookupError:
                pass
        else:
            proc.kill()
        proc.wait(timeout=10)


class CeleryEtaDriver(Driver):
    name = "celery"

    def __init__(self, run_dir: Path, options: dict[str, str] | None = None) -> None:
        super().__init__(run_dir, options)
        self.pool = self.options.get("pool", "prefork")
        if self.pool not in ("prefork", "solo"):
            raise ValueError(f"pool must be prefork or solo, not {self.pool!r}")
        self.concurrency = int(self.options.get("concurrency", os.cpu_count() or 1))
        self.persistence = self.options.get("persistence", "aof")
        self.visibility_timeout = float(self.options.get("visibility_timeout", 7200))
        self.prefetch_multiplier = int(self.options.get("prefetch_multiplier", 4))
        self.broker_url = ""
        self._redis: subprocess.Popen | None = None
        self._worker: subprocess.Popen | None = None
        self._client: Any = None  # a redis.Redis once redis-server runs

    # ----------------------------------------------------------------------- lifecycle

    def setup(self) -> None:
        import redis

        redis_dir = self.run_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(5):
            port = free_loopback_port()
            cmd = ["redis-server", "--bind", "127.0.0.1", "--port", str(port),
                   "--dir", str(redis_dir), "--logfile", str(redis_dir / "redis.log"),
                   "--daemonize", "no", "--save", "",
                   "--appendonly", "yes" if self.persistence == "aof" else "no",
                   "--appendfsync", "everysec"]
            self._redis = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
            self._client = redis.Redis(host="127.0.0.1", port=port)
            if self._wait_for_redis():
                break
            _stop(self._redis, 5)  # most likely the port was taken between bind and start
        else:
            raise RuntimeError(f"redis-server did not start; see {redis_dir / 'redis.log'}")
        self.broker_url = f"redis://127.0.0.1:{port}/0"

        env = dict(os.environ)
        env.update({
            ENV_BROKER: self.broker_url,
            ENV_RUN_DIR: str(self.run_dir),
            "PERF_CELERY_VISIBILITY_TIMEOUT": str(self.visibility_timeout),
            "PERF_CELERY_PREFETCH": str(self.prefetch_multiplier),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        })
        cmd = [sys.executable, "-m", "celery", "-A", "perf.peers.celery_eta:worker_app",
               "worker", "-Q", QUEUE, "-n", "perf@%h", "--pool", self.pool,
               "--concurrency", str(self.concurrency), "--loglevel", "WARNING",
               "--without-gossip", "--without-mingle", "--without-heartbeat",
               "--logfile", str(self.run_dir / "celery-worker.log")]
        # Its banner and warnings (root, deprecations) go to a file beside its log.
        with open(self.run_dir / "celery-worker.out", "ab") as out:
            self._worker = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                            stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self._wait_for_worker()

    def _wait_for_redis(self) -> bool:
        import redis

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._redis is not None and self._redis.poll() is not None:
                return False
            try:
                if self._client.ping():
                    return True
            except redis.ConnectionError:
                time.sleep(0.05)
        return False

    def _wait_for_worker(self) -> None:
        app = make_app(self.broker_url)
        deadline = time.monotonic() + READY_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if self._worker is not None and self._worker.poll() is not None:
                    raise RuntimeError(
                        f"celery worker exited with {self._worker.returncode}; "
                        f"see {self.run_dir / 'celery-worker.log'}")
                if app.control.ping(timeout=0.5):
                    pool = _children(self._worker.pid) if self._worker else []
                    if self.pool == "solo" or len(pool) >= self.concurrency:
                        return
                time.sleep(0.2)
        finally:
            app.close()
        raise RuntimeError(f"celery worker not ready after {READY_TIMEOUT_S:.0f} s")

    def teardown(self) -> None:
        _stop(self._worker, STOP_TIMEOUT_S, group=True)
        self._worker = None
        if self._client is not None:
            self._client.close()
            self._client = None
        _stop(self._redis, 10)
        self._redis = None

    # ------------------------------------------------------------------------ the run

    def connect(self, index: int = 0) -> Submitter:
        return CelerySubmitter(self.broker_url)

    def server_pids(self) -> dict[str, int]:
        pids: dict[str, int] = {}
        if self._redis is not None and self._redis.poll() is None:
            pids["redis-server"] = self._redis.pid
        if self._worker is not None and self._worker.poll() is None:
            pids["celery worker"] = self._worker.pid
            for i, child in enumerate(_children(self._worker.pid), 1):
                pids[f"celery pool child {i}"] = child
        return pids

    def pending(self) -> int | None:
        """Tasks published and not yet run: queued in Redis plus held unacked by the worker."""
        if self._client is None:
            return None
        pipe = self._client.pipeline()
        pipe.llen(QUEUE)
        pipe.hlen("unacked")
        queued, unacked = pipe.execute()
        return int(queued) + int(unacked)

    def describe(self) -> dict[str, str]:
        import celery
        import kombu
        import redis

        server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
        return {
            "system": "Celery ETA tasks on a Redis broker",
            "celery": celery.__version__,
            "kombu": kombu.__version__,
            "redis-py": redis.__version__,
            "redis-server": server.stdout.split(" v=")[-1].split()[0] if server.stdout else "?",
            "pool": self.pool,
            "concurrency": str(self.concurrency) if self.pool == "prefork" else "1 (solo)",
            "redis_persistence": ("appendonly yes, appendfsync everysec"
                                  if self.persistence == "aof" else "none"),
            "visibility_timeout_s": f"{self.visibility_timeout:g}",
            "prefetch_multiplier": str(self.prefetch_multiplier),
        }
