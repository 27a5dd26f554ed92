"""Where a task lives: its shard never changes, its minute bucket rounds down."""
import os
import subprocess
import sys
from array import array

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskwheel.core import BUCKET_MS, bucket_of, shard_of, shards_of

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def fnv1a_64(text: str) -> int:
    h = FNV_OFFSET
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * FNV_PRIME) % (1 << 64)
    return h


@pytest.mark.parametrize("text, digest", [
    ("", 0xCBF29CE484222325),  # the published FNV-1a 64 test vectors
    ("a", 0xAF63DC4C8601EC8C),
    ("foobar", 0x85944171F73967E8),
])
def test_the_shard_hash_is_fnv1a_64_of_the_utf8_bytes(text, digest):
    assert shard_of(text, 1 << 62) == digest % (1 << 62)


@pytest.mark.parametrize("task_id, shards", [
    ("a", [0, 12, 140, 996]),
    ("foobar", [0, 8, 232, 968]),
    ("01HF8Z3K4Q7W9XJ2M5N6P8R0TV", [0, 10, 186, 722]),
    ("täsk/ü-日本", [0, 7, 71, 663]),
])
def test_known_ids_keep_their_shards_forever(task_id, shards):
    # Stores partition rows by these numbers: a change here strands every stored task.
    assert [shard_of(task_id, n) for n in (1, 16, 256, 1000)] == shards


@given(st.text(max_size=40), st.integers(1, 1 << 40))
def test_shard_of_matches_the_definition(task_id, num_shards):
    assert shard_of(task_id, num_shards) == fnv1a_64(task_id) % num_shards


def test_shards_agree_across_processes_with_different_hash_seeds():
    code = "from taskwheel.core import shard_of; print([shard_of(f'task-{i}', 64) for i in range(50)])"
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    assert outputs == {str([shard_of(f"task-{i}", 64) for i in range(50)]) + "\n"}


def test_shards_of_is_shard_of_for_each_id():
    ids = [f"task-{i}" for i in range(1_000)]
    out = shards_of(ids, 24)
    assert isinstance(out, array) and out.typecode == "q"
    assert out.tolist() == [shard_of(task_id, 24) for task_id in ids]
    assert shards_of(iter(ids[:3]), 24).tolist() == out[:3].tolist()


@pytest.mark.parametrize("num_shards", [0, -3])
def test_the_shard_count_must_be_positive(num_shards):
    with pytest.raises(ValueError, match="num_shards"):
        shard_of("a", num_shards)
    with pytest.raises(ValueError, match="num_shards"):
        shards_of(["a"], num_shards)


@pytest.mark.parametrize("task_id", [b"a", 5, None])
def test_a_task_id_must_be_a_str(task_id):
    with pytest.raises(TypeError, match="task_id"):
        shard_of(task_id, 4)
    with pytest.raises(TypeError, match="task_id"):
        shards_of(["ok", task_id], 4)


@pytest.mark.parametrize("due_ms, bucket", [
    (0, 0), (59_999, 0), (60_000, 1), (-1, -1), (-60_000, -1), (-60_001, -2),
    ((1 << 63) - 1, ((1 << 63) - 1) // BUCKET_MS), (-(1 << 63), -(1 << 63) // BUCKET_MS),
])
def test_bucket_of_is_the_minute_rounded_down(due_ms, bucket):
    assert bucket_of(due_ms) == bucket


@given(st.integers(-(1 << 63), (1 << 63) - 1))
def test_bucket_of_is_floor_division_by_a_minute(due_ms):
    assert bucket_of(due_ms) == due_ms // BUCKET_MS


def test_bucket_of_rejects_non_integers():
    with pytest.raises(TypeError):
        bucket_of(1.5)
