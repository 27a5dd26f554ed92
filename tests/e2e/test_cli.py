"""The command line a person uses: submit, worker, status against a running server."""
import json
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "taskwheel.cli.main"]


def test_submit_then_worker_then_status_show_the_task_done(server):
    out = subprocess.run(CLI + ["submit", "--target", server.target, "--queue", "cli", "--count", "3",
                                "--header", "k=v", "hello"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    ids = out.stdout.split()
    assert len(ids) == 3
    worker = subprocess.Popen(CLI + ["worker", "--target", server.target, "--queue", "cli"],
                              stdout=subprocess.PIPE, text=True)
    try:
        lines = [json.loads(worker.stdout.readline()) for _ in range(3)]
    finally:
        time.sleep(0.5)  # let the acks go out
        worker.terminate()
        worker.wait(10)
    assert sorted(line["task_id"] for line in lines) == sorted(ids)
    assert all(line["payload"] == "hello" and line["attempt"] == 1 for line in lines)
    status = subprocess.run(CLI + ["status", "--target", server.target], capture_output=True, text=True, timeout=30)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["tasks"]["succeeded"] == 3
    assert "pending" in report["timer"] or report["timer"].get("fired")


def test_submit_of_a_bad_task_exits_nonzero_with_the_servers_reason(server):
    out = subprocess.run(CLI + ["submit", "--target", server.target, "--queue", "no spaces"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "queue" in out.stderr


def test_a_bad_setting_is_refused_before_serving():
    out = subprocess.run(CLI + ["up", "--shards", "-1"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "--shards must be 0 (the store's) or more" in out.stderr
