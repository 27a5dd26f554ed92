"""One trace follows a task from Submit through store write, delivery and ack."""
import json
import time

import pytest

from taskwheel.v1 import ingest_pb2
from tests.e2e.harness import QueueWorker, ServerProcess, free_port, ingest, spec

pytestmark = pytest.mark.slow


def read_spans(path) -> list[dict]:
    text = open(path).read()
    decoder = json.JSONDecoder()
    spans, pos = [], 0
    while True:
        start = text.find("{", pos)
        if start < 0:
            return spans
        try:
            obj, pos = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            pos = start + 1
            continue
        if isinstance(obj, dict) and "context" in obj:
            spans.append(obj)


def test_one_trace_shows_a_task_from_submit_to_ack(tmp_path):
    port = free_port()
    target = f"127.0.0.1:{port}"
    spans_path = tmp_path / "spans.json"
    server = ServerProcess(
        ["up", "--data-dir", str(tmp_path / "data"), "--listen", target],
        str(tmp_path / "server.log"),
        env={"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "100"},
        stdout_path=str(spans_path),
    ).start()
    try:
        task_id = ingest(target).Submit(ingest_pb2.SubmitRequest(tasks=[spec("traced")])).results[0].task_id
        with QueueWorker(target, "traced") as worker:
            assert len(worker.wait_for(1, timeout=10)) == 1
            time.sleep(1.0)
    finally:
        server.stop()  # flushes the exporter
    spans = read_spans(spans_path)
    by_name = {}
    for s in spans:
        by_name.setdefault(s["name"], []).append(s)
    deliver = [s for s in by_name.get("dispatch.deliver", []) if s["attributes"]["taskwheel.task_id"] == task_id]
    ack = [s for s in by_name.get("dispatch.ack", []) if s["attributes"]["taskwheel.task_id"] == task_id]
    assert deliver and ack, sorted(by_name)
    trace_id = deliver[0]["context"]["trace_id"]
    submit = [s for s in spans if "Submit" in s["name"] and s["context"]["trace_id"] == trace_id]
    write = [s for s in by_name.get("ingest.store_write", []) if s["context"]["trace_id"] == trace_id]
    assert submit, "the Submit RPC span is not in the delivery's trace"
    assert write, "the store write is not in the task's trace"
    assert ack[0]["context"]["trace_id"] == trace_id
    fire_links = [link["context"]["trace_id"] for s in by_name.get("timer.fire", []) for link in s.get("links", [])]
    assert trace_id in fire_links, "the timer's fire span does not link to the task's trace"
