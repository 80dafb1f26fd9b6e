"""A notification sent but not marked delivered (the database went away in between) is marked on
the next pass and never sent again: seen as a webhook that got one firing twice when PostgreSQL
shut down right after the send (tests/integration/test_alerts_service.py, PostgreSQL down)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg

from schemas.alert import AlertEvent
from services.alerts.metrics import AlertsMetrics
from services.alerts.notifier import Notifier
from services.alerts.store import OutboxRow


class FlakyStore:
    """One undelivered row; the first mark fails as a shutting-down PostgreSQL makes it fail."""

    def __init__(self, row: OutboxRow) -> None:
        self.row = row
        self.delivered = False
        self.marks = 0

    async def undelivered(self, receiver: str, limit: int = 50) -> list[OutboxRow]:
        return [] if self.delivered else [self.row]

    async def mark_delivered(self, seq: int) -> None:
        self.marks += 1
        if self.marks == 1:
            raise asyncpg.exceptions.CannotConnectNowError("the database system is shutting down")
        self.delivered = True

    async def outbox_depths(self) -> dict[str, int]:
        return {}


class CountingSender:
    def __init__(self) -> None:
        self.sent: list[int] = []

    async def send(self, row: OutboxRow) -> None:
        self.sent.append(row.seq)


def test_a_row_sent_but_not_marked_is_marked_later_and_not_sent_twice() -> None:
    event = AlertEvent.model_validate(
        {
            "fingerprint": "0123456789abcdef",
            "rule": "CentreAllocationHigh",
            "status": "firing",
            "labels": {"alertname": "CentreAllocationHigh"},
            "annotations": {},
            "starts_at": datetime(2026, 12, 6, tzinfo=UTC).isoformat(),
            "value": "0.92",
        }
    )
    store = FlakyStore(OutboxRow(7, "webhook", "0123456789abcdef", "firing", event, 0))
    sender = CountingSender()

    async def run() -> None:
        notifier = Notifier(
            store,  # type: ignore[arg-type]
            {"webhook": sender},
            AlertsMetrics(),
            backoff_initial_s=0.01,
            backoff_max_s=0.01,
            poll_interval_s=0.01,
        )
        task = asyncio.create_task(notifier.run())
        for _ in range(200):
            if store.delivered:
                break
            await asyncio.sleep(0.01)
        notifier.stop()
        await task

    asyncio.run(run())
    assert store.delivered and store.marks == 2
    assert sender.sent == [7]  # once, though it was marked only at the second try
