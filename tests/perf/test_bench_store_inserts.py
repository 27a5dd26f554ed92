"""perf/bench_store_inserts.py on a real store: each (spread, batch) pair gets its own figures."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # perf/ is not an installed package
    sys.path.insert(0, str(REPO))

from perf import bench_store_inserts  # noqa: E402


def test_tasks_are_due_over_the_spread_with_ingest_style_ids():
    import random

    tasks = bench_store_inserts.tasks_for(500, 60_000, 1_000_000, random.Random(1))
    assert len({t.task_id for t in tasks}) == 500
    assert [t.task_id for t in tasks] == sorted(t.task_id for t in tasks)  # time-ordered, as ingest's
    assert all(1_000_000 <= t.due_ms < 1_060_000 and t.fire_at_ms == t.due_ms for t in tasks)
    assert {t.shard for t in tasks} == set(range(16))


def test_a_short_run_reports_every_pair_against_the_first(tmp_path):
    out = tmp_path / "inserts.json"
    subprocess.run([sys.executable, str(REPO / "perf" / "bench_store_inserts.py"), "--tasks", "2000",
                    "--spreads-s", "60,3600", "--batches", "500,1000", "--dir", str(tmp_path),
                    "--out", str(out)], check=True, timeout=120, cwd=REPO)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["spread_s"], r["batch"]) for r in rows] == [(60, 500), (60, 1000), (3600, 500), (3600, 1000)]
    assert all(r["us_per_task"] > 0 for r in rows)
    assert rows[0]["cpu_ratio"] == 1.0
    assert rows[2]["cpu_ratio"] == round(rows[2]["us_per_task"] / rows[0]["us_per_task"], 2)
    # Most of an hour's spread is past the promoter's reach at insert, and moved afterwards.
    assert rows[2]["promoted"] > 1000
    assert abs(rows[2]["total_us_per_task"] - rows[2]["us_per_task"] - rows[2]["promote_us_per_task"]) <= 0.02
    assert list(tmp_path.iterdir()) == [out]  # the stores were removed


def test_refuses_a_batch_of_zero(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "perf" / "bench_store_inserts.py"), "--tasks", "10",
                          "--batches", "0", "--dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert run.returncode != 0 and "must be positive" in run.stderr
