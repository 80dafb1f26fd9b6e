"""A seek runs on Faust's consumer thread, where aiokafka's fetcher lives: Faust's own `_seek`
runs it on the caller's thread, which raced the fetcher (KeyError in `fetched_records`, the worker
exited) in the three-node Kafka drill."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from faust.transport.consumer import ThreadDelegateConsumer

from services.metering import transport


class ConsumerThread:
    """Stands in for Faust's consumer thread: `call_thread` runs a call on a thread of its own and
    awaits the result, as mode's `QueueServiceThread.call_thread` does."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="consumer-thread")
        self.seeks: list[tuple[Any, int, int]] = []  # (partition, offset, thread ident)

    async def call_thread(self, fun: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, lambda: asyncio.run(fun(*args))
        )

    def seek(self, partition: Any, offset: int) -> None:
        self.seeks.append((partition, offset, threading.get_ident()))


class Delegate:
    def __init__(self, thread: ConsumerThread) -> None:
        self._thread = thread


def seek_with(seek: Any) -> tuple[ConsumerThread, int]:
    thread = ConsumerThread()
    try:
        asyncio.run(seek(Delegate(thread), "gpu.usage.v1-2", 120))
    finally:
        thread.executor.shutdown()
    return thread, threading.get_ident()


def test_faust_seeks_on_the_callers_thread_and_the_fix_on_the_consumer_thread() -> None:
    # Upstream: the aiokafka seek runs on the thread that called Consumer.seek (the app's)
    thread, caller = seek_with(ThreadDelegateConsumer._seek)
    assert [(p, o) for p, o, _ in thread.seeks] == [("gpu.usage.v1-2", 120)]
    assert thread.seeks[0][2] == caller

    # Metering's transport: the same seek, on the consumer thread
    thread, caller = seek_with(transport.Consumer._seek)
    assert [(p, o) for p, o, _ in thread.seeks] == [("gpu.usage.v1-2", 120)]
    assert thread.seeks[0][2] != caller
