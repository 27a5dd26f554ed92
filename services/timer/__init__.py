"""Timer: keeps the tasks due in the next seconds in the compiled timing wheel, loaded from the
store ahead of time, and hands what fires to dispatch."""
from taskwheel.timer.servicer import TimerService

__all__ = ["TimerService"]
