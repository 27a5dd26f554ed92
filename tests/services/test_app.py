import asyncio
import gc
import weakref

import pytest

from taskwheel.app import collect_garbage_on_growth, tune_runtime


class Node:
    def __init__(self):
        self.other = self


@pytest.fixture
def automatic_gc_off():
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    yield
    if was_enabled:
        gc.enable()


async def run_collector(threshold: int, seconds: float = 0.1, full_every_s: float = 3600) -> None:
    task = asyncio.get_running_loop().create_task(
        collect_garbage_on_growth(threshold, every_s=0.01, full_every_s=full_every_s))
    await asyncio.sleep(seconds)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)  # stopped before the test looks at the heap


async def test_garbage_cycles_are_collected_once_the_heap_has_grown(automatic_gc_off):
    probe = Node()
    dead = weakref.ref(probe)
    del probe
    keep = [Node() for _ in range(5_000)]  # growth past the threshold
    await run_collector(threshold=1_000)
    assert dead() is None
    assert len(keep) == 5_000


async def test_no_collection_runs_while_the_heap_stays_put(automatic_gc_off):
    probe = Node()
    cycle = weakref.ref(probe)
    del probe
    await run_collector(threshold=1_000_000)
    assert cycle() is not None  # left for a later collection, not walked on every tick
    gc.collect()
    assert cycle() is None


async def test_a_young_collection_leaves_objects_that_survived_one_for_the_full_collection(automatic_gc_off):
    probe = Node()
    dead = weakref.ref(probe)
    gc.collect(0)  # the probe survives one young collection while still referenced
    del probe
    keep = [Node() for _ in range(5_000)]
    await run_collector(threshold=1_000)
    assert dead() is not None  # not walked again by young collections: their pauses stay short
    await run_collector(threshold=1_000_000, full_every_s=0.02)
    assert dead() is None
    assert len(keep) == 5_000


@pytest.fixture
def runtime_restored():
    enabled, threshold = gc.isenabled(), gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)
    (gc.enable if enabled else gc.disable)()


def test_automatic_gc_is_off_beside_the_embedded_store(runtime_restored):
    tune_runtime("/var/lib/taskwheel/tasks.db")
    assert not gc.isenabled()


def test_automatic_gc_stays_on_beside_a_store_whose_client_makes_cycles(runtime_restored):
    tune_runtime("cassandra://127.0.0.1:9042/taskwheel")
    assert gc.isenabled()
    assert gc.get_threshold()[0] == 50_000
