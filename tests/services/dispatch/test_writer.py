"""Dispatch's transition writer: what it hands the store, and what it confirms once durable."""
import asyncio
import gc

from taskwheel.config import Config
from taskwheel.dispatch.finished import FinishedMemory
from taskwheel.dispatch.writer import HandOver, TransitionWriter
from taskwheel.stores.base import Transition, TransitionKind

from tests.services.timers import QuietTimer


class RecordingStore:
    ordered_apply_depth = 1

    def __init__(self):
        self.batches = []

    async def apply(self, transitions, now_ms):
        self.batches.append((list(transitions), gc.is_tracked(transitions)))
        return [True] * len(transitions)


def succeed(task_id: str) -> Transition:
    return Transition(task_id, 0, TransitionKind.SUCCEED, 1, 0)


async def test_the_stores_batch_of_transitions_is_out_of_the_gcs_view_and_each_hand_over_is_confirmed():
    store = RecordingStore()
    writer = TransitionWriter(Config(transition_linger_ms=0), store, FinishedMemory(1_000), lambda: 0)
    writer.start(QuietTimer())
    hand_over = HandOver(asyncio.get_running_loop().create_future(), 3)
    writer.write([succeed("a"), succeed("b")], None, [[hand_over], [hand_over]])
    writer.write([succeed("c")], None, [[hand_over]])
    await asyncio.wait_for(hand_over.future, 5)
    await writer.stop()
    batches = store.batches
    assert [t.task_id for batch, _ in batches for t in batch] == ["a", "b", "c"]
    assert not any(tracked for _, tracked in batches)
