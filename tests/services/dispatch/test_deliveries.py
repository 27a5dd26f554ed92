"""encode_deliveries writes what the protobuf runtime would: the oracle is taskwheel.v1 itself."""
import dataclasses
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskwheel.core import RecordShape
from taskwheel.dispatch.deliveries import encode_deliveries
from taskwheel.dispatch.leases import Fired
from taskwheel.task import TaskRecord
from taskwheel.v1 import dispatch_pb2
from taskwheel.wire import set_ms

MS = st.integers(min_value=-(1 << 44), max_value=1 << 44)
TEXT = st.text(max_size=40)


def sent(record: TaskRecord, delivery_id: str, fired_at: int, expires: int) -> SimpleNamespace:
    return SimpleNamespace(record=record, delivery_id=delivery_id, fired_at=fired_at, due_ms=expires)


# The servicer's call: its items are Fired and their records' fields are read from their slots.
RECORD = RecordShape(TaskRecord, [f.name for f in dataclasses.fields(TaskRecord)])


def as_fired(item: SimpleNamespace) -> Fired:
    fired = Fired(item.record, [], 0, item.fired_at)
    fired.delivery_id, fired.due_ms = item.delivery_id, item.due_ms
    return fired


def by_protobuf(items, traceparents=None) -> dispatch_pb2.ConsumeResponse:
    response = dispatch_pb2.ConsumeResponse()
    for i, item in enumerate(items):
        rec = item.record
        d = response.deliveries.add(
            task_id=rec.task_id, delivery_id=item.delivery_id, queue=rec.queue, payload=rec.payload,
            attempt=rec.attempt, max_attempts=rec.max_attempts, headers=rec.headers,
            traceparent=rec.traceparent if traceparents is None else traceparents[i],
            redelivered=rec.redelivered or rec.attempt > 1, owner_epoch=rec.owner_epoch)
        set_ms(d.fire_at, rec.fire_at_ms)
        set_ms(d.fired_at, item.fired_at)
        set_ms(d.lease_expires_at, item.due_ms)
    return response


deliveries = st.builds(
    sent,
    st.builds(TaskRecord, task_id=TEXT, shard=st.just(0), queue=TEXT, payload=st.binary(max_size=300),
              fire_at_ms=MS, due_ms=MS, attempt=st.integers(0, 1000), max_attempts=st.integers(0, 1000),
              headers=st.dictionaries(TEXT, TEXT, max_size=4), traceparent=TEXT,
              redelivered=st.booleans(), owner_epoch=st.integers(0, 1 << 62)),
    TEXT, MS, MS)


@given(st.lists(deliveries, max_size=20))
def test_the_bytes_parse_as_the_message_the_protobuf_runtime_builds(items):
    assert dispatch_pb2.ConsumeResponse.FromString(encode_deliveries(items)) == by_protobuf(items)


@given(st.lists(deliveries, max_size=20))
def test_fired_items_read_from_their_slots_give_the_same_bytes(items):
    assert encode_deliveries([as_fired(i) for i in items], None, RECORD) == encode_deliveries(items)


@given(st.lists(deliveries.filter(lambda d: len(d.record.headers) <= 1), max_size=10))
def test_without_several_headers_the_bytes_are_the_runtimes_byte_for_byte(items):
    # Map entries have no fixed order; everything else is written in field-number order.
    assert encode_deliveries(items) == by_protobuf(items).SerializeToString()


@given(st.lists(deliveries, max_size=5), st.lists(deliveries, max_size=5))
def test_two_messages_one_after_the_other_parse_as_one_holding_both(first, second):
    merged = dispatch_pb2.ConsumeResponse.FromString(encode_deliveries(first) + encode_deliveries(second))
    assert merged == by_protobuf(first + second)


def test_traceparents_given_replace_the_records_own():
    items = [sent(TaskRecord("a", 0, "q", b"", 1, 1, traceparent="00-old"), "a.2", 2, 3),
             sent(TaskRecord("b", 0, "q", b"", 1, 1), "b.2", 2, 3)]
    parsed = dispatch_pb2.ConsumeResponse.FromString(encode_deliveries(items, ["00-new-a", "00-new-b"]))
    assert [d.traceparent for d in parsed.deliveries] == ["00-new-a", "00-new-b"]


def test_no_deliveries_make_an_empty_message():
    assert encode_deliveries([]) == b""


def test_a_traceparent_list_of_another_length_is_refused():
    item = sent(TaskRecord("a", 0, "q", b"", 1, 1), "a.2", 2, 3)
    with pytest.raises(ValueError, match="1 traceparents for 2 deliveries"):
        encode_deliveries([item, item], ["00-x"])


@pytest.mark.parametrize("field, value, message", [
    ("task_id", b"a", "task_id must be a str, not bytes"),
    ("payload", "text", "payload must be bytes, not str"),
    ("fire_at_ms", 1.5, "fire_at_ms must be an int, not float"),
    ("fire_at_ms", 1 << 63, "does not fit in int64"),
    ("attempt", -1, "attempt -1 is outside a uint32"),
    ("headers", [("k", "v")], "headers must be a dict, not list"),
    ("headers", {"k": 1}, "a header value must be a str, not int"),
])
@pytest.mark.parametrize("slots", [False, True], ids=["getattr", "slots"])
def test_a_field_of_the_wrong_type_is_a_clear_error(field, value, message, slots):
    record = TaskRecord("a", 0, "q", b"", 1, 1)
    setattr(record, field, value)
    item = sent(record, "a.2", 2, 3)
    with pytest.raises((TypeError, OverflowError), match=message):
        if slots:
            encode_deliveries([as_fired(item)], None, RECORD)
        else:
            encode_deliveries([item])
