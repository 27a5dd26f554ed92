"""The core's behaviour tests run against the compiled classes and their reference models."""
import pytest

from taskwheel.core import Batcher, TimingWheel
from taskwheel.core.reference import ReferenceBatcher, ReferenceWheel

START_MS = 1_700_000_000_000  # an epoch time, so the wheel's upper levels are exercised


@pytest.fixture(params=[TimingWheel, ReferenceWheel], ids=["compiled", "reference"])
def wheel_cls(request):
    return request.param


@pytest.fixture
def wheel(wheel_cls):
    return wheel_cls(tick_ms=1, start_ms=START_MS)


@pytest.fixture(params=[Batcher, ReferenceBatcher], ids=["compiled", "reference"])
def batcher_cls(request):
    return request.param
