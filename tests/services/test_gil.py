"""taskwheel.gil: the switch interval is short exactly while a client waits on the store."""
import asyncio
import sys

import pytest

from taskwheel import gil
from taskwheel.config import Config
from taskwheel.ingest import IngestServicer
from taskwheel.stores.sqlite import SqliteStore
from taskwheel.v1 import ingest_pb2, task_pb2

from tests.services.timers import QuietTimer


@pytest.fixture
def interval_restored():
    before = sys.getswitchinterval()
    yield
    gil.disable(before)


def test_off_by_default_a_wait_leaves_the_interval_alone(interval_restored):
    sys.setswitchinterval(0.001)
    with gil.client_waits():
        assert sys.getswitchinterval() == pytest.approx(0.001)
    assert sys.getswitchinterval() == pytest.approx(0.001)


def test_enabled_it_is_short_while_any_client_waits_and_long_otherwise(interval_restored):
    gil.enable()
    assert sys.getswitchinterval() == pytest.approx(gil.LONG_S)
    with gil.client_waits():
        assert sys.getswitchinterval() == pytest.approx(gil.SHORT_S)
        with gil.client_waits():
            pass
        assert sys.getswitchinterval() == pytest.approx(gil.SHORT_S)  # the first still waits
    assert sys.getswitchinterval() == pytest.approx(gil.LONG_S)
    with pytest.raises(RuntimeError):
        with gil.client_waits():
            raise RuntimeError("the store failed")
    assert sys.getswitchinterval() == pytest.approx(gil.LONG_S)


def test_disable_sets_the_interval_given_and_stops_following(interval_restored):
    gil.enable()
    gil.disable(0.002)
    with gil.client_waits():
        assert sys.getswitchinterval() == pytest.approx(0.002)


class HeldStore(SqliteStore):
    """A real store whose inserts wait until the test lets them go."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.release = asyncio.Event()
        self.inserting = asyncio.Event()

    async def insert(self, tasks):
        self.inserting.set()
        await self.release.wait()
        return await super().insert(tasks)


async def test_a_submit_waiting_on_the_store_makes_it_short_until_it_is_answered(tmp_path, interval_restored):
    store = HeldStore(tmp_path / "t.db", num_shards=4)
    await store.open()
    ingest = IngestServicer(Config(), store, QuietTimer())
    await ingest.start()
    gil.enable()
    try:
        request = ingest_pb2.SubmitRequest(tasks=[task_pb2.TaskSpec(queue="q", payload=b"x")])
        call = asyncio.get_running_loop().create_task(ingest.Submit(request, context=None))
        await store.inserting.wait()
        during = sys.getswitchinterval()
        store.release.set()
        response = await call
        after = sys.getswitchinterval()
    finally:
        await ingest.stop()
        await store.close()
    assert during == pytest.approx(gil.SHORT_S) and after == pytest.approx(gil.LONG_S)
    assert len(response.results) == 1 and response.results[0].task_id
