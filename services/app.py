"""Assembles services into a gRPC server: all three in one process, or one per process.

Every server also serves gRPC health checking (grpc.health.v1, one status per service name and
"" for the whole server) and server reflection, so grpcurl can list, describe and call it.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import time
import urllib.parse

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from taskwheel import telemetry
from taskwheel.cluster.routing import DispatchRouter, TimerRouter
from taskwheel.cluster.shards import ShardOwner, new_node_id
from taskwheel.config import Config
from taskwheel.dispatch import DispatchInternalServicer, DispatchService, DispatchServicer
from taskwheel.ingest import IngestServicer
from taskwheel.internal.v1 import dispatch_pb2 as internal_dispatch_pb2
from taskwheel.internal.v1 import timer_pb2, timer_pb2_grpc
from taskwheel.stores import Store, open_store
from taskwheel.timer import TimerService
from taskwheel.v1 import dispatch_pb2, ingest_pb2

log = logging.getLogger("taskwheel")

ROLES = ("ingest", "timer", "dispatch")
# The gRPC services each role serves: the public ones first, then the internal ones.
_SERVICES = {
    "ingest": [ingest_pb2.DESCRIPTOR.services_by_name["Ingest"].full_name],
    "timer": [timer_pb2.DESCRIPTOR.services_by_name["Timer"].full_name],
    "dispatch": [dispatch_pb2.DESCRIPTOR.services_by_name["Dispatch"].full_name,
                 internal_dispatch_pb2.DESCRIPTOR.services_by_name["Dispatch"].full_name],
}


class App:
    """The running services of one process, their store and their server."""

    def __init__(self, config: Config, roles: tuple[str, ...] = ROLES) -> None:
        unknown = set(roles) - set(ROLES)
        if unknown or not roles:
            raise ValueError(f"roles must be among {ROLES}, got {roles}")
        self.config = config
        self.roles = roles
        if config.store == "" and config.data_dir:
            os.makedirs(config.data_dir, exist_ok=True)
        self.store: Store = open_store(config.store_url(), num_shards=config.shards)
        self.node_id = config.node_id or self._kept_node_id() or new_node_id()
        self.ingest: IngestServicer | None = None
        self.timer: TimerService | None = None
        self.dispatch: DispatchService | None = None
        self.owner: ShardOwner | None = None
        self.timers: TimerRouter | None = None
        self.dispatchers: DispatchRouter | None = None
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self._health = health.aio.HealthServicer()

    def _kept_node_id(self) -> str:
        """The embedded default keeps its node id in its data directory, so a restart takes its
        own shards back at once instead of waiting for their leases to lapse. Only there: on a
        shared store, nodes started from one directory would all be one node."""
        if self.config.store != "" or self.roles != ROLES:
            return ""
        path = os.path.join(self.config.data_dir, "node-id")
        try:
            with open(path) as f:
                kept = f.read().strip()
            if kept:
                return kept
        except FileNotFoundError:
            pass
        made = new_node_id()
        with open(path + ".tmp", "w") as f:
            f.write(made + "\n")
        os.replace(path + ".tmp", path)
        return made

    def _address(self) -> str:
        """Where the other nodes reach this one: --advertise, else the listening address."""
        if self.config.advertise:
            return self.config.advertise
        host = self.config.listen.rsplit(":", 1)[0].strip("[]")
        if host in ("", "0.0.0.0", "::"):
            host = socket.getfqdn()
        return f"{host}:{self.port}" if ":" not in host else f"[{host}]:{self.port}"

    async def start(self) -> int:
        """Opens the store, starts the services and the server, joins the cluster; returns the
        bound port."""
        telemetry.setup_tracing("taskwheel-" + "-".join(self.roles))
        await self.store.open()
        if "dispatch" in self.roles:
            self.dispatch = DispatchService(self.config, self.store)
        self.dispatchers = DispatchRouter(self.node_id, self.dispatch)
        if "timer" in self.roles:
            self.timer = TimerService(self.config, self.store, self.dispatchers)
        self.timers = TimerRouter(self.store.num_shards, self.node_id, self.timer)
        if "ingest" in self.roles:
            self.ingest = IngestServicer(self.config, self.store, self.timers)

        self.server = grpc.aio.server(
            interceptors=telemetry.server_interceptors(),
            options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.so_reuseport", 0),
            ],
        )
        if self.ingest:
            self.ingest.add_to_server(self.server)
        if self.timer:
            timer_pb2_grpc.add_TimerServicer_to_server(self.timer, self.server)
        if self.dispatch:
            DispatchServicer(self.dispatch).add_to_server(self.server)
            DispatchInternalServicer(self.dispatch, self.store.num_shards).add_to_server(self.server)
        names = [reflection.SERVICE_NAME, health.SERVICE_NAME]
        names += [name for role in self.roles for name in _SERVICES[role]]
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self.server)
        reflection.enable_server_reflection(names, self.server)
        self.port = self.server.add_insecure_port(self.config.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.listen}")

        dispatch = self.dispatch
        self.owner = ShardOwner(self.config, self.store, self.node_id, self._address(), frozenset(self.roles),
                                self.timer, dispatch.consumed_queues if dispatch else frozenset)
        self.owner.on_view(self.timers.update)
        self.owner.on_view(self.dispatchers.update)
        if self.dispatch:
            await self.dispatch.start(self.timers)
        if self.ingest:
            await self.ingest.start()
        await self.server.start()
        if self.timer:
            await self.timer.start()
        # Serving first: the first round may take shards, and others may push to this node.
        await self.owner.start()
        for role in self.roles:
            for name in _SERVICES[role]:
                await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("taskwheel %s %s listening on %s (store %s)", "+".join(self.roles), self.node_id,
                 self.config.listen, self.store.description)
        return self.port

    async def stop(self, grace: float = 2.0) -> None:
        await self._health.enter_graceful_shutdown()
        if self.owner:
            # Hands every shard over while dispatch can still confirm what was fired.
            await self.owner.stop()
        if self.server:
            await self.server.stop(grace)
        if self.timer:
            await self.timer.stop()
        if self.ingest:
            await self.ingest.stop()
        if self.dispatch:
            await self.dispatch.stop()
        for router in (self.timers, self.dispatchers):
            if router is not None:
                await router.close()
        await self.store.close()
        telemetry.shutdown_tracing()


# Stores whose client library leaves reference cycles behind its calls (the Cassandra driver
# does), which only the cyclic GC frees: beside them automatic collection stays on.
_STORES_MAKING_CYCLES = ("cassandra",)


def tune_runtime(store_url: str) -> None:
    """The interpreter's settings for a latency-sensitive event loop, set once at start-up.

    Automatic cyclic GC pauses the event loop, and the timer with it, for up to tens of
    milliseconds under load, while the hot path makes no reference cycles: so what exists at
    start-up is frozen out of collections and, beside a store whose client makes no cycles,
    automatic collection is off and ``collect_garbage_on_growth`` collects in short pauses
    instead. Beside one that does (Cassandra) it stays on, with young collections every 50,000
    net allocations instead of 700.
    """
    gc.collect()
    gc.freeze()
    if urllib.parse.urlparse(store_url).scheme in _STORES_MAKING_CYCLES:
        gc.set_threshold(50_000, 50, 100)
    else:
        gc.disable()


# Net new GC-tracked objects that start a young collection, and how often a full one runs;
# see collect_garbage_on_growth.
GC_YOUNG_OBJECTS = 50_000
GC_FULL_EVERY_S = 3600.0


async def collect_garbage_on_growth(threshold: int = GC_YOUNG_OBJECTS, every_s: float = 0.1,
                                    full_every_s: float = GC_FULL_EVERY_S) -> None:
    """Runs the cyclic GC, disabled by ``tune_runtime``, in pauses of bounded length.

    The hot path makes no reference cycles, so its objects are freed by reference counting
    alone; cycles from rarer paths (errors, aborted calls) still need collecting. The GC's
    count of net new tracked objects (allocations minus frees since the last collection) stays
    near zero in a steady state and grows with a leak or a growing working set. Past
    ``threshold`` a young collection runs: it walks only objects created since the last one,
    and whatever survives it is not walked again until the full collection every
    ``full_every_s``, the one pause that grows with the heap (tens of milliseconds with
    hundreds of thousands of task records alive), so it runs rarely.
    """
    next_full = time.monotonic() + full_every_s
    while True:
        await asyncio.sleep(every_s)
        if time.monotonic() >= next_full:
            started = time.perf_counter()
            found = gc.collect()
            next_full = time.monotonic() + full_every_s
            log.info("full garbage collection: %d unreachable objects, %.1f ms", found,
                     (time.perf_counter() - started) * 1000)
        elif gc.get_count()[0] >= threshold:
            gc.collect(0)


async def serve(config: Config, roles: tuple[str, ...] = ROLES, ready=None) -> None:
    """Runs until SIGINT/SIGTERM. ``ready(port)`` is called once serving."""
    app = App(config, roles)
    port = await app.start()
    tune_runtime(config.store_url())
    collector = None if gc.isenabled() else asyncio.get_running_loop().create_task(
        collect_garbage_on_growth())
    if ready is not None:
        ready(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if collector is not None:
        collector.cancel()
    await app.stop()
