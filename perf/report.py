"""Turns a run's records into the figures a user chooses a scheduler on, as JSON and PNG plots.

Inputs (see perf/drivers.py for the record layouts):

* submit records, one per task: ``seq, fire_at_ms, submitted_ms, phase``;
* receipt records, one per delivery seen by a worker: ``seq, fire_at_ms, received_ms, pid,
  fired_ms`` (NaN when the system does not say when it fired the task);
* memory samples of each server process (RSS every 0.5 s, and its peak as the kernel kept it);
* the run's horizon: tasks due at or before it were expected to be delivered before the run
  stopped waiting (the horizon is the last wait's start minus the grace period).

Definitions:

* **lateness** = the first delivery's ``received_ms - fire_at_ms``, measured at the worker;
  percentiles are nearest-rank (an observed value, never an interpolation). Where the system
  says when it fired a task, the lateness is also split (``fire.lateness_split_ms``): fired -
  fire_at, the scheduler's share, and received - fired, the delivery's. One clock measures
  all three on one machine; across machines the split carries their clocks' offset.
* **delivered** = distinct tasks received at least once; **duplicates** = deliveries beyond
  the first of a task; **lost** = tasks due by the horizon never received; **early** = first
  deliveries before ``fire_at``; **unknown** = deliveries of a seq nobody submitted.
* **CPU** of each server process: user + system seconds between its first and last sample,
  and that over the wall time between them (cores busy; 1.0 is one core all the time), and
  per task submitted: what each task cost, whatever else the shared machine was doing. And
  while the tasks fell due, per thread of each server (``cpu_while_due_by_thread``, by thread
  name, threads of one name summed): which part of a server the time went to.
* **submit rate** = tasks accepted / wall time from the phase's start to its last accepted
  batch, per phase and over the paced phases together.
* **pending held** = accepted and not yet delivered, over time; the peak is what the servers
  had to hold at once. **RSS per pending task** = (peak RSS - RSS before the first submit) /
  peak pending held: an upper bound of what each held task costs, shown only when at least
  1,000 tasks were held.

``python perf/report.py --compare a.json b.json ... --out DIR`` draws the drivers' lateness
CDFs on one plot and prints a Markdown table of them.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TypeVar

import numpy as np

PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0, 99.9)
MIN_PENDING_FOR_MEMORY = 1000
BIN_S = 1.0
MIN_BYTES_PER_TASK_SHOWN = 256  # processes that grew less per held task are left out of tables
MAX_ROW = 4.5  # where the lateness CDF plots the maximum
T = TypeVar("T")


def percentile_summary(values: np.ndarray) -> dict[str, float | int | None]:
    """count, min, mean, nearest-rank p50/p90/p99/p99.9, max of ``values``."""
    values = np.asarray(values, dtype=np.float64)
    out: dict[str, float | int | None] = {"count": int(values.size)}
    if values.size == 0:
        out.update({"min": None, "mean": None, "max": None})
        out.update({_pname(p): None for p in PERCENTILES})
        return out
    out["min"] = float(values.min())
    out["mean"] = float(values.mean())
    ordered = np.sort(values)
    for p in PERCENTILES:
        out[_pname(p)] = float(ordered[nearest_rank(p / 100.0, ordered.size) - 1])
    out["max"] = float(values.max())
    return out


def nearest_rank(q: float, n: int) -> int:
    """The 1-based rank of the q-quantile of n values: ceil(q * n), clamped to 1..n.

    The small tolerance keeps float error from pushing an exact product to the next rank
    (0.999 * 1000 is 999.0000000000001 in floating point; numpy's inverted_cdf says 1000).
    """
    return min(n, max(1, math.ceil(q * n - 1e-9)))


def _pname(p: float) -> str:
    return "p" + (f"{p:g}")


def first_deliveries(receipts: np.ndarray) -> np.ndarray:
    """The earliest receipt of each distinct seq, ordered by seq."""
    if receipts.size == 0:
        return receipts
    order = np.lexsort((receipts["received_ms"], receipts["seq"]))
    ordered = receipts[order]
    first = np.ones(ordered.size, dtype=bool)
    first[1:] = ordered["seq"][1:] != ordered["seq"][:-1]
    return ordered[first]


def delivery_summary(submits: np.ndarray, receipts: np.ndarray,
                     horizon_ms: float) -> dict[str, int]:
    """Counts of delivered, lost, duplicate, early and unknown deliveries (module docstring)."""
    firsts = first_deliveries(receipts)
    submitted_seqs = np.unique(submits["seq"])
    expected = submits[submits["fire_at_ms"] <= horizon_ms]
    received = np.isin(expected["seq"], firsts["seq"])
    not_yet_due = submits[submits["fire_at_ms"] > horizon_ms]
    return {
        "submitted": int(submitted_seqs.size),
        "expected": int(expected.size),
        "delivered": int(firsts.size),
        "lost": int((~received).sum()),
        "duplicates": int(receipts.size - firsts.size),
        "early": int((firsts["received_ms"] < firsts["fire_at_ms"]).sum()),
        "unknown": int((~np.isin(firsts["seq"], submitted_seqs)).sum()),
        "pending_at_end": int((~np.isin(not_yet_due["seq"], firsts["seq"])).sum()),
    }


def first_deliveries_due(receipts: np.ndarray, horizon_ms: float | None) -> np.ndarray:
    """first_deliveries of the tasks due by the horizon (all of them without one)."""
    firsts = first_deliveries(receipts)
    return firsts if horizon_ms is None else firsts[firsts["fire_at_ms"] <= horizon_ms]


def lateness_ms(receipts: np.ndarray, horizon_ms: float | None = None) -> np.ndarray:
    """Lateness of each task's first delivery (tasks due by the horizon, when one is given)."""
    firsts = first_deliveries_due(receipts, horizon_ms)
    return firsts["received_ms"] - firsts["fire_at_ms"].astype(np.float64)


def lateness_split(receipts: np.ndarray, horizon_ms: float | None = None) -> dict[str, Any] | None:
    """Each first delivery's lateness in two parts, where the system says when it fired the
    task: ``timer`` (fired - fire_at: the wheel, and the event loop's turn it fired in) and
    ``delivery`` (received - fired: dispatch, gRPC, the worker's process getting a core).
    None when no delivery says (a peer). taskwheel's fired_at is a whole millisecond rounded
    down, so the timer's part reads up to 1 ms low and the delivery's up to 1 ms high; each
    part's percentiles are over all tasks, so the two p99s need not add up to the p99."""
    firsts = first_deliveries_due(receipts, horizon_ms)
    if "fired_ms" not in (firsts.dtype.names or ()):
        return None
    known = firsts[np.isfinite(firsts["fired_ms"])]
    if known.size == 0:
        return None
    return {
        "timer": percentile_summary(known["fired_ms"] - known["fire_at_ms"].astype(np.float64)),
        "delivery": percentile_summary(known["received_ms"] - known["fired_ms"]),
    }


def lateness_series(receipts: np.ndarray, start_ms: float, end_ms: float, horizon_ms: float | None = None,
                    bin_s: float = BIN_S) -> dict[str, list[float | None]]:
    """Nearest-rank p50, p99 and the max of lateness per ``bin_s`` bin of the tasks' fire_at,
    from ``start_ms`` to ``end_ms`` (None where no task was due): whether the tail is spread
    over the run or comes from a few bad seconds."""
    firsts = first_deliveries_due(receipts, horizon_ms)
    n_bins = max(1, math.ceil((end_ms - start_ms) / (bin_s * 1000.0)))
    late = firsts["received_ms"] - firsts["fire_at_ms"].astype(np.float64)
    bins = np.floor((firsts["fire_at_ms"] - start_ms) / (bin_s * 1000.0)).astype(np.int64)
    out: dict[str, list[float | None]] = {"p50": [], "p99": [], "max": []}
    order = np.argsort(bins, kind="stable")
    bins, late = bins[order], late[order]
    edges = np.searchsorted(bins, np.arange(n_bins + 1))
    for b in range(n_bins):
        summary = percentile_summary(late[edges[b]:edges[b + 1]])  # all None for an empty bin
        for key in out:
            out[key].append(summary[key])
    return out


def rate_series(times_ms: np.ndarray, start_ms: float, end_ms: float,
                bin_s: float = BIN_S) -> np.ndarray:
    """Events per second in consecutive ``bin_s`` bins from ``start_ms`` to ``end_ms``."""
    n_bins = max(1, math.ceil((end_ms - start_ms) / (bin_s * 1000.0)))
    edges = start_ms + np.arange(n_bins + 1) * bin_s * 1000.0
    counts, _ = np.histogram(times_ms, bins=edges)
    return counts / bin_s


def pending_series(submitted_ms: np.ndarray, first_received_ms: np.ndarray, start_ms: float,
                   end_ms: float, bin_s: float = BIN_S) -> np.ndarray:
    """Tasks accepted and not yet delivered, at the end of each bin."""
    n_bins = max(1, math.ceil((end_ms - start_ms) / (bin_s * 1000.0)))
    ends = start_ms + np.arange(1, n_bins + 1) * bin_s * 1000.0
    accepted = np.searchsorted(np.sort(submitted_ms), ends, side="right")
    delivered = np.searchsorted(np.sort(first_received_ms), ends, side="right")
    return accepted - delivered


def peak_pending(submitted_ms: np.ndarray, first_received_ms: np.ndarray) -> int:
    """The most tasks accepted-and-not-yet-delivered at any instant."""
    if submitted_ms.size == 0:
        return 0
    times = np.concatenate([submitted_ms, first_received_ms])
    steps = np.concatenate([np.ones(submitted_ms.size, dtype=np.int64),
                            -np.ones(first_received_ms.size, dtype=np.int64)])
    # At equal times count the delivery first: a task delivered as it is accepted is not held.
    order = np.lexsort((steps, times))
    return int(max(0, np.cumsum(steps[order]).max()))


def submit_summary(submits: np.ndarray, phase_windows: Sequence[Mapping[str, Any]],
                   phase_names: Sequence[str], target_rates: Sequence[float | None]
                   ) -> dict[str, Any]:
    """Achieved submit rates, per phase and over all phases.

    ``phase_windows[i]`` has the phase's ``start_ms`` (when the first submitter began it) and
    ``end_ms`` (when the last one finished it).
    """
    phases = []
    for index, name in enumerate(phase_names):
        window = phase_windows[index] if index < len(phase_windows) else {}
        count = int((submits["phase"] == index).sum())
        start, end = window.get("start_ms"), window.get("end_ms")
        seconds = (end - start) / 1000.0 if start is not None and end is not None else None
        phases.append({
            "name": name,
            "tasks": count,
            "seconds": seconds,
            "target_rate": target_rates[index],
            "achieved_rate": count / seconds if seconds else None,
        })
    starts = [w["start_ms"] for w in phase_windows if w.get("start_ms") is not None]
    ends = [w["end_ms"] for w in phase_windows if w.get("end_ms") is not None]
    seconds = (max(ends) - min(starts)) / 1000.0 if starts and ends else None
    late = int((submits["submitted_ms"] > submits["fire_at_ms"]).sum())
    return {
        "submitted": int(submits.size),
        "seconds": seconds,
        "achieved_rate": submits.size / seconds if seconds else None,
        "peak_rate_achieved": max((p["achieved_rate"] or 0.0) for p in phases) if phases else None,
        "accepted_after_fire_at": late,
        "phases": phases,
    }


def memory_summary(samples: Mapping[str, Sequence[tuple[float, int]]],
                   hwm: Mapping[str, int], peak_held: int) -> dict[str, dict[str, Any]]:
    """Per server label: baseline, peak RSS (bytes) and RSS growth per pending task held."""
    out = {}
    for label, series in samples.items():
        rss = [r for _, r in series]
        if not rss:
            continue
        peak = max(max(rss), hwm.get(label, 0))
        baseline = rss[0]
        per_task = None
        if peak_held >= MIN_PENDING_FOR_MEMORY:
            per_task = (max(rss) - baseline) / peak_held
        out[label] = {
            "baseline_rss_bytes": baseline,
            "peak_rss_bytes": peak,
            "rss_growth_per_pending_task_bytes": per_task,
        }
    return out


# The kinds of CPU time a machine's cores spend, as the kernel counts them (psutil.cpu_times).
CPU_TIME_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_cpu(before: Mapping[str, float], after: Mapping[str, float],
                seconds: float) -> dict[str, float | None]:
    """What the whole machine's cores did between two readings of its CPU seconds by kind, in
    cores (2.0 = two cores the whole time): busy (this run's processes and everyone else's),
    idle, and stolen (a VM's vCPU ready to run while the host ran something else: no process
    sees it, and a spell of it slows every figure of the run)."""
    if seconds <= 0:
        return {"busy_cores": None, "idle_cores": None, "steal_cores": None}
    cores = {k: (after[k] - before[k]) / seconds for k in CPU_TIME_FIELDS}
    busy = cores["user"] + cores["nice"] + cores["system"] + cores["irq"] + cores["softirq"]
    return {"busy_cores": round(busy, 3), "idle_cores": round(cores["idle"] + cores["iowait"], 3),
            "steal_cores": round(cores["steal"], 3)}


def _samples_around(samples: Sequence[tuple[float, T]], start_ms: float, end_ms: float) -> tuple[tuple[float, T], ...]:
    """Of timed samples (in time order), the last at or before ``start_ms`` and the first at or
    after ``end_ms`` (the nearest ones inside, when the samples do not reach that far); ()
    when there are none."""
    if not samples:
        return ()
    before = [s for s in samples if s[0] <= start_ms]
    after = [s for s in samples if s[0] >= end_ms]
    return (before[-1] if before else samples[0]), (after[0] if after else samples[-1])


def machine_cpu_between(samples: Sequence[tuple[float, Mapping[str, float]]], start_ms: float,
                        end_ms: float) -> dict[str, float | None]:
    """machine_cpu over [start_ms, end_ms], from timed samples of the machine's CPU seconds (see
    _samples_around)."""
    around = _samples_around(samples, start_ms, end_ms)
    if not around:
        return machine_cpu({}, {}, 0.0)
    first, last = around
    return machine_cpu(first[1], last[1], (last[0] - first[0]) / 1000.0)


def cpu_summary(samples: Mapping[str, Sequence[tuple[float, float]]],
                tasks: int = 0) -> dict[str, dict]:
    """Per server label: CPU seconds used between its first and last sample, the share of one
    core that is (1.0 = a core busy all the time), and CPU microseconds per task submitted
    (a cost that does not depend on how busy the shared machine was)."""
    out = {}
    for label, seen in samples.items():
        (t_first, cpu_first), (t_last, cpu_last) = seen[0], seen[-1]
        wall = (t_last - t_first) / 1000.0
        used = cpu_last - cpu_first
        out[label] = {"cpu_seconds": used, "cores_busy": used / wall if wall > 0 else None,
                      "cpu_us_per_task": used * 1e6 / tasks if tasks else None}
    return out


def thread_cpu_between(samples: Sequence[tuple[float, Mapping[str, Mapping[str, float]]]], start_ms: float,
                       end_ms: float) -> dict[str, dict[str, float]]:
    """Cores each server's threads kept busy over [start_ms, end_ms], busiest first, from timed
    samples of {server: {thread name: CPU seconds}} (see _samples_around). A thread seen only
    in the later sample counts from zero."""
    around = _samples_around(samples, start_ms, end_ms)
    if not around:
        return {}
    first, last = around
    seconds = (last[0] - first[0]) / 1000.0
    if seconds <= 0:
        return {}
    out = {}
    for label, threads in last[1].items():
        earlier = first[1].get(label, {})
        cores = {name: round(max(0.0, cpu - earlier.get(name, 0.0)) / seconds, 3) for name, cpu in threads.items()}
        out[label] = dict(sorted(cores.items(), key=lambda kv: -kv[1]))
    return out


def lateness_quantiles(values: np.ndarray, points: int = 240) -> list[list[float]]:
    """[[quantile, lateness_ms], ...] dense in the tail, for CDF plots drawn from the JSON."""
    if values.size == 0:
        return []
    tail = 1.0 - np.logspace(0, -4, points)  # 0 .. 0.9999
    qs = np.unique(np.concatenate([tail, [0.0, 0.5, 0.9, 0.99, 0.999, 1.0]]))
    ordered = np.sort(values)
    return [[float(q), float(ordered[nearest_rank(q, ordered.size) - 1])] for q in qs]


def build_report(*, driver: str, scenario: Mapping[str, Any], submits: np.ndarray,
                 receipts: np.ndarray, horizon_ms: float, t0_ms: float, end_ms: float,
                 phase_windows: Sequence[Mapping[str, Any]],
                 memory_samples: Mapping[str, Sequence[tuple[float, int]]],
                 memory_hwm: Mapping[str, int],
                 cpu_samples: Mapping[str, Sequence[tuple[float, float]]] | None = None,
                 thread_cpu_while_due: Mapping[str, Mapping[str, float]] | None = None,
                 reported_pending: Sequence[tuple[float, int | None]] = (),
                 context: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every figure of one driver's run, JSON-ready."""
    firsts = first_deliveries(receipts)
    late = lateness_ms(receipts, horizon_ms)
    held = peak_pending(submits["submitted_ms"], firsts["received_ms"])
    phases = scenario["phases"]
    fire_rate = rate_series(firsts["received_ms"], t0_ms, end_ms)
    submit_rate = rate_series(submits["submitted_ms"], t0_ms, end_ms)
    due_rate = rate_series(submits["fire_at_ms"], t0_ms, end_ms)
    pending = pending_series(submits["submitted_ms"], firsts["received_ms"], t0_ms, end_ms)
    reported = [n for _, n in reported_pending if n is not None]
    return {
        "driver": driver,
        "scenario": dict(scenario),
        "context": dict(context or {}),
        "run": {"t0_ms": t0_ms, "end_ms": end_ms, "horizon_ms": horizon_ms,
                "seconds": (end_ms - t0_ms) / 1000.0},
        "submit": submit_summary(submits, phase_windows, [p["name"] for p in phases],
                                 [p["average_rate"] for p in phases]),
        "fire": {
            "lateness_ms": percentile_summary(late),
            "peak_rate_1s": float(fire_rate.max()) if fire_rate.size else 0.0,
            "lateness_quantiles": lateness_quantiles(late),
            "lateness_split_ms": lateness_split(receipts, horizon_ms),
        },
        "delivery": delivery_summary(submits, receipts, horizon_ms),
        "pending": {"peak_held": held, "reported_max": max(reported) if reported else None},
        "memory": memory_summary(memory_samples, memory_hwm, held),
        "cpu": cpu_summary(cpu_samples or {}, int(submits.size)),
        # Cores each server thread kept busy while the tasks fell due: where the time went.
        "cpu_while_due_by_thread": dict(thread_cpu_while_due or {}),
        "timeline": {
            "bin_s": BIN_S,
            "submit_rate": submit_rate.tolist(),
            "due_rate": due_rate.tolist(),
            "fire_rate": fire_rate.tolist(),
            "pending": pending.tolist(),
            # By the second the tasks were due, not received: a bad second shows where it began.
            "lateness_ms_by_due_second": lateness_series(receipts, t0_ms, end_ms, horizon_ms),
            "memory_rss_bytes": {
                label: [[round((t - t0_ms) / 1000.0, 2), r] for t, r in series]
                for label, series in memory_samples.items()
            },
        },
    }


# ----------------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lateness_cdf(reports: Iterable[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Lateness CDFs of one or more runs, log-scale lateness, tail-stretched y axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    reports = list(reports)
    mixed = len({_run_name(r) for r in reports}) > 1
    for report in reports:
        points = report["fire"]["lateness_quantiles"]
        if not points:
            continue
        q = np.array([p[0] for p in points])
        v = np.maximum(np.array([p[1] for p in points]), 0.01)
        summary = report["fire"]["lateness_ms"]
        name = f"{report['driver']} ({_run_name(report)})" if mixed else report["driver"]
        label = (f"{name}: p50 {_fmt_ms(summary['p50'])}, "
                 f"p99 {_fmt_ms(summary['p99'])}")
        # "nines" axis: -log10(1 - q) puts p90, p99, p99.9 at equal distances; the max
        # (q = 1) sits on a row of its own above p99.99.
        nines = np.where(q < 1.0, -np.log10(np.maximum(1.0 - q, 1e-4)), MAX_ROW)
        ax.plot(v, nines, label=label, drawstyle="steps-post")
    ax.set_xscale("log")
    ax.set_yticks([0, 1, 2, 3, 4, MAX_ROW])
    ax.set_yticklabels(["min", "p90", "p99", "p99.9", "p99.99", "max"])
    ax.set_xlabel("lateness at the worker (ms, log scale)")
    ax.set_ylabel("fraction of tasks fired")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_rates(report: Mapping[str, Any], path: Path) -> Path:
    """Submit, due and fire rates per second, lateness by due second, pending held and server RSS
    over the run."""
    plt = _pyplot()
    tl = report["timeline"]
    t = np.arange(len(tl["fire_rate"])) * tl["bin_s"]
    fig, (ax, ax_late, ax_mem) = plt.subplots(3, 1, figsize=(9, 8.6), dpi=110, sharex=True,
                                              gridspec_kw={"height_ratios": [3, 2, 2]})
    ax.step(t, tl["submit_rate"], where="post", label="submitted (accepted) /s")
    ax.step(t, tl["due_rate"], where="post", label="due (fire_at) /s", alpha=0.6, linestyle="--")
    ax.step(t, tl["fire_rate"], where="post", label="fired (received by a worker) /s")
    ax.set_ylabel("tasks per second")
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(t + tl["bin_s"], tl["pending"], color="grey", alpha=0.5, label="pending held")
    ax2.set_ylabel("pending held")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right", fontsize=8)
    ax.set_title(f"{report['driver']} / {report['scenario']['name']} "
                 f"(scale {report['scenario']['scale']:g})")
    by_due = tl.get("lateness_ms_by_due_second")  # absent from reports written before it
    if by_due:
        for key, style in (("max", ":"), ("p99", "-"), ("p50", "--")):
            values = [np.nan if v is None else max(v, 0.01) for v in by_due[key]]
            ax_late.step(t[:len(values)], values, where="post", linestyle=style, label=f"lateness {key}")
        ax_late.set_yscale("log")
        ax_late.set_ylabel("lateness (ms), by due second")
        ax_late.grid(True, alpha=0.3, which="both")
        ax_late.legend(loc="upper right", fontsize=8)
    for label, series in tl["memory_rss_bytes"].items():
        if series:
            ax_mem.plot([s[0] for s in series], [s[1] / 2**20 for s in series], label=label)
    ax_mem.set_ylabel("RSS (MiB)")
    ax_mem.set_xlabel("seconds since the first submit")
    ax_mem.grid(True, alpha=0.3)
    ax_mem.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _run_name(report: Mapping[str, Any]) -> str:
    return f"{report['scenario']['name']} x{report['scenario']['scale']:g}"


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value / 1000:.2f} s"
    return f"{value:.1f} ms"


def _fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}/s"


def _fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 2**20:
        return f"{value / 2**20:.1f} MiB"
    if value >= 1024:
        return f"{value / 1024:.1f} KiB"
    return f"{value:.0f} B"


def comparison_table(reports: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of the headline figures, one column per run."""
    rows: list[tuple[str, list[str]]] = []

    def row(name: str, cell) -> None:
        rows.append((name, [cell(r) for r in reports]))

    row("scenario", _run_name)
    row("submit rate achieved", lambda r: _fmt_rate(r["submit"]["achieved_rate"]))
    row("best phase submit rate", lambda r: _fmt_rate(r["submit"]["peak_rate_achieved"]))
    row("peak fire rate (1 s)", lambda r: _fmt_rate(r["fire"]["peak_rate_1s"]))
    for p in ("p50", "p90", "p99", "p99.9", "max"):
        row(f"lateness {p}", lambda r, p=p: _fmt_ms(r["fire"]["lateness_ms"][p]))
    row("delivered / expected",
        lambda r: f"{r['delivery']['delivered']:,} / {r['delivery']['expected']:,}")
    row("lost", lambda r: f"{r['delivery']['lost']:,}")
    row("duplicates", lambda r: f"{r['delivery']['duplicates']:,}")
    row("peak pending held", lambda r: f"{r['pending']['peak_held']:,}")
    row("peak RSS", lambda r: "; ".join(f"{k} {_fmt_bytes(v['peak_rss_bytes'])}"
                                        for k, v in r["memory"].items()) or "-")
    row("RSS per pending task", lambda r: "; ".join(
        f"{k} {_fmt_bytes(v['rss_growth_per_pending_task_bytes'])}"
        for k, v in r["memory"].items()
        if (v["rss_growth_per_pending_task_bytes"] or 0) >= MIN_BYTES_PER_TASK_SHOWN) or "-")
    row("CPU (cores busy)", lambda r: "; ".join(
        f"{k} {v['cores_busy']:.2f}" for k, v in r.get("cpu", {}).items()
        if v["cores_busy"] is not None and v["cores_busy"] >= 0.01) or "-")
    row("CPU while due, busiest threads (cores)", lambda r: "; ".join(
        f"{label}: " + ", ".join(f"{name} {cores:.2f}" for name, cores in list(threads.items())[:4])
        for label, threads in (r.get("cpu_while_due_by_thread") or {}).items() if threads) or "-")
    row("CPU per task submitted", lambda r: "; ".join(
        f"{k} {v['cpu_us_per_task']:,.0f} µs" for k, v in r.get("cpu", {}).items()
        if (v.get("cpu_us_per_task") or 0) >= 1) or "-")
    header = "| | " + " | ".join(r["driver"] for r in reports) + " |"
    sep = "|---|" + "---|" * len(reports)
    body = ["| " + name + " | " + " | ".join(cells) + " |" for name, cells in rows]
    return "\n".join([header, sep, *body])


def _median(values: Iterable[float | None]) -> float | None:
    """statistics.median of the values that are not None, or None when none are."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def repeat_summary(reports: Sequence[Mapping[str, Any]], p99_target_ms: float | None = None) -> dict[str, Any]:
    """The headline figures of repeated runs of one scenario, per driver in run order, and
    their spread. On a shared machine one run's p99 is one draw from a wide distribution, so
    a lateness target is reported as the share of runs that met it, beside the median."""
    by_driver: dict[str, list[Mapping[str, Any]]] = {}
    for r in reports:
        by_driver.setdefault(r["driver"], []).append(r)
    drivers = {}
    for name, runs in by_driver.items():
        rows = []
        for r in runs:
            late = r["fire"]["lateness_ms"]
            use = r.get("context", {}).get("machine", {}).get("cpu_while_due") or {}
            rows.append({
                "date": r.get("context", {}).get("date"),
                "p50_ms": late["p50"], "p99_ms": late["p99"], "p99.9_ms": late["p99.9"], "max_ms": late["max"],
                "submit_rate": r["submit"]["achieved_rate"],
                "delivered": r["delivery"]["delivered"], "expected": r["delivery"]["expected"],
                "lost": r["delivery"]["lost"], "duplicates": r["delivery"]["duplicates"],
                "peak_rss_bytes": max((v["peak_rss_bytes"] for v in r["memory"].values()), default=None),
                "busy_cores_while_due": use.get("busy_cores"),
            })
        p99s = [row["p99_ms"] for row in rows if row["p99_ms"] is not None]
        summary: dict[str, Any] = {
            "runs": len(rows),
            "p99_ms": {"median": _median(p99s), "min": min(p99s, default=None), "max": max(p99s, default=None)},
            "p50_ms_median": _median([row["p50_ms"] for row in rows]),
            "submit_rate_median": _median([row["submit_rate"] for row in rows]),
            "lost": sum(row["lost"] for row in rows),
            "duplicates": sum(row["duplicates"] for row in rows),
        }
        if p99_target_ms is not None:
            # A run with no lateness figure (nothing delivered) did not meet the target.
            summary["p99_target_ms"] = p99_target_ms
            summary["runs_within_target"] = sum(
                1 for row in rows if row["p99_ms"] is not None and row["p99_ms"] <= p99_target_ms)
        drivers[name] = {"summary": summary, "runs": rows}
    return {"scenario": reports[0]["scenario"]["name"] if reports else None, "drivers": drivers}


def repeat_table(summary: Mapping[str, Any]) -> str:
    """A Markdown table of repeated runs: one row per run, then each driver's spread."""
    lines = ["| driver | run | p50 | p99 | p99.9 | max | submit rate | delivered | lost | dup | busy cores |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in summary["drivers"].items():
        for i, row in enumerate(d["runs"], 1):
            busy = row["busy_cores_while_due"]
            lines.append(
                f"| {name} | {i} | {_fmt_ms(row['p50_ms'])} | {_fmt_ms(row['p99_ms'])} | "
                f"{_fmt_ms(row['p99.9_ms'])} | {_fmt_ms(row['max_ms'])} | {_fmt_rate(row['submit_rate'])} | "
                f"{row['delivered']:,} / {row['expected']:,} | {row['lost']:,} | {row['duplicates']:,} | "
                f"{'-' if busy is None else f'{busy:.2f}'} |")
    for name, d in summary["drivers"].items():
        s = d["summary"]
        p99 = s["p99_ms"]
        line = (f"\n{name}, {s['runs']} runs: p99 median {_fmt_ms(p99['median'])} "
                f"(min {_fmt_ms(p99['min'])}, max {_fmt_ms(p99['max'])}), p50 median "
                f"{_fmt_ms(s['p50_ms_median'])}, submit rate median {_fmt_rate(s['submit_rate_median'])}; "
                f"lost {s['lost']:,}, duplicates {s['duplicates']:,} in all")
        if "p99_target_ms" in s:
            line += f"; p99 <= {s['p99_target_ms']:g} ms in {s['runs_within_target']} of {s['runs']} runs"
        lines.append(line)
    return "\n".join(lines)


def write_repeat(reports: Sequence[Mapping[str, Any]], out_dir: Path,
                 p99_target_ms: float | None = None) -> dict[str, Path]:
    """``repeat-<scenario>.json`` and ``.md``: every run's headline figures and their spread."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = repeat_summary(reports, p99_target_ms)
    stem = out_dir / f"repeat-{summary['scenario']}"
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(summary, indent=1) + "\n")
    md = stem.with_suffix(".md")
    md.write_text(repeat_table(summary) + "\n")
    return {"json": json_path, "markdown": md}


def write_outputs(report: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """``<driver>-<scenario>.json`` and its two plots in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{report['driver']}-{report['scenario']['name']}"
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    cdf = plot_lateness_cdf([report], out_dir / f"{stem}-lateness.png",
                            f"{stem}: fire lateness CDF")
    rates = plot_rates(report, out_dir / f"{stem}-rates.png")
    return {"json": json_path, "lateness_png": cdf, "rates_png": rates}


def write_comparison(reports: Sequence[Mapping[str, Any]], out_dir: Path) -> dict[str, Path]:
    """Side-by-side table (Markdown) and overlaid CDFs of runs of one scenario."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = reports[0]["scenario"]["name"]
    md = out_dir / f"compare-{name}.md"
    md.write_text(comparison_table(reports) + "\n")
    png = plot_lateness_cdf(reports, out_dir / f"compare-{name}-lateness.png",
                            f"{name}: fire lateness CDF")
    return {"markdown": md, "lateness_png": png}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", nargs="+", type=Path, required=True,
                        help="result JSON files written by run_bench.py")
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    args = parser.parse_args(argv)
    reports = [json.loads(p.read_text()) for p in args.compare]
    paths = write_comparison(reports, args.out)
    print(paths["markdown"].read_text())
    print(f"wrote {paths['markdown']} and {paths['lateness_png']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
