"""The one retry loop (services/common/retry.py): pauses grow to their cap, a limit on attempts
gives the last error back, and an error it was not told to wait out propagates at once."""

from __future__ import annotations

import asyncio

import pytest

from services.common import retry as retry_module
from services.common.retry import retry


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    taken: list[float] = []

    async def sleep(seconds: float) -> None:
        taken.append(seconds)

    monkeypatch.setattr(retry_module.asyncio, "sleep", sleep)
    return taken


def failing(times: int, error: BaseException):  # type: ignore[no-untyped-def]
    calls = {"n": 0}

    async def call() -> str:
        calls["n"] += 1
        if calls["n"] <= times:
            raise error
        return "done"

    return call, calls


def test_pauses_double_up_to_their_cap_until_the_call_succeeds(pauses: list[float]) -> None:
    call, calls = failing(5, ConnectionError("down"))
    seen: list[BaseException] = []
    result = asyncio.run(
        retry(call, "db", (ConnectionError,), initial_s=0.5, max_s=3.0, on_retry=seen.append)
    )
    assert result == "done" and calls["n"] == 6
    assert pauses == [0.5, 1.0, 2.0, 3.0, 3.0] and len(seen) == 5


def test_a_limit_on_attempts_gives_the_last_error_back(pauses: list[float]) -> None:
    call, calls = failing(10, OSError("no broker"))
    with pytest.raises(OSError, match="no broker"):
        asyncio.run(retry(call, "broker", (OSError,), attempts=3, initial_s=1.0, factor=1.0))
    assert calls["n"] == 3 and pauses == [1.0, 1.0]


def test_an_error_not_waited_out_propagates_at_once(pauses: list[float]) -> None:
    call, calls = failing(1, ValueError("bad input"))
    with pytest.raises(ValueError, match="bad input"):
        asyncio.run(retry(call, "x", (OSError,)))
    assert calls["n"] == 1 and pauses == []
