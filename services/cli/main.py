"""taskwheel's command line.

    taskwheel up --data-dir DIR --listen 127.0.0.1:7070     all three services, embedded store
    taskwheel serve ingest|timer|dispatch --listen ... --store ...    one service (a node each)
    taskwheel submit --target HOST:PORT --queue Q [--delay 5 | --at ISO] [--count N] PAYLOAD
    taskwheel worker --target HOST:PORT --queue Q [--concurrency 16]
    taskwheel status --target HOST:PORT
    taskwheel dev cassandra start|stop|status --dir DIR [--port 9042]
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import sys

from taskwheel import config as config_mod


def _server_parser(sub, name: str, help_text: str, roles: bool) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    if roles:
        p.add_argument("role", choices=("ingest", "timer", "dispatch"))
    config_mod.add_config_flags(p)
    p.add_argument("--log-level", default="INFO")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskwheel", description="Distributed task scheduler.")
    sub = parser.add_subparsers(dest="command", required=True)
    _server_parser(sub, "up", "Run ingest, timer and dispatch in one process (embedded store by default).", False)
    _server_parser(sub, "serve", "Run one service in its own process.", True)

    p = sub.add_parser("submit", help="Submit tasks.")
    p.add_argument("--target", default="127.0.0.1:7070")
    p.add_argument("--queue", required=True)
    when = p.add_mutually_exclusive_group()
    when.add_argument("--delay", type=float, help="seconds from now")
    when.add_argument("--at", help="ISO 8601 fire time, e.g. 2026-11-26T20:00:00Z")
    p.add_argument("--count", type=int, default=1, help="submit this many copies")
    p.add_argument("--idempotency-key", default="")
    p.add_argument("--max-attempts", type=int, default=0)
    p.add_argument("--header", action="append", default=[], metavar="K=V")
    p.add_argument("payload", nargs="?", default="")

    p = sub.add_parser("worker", help="Consume a queue, print each task, ack it.")
    p.add_argument("--target", default="127.0.0.1:7070")
    p.add_argument("--queue", required=True)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-in-flight", type=int, default=0)
    p.add_argument("--fail", action="store_true", help="nack every task (to see retries)")

    p = sub.add_parser("status", help="Task counts, timer lag and queue depths.")
    p.add_argument("--target", default="127.0.0.1:7070", help="ingest (or the all-in-one server)")
    p.add_argument("--timer-target", default="", help="the timer, when it runs separately")
    p.add_argument("--dispatch-target", default="", help="dispatch, when it runs separately")

    p = sub.add_parser("dev", help="Development helpers.")
    dev = p.add_subparsers(dest="dev_command", required=True)
    c = dev.add_parser("cassandra", help="Run a single-node Apache Cassandra from Maven Central's jars.")
    c.add_argument("args", nargs=argparse.REMAINDER, help="start|stop|status --dir DIR [--port N]")
    return parser


def _run_server(args, roles) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_mod.from_args(args)
    except ValueError as exc:
        print(f"taskwheel: {exc}", file=sys.stderr)
        return 2
    from taskwheel.app import serve

    def ready(port: int) -> None:
        host = cfg.listen.rsplit(":", 1)[0]
        print(f"taskwheel {'+'.join(roles)} serving on {host}:{port}", flush=True)

    try:
        asyncio.run(serve(cfg, roles, ready))
    except ValueError as exc:
        print(f"taskwheel: {exc}", file=sys.stderr)
        return 2
    return 0


def _submit(args) -> int:
    from taskwheel.client import Client

    headers = {}
    for item in args.header:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"taskwheel: --header {item!r} must be KEY=VALUE", file=sys.stderr)
            return 2
        headers[key] = value
    fire_at = None
    if args.at:
        fire_at = dt.datetime.fromisoformat(args.at.replace("Z", "+00:00"))
    with Client(args.target) as client:
        specs = [
            dict(queue=args.queue, payload=args.payload.encode(), delay=args.delay, fire_at=fire_at,
                 idempotency_key=args.idempotency_key, max_attempts=args.max_attempts, headers=headers)
            for _ in range(args.count)
        ]
        results = client.submit_many(specs)
    failed = 0
    for r in results:
        if not r.ok:
            failed += 1
            print(f"error: {r.error}", file=sys.stderr)
        else:
            print(r.task_id + ("  (duplicate)" if r.duplicate else ""))
    return 1 if failed else 0


def _worker(args) -> int:
    import threading

    from taskwheel.client import Worker

    lock = threading.Lock()

    def handle(delivery) -> None:
        line = json.dumps({
            "task_id": delivery.task_id, "attempt": delivery.attempt, "queue": delivery.queue,
            "payload": delivery.payload.decode("utf-8", "replace"),
            "late_ms": _late_ms(delivery),
        })
        with lock:  # handlers run on several threads; print() would interleave their lines
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        if args.fail:
            raise RuntimeError("--fail given")

    worker = Worker(args.target, args.queue, handle, concurrency=args.concurrency,
                    max_in_flight=args.max_in_flight or None)
    try:
        worker.run()
    except KeyboardInterrupt:
        pass
    return 0


def _late_ms(delivery) -> int:
    from taskwheel.clock import now_ms

    return now_ms() - delivery.fire_at_ms


def _status(args) -> int:
    import grpc

    from taskwheel.internal.v1 import timer_pb2, timer_pb2_grpc
    from taskwheel.v1 import dispatch_pb2, dispatch_pb2_grpc, ingest_pb2, ingest_pb2_grpc

    out = {}
    with grpc.insecure_channel(args.target) as ch:
        try:
            s = ingest_pb2_grpc.IngestStub(ch).Stats(ingest_pb2.StatsRequest(), timeout=10)
        except grpc.RpcError as exc:
            print(f"taskwheel: {args.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        out["tasks"] = {k: getattr(s, k) for k in ("scheduled", "leased", "succeeded", "failed", "cancelled")}
        out["store"] = s.store
    for name, target, call in (
        ("timer", args.timer_target or args.target,
         lambda ch: timer_pb2_grpc.TimerStub(ch).Status(timer_pb2.TimerStatusRequest(), timeout=10)),
        ("dispatch", args.dispatch_target or args.target,
         lambda ch: dispatch_pb2_grpc.DispatchStub(ch).Status(dispatch_pb2.DispatchStatusRequest(), timeout=10)),
    ):
        with grpc.insecure_channel(target) as ch:
            try:
                msg = call(ch)
            except grpc.RpcError as exc:
                out[name] = f"unreachable at {target}: {exc.code().name}"
                continue
        from google.protobuf.json_format import MessageToDict
        out[name] = MessageToDict(msg, preserving_proto_field_name=True)
    print(json.dumps(out, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "up":
        return _run_server(args, ("ingest", "timer", "dispatch"))
    if args.command == "serve":
        return _run_server(args, (args.role,))
    if args.command == "submit":
        return _submit(args)
    if args.command == "worker":
        return _worker(args)
    if args.command == "status":
        return _status(args)
    if args.command == "dev":
        from taskwheel.stores.cassandra import devserver

        return devserver.main(args.args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
