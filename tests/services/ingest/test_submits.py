"""Submit's wire form in C: records_of_submit gives what protobuf and ingest's validator give, or
None; encode_submit_results writes what the protobuf runtime would. The oracles are
taskwheel.v1 itself and ingest.validate.records_of_specs."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskwheel.config import Limits
from taskwheel.ingest.submits import encode_submit_results, records_of_submit
from taskwheel.ingest.validate import TaskIds, records_of_specs
from taskwheel.task import TASK_RECORD_SLOTS, TaskState, accepted
from taskwheel.v1 import ingest_pb2, task_pb2
from taskwheel.wire import set_ms

NOW = 1_800_000_000_000
LIMITS = Limits()


class SameIds:
    """Two TaskIds that hand out the same ids, so the two paths' records compare."""

    def __init__(self):
        self.ids = TaskIds()
        self.ids._prefix, self.ids._counter = "0a1b2c3d", 41

    def take(self, now, count):
        return self.ids.take(now, count)


def fast(raw: bytes, traceparent: str = "", limits: Limits = LIMITS):
    return records_of_submit(raw, SameIds(), 16, NOW, limits, TASK_RECORD_SLOTS, accepted(NOW, traceparent))


def reference(raw: bytes, traceparent: str = "", limits: Limits = LIMITS):
    """(records, errors) the slow path gives, or None when protobuf cannot parse the bytes."""
    try:
        request = ingest_pb2.SubmitRequest.FromString(raw)
    except Exception:
        return None
    records, _, errors = records_of_specs(request.tasks, SameIds(), 16, NOW, limits, traceparent)
    return records, errors


def assert_fast_agrees(raw: bytes, traceparent: str = "") -> list | None:
    got = fast(raw, traceparent)
    if got is not None:
        expected = reference(raw, traceparent)
        assert expected is not None, "read bytes protobuf refuses"
        records, errors = expected
        assert not errors, f"accepted what the validator refuses: {errors}"
        assert got == records
    return got


def request(*specs: task_pb2.TaskSpec) -> bytes:
    return ingest_pb2.SubmitRequest(tasks=specs).SerializeToString()


def fire_at(ms: int) -> dict:
    return {"seconds": ms // 1000, "nanos": ms % 1000 * 1_000_000}


# ---- what a client sends is read on the fast path --------------------------------------------

QUEUE = st.text("abcXYZ019._:-", min_size=1, max_size=LIMITS.max_queue_len)
TEXT = st.text(max_size=20)
VALID_SPEC = st.builds(
    lambda queue, payload, when, key, attempts, headers, lease: task_pb2.TaskSpec(
        queue=queue, payload=payload, idempotency_key=key, max_attempts=attempts, headers=headers,
        **when, **({"lease": {"seconds": lease // 1000, "nanos": lease % 1000 * 1_000_000}}
                   if lease is not None else {})),
    QUEUE, st.binary(max_size=64),
    st.one_of(st.just({}),
              st.integers(NOW - LIMITS.max_past_ms, NOW + LIMITS.max_future_ms).map(
                  lambda ms: {"fire_at": fire_at(ms)}),
              st.integers(0, LIMITS.max_future_ms).map(
                  lambda ms: {"delay": {"seconds": ms // 1000, "nanos": ms % 1000 * 1_000_000}})),
    TEXT, st.integers(0, LIMITS.max_attempts), st.dictionaries(TEXT, TEXT, max_size=5),
    st.one_of(st.none(), st.integers(LIMITS.min_lease_ms, LIMITS.max_lease_ms)),
)


@given(st.lists(VALID_SPEC, min_size=1, max_size=20), st.sampled_from(["", "00-abc-def-01"]))
def test_valid_tasks_from_a_protobuf_client_are_read_in_c_as_the_validator_reads_them(specs, traceparent):
    got = assert_fast_agrees(request(*specs), traceparent)
    assert got is not None and len(got) == len(specs)


def test_records_carry_their_ids_in_order_and_are_out_of_the_gcs_view():
    import gc

    got = fast(request(*(task_pb2.TaskSpec(queue="q", payload=bytes([i])) for i in range(3))))
    assert [r.payload for r in got] == [b"\x00", b"\x01", b"\x02"]
    assert got[0].task_id < got[1].task_id < got[2].task_id
    assert not any(gc.is_tracked(r) for r in got) and not gc.is_tracked(got)
    assert got[0].state is TaskState.SCHEDULED and got[0].due_ms == NOW


# ---- anything else goes to the slow path -------------------------------------------------------

# Times near NOW, where the limits are, as well as anywhere; nanos at and past their bounds.
SECONDS = st.one_of(st.integers(NOW // 1000 - 100_000, NOW // 1000 + 100_000), st.integers(-100, 100),
                    st.integers(-20, 20_000), st.integers(-(1 << 40), 1 << 40))
NANOS = st.one_of(st.integers(0, 999_999_999), st.integers(-(1 << 31), (1 << 31) - 1),
                  st.sampled_from([0, -1, 999_999_999, 1_000_000_000]))
# Each field: what a client sends within the tighter limits below (TINY), and anything, with
# the values around TINY's bounds drawn often.
FIELDS = {
    "queue": (st.text("abc._:-", min_size=1, max_size=8),
              st.one_of(st.text("abc", min_size=8, max_size=9), st.text(max_size=140))),
    "payload": (st.binary(max_size=40),
                st.one_of(st.binary(min_size=40, max_size=41), st.binary(max_size=70))),
    "when": (st.one_of(st.just({}),
                       st.integers(NOW - 5_000, NOW + 10_000_000).map(lambda ms: {"fire_at": fire_at(ms)}),
                       st.integers(0, 10_000_000).map(lambda ms: {"delay": fire_at(ms)})),
             st.one_of(st.sampled_from([NOW - 5_001, NOW - 5_000, NOW + 10_000_000, NOW + 10_000_001]).map(
                           lambda ms: {"fire_at": fire_at(ms)}),
                       st.sampled_from([-1, 0, 10_000_000, 10_000_001]).map(
                           lambda ms: {"delay": fire_at(ms)}),
                       st.builds(lambda s, n: {"fire_at": {"seconds": s, "nanos": n}}, SECONDS, NANOS),
                       st.builds(lambda s, n: {"delay": {"seconds": s, "nanos": n}}, SECONDS, NANOS))),
    "idempotency_key": (st.text(max_size=10),
                        st.one_of(st.text("k", min_size=10, max_size=11), st.text(max_size=300))),
    "max_attempts": (st.integers(0, 5), st.one_of(st.integers(5, 6), st.integers(0, (1 << 32) - 1))),
    "headers": (st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
                st.one_of(st.dictionaries(st.text(max_size=3), st.text(max_size=3), min_size=3, max_size=6),
                          st.dictionaries(st.text(max_size=300), st.text(max_size=300), max_size=70))),
    "lease": (st.one_of(st.none(), st.integers(1_000, 60_000).map(fire_at)),
              st.one_of(st.sampled_from([999, 1_000, 60_000, 60_001]).map(fire_at),
                        st.builds(lambda s, n: {"seconds": s, "nanos": n},
                                  st.integers(-100, 50_000), NANOS))),
}


@st.composite
def any_spec(draw):
    """A task a client would send, or one with one or two fields drawn from anywhere: so that
    a request of a few tasks is often wholly valid (read in C), and every check meets values
    on both sides of it."""
    wild = draw(st.sets(st.sampled_from(sorted(FIELDS)), max_size=2)) if draw(st.booleans()) else set()
    values = {name: draw(FIELDS[name][name in wild]) for name in FIELDS}
    when, lease = values.pop("when"), values.pop("lease")
    return task_pb2.TaskSpec(**values, **when, **({"lease": lease} if lease is not None else {}))


ANY_SPEC = any_spec()
TINY = Limits(max_payload_bytes=40, max_queue_len=8, max_headers=3, max_header_bytes=30,
              max_idempotency_key_len=10, max_attempts=5, max_future_ms=10_000_000, max_past_ms=5_000,
              min_lease_ms=1_000, max_lease_ms=60_000, max_batch=4)


@settings(max_examples=300)
@given(st.lists(ANY_SPEC, max_size=3), st.sampled_from([LIMITS, TINY]))
def test_any_request_is_read_as_the_validator_reads_it_or_left_to_it(specs, limits):
    raw = request(*specs)
    got = fast(raw, limits=limits)
    expected = reference(raw, limits=limits)
    if got is not None:
        records, errors = expected
        assert not errors and got == records


@settings(max_examples=300)
@given(st.lists(VALID_SPEC, min_size=1, max_size=3), st.data())
def test_damaged_bytes_are_never_read_differently_from_protobuf(specs, data):
    raw = bytearray(request(*specs))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw)))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and at < len(raw):
            raw[at] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del raw[at:]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=4))
    assert_fast_agrees(bytes(raw))


def _len_field(number: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes([number << 3 | 2, len(body)]) + body


@pytest.mark.parametrize("raw", [
    b"",  # no tasks: the slow path words the error
    request(*[task_pb2.TaskSpec(queue="q")] * (LIMITS.max_batch + 1)),
    _len_field(2, b""),  # a field SubmitRequest does not have
    _len_field(1, _len_field(1, b"q") + bytes([9 << 3, 1])),  # a field TaskSpec does not have
    _len_field(1, _len_field(1, b"q") + _len_field(3, b"") + _len_field(4, b"")),  # fire_at and delay
    _len_field(1, _len_field(1, b"q") + _len_field(3, b"\x08\x01") + _len_field(3, b"\x08\x02")),  # twice
    _len_field(1, _len_field(1, b"q") + _len_field(3, b"\x18\x01")),  # a field Timestamp does not have
    _len_field(1, _len_field(1, b"q") + _len_field(5, b"\xff")),  # a key that is not UTF-8
    _len_field(1, _len_field(1, b"q") + _len_field(7, _len_field(1, b"\xc3"))),  # a header key, neither
    _len_field(1, bytes([1 << 3 | 0, 1])),  # the queue as a varint
    _len_field(1, _len_field(1, b"q") + bytes([6 << 3 | 2, 0])),  # max_attempts length-delimited
    _len_field(1, _len_field(1, b"q") + _len_field(4, b"\x10\xff\xff\xff\xff\x0f")),  # delay nanos -1
    _len_field(1, _len_field(1, b"q")) + b"\x0a\x05ab",  # a task cut short
])
def test_requests_it_does_not_read_as_protobuf_does_are_left_to_the_slow_path(raw):
    assert fast(raw) is None


def _tiny_bounds():
    spec = task_pb2.TaskSpec
    yield "queue", spec(queue="q" * 8), spec(queue="q" * 9)
    yield "queue", spec(queue="q-._:"), spec(queue="q/")
    yield "payload", spec(queue="q", payload=b"x" * 40), spec(queue="q", payload=b"x" * 41)
    yield "fire_at", spec(queue="q", fire_at=fire_at(NOW - 5_000)), spec(
        queue="q", fire_at=fire_at(NOW - 5_001))
    yield "fire_at", spec(queue="q", fire_at=fire_at(NOW + 10_000_000)), spec(
        queue="q", fire_at=fire_at(NOW + 10_000_001))
    yield "fire_at.nanos", spec(queue="q", fire_at={"seconds": NOW // 1000, "nanos": 999_999_999}), spec(
        queue="q", fire_at={"seconds": NOW // 1000, "nanos": 1_000_000_000})
    yield "fire_at.nanos", spec(queue="q", fire_at={"seconds": NOW // 1000, "nanos": 0}), spec(
        queue="q", fire_at={"seconds": NOW // 1000 + 1, "nanos": -1})
    yield "delay", spec(queue="q", delay=fire_at(0)), spec(
        queue="q", delay={"seconds": -1, "nanos": 999_000_000})
    yield "delay", spec(queue="q", delay=fire_at(10_000_000)), spec(queue="q", delay=fire_at(10_000_001))
    yield "idempotency_key", spec(queue="q", idempotency_key="k" * 10), spec(
        queue="q", idempotency_key="k" * 11)
    yield "max_attempts", spec(queue="q", max_attempts=5), spec(queue="q", max_attempts=6)
    yield "headers", spec(queue="q", headers={"a": "", "b": "", "c": ""}), spec(
        queue="q", headers={"a": "", "b": "", "c": "", "d": ""})
    yield "headers", spec(queue="q", headers={"k": "v" * 29}), spec(queue="q", headers={"k": "v" * 30})
    yield "lease", spec(queue="q", lease=fire_at(1_000)), spec(queue="q", lease=fire_at(999))
    yield "lease", spec(queue="q", lease=fire_at(60_000)), spec(queue="q", lease=fire_at(60_001))


@pytest.mark.parametrize("field, inside, outside", list(_tiny_bounds()),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_a_task_at_a_limit_is_read_in_c_and_one_past_it_is_left_to_the_validator(field, inside, outside):
    [record] = fast(request(inside), limits=TINY)
    assert [record] == reference(request(inside), limits=TINY)[0]
    assert fast(request(outside), limits=TINY) is None
    [(_, error)] = reference(request(outside), limits=TINY)[1]
    assert field in error


def test_a_scalar_field_twice_keeps_the_last_as_protobuf_does():
    raw = _len_field(1, _len_field(1, b"first") + _len_field(1, b"second") + bytes([6 << 3, 2, 6 << 3, 4]))
    [record] = assert_fast_agrees(raw)
    assert record.queue == "second" and record.max_attempts == 4


def test_a_header_key_twice_keeps_the_last_value_as_protobuf_does():
    entry = lambda k, v: _len_field(7, _len_field(1, k) + _len_field(2, v))  # noqa: E731
    [record] = assert_fast_agrees(_len_field(1, _len_field(1, b"q") + entry(b"k", b"1") + entry(b"k", b"2")))
    assert record.headers == {"k": "2"}


# ---- the response --------------------------------------------------------------------------

MS = st.integers(min_value=-(1 << 44), max_value=1 << 44)


@given(st.lists(st.tuples(st.text(max_size=40), MS, st.booleans()), max_size=30))
def test_results_are_encoded_as_protobuf_encodes_them(results):
    expected = ingest_pb2.SubmitResponse()
    for task_id, ms, duplicate in results:
        result = expected.results.add(task_id=task_id)
        if duplicate:
            result.duplicate = True
        else:
            set_ms(result.fire_at, ms)
    got = encode_submit_results([r[0] for r in results], [r[1] for r in results], [r[2] for r in results])
    assert got == expected.SerializeToString()
    assert ingest_pb2.SubmitResponse.FromString(got) == expected


async def test_ingests_batch_of_records_for_the_store_is_out_of_the_gcs_view(tmp_path):
    import gc

    from taskwheel.config import Config
    from taskwheel.ingest import IngestServicer
    from taskwheel.stores.sqlite import SqliteStore
    from tests.services.timers import QuietTimer

    class WatchedStore(SqliteStore):
        async def insert(self, tasks):
            watched.append(gc.is_tracked(tasks))
            return await super().insert(tasks)

    watched = []
    store = WatchedStore(tmp_path / "t.db", num_shards=16)
    await store.open()
    ingest = IngestServicer(Config(), store, QuietTimer())
    await ingest.start()
    raw = ingest_pb2.SubmitRequest(tasks=[task_pb2.TaskSpec(queue="q", payload=b"p")] * 3).SerializeToString()
    await ingest.submit_wire(raw, None)
    await ingest.stop()
    await store.close()
    assert watched == [False]


def test_the_c_reader_gives_an_explicit_zero_lease_the_default_and_rounds_times_up():
    specs = [task_pb2.TaskSpec(queue="q", lease={"seconds": 0, "nanos": 0}),
             task_pb2.TaskSpec(queue="q", fire_at={"seconds": NOW // 1000 + 5, "nanos": 123_456_700}),
             task_pb2.TaskSpec(queue="q", delay={"seconds": 0, "nanos": 1_500_000}),
             task_pb2.TaskSpec(queue="q", lease={"seconds": 1, "nanos": 1})]
    got = fast(ingest_pb2.SubmitRequest(tasks=specs).SerializeToString())
    assert got is not None  # all read in C, none left to the validator
    assert got[0].lease_ms == LIMITS.default_lease_ms
    assert got[1].fire_at_ms == NOW + 5_124
    assert got[2].fire_at_ms == NOW + 2
    assert got[3].lease_ms == 1_001
