"""The benchmark scenarios: how fast tasks are submitted and when they are due.

A scenario is a sequence of phases run back to back by the load generator. Each phase submits
tasks at a piecewise-constant rate (or as fast as the driver takes them) and gives every task a
fire time from the phase's spread:

* ``FireSpread.after_submit(offset_s, length_s)``: due ``offset_s + U(0, length_s)`` seconds
  after the moment the submitter built the batch, as a user calling "run this in N seconds" does.
* ``FireSpread.same_second(at_s)``: all due at one instant, the top of the whole second
  ``at_s`` seconds after the run started (a cron-style top-of-minute burst).
* ``FireSpread.window(at_s, length_s)``: due ``at_s + U(0, length_s)`` seconds after the run
  started, whenever submitted: a fire rate set apart from the submit rate.

The named scenarios follow issue 5 (full scale, for the 2-core reference machine):

=============  ==============================================================================
steady         12,000 tasks/s on average with 36,000/s peaks (1 s of every 10), 30 s, due
               2-10 s after submission.
spike          5,000 tasks/s, then 10x (50,000/s) for 10 s, then 5,000/s again; due 2-10 s out.
pending_1m     1,000,000 tasks due over the next hour, submitted as fast as the driver takes
               them, then 30 s of a 5,000/s stream due 2-10 s out.
top_of_minute  100,000 tasks submitted at 25,000/s, all due on the same second, 10 s after
               the run started.
constant_10k   10,000 tasks/s with no peaks for 30 s, due 2-10 s after submission.
fire_50k       500,000 tasks submitted as fast as taken, due evenly over the 10 s that start
               20 s after the run started: firing at 50,000/s with no submits beside it.
=============  ==============================================================================

``scenario.scaled(0.01)`` multiplies every rate and count by the factor and keeps the durations
(a spike stays 10 s long); ``time_factor`` shortens the durations too, for CI smoke runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterator


@dataclass(frozen=True)
class FireSpread:
    """When a phase's tasks are due. See the module docstring."""

    kind: str  # "after_submit", "same_second" or "window"
    offset_s: float
    length_s: float = 0.0

    @classmethod
    def after_submit(cls, offset_s: float, length_s: float) -> "FireSpread":
        return cls("after_submit", offset_s, length_s)

    @classmethod
    def same_second(cls, at_s: float) -> "FireSpread":
        return cls("same_second", at_s, 0.0)

    @classmethod
    def window(cls, at_s: float, length_s: float) -> "FireSpread":
        return cls("window", at_s, length_s)

    def __post_init__(self) -> None:
        if self.kind not in ("after_submit", "same_second", "window"):
            raise ValueError(f"unknown fire spread {self.kind!r}")
        if self.offset_s < 0 or self.length_s < 0:
            raise ValueError("fire spread offsets must be >= 0")

    def latest_after(self, submit_s: float) -> float:
        """The latest fire time (s since run start) of a task submitted at ``submit_s``."""
        if self.kind == "same_second":
            return math.floor(self.offset_s)
        if self.kind == "window":
            return self.offset_s + self.length_s
        return submit_s + self.offset_s + self.length_s


@dataclass(frozen=True)
class Segment:
    """A stretch of constant submit rate; ``rate=None`` means as fast as the driver takes them."""

    duration_s: float | None
    rate: float | None
    tasks: int


@dataclass(frozen=True)
class Phase:
    """Tasks submitted under one rate profile and one fire spread.

    ``tasks`` fixed counts apply to unpaced phases (``rate=None``). A paced phase submits
    ``rate`` tasks/s for ``duration_s``, except during ``peak_s`` of every ``period_s`` seconds
    (the first ``peak_s`` of each period), when it submits ``peak_rate``.
    """

    name: str
    fire: FireSpread
    rate: float | None = None
    duration_s: float = 0.0
    tasks: int = 0
    peak_rate: float | None = None
    peak_s: float = 0.0
    period_s: float = 0.0
    # Tasks whose fire time lies far beyond the run: held pending, never expected to fire in it.
    pending: bool = False

    def segments(self) -> Iterator[Segment]:
        """The phase as constant-rate stretches, in order."""
        if self.rate is None:
            yield Segment(None, None, self.tasks)
            return
        if not self.peak_rate or not self.period_s:
            yield Segment(self.duration_s, self.rate, round(self.rate * self.duration_s))
            return
        t = 0.0
        while t < self.duration_s - 1e-9:
            peak = min(self.peak_s, self.duration_s - t)
            yield Segment(peak, self.peak_rate, round(self.peak_rate * peak))
            t += peak
            base = min(self.period_s - self.peak_s, self.duration_s - t)
            if base > 1e-9:
                yield Segment(base, self.rate, round(self.rate * base))
                t += base

    @property
    def total_tasks(self) -> int:
        return sum(s.tasks for s in self.segments())

    @property
    def average_rate(self) -> float | None:
        if self.rate is None or not self.duration_s:
            return None
        return self.total_tasks / self.duration_s


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    phases: tuple[Phase, ...]
    scale: float = 1.0
    time_factor: float = 1.0
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def total_tasks(self) -> int:
        return sum(p.total_tasks for p in self.phases)

    @property
    def pending_tasks(self) -> int:
        """Tasks submitted to be due long after the run (held, never fired in the run)."""
        return sum(p.total_tasks for p in self.phases if p.pending)

    @property
    def paced_seconds(self) -> float:
        """Wall time of the paced phases (unpaced ones last as long as the driver needs)."""
        return sum(p.duration_s for p in self.phases if p.rate is not None)

    def scaled(self, factor: float, time_factor: float = 1.0) -> "Scenario":
        """Rates and counts times ``factor``; durations (and fire offsets) times ``time_factor``."""
        if factor <= 0 or time_factor <= 0:
            raise ValueError("scale factors must be > 0")

        def scale_phase(p: Phase) -> Phase:
            fire = p.fire
            if not p.pending:
                fire = replace(fire, offset_s=fire.offset_s * time_factor,
                               length_s=fire.length_s * time_factor)
            return replace(
                p,
                rate=None if p.rate is None else p.rate * factor,
                peak_rate=None if p.peak_rate is None else p.peak_rate * factor,
                duration_s=p.duration_s * time_factor,
                peak_s=p.peak_s * time_factor,
                period_s=p.period_s * time_factor,
                tasks=max(1, round(p.tasks * factor)) if p.tasks else 0,
                fire=fire,
            )

        return replace(self, phases=tuple(scale_phase(p) for p in self.phases),
                       scale=self.scale * factor, time_factor=self.time_factor * time_factor)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "scale": self.scale,
            "time_factor": self.time_factor,
            "total_tasks": self.total_tasks,
            "pending_tasks": self.pending_tasks,
            "phases": [
                {
                    "name": p.name,
                    "rate": p.rate,
                    "peak_rate": p.peak_rate,
                    "peak_s": p.peak_s,
                    "period_s": p.period_s,
                    "duration_s": p.duration_s,
                    "tasks": p.total_tasks,
                    "average_rate": p.average_rate,
                    "pending": p.pending,
                    "fire": {"kind": p.fire.kind, "offset_s": p.fire.offset_s,
                             "length_s": p.fire.length_s},
                }
                for p in self.phases
            ],
        }


DUE_SOON = FireSpread.after_submit(2.0, 8.0)

STEADY = Scenario(
    "steady",
    "12K tasks/s average, 36K/s peaks (1 s in 10), 30 s, due 2-10 s after submission",
    (
        # (36,000 * 1 + r * 9) / 10 = 12,000  =>  r = 9,333.3
        Phase("steady", DUE_SOON, rate=(12_000 * 10 - 36_000) / 9, duration_s=30.0,
              peak_rate=36_000, peak_s=1.0, period_s=10.0),
    ),
)

SPIKE = Scenario(
    "spike",
    "5K tasks/s, a 10x spike (50K/s) for 10 s, 5K/s again; due 2-10 s after submission",
    (
        Phase("before", DUE_SOON, rate=5_000, duration_s=10.0),
        Phase("spike", DUE_SOON, rate=50_000, duration_s=10.0),
        Phase("after", DUE_SOON, rate=5_000, duration_s=10.0),
    ),
)

PENDING_1M = Scenario(
    "pending_1m",
    "1M tasks due over the next hour (submitted as fast as taken), then 30 s of 5K/s due now",
    (
        Phase("pending", FireSpread.after_submit(600.0, 3000.0), tasks=1_000_000, pending=True),
        Phase("stream", DUE_SOON, rate=5_000, duration_s=30.0),
    ),
    notes={"pending": "due 10-60 min after submission, so none fire inside a bounded run"},
)

TOP_OF_MINUTE = Scenario(
    "top_of_minute",
    "100K tasks all due on the same second (10 s after start), submitted at 25K/s",
    (
        Phase("burst", FireSpread.same_second(10.0), rate=25_000, duration_s=4.0),
    ),
    notes={"late_submits": "a driver slower than 25K/s submits some tasks after their second"},
)

CONSTANT_10K = Scenario(
    "constant_10k",
    "10K tasks/s with no peaks for 30 s, due 2-10 s after submission: the rate issue 3's "
    "lateness target is stated at",
    (
        Phase("constant", DUE_SOON, rate=10_000, duration_s=30.0),
    ),
)

FIRE_50K = Scenario(
    "fire_50k",
    "500K tasks submitted as fast as taken, due evenly over 10 s from 20 s after start: "
    "50K fires/s with no submits beside them",
    (
        Phase("fire", FireSpread.window(20.0, 10.0), tasks=500_000),
    ),
    notes={"late_submits": "a driver slower than 25K/s submits some tasks after they are due"},
)

SCENARIOS: dict[str, Scenario] = {
    s.name: s for s in (STEADY, SPIKE, PENDING_1M, TOP_OF_MINUTE, CONSTANT_10K, FIRE_50K)
}


def get_scenario(name: str, scale: float = 1.0, time_factor: float = 1.0) -> Scenario:
    try:
        scenario = SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None
    if scale == 1.0 and time_factor == 1.0:
        return scenario
    return scenario.scaled(scale, time_factor)
