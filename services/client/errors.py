"""What the client raises: one class per status code a caller handles differently.

Every error keeps the gRPC status code (``.code``) and the server's message (``.details``); the
original ``grpc.RpcError`` is the ``__cause__``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence

import grpc

if TYPE_CHECKING:
    from taskwheel.client.models import SubmitResult

RETRY_AFTER_KEY = "retry-after-ms"


class TaskwheelError(Exception):
    """Any failed call; ``code`` is the grpc.StatusCode the server (or the channel) gave,
    ``retry_after`` (seconds) the server's hint of when a retry may succeed, or None."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str = "", code: grpc.StatusCode | None = None,
                 retry_after: float | None = None):
        super().__init__(details)
        self.details = details
        self.retry_after = retry_after
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class TaskNotFound(TaskwheelError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidTask(TaskwheelError):
    """The request or a task in it broke a rule; ``details`` names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class TaskEnded(TaskwheelError):
    """Cancel of a task that already succeeded, failed or was cancelled."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Backpressure(TaskwheelError):
    """The server's write queue is full; ``retry_after`` (seconds) is its hint, or None."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(TaskwheelError):
    """The server (or its store: too few Cassandra replicas up) cannot take the call now;
    nothing was accepted. ``retry_after`` is the server's hint, or None."""

    code = grpc.StatusCode.UNAVAILABLE


class SubmitError(TaskwheelError):
    """Some tasks of a ``submit_many`` were refused (raised only with ``raise_on_error=True``).

    ``results`` holds every result in request order, ``failed`` the refused ones.
    """

    def __init__(self, results: Sequence["SubmitResult"]):
        self.results = list(results)
        self.failed = [r for r in self.results if not r.ok]
        first = self.failed[0]
        super().__init__(
            f"{len(self.failed)} of {len(self.results)} tasks refused; first at index "
            f"{first.index}: {first.error}", first.code)


_BY_CODE: dict[grpc.StatusCode, type[TaskwheelError]] = {
    cls.code: cls for cls in (TaskNotFound, InvalidTask, TaskEnded, Backpressure, Unavailable)
}
_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode with this number (UNKNOWN for numbers gRPC does not define)."""
    return _CODE_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def retry_after_of(metadata: Iterable[Any] | None) -> float | None:
    """Seconds from a ``retry-after-ms`` entry in (trailing) metadata, or None."""
    for key, value in metadata or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, float(value) / 1000.0)
            except (TypeError, ValueError):
                return None
    return None


def error_for(code: grpc.StatusCode, details: str,
              retry_after: float | None = None) -> TaskwheelError:
    """The exception for a status code and message."""
    return _BY_CODE.get(code, TaskwheelError)(details, code, retry_after=retry_after)


def from_rpc_error(error: grpc.RpcError) -> TaskwheelError:
    """Maps a grpc (sync or aio) call error to the client's exception."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or ""
    metadata = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    return error_for(code, details, retry_after_of(metadata))
