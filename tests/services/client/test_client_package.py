"""The client stands alone: importing it loads neither the server nor any compiled module of
taskwheel, and its TaskState says what the contract says."""
import json
import subprocess
import sys

from taskwheel.client import TaskState
from taskwheel.v1 import task_pb2

SERVER_PACKAGES = ("taskwheel.core", "taskwheel.stores", "taskwheel.dispatch", "taskwheel.timer",
                   "taskwheel.ingest", "taskwheel.task", "taskwheel.app")

# Run in a fresh interpreter: this one has imported the server for other tests.
LOADED_BY_THE_CLIENT = """
import importlib.machinery, json, sys
import taskwheel.client
loaded = sorted(name for name in sys.modules if name.split(".")[0] == "taskwheel")
compiled = [name for name in loaded
            if (getattr(sys.modules[name], "__file__", None) or "").endswith(
                tuple(importlib.machinery.EXTENSION_SUFFIXES))]
print(json.dumps({"loaded": loaded, "compiled": compiled}))
"""


def test_importing_the_client_loads_no_server_module_and_nothing_compiled():
    out = subprocess.run([sys.executable, "-c", LOADED_BY_THE_CLIENT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    modules = json.loads(out.stdout)
    assert "taskwheel.client" in modules["loaded"]
    server = [name for name in modules["loaded"]
              if any(name == package or name.startswith(package + ".") for package in SERVER_PACKAGES)]
    assert server == []
    assert modules["compiled"] == []


def test_task_state_has_each_state_of_the_contract_by_name_and_number():
    contract = {name.removeprefix("TASK_STATE_"): number
                for name, number in task_pb2.TaskState.items() if number != task_pb2.TASK_STATE_UNSPECIFIED}
    assert {state.name: state.value for state in TaskState} == contract


def test_task_state_has_the_numbers_the_server_stores():
    from taskwheel.task import TaskState as ServerTaskState

    assert {s.name: s.value for s in TaskState} == {s.name: s.value for s in ServerTaskState}
