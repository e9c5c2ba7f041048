"""Fixtures for the end-to-end suite: real stacks from tests/e2e/harness.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Stack, StackConfig


def _dump_on_failure(request: pytest.FixtureRequest, stack: Stack) -> None:
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"\n----- logs of the failed stack ({stack.dir}) -----\n{stack.logs()}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture(scope="session")
def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One stack (Redis store, TTL 3 s, flush 1 s, 10 connections per user) for all the
    non-destructive tests; tests use distinct users and paths so they never interact."""
    stack = Stack(tmp_path_factory.mktemp("stack"), StackConfig())
    try:
        yield stack.start()
    finally:
        stack.close()


@pytest.fixture
def make_stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Stack]]:
    """A factory for a test's own stack (to kill and restart its parts freely)."""
    stacks: list[Stack] = []

    def make(**kw: object) -> Stack:
        stack = Stack(tmp_path / f"stack{len(stacks)}", StackConfig(**kw))  # type: ignore[arg-type]
        stacks.append(stack)
        return stack.start()

    try:
        yield make
    finally:
        for s in stacks:
            _dump_on_failure(request, s)
            s.close()
