"""The GIL's switch interval of a server process: short while a client waits on the store.

A thread that wants the GIL asks its holder to let go of it after the switch interval. The
embedded store's threads let go of the GIL around every SQLite call and must win it back
after, so with the event loop busy each SQLite call of theirs costs up to an interval. That is
what a client waiting on a write feels: at 0.2 ms the server accepted 83-85K tasks a second,
at 5 ms 68-71K (perf/submit_capacity.py). Firing pays the other way: each time a store thread
or grpc's takes the GIL the event loop waits, and acks and due slices are written and read
ahead of need, so those threads can wait for the loop instead. At 50K fires/s this policy gave
p99 lateness 10.1-19.2 ms (median 13.3) against 9.9-25.2 (median 18.6) at 0.2 ms always,
lower in 6 of 8 alternating pairs, while the accept rate stayed at 74-83K against 79-82K/s
(docs/performance.md, 2026-12-07).

So the interval is SHORT_S while any Submit, Get, Cancel or Stats waits on the store, and
LONG_S otherwise. Only a server process turns this on (``enable``); elsewhere (tests, a client
in the same process) ``client_waits`` changes nothing.
"""
from __future__ import annotations

import sys

SHORT_S = 0.0002
LONG_S = 0.005

_enabled = False
_waiting = 0  # client calls waiting on the store now


def enable() -> None:
    """Makes this process's switch interval follow the clients' waits; LONG_S while none waits."""
    global _enabled
    _enabled = True
    sys.setswitchinterval(SHORT_S if _waiting else LONG_S)


def disable(interval_s: float) -> None:
    """Stops following the waits and sets ``interval_s``."""
    global _enabled
    _enabled = False
    sys.setswitchinterval(interval_s)


class client_waits:
    """``with client_waits():`` around a store call a client is waiting on."""

    __slots__ = ()

    def __enter__(self) -> None:
        global _waiting
        _waiting += 1
        if _waiting == 1 and _enabled:
            sys.setswitchinterval(SHORT_S)

    def __exit__(self, *exc: object) -> None:
        global _waiting
        _waiting -= 1
        if _waiting == 0 and _enabled:
            sys.setswitchinterval(LONG_S)
