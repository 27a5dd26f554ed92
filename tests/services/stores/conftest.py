"""Runs ``async def`` tests under tests/services/stores/ with asyncio.run, one event loop per test.

Stores are opened inside the test (see contract.py's ``opened``), so nothing outlives its loop
and no plugin (pytest-asyncio) is needed.
"""
import asyncio
import inspect

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    asyncio.run(pyfuncitem.obj(**{name: pyfuncitem.funcargs[name] for name in names}))
    return True
