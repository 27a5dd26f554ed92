"""How long a thread waited for a core after it was preempted, and who had taken it.

Reads ``perf script -F time,trace`` output of the ``sched:sched_switch`` tracepoint (recorded
with ``perf record -e sched:sched_switch -a``) and, for one thread id (the server's event loop:
the process id), pairs every switch out while still runnable (state R: preempted) with its
next switch in. Prints how often and how long it waited, by the thread that ran instead, and
the time it was switched out blocked (sleeping in epoll, or on the GIL) for comparison.

    perf record -e sched:sched_switch -a -o /tmp/sched.data -- sleep 4   # while tasks fall due
    perf script -i /tmp/sched.data -F time,trace > /tmp/sched.txt
    ps -L -o pid,tid,comm -e > /tmp/threads.txt                          # names; optional
    .venv/bin/python perf/sched_waits.py /tmp/sched.txt SERVER_PID --threads /tmp/threads.txt
"""
from __future__ import annotations

import argparse
import collections
import re
from dataclasses import dataclass, field
from typing import Iterable

_SWITCH = re.compile(
    r"^\s*(?P<t>[\d.]+):\s+prev_comm=(?P<pc>.+?) prev_pid=(?P<pp>\d+) prev_prio=\d+ "
    r"prev_state=(?P<st>\S+) ==> next_comm=(?P<nc>.+?) next_pid=(?P<np>\d+)"
)


@dataclass
class Waits:
    seconds: float = 0.0  # from the first switch seen to the last
    preempted_ms: list[float] = field(default_factory=list)  # runnable, waiting for a core
    by_thread: dict[int, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    blocked_ms: float = 0.0  # switched out asleep (epoll, a lock, the GIL)
    blocked: int = 0


def waits_of(lines: Iterable[str], tid: int) -> Waits:
    """Pairs each switch of ``tid`` out with its next switch in."""
    out = Waits()
    first = last = None
    left_at: float | None = None
    runnable = False
    taken_by = 0
    for line in lines:
        m = _SWITCH.match(line)
        if not m:
            continue
        t = float(m["t"])
        first = t if first is None else first
        last = t
        if int(m["pp"]) == tid:
            left_at, runnable, taken_by = t, m["st"].startswith("R"), int(m["np"])
        elif int(m["np"]) == tid and left_at is not None:
            ms = (t - left_at) * 1000.0
            if runnable:
                out.preempted_ms.append(ms)
                out.by_thread[taken_by].append(ms)
            else:
                out.blocked_ms += ms
                out.blocked += 1
            left_at = None
    out.seconds = (last - first) if first is not None else 0.0
    return out


def thread_names(lines: Iterable[str]) -> dict[int, str]:
    """tid -> "comm/pid" from ``ps -L -o pid,tid,comm -e``."""
    names = {}
    for line in lines:
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
            names[int(parts[1])] = f"{parts[2].strip()}/{parts[0]}"
    return names


def summary(w: Waits, names: dict[int, str], top: int = 10) -> list[str]:
    waits = sorted(w.preempted_ms)
    if not waits:
        return ["never preempted"]
    n = len(waits)
    per_s = w.seconds or 1.0
    lines = [
        f"preempted {n} times in {w.seconds:.1f} s ({n / per_s:.0f}/s); waited for a core "
        f"{sum(waits):.1f} ms ({sum(waits) / per_s / 10:.1f} % of the time): p50 {waits[n // 2]:.3f} "
        f"p90 {waits[n * 9 // 10]:.3f} p99 {waits[min(n - 1, n * 99 // 100)]:.3f} max {waits[-1]:.2f} ms",
        f"switched out asleep {w.blocked} times, {w.blocked_ms:.0f} ms",
        "the threads that ran instead, by the wait they caused:",
    ]
    for tid, ms in sorted(w.by_thread.items(), key=lambda kv: -sum(kv[1]))[:top]:
        ms = sorted(ms)
        lines.append(f"  {names.get(tid, str(tid)):32s} {len(ms):6d} times {sum(ms):8.1f} ms"
                     f"  p50 {ms[len(ms) // 2]:.3f} max {ms[-1]:.2f}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", help="perf script -F time,trace output of sched:sched_switch")
    ap.add_argument("tid", type=int, help="the thread to follow (the event loop's: the server's pid)")
    ap.add_argument("--threads", help="ps -L -o pid,tid,comm -e output, to name the threads")
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    names = thread_names(open(args.threads)) if args.threads else {}
    with open(args.trace) as trace:
        for line in summary(waits_of(trace, args.tid), names, args.top):
            print(line)


if __name__ == "__main__":
    main()
