"""Ingest's validation: what it accepts, and errors that name the field."""
import gc

import pytest

from taskwheel.config import Limits
from taskwheel.ingest.validate import SpecError, TaskIds, record_of_spec, records_of_specs
from taskwheel.v1 import task_pb2

NOW = 1_800_000_000_000
LIMITS = Limits()


def make(**fields):
    spec = task_pb2.TaskSpec(queue=fields.pop("queue", "q"), **fields)
    return spec


def check(spec):
    return record_of_spec(spec, "id", 3, NOW, LIMITS)


def test_no_fire_time_means_now():
    rec = check(make())
    assert rec.fire_at_ms == NOW and rec.due_ms == NOW


def test_delay_is_relative_to_acceptance():
    rec = check(make(delay={"seconds": 2, "nanos": 500_000_000}))
    assert rec.fire_at_ms == NOW + 2500 and rec.due_ms == NOW + 2500


def test_a_fire_time_in_the_recent_past_is_due_now_but_keeps_its_fire_at():
    rec = check(make(fire_at={"seconds": NOW // 1000 - 60}))
    assert rec.fire_at_ms == NOW - 60_000
    assert rec.due_ms == NOW


def test_defaults_fill_attempts_and_lease():
    rec = check(make())
    assert rec.max_attempts == LIMITS.default_max_attempts
    assert rec.lease_ms == LIMITS.default_lease_ms
    assert rec.attempt == 1 and rec.gen == 1 and rec.shard == 3


@pytest.mark.parametrize("spec, field", [
    (make(queue=""), "queue"),
    (make(queue="a/b"), "queue"),
    (make(queue="x" * 129), "queue"),
    (make(payload=b"x" * (LIMITS.max_payload_bytes + 1)), "payload"),
    (make(fire_at={"seconds": NOW // 1000 + 367 * 86400}), "fire_at"),
    (make(fire_at={"seconds": NOW // 1000 - 2 * 86400}), "fire_at"),
    (make(delay={"seconds": -1}), "delay"),
    (make(delay={"seconds": 400 * 86400}), "delay"),
    (make(max_attempts=101), "max_attempts"),
    (make(headers={f"k{i}": "v" for i in range(65)}), "headers"),
    (make(headers={"k": "v" * 9000}), "headers"),
    (make(idempotency_key="k" * 257), "idempotency_key"),
    (make(lease={"nanos": 1_000_000}), "lease"),
    (make(lease={"seconds": 13 * 3600}), "lease"),
])
def test_each_limit_is_enforced_with_a_message_naming_the_field(spec, field):
    with pytest.raises(SpecError, match=field):
        check(spec)


def test_a_spec_exactly_at_the_limits_is_accepted():
    rec = check(make(queue="q" * 128, payload=b"x" * LIMITS.max_payload_bytes, max_attempts=100,
                     lease={"seconds": 12 * 3600}, idempotency_key="k" * 256))
    assert rec.max_attempts == 100


def test_task_ids_are_unique_and_ordered_by_time_within_a_process():
    ids = TaskIds()
    a = [ids.next(NOW) for _ in range(10_000)]
    b = ids.next(NOW + 1)
    assert len(set(a)) == 10_000
    assert all(len(i) == 28 for i in a)
    assert b[:12] > a[-1][:12]


def test_two_processes_draw_different_id_prefixes():
    assert TaskIds().next(NOW)[12:20] != TaskIds().next(NOW)[12:20]


def test_accepted_records_are_kept_out_of_the_cyclic_gcs_view():
    specs = [make(payload=b"x") for _ in range(3)]
    records, positions, errors = records_of_specs(specs, TaskIds(), 4, NOW, LIMITS)
    assert (len(records), errors) == (3, [])
    assert not any(gc.is_tracked(r) for r in records)


def test_an_explicit_zero_lease_is_the_server_default_as_an_absent_one():
    rec = check(make(lease={"seconds": 0, "nanos": 0}))
    assert rec.lease_ms == LIMITS.default_lease_ms


@pytest.mark.parametrize("when, expected_ms", [
    ({"fire_at": {"seconds": NOW // 1000 + 5, "nanos": 123_456_700}}, NOW + 5_124),
    ({"fire_at": {"seconds": NOW // 1000 + 5, "nanos": 1}}, NOW + 5_001),
    ({"fire_at": {"seconds": NOW // 1000 + 5, "nanos": 2_000_000}}, NOW + 5_002),
    ({"delay": {"seconds": 0, "nanos": 1_500_000}}, NOW + 2),
    ({"delay": {"seconds": 1, "nanos": 1}}, NOW + 1_001),
])
def test_sub_millisecond_fire_times_round_up_never_early(when, expected_ms):
    assert check(make(**when)).fire_at_ms == expected_ms


def test_a_sub_millisecond_lease_rounds_up():
    assert check(make(lease={"seconds": 1, "nanos": 1})).lease_ms == 1_001


@pytest.mark.parametrize("spec, field", [
    (make(delay={"nanos": -1}), "delay"),
    (make(lease={"seconds": -1}), "lease"),
    (make(lease={"nanos": -1}), "lease"),
])
def test_a_negative_duration_is_refused_naming_the_field(spec, field):
    with pytest.raises(SpecError, match=f"{field} must not be negative"):
        check(spec)
