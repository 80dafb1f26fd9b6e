"""One way to wait out a dependency that is not there yet or went away for a moment (a broker or
a database starting or restarting): call again with a growing pause, say so in the log, and give
up only where the caller sets a number of attempts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


async def retry(
    call: Callable[[], Awaitable[T]],
    what: str,
    retry_on: tuple[type[BaseException], ...],
    *,
    attempts: int | None = None,
    initial_s: float = 0.1,
    max_s: float = 5.0,
    factor: float = 2.0,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """Await `call()` until it succeeds. An error in `retry_on` is logged and waited out (the
    pause starts at `initial_s` and grows by `factor` up to `max_s`); after `attempts` calls
    (None: no limit) the last such error propagates, as does any other error at once. `call`
    must be safe to run again."""
    pause = initial_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except retry_on as exc:
            if attempts is not None and attempt >= attempts:
                raise
            if on_retry is not None:
                on_retry(exc)
            log.warning("%s: %r; retrying in %.1f s", what, exc, pause)
            await asyncio.sleep(pause)
            pause = min(pause * factor, max_s)
