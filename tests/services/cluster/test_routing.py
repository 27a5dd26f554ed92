"""Routing in the cluster: offers and forgets reach the timer holding each shard, fired tasks a
dispatch with a worker for their queue. The other nodes are real gRPC servers on loopback
serving recording stand-ins for the internal Timer and Dispatch services."""
import asyncio
from types import SimpleNamespace

import grpc
import pytest

from taskwheel.cluster.routing import DispatchRouter, TimerRouter
from taskwheel.cluster.shards import View
from taskwheel.core import shard_of
from taskwheel.dispatch.writer import HandOver
from taskwheel.internal.v1 import dispatch_pb2, dispatch_pb2_grpc, timer_pb2, timer_pb2_grpc
from taskwheel.stores.base import Member
from taskwheel.task import TaskRecord

SHARDS = 8


def task(i: int, queue: str = "q", due_ms: int = 1_000) -> TaskRecord:
    task_id = f"{i:028x}"
    return TaskRecord(task_id=task_id, shard=shard_of(task_id, SHARDS), queue=queue, payload=b"",
                      fire_at_ms=due_ms, due_ms=due_ms)


class RecordingTimer(timer_pb2_grpc.TimerServicer):
    """A remote timer that holds ``held`` shards."""

    def __init__(self, held: set[int]):
        self.held = held
        self.offered: list[str] = []
        self.forgotten: list[str] = []

    async def Offer(self, request, context):
        taken = [m.task_id for m in request.tasks if shard_of(m.task_id, SHARDS) in self.held]
        self.offered.extend(taken)
        not_held = sorted({shard_of(m.task_id, SHARDS) for m in request.tasks} - self.held)
        return timer_pb2.OfferResponse(taken=len(taken), not_held=not_held)

    async def Forget(self, request, context):
        self.forgotten.extend(request.task_ids)
        return timer_pb2.ForgetResponse(forgotten=len(request.task_ids))


class RecordingDispatch(dispatch_pb2_grpc.DispatchServicer):
    def __init__(self):
        self.pushed: list[str] = []

    async def Push(self, request, context):
        self.pushed.extend(m.task_id for m in request.tasks)
        return dispatch_pb2.PushResponse(accepted=len(request.tasks))


class LocalTimer:
    def __init__(self, held: set[int]):
        self.held = held
        self.offered: list[str] = []
        self.forgotten: list[str] = []

    def offer(self, records):
        self.offered.extend(r.task_id for r in records if r.shard in self.held)
        return [r for r in records if r.shard not in self.held]

    def forget(self, task_ids):
        self.forgotten.extend(task_ids)


class QueueState:
    def __init__(self, consumers):
        self.consumers = consumers


class LocalDispatch:
    def __init__(self, consumed: set[str]):
        self.consumed = consumed
        self.handed: list[str] = []
        self.waiting: dict[str, list] = {}  # queue -> Fired-like tasks waiting for a worker

    def take_back(self, queue):
        return self.waiting.pop(queue, []) if queue not in self.consumed else []

    def queues(self):
        return {q: QueueState([object()]) for q in self.consumed}

    def hand_over(self, records, fired_at_ms):
        self.handed.extend(r.task_id for r in records)
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


@pytest.fixture
async def serve():
    servers = []

    async def start(timer=None, dispatch=None) -> str:
        server = grpc.aio.server()
        if timer is not None:
            timer_pb2_grpc.add_TimerServicer_to_server(timer, server)
        if dispatch is not None:
            dispatch_pb2_grpc.add_DispatchServicer_to_server(dispatch, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        await server.stop(0)


def view(owners: dict[int, str], members: dict[str, tuple[str, set[str], set[str]]]) -> View:
    return View({node: Member(node, address, frozenset(roles), frozenset(queues), 0, 2**62)
                 for node, (address, roles, queues) in members.items()},
                [owners.get(s, "") for s in range(SHARDS)])


async def until(condition, seconds: float = 5.0) -> None:
    for _ in range(int(seconds * 100)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")


async def test_offers_and_forgets_go_to_the_timer_holding_each_shard(serve):
    remote = RecordingTimer(held={s for s in range(SHARDS) if s % 2})
    address = await serve(timer=remote)
    local = LocalTimer(held={s for s in range(SHARDS) if s % 2 == 0})
    router = TimerRouter(SHARDS, "me", local)
    router.update(view({s: "me" if s % 2 == 0 else "other" for s in range(SHARDS)},
                       {"me": ("me:1", {"timer"}, set()), "other": (address, {"timer"}, set())}))
    records = [task(i) for i in range(40)]
    router.offer(records)
    router.forget([r.task_id for r in records])
    await until(lambda: len(remote.offered) + len(local.offered) == 40
                and len(remote.forgotten) + len(local.forgotten) == 40)
    assert sorted(local.offered) == sorted(r.task_id for r in records if r.shard % 2 == 0)
    assert sorted(remote.offered) == sorted(r.task_id for r in records if r.shard % 2)
    assert sorted(remote.forgotten) == sorted(remote.offered)
    await router.close()


async def test_an_offer_a_timer_refuses_goes_to_the_owner_of_the_next_view(serve):
    # The view said "old" holds everything, but the shards moved to "new": old refuses them,
    # and the router offers them to new once a view says so.
    old, new = RecordingTimer(held=set()), RecordingTimer(held=set(range(SHARDS)))
    old_address, new_address = await serve(timer=old), await serve(timer=new)
    members = {"old": (old_address, {"timer"}, set()), "new": (new_address, {"timer"}, set())}
    router = TimerRouter(SHARDS, "me")
    router.update(view({s: "old" for s in range(SHARDS)}, members))
    records = [task(i) for i in range(10)]
    router.offer(records)
    await asyncio.sleep(0.3)
    assert old.offered == [] and new.offered == []
    router.update(view({s: "new" for s in range(SHARDS)}, members))
    await until(lambda: len(new.offered) == 10)
    assert router.rerouted >= 10
    await router.close()


async def test_an_offer_of_a_shard_nobody_holds_waits_for_an_owner(serve):
    remote = RecordingTimer(held=set(range(SHARDS)))
    address = await serve(timer=remote)
    router = TimerRouter(SHARDS, "me")
    router.update(view({}, {"other": (address, {"timer"}, set())}))
    router.offer([task(1)])
    await asyncio.sleep(0.2)
    router.update(view({s: "other" for s in range(SHARDS)}, {"other": (address, {"timer"}, set())}))
    await until(lambda: remote.offered == [task(1).task_id])
    await router.close()


async def test_fired_tasks_stay_here_when_a_worker_here_or_nowhere_takes_their_queue(serve):
    remote = RecordingDispatch()
    address = await serve(dispatch=remote)
    local = LocalDispatch(consumed={"here"})
    router = DispatchRouter("me", local)
    router.update(view({}, {"other": (address, {"dispatch"}, {"here", "there"})}))
    await router.hand_over([task(1, "here"), task(2, "nowhere"), task(3, "there")], 0)
    assert sorted(local.handed) == [task(1).task_id, task(2).task_id]
    assert remote.pushed == [task(3).task_id]
    await router.close()


async def test_fired_tasks_of_a_queue_consumed_on_several_other_nodes_are_spread_over_them(serve):
    one, two = RecordingDispatch(), RecordingDispatch()
    members = {"one": (await serve(dispatch=one), {"dispatch"}, {"q"}),
               "two": (await serve(dispatch=two), {"dispatch"}, {"q"})}
    router = DispatchRouter("me", LocalDispatch(consumed=set()))
    router.update(view({}, members))
    records = [task(i) for i in range(100)]
    await router.hand_over(records, 0)
    assert sorted(one.pushed + two.pushed) == sorted(r.task_id for r in records)
    assert 20 <= len(one.pushed) <= 80


async def test_a_push_that_fails_leaves_the_tasks_with_this_nodes_dispatch():
    local = LocalDispatch(consumed=set())
    router = DispatchRouter("me", local)
    router.update(view({}, {"gone": ("127.0.0.1:1", {"dispatch"}, {"q"})}))
    await router.hand_over([task(1)], 0)
    assert local.handed == [task(1).task_id]
    await router.close()


async def test_tasks_that_waited_here_for_a_worker_go_where_one_connects_and_are_confirmed_then(serve):
    remote = RecordingDispatch()
    address = await serve(dispatch=remote)
    local = LocalDispatch(consumed=set())
    batch = HandOver(asyncio.get_running_loop().create_future(), 3)
    local.waiting["late"] = [SimpleNamespace(record=task(i, "late"), fired_at=0, batches=[batch]) for i in range(3)]
    router = DispatchRouter("me", local)
    router.update(view({}, {"other": (address, {"dispatch"}, {"elsewhere"})}))
    await asyncio.sleep(0.1)
    assert remote.pushed == [] and not batch.future.done()  # nobody consumes "late" yet
    router.update(view({}, {"other": (address, {"dispatch"}, {"late"})}))  # a worker connected there
    await asyncio.wait_for(batch.future, 5)
    assert sorted(remote.pushed) == sorted(task(i).task_id for i in range(3))
    await router.close()
