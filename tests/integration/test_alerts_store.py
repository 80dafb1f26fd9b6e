"""The alerts store on a real PostgreSQL: a batch written twice queues its notifications once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from services.alerts.domain import Dirty, StateChange, Watermark
from services.alerts.store import Store

T0 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)


def change(notified_at: datetime, status: str = "firing", repeat: bool = False) -> StateChange:
    return StateChange(
        fingerprint="0123456789abcdef",
        rule="CentreAllocationHigh",
        status=status,  # type: ignore[arg-type]
        labels={"alertname": "CentreAllocationHigh"},
        annotations={"summary": "high"},
        starts_at=T0,
        ends_at=None if status == "firing" else notified_at,
        value=Decimal("0.93"),
        repeat=repeat,
        notified_at=notified_at,
    )


def test_a_batch_written_again_queues_no_notification_twice_but_repeats_are_kept(
    database_url: str,
) -> None:
    async def run() -> list[tuple[str, str]]:
        store = await Store.connect(database_url)
        try:
            await store.migrate()
            first = [("webhook", change(T0)), ("kafka", change(T0))]
            # Given a batch whose commit went unacknowledged, written again
            await store.apply(Dirty(), Watermark(), first)
            await store.apply(Dirty(), Watermark(), first)
            # and then a repeat and a resolution, the resolution also written twice
            later = T0 + timedelta(hours=4)
            await store.apply(Dirty(), Watermark(), [("webhook", change(later, repeat=True))])
            resolved = [("webhook", change(later + timedelta(minutes=5), "resolved"))]
            await store.apply(Dirty(), Watermark(), resolved)
            await store.apply(Dirty(), Watermark(), resolved)
            rows = await store.pool.fetch("SELECT receiver, status FROM alert_outbox ORDER BY seq")
            return [(r["receiver"], r["status"]) for r in rows]
        finally:
            await store.close()

    # Then each notification is queued once per receiver, the repeat included
    assert asyncio.run(run()) == [
        ("webhook", "firing"),
        ("kafka", "firing"),
        ("webhook", "firing"),
        ("webhook", "resolved"),
    ]
