"""The one wall clock every service and store reads: unix milliseconds, the unit of every due
time, checkpoint and lease in taskwheel."""
import time


def now_ms() -> int:
    return time.time_ns() // 1_000_000
