"""Small asyncio helpers shared across modules."""

from __future__ import annotations

import asyncio
from typing import Any


def retrieve(future: asyncio.Future[Any]) -> None:
    """A done callback that reads a future's exception, for a future whose end nobody else
    awaits (every waiter gave up, or its handler went away): its failure is expected, and
    asyncio would otherwise log "exception was never retrieved" when it is collected."""
    if not future.cancelled():
        future.exception()
