"""The event loop the server runs on: uvloop when it is installed (``event_loop: auto``, the
default), or asyncio's own.

Why: under load most of the process's CPU per check is grpc.aio and the event loop under it,
not extauth's own code (docs/benchmarks.md). On uvloop (libuv, compiled) the same extauth
serves more checks per core: measured side by side through Envoy (docs/benchmarks.md), 4-16%
more plain-HTTP checks per second in three runs. Nothing in extauth depends on
which loop runs it, so ``asyncio`` stays a setting, for a platform without uvloop wheels or to
rule the loop out while debugging.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

__all__ = ["EventLoop", "UnavailableLoop", "available", "loop_factory", "loop_name", "run"]

EventLoop = Literal["auto", "asyncio", "uvloop"]
LoopFactory = Callable[[], asyncio.AbstractEventLoop]

T = TypeVar("T")


class UnavailableLoop(RuntimeError):
    """``event_loop: uvloop`` where uvloop cannot be imported."""


def loop_factory(choice: EventLoop) -> LoopFactory:
    """What makes the loop for ``choice``: ``auto`` falls back to asyncio without uvloop;
    an explicit ``uvloop`` that is missing is an error, not a silent fallback."""
    if choice == "asyncio":
        return asyncio.new_event_loop
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError as e:
        if choice == "uvloop":
            raise UnavailableLoop("event_loop is uvloop, but uvloop is not installed") from e
        return asyncio.new_event_loop
    factory: LoopFactory = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], choice: EventLoop) -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    try:
        factory = loop_factory(choice)
    except UnavailableLoop:
        main.close()  # never started: no "coroutine was never awaited" warning
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def available(choice: EventLoop) -> bool:
    """Whether ``choice`` can run here (config validation: refuse at load, not at start)."""
    return choice != "uvloop" or importlib.util.find_spec("uvloop") is not None


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``, for the start-up log line."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
