"""perf/submit_capacity.py against a real server: a short run counts what was accepted."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # perf/ is not an installed package
    sys.path.insert(0, str(REPO))

from perf import submit_capacity  # noqa: E402


def test_a_short_run_reports_accepted_tasks_and_cpu_per_task():
    run = submit_capacity.measure(senders=2, seconds=1.0, batch=100, server_args=[])
    assert run["accepted"] >= 200 and run["accepted"] % 100 == 0
    assert run["accepted_per_s"] == run["accepted"] / 1.0
    assert run["server_cpu_us_per_task"] > 0 and run["sender_cpu_us_per_task"] > 0
    cores = run["server_thread_cores"]
    assert cores["main"] > 0  # the event loop accepted them
    assert "tw-sqlite-write" in cores  # and the store's writer stored them
    assert list(cores.values()) == sorted(cores.values(), reverse=True)
