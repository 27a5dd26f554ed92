"""docker-compose.yml stays runnable with no Docker engine here.

Three checks: Compose itself accepts the file (``docker compose config`` or Debian's
``docker-compose config``); its structure holds together (every command is one the real CLI
parses, no service names another: they meet in the store, the timer can be scaled, traces go
to Jaeger); and the very commands it runs start as local processes that schedule and deliver
tasks, with the listening addresses mapped to loopback ports.
"""
from __future__ import annotations

import asyncio
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
TASKWHEEL_SERVICES = ("ingest", "timer", "dispatch")
CLI = [sys.executable, "-c",
       "import sys; from taskwheel.cli.main import main; sys.exit(main(sys.argv[1:]))"]


@functools.cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def service(name: str) -> dict:
    return compose()["services"][name]


def command_flags(command: list[str]) -> dict[str, str]:
    """``--flag=value`` and ``--flag value`` items of a command, as a dict."""
    flags, args = {}, list(command)
    while args:
        item = args.pop(0)
        if item.startswith("--"):
            name, eq, value = item.partition("=")
            flags[name] = value if eq else args.pop(0)
    return flags


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


@functools.cache
def serve_help() -> str:
    return subprocess.run([*CLI, "serve", "--help"], capture_output=True, text=True,
                          check=True, timeout=60).stdout


def compose_cli() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


# -- Compose accepts it -----------------------------------------------------------------------

def test_docker_compose_config_accepts_the_file():
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed "
                    "(Debian: apt-get install docker-compose)")
    result = subprocess.run([*cli, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# -- its structure ----------------------------------------------------------------------------

def test_it_runs_cassandra_jaeger_and_the_three_services():
    assert set(compose()["services"]) == {"cassandra", "jaeger", *TASKWHEEL_SERVICES}


@pytest.mark.parametrize("name", TASKWHEEL_SERVICES)
def test_each_service_runs_taskwheel_serve_in_its_role(name):
    assert service(name)["command"][:3] == ["taskwheel", "serve", name]


@pytest.mark.parametrize("name", TASKWHEEL_SERVICES)
def test_each_command_uses_only_flags_taskwheel_serve_lists(name):
    accepted = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", serve_help()))
    assert {"--listen", "--store", "--advertise", "--node-id"} <= accepted
    assert set(command_flags(service(name)["command"])) <= accepted


@pytest.mark.parametrize("name", TASKWHEEL_SERVICES)
def test_each_command_parses_with_the_cli_parser(name):
    from taskwheel.cli.main import build_parser
    args = build_parser().parse_args(service(name)["command"][1:])
    assert (args.command, args.role) == ("serve", name)


@pytest.mark.parametrize("name", TASKWHEEL_SERVICES)
def test_each_service_listens_on_all_interfaces(name):
    host, _ = host_port(command_flags(service(name)["command"])["--listen"])
    assert host == "0.0.0.0"


@pytest.mark.parametrize("name", TASKWHEEL_SERVICES)
def test_no_service_names_another_or_a_fixed_address_to_be_reached_at(name):
    # The cluster finds its members in the store; a fixed --advertise or --node-id would make
    # the replicas of a scaled service one node.
    flags = set(command_flags(service(name)["command"]))
    assert flags <= {"--listen", "--store"}


@pytest.mark.parametrize("name", TASKWHEEL_SERVICES)
def test_each_service_uses_the_cassandra_service_as_its_store(name):
    store = command_flags(service(name)["command"])["--store"]
    assert re.fullmatch(r"cassandra://cassandra:9042/[a-z_][a-z0-9_]*", store)


def test_all_services_share_one_keyspace():
    stores = {command_flags(service(n)["command"])["--store"] for n in TASKWHEEL_SERVICES}
    assert len(stores) == 1


def test_timer_can_be_scaled():
    timer = service("timer")
    assert "container_name" not in timer
    assert "ports" not in timer


@pytest.mark.parametrize("name", TASKWHEEL_SERVICES)
def test_each_service_waits_for_a_healthy_cassandra(name):
    assert service(name)["depends_on"]["cassandra"]["condition"] == "service_healthy"


def test_cassandra_is_the_official_5_0_image_checked_with_cqlsh():
    cassandra = service("cassandra")
    assert cassandra["image"] == "cassandra:5.0"
    assert "cqlsh" in " ".join(cassandra["healthcheck"]["test"])


@pytest.mark.parametrize("name", TASKWHEEL_SERVICES)
def test_each_service_exports_traces_to_jaeger_over_otlp(name):
    env = service(name)["environment"]
    assert env["OTEL_TRACES_EXPORTER"] == "otlp"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
    assert service("jaeger")["image"].startswith("jaegertracing/all-in-one:")


@pytest.mark.parametrize("name", TASKWHEEL_SERVICES)
def test_each_service_is_built_from_the_repository_dockerfile(name):
    assert service(name)["build"] in (".", {"context": "."})
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^RUN pip wheel .* \.$", dockerfile, re.M)
    for path in ("pyproject.toml", "setup.py", "core", "protos", "services"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", dockerfile, re.M), path


# -- the same processes, without containers ---------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_commands(store: str) -> dict[str, list[str]]:
    """Each service's compose command with container names mapped to loopback ports."""
    ports = {name: free_port() for name in TASKWHEEL_SERVICES}
    commands = {}
    for name in TASKWHEEL_SERVICES:
        command = []
        for item in service(name)["command"][1:]:
            if not item.startswith("--"):
                command.append(item)
                continue
            flag, eq, value = item.partition("=")
            assert eq, f"{name}: write flags as --flag=value so that this test can map them"
            if flag == "--listen":
                value = f"127.0.0.1:{ports[name]}"
            elif flag == "--store":
                value = store
            command.append(f"{flag}={value}")
        commands[name] = command
    return commands


def wait_serving(address: str, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, f"{address}: exited with {process.returncode}"
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"{address} not serving within {timeout}s")


@pytest.fixture(params=["sqlite", pytest.param("cassandra", marks=pytest.mark.cassandra)])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tasks.db'}"
    host, port = request.getfixturevalue("cassandra_contact")
    return f"cassandra://{host}:{port}/compose_{uuid.uuid4().hex[:12]}"


@pytest.mark.slow
async def test_compose_commands_run_as_local_processes_and_deliver_tasks(store_url, tmp_path):
    from taskwheel.client import Client, Worker

    commands = local_commands(store_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    processes = {}
    try:
        for name in ("dispatch", "timer", "ingest"):
            with open(tmp_path / f"{name}.log", "w") as log:
                processes[name] = subprocess.Popen([*CLI, *commands[name]], env=env,
                                                   cwd=tmp_path, stdout=log,
                                                   stderr=subprocess.STDOUT)
        addresses = {n: command_flags(commands[n])["--listen"] for n in TASKWHEEL_SERVICES}
        for name in TASKWHEEL_SERVICES:
            wait_serving(addresses[name], processes[name])

        with Client(addresses["ingest"]) as client:
            task_ids = [r.task_id for r in client.submit_many(
                [{"queue": "compose", "payload": str(i), "delay": 0.3} for i in range(50)],
                raise_on_error=True)]
        delivered: list[str] = []
        worker = Worker(addresses["dispatch"], "compose", lambda d: delivered.append(d.task_id))
        await worker.start()
        deadline = time.monotonic() + 30
        while len(delivered) < len(task_ids) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a duplicate would show up now
        await worker.stop()
        assert sorted(delivered) == sorted(task_ids)
    finally:
        for process in processes.values():
            process.terminate()
        for name, process in processes.items():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for name in processes:  # shown by pytest when the test fails
            print(f"--- {name} ---\n{(tmp_path / f'{name}.log').read_text()[-3000:]}")
