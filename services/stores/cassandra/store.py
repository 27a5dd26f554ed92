"""The Apache Cassandra store. Data model and trade-offs: docs/cassandra.md; schema: schema.cql.

Tables: ``due`` (rows partitioned by (shard, minute bucket), written once with a TTL),
``due_done`` (markers for superseded due rows, same partition key), ``tasks`` (by id),
``idempotency``, ``checkpoints`` (read once, for keyspaces older than ``shard_leases``),
``shard_leases``, ``members``, ``state_counts``, ``meta``.

Versions instead of compare-and-set. Every write to a ``tasks`` row carries
``USING TIMESTAMP _version(from_gen, kind)``: the gen the write moves the task from, times
eight, plus a rank for the kind. Cassandra keeps, cell by cell, the value with the highest
timestamp, so whatever order writes arrive in (retried inserts, a lease racing an ack, a stale
transition), the row converges to the state written from the highest gen, and within one gen to
the highest-ranked kind (a cancel beats an ack beats a retry beats a lease). The gen check of a
transition is a read of the row (batched with ``IN``, beside the other reads) before the
write; two transitions from the same gen that race inside that window both report True, and
the version order decides which one the row keeps. docs/cassandra.md walks through the races.

Every request goes through ``_execute``: the driver's ResponseFuture becomes an asyncio future
(callbacks hop threads with ``call_soon_threadsafe``; the event loop never blocks), at most
``max_in_flight`` requests run at once, and driver errors that mean "cannot reach Cassandra"
become StoreUnavailable.

Grouping: due rows and done markers go in UNLOGGED batches of one partition each. By-id rows are
one partition per task, so single-partition batches would be single statements; they are
grouped per primary replica instead (a multi-partition UNLOGGED batch whose partitions all live
on the coordinator it is routed to): the driver's cost is per request, and here single inserts
ran at ~2,000/s where batches of 200 rows ran at 30,000-50,000 rows/s.
The core's ``group_by`` does the grouping; ingest's group commit has already made the call a
batch, so no further accumulation (the core's Batcher) happens here.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import operator
import string
import struct
import time
from collections import defaultdict
from importlib import resources
from typing import Any, Callable, Mapping, Sequence

from cassandra import (
    ConsistencyLevel,
    OperationTimedOut,
    RequestExecutionException,
    Timeout,
    Unavailable,
    cqltypes,
)
from cassandra.cluster import (
    EXEC_PROFILE_DEFAULT,
    Cluster,
    ExecutionProfile,
    NoHostAvailable,
    ResponseFuture,
    Session,
)
from cassandra.connection import ConnectionException
from cassandra.protocol import ServerError
from cassandra.policies import (
    DCAwareRoundRobinPolicy,
    ExponentialReconnectionPolicy,
    TokenAwarePolicy,
)
from cassandra.query import (
    BatchStatement,
    BatchType,
    BoundStatement,
    PreparedStatement,
    UNSET_VALUE,
    SimpleStatement,
    tuple_factory,
)

from taskwheel.clock import now_ms
from taskwheel.core import BUCKET_MS, RecordShape, bucket_of, group_by
from taskwheel.stores.base import (
    AlreadyEnded, InsertOutcome, Member, ShardLease, Store, StoreUnavailable, Transition, TransitionKind,
)
from taskwheel.task import COLUMNS, FIELDS, FIRING, TERMINAL_STATES, TaskRecord, TaskState, untracked

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# Shards of a new keyspace, unless asked for another count: many more than nodes, so that any
# number of nodes up to a few dozen each gets a fair share within one shard of the others'.
DEFAULT_SHARDS = 256
_MAX_TTL_S = 630_720_000  # Cassandra's limit: 20 years
_IN_CHUNK = 100  # task ids per "IN ?" read
# Lease rows per conditional batch: one Paxos round each; under batch_size_fail_threshold.
_LEASE_BATCH = 128
# A conditional batch that failed because some of its shards changed is tried again without
# them, this many times.
_LEASE_ROUNDS = 4
# How long a member's row outlives its heartbeat's expiry before Cassandra drops it.
_MEMBER_TTL_EXTRA_S = 3600
# What Cassandra counts against batch_size_fail_threshold (PartitionUpdate.dataSize) for a row:
# per cell a timestamp, TTL and expiry besides the value. Measured against "Batch too large".
_CELL_OVERHEAD = 24
_SMALL_ROW_SIZE = 8 * _CELL_OVERHEAD + 96  # update_task, insert_done

# Rank of a write within one gen (see the module docstring). Gaps leave room for new kinds.
_RANK_INSERT = 1
_RANK = {
    TransitionKind.LEASE: 2,
    TransitionKind.RETRY: 3,
    TransitionKind.SUCCEED: 5,
    TransitionKind.FAIL: 5,
}
_RANK_CANCEL = 7


# A row to write: (batch group: a partition or a replica, statement name, values, size estimate).
_Row = tuple[Any, str, Sequence[Any], int]


def _version(from_gen: int, rank: int) -> int:
    """The write timestamp of a tasks-row write that moves a task from ``from_gen``."""
    return from_gen * 8 + rank


_LIVE_STATES = (int(TaskState.SCHEDULED), int(TaskState.LEASED))
_TERMINAL = frozenset(int(s) for s in TERMINAL_STATES)
_STATES = {int(s): s for s in TaskState}

# The columns of a tasks row and a due row (which has its bucket too) are TaskRecord's fields,
# in their order: _values_with builds a row's values from a record, and _record a record from
# a row read.
_TASK_COLUMNS = ", ".join(FIELDS)
_TASK_MARKERS = ", ".join("?" * len(FIELDS))
_TASK_ID_AT, _DUE_MS_AT, _STATE_AT, _GEN_AT = (
    FIELDS.index(name) for name in ("task_id", "due_ms", "state", "gen"))
_CQL = {
    "insert_task": (
        f"INSERT INTO {{ks}}.tasks ({_TASK_COLUMNS}) VALUES ({_TASK_MARKERS}) "
        "USING TTL ? AND TIMESTAMP ?"
    ),
    "update_task": (
        "UPDATE {ks}.tasks USING TTL ? AND TIMESTAMP ? SET gen = ?, state = ?, attempt = ?, "
        "due_ms = ?, updated_ms = ?, last_error = ? WHERE task_id = ?"
    ),
    "select_task": f"SELECT {_TASK_COLUMNS} FROM {{ks}}.tasks WHERE task_id = ?",
    "select_current": (
        "SELECT task_id, gen, state, attempt, due_ms, last_error FROM {ks}.tasks "
        "WHERE task_id IN ?"
    ),
    "select_exists": "SELECT state FROM {ks}.tasks WHERE task_id = ?",
    "insert_due": (
        f"INSERT INTO {{ks}}.due (bucket, {_TASK_COLUMNS}) VALUES (?, {_TASK_MARKERS}) USING TTL ?"
    ),
    "select_due": (
        f"SELECT {_TASK_COLUMNS} FROM {{ks}}.due "
        "WHERE shard = ? AND bucket = ? AND due_ms >= ? AND due_ms < ?"
    ),
    "insert_done": (
        "INSERT INTO {ks}.due_done (shard, bucket, due_ms, task_id, gen, state) "
        "VALUES (?, ?, ?, ?, ?, ?) USING TTL ?"
    ),
    "select_done": (
        "SELECT due_ms, task_id, gen FROM {ks}.due_done "
        "WHERE shard = ? AND bucket = ? AND due_ms >= ? AND due_ms < ?"
    ),
    "claim": (
        "INSERT INTO {ks}.idempotency (queue, idempotency_key, task_id, claimed_ms) "
        "VALUES (?, ?, ?, ?) IF NOT EXISTS USING TTL ?"
    ),
    "steal": (
        "UPDATE {ks}.idempotency USING TTL ? SET task_id = ?, claimed_ms = ? "
        "WHERE queue = ? AND idempotency_key = ? IF task_id = ?"
    ),
    "select_checkpoints": "SELECT shard, ms FROM {ks}.checkpoints",
    "create_lease": (
        "INSERT INTO {ks}.shard_leases (p, shard, owner, epoch, expires_ms, checkpoint_ms) "
        "VALUES (0, ?, '', 0, 0, ?) IF NOT EXISTS"
    ),
    "select_leases": "SELECT shard, owner, epoch, expires_ms, checkpoint_ms FROM {ks}.shard_leases WHERE p = 0",
    "select_lease": "SELECT checkpoint_ms FROM {ks}.shard_leases WHERE p = 0 AND shard = ?",
    "take_lease": (
        "UPDATE {ks}.shard_leases SET owner = ?, epoch = ?, expires_ms = ? WHERE p = 0 AND shard = ? "
        "IF owner = ? AND epoch = ?"
    ),
    "renew_lease": (
        "UPDATE {ks}.shard_leases SET expires_ms = ?, checkpoint_ms = ? WHERE p = 0 AND shard = ? "
        "IF owner = ? AND epoch = ?"
    ),
    "release_lease": (
        "UPDATE {ks}.shard_leases SET owner = '', expires_ms = 0, checkpoint_ms = ? "
        "WHERE p = 0 AND shard = ? IF owner = ? AND epoch = ?"
    ),
    "save_member": (
        "INSERT INTO {ks}.members (p, node_id, address, roles, queues, started_ms, expires_ms) "
        "VALUES (0, ?, ?, ?, ?, ?, ?) USING TTL ?"
    ),
    "select_members": (
        "SELECT node_id, address, roles, queues, started_ms, expires_ms FROM {ks}.members WHERE p = 0"
    ),
    "delete_member": "DELETE FROM {ks}.members WHERE p = 0 AND node_id = ?",
    "add_count": "UPDATE {ks}.state_counts SET n = n + ? WHERE state = ?",
    "select_counts": "SELECT state, n FROM {ks}.state_counts",
}
# Safe to resend after a timeout: explicit timestamps or values make a replay a no-op.
_IDEMPOTENT = {
    "insert_task", "update_task", "insert_due", "insert_done", "save_member", "delete_member",
    "select_task", "select_current", "select_exists", "select_due", "select_done",
    "select_checkpoints", "select_leases", "select_lease", "select_members", "select_counts",
}

# Retry hints: the failure detector marks a replica up within a few seconds of its return; a
# timeout is often a moment's overload.
UNAVAILABLE_RETRY_MS = 2_000
TIMEOUT_RETRY_MS = 1_000

# Driver errors that mean the cluster cannot serve the request right now; anything else
# (InvalidRequest, a syntax error) is a bug and propagates as is.
_UNAVAILABLE_ERRORS = (
    NoHostAvailable,
    OperationTimedOut,
    RequestExecutionException,  # Unavailable, read/write timeouts and failures, overloaded
    ConnectionException,
    ServerError,  # the coordinator failed internally: nothing to fix in the request
)


def _unavailable(description: str, e: BaseException) -> StoreUnavailable:
    """The driver's error as StoreUnavailable whose message names the cause an operator can
    act on: how many replicas the consistency level needs and how many answered.

    Only a refusal for too few live replicas (Unavailable) certainly wrote nothing: the
    coordinator checks before it sends a mutation anywhere. After a timeout, or a coordinator
    lost with the request, some replicas may hold the write (``maybe_applied``)."""
    errors = list(e.errors.values()) if isinstance(e, NoHostAvailable) else [e]
    cause = errors[-1] if errors else e  # the last coordinator tried says most
    maybe_applied = not all(isinstance(x, Unavailable) for x in errors)
    if isinstance(cause, Unavailable):
        return StoreUnavailable(
            f"{description}: too few Cassandra replicas up: {_cl_name(cause.consistency)} needs "
            f"{cause.required_replicas} and the coordinator sees {cause.alive_replicas}",
            maybe_applied=maybe_applied, retry_after_ms=UNAVAILABLE_RETRY_MS)
    if isinstance(cause, Timeout):
        return StoreUnavailable(
            f"{description}: Cassandra replicas too slow: {_cl_name(cause.consistency)} needs "
            f"{cause.required_responses} answers and {cause.received_responses} came within the "
            "server's timeout", maybe_applied=maybe_applied, retry_after_ms=TIMEOUT_RETRY_MS)
    if isinstance(e, NoHostAvailable):
        return StoreUnavailable(f"{description}: no Cassandra node reachable: {e}",
                                maybe_applied=maybe_applied, retry_after_ms=UNAVAILABLE_RETRY_MS)
    return StoreUnavailable(f"{description}: {type(e).__name__}: {e}",
                            maybe_applied=maybe_applied, retry_after_ms=TIMEOUT_RETRY_MS)


def _cl_name(level: int | None) -> str:
    return ConsistencyLevel.value_to_name.get(level, str(level)) if level is not None else "?"


def _per_dc(text: str) -> dict[str, int]:
    """``dc1:3,dc2:3`` as {data centre: replication factor}."""
    found = {}
    for part in text.split(","):
        dc, _, rf = part.strip().partition(":")
        if not dc or not rf.strip().isdigit() or int(rf) < 1 or not dc.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"replication {text!r}: expected DC:FACTOR[,DC:FACTOR...], e.g. dc1:3,dc2:3")
        found[dc] = int(rf)
    return found


def _consistency(name: str) -> int:
    try:
        return ConsistencyLevel.name_to_value[name.upper()]
    except KeyError:
        raise ValueError(
            f"unknown consistency level {name!r}: use one of "
            + ", ".join(sorted(ConsistencyLevel.name_to_value))
        ) from None


@dataclasses.dataclass
class CassandraOptions:
    """Tuning of the Cassandra store; every field can come from the store URL's query string
    (``cassandra://host:9042/ks?write_cl=ONE&retention_s=86400``). docs/cassandra.md argues the
    defaults."""

    #: Copies of every row in each data centre (NetworkTopologyStrategy), used only when the
    #: keyspace is created here: 3 in production, where LOCAL_QUORUM then survives a lost node.
    replication_factor: int = 1
    #: Factors per data centre instead, e.g. ``dc1:3,dc2:3`` (names as the snitch reports them).
    replication: str = ""
    #: Default consistency of writes (insert, apply, cancel, checkpoints) and of reads.
    write_cl: str = "LOCAL_QUORUM"
    read_cl: str = "LOCAL_QUORUM"
    #: Per-operation overrides; empty means the default above.
    insert_cl: str = ""
    apply_cl: str = ""
    checkpoint_cl: str = ""
    load_cl: str = ""  # load_due: must overlap insert_cl/apply_cl or a timer can miss rows
    get_cl: str = ""  # get, cancel's read and the gen-check read of apply
    serial_cl: str = "LOCAL_SERIAL"  # the idempotency claims' Paxos round
    local_dc: str = ""
    protocol_version: int = 5
    #: Requests in flight at once per store; more wait (backpressure reaches the caller's queue).
    max_in_flight: int = 64
    request_timeout_s: float = 5.0
    connect_timeout_s: float = 10.0
    #: How long rows stay after their due time (or after a task ends): Get still finds them.
    retention_s: int = 7 * 86_400
    #: Limits of one UNLOGGED batch. Cassandra rejects batches over batch_size_fail_threshold
    #: (50 KiB by default): keep max_batch_bytes below the server's threshold.
    max_batch_rows: int = 100
    max_batch_bytes: int = 40_000
    #: An idempotency claim whose task row is missing is taken over once it is this old
    #: (its insert failed after claiming); younger ones may belong to an insert in flight.
    claim_grace_ms: int = 5_000
    #: TimeWindowCompactionStrategy window of due / due_done, set when the tables are created.
    window_hours: int = 6
    #: gc_grace_seconds of due / due_done: they are never deleted, only expire.
    due_gc_grace_s: int = 3 * 3600

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "CassandraOptions":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise ValueError(
                f"unknown Cassandra store option(s) {', '.join(unknown)}; known: "
                + ", ".join(fields)
            )
        values = {}
        for name, value in options.items():
            kind = type(getattr(cls, name))  # the default's type: int, float or str
            try:
                values[name] = kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"option {name}={value!r} is not a {kind.__name__}") from None
        made = cls(**values)
        for name in ("write_cl", "read_cl", "insert_cl", "apply_cl", "checkpoint_cl", "load_cl",
                     "get_cl", "serial_cl"):
            if getattr(made, name):
                _consistency(getattr(made, name))
        if made.replication:
            _per_dc(made.replication)
        for name in ("replication_factor", "max_in_flight", "max_batch_rows", "max_batch_bytes",
                     "retention_s", "window_hours"):
            if getattr(made, name) < 1:
                raise ValueError(f"option {name} must be at least 1")
        return made


class CassandraStore(Store):
    """Tasks in Apache Cassandra; see the module docstring and docs/cassandra.md."""

    # Each insert waits for its replicas' commit-log sync: several in flight hide that latency.
    insert_concurrency = 8
    # The driver's ResponseFuture and the timer holding its timeout callback refer to each
    # other: ~90 unreachable objects a request.

    def __init__(
        self,
        hosts: Sequence[str] | str = ("127.0.0.1",),
        port: int | str = 9042,
        keyspace: str = "taskwheel",
        num_shards: int | str = 0,
        **options: Any,
    ):
        self.hosts = [hosts] if isinstance(hosts, str) else list(hosts)
        self.port = int(port)
        if not keyspace.replace("_", "").isalnum() or keyspace[0].isdigit():
            raise ValueError(f"keyspace name {keyspace!r}: letters, digits and _ only")
        self.keyspace = keyspace
        self._asked_shards = int(num_shards)
        if self._asked_shards < 0:
            raise ValueError(f"num_shards must be at least 1 (or 0: the keyspace's), not {num_shards}")
        self.num_shards = self._asked_shards or DEFAULT_SHARDS
        self.options = CassandraOptions.from_options(options)
        o = self.options
        self._cl = {
            "insert": _consistency(o.insert_cl or o.write_cl),
            "apply": _consistency(o.apply_cl or o.write_cl),
            "checkpoint": _consistency(o.checkpoint_cl or o.write_cl),
            "load": _consistency(o.load_cl or o.read_cl),
            "get": _consistency(o.get_cl or o.read_cl),
            "serial": _consistency(o.serial_cl),
        }
        self.description = f"cassandra://{','.join(self.hosts)}:{self.port}/{keyspace}"
        self.created_ms = 0
        self._cluster: Cluster | None = None
        self._session: Session | None = None
        self._binders: dict[str, _Binder] = {}
        self._slots: asyncio.Semaphore | None = None
        self._retention_ms = o.retention_s * 1000
        self._count_deltas: defaultdict[int, int] = defaultdict(int)  # not yet written
        self._counting: asyncio.Task | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        if self._session is not None:
            return
        self._slots = asyncio.Semaphore(self.options.max_in_flight)
        loop = asyncio.get_running_loop()
        # Connecting, DDL (with its schema agreement wait) and preparing are blocking driver
        # calls; they run once, on a worker thread.
        await loop.run_in_executor(None, self._open_blocking)

    def _open_blocking(self) -> None:
        o = self.options
        profile = ExecutionProfile(
            load_balancing_policy=TokenAwarePolicy(
                DCAwareRoundRobinPolicy(local_dc=o.local_dc or None)
            ),
            request_timeout=o.request_timeout_s,
            consistency_level=self._cl["get"],
            serial_consistency_level=self._cl["serial"],
            row_factory=tuple_factory,
        )
        cluster = Cluster(
            self.hosts,
            port=self.port,
            protocol_version=o.protocol_version,
            execution_profiles={EXEC_PROFILE_DEFAULT: profile},
            connect_timeout=o.connect_timeout_s,
            control_connection_timeout=o.connect_timeout_s,
            # Come back within seconds of Cassandra returning (the default backs off to 10 min).
            reconnection_policy=ExponentialReconnectionPolicy(0.5, 4.0),
            idle_heartbeat_interval=5,
            idle_heartbeat_timeout=5,
        )
        try:
            session = cluster.connect()
            self._create_schema(session)
            self.created_ms = self._check_meta(session)
            for name, cql in _CQL.items():
                ps = session.prepare(cql.format(ks=self.keyspace))
                ps.is_idempotent = name in _IDEMPOTENT
                self._binders[name] = _Binder(ps)
            self._create_leases(session)
        except _UNAVAILABLE_ERRORS as e:
            cluster.shutdown()
            raise StoreUnavailable(f"{self.description}: cannot open: {e}") from e
        except BaseException:
            cluster.shutdown()
            raise
        self._cluster, self._session = cluster, session

    def _create_schema(self, session: Session) -> None:
        text = resources.files("taskwheel.stores.cassandra").joinpath("schema.cql").read_text()
        o = self.options
        cql = string.Template(text).substitute(
            keyspace=self.keyspace,
            replication=self._replication(),
            window_hours=o.window_hours,
            due_gc_grace_s=o.due_gc_grace_s,
        )
        body = "\n".join(line for line in cql.splitlines() if not line.lstrip().startswith("--"))
        statements = [statement for statement in body.split(";") if statement.strip()]
        # On several Cassandra nodes the driver waits after each DDL statement until all of
        # them agree on the schema (about a second each). All statements go to one coordinator
        # instead, which orders them, and the wait happens once, before anything is prepared.
        cluster = session.cluster
        coordinator = min((h for h in session.get_pool_state() if h.is_up),
                          key=lambda h: str(h.endpoint), default=None)
        waits, cluster.max_schema_agreement_wait = cluster.max_schema_agreement_wait, 0
        try:
            for statement in statements:
                session.execute(statement, timeout=max(30.0, o.request_timeout_s), host=coordinator)
        finally:
            cluster.max_schema_agreement_wait = waits
        self._wait_for_schema(session, coordinator, timeout_s=max(30, waits))
        self._check_replication(session)

    def _wait_for_schema(self, session: Session, coordinator: Any, timeout_s: float) -> None:
        """Until every node that is up runs the coordinator's schema version. The driver's own
        check compares versions as its control connection's node sees them, which may be the
        old schema everywhere when that node has not heard of the change yet."""
        if coordinator is None:
            return
        local = "SELECT schema_version FROM system.local"
        deadline = time.monotonic() + timeout_s
        while True:
            want = session.execute(local, host=coordinator).one()[0]  # later DDL moves it on
            behind = [h for h in session.get_pool_state() if h.is_up
                      and session.execute(local, host=h).one()[0] != want]
            if not behind:
                return
            if time.monotonic() > deadline:
                raise StoreUnavailable(
                    f"{self.description}: Cassandra nodes {', '.join(str(h.endpoint) for h in behind)} "
                    f"did not take the schema within {timeout_s:.0f} s")
            time.sleep(0.1)

    def _replication(self) -> str:
        """The keyspace's replication map: NetworkTopologyStrategy, with the same factor in
        every data centre or a factor per named one."""
        o = self.options
        if o.replication:
            per_dc = ", ".join(f"'{dc}': {rf}" for dc, rf in _per_dc(o.replication).items())
            return "{'class': 'NetworkTopologyStrategy', " + per_dc + "}"
        return f"{{'class': 'NetworkTopologyStrategy', 'replication_factor': {o.replication_factor}}}"

    def _check_replication(self, session: Session) -> None:
        """Warns when the keyspace existed with other replication than configured (CREATE ...
        IF NOT EXISTS keeps the old) or asks more replicas than the data centre has nodes."""
        row = session.execute(
            "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = %s",
            (self.keyspace,)).one()
        nodes: dict[str, int] = defaultdict(int)
        for host in session.cluster.metadata.all_hosts():
            nodes[host.datacenter] += 1
        have = dict(row[0]) if row else {}
        if have.pop("class", "").endswith("SimpleStrategy"):
            have = {dc: have["replication_factor"] for dc in nodes}
        o = self.options
        want = _per_dc(o.replication) if o.replication else {dc: o.replication_factor for dc in nodes}
        if {dc: int(rf) for dc, rf in have.items()} != want:
            log.warning("%s: the keyspace keeps the replication it was created with, %s, not "
                        "the configured %s (to change it: ALTER KEYSPACE %s WITH replication = "
                        "%s, then a full repair)", self.description, have, want, self.keyspace,
                        self._replication())
        for dc, rf in want.items():
            if rf > nodes.get(dc, 0):
                log.warning("%s: replication factor %d in data centre %s, which has %d node(s): "
                            "a quorum needs %d replicas up", self.description, rf, dc,
                            nodes.get(dc, 0), rf // 2 + 1)

    def _check_meta(self, session: Session) -> int:
        created_ms = now_ms()
        # One LWT is both the check and the read: not applied, it returns the row that is there,
        # (False, id, created_ms, num_shards, schema_version); applied, just (True,).
        row = session.execute(SimpleStatement(
            f"INSERT INTO {self.keyspace}.meta (id, created_ms, num_shards, schema_version) "
            "VALUES (0, %s, %s, %s) IF NOT EXISTS",
            consistency_level=self._cl["checkpoint"],
        ), (created_ms, self.num_shards, SCHEMA_VERSION)).one()
        if row[0]:
            return created_ms
        _, _, created_ms, num_shards, schema_version = row
        if not self._asked_shards:
            self.num_shards = num_shards
        if num_shards != self.num_shards:
            raise ValueError(
                f"keyspace {self.keyspace} was created with {num_shards} shards, but this store "
                f"is configured with {self.num_shards}; the shard count is fixed when a store "
                f"is created (open it with shards={num_shards})"
            )
        if schema_version != SCHEMA_VERSION:
            raise ValueError(
                f"keyspace {self.keyspace} has schema version {schema_version}; this taskwheel "
                f"reads version {SCHEMA_VERSION}"
            )
        return int(created_ms)

    def _create_leases(self, session: Session) -> None:
        """One lease row per shard, made once per keyspace: its checkpoint is the one the
        ``checkpoints`` table kept before leases existed, or the creation time."""
        serial = self._cl["serial"]
        have = {row[0] for row in session.execute(self._lease_statement("select_leases", (), serial))}
        missing = [shard for shard in range(self.num_shards) if shard not in have]
        if not missing:
            return
        saved = dict(session.execute(self._bind("select_checkpoints", ()), timeout=self.options.request_timeout_s))
        for shard in missing:
            checkpoint = max(saved.get(shard) or 0, self.created_ms)
            # One shard per statement: IF NOT EXISTS in a batch fails whole when any row exists.
            session.execute(self._lease_statement("create_lease", (shard, checkpoint), self._cl["checkpoint"]))

    def _lease_statement(self, name: str, values: Sequence[Any], cl: int) -> BoundStatement:
        statement = self._bind(name, values)
        statement.consistency_level = cl
        statement.serial_consistency_level = self._cl["serial"]
        return statement

    async def close(self) -> None:
        cluster = self._cluster
        if cluster is None:
            return
        if self._counting is not None:
            await asyncio.wait([self._counting], timeout=self.options.request_timeout_s)
        self._cluster = self._session = None
        await asyncio.get_running_loop().run_in_executor(None, cluster.shutdown)

    # ---- requests ----------------------------------------------------------------------------

    async def _execute(self, statement: Any, cl: int | None = None) -> list[tuple]:
        """Runs one statement (all pages) without blocking the loop; StoreUnavailable when
        Cassandra cannot serve it."""
        session, slots = self._session, self._slots
        if session is None or slots is None:
            raise StoreUnavailable(f"{self.description}: store is not open")
        if cl is not None:
            statement.consistency_level = cl
        async with slots:
            loop = asyncio.get_running_loop()
            done: asyncio.Future[list[tuple]] = loop.create_future()
            rows: list[tuple] = []
            try:
                response: ResponseFuture = session.execute_async(statement)
            except _UNAVAILABLE_ERRORS as e:
                raise _unavailable(self.description, e) from e

            def on_page(page: list[tuple] | None) -> None:
                # Runs on the driver's I/O thread: hand everything over, raise nothing here.
                try:
                    if page:
                        rows.extend(page)
                    if response.has_more_pages:
                        response.start_fetching_next_page()
                        return
                except BaseException as e:  # noqa: B902 - must reach the awaiting coroutine
                    _hand_over(loop, _reject, done, e)
                    return
                _hand_over(loop, _resolve, done, rows)

            def on_error(exc: BaseException) -> None:
                _hand_over(loop, _reject, done, exc)

            response.add_callbacks(on_page, on_error)
            try:
                return await done
            except _UNAVAILABLE_ERRORS as e:
                raise _unavailable(self.description, e) from e
            finally:
                # on_page refers to response and response to on_page: a reference cycle that
                # only the cyclic GC would free, and the server runs it rarely (app.py).
                response.clear_callbacks()

    def _bind(self, name: str, values: Sequence[Any]) -> BoundStatement:
        return self._binders[name](values)

    async def _write_phases(self, *phases: list[_Row],
                            cl: int) -> None:
        """Writes each phase's rows (batched, concurrently) once the phase before is durable:
        a failure part-way leaves duplicates for at-least-once delivery to absorb, never a
        task without a live row (docs/cassandra.md, "Where duplicates arise"). The
        StoreUnavailable raised says whether any row may have been written."""
        for i, rows in enumerate(phases):
            if not rows:
                continue
            results = await asyncio.gather(
                *(self._execute(b) for b in self._batches(rows, cl)), return_exceptions=True
            )
            failed = [r for r in results if isinstance(r, BaseException)]
            if not failed:
                continue
            first = failed[0]
            if not isinstance(first, StoreUnavailable):
                raise first
            # Written for certain nothing only when this is the first phase and every batch of
            # it was refused before the coordinator sent anything.
            maybe = i > 0 or len(failed) < len(results) or any(
                not isinstance(r, StoreUnavailable) or r.maybe_applied for r in failed)
            raise StoreUnavailable(str(first), maybe_applied=maybe,
                                   retry_after_ms=first.retry_after_ms) from first

    def _batches(
        self, rows: list[_Row], cl: int
    ) -> list[BatchStatement]:
        """UNLOGGED batches from (group, statement name, values, size estimate): one group per
        batch (a partition, or a replica for by-id rows), split by max_batch_rows/bytes."""
        max_rows, max_bytes = self.options.max_batch_rows, self.options.max_batch_bytes
        batches: list[BatchStatement] = []
        for members in group_by([r[0] for r in rows], rows).values():
            batch, size = None, 0
            for _, name, values, row_size in members:
                if batch is None or len(batch) >= max_rows or size + row_size > max_bytes:
                    batch, size = BatchStatement(BatchType.UNLOGGED, consistency_level=cl), 0
                    # Every statement batched here is in _IDEMPOTENT: the driver may resend the
                    # batch through another coordinator when the first dies with it in flight.
                    batch.is_idempotent = True
                    batches.append(batch)
                batch.add(self._binders[name](values))
                size += row_size
        return batches

    def _replica_of(self, task_id: str) -> Any:
        """The primary replica of a by-id row: rows grouped by it share a coordinator."""
        cluster = self._cluster
        if cluster is None:
            return None
        replicas = cluster.metadata.get_replicas(self.keyspace, task_id.encode())
        return replicas[0] if replicas else None

    def _ttl_s(self, due_ms: int, now_ms: int) -> int:
        return min(_MAX_TTL_S, (max(due_ms - now_ms, 0) + self._retention_ms) // 1000 + 1)

    def _add_counts(self, deltas: Mapping[int, int]) -> None:
        """Adds to the per-state counters in the background. Counters cannot share a batch with
        regular rows, and a counter write goes through one replica that leads it: a replica
        dead but not yet known dead holds it to the write timeout. Best effort, never in the
        caller's path: the tasks are already durable, and counts() is documented approximate."""
        for state, n in deltas.items():
            if n:
                self._count_deltas[state] += n
        if self._count_deltas and (self._counting is None or self._counting.done()):
            self._counting = asyncio.get_running_loop().create_task(self._write_counts())

    async def _write_counts(self) -> None:
        """One write per changed state for all deltas gathered meanwhile, until none are left.
        A failed write is not retried: a counter write that timed out may have been applied."""
        while self._count_deltas:
            deltas, self._count_deltas = self._count_deltas, defaultdict(int)
            writes = [self._execute(self._bind("add_count", (n, state)), self._cl["apply"])
                      for state, n in deltas.items() if n]
            for r in await asyncio.gather(*writes, return_exceptions=True):
                if isinstance(r, BaseException):
                    log.warning("%s: state count not updated: %s", self.description, r)

    # ---- insert ------------------------------------------------------------------------------

    async def insert(self, tasks: Sequence[TaskRecord]) -> list[InsertOutcome]:
        if not tasks:
            return []
        for t in tasks:
            if not 0 <= t.shard < self.num_shards:
                raise ValueError(
                    f"task {t.task_id}: shard {t.shard} outside 0..{self.num_shards - 1}"
                )
        outcomes: list[InsertOutcome | None] = [None] * len(tasks)
        first_with_key: dict[tuple[str, str], int] = {}
        claims = []
        repeats = []  # (index, index of the first task of this call with the same key)
        for i, t in enumerate(tasks):
            if not t.idempotency_key:
                continue
            key = (t.queue, t.idempotency_key)
            if key in first_with_key:
                repeats.append((i, first_with_key[key]))
            else:
                first_with_key[key] = i
                claims.append(i)
        if claims:
            holders = await asyncio.gather(*(self._claim(tasks[i]) for i in claims))
            for i, holder in zip(claims, holders):
                if holder is not None:
                    outcomes[i] = InsertOutcome(holder, duplicate=True)
        for i, first in repeats:  # the first of the call wins, or names the task it lost to
            winner = outcomes[first]
            outcomes[i] = InsertOutcome(
                winner.task_id if winner is not None else tasks[first].task_id, duplicate=True
            )
        now = now_ms()
        cl = self._cl["insert"]
        due_rows: list[_Row] = []
        task_rows: list[_Row] = []
        stored = 0
        for i, t in enumerate(tasks):
            if outcomes[i] is not None:
                continue
            outcomes[i] = InsertOutcome(t.task_id)
            stored += 1
            values = _new_task_values(t, gen=1, state=int(TaskState.SCHEDULED))
            ttl = self._ttl_s(t.due_ms, now)
            size = _row_size(t)
            task_rows.append((
                self._replica_of(t.task_id), "insert_task",
                (*values, ttl, _version(0, _RANK_INSERT)), size,
            ))
            due_rows.append((
                (t.shard, bucket_of(t.due_ms)), "insert_due", (bucket_of(t.due_ms), *values, ttl),
                size,
            ))
        if stored:
            # Due rows first: if the task rows then fail, an orphan due row fires once and its
            # lease is refused (no task row); the other order could leave a task that Get shows
            # and that never fires, and a retry with its key would be told it exists.
            await self._write_phases(due_rows, task_rows, cl=cl)
            self._add_counts({int(TaskState.SCHEDULED): stored})
        return outcomes  # type: ignore[return-value]

    async def _claim(self, t: TaskRecord) -> str | None:
        """Claims (queue, idempotency_key) for ``t``; None when it is ours, else the task id
        holding it. A holder with no task row is an insert that failed after claiming (or one
        still in flight): once its claim is claim_grace_ms old, the claim is taken over."""
        ttl = self._ttl_s(t.due_ms, now_ms())
        claim = self._bind("claim", (t.queue, t.idempotency_key, t.task_id, now_ms(), ttl))
        row = (await self._execute(claim, self._cl["insert"]))[0]
        while True:
            if row[0]:  # [applied]
                return None
            # Not applied: (False, queue, idempotency_key, claimed_ms, task_id)
            holder, claimed_ms = row[4], row[3] or 0
            exists = await self._execute(
                self._bind("select_exists", (holder,)), self._cl["get"]
            )
            if exists and exists[0][0] is not None:
                return holder
            if holder == t.task_id:  # our own earlier attempt claimed it, then failed
                return None
            wait_ms = claimed_ms + self.options.claim_grace_ms - now_ms()
            if wait_ms > 0:
                await asyncio.sleep(min(wait_ms, 100) / 1000)
                row = (False, t.queue, t.idempotency_key, claimed_ms, holder)
                continue
            steal = self._bind(
                "steal", (ttl, t.task_id, now_ms(), t.queue, t.idempotency_key, holder)
            )
            result = (await self._execute(steal, self._cl["insert"]))[0]
            if result[0]:
                return None
            # Someone else changed the claim first: (False, task_id) -> re-read it.
            row = (await self._execute(claim, self._cl["insert"]))[0]

    # ---- reads -------------------------------------------------------------------------------

    async def get(self, task_id: str) -> TaskRecord | None:
        rows = await self._execute(self._bind("select_task", (task_id,)), self._cl["get"])
        if not rows or rows[0][_STATE_AT] is None:  # no row, or only cells outliving an ended task
            return None
        return _record(rows[0])

    async def load_due(self, shard: int, from_ms: int, to_ms: int) -> list[TaskRecord]:
        self._check_shard(shard)
        if to_ms <= from_ms:
            return []
        cl = self._cl["load"]
        reads = []
        for bucket in range(bucket_of(from_ms), bucket_of(to_ms - 1) + 1):
            lo = max(from_ms, bucket * BUCKET_MS)
            hi = min(to_ms, (bucket + 1) * BUCKET_MS)
            reads.append(self._execute(self._bind("select_due", (shard, bucket, lo, hi)), cl))
            reads.append(self._execute(self._bind("select_done", (shard, bucket, lo, hi)), cl))
        results = await asyncio.gather(*reads)
        records = []
        for i in range(0, len(results), 2):
            due_rows, done_rows = results[i], results[i + 1]
            done = set(done_rows)  # (due_ms, task_id, gen)
            for row in due_rows:
                if (row[_DUE_MS_AT], row[_TASK_ID_AT], row[_GEN_AT]) not in done:
                    records.append(_record(row))
        # Rows written by a transition can lose a race without a marker (a lease beside an
        # ack of the same gen, docs/cassandra.md): unmarked ones, redeliveries and retries in
        # the healthy case, are checked against their task rows. Gen-1 rows are not: nothing
        # races an insert, and checking every row would double the cost of a load.
        suspects = {r.task_id for r in records if r.gen > 1}
        if suspects:
            current = await self._read_current(suspects, cl)
            records = [r for r in records if r.gen == 1 or _is_current(r, current.get(r.task_id))]
        return untracked(records)  # buckets in order, each clustered by (due_ms, task_id, gen)

    async def load_checkpoint(self, shard: int) -> int:
        self._check_shard(shard)
        rows = await self._execute(self._lease_statement("select_lease", (shard,), self._cl["serial"]))
        return max(rows[0][0], self.created_ms) if rows else self.created_ms

    # ---- shard leases and members --------------------------------------------------------------

    async def shard_leases(self) -> list[ShardLease]:
        rows = await self._execute(self._lease_statement("select_leases", (), self._cl["serial"]))
        found = {row[0]: ShardLease(row[0], row[1] or "", row[2] or 0, row[3] or 0,
                                    max(row[4] or 0, self.created_ms)) for row in rows}
        return [found.get(shard) or ShardLease(shard, "", 0, 0, self.created_ms)
                for shard in range(self.num_shards)]

    async def acquire_shards(self, node_id: str, seen: Sequence[ShardLease], expires_ms: int) -> list[ShardLease]:
        for lease in seen:
            self._check_shard(lease.shard)

        def statement(lease: ShardLease) -> BoundStatement:
            values = (node_id, lease.epoch + 1, expires_ms, lease.shard, lease.owner, lease.epoch)
            return self._bind("take_lease", values)

        def still(lease: ShardLease, now: ShardLease) -> bool:
            return (now.owner, now.epoch) == (lease.owner, lease.epoch)

        taken = await self._conditional({lease.shard: lease for lease in seen}, statement, still)
        return [ShardLease(lease.shard, node_id, lease.epoch + 1, expires_ms, lease.checkpoint_ms)
                for lease in seen if lease.shard in taken]

    async def renew_shards(self, node_id: str, held: Mapping[int, tuple[int, int]], expires_ms: int) -> set[int]:
        return set(held) - await self._change_held(node_id, held, expires_ms)

    async def release_shards(self, node_id: str, held: Mapping[int, tuple[int, int]]) -> set[int]:
        return await self._change_held(node_id, held, None)

    async def _change_held(self, node_id: str, held: Mapping[int, tuple[int, int]], expires_ms: int | None) -> set[int]:
        """Renews (expires_ms given) or releases the shards node_id holds at their epochs,
        saving their checkpoints; returns those changed."""
        for shard in held:
            self._check_shard(shard)

        def statement(item: tuple[int, int, int]) -> BoundStatement:
            shard, epoch, checkpoint = item
            checkpoint = max(checkpoint, self.created_ms)
            if expires_ms is None:
                return self._bind("release_lease", (checkpoint, shard, node_id, epoch))
            return self._bind("renew_lease", (expires_ms, checkpoint, shard, node_id, epoch))

        def still(item: tuple[int, int, int], now: ShardLease) -> bool:
            return (now.owner, now.epoch) == (node_id, item[1])

        return await self._conditional({shard: (shard, epoch, cp) for shard, (epoch, cp) in held.items()},
                                       statement, still)

    async def _conditional(self, items: Mapping[int, Any], statement: Callable[[Any], BoundStatement],
                           still: Callable[[Any, ShardLease], bool]) -> set[int]:
        """Applies each shard's conditional statement, up to _LEASE_BATCH a batch (one Paxos
        round on the leases' partition). A batch applies whole or not at all: one that did
        not apply is tried again, after a serial read, with only the shards whose lease is
        still as the caller expects. Returns the shards changed."""
        pending = dict(items)
        changed: set[int] = set()
        cl = self._cl["checkpoint"]
        for _ in range(_LEASE_ROUNDS):
            if not pending:
                break
            shards = sorted(pending)
            batches = []
            for i in range(0, len(shards), _LEASE_BATCH):
                batch = BatchStatement(BatchType.UNLOGGED, consistency_level=cl,
                                       serial_consistency_level=self._cl["serial"])
                for shard in shards[i:i + _LEASE_BATCH]:
                    batch.add(statement(pending[shard]))
                batches.append((shards[i:i + _LEASE_BATCH], batch))
            results = await asyncio.gather(*(self._execute(batch) for _, batch in batches))
            failed = []
            for (group, _), rows in zip(batches, results):
                if rows and rows[0][0]:  # [applied]
                    changed.update(group)
                    for shard in group:
                        del pending[shard]
                else:
                    failed.extend(group)
            if not failed:
                break
            now = await self.shard_leases()
            pending = {shard: pending[shard] for shard in failed if still(pending[shard], now[shard])}
        if pending:
            raise StoreUnavailable(f"{self.description}: shard leases kept changing under a conditional write")
        return changed

    async def heartbeat(self, member: Member) -> None:
        ttl = max(0, (member.expires_ms - now_ms()) // 1000) + _MEMBER_TTL_EXTRA_S
        await self._execute(self._bind("save_member", (
            member.node_id, member.address, set(member.roles), set(member.queues), member.started_ms,
            member.expires_ms, ttl)), self._cl["checkpoint"])

    async def members(self, now_ms: int) -> list[Member]:
        rows = await self._execute(self._bind("select_members", ()), self._cl["get"])
        return sorted((Member(node_id, address, frozenset(roles or ()), frozenset(queues or ()), started_ms, expires_ms)
                       for node_id, address, roles, queues, started_ms, expires_ms in rows
                       if expires_ms > now_ms), key=lambda m: m.node_id)

    async def leave(self, node_id: str) -> None:
        await self._execute(self._bind("delete_member", (node_id,)), self._cl["checkpoint"])

    async def counts(self) -> dict[TaskState, int]:
        if self._counting is not None:  # this store's own changes first
            await asyncio.shield(self._counting)
        rows = await self._execute(self._bind("select_counts", ()), self._cl["get"])
        counts = {s: 0 for s in TaskState}
        for state, n in rows:
            if state in _STATES:
                counts[_STATES[state]] = n or 0
        return counts

    # ---- changes -----------------------------------------------------------------------------

    async def cancel(self, task_id: str, now_ms: int) -> TaskRecord | None:
        record = await self.get(task_id)
        if record is None:
            return None
        if record.state in TERMINAL_STATES:
            raise AlreadyEnded(record)
        cl = self._cl["apply"]
        ttl = self._ttl_s(now_ms, now_ms)
        update = self._bind("update_task", (
            ttl, _version(record.gen, _RANK_CANCEL), record.gen, int(TaskState.CANCELLED),
            record.attempt, record.due_ms, now_ms, record.last_error, task_id,
        ))
        done = self._bind("insert_done", (
            record.shard, bucket_of(record.due_ms), record.due_ms, task_id, record.gen,
            int(TaskState.CANCELLED), self._ttl_s(record.due_ms, now_ms),
        ))
        # Task row first: a marker without it would leave a task that never fires.
        await self._execute(update, cl)
        await self._execute(done, cl)
        self._add_counts({int(record.state): -1, int(TaskState.CANCELLED): 1})
        record.state = TaskState.CANCELLED
        record.updated_ms = now_ms
        return record

    async def apply(self, transitions: Sequence[Transition], now_ms: int) -> list[bool]:
        if not transitions:
            return []
        for t in transitions:
            self._check_shard(t.shard)
            if t.kind in (TransitionKind.LEASE, TransitionKind.RETRY) and t.task is None:
                raise ValueError(
                    f"{t.kind.name} of task {t.task_id} carries no task: the new due row "
                    "needs its fields"
                )
            if t.kind not in _RANK:
                raise ValueError(f"unknown transition kind {t.kind!r}")
        current = await self._read_current({t.task_id for t in transitions}, self._cl["get"])
        cl = self._cl["apply"]
        applied: list[bool] = []
        due_rows: list[_Row] = []
        task_rows: list[_Row] = []
        done_rows: list[_Row] = []
        deltas: dict[int, int] = defaultdict(int)
        for t in transitions:
            cur = current.get(t.task_id)
            # cur = [gen, state, attempt, due_ms, last_error], advanced as transitions apply
            if cur is None or cur[0] != t.expected_gen or cur[1] in _TERMINAL:
                applied.append(False)
                continue
            gen, old_state, old_due = cur[0], cur[1], cur[3]
            kind = t.kind
            if kind == TransitionKind.LEASE or kind == TransitionKind.RETRY:
                task = t.task
                assert task is not None
                new_state = int(TaskState.LEASED if kind == TransitionKind.LEASE
                                else TaskState.SCHEDULED)
                error = t.error if kind == TransitionKind.RETRY else cur[4]
                cur[:] = [gen + 1, new_state, t.attempt, t.due_ms, error]
                values = _next_row_values(
                    task, task_id=t.task_id, shard=t.shard, due_ms=t.due_ms, gen=gen + 1,
                    state=new_state, attempt=t.attempt, updated_ms=now_ms, last_error=error,
                )
                size = _row_size(task)
                ttl = self._ttl_s(t.due_ms, now_ms)
                due_rows.append((
                    (t.shard, bucket_of(t.due_ms)), "insert_due",
                    (bucket_of(t.due_ms), *values, ttl), size,
                ))
                if kind == TransitionKind.RETRY:
                    # A retry may lie far ahead: rewrite the whole row so that every cell's
                    # TTL covers the new due time. A lease only moves due_ms by the lease.
                    task_rows.append((
                        self._replica_of(t.task_id), "insert_task",
                        (*values, ttl, _version(gen, _RANK[kind])), size,
                    ))
                    row_written = True
                else:
                    row_written = False
            else:
                new_state = int(TaskState.SUCCEEDED if kind == TransitionKind.SUCCEED
                                else TaskState.FAILED)
                if kind == TransitionKind.FAIL:
                    cur[4] = t.error
                cur[1] = new_state
                ttl = self._ttl_s(now_ms, now_ms)
                row_written = False
            if not row_written:
                task_rows.append((
                    self._replica_of(t.task_id), "update_task",
                    (ttl, _version(gen, _RANK[kind]), cur[0], cur[1], cur[2], cur[3], now_ms,
                     cur[4], t.task_id),
                    _SMALL_ROW_SIZE,
                ))
            done_rows.append((
                (t.shard, bucket_of(old_due)), "insert_done",
                (t.shard, bucket_of(old_due), old_due, t.task_id, gen, new_state,
                 self._ttl_s(old_due, now_ms)),
                _SMALL_ROW_SIZE,
            ))
            if new_state != old_state:
                deltas[old_state] -= 1
                deltas[new_state] += 1
            applied.append(True)
        if task_rows:
            # New due rows, then task rows, then the markers that retire the old rows: an
            # outage part-way never leaves a task without a live row.
            await self._write_phases(due_rows, task_rows, done_rows, cl=cl)
            self._add_counts(deltas)
        return applied

    async def _read_current(self, task_ids: set[str], cl: int) -> dict[str, list]:
        """task_id -> [gen, state, attempt, due_ms, last_error] of the by-id rows that exist.
        One ``IN`` read per primary replica and chunk, routed to that replica."""
        groups: dict[Any, list[str]] = defaultdict(list)
        for task_id in task_ids:
            groups[self._replica_of(task_id)].append(task_id)
        reads = []
        for ids in groups.values():
            for i in range(0, len(ids), _IN_CHUNK):
                chunk = ids[i:i + _IN_CHUNK]
                bound = self._bind("select_current", (chunk,))
                # The driver would route on the serialized list; route on a member instead.
                bound._routing_key = chunk[0].encode()
                reads.append(self._execute(bound, cl))
        current: dict[str, list] = {}
        for rows in await asyncio.gather(*reads):
            for task_id, gen, state, attempt, due_ms, last_error in rows:
                if state is not None:
                    current[task_id] = [gen, state, attempt, due_ms, last_error or ""]
        return current


_PACKERS: dict[type, Callable[[Any], bytes]] = {
    cqltypes.Int32Type: struct.Struct(">i").pack,
    cqltypes.LongType: struct.Struct(">q").pack,
    cqltypes.ByteType: struct.Struct(">b").pack,
    cqltypes.UTF8Type: str.encode,
    cqltypes.VarcharType: str.encode,
    cqltypes.BytesType: bytes,
}


class _Binder:
    """Binds values to a prepared statement several times faster than ``PreparedStatement.bind``
    (which builds a namedtuple per value for column encryption we do not use): the column
    types here are fixed, so each gets its serializer once. Values are in marker order."""

    __slots__ = ("prepared", "packers")

    def __init__(self, prepared: PreparedStatement):
        self.prepared = prepared
        version = prepared.protocol_version
        self.packers = [
            _PACKERS.get(column.type) or functools.partial(column.type.serialize,
                                                           protocol_version=version)
            for column in prepared.column_metadata
        ]

    def __call__(self, values: Sequence[Any]) -> BoundStatement:
        if len(values) != len(self.packers):
            raise ValueError(f"{len(values)} values for {len(self.packers)} markers in "
                             f"{self.prepared.query_string!r}")
        bound = BoundStatement(self.prepared)
        # None is UNSET, not null: a null in an INSERT writes a tombstone cell, and the timer
        # would scan past one per row (no headers, say) in every bucket it loads.
        bound.values = [UNSET_VALUE if v is None else pack(v)
                        for pack, v in zip(self.packers, values)]
        return bound


def _is_current(row: TaskRecord, current: list | None) -> bool:
    """The due row is the task's live one: [gen, state, attempt, due_ms, last_error] agree."""
    return (current is not None and current[0] == row.gen and current[3] == row.due_ms
            and current[1] not in _TERMINAL)


def _hand_over(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop closed while the request ran: nobody is waiting
        pass


def _resolve(future: asyncio.Future, rows: list[tuple]) -> None:
    if not future.done():
        future.set_result(rows)


def _reject(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _maps(cql: str) -> bool:
    return cql.startswith("frozen<map<")


def _values_with(*changed: str) -> Callable[..., tuple]:
    """``values(t, **changed)``: the values of ``t``'s columns in a tasks or due row, in FIELDS
    order, with the ``changed`` fields' values given instead of t's; an empty map goes as None,
    that is unset. Generated from the field list, as dataclasses generates ``__init__``: it
    runs once a row inserted or rescheduled, and reads each field as directly as code written
    out by hand."""
    values = ", ".join(
        name if name in changed else f"(t.{name} or None)" if _maps(COLUMNS[name].cql) else f"t.{name}"
        for name in FIELDS
    )
    namespace: dict[str, Any] = {}
    exec(f"def values(t, {', '.join(changed)}):\n    return ({values},)\n", namespace)
    return namespace["values"]


# A new task's rows: SCHEDULED at gen 1 whatever its record says.
_new_task_values = _values_with("gen", "state")
# A task's next due row (lease, retry): the transition's task, due time and attempt, the new gen
# and state, and when and why.
_next_row_values = _values_with(
    "task_id", "shard", "due_ms", "gen", "state", "attempt", "updated_ms", "last_error")
# Fields whose size varies with the task (text and blobs; maps are counted apart).
_sized_fields_of = operator.attrgetter(*(name for name in FIELDS if COLUMNS[name].cql in ("text", "blob")))


def _row_size(t: TaskRecord) -> int:
    """Estimated batch bytes of a full due row or tasks row (a cell a field, and the bucket) of
    this task; its task_id counts twice, as the row's key as well."""
    size = (sum(map(len, _sized_fields_of(t))) + len(t.task_id)
            + (len(FIELDS) + 1) * _CELL_OVERHEAD + 64)
    if t.headers:
        size += sum(len(k) + len(v) + 8 for k, v in t.headers.items())
    return size


def _dict_or_empty(value: Any) -> dict[str, str]:
    return dict(value) if value else {}


def _or_empty(value: Any) -> Any:
    return value or ""


def _or_empty_bytes(value: Any) -> Any:
    return value or b""


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TaskRecord)}


def _read_as(name: str) -> Any:
    """How a cell of field ``name`` becomes the record's value. A null cell (a column added
    after its row was written, or one that expired before the rest of the row) reads as empty
    where the field may be empty: the payload, the headers, and text with "" for default."""
    if name == "state":
        return _STATES
    cql = COLUMNS[name].cql
    if _maps(cql):
        return _dict_or_empty
    if cql == "blob":
        return _or_empty_bytes
    if cql == "text" and _DEFAULTS[name] == "":
        return _or_empty
    return None


# A row of select_task or select_due as a record, built from C (core.RecordShape).
_record = RecordShape(TaskRecord, FIELDS, [_read_as(name) for name in FIELDS], FIRING).build


__all__ = ["CassandraOptions", "CassandraStore"]
