"""A single-node Apache Cassandra for development and tests, run straight from Maven Central jars.

    taskwheel dev cassandra start  --dir DIR [--port 9042] [--heap 1G] [--fast]
    taskwheel dev cassandra stop   --dir DIR
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
    """Every port one instance binds, all derived from the CQL port."""

    cql: int

    @property
    def storage(self) -> int:
        return self.cql + STORAGE_PORT_OFFSET

    @property
    def jmx(self) -> int:
        return self.cql + JMX_PORT_OFFSET

    def all(self) -> tuple[int, ...]:
        return tuple(self.cql + i for i in range(PORT_SPAN))


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_ports() -> Ports:
    """A CQL port whose derived ports are free too, below the kernel's ephemeral range: a port
    in that range can be taken at any moment as the local end of some outgoing connection
    (the driver reconnecting, Cassandra dialing itself), and a restart would find it busy."""
    low, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        cql = rng.randrange(10_000, max(10_001, low - PORT_SPAN))
        if all(_port_is_free(p) for p in Ports(cql).all()):
            return Ports(cql)
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


def _config_yaml(d: Path, ports: Ports, fast: bool = False) -> str:
    data = d / "data"
    commitlog = _COMMITLOG_FAST if fast else _COMMITLOG_DURABLE
    return f"""\
# Written by taskwheel's dev launcher: one node on {HOST}, CQL {ports.cql}, storage {ports.storage}.
cluster_name: taskwheel-dev
num_tokens: 1
initial_token: "0"
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "{HOST}:{ports.storage}"
listen_address: {HOST}
rpc_address: {HOST}
storage_port: {ports.storage}
native_transport_port: {ports.cql}
start_native_transport: true
auto_bootstrap: false
hinted_handoff_enabled: false
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


def java_command(java: str, lib: Path, d: Path, ports: Ports, heap: str, fast: bool) -> list[str]:
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
        f"-Dcassandra.jmx.local.port={ports.jmx}",
        f"-Dcom.sun.management.jmxremote.rmi.port={ports.jmx}",
        f"-Djava.io.tmpdir={d / 'tmp'}",
        f"-Djna.tmpdir={d / 'tmp'}",
        # A lone node that never bootstraps need not wait for gossip or the ring.
        "-Dcassandra.skip_wait_for_gossip_to_settle=0",
        "-Dcassandra.ring_delay_ms=1000",
        "-Dcassandra.initial_token=0",
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
    try:
        return Ports(int((d / PORT_FILE).read_text().strip()))
    except (FileNotFoundError, ValueError):
        return None


def log_tail(d: Path, lines: int = 40) -> str:
    parts = []
    for name in ("logs/system.log", "logs/stdout.log"):
        path = d / name
        if path.is_file():
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path} (last {len(text)} lines) ---\n" + "\n".join(text))
    return "\n".join(parts) or f"(no logs under {d / 'logs'})"


def start(d: Path | str, port: int | None = None, heap: str = "1G", fast: bool = False,
          timeout: float = START_TIMEOUT_S, quiet: bool = False) -> Ports:
    """Starts (or finds running) the node for directory ``d``; returns once CQL answers.

    Without ``port`` a directory that ran before keeps its port, else a free one is chosen."""
    d = Path(d).absolute()
    pid = running_pid(d)
    if pid is not None:
        ports = saved_ports(d)
        if not ports or (port is not None and port != ports.cql):
            raise DevServerError(f"Cassandra pid {pid} already runs for {d} on another port; "
                                 "stop it first")
        if _wait_for_cql(ports, lambda: _is_ours(pid, d), timeout):
            return ports
        if _is_ours(pid, d):
            raise DevServerError(f"Cassandra pid {pid} runs but CQL on {ports.cql} does not "
                                 f"answer\n{log_tail(d)}")
        # It was dying (killed, or crashed while starting): start a new one below.
    ports = Ports(port) if port is not None else (saved_ports(d) or free_ports())
    if saved_ports(d) == ports:  # a node of this directory may have just died: let go
        _wait_for_ports_released(ports, timeout=5.0)
    busy = [p for p in ports.all() if not _port_is_free(p)]
    if busy:
        raise DevServerError(f"ports {busy} on {HOST} are taken (CQL {ports.cql} needs "
                             f"{ports.cql}..{ports.cql + PORT_SPAN - 1}); pick another --port")
    lib = fetch_jars(quiet=quiet)
    java = find_java()
    for sub in ("data", "logs", "tmp"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "cassandra.yaml").write_text(_config_yaml(d, ports, fast))
    (d / "logback.xml").write_text(_LOGBACK.format(logdir=d / "logs"))
    (d / PORT_FILE).write_text(f"{ports.cql}\n")
    cmd = java_command(java, lib, d, ports, heap, fast)
    (d / "java-command.txt").write_text(" ".join(cmd) + "\n")
    with open(d / "logs" / "stdout.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd=d, start_new_session=True)
    (d / PID_FILE).write_text(f"{proc.pid}\n")
    # Polled, not looked up in /proc: until the child has exec'd java, its cmdline is ours.
    if not _wait_for_cql(ports, lambda: proc.poll() is None, timeout):
        code = proc.poll()
        tail = log_tail(d)
        if code is None:
            _terminate(proc.pid, d)
            why = f"CQL on {HOST}:{ports.cql} did not answer within {timeout:.0f}s"
        else:
            why = f"Cassandra exited with status {code} while starting"
        (d / PID_FILE).unlink(missing_ok=True)
        raise DevServerError(f"{why}\n{tail}")
    return ports


def _wait_for_cql(ports: Ports, alive: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cql_answers(ports.cql):
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


def _wait_for_ports_released(ports: Ports, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(_port_is_free(p) for p in ports.all()):
        time.sleep(0.1)


def stop(d: Path | str, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stops the node of directory ``d``. False when none was running."""
    d = Path(d).absolute()
    pid = running_pid(d)
    if pid is None:
        (d / PID_FILE).unlink(missing_ok=True)
        return False
    if not _terminate(pid, d, timeout):
        print(f"Cassandra pid {pid} ignored SIGTERM for {timeout:.0f}s; killed it", file=sys.stderr)
    (d / PID_FILE).unlink(missing_ok=True)
    ports = saved_ports(d)
    if ports is not None:  # so that a start right after this one finds them free
        _wait_for_ports_released(ports)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="taskwheel dev cassandra",
        description="A single-node Apache Cassandra on 127.0.0.1 for development and tests.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="start in the background; returns once CQL answers")
    p_start.add_argument("--dir", required=True, type=Path, help="config, data and logs")
    p_start.add_argument("--port", type=int, default=None,
                         help=f"CQL port (default: the directory's last one, else {DEFAULT_PORT} "
                              "when free, else any free one); storage = port+1, JMX = port+2")
    p_start.add_argument("--heap", default="1G", help="JVM heap, e.g. 512M, 1G (default 1G)")
    p_start.add_argument("--fast", "--unsafe", dest="fast", action="store_true",
                         help="tests only: skip fsync of the commit log and system tables")
    p_start.add_argument("--timeout", type=float, default=START_TIMEOUT_S)
    for name, text in (("stop", "stop cleanly (SIGTERM, then SIGKILL)"),
                       ("status", "exit 0 when running and answering CQL, 3 when stopped")):
        sub.add_parser(name, help=text).add_argument("--dir", required=True, type=Path)
    args = parser.parse_args(argv)
    d = args.dir.absolute()
    try:
        if args.command == "start":
            port = args.port
            if port is None and saved_ports(d) is None and all(
                    _port_is_free(p) for p in Ports(DEFAULT_PORT).all()):
                port = DEFAULT_PORT
            began = time.monotonic()
            ports = start(d, port=port, heap=args.heap, fast=args.fast, timeout=args.timeout)
            print(f"Cassandra {CASSANDRA_VERSION} answering CQL after "
                  f"{time.monotonic() - began:.1f}s (pid {running_pid(d)}, logs in {d / 'logs'})",
                  file=sys.stderr)
            print(f"{HOST}:{ports.cql}")
            return 0
        if args.command == "stop":
            if stop(d):
                print(f"stopped Cassandra for {d}", file=sys.stderr)
            else:
                print(f"no Cassandra running for {d}", file=sys.stderr)
            return 0
        pid = running_pid(d)
        known = saved_ports(d)
        if pid is None or known is None:
            print(f"stopped ({d})")
            return 3
        if not cql_answers(known.cql):
            print(f"running (pid {pid}) but CQL on {HOST}:{known.cql} does not answer yet")
            return 1
        print(f"running (pid {pid}) at {HOST}:{known.cql}")
        return 0
    except DevServerError as err:
        print(f"taskwheel dev cassandra {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
