"""Apache Cassandra for development and tests, one node or several, run from Maven Central jars.

    taskwheel dev cassandra start  --dir DIR [--nodes N] [--node I] [--port 9042] [--heap 1G] [--fast]
    taskwheel dev cassandra stop   --dir DIR [--node I]
    taskwheel dev cassandra kill   --dir DIR --node I
    taskwheel dev cassandra status --dir DIR
    python -m taskwheel.stores.cassandra.devserver start --dir DIR ...

There is no Docker engine and no tarball mirror on our machines, but Maven Central serves the
server itself (``org.apache.cassandra:cassandra-all``). ``start`` fetches it and its runtime
dependencies once with ``mvn dependency:copy-dependencies`` into ``~/.cache/taskwheel`` (outside
the repo), writes a single-node ``cassandra.yaml`` and ``logback.xml`` into DIR, starts
``java ... CassandraDaemon`` in the background, and returns once the native port answers a CQL
OPTIONS request, printing the contact point ``127.0.0.1:PORT``.

Ports are derived from the CQL port P: storage (internode) P+1, local JMX P+2. Two instances
coexist when their CQL ports are at least three apart; without ``--port`` a free triple is chosen.

Several nodes (``--nodes 3``) form one cluster on the loopback range, which needs no set-up:
node I listens on 127.0.0.I, all on CQL port P and storage port P+1, with its local JMX on
127.0.0.1:P+1+I; its files are in DIR/nodeI. Each owns one token, evenly spaced, so a keyspace of
replication factor N keeps a full copy on every node, and all are seeds, so any one can start
alone and rejoin. ``start --node I`` starts just that node (after ``kill``), ``stop --node I``
stops it cleanly, ``kill --node I`` kills it with SIGKILL.

Durability: the commit log syncs in group mode (2 ms window), so a write is acknowledged only
once it is fsynced and survives kill -9 of the server and a machine crash. ``--fast`` is for
throwaway test data only: no fsync of the commit log or system tables (schema changes are much
faster), and acknowledged writes survive only a clean stop: after a kill -9 they are gone.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

CASSANDRA_VERSION = "5.0.9"
HOST = "127.0.0.1"
DEFAULT_PORT = 9042
STORAGE_PORT_OFFSET = 1
JMX_PORT_OFFSET = 2
PORT_SPAN = 3
PID_FILE = "cassandra.pid"
PORT_FILE = "cassandra.port"
LOG_MARK_FILE = "log-start"  # system.log's size when the node was last started
MAX_NODES = 9
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0

_POM = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.taskwheel</groupId>
  <artifactId>cassandra-server-jars</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.cassandra</groupId>
      <artifactId>cassandra-all</artifactId>
      <version>{version}</version>
    </dependency>
  </dependencies>
</project>
"""


class DevServerError(Exception):
    """The dev server could not be fetched, started or stopped; the message says why."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "taskwheel"


def fetch_jars(version: str = CASSANDRA_VERSION, *, quiet: bool = False) -> Path:
    """The lib folder holding cassandra-all and its runtime jars, downloaded on first use.

    A lock file serialises concurrent first starts; the folder appears atomically (rename), so a
    half-finished download is never mistaken for a complete one."""
    root = cache_root() / f"cassandra-{version}"
    lib = root / "lib"
    if (lib / f"cassandra-all-{version}.jar").is_file():
        return lib
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (lib / f"cassandra-all-{version}.jar").is_file():
            return lib
        if shutil.which("mvn") is None:
            raise DevServerError("mvn is not installed: it fetches Cassandra from Maven Central")
        if not quiet:
            print(f"fetching cassandra-all {version} and its dependencies from Maven Central "
                  f"into {lib} (once)...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(dir=root) as work:
            (Path(work) / "pom.xml").write_text(_POM.format(version=version))
            staging = Path(work) / "lib"
            cmd = ["mvn", "-q", "-B", "-f", str(Path(work) / "pom.xml"),
                   "dependency:copy-dependencies", "-DincludeScope=runtime",
                   f"-DoutputDirectory={staging}"]
            done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if done.returncode != 0:
                raise DevServerError(
                    f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{done.stdout[-4000:]}")
            if not (staging / f"cassandra-all-{version}.jar").is_file():
                raise DevServerError(f"maven finished but cassandra-all-{version}.jar is missing "
                                     f"from {staging}")
            if lib.exists():
                shutil.rmtree(lib)
            os.rename(staging, lib)
    return lib


@dataclass(frozen=True)
class Ports:
    """Every port an instance of ``nodes`` nodes binds, all derived from the CQL port."""

    cql: int
    nodes: int = 1

    @property
    def storage(self) -> int:
        return self.cql + STORAGE_PORT_OFFSET

    @property
    def jmx(self) -> int:
        return self.jmx_of(1)

    def jmx_of(self, index: int) -> int:
        return self.cql + JMX_PORT_OFFSET + index - 1

    def all(self) -> tuple[int, ...]:
        return tuple(self.cql + i for i in range(PORT_SPAN + self.nodes - 1))

    def bindings_of(self, index: int) -> list[tuple[str, int]]:
        """(address, port) of every listening socket of node ``index``."""
        return [(host_of(index), self.cql), (host_of(index), self.storage), (HOST, self.jmx_of(index))]

    def bindings(self) -> list[tuple[str, int]]:
        """(address, port) of every listening socket of every node."""
        return [b for index in range(1, self.nodes + 1) for b in self.bindings_of(index)]


def host_of(index: int) -> str:
    """Node I of a cluster listens on 127.0.0.I (node 1 on HOST)."""
    return f"127.0.0.{index}"


@dataclass(frozen=True)
class Node:
    """One JVM: its number in the cluster, its directory and the cluster's ports."""

    index: int
    dir: Path
    ports: Ports

    @property
    def host(self) -> str:
        return host_of(self.index)

    @property
    def token(self) -> int:
        """Evenly spaced over Murmur3's range: each node owns an equal slice of the ring (a lone
        node keeps token 0, as directories made before clusters existed have)."""
        if self.ports.nodes == 1:
            return 0
        return -(2 ** 63) + (self.index - 1) * (2 ** 64 // self.ports.nodes)

    @property
    def name(self) -> str:
        return f"node {self.index} ({self.host}:{self.ports.cql})"


def _port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _busy(ports: Ports) -> list[tuple[str, int]]:
    return [(host, port) for host, port in ports.bindings() if not _port_is_free(port, host)]


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(nodes: int = 1) -> Ports:
    """A CQL port whose derived ports are free too, below the kernel's ephemeral range: a port
    in that range can be taken at any moment as the local end of some outgoing connection
    (the driver reconnecting, Cassandra dialing itself), and a restart would find it busy."""
    low, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        ports = Ports(rng.randrange(10_000, max(10_001, low - PORT_SPAN - nodes)), nodes)
        if not _busy(ports):
            return ports
    raise DevServerError("found no free run of ports on 127.0.0.1")


# Periodic sync acknowledges writes before their commit log section is marked synced, and
# replay stops at the last sync marker: a kill -9 of the server loses up to a period of
# acknowledged writes (measured: 213 of 500 lost). Group sync acknowledges after the fsync.
# A write thread waits for its group's sync, so writes/s <= concurrent_writes / window: the
# window is short and the write threads many (16 threads and 10 ms capped us at ~1,600/s).
_COMMITLOG_DURABLE = ("commitlog_sync: group\ncommitlog_sync_group_window: 2ms\n"
                      "concurrent_writes: 64")
# --fast: -Dcassandra.skip_sync also skips writing the sync markers, so no acknowledged write
# survives a kill -9 in any mode; periodic at least does not make writes wait for a sync.
_COMMITLOG_FAST = "commitlog_sync: periodic\ncommitlog_sync_period: 10000ms\nconcurrent_writes: 16"


def _config_yaml(node: Node, fast: bool = False) -> str:
    d, ports = node.dir, node.ports
    data = d / "data"
    commitlog = _COMMITLOG_FAST if fast else _COMMITLOG_DURABLE
    seeds = ",".join(f"{host_of(i)}:{ports.storage}" for i in range(1, ports.nodes + 1))
    return f"""\
# Written by taskwheel's dev launcher: {node.name} of {ports.nodes}, storage {ports.storage}.
cluster_name: taskwheel-dev
num_tokens: 1
initial_token: "{node.token}"
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "{seeds}"
listen_address: {node.host}
rpc_address: {node.host}
storage_port: {ports.storage}
native_transport_port: {ports.cql}
start_native_transport: true
# Every node starts with its own token, none streams data in: a node that rejoins catches up
# through hints and repair instead.
auto_bootstrap: false
# A replica that missed writes while down gets them replayed from the others when it is back
# (within max_hint_window); a lone node keeps none.
hinted_handoff_enabled: {"true" if ports.nodes > 1 else "false"}
authenticator: AllowAllAuthenticator
authorizer: AllowAllAuthorizer
{commitlog}
data_file_directories:
  - {data / "data"}
commitlog_directory: {data / "commitlog"}
saved_caches_directory: {data / "saved_caches"}
hints_directory: {data / "hints"}
cdc_raw_directory: {data / "cdc_raw"}
concurrent_reads: 16
concurrent_counter_writes: 16
concurrent_compactors: 1
auto_snapshot: false
# Tests create a keyspace of seven tables per test; slabbed memtables pin 1 MiB per table.
memtable_allocation_type: unslabbed_heap_buffers
# CassandraStore groups by-id rows per replica in UNLOGGED batches of up to ~40 KiB (under the
# default 50 KiB batch_size_fail_threshold); at the default 5 KiB / 10 partition warn levels
# every such batch would log a warning.
batch_size_warn_threshold: 50KiB
unlogged_batch_across_partitions_warn_threshold: 1000
"""


_LOGBACK = """\
<configuration scan="false">
  <appender name="FILE" class="ch.qos.logback.core.rolling.RollingFileAppender">
    <file>{logdir}/system.log</file>
    <rollingPolicy class="ch.qos.logback.core.rolling.SizeAndTimeBasedRollingPolicy">
      <fileNamePattern>{logdir}/system.log.%d{{yyyy-MM-dd}}.%i.zip</fileNamePattern>
      <maxFileSize>20MB</maxFileSize>
      <maxHistory>3</maxHistory>
      <totalSizeCap>100MB</totalSizeCap>
    </rollingPolicy>
    <encoder>
      <pattern>%-5level [%thread] %date{{ISO8601}} %F:%L - %msg%n</pattern>
    </encoder>
  </appender>
  <root level="INFO">
    <appender-ref ref="FILE"/>
  </root>
</configuration>
"""

# Cassandra's conf/jvm17-server.options (JPMS section): the server reaches into JDK internals.
_JPMS_FLAGS = [
    "-Djdk.attach.allowAttachSelf=true",
    *(f"--add-exports={m}=ALL-UNNAMED" for m in (
        "java.base/jdk.internal.misc",
        "java.management.rmi/com.sun.jmx.remote.internal.rmi",
        "java.rmi/sun.rmi.registry",
        "java.rmi/sun.rmi.server",
        "java.sql/java.sql",
        "java.base/java.lang.ref",
        "jdk.unsupported/sun.misc",
    )),
    *(f"--add-opens={m}=ALL-UNNAMED" for m in (
        "java.base/java.lang.module",
        "java.base/jdk.internal.loader",
        "java.base/jdk.internal.ref",
        "java.base/jdk.internal.reflect",
        "java.base/jdk.internal.math",
        "java.base/jdk.internal.module",
        "java.base/jdk.internal.util.jar",
        "jdk.management/com.sun.management.internal",
        "java.base/sun.nio.ch",
        "java.base/java.io",
        "java.base/java.lang.reflect",
        "java.base/java.lang",
        "java.base/java.util",
    )),
]


def java_major(java: str) -> int:
    out = subprocess.run([java, "-version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True).stdout
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not match:
        raise DevServerError(f"cannot read the version of {java}: {out.strip()}")
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def find_java() -> str:
    """A Java 11 or 17 runtime: Cassandra 5.0 runs on neither 8 nor 21+ (24 dropped the
    security manager it installs). $TASKWHEEL_JAVA, $JAVA_HOME, PATH, then /usr/lib/jvm."""
    candidates = [os.environ.get("TASKWHEEL_JAVA", "")]
    if os.environ.get("JAVA_HOME"):
        candidates.append(os.path.join(os.environ["JAVA_HOME"], "bin", "java"))
    candidates.append(shutil.which("java") or "")
    candidates += sorted(glob.glob("/usr/lib/jvm/*/bin/java"))
    seen = []
    for java in filter(None, candidates):
        if not os.access(java, os.X_OK):
            continue
        major = java_major(java)
        seen.append(f"{java} ({major})")
        if major in (11, 17):
            return java
    raise DevServerError("Cassandra 5.0 needs Java 11 or 17; found: " + (", ".join(seen) or "none"))


def java_command(java: str, lib: Path, node: Node, heap: str, fast: bool) -> list[str]:
    d, jmx = node.dir, node.ports.jmx_of(node.index)
    jamm = sorted(lib.glob("jamm-*.jar"))
    cmd = [
        java,
        f"-Xms{heap}", f"-Xmx{heap}",
        "-XX:+UseG1GC", "-XX:+ParallelRefProcEnabled", "-XX:MaxTenuringThreshold=1",
        "-XX:+ExitOnOutOfMemoryError", "-XX:+PerfDisableSharedMem",
        *_JPMS_FLAGS,
        *(f"-javaagent:{j}" for j in jamm[-1:]),
        "-Dio.netty.tryReflectionSetAccessible=true",
        "-Djava.net.preferIPv4Stack=true",
        "-Dcassandra-foreground=yes",
        f"-Dcassandra.config={(d / 'cassandra.yaml').as_uri()}",
        f"-Dcassandra.storagedir={d / 'data'}",
        f"-Dcassandra.logdir={d / 'logs'}",
        f"-Dlogback.configurationFile={d / 'logback.xml'}",
        # Local JMX (nodetool -p JMX_PORT); its RMI server would otherwise take a random port.
        f"-Dcassandra.jmx.local.port={jmx}",
        f"-Dcom.sun.management.jmxremote.rmi.port={jmx}",
        f"-Djava.io.tmpdir={d / 'tmp'}",
        f"-Djna.tmpdir={d / 'tmp'}",
        # No node bootstraps (each has its token): none need wait for gossip or the ring.
        "-Dcassandra.skip_wait_for_gossip_to_settle=0",
        "-Dcassandra.ring_delay_ms=1000",
    ]
    if fast:
        cmd += ["-Dcassandra.skip_sync=true", "-Dcassandra.unsafesystem=true"]
    cmd += ["-cp", str(lib / "*"), "org.apache.cassandra.service.CassandraDaemon"]
    return cmd


# A native-protocol v4 OPTIONS request; a live server answers SUPPORTED (opcode 0x06).
_CQL_OPTIONS = struct.pack(">BBhBi", 0x04, 0, 0, 0x05, 0)


def cql_answers(port: int, host: str = HOST, timeout: float = 1.0) -> bool:
    """True when the native transport accepts a connection and answers a CQL request."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.sendall(_CQL_OPTIONS)
            header = b""
            while len(header) < 9:
                chunk = conn.recv(9 - len(header))
                if not chunk:
                    return False
                header += chunk
    except OSError:
        return False
    return header[0] & 0x80 != 0 and header[4] == 0x06


def _read_pid(d: Path) -> int | None:
    try:
        return int((d / PID_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _is_ours(pid: int, d: Path) -> bool:
    """The pid is a live (not zombie) Cassandra started for this directory, not a recycled pid."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own exited child
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    # A JVM's main thread can exit first: the leader shows Z while other threads still run and
    # hold the sockets. Only a zombie without threads is gone.
    if fields.get("State", "").split()[:1] in (["Z"], ["X"]) and int(fields["Threads"]) <= 1:
        return False
    marker = f"-Dcassandra.config={(d / 'cassandra.yaml').as_uri()}".encode()
    return marker in cmdline


def running_pid(d: Path) -> int | None:
    pid = _read_pid(d)
    return pid if pid is not None and _is_ours(pid, d) else None


def saved_ports(d: Path) -> Ports | None:
    """The ports (and node count) the instance of directory ``d`` was last started with."""
    try:
        fields = [int(f) for f in (d / PORT_FILE).read_text().split()]
        return Ports(fields[0], fields[1] if len(fields) > 1 else 1)
    except (FileNotFoundError, ValueError, IndexError):
        return None


def members(d: Path, ports: Ports) -> list[Node]:
    """The nodes of directory ``d``: a lone node lives in ``d`` itself, node I of a cluster in
    ``d/nodeI``."""
    if ports.nodes == 1:
        return [Node(1, d, ports)]
    return [Node(i, d / f"node{i}", ports) for i in range(1, ports.nodes + 1)]


def log_tail(d: Path, lines: int = 40) -> str:
    parts = []
    for name in ("logs/system.log", "logs/stdout.log"):
        path = d / name
        if path.is_file():
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path} (last {len(text)} lines) ---\n" + "\n".join(text))
    return "\n".join(parts) or f"(no logs under {d / 'logs'})"


def start(d: Path | str, port: int | None = None, heap: str = "1G", fast: bool = False,
          timeout: float = START_TIMEOUT_S, quiet: bool = False, nodes: int | None = None,
          node: int | None = None) -> Ports:
    """Starts (or finds running) the nodes of directory ``d``; returns once CQL answers on each
    and every running node of a cluster holds every other running one up.

    ``nodes`` is the cluster's size (default: the directory's, else 1); ``node`` starts only
    that one of them. Without ``port`` a directory that ran before keeps its port, else a free
    one is chosen."""
    d = Path(d).absolute()
    saved = saved_ports(d)
    count = nodes or (saved.nodes if saved else 1)
    if not 1 <= count <= MAX_NODES:
        raise DevServerError(f"--nodes {count}: between 1 and {MAX_NODES}")
    if saved is not None and saved.nodes != count:
        raise DevServerError(f"{d} holds a cluster of {saved.nodes} node(s), not {count}; "
                             "stop it and use another --dir")
    if node is not None and not 1 <= node <= count:
        raise DevServerError(f"--node {node}: the cluster has nodes 1 to {count}")
    ports = Ports(port, count) if port is not None else (saved or free_ports(count))
    if saved is not None and ports != saved and any(
            running_pid(n.dir) for n in members(d, saved)):
        raise DevServerError(f"Cassandra already runs for {d} on port {saved.cql}; stop it first")
    chosen = [n for n in members(d, ports) if node is None or n.index == node]
    launch = [n for n in chosen if not _is_answering(n, timeout)]
    if launch:
        _launch_all(d, launch, heap, fast, timeout, quiet, restarting=saved == ports)
    if count > 1:
        _wait_for_gossip(members(d, ports), timeout)
    return ports


def _is_answering(node: Node, timeout: float) -> bool:
    """True when the node runs and answers CQL; False when it must be (re)started."""
    pid = running_pid(node.dir)
    if pid is None:
        return False
    if _wait_for_cql(node, lambda: _is_ours(pid, node.dir), timeout):
        return True
    if _is_ours(pid, node.dir):
        raise DevServerError(f"Cassandra pid {pid} runs but CQL on {node.name} does not answer\n"
                             f"{log_tail(node.dir)}")
    return False  # it was dying (killed, or crashed while starting)


def _launch_all(d: Path, launch: list[Node], heap: str, fast: bool, timeout: float, quiet: bool,
                restarting: bool) -> None:
    """Starts the JVMs of ``launch`` together and waits for each to answer CQL."""
    wanted = [b for n in launch for b in n.ports.bindings_of(n.index)]
    if restarting:  # a node of this directory may have just died: let go
        _wait_for_free(wanted, timeout=5.0)
    busy = [f"{host}:{port}" for host, port in wanted if not _port_is_free(port, host)]
    if busy:
        raise DevServerError(f"{', '.join(busy)} taken (CQL {launch[0].ports.cql} needs its "
                             "storage and JMX ports too); pick another --port")
    lib = fetch_jars(quiet=quiet)
    java = find_java()
    d.mkdir(parents=True, exist_ok=True)
    ports = launch[0].ports
    (d / PORT_FILE).write_text(f"{ports.cql}\n" if ports.nodes == 1 else
                               f"{ports.cql} {ports.nodes}\n")
    procs = [(n, _launch(n, java, lib, heap, fast)) for n in launch]
    failed = None
    for n, proc in procs:
        # Polled, not looked up in /proc: until the child has exec'd java, its cmdline is ours.
        if failed is None and not _wait_for_cql(n, lambda: proc.poll() is None, timeout):
            code = proc.poll()
            why = (f"CQL on {n.name} did not answer within {timeout:.0f}s" if code is None else
                   f"Cassandra {n.name} exited with status {code} while starting")
            failed = f"{why}\n{log_tail(n.dir)}"
    if failed is not None:
        for n, proc in procs:
            if proc.poll() is None:
                _terminate(proc.pid, n.dir)
            (n.dir / PID_FILE).unlink(missing_ok=True)
        raise DevServerError(failed)


def _launch(node: Node, java: str, lib: Path, heap: str, fast: bool) -> subprocess.Popen:
    d = node.dir
    for sub in ("data", "logs", "tmp"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "cassandra.yaml").write_text(_config_yaml(node, fast))
    (d / "logback.xml").write_text(_LOGBACK.format(logdir=d / "logs"))
    cmd = java_command(java, lib, node, heap, fast)
    (d / "java-command.txt").write_text(" ".join(cmd) + "\n")
    with open(d / "logs" / "stdout.log", "ab") as out:
        # Where this start's log begins: _wait_for_gossip reads only what follows.
        (d / LOG_MARK_FILE).write_text(f"{_log_size(d)}\n")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd=d, start_new_session=True)
    (d / PID_FILE).write_text(f"{proc.pid}\n")
    return proc


def _log_size(d: Path) -> int:
    try:
        return (d / "logs" / "system.log").stat().st_size
    except FileNotFoundError:
        return 0


# Gossip's lines when the failure detector marks a peer up or down (Gossiper.realMarkAlive,
# markDead).
_STATE_LINE = re.compile(r"InetAddress /(127\.0\.0\.\d+):\d+ is now (UP|DOWN)")


def peers_seen_up(node: Node) -> set[str]:
    """Addresses the node holds up now, by the last word its log has for each since the node's
    latest start."""
    try:
        mark = int((node.dir / LOG_MARK_FILE).read_text())
        with open(node.dir / "logs" / "system.log", "rb") as log:
            log.seek(mark)
            text = log.read().decode(errors="replace")
    except (FileNotFoundError, ValueError):
        return set()
    state = dict(_STATE_LINE.findall(text))
    return {address for address, word in state.items() if word == "UP"}


def _wait_for_gossip(nodes: list[Node], timeout: float) -> None:
    """Until each running node holds each other running one up: before that, a write at a level
    that needs every replica would be refused by a node that does not yet know its peers are
    back, and hints for a returning node would wait."""
    deadline = time.monotonic() + timeout
    while True:
        running = [n for n in nodes if running_pid(n.dir) is not None]
        missing = {n.name: sorted({m.host for m in running} - {n.host} - peers_seen_up(n))
                   for n in running}
        missing = {name: hosts for name, hosts in missing.items() if hosts}
        if not missing:
            return
        if time.monotonic() > deadline:
            raise DevServerError(f"nodes did not see each other up within {timeout:.0f}s: "
                                 f"{missing}")
        time.sleep(0.2)


def _wait_for_cql(node: Node, alive: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cql_answers(node.ports.cql, node.host):
            return True
        if not alive():
            return False
        time.sleep(0.2)
    return False


def _terminate(pid: int, d: Path, timeout: float = STOP_TIMEOUT_S) -> bool:
    """SIGTERM (Cassandra drains memtables in its shutdown hook), then SIGKILL after timeout.
    True when it exited on SIGTERM."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    return _await_exit(pid, d, timeout)


def _await_exit(pid: int, d: Path, timeout: float) -> bool:
    """Waits for a signalled node to exit, SIGKILLs it after timeout; True when it exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _is_ours(pid, d):
            return True
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    while _is_ours(pid, d):
        time.sleep(0.05)
    return False


def _wait_for_free(bindings: list[tuple[str, int]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(_port_is_free(p, h) for h, p in bindings):
        time.sleep(0.1)


def stop(d: Path | str, timeout: float = STOP_TIMEOUT_S, node: int | None = None) -> bool:
    """Stops the nodes of directory ``d`` (or just node ``node``), all at once. False when none
    was running."""
    d = Path(d).absolute()
    ports = saved_ports(d) or Ports(DEFAULT_PORT)
    chosen = [n for n in members(d, ports) if node is None or n.index == node]
    running = [(n, pid) for n in chosen if (pid := running_pid(n.dir)) is not None]
    for n, pid in running:  # all drain at once
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for n, pid in running:
        if not _await_exit(pid, n.dir, timeout):
            print(f"Cassandra pid {pid} ignored SIGTERM for {timeout:.0f}s; killed it",
                  file=sys.stderr)
    for n in chosen:
        (n.dir / PID_FILE).unlink(missing_ok=True)
    if saved_ports(d) is not None:  # so that a start right after this one finds them free
        _wait_for_free([b for n, _ in running for b in n.ports.bindings_of(n.index)])
    return bool(running)


def kill(d: Path | str, node: int = 1) -> bool:
    """kill -9 of one node, as a crash would: nothing is flushed. False when it was not
    running."""
    d = Path(d).absolute()
    ports = saved_ports(d)
    if ports is None or not 1 <= node <= ports.nodes:
        return False
    target = members(d, ports)[node - 1]
    pid = running_pid(target.dir)
    if pid is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    while _is_ours(pid, target.dir):
        time.sleep(0.05)
    return True


def status(d: Path | str) -> list[tuple[Node, int | None, bool]]:
    """(node, its pid or None, whether it answers CQL) for each node of directory ``d``."""
    d = Path(d).absolute()
    ports = saved_ports(d)
    if ports is None:
        return []
    found = []
    for n in members(d, ports):
        pid = running_pid(n.dir)
        found.append((n, pid, pid is not None and cql_answers(ports.cql, n.host)))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="taskwheel dev cassandra",
        description="Apache Cassandra on the loopback range for development and tests: one node, "
                    "or a cluster of several on 127.0.0.1, 127.0.0.2, ...")
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="start in the background; returns once CQL answers")
    p_start.add_argument("--dir", required=True, type=Path, help="config, data and logs")
    p_start.add_argument("--nodes", type=int, default=None,
                         help="nodes of the cluster (default: the directory's, else 1)")
    p_start.add_argument("--node", type=int, default=None,
                         help="start only this node of the cluster (1..nodes), e.g. after kill")
    p_start.add_argument("--port", type=int, default=None,
                         help=f"CQL port (default: the directory's last one, else {DEFAULT_PORT} "
                              "when free, else any free one); storage = port+1, JMX = port+2 "
                              "(node I of a cluster: port+1+I)")
    p_start.add_argument("--heap", default="1G", help="JVM heap of each node, e.g. 512M, 1G (default 1G)")
    p_start.add_argument("--fast", "--unsafe", dest="fast", action="store_true",
                         help="tests only: skip fsync of the commit log and system tables")
    p_start.add_argument("--timeout", type=float, default=START_TIMEOUT_S)
    p_stop = sub.add_parser("stop", help="stop cleanly (SIGTERM, then SIGKILL)")
    p_stop.add_argument("--dir", required=True, type=Path)
    p_stop.add_argument("--node", type=int, default=None, help="stop only this node")
    p_kill = sub.add_parser("kill", help="kill -9 one node, as a crash would")
    p_kill.add_argument("--dir", required=True, type=Path)
    p_kill.add_argument("--node", type=int, required=True)
    p_status = sub.add_parser("status", help="each node's state; exit 0 when all answer CQL, "
                                             "3 when none runs, 1 otherwise")
    p_status.add_argument("--dir", required=True, type=Path)
    args = parser.parse_args(argv)
    d = args.dir.absolute()
    try:
        if args.command == "start":
            port = args.port
            count = args.nodes or (saved_ports(d).nodes if saved_ports(d) else 1)
            if port is None and saved_ports(d) is None and not _busy(Ports(DEFAULT_PORT, count)):
                port = DEFAULT_PORT
            began = time.monotonic()
            ports = start(d, port=port, heap=args.heap, fast=args.fast, timeout=args.timeout,
                          nodes=args.nodes, node=args.node)
            pids = [str(running_pid(n.dir)) for n in members(d, ports)
                    if args.node in (None, n.index)]
            print(f"Cassandra {CASSANDRA_VERSION} answering CQL after "
                  f"{time.monotonic() - began:.1f}s (pid {', '.join(pids)}, logs in "
                  f"{d if ports.nodes == 1 else d / 'node*'}/logs)", file=sys.stderr)
            print(",".join(f"{n.host}:{ports.cql}" for n in members(d, ports)))
            return 0
        if args.command == "stop":
            if stop(d, node=args.node):
                print(f"stopped Cassandra for {d}", file=sys.stderr)
            else:
                print(f"no Cassandra running for {d}", file=sys.stderr)
            return 0
        if args.command == "kill":
            if kill(d, args.node):
                print(f"killed node {args.node} of {d}", file=sys.stderr)
                return 0
            print(f"node {args.node} of {d} is not running", file=sys.stderr)
            return 3
        nodes = status(d)
        if not any(pid for _, pid, _ in nodes):
            print(f"stopped ({d})")
            return 3
        for n, pid, answers in nodes:
            prefix = f"node {n.index}: " if len(nodes) > 1 else ""
            if pid is None:
                print(f"{prefix}stopped ({n.host}:{n.ports.cql})")
            elif not answers:
                print(f"{prefix}running (pid {pid}) but CQL on {n.host}:{n.ports.cql} does not "
                      "answer yet")
            else:
                print(f"{prefix}running (pid {pid}) at {n.host}:{n.ports.cql}")
        return 0 if all(answers for _, _, answers in nodes) else 1
    except DevServerError as err:
        print(f"taskwheel dev cassandra {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
