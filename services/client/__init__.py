"""The Python client of taskwheel: submit and read tasks, and consume queues with a Worker.

    from taskwheel.client import Client, Worker

    with Client("127.0.0.1:7070") as client:
        task_id = client.submit("emails", b"hello", delay=30, idempotency_key="welcome:42")

    def send(delivery):
        print(delivery.task_id, delivery.payload)

    Worker("127.0.0.1:7070", "emails", send, concurrency=16).run()

See docs/client.md.
"""
from taskwheel.client.client import AsyncClient, Client, RetryPolicy
from taskwheel.client.errors import (Backpressure, InvalidTask, SubmitError, TaskEnded,
                                     TaskNotFound, TaskwheelError, Unavailable)
from taskwheel.client.models import Delivery, Stats, SubmitResult, Task, TaskSpec, TaskState
from taskwheel.client.worker import FailNow, RetryAfter, Worker, WorkerStats

__all__ = [
    "Client", "AsyncClient", "RetryPolicy",
    "TaskSpec", "SubmitResult", "Task", "TaskState", "Stats", "Delivery",
    "Worker", "WorkerStats", "RetryAfter", "FailNow",
    "TaskwheelError", "TaskNotFound", "InvalidTask", "TaskEnded", "Backpressure", "Unavailable",
    "SubmitError",
]
