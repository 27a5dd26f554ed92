"""The benchmark's arithmetic on records whose answers are known (perf/report.py)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # perf/ is not an installed package
    sys.path.insert(0, str(REPO))

from perf import report  # noqa: E402
from perf.drivers import (  # noqa: E402
    RECEIPT_DTYPE, SUBMIT_DTYPE, ReceiptLog, count_records, read_records,
)
from perf.scenarios import get_scenario  # noqa: E402


def submits(rows):
    """rows of (seq, fire_at_ms, submitted_ms[, phase])."""
    out = np.zeros(len(rows), dtype=SUBMIT_DTYPE)
    for i, row in enumerate(rows):
        out[i]["seq"], out[i]["fire_at_ms"], out[i]["submitted_ms"] = row[:3]
        out[i]["phase"] = row[3] if len(row) > 3 else 0
    return out


def receipts(rows):
    """rows of (seq, fire_at_ms, received_ms) or (seq, fire_at_ms, received_ms, fired_ms)."""
    out = np.zeros(len(rows), dtype=RECEIPT_DTYPE)
    for i, row in enumerate(rows):
        seq, fire_at, received = row[:3]
        out[i] = (seq, fire_at, received, 1, row[3] if len(row) > 3 else np.nan)
    return out


def test_percentiles_are_nearest_rank_observed_values():
    values = np.random.default_rng(7).permutation(np.arange(1, 1001, dtype=np.float64))
    s = report.percentile_summary(values)
    assert (s["min"], s["p50"], s["p90"], s["p99"], s["p99.9"], s["max"]) == (
        1, 500, 900, 990, 999, 1000)
    assert s["count"] == 1000


def test_percentiles_of_no_values_are_none():
    s = report.percentile_summary(np.array([]))
    assert s["count"] == 0 and s["p99"] is None and s["max"] is None


def test_lateness_is_measured_from_each_tasks_first_delivery():
    r = receipts([(1, 1000, 1030), (1, 1000, 1010), (2, 2000, 2005)])
    assert sorted(report.lateness_ms(r)) == [5, 10]


def test_lateness_leaves_out_tasks_due_after_the_horizon():
    r = receipts([(1, 1000, 1030), (2, 9000, 9001)])
    assert list(report.lateness_ms(r, horizon_ms=5000)) == [30]


def test_task_due_by_the_horizon_and_never_received_is_lost():
    s = submits([(1, 1000, 10), (2, 2000, 10), (3, 3000, 10)])
    d = report.delivery_summary(s, receipts([(1, 1000, 1001), (3, 3000, 3002)]), 5000)
    assert (d["expected"], d["delivered"], d["lost"]) == (3, 2, 1)


def test_task_due_after_the_horizon_is_pending_not_lost():
    s = submits([(1, 1000, 10), (2, 90_000, 10)])
    d = report.delivery_summary(s, receipts([(1, 1000, 1001)]), 5000)
    assert (d["lost"], d["pending_at_end"]) == (0, 1)


def test_every_delivery_after_a_tasks_first_is_a_duplicate():
    s = submits([(1, 1000, 10), (2, 2000, 10)])
    r = receipts([(1, 1000, 1001), (1, 1000, 1500), (1, 1000, 1600), (2, 2000, 2001)])
    d = report.delivery_summary(s, r, 5000)
    assert (d["delivered"], d["duplicates"], d["lost"]) == (2, 2, 0)


def test_first_delivery_before_fire_at_is_early():
    s = submits([(1, 1000, 10), (2, 2000, 10)])
    d = report.delivery_summary(s, receipts([(1, 1000, 999.5), (2, 2000, 2000.0)]), 5000)
    assert d["early"] == 1


def test_delivery_of_a_seq_nobody_submitted_is_unknown():
    s = submits([(1, 1000, 10)])
    d = report.delivery_summary(s, receipts([(1, 1000, 1001), (77, 1000, 1001)]), 5000)
    assert (d["unknown"], d["delivered"], d["lost"]) == (1, 2, 0)


def test_peak_pending_counts_tasks_accepted_and_not_yet_delivered():
    accepted = np.array([0.0, 1.0, 2.0, 3.0, 10.0])
    delivered = np.array([2.5, 4.0, 5.0, 11.0])
    assert report.peak_pending(accepted, delivered) == 3


def test_a_task_delivered_the_instant_it_is_accepted_is_not_held():
    assert report.peak_pending(np.array([5.0]), np.array([5.0])) == 0


def test_rss_per_pending_task_is_growth_over_peak_held():
    samples = {"worker": [(0.0, 100 * 2**20), (500.0, 120 * 2**20), (1000.0, 110 * 2**20)]}
    m = report.memory_summary(samples, {"worker": 125 * 2**20}, peak_held=2048)
    assert m["worker"]["rss_growth_per_pending_task_bytes"] == 20 * 2**20 / 2048
    assert m["worker"]["peak_rss_bytes"] == 125 * 2**20


def test_rss_per_pending_task_is_not_claimed_from_few_held_tasks():
    samples = {"worker": [(0.0, 100), (500.0, 900)]}
    m = report.memory_summary(samples, {}, peak_held=report.MIN_PENDING_FOR_MEMORY - 1)
    assert m["worker"]["rss_growth_per_pending_task_bytes"] is None


def test_submit_rate_of_a_phase_is_its_tasks_over_its_window():
    s = submits([(i, 10_000, 100 + i, 0) for i in range(300)] + [(1000, 10_000, 900, 1)])
    windows = [{"start_ms": 0.0, "end_ms": 2000.0}, {"start_ms": 2000.0, "end_ms": 3000.0}]
    out = report.submit_summary(s, windows, ["a", "b"], [150.0, None])
    assert [p["achieved_rate"] for p in out["phases"]] == [150.0, 1.0]
    assert out["achieved_rate"] == pytest.approx(301 / 3.0)


def test_tasks_accepted_after_their_fire_time_are_counted():
    s = submits([(1, 1000, 1200), (2, 5000, 1200)])
    out = report.submit_summary(s, [{"start_ms": 0.0, "end_ms": 1200.0}], ["a"], [None])
    assert out["accepted_after_fire_at"] == 1


def test_rate_series_counts_events_per_second_bin():
    times = np.array([0.0, 100.0, 999.0, 1000.0, 2500.0])
    assert report.rate_series(times, 0.0, 3000.0).tolist() == [3.0, 1.0, 1.0]


def test_lateness_by_due_second_gives_each_seconds_p50_p99_and_max():
    # Second 0: 100 tasks 1..100 ms late; second 1: none due; second 2: one task 7 ms late.
    rows = [(i, 500, 500 + i) for i in range(1, 101)] + [(200, 2100, 2107)]
    series = report.lateness_series(receipts(rows), 0.0, 3000.0)
    assert series == {"p50": [50.0, None, 7.0], "p99": [99.0, None, 7.0], "max": [100.0, None, 7.0]}


def test_lateness_by_due_second_counts_first_deliveries_due_by_the_horizon():
    rows = [(1, 100, 140), (1, 100, 110), (2, 2500, 9000)]
    series = report.lateness_series(receipts(rows), 0.0, 3000.0, horizon_ms=2000.0)
    assert series["max"] == [10.0, None, None]


def test_lateness_split_puts_each_first_delivery_in_the_timers_part_and_the_deliverys():
    # Task 1: fired 2 ms after due, received 10 ms after that; its redelivery does not count.
    # Task 2: fired on time, received 3 ms later.
    rows = [(1, 100, 112, 102), (1, 100, 500, 480), (2, 200, 203, 200)]
    split = report.lateness_split(receipts(rows))
    assert (split["timer"]["max"], split["timer"]["min"]) == (2.0, 0.0)
    assert (split["delivery"]["max"], split["delivery"]["min"]) == (10.0, 3.0)


def test_lateness_split_is_absent_when_no_delivery_says_when_it_fired():
    assert report.lateness_split(receipts([(1, 100, 112), (2, 200, 250)])) is None


def test_receipt_log_records_are_read_back_whole(tmp_path):
    log = ReceiptLog(tmp_path)
    log.record(5, 1000, 1002.5)
    log.record_many([(6, 2000), (7, 3000)])
    log.record_many([(8, 4000)], [3999.5])
    log.flush()
    got = read_records(tmp_path, RECEIPT_DTYPE)
    assert got["seq"].tolist() == [5, 6, 7, 8]
    assert got["received_ms"][0] == 1002.5
    assert np.isnan(got["fired_ms"][:3]).all() and got["fired_ms"][3] == 3999.5
    assert count_records(tmp_path, RECEIPT_DTYPE) == 4


def test_a_torn_last_record_is_not_read(tmp_path):
    whole = np.zeros(2, dtype=RECEIPT_DTYPE).tobytes()
    (tmp_path / "1.bin").write_bytes(whole + whole[:5])
    assert read_records(tmp_path, RECEIPT_DTYPE).size == 2


def test_steady_scenario_averages_12k_per_second_with_36k_peaks():
    phase = get_scenario("steady").phases[0]
    assert phase.average_rate == pytest.approx(12_000, rel=1e-3)
    assert max(s.rate for s in phase.segments()) == 36_000


def test_scaling_multiplies_rates_and_counts_but_keeps_durations():
    full, small = get_scenario("spike"), get_scenario("spike", scale=0.01)
    assert small.total_tasks == pytest.approx(full.total_tasks * 0.01, rel=1e-3)
    assert [p.duration_s for p in small.phases] == [p.duration_s for p in full.phases]
    assert small.phases[1].rate == pytest.approx(10 * small.phases[0].rate)


def test_pending_scenario_holds_its_tasks_beyond_any_bounded_run():
    scenario = get_scenario("pending_1m", scale=0.01, time_factor=0.1)
    pending = scenario.phases[0]
    assert scenario.pending_tasks == 10_000
    assert pending.fire.offset_s >= 600  # not shortened by the time factor


def test_fire_50k_scenario_is_due_at_50k_per_second_whatever_the_submit_rate():
    scenario = get_scenario("fire_50k")
    fire = scenario.phases[0].fire
    assert scenario.total_tasks / fire.length_s == 50_000
    assert fire.latest_after(submit_s=25.0) == fire.offset_s + fire.length_s  # not after submit


def test_cpu_share_is_cpu_seconds_over_the_sampled_wall_time():
    out = report.cpu_summary({"timer": [(0.0, 10.0), (4000.0, 13.0)]})
    assert (out["timer"]["cpu_seconds"], out["timer"]["cores_busy"]) == (3.0, 0.75)


def test_cpu_per_task_is_cpu_seconds_over_tasks_submitted():
    out = report.cpu_summary({"timer": [(0.0, 10.0), (4000.0, 13.0)]}, tasks=30_000)
    assert out["timer"]["cpu_us_per_task"] == pytest.approx(100.0)


def test_the_machines_cpu_is_read_in_seconds_by_kind_and_only_grows():
    from perf import run_bench

    first = run_bench.read_machine_cpu_seconds()
    second = run_bench.read_machine_cpu_seconds()
    assert list(first) == list(report.CPU_TIME_FIELDS)
    assert all(second[kind] >= first[kind] >= 0 for kind in report.CPU_TIME_FIELDS)


def test_the_machines_cpu_over_a_run_is_in_cores_busy_idle_and_stolen():
    before = dict.fromkeys(report.CPU_TIME_FIELDS, 0.0)
    after = {"user": 9.0, "nice": 1.0, "system": 3.0, "idle": 5.0, "iowait": 1.0, "irq": 0.5,
             "softirq": 0.5, "steal": 2.0}
    # 10 s: 2 cores' worth of CPU seconds, 20 % of it stolen
    assert report.machine_cpu(before, after, 10.0) == {
        "busy_cores": 1.4, "idle_cores": 0.6, "steal_cores": 0.2}
    assert report.machine_cpu(before, after, 0.0)["busy_cores"] is None


def test_the_machines_cpu_while_tasks_fall_due_is_taken_from_the_samples_around_that_window():
    def at(t_ms, busy_s, steal_s):
        return (t_ms, {**dict.fromkeys(report.CPU_TIME_FIELDS, 0.0), "user": busy_s, "steal": steal_s})
    samples = [at(0, 0.0, 0.0), at(1000, 1.0, 0.0), at(2000, 2.5, 0.4), at(3000, 3.0, 0.4)]
    window = report.machine_cpu_between(samples, 1200, 1900)  # 1000-2000 ms brackets it
    assert (window["busy_cores"], window["steal_cores"]) == (1.5, 0.4)
    whole = report.machine_cpu_between(samples, -500, 9000)  # past the ends: all of them
    assert whole["busy_cores"] == 1.0
    assert report.machine_cpu_between([], 0, 1)["busy_cores"] is None


def run_report(driver, lateness_ms, lost=0):
    """A report of one run whose tasks, due 1 s apart, came ``lateness_ms`` late; ``lost`` more were
    due by the horizon and never came."""
    n = len(lateness_ms)
    s = submits([(i, 1000 * (i + 1), 0) for i in range(n + lost)])
    r = receipts([(i, 1000 * (i + 1), 1000 * (i + 1) + late) for i, late in enumerate(lateness_ms)])
    scenario = get_scenario("fire_50k").to_dict()
    windows = [{"start_ms": 0.0, "end_ms": 10.0, "tasks": n + lost}]
    return report.build_report(
        driver=driver, scenario=scenario, submits=s, receipts=r, horizon_ms=1000.0 * (n + lost + 1),
        t0_ms=0.0, end_ms=1000.0 * (n + lost + 2), phase_windows=windows,
        memory_samples={"server": [(0.0, 100), (500.0, 300)]}, memory_hwm={}, context={"date": "d"})


def test_repeated_runs_report_each_runs_p99_and_how_many_met_the_target():
    runs = [run_report("taskwheel", [5] * 99 + [late]) for late in (30, 10, 20)]
    s = report.repeat_summary(runs, p99_target_ms=20)["drivers"]["taskwheel"]
    assert [row["p99_ms"] for row in s["runs"]] == [5, 5, 5]  # nearest rank: the 99th of 100
    runs = [run_report("taskwheel", [5] * 98 + [late, late]) for late in (30, 10, 20)]
    s = report.repeat_summary(runs, p99_target_ms=20)["drivers"]["taskwheel"]
    assert [row["p99_ms"] for row in s["runs"]] == [30, 10, 20]
    assert s["summary"]["runs_within_target"] == 2  # 20 ms meets a 20 ms target; 30 does not
    assert s["summary"]["p99_ms"] == {"median": 20, "min": 10, "max": 30}


def test_repeated_runs_add_up_lost_tasks_and_keep_drivers_apart():
    runs = [run_report("taskwheel", [1, 2], lost=1), run_report("celery", [900, 1000]),
            run_report("taskwheel", [3, 4], lost=2), run_report("celery", [800, 2000])]
    d = report.repeat_summary(runs)["drivers"]
    assert d["taskwheel"]["summary"]["lost"] == 3 and d["celery"]["summary"]["lost"] == 0
    assert d["celery"]["summary"]["p99_ms"]["median"] == 1500  # an even count: the two middle ones' mean
    assert "runs_within_target" not in d["taskwheel"]["summary"]
    table = report.repeat_table(report.repeat_summary(runs, p99_target_ms=100))
    assert "taskwheel, 2 runs" in table and "p99 <= 100 ms in 0 of 2 runs" in table


def test_run_bench_repeat_takes_turns_between_drivers_and_writes_each_run_apart(tmp_path, monkeypatch):
    from perf import run_bench

    order = []

    def fake_run_driver(name, scenario, args, options):
        order.append(name)
        return run_report(name, [len(order)] * 10)

    monkeypatch.setattr(run_bench, "run_driver", fake_run_driver)
    assert run_bench.main(["--driver", "taskwheel", "--driver", "celery", "--scenario", "fire_50k",
                           "--repeat", "2", "--p99-target-ms", "2.5", "--out", str(tmp_path)]) == 0
    assert order == ["taskwheel", "celery", "taskwheel", "celery"]
    assert (tmp_path / "run-1" / "taskwheel-fire_50k.json").exists()
    assert (tmp_path / "run-2" / "compare-fire_50k.md").exists()
    summary = json.loads((tmp_path / "repeat-fire_50k.json").read_text())
    assert [row["p99_ms"] for row in summary["drivers"]["taskwheel"]["runs"]] == [1, 3]
    assert summary["drivers"]["taskwheel"]["summary"]["runs_within_target"] == 1
    assert summary["drivers"]["celery"]["summary"]["runs_within_target"] == 1


def test_run_bench_refuses_a_repeat_below_one():
    from perf import run_bench

    with pytest.raises(SystemExit):
        run_bench.parse_args(["--driver", "taskwheel", "--scenario", "fire_50k", "--repeat", "0"])


def test_thread_cpu_while_due_is_each_threads_cpu_over_the_samples_around_the_window():
    samples = [
        (0.0, {"server": {"main": 1.0, "writer": 0.5}}),
        (1000.0, {"server": {"main": 1.2, "writer": 0.6}}),
        (3000.0, {"server": {"main": 2.2, "writer": 0.7, "late": 0.4}}),
        (4000.0, {"server": {"main": 9.0, "writer": 9.0, "late": 9.0}}),
    ]
    out = report.thread_cpu_between(samples, start_ms=1000.0, end_ms=2500.0)
    # From the sample at the window's start to the first at or after its end, 2 s apart; a
    # thread that started meanwhile counts from zero; busiest first.
    assert out == {"server": {"main": 0.5, "late": 0.2, "writer": 0.05}}
    assert list(out["server"]) == ["main", "late", "writer"]
    assert report.thread_cpu_between([], 0.0, 1.0) == {}


def test_thread_cpu_is_read_per_thread_name_from_proc(monkeypatch):
    import threading

    from perf import run_bench

    done = threading.Event()
    spin = threading.Thread(target=lambda: done.wait(5), name="tw-probe-thread")
    spin.start()
    try:
        threads = run_bench.read_thread_cpu_seconds(os.getpid())
    finally:
        done.set()
        spin.join()
    assert "main" in threads and all(cpu >= 0 for cpu in threads.values())
    assert run_bench.read_thread_cpu_seconds(2**22 + 12345) == {}


def test_a_process_memory_and_cpu_are_read_until_it_is_gone():
    from perf import run_bench

    rss, peak = run_bench.read_memory(os.getpid())
    assert 0 < rss <= peak
    assert run_bench.read_cpu_seconds(os.getpid()) > 0
    assert run_bench.read_memory(2**22 + 12345) is None
    assert run_bench.read_cpu_seconds(2**22 + 12345) is None
