"""Small asyncio helpers shared across modules."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


def retrieve(future: asyncio.Future[Any]) -> None:
    """A done callback that reads a future's exception, for a future whose end nobody else
    awaits (every waiter gave up, or its handler went away): its failure is expected, and
    asyncio would otherwise log "exception was never retrieved" when it is collected."""
    if not future.cancelled():
        future.exception()


async def cancel_and_wait(task: asyncio.Future[Any] | None) -> None:
    """Cancel ``task`` and wait until it has ended, its outcome retrieved.

    Cancelling again until it is done: an asyncio.wait_for inside it can swallow a
    cancellation that races with completion (Python 3.11)."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    retrieve(task)


class BackgroundTasks:
    """Work nobody awaits, at most ``limit`` at once: held until it ends (the loop keeps only
    weak references to tasks), its failure retrieved (the work reports its own)."""

    __slots__ = ("_limit", "_tasks")

    def __init__(self, limit: int | None = None) -> None:
        self._limit = limit
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, work: Callable[[], Coroutine[Any, Any, Any]]) -> bool:
        """Start ``work()``; False, and nothing started, when full or outside a running loop."""
        if self._limit is not None and len(self._tasks) >= self._limit:
            return False
        try:
            task = asyncio.get_running_loop().create_task(work())
        except RuntimeError:
            return False
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return True

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        retrieve(task)

    async def wait(self, within: float) -> None:
        """Wait at most ``within`` seconds for the work in flight."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=within)

    async def cancel(self) -> None:
        """Cancel the work in flight and wait for it to end."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
