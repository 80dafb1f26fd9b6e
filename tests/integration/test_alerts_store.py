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


def test_a_project_reads_only_the_alerts_labelled_with_it(database_url: str) -> None:
    async def run() -> dict[str | None, set[str]]:
        store = await Store.connect(database_url)
        try:
            await store.migrate()
            # Given the centre's alert, two projects' subsidy alerts and a look-alike label
            for fingerprint, labels in (
                ("centre", {"alertname": "CentreAllocationHigh"}),
                ("llm-cap", {"alertname": "SubsidyCap80", "project": "hkgai-llm"}),
                ("med-cap", {"alertname": "SubsidyCap80", "project": "cuhk-med-ai"}),
                ("tricky", {"alertname": "X", "node": "hkgai-llm"}),
            ):
                await store.pool.execute(
                    "INSERT INTO alert_states (fingerprint, rule, labels, status, starts_at)"
                    " VALUES ($1, $2, $3, 'firing', now())",
                    fingerprint,
                    labels["alertname"],
                    labels,  # the store's codec writes JSON objects
                )
            found = {}
            for project in (None, "hkgai-llm", "cuhk-med-ai", "nobody"):
                rows = await store.list_alerts(statuses=["firing"], recent_s=3600, project=project)
                found[project] = {r["fingerprint"] for r in rows}
            return found
        finally:
            await store.close()

    # Then on-call (no project) reads all four; a project only its own
    assert asyncio.run(run()) == {
        None: {"centre", "llm-cap", "med-cap", "tricky"},
        "hkgai-llm": {"llm-cap"},
        "cuhk-med-ai": {"med-cap"},
        "nobody": set(),
    }
