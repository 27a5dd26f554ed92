"""The compiled code ships compiled, typed and lint-clean: the shared core, which exposes exactly
the names its stub declares, and the compiled loops each service keeps in its own folder."""
import ast
import importlib
import importlib.machinery
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import taskwheel.core

REPO = Path(__file__).resolve().parents[2]
CORE = REPO / "core"
# Package -> folder of every package with compiled modules besides the core (setup.py's list).
SERVICE_PACKAGES = {
    "taskwheel.dispatch": REPO / "services" / "dispatch",
    "taskwheel.ingest": REPO / "services" / "ingest",
    "taskwheel.timer": REPO / "services" / "timer",
    "taskwheel.stores.sqlite": REPO / "services" / "stores" / "sqlite",
}


def test_every_hot_path_module_is_a_compiled_extension():
    names = [f"taskwheel.core.{name}" for name in ("wheel", "batcher", "sharding", "records")]
    names += [f"{package}.{path.stem}" for package, folder in SERVICE_PACKAGES.items()
              for path in folder.glob("*.pyx")]
    assert len(names) > 4
    for name in names:
        module = importlib.import_module(name)
        assert module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), module.__file__


def test_the_package_exports_exactly_the_names_of_its_stub():
    stub = ast.parse((CORE / "__init__.pyi").read_text())
    declared = {
        node.name for node in stub.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))
    } | {
        node.target.id for node in stub.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }
    public = {name for name in declared if not name.startswith("_")}
    assert public == set(taskwheel.core.__all__)
    assert all(hasattr(taskwheel.core, name) for name in public)


def test_the_package_declares_that_it_is_typed():
    assert (Path(taskwheel.core.__file__).parent / "py.typed").exists()


def test_the_core_python_code_passes_flake8():
    paths = [CORE / "__init__.py", CORE / "__init__.pyi", CORE / "reference.py",
             REPO / "tests" / "core", REPO / "perf" / "bench_core.py", REPO / "perf" / "conftest.py"]
    paths += [path for folder in SERVICE_PACKAGES.values() for path in folder.glob("*.pyi")]
    paths += [path for folder in SERVICE_PACKAGES.values() for path in folder.glob("reference.py")]
    # Stubs follow typeshed's layout: no blank lines between their one-line definitions.
    done = subprocess.run([sys.executable, "-m", "flake8", "--max-line-length=110",
                           "--per-file-ignores=*.pyi:E301,E302,E305,E701,E704", *map(str, paths)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def stub_root(tmp_path):
    # mypy cannot follow the editable install's import hook, so show it the package as files.
    (tmp_path / "taskwheel").mkdir()
    (tmp_path / "taskwheel" / "__init__.pyi").write_text("")
    os.symlink(CORE, tmp_path / "taskwheel" / "core")
    # A service package as its compiled modules' stubs and its reference model only.
    for package, folder in SERVICE_PACKAGES.items():
        where = tmp_path.joinpath(*package.split("."))
        where.mkdir(parents=True, exist_ok=True)
        (where / "__init__.pyi").write_text("")
        for path in [*folder.glob("*.pyi"), *folder.glob("*.pxd"), folder / "reference.py"]:
            if path.exists():
                os.symlink(path, where / path.name)
    (tmp_path / "taskwheel" / "stores" / "__init__.pyi").write_text("")
    return tmp_path


def test_a_typical_caller_and_the_reference_model_type_check_strictly(stub_root, tmp_path):
    caller = tmp_path / "caller.py"
    caller.write_text(textwrap.dedent("""
        from array import array
        import numpy as np
        from collections import deque
        from dataclasses import dataclass
        from taskwheel.core import Batcher, RecordShape, TimingWheel, bucket_of, group_by, shard_of, shards_of
        from taskwheel.core.reference import ReferenceWheel
        from taskwheel.dispatch.leases import DispatchState, Fired, Take
        from taskwheel.stores.sqlite.reference import ReferenceSqliteReader
        from taskwheel.stores.sqlite.rows import SqliteReader, same_sqlite_as_python

        @dataclass(slots=True)
        class Transition:
            task_id: str

        wheel = TimingWheel(tick_ms=1, start_ms=0)
        wheel.schedule(1, 10)
        wheel.schedule_many(array("q", [2]), np.array([5], dtype=np.int64))
        wheel.schedule_many([3], [4])
        fired: array[int] = wheel.advance(10)
        upcoming: int | None = wheel.next_deadline()
        model = ReferenceWheel(tick_ms=1, start_ms=0)
        same: bool = fired.tolist() == model.advance(10).tolist()
        reference = ReferenceSqliteReader("tasks.db", "SELECT ?")
        batch = Batcher(10, 5).add(("shard", 1), "item", 0)
        groups: dict[int, list[str]] = group_by([1, 2], ["a", "b"])
        where: int = shard_of("task", 16) + bucket_of(5) + shards_of(["a"], 4)[0]
        reader = SqliteReader("tasks.db", "SELECT ?", busy_timeout_ms=100)
        rows: list[tuple[object, ...]] = reader.rows((1,)) if same_sqlite_as_python() else []
        reader.close()
        tables = DispatchState([], RecordShape(Transition, ["task_id"]), "succeed")

        class Queue:
            ready = deque([Fired("rec", [], 0, 0)])

        class Consumer:
            in_flight: dict[str, Fired] = {}

        taken: int = tables.take_fired([], Take(None, 0, 0), lambda take, rec: None)
        sent, shortest = tables.fill(Queue(), Consumer(), 10, 0, 60_000)
        lease_row_gen: int = sent[0].gen if sent else shortest + taken
    """))
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"),
         str(caller)],
        capture_output=True, text=True, env={**os.environ, "MYPYPATH": str(stub_root)}, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


# Declaration-only .pxd files (inline helpers shared by the modules), with no .pyx of their own.
SHARED_PXD = {"idshards", "int64", "protowire"}


@pytest.mark.parametrize("folder", [CORE, *SERVICE_PACKAGES.values()], ids=lambda p: p.name)
def test_every_compiled_module_is_paired_with_a_pxd(folder):
    pxd = {p.stem for p in folder.glob("*.pxd")}
    shared = SHARED_PXD if folder == CORE else set()
    assert pxd - shared == {p.stem for p in folder.glob("*.pyx")}
    assert shared <= pxd


@pytest.mark.parametrize("folder", [*SERVICE_PACKAGES.values()], ids=lambda p: p.name)
def test_every_compiled_module_of_a_service_has_a_stub(folder):
    assert {p.stem for p in folder.glob("*.pyi")} == {p.stem for p in folder.glob("*.pyx")}


def test_other_cython_code_can_cimport_the_core_declarations(stub_root, tmp_path):
    user = tmp_path / "user.pyx"
    # Taking a field's address compiles only if the .pxd declares it as a C field.
    user.write_text(textwrap.dedent("""
        from taskwheel.core.wheel cimport NSLOTS, Entry, Slot, TimingWheel, _int64
        from taskwheel.core.batcher cimport Batcher
        from taskwheel.core.sharding cimport _fnv1a
        from taskwheel.dispatch.leases cimport Fired
        from libc.stdint cimport int64_t

        cdef Entry entry = Entry(1, 2)

        def peek(TimingWheel wheel, Batcher batcher):
            cdef Slot *overdue = &wheel._slots[NSLOTS - 1]
            cdef Py_ssize_t *pending = &batcher._count
            cdef Fired fired = Fired.__new__(Fired)
            cdef int64_t *since
            since = &fired.since
            return overdue.live, pending[0], _fnv1a(b"id", 2), _int64(entry.deadline, "deadline"), since[0]
    """))
    done = subprocess.run([sys.executable, "-m", "cython", "-3", "-I", str(stub_root), str(user)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "user.c").exists()
