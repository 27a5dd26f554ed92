"""Runs a scenario against one or more systems and writes their figures side by side.

    python perf/run_bench.py --driver celery --scenario steady --scale 0.05 --out perf/results/
    python perf/run_bench.py --driver taskwheel --driver celery --scenario spike --scale 0.1

For each driver (one after another, never at once: they share the machine's two cores):

1. ``driver.setup()`` starts its servers and workers (perf/drivers.py has the contract).
2. N submitter processes (``--submitters``, spawned) each take 1/N of every phase of the
   scenario. Every ``--tick-ms`` a submitter submits all its tasks due by the phase's rate
   profile so far, in batches of at most ``--batch``; a system slower than the profile builds a
   backlog that the submitter works off as fast as the system accepts (the achieved rate shows
   it). Paced phases start together (a barrier); unpaced ones go as fast as accepted.
3. Workers record each delivery (perf/drivers.py ReceiptLog); a thread samples every server
   process's RSS every 0.5 s and the system's own pending count every 2 s.
4. After the last submit the harness waits until every task due by the latest due time of the
   non-pending phases (the horizon) was delivered, or until ``--grace`` seconds past the
   horizon; the rest of them count as lost.
5. perf/report.py writes ``<driver>-<scenario>.json`` with two PNG plots into ``--out``, and,
   with several drivers, ``compare-<scenario>.md`` and an overlaid lateness CDF.

``--repeat N`` runs the drivers N times, taking turns, each run's outputs in ``OUT/run-K/``, and
writes every run's headline figures and their spread (median, min and max p99; with
``--p99-target-ms``, how many runs met it) to ``OUT/repeat-<scenario>.json`` and ``.md``: on a
shared machine one run's p99 is one draw from a wide distribution.

``--max-seconds`` bounds the whole submission; tasks not submitted by then are not submitted
(the JSON shows planned against submitted). Raw records stay in a temp dir, deleted unless
``--keep-raw``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import math
import multiprocessing as mp
import os
import platform
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from perf import report as report_mod  # noqa: E402
from perf.drivers import (  # noqa: E402
    RECEIPT_DTYPE, SUBMIT_DTYPE, Driver, count_records, read_records, receipts_dir, submits_dir,
)
from perf.scenarios import SCENARIOS, Scenario, get_scenario  # noqa: E402

# name -> "module:Class". A driver implements perf.drivers.Driver.
DRIVERS: dict[str, str] = {
    "celery": "perf.peers.celery_eta:CeleryEtaDriver",
    # taskwheel's own services through the public gRPC API (Ingest.Submit with repeated
    # TaskSpec, Dispatch.Consume with acks).
    "taskwheel": "perf.drivers_taskwheel:TaskwheelDriver",
}

MEMORY_SAMPLE_S = 0.5
PENDING_SAMPLE_S = 2.0


def load_driver_class(name: str) -> type[Driver]:
    try:
        module_name, class_name = DRIVERS[name].split(":")
    except KeyError:
        raise SystemExit(f"unknown driver {name!r}; known: {', '.join(DRIVERS)}") from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise SystemExit(
                f"driver {name!r} needs {module_name.replace('.', '/')}.py, a class {class_name} "
                "implementing perf.drivers.Driver (see that module's docstring)") from None
        raise
    return getattr(module, class_name)


# ------------------------------------------------------------------------- submitter processes

def _share(total: int, index: int, parts: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


def submitter_main(driver: Driver, scenario: Scenario, index: int, parts: int, run_dir: str,
                   batch_size: int, tick_s: float, deadline_s: float, seed: int,
                   t0_ms: Any, start: Any, barrier: Any, submitted: Any, results: Any) -> None:
    """One submitter process: its 1/parts of every phase, paced, recorded (module docstring)."""
    try:
        submitter = driver.connect(index)
        results.put(("ready", index, None))
        start.wait()
        windows = _submit_phases(submitter, scenario, index, parts, Path(run_dir), batch_size,
                                 tick_s, deadline_s, seed, t0_ms.value, barrier, submitted)
        submitter.close()
        results.put(("done", index, windows))
    except BaseException:  # report everything to the harness, which aborts the run
        barrier.abort()
        results.put(("error", index, traceback.format_exc()))


def _submit_phases(submitter, scenario: Scenario, index: int, parts: int, run_dir: Path,
                   batch_size: int, tick_s: float, deadline_s: float, seed: int, t0_ms: float,
                   barrier, submitted) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed * 1000 + index)
    log = open(submits_dir(run_dir) / f"{index}.bin", "ab", buffering=0)
    deadline = time.time() + deadline_s
    next_local = 0
    windows: list[dict[str, Any]] = []

    def send(phase_index: int, count: int) -> None:
        nonlocal next_local
        phase = scenario.phases[phase_index]
        while count > 0:
            n = min(count, batch_size)
            seqs = (np.arange(next_local, next_local + n, dtype=np.int64) * parts) + index
            now_ms = time.time() * 1000.0
            if phase.fire.kind == "same_second":
                at = t0_ms + phase.fire.offset_s * 1000.0
                fire_at = np.full(n, math.ceil(at / 1000.0) * 1000, dtype=np.int64)
            elif phase.fire.kind == "window":
                fire_at = (t0_ms + phase.fire.offset_s * 1000.0
                           + rng.random(n) * phase.fire.length_s * 1000.0).astype(np.int64)
            else:
                fire_at = (now_ms + phase.fire.offset_s * 1000.0
                           + rng.random(n) * phase.fire.length_s * 1000.0).astype(np.int64)
            submitter.submit(list(zip(seqs.tolist(), fire_at.tolist())))
            records = np.empty(n, dtype=SUBMIT_DTYPE)
            records["seq"] = seqs
            records["fire_at_ms"] = fire_at
            records["submitted_ms"] = time.time() * 1000.0
            records["phase"] = phase_index
            log.write(records.tobytes())
            with submitted.get_lock():
                submitted.value += n
            next_local += n
            count -= n

    if time.time() < t0_ms / 1000.0:
        time.sleep(t0_ms / 1000.0 - time.time())
    for phase_index, phase in enumerate(scenario.phases):
        barrier.wait(timeout=max(60.0, deadline - time.time() + 60.0))
        phase_start = time.time()
        window: dict[str, Any] = {"start_ms": phase_start * 1000.0, "tasks": 0}
        seg_start = phase_start
        for segment in phase.segments():
            mine = _share(segment.tasks, index, parts)
            if segment.rate is None:
                while mine > 0 and time.time() < deadline:
                    n = min(mine, batch_size)
                    send(phase_index, n)
                    mine -= n
                    window["tasks"] += n
                continue
            duration = segment.duration_s or 0.0
            sent = 0
            while sent < mine and time.time() < deadline:
                now = time.time()
                if now < seg_start:
                    time.sleep(seg_start - now)
                    continue
                due = mine if duration <= 0 else min(
                    mine, int(mine * (now - seg_start) / duration))
                if due > sent:
                    n = min(due - sent, batch_size)
                    send(phase_index, n)
                    window["tasks"] += n
                    sent += n
                if sent >= due:  # caught up: the next batch is what comes due in a tick
                    time.sleep(tick_s)
            seg_start += duration
        window["end_ms"] = time.time() * 1000.0
        windows.append(window)
        # A paced phase's time is part of the profile even when its tasks went out early.
        if phase.rate is not None and time.time() < seg_start:
            time.sleep(seg_start - time.time())
    log.close()
    return windows


# ------------------------------------------------------------------------------ sampling

def read_memory(pid: int) -> tuple[int, int] | None:
    """(RSS, peak RSS) of a process in bytes, or None when it is gone."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        rss = process.memory_info().rss
    except psutil.Error:
        return None
    peak = _peak_rss(pid)
    return rss, rss if peak is None else peak


def _peak_rss(pid: int) -> int | None:
    """The kernel's high-water mark of a process's RSS (VmHWM), which psutil does not give on
    Linux: it catches a peak between two samples."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def read_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used, or None when it is gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def read_thread_cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU seconds of each thread of a process, by thread name (threads of one
    name summed, the first thread called "main"); empty when it is gone."""
    try:
        threads = psutil.Process(pid).threads()
    except psutil.Error:
        return {}
    out: dict[str, float] = {}
    for thread in threads:
        if thread.id == pid:
            name = "main"
        else:
            try:  # psutil gives thread ids, not names
                name = Path(f"/proc/{pid}/task/{thread.id}/comm").read_text().rstrip("\n")
            except OSError:
                continue  # ended since the listing
        out[name] = out.get(name, 0.0) + thread.user_time + thread.system_time
    return out


def read_machine_cpu_seconds() -> dict[str, float]:
    """The whole machine's CPU seconds since boot, by kind (report.CPU_TIME_FIELDS)."""
    times = psutil.cpu_times()._asdict()
    return {kind: times.get(kind, 0.0) for kind in report_mod.CPU_TIME_FIELDS}


class Sampler(threading.Thread):
    """Samples every server process's RSS and the system's pending count until stopped."""

    def __init__(self, driver: Driver) -> None:
        super().__init__(daemon=True, name="sampler")
        self.driver = driver
        self.memory: dict[str, list[tuple[float, int]]] = {}
        self.hwm: dict[str, int] = {}
        # label -> [(t_ms, cpu_s) first seen, (t_ms, cpu_s) last seen]
        self.cpu: dict[str, list[tuple[float, float]]] = {}
        self.pending: list[tuple[float, int | None]] = []
        self.machine: list[tuple[float, dict[str, float]]] = []  # (t_ms, the machine's CPU seconds)
        # (t_ms, {server label: {thread name: cpu_s}}): where each server's CPU goes
        self.threads: list[tuple[float, dict[str, dict[str, float]]]] = []
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def sample_memory(self) -> None:
        now_ms = time.time() * 1000.0
        self.machine.append((now_ms, read_machine_cpu_seconds()))
        threads: dict[str, dict[str, float]] = {}
        self.threads.append((now_ms, threads))
        for label, pid in self.driver.server_pids().items():
            threads[label] = read_thread_cpu_seconds(pid)
            mem = read_memory(pid)
            if mem is None:
                continue
            self.memory.setdefault(label, []).append((now_ms, mem[0]))
            self.hwm[label] = max(self.hwm.get(label, 0), mem[1])
            cpu = read_cpu_seconds(pid)
            if cpu is not None:
                seen = self.cpu.setdefault(label, [(now_ms, cpu)])
                seen[1:] = [(now_ms, cpu)]

    def run(self) -> None:
        next_pending = 0.0
        while not self._stop_event.is_set():
            try:
                self.sample_memory()
                if time.monotonic() >= next_pending:
                    next_pending = time.monotonic() + PENDING_SAMPLE_S
                    self.pending.append((time.time() * 1000.0, self.driver.pending()))
            except Exception as exc:  # a sampling hiccup must not end the run
                self.errors.append(repr(exc))
            self._stop_event.wait(MEMORY_SAMPLE_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)
        self.sample_memory()


# ------------------------------------------------------------------------------- one run

def machine_context() -> dict[str, Any]:
    # psutil does not give the processor's model name; /proc/cpuinfo does on Linux.
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                    .splitlines() if line.startswith("model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        # Others' load when the run began: the machine is shared, so say how busy it was.
        "load_average_1m_before": round(os.getloadavg()[0], 2),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "git_commit": commit,
    }


def run_driver(name: str, scenario: Scenario, args: argparse.Namespace,
               options: dict[str, str]) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    machine = machine_context()
    driver_class = load_driver_class(name)
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-{scenario.name}-"))
    submits_dir(run_dir).mkdir()
    receipts_dir(run_dir).mkdir()
    driver = driver_class(run_dir, options)
    ctx = mp.get_context("spawn")
    procs: list[Any] = []
    sampler: Sampler | None = None
    try:
        console.print(f"[bold]{name}[/]: setting up (raw records in {run_dir})")
        driver.setup()
        sampler = Sampler(driver)
        sampler.start()
        parts = args.submitters
        t0_ms = ctx.Value("d", 0.0)
        start = ctx.Event()
        barrier = ctx.Barrier(parts)
        submitted = ctx.Value("q", 0)
        results = ctx.Queue()
        for index in range(parts):
            proc = ctx.Process(
                target=submitter_main, name=f"submitter-{index}",
                args=(driver, scenario, index, parts, str(run_dir), args.batch,
                      args.tick_ms / 1000.0, args.max_seconds, args.seed, t0_ms, start,
                      barrier, submitted, results))
            proc.start()
            procs.append(proc)
        ready = 0
        while ready < parts:
            kind, index, payload = results.get(timeout=120)
            if kind == "error":
                raise RuntimeError(f"submitter {index} failed to connect:\n{payload}")
            ready += 1
        time.sleep(2 * MEMORY_SAMPLE_S)  # baseline memory samples before the first submit
        t0_ms.value = time.time() * 1000.0 + 100.0
        start.set()

        planned = scenario.total_tasks
        due_in_run = planned - scenario.pending_tasks
        windows: dict[int, list[dict[str, Any]]] = {}
        columns = (TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn())
        with Progress(*columns, console=console, refresh_per_second=4) as progress:
            bar_submit = progress.add_task("submitted", total=planned, info="")
            bar_fire = progress.add_task("delivered", total=due_in_run, info="")
            last = (time.time(), 0, 0)

            def refresh(phase: str) -> None:
                nonlocal last
                now = time.time()
                sub = submitted.value
                dlv = count_records(receipts_dir(run_dir), RECEIPT_DTYPE)
                dt_s = max(now - last[0], 1e-3)
                if dt_s >= 1.0:
                    progress.update(bar_submit, info=f"{(sub - last[1]) / dt_s:9,.0f}/s")
                    progress.update(bar_fire, info=f"{(dlv - last[2]) / dt_s:9,.0f}/s {phase}")
                    last = (now, sub, dlv)
                progress.update(bar_submit, completed=sub)
                progress.update(bar_fire, completed=dlv)

            while len(windows) < parts:
                refresh("submitting")
                try:
                    kind, index, payload = results.get(timeout=0.25)
                except queue.Empty:
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"{dead[0].name} died with exit code "
                                           f"{dead[0].exitcode}") from None
                    continue
                if kind == "error":
                    raise RuntimeError(f"submitter {index} failed:\n{payload}")
                windows[index] = payload

            submits = read_records(submits_dir(run_dir), SUBMIT_DTYPE)
            pending_phases = [i for i, p in enumerate(scenario.phases) if p.pending]
            stream = submits[~np.isin(submits["phase"], pending_phases)]
            horizon_ms = float(stream["fire_at_ms"].max()) if stream.size else time.time() * 1e3
            expected = submits[submits["fire_at_ms"] <= horizon_ms]
            progress.update(bar_fire, total=expected.size)
            give_up_ms = horizon_ms + args.grace * 1000.0
            next_check = 0.0
            while True:
                refresh("draining")
                now_ms = time.time() * 1000.0
                if now_ms >= give_up_ms:
                    break
                if (now_ms >= horizon_ms and time.monotonic() >= next_check and count_records(
                        receipts_dir(run_dir), RECEIPT_DTYPE) >= expected.size):
                    # Enough receipts; duplicates could hide a missing one, so check the seqs
                    # (at most once a second: it reads every record).
                    next_check = time.monotonic() + 1.0
                    receipts = read_records(receipts_dir(run_dir), RECEIPT_DTYPE)
                    if np.isin(expected["seq"], receipts["seq"]).all():
                        break
                time.sleep(0.25)
            time.sleep(0.5)  # let workers' receipt logs flush their last records
            refresh("done")
        end_ms = time.time() * 1000.0
        sampler.stop()
        # The whole machine's cores, over the run and while its tasks fell due: a spell of the
        # host's (steal) or of other tenants' load shows here, not in any process's CPU.
        first_due_ms = float(stream["fire_at_ms"].min()) if stream.size else t0_ms.value
        machine["cpu_during_run"] = report_mod.machine_cpu_between(
            sampler.machine, t0_ms.value, end_ms)
        machine["cpu_while_due"] = report_mod.machine_cpu_between(
            sampler.machine, first_due_ms, horizon_ms)
        thread_cpu = report_mod.thread_cpu_between(sampler.threads, first_due_ms, horizon_ms)
        memory, hwm, cpu = sampler.memory, sampler.hwm, sampler.cpu
        pending = sampler.pending
        sampler_errors = sampler.errors
        sampler = None
        describe = driver.describe()
    finally:
        if sampler is not None:
            sampler.stop()
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join(timeout=5)
        driver.teardown()
    receipts = read_records(receipts_dir(run_dir), RECEIPT_DTYPE)
    phase_windows = _merge_windows(list(windows.values()), len(scenario.phases))
    machine["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    context = {
        "machine": machine,
        "driver": describe,
        "harness": {"submitters": args.submitters, "batch": args.batch, "tick_ms": args.tick_ms,
                    "grace_s": args.grace, "max_seconds": args.max_seconds, "seed": args.seed,
                    "command": " ".join(["python", "perf/run_bench.py", *sys.argv[1:]])},
        "planned_tasks": scenario.total_tasks,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "sampler_errors": sampler_errors[:5],
    }
    result = report_mod.build_report(
        driver=name, scenario=scenario.to_dict(), submits=submits, receipts=receipts,
        horizon_ms=horizon_ms, t0_ms=t0_ms.value, end_ms=end_ms, phase_windows=phase_windows,
        memory_samples=memory, memory_hwm=hwm, cpu_samples=cpu, thread_cpu_while_due=thread_cpu,
        reported_pending=pending,
        context=context)
    if args.keep_raw:
        console.print(f"raw records kept in {run_dir}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def _merge_windows(per_submitter: list[list[dict[str, Any]]], phases: int) -> list[dict]:
    merged = []
    for i in range(phases):
        ws = [w[i] for w in per_submitter if i < len(w)]
        merged.append({
            "start_ms": min((w["start_ms"] for w in ws), default=None),
            "end_ms": max((w["end_ms"] for w in ws), default=None),
            "tasks": sum(w["tasks"] for w in ws),
        })
    return merged


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} ms"


def summary_line(r: dict[str, Any]) -> str:
    late = r["fire"]["lateness_ms"]
    d = r["delivery"]
    mem = ", ".join(
        f"{k} {v['peak_rss_bytes'] / 2**20:.0f} MiB"
        + (f" ({v['rss_growth_per_pending_task_bytes'] / 1024:.1f} KiB/pending)"
           if v["rss_growth_per_pending_task_bytes"] is not None else "")
        for k, v in r["memory"].items())
    rate = r["submit"]["achieved_rate"] or 0.0
    best = r["submit"]["peak_rate_achieved"] or 0.0
    return (f"{r['driver']}: submitted {d['submitted']:,} at {rate:,.0f}/s "
            f"(best phase {best:,.0f}/s); "
            f"lateness p50 {_ms(late['p50'])} p99 {_ms(late['p99'])} max {_ms(late['max'])}; "
            f"delivered {d['delivered']:,}/{d['expected']:,} lost {d['lost']} "
            f"dup {d['duplicates']} early {d['early']}; peak pending "
            f"{r['pending']['peak_held']:,}; {mem}{_split_note(r)}{_machine_note(r)}{_threads_note(r)}")


def _split_note(r: dict[str, Any]) -> str:
    """Each part's own p99 (over all tasks, so they need not add up to the lateness p99): fired
    late by the timer, or late from firing to the worker."""
    split = r["fire"].get("lateness_split_ms")
    if not split:
        return ""
    return (f"; p99 fired - due {_ms(split['timer']['p99'])}, "
            f"received - fired {_ms(split['delivery']['p99'])}")


def _machine_note(r: dict[str, Any]) -> str:
    """The machine's cores during the run: what else was busy, and what the host took."""
    machine = r.get("context", {}).get("machine", {})
    use = machine.get("cpu_while_due") or {}
    if use.get("busy_cores") is None:
        return ""
    return (f"; while due: machine {use['busy_cores']:.2f} of {machine.get('cores', '?')} cores "
            f"busy, {use['steal_cores']:.2f} stolen by the host")


def _threads_note(r: dict[str, Any]) -> str:
    """Where each server's CPU went while tasks fell due: its busiest threads, in cores."""
    parts = []
    for label, threads in (r.get("cpu_while_due_by_thread") or {}).items():
        busy = [f"{name} {cores:.2f}" for name, cores in threads.items() if cores >= 0.02][:4]
        if busy:
            parts.append(f"{label} " + ", ".join(busy))
    return "; threads while due: " + "; ".join(parts) if parts else ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--driver", action="append", required=True, choices=sorted(DRIVERS),
                        help="system to run; repeat to run several on the same scenario")
    parser.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every rate and count (0.01 for a smoke run)")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="multiply every duration and fire offset (pending ones excepted)")
    parser.add_argument("--out", type=Path, default=REPO / "perf" / "results")
    parser.add_argument("--submitters", type=int, default=2, help="submitter processes")
    parser.add_argument("--batch", type=int, default=500, help="most tasks per submit() call")
    parser.add_argument("--tick-ms", type=float, default=10.0,
                        help="how often a paced submitter submits what is due")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds past the horizon before undelivered tasks count as lost")
    parser.add_argument("--max-seconds", type=float, default=600.0,
                        help="stop submitting after this many seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="driver option (see the driver's docstring); repeatable")
    parser.add_argument("--keep-raw", action="store_true", help="keep the raw record files")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the drivers this many times, taking turns; each run's outputs go to "
                             "OUT/run-K/ and the spread to OUT/repeat-<scenario>.json and .md")
    parser.add_argument("--p99-target-ms", type=float, default=None,
                        help="with --repeat, count the runs whose lateness p99 is at most this")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = dict(opt.split("=", 1) for opt in args.opt)
    scenario = get_scenario(args.scenario, args.scale, args.time_scale)
    every_run = []
    # Repeated runs take turns (driver A, driver B, A, B ...), so a slow spell of the shared
    # machine falls on both rather than on one driver's runs.
    for k in range(1, args.repeat + 1):
        out = args.out / f"run-{k}" if args.repeat > 1 else args.out
        reports = []
        for name in args.driver:
            result = run_driver(name, scenario, args, options)
            paths = report_mod.write_outputs(result, out)
            print(summary_line(result))
            print("wrote " + ", ".join(str(p) for p in paths.values()))
            reports.append(result)
        if len(reports) > 1:
            paths = report_mod.write_comparison(reports, out)
            print(paths["markdown"].read_text())
            print("wrote " + ", ".join(str(p) for p in paths.values()))
        every_run.extend(reports)
    if args.repeat > 1:
        paths = report_mod.write_repeat(every_run, args.out, args.p99_target_ms)
        print(paths["markdown"].read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
