"""BackgroundTasks: bounded fire-and-forget work, held until it ends, failures retrieved."""

from __future__ import annotations

import asyncio
import gc

import pytest

from extauth.aio import BackgroundTasks, cancel_and_wait


async def test_spawn_refuses_past_the_limit_and_frees_a_slot_when_work_ends() -> None:
    tasks = BackgroundTasks(limit=2)
    gate = asyncio.Event()
    started: list[int] = []

    async def work(i: int) -> None:
        started.append(i)
        await gate.wait()

    assert tasks.spawn(lambda: work(1)) and tasks.spawn(lambda: work(2))
    assert not tasks.spawn(lambda: work(3))  # never even created: no "never awaited" warning
    assert len(tasks) == 2
    gate.set()
    await tasks.wait(5)
    assert not tasks and started == [1, 2]
    assert tasks.spawn(lambda: work(4))
    await tasks.wait(5)


async def test_a_failure_is_retrieved_and_cancel_ends_the_rest(
        caplog: pytest.LogCaptureFixture) -> None:
    tasks = BackgroundTasks()

    async def fail() -> None:
        raise RuntimeError("boom")

    async def forever() -> None:
        await asyncio.Event().wait()

    assert tasks.spawn(fail) and tasks.spawn(forever)
    await tasks.wait(0.5)
    assert len(tasks) == 1  # the failed one is gone; the other still runs
    await tasks.cancel()
    assert not tasks
    gc.collect()
    assert "never retrieved" not in caplog.text


def test_spawn_outside_a_running_loop_starts_nothing() -> None:
    called = []
    assert not BackgroundTasks().spawn(lambda: called.append(1))  # type: ignore[arg-type, return-value]
    assert called == []


async def test_cancel_and_wait_insists_on_a_task_that_swallows_a_cancellation() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed == 2:
                    raise

    task = asyncio.get_running_loop().create_task(stubborn())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled() and swallowed == 2
    await cancel_and_wait(None)
    await cancel_and_wait(task)  # already done: nothing to do
