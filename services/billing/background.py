"""The start/stop life cycle shared by billing's background loops (consumer, drainer, publisher)."""

from __future__ import annotations

import asyncio
from typing import Self


class BackgroundLoop:
    """Subclasses implement `run()` and watch `_stopping`; `wake()` cuts a wait short."""

    task_name = "billing-loop"

    def __init__(self) -> None:
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        raise NotImplementedError

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> Self:
        self._task = asyncio.create_task(self.run(), name=self.task_name)
        return self

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            # Stuck (say, retrying the database): what it was doing is durable or uncommitted.
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
