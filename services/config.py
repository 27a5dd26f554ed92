"""All of taskwheel's settings in one typed object, built from flags and TASKWHEEL_* variables.

Every field below is a flag (``--lookahead-ms``) and an environment variable
(``TASKWHEEL_LOOKAHEAD_MS``); a flag wins over the variable, the variable over the default.
The defaults suit the embedded mode on one machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields


@dataclass(slots=True)
class Limits:
    """What ingest accepts. Violations get INVALID_ARGUMENT naming the field."""

    max_batch: int = 10_000  # tasks in one Submit
    max_payload_bytes: int = 65_536
    max_queue_len: int = 128
    max_headers: int = 64
    max_header_bytes: int = 8_192  # keys + values of one task
    max_idempotency_key_len: int = 256
    max_attempts: int = 100
    default_max_attempts: int = 3
    max_future_ms: int = 366 * 86_400_000  # how far ahead fire_at may be
    max_past_ms: int = 86_400_000  # how far behind fire_at may be (fires at once)
    default_lease_ms: int = 30_000
    min_lease_ms: int = 100
    max_lease_ms: int = 12 * 3_600_000
    max_in_flight: int = 10_000  # per Consume stream


@dataclass(slots=True)
class Config:
    listen: str = "127.0.0.1:7070"
    data_dir: str = "./taskwheel-data"
    # sqlite:///path, a bare path, or cassandra://host:port/keyspace. Empty: <data_dir>/tasks.db
    store: str = ""
    # Fixed when the store is created. 0: as the store was created; a new one gets 16
    # (embedded: one node holds them all) or 256 (Cassandra: many more than nodes).
    shards: int = 0
    # The cluster: this node's id (generated when empty; kept in data_dir with the embedded
    # store), the address other nodes reach its services at (empty: listen), and its shard
    # leases: renewed every shard_renew_ms, lapsing shard_lease_ms after the last renewal.
    node_id: str = ""
    advertise: str = ""
    shard_renew_ms: int = 1_000
    shard_lease_ms: int = 5_000
    # Timer: how far ahead of the clock tasks are loaded into the wheel, in slices of slice_ms.
    lookahead_ms: int = 5_000
    slice_ms: int = 1_000
    tick_ms: int = 1
    # A checkpoint stays this far behind the clock, so that a task whose store write started
    # before the checkpoint was taken (slow store, clock skew between hosts) lies after it.
    checkpoint_margin_ms: int = 30_000
    # Timers held in the wheel before the loader pauses.
    max_wheel: int = 5_000_000
    # Fired tasks the timer may have handed to dispatch before delivery confirms them.
    max_unconfirmed: int = 500_000
    # Ingest: accepted tasks waiting for their store write before Submit answers
    # RESOURCE_EXHAUSTED.
    max_pending_writes: int = 200_000
    write_batch: int = 5_000
    # Dispatch: retry backoff base and cap (exponential per attempt).
    retry_base_ms: int = 1_000
    retry_max_ms: int = 300_000
    # Tasks acked or failed recently, remembered to drop a lease row that fires in the race.
    finished_memory_ms: int = 120_000
    # A fired task no worker has taken for hold_after_ms gets a durable "hold" row hold_ms
    # ahead, so dispatch can confirm it to the timer without a worker (no attempt is used).
    hold_after_ms: int = 2_000
    hold_ms: int = 30_000
    default_max_in_flight: int = 100
    # A worker whose stream broke may reconnect and ack on the new stream; its deliveries are
    # retried only if no ack came within this grace.
    orphan_grace_ms: int = 2_000
    # A delivery's lease is written this long after it is sent (or at half its lease, if
    # sooner); an ack or nack that comes sooner replaces it with one final write (half the
    # writes of a fast worker's task). Long enough to cover acks delayed by a busy event loop:
    # at 50 ms, 40K fires/s made acks later than that, every delivery cost two writes, and the
    # extra writes made the loop later still. A crash inside the window only re-fires the
    # task: the timer keeps it unconfirmed.
    lease_write_delay_ms: int = 250
    # Dispatch's writes (acks, leases, retries) start at most one per this many ms, each with
    # all that waits: at 30K acks/s, one call per worker message cost the event loop 2-3 us a
    # task in fixed costs. Nobody waits on an ack's write; a task's confirm to the timer, and
    # a lease's durability, come this much later at most.
    transition_linger_ms: int = 5
    limits: Limits = field(default_factory=Limits)

    def store_url(self) -> str:
        return self.store or os.path.join(self.data_dir, "tasks.db")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return "TASKWHEEL_" + name.upper()


def add_config_flags(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """Adds a flag per Config (and Limits) field; defaults are resolved later in from_args."""
    for obj in (Config, Limits):
        for f in fields(obj):
            if f.name == "limits" or (only is not None and f.name not in only):
                continue
            parser.add_argument(
                _flag(f.name),
                dest=f.name,
                type=int if f.type in ("int", int) else str,
                default=None,
                help=f"(env {_env(f.name)}; default {getattr(obj(), f.name)!r})",
            )


def _coerce(value: str, default: object) -> object:
    return int(value) if isinstance(default, int) else value


def from_args(args: argparse.Namespace | None = None, env: dict[str, str] | None = None) -> Config:
    """Flags over TASKWHEEL_* variables over defaults. Raises ValueError on a bad value."""
    env = dict(os.environ) if env is None else env
    values = vars(args) if args is not None else {}
    config = Config()
    for target in (config, config.limits):
        for f in fields(target):
            if f.name == "limits":
                continue
            default = getattr(target, f.name)
            if values.get(f.name) is not None:
                setattr(target, f.name, values[f.name])
            elif _env(f.name) in env:
                try:
                    setattr(target, f.name, _coerce(env[_env(f.name)], default))
                except ValueError:
                    raise ValueError(f"{_env(f.name)}={env[_env(f.name)]!r} is not a number") from None
    validate(config)
    return config


def validate(config: Config) -> None:
    if config.shards < 0:
        raise ValueError(f"--shards must be 0 (the store's) or more, got {config.shards}")
    positive = ("shard_renew_ms", "shard_lease_ms", "lookahead_ms", "slice_ms", "tick_ms",
                "max_unconfirmed", "max_pending_writes", "write_batch", "retry_base_ms")
    for name in positive:
        if getattr(config, name) <= 0:
            raise ValueError(f"{_flag(name)} must be positive, got {getattr(config, name)}")
    if config.shard_lease_ms < 2 * config.shard_renew_ms:
        # A node fires only until a renewal interval before its lease runs out: below two
        # intervals, one late renewal would stop it.
        raise ValueError("--shard-lease-ms must be at least twice --shard-renew-ms")
    if config.slice_ms * 2 > config.lookahead_ms:
        # A slice is read when the loaded window shrinks to lookahead - slice; below one slice
        # of margin the read would start too late for the slice's first tasks.
        raise ValueError("--slice-ms must be at most half of --lookahead-ms")
    for name in ("lease_write_delay_ms", "transition_linger_ms"):
        if getattr(config, name) < 0:
            raise ValueError(f"{_flag(name)} must be 0 or more, got {getattr(config, name)}")
    for f in fields(Limits):
        if getattr(config.limits, f.name) <= 0:
            raise ValueError(f"{_flag(f.name)} must be positive")


def documented() -> list[tuple[str, str, object]]:
    """(flag, env var, default) for every setting, for the docs and --help."""
    rows = []
    for obj in (Config(), Limits()):
        for f in dataclasses.fields(obj):
            if f.name != "limits":
                rows.append((_flag(f.name), _env(f.name), getattr(obj, f.name)))
    return rows
