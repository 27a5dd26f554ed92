"""One taskwheel node on one Cassandra node (RF 1) against three (RF 3), side by side.

Each round starts a durable one-node dev Cassandra, warms it with a short run, runs the
end-to-end harness (``perf/run_bench.py``, one ``taskwheel up``) on a fresh keyspace, and stops
it cleanly; then the same on a three-node cluster on 127.0.0.1-3. Only one cluster runs at a
time. Besides the harness's figures (submit rate, fire lateness, taskwheel's CPU a task) it
records the Cassandra JVMs' CPU a task, sampled from /proc during the measured run, and the
keyspace's bytes on disk a task (all replicas, after the clean stop flushed the memtables).
Not a test: it asserts nothing; docs/performance.md quotes its figures.

    .venv/bin/python perf/bench_cassandra_nodes.py --rounds 2 --scale 0.2 --out OUT_DIR
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from taskwheel.stores.cassandra import devserver

REPO = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


def jvm_ticks(directory: Path) -> dict[int, int]:
    """utime + stime (clock ticks) of each running Cassandra JVM of a dev directory."""
    ports = devserver.saved_ports(directory)
    found = {}
    for node in devserver.members(directory, ports) if ports else ():
        pid = devserver.running_pid(node.dir)
        if pid is None:
            continue
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        found[pid] = int(fields[11]) + int(fields[12])
    return found


class CpuSampler:
    """Samples the JVMs' CPU every second; ``between(t0, t1)`` is CPU seconds per wall second
    over the samples inside that window."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.samples: list[tuple[float, dict[int, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), jvm_ticks(self.directory)))
            self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def cores_between(self, t0: float, t1: float) -> float:
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return float("nan")
        (a_t, a), (b_t, b) = inside[0], inside[-1]
        return sum(b[pid] - a.get(pid, b[pid]) for pid in b) / TICK / (b_t - a_t)


def run_bench(store: str, scale: float, submitters: int, out: Path) -> dict:
    subprocess.run([sys.executable, str(REPO / "perf" / "run_bench.py"), "--driver", "taskwheel",
                    "--scenario", "constant_10k", "--scale", str(scale), "--submitters", str(submitters),
                    "--opt", f"store={store}", "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL, stderr=open(out.with_suffix(".log"), "ab"))
    return json.loads((out / "taskwheel-constant_10k.json").read_text())


def disk_bytes(directory: Path, keyspace: str) -> int:
    """The keyspace's files on every node of a dev directory."""
    return sum(f.stat().st_size for data in directory.glob(f"**/data/data/{keyspace}")
               for f in data.rglob("*") if f.is_file())


def one_run(nodes: int, port: int, work: Path, name: str, args: argparse.Namespace) -> dict:
    directory = work / f"cassandra-{nodes}"
    devserver.start(directory, port=port, nodes=nodes, quiet=True)
    hosts = ",".join(devserver.host_of(i) for i in range(1, nodes + 1))
    url = f"cassandra://{hosts}:{port}/{{ks}}?shards=256&replication_factor={nodes}"
    sampler = CpuSampler(directory)
    try:
        key = name.replace("-", "_")
        run_bench(url.format(ks=f"warm_{key}"), 0.05, 1, work / f"warm-{name}")
        keyspace = f"bench_{key}"
        result = run_bench(url.format(ks=keyspace), args.scale, args.submitters, args.out / name)
    finally:
        sampler.stop()
        devserver.stop(directory)
    t0, t1 = result["run"]["t0_ms"] / 1000, result["run"]["end_ms"] / 1000
    tasks = result["submit"]["submitted"]
    cores = sampler.cores_between(t0, t1)
    return {
        "run": name, "cassandra_nodes": nodes, "replication_factor": nodes,
        "submitted_per_s": result["submit"]["achieved_rate"],
        "asked_per_s": result["submit"]["phases"][0]["target_rate"],
        "lateness_ms": {k: result["fire"]["lateness_ms"][k] for k in ("p50", "p99", "max")},
        "taskwheel_cpu_us_per_task": sum(v["cpu_us_per_task"] for v in result["cpu"].values()),
        "cassandra_cores_busy": cores,
        "cassandra_cpu_us_per_task": cores * (t1 - t0) / tasks * 1e6,
        "disk_bytes_per_task": disk_bytes(directory, keyspace) / tasks,
        "delivery": result["delivery"],
        "machine": result["context"]["machine"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scale", type=float, default=0.2, help="of constant_10k (0.2: 2,000 tasks/s)")
    parser.add_argument("--submitters", type=int, default=2)
    parser.add_argument("--port", type=int, default=19342, help="CQL port of both clusters")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    runs = []
    for round_ in range(1, args.rounds + 1):
        for nodes in (1, 3):
            runs.append(one_run(nodes, args.port, work, f"r{round_}-c{nodes}", args))
            r = runs[-1]
            print(f"{r['run']}: {r['submitted_per_s']:,.0f}/s, p99 {r['lateness_ms']['p99']:.1f} ms, "
                  f"taskwheel {r['taskwheel_cpu_us_per_task']:.0f} us, cassandra "
                  f"{r['cassandra_cpu_us_per_task']:.0f} us, disk {r['disk_bytes_per_task']:.0f} B a task",
                  flush=True)
    pairs = [(runs[i], runs[i + 1]) for i in range(0, len(runs), 2)]
    ratios = {key: statistics.median(b[key] / a[key] for a, b in pairs) for key in (
        "submitted_per_s", "taskwheel_cpu_us_per_task", "cassandra_cpu_us_per_task", "disk_bytes_per_task")}
    ratios["p99"] = statistics.median(b["lateness_ms"]["p99"] / a["lateness_ms"]["p99"] for a, b in pairs)
    (args.out / "cassandra-nodes.json").write_text(json.dumps({"runs": runs, "ratios_3_over_1": ratios}, indent=1))
    print("3 nodes over 1 (median of pairs):", {k: round(v, 2) for k, v in ratios.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
