"""perf/sched_waits.py: a thread's waits for a core, paired from sched_switch records."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # perf/ is not an installed package
    sys.path.insert(0, str(REPO))

from perf import sched_waits  # noqa: E402


def _switch(t: float, prev: int, state: str, nxt: int, prev_comm: str = "python", next_comm: str = "x") -> str:
    return (f"  {t:.6f}:  prev_comm={prev_comm} prev_pid={prev} prev_prio=120 prev_state={state} "
            f"==> next_comm={next_comm} next_pid={nxt} next_prio=120")


TRACE = [
    _switch(10.000, 100, "R", 200, next_comm="tw-sqlite-write"),  # preempted by 200 ...
    _switch(10.002, 200, "S", 100, prev_comm="tw-sqlite-write"),  # ... back 2 ms later
    _switch(10.003, 100, "S", 0, next_comm="swapper/0"),          # asleep in epoll ...
    _switch(10.013, 0, "R", 100, prev_comm="swapper/0"),          # ... 10 ms
    _switch(10.014, 100, "R+", 300, next_comm="event engine"),    # preempted by 300, a comm with a space
    _switch(10.0145, 300, "S", 100, prev_comm="event engine"),
    _switch(10.015, 400, "R", 500),                               # other threads: ignored
    "some line that is not a switch",
    _switch(10.020, 100, "R", 200),                               # preempted again, never back
]


def test_pairs_each_preemption_with_the_next_switch_in():
    w = sched_waits.waits_of(TRACE, 100)
    assert [round(ms, 3) for ms in w.preempted_ms] == [2.0, 0.5]
    assert {tid: [round(ms, 3) for ms in v] for tid, v in w.by_thread.items()} == {200: [2.0], 300: [0.5]}
    assert round(w.blocked_ms, 3) == 10.0 and w.blocked == 1
    assert round(w.seconds, 3) == 0.02


def test_the_summary_names_the_threads_that_ran_instead():
    names = sched_waits.thread_names(["  PID   TID COMMAND", "   90   200 tw-sqlite-write", "   91   300 event engine"])
    assert names == {200: "tw-sqlite-write/90", 300: "event engine/91"}
    lines = sched_waits.summary(sched_waits.waits_of(TRACE, 100), names)
    assert lines[0].startswith("preempted 2 times in 0.0 s")
    assert "waited for a core 2.5 ms (12.5 % of the time)" in lines[0] and "max 2.00 ms" in lines[0]
    assert lines[3].split()[:3] == ["tw-sqlite-write/90", "1", "times"]
    assert lines[4].startswith("  event engine/91")


def test_a_thread_never_preempted_says_so():
    assert sched_waits.summary(sched_waits.waits_of(TRACE, 999), {}) == ["never preempted"]
