"""Waiting for a condition, never for a fixed time: poll with a deadline, fail naming what."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def async_wait_until(predicate: Callable[[], Awaitable[Any]], within: float, what: str,
                           interval: float = 0.05) -> Any:
    """The same for an async predicate."""
    deadline = time.monotonic() + within
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)


async def eventually(probe: Callable[[], Awaitable[T]], want: Callable[[T], bool],
                     within: float = 10.0, interval: float = 0.05) -> T:
    """Poll ``probe`` until ``want`` holds or ``within`` passes; return the last value,
    so the caller's assertion shows what was seen instead of a bare timeout."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if want(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(interval)
