"""The event-loop choice (extauth/eventloop.py): ``auto`` is uvloop when installed, an explicit
``uvloop`` that is missing is refused (in the config, before anything starts), ``asyncio`` is
asyncio's own loop. The server itself on each loop: tests/test_serve_process.py, and the
``both_loops`` modules."""

from __future__ import annotations

import asyncio
import sys
import warnings

import pytest
import uvloop

from extauth import eventloop
from extauth.config import ConfigError, parse_config

POLICY = {"name": "chat", "origins": ["https://app.example.com"]}


@pytest.fixture
def no_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    # An installation without uvloop (a platform without its wheels): the import fails.
    monkeypatch.setitem(sys.modules, "uvloop", None)


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


def test_each_choice_makes_its_loop() -> None:
    for choice, kind in (("auto", uvloop.Loop), ("uvloop", uvloop.Loop)):
        loop = eventloop.loop_factory(choice)()
        try:
            assert isinstance(loop, kind)
            assert eventloop.loop_name(loop) == "uvloop"
        finally:
            loop.close()
    loop = eventloop.loop_factory("asyncio")()
    try:
        assert not isinstance(loop, uvloop.Loop)
        assert eventloop.loop_name(loop) == "asyncio"
    finally:
        loop.close()


def test_run_runs_on_the_chosen_loop() -> None:
    assert eventloop.loop_name(eventloop.run(_running_loop(), "auto")) == "uvloop"
    assert eventloop.loop_name(eventloop.run(_running_loop(), "asyncio")) == "asyncio"


@pytest.mark.usefixtures("no_uvloop")
def test_auto_falls_back_to_asyncio_without_uvloop() -> None:
    assert eventloop.loop_name(eventloop.run(_running_loop(), "auto")) == "asyncio"
    assert parse_config({"event_loop": "auto", "policies": [POLICY]}).event_loop == "auto"


@pytest.mark.usefixtures("no_uvloop")
def test_an_explicit_uvloop_that_is_missing_is_refused() -> None:
    with pytest.raises(ConfigError, match="event_loop") as e:
        parse_config({"event_loop": "uvloop", "policies": [POLICY]})
    assert "uvloop is not installed" in str(e.value)
    main = _running_loop()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine ... was never awaited" would be one
        with pytest.raises(eventloop.UnavailableLoop):
            eventloop.run(main, "uvloop")
    assert main.cr_frame is None  # closed, not left pending


def test_an_unknown_loop_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="event_loop"):
        parse_config({"event_loop": "trio", "policies": [POLICY]})
