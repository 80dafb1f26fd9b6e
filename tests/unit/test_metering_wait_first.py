"""Faust's drain loop hands every message over through `wait_first`; metering runs a callback that
completes without suspending in place. These check that the shortcut keeps wait_first's meaning:
the first coroutine's result, its exceptions, and abandonment when the flow is suspended."""

from __future__ import annotations

import asyncio
import gc
import warnings

import pytest
from mode import Service
from mode.utils.locks import Event

from services.metering.transport import wait_first_in_place


class Worker(Service):
    pass


def run(coro_factory):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        return await coro_factory(Worker(), Event())

    return asyncio.run(main())


def test_a_callback_that_never_suspends_is_the_winner_and_the_other_is_closed() -> None:
    async def callback() -> str:
        return "delivered"

    async def scenario(worker: Worker, suspend: Event):  # type: ignore[no-untyped-def]
        waiter = suspend.wait()
        result = await wait_first_in_place(worker, callback(), waiter)
        return result, waiter.cr_frame

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "never awaited" coroutine would warn here
        (result, frame) = run(scenario)
        gc.collect()
    assert result.results == ["delivered"]
    assert not result.stopped
    assert frame is None  # closed, not left to be garbage-collected unawaited


def test_a_callback_that_suspends_finishes_through_the_original() -> None:
    async def scenario(worker: Worker, suspend: Event):  # type: ignore[no-untyped-def]
        gate = asyncio.get_running_loop().create_future()

        async def callback() -> int:
            value = await gate
            await asyncio.sleep(0)
            return value + 1

        asyncio.get_running_loop().call_later(0.01, gate.set_result, 41)
        return await wait_first_in_place(worker, callback(), suspend.wait())

    result = run(scenario)
    assert result.results[0] == 42
    assert not result.stopped


def test_a_blocked_callback_is_abandoned_when_the_flow_is_suspended() -> None:
    cancelled = []

    async def scenario(worker: Worker, suspend: Event):  # type: ignore[no-untyped-def]
        async def callback() -> None:
            try:
                await asyncio.get_running_loop().create_future()  # a full buffer, forever
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        asyncio.get_running_loop().call_later(0.01, suspend.set)
        result = await wait_first_in_place(worker, callback(), suspend.wait())
        await asyncio.sleep(0)
        return result

    result = run(scenario)
    assert result.results == [True]  # the suspend event won
    assert cancelled == [True]


def test_an_error_raised_before_suspending_propagates() -> None:
    async def callback() -> None:
        raise ValueError("bad message")

    async def scenario(worker: Worker, suspend: Event):  # type: ignore[no-untyped-def]
        return await wait_first_in_place(worker, callback(), suspend.wait())

    with pytest.raises(ValueError, match="bad message"):
        run(scenario)


def test_an_error_raised_after_suspending_propagates() -> None:
    async def scenario(worker: Worker, suspend: Event):  # type: ignore[no-untyped-def]
        async def callback() -> None:
            await asyncio.sleep(0.005)
            raise ValueError("late")

        return await wait_first_in_place(worker, callback(), suspend.wait())

    with pytest.raises(ValueError, match="late"):
        run(scenario)
