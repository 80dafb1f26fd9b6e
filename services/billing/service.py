"""Billing's rules in transactions: ledger batches, draft invoices, finalization, publication.

Each function here runs one transaction on a connection it is given, under the billing write lock,
so the consumer, the API and the CLI can work on the same database at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TypeVar

from schemas.metering import HourlyTotal
from services.billing import domain, metrics, store
from services.billing.domain import ComputedInvoice, Pricing, UsageHour
from services.billing.store import Connection

log = logging.getLogger(__name__)

T = TypeVar("T")

FLAG_FINALIZED_WITH_UNPRICED = "finalized_with_unpriced_usage"


class PeriodAlreadyFinalized(Exception):
    def __init__(self, period: str) -> None:
        super().__init__(f"period {period} is already finalized")
        self.period = period


class UnpricedUsage(Exception):
    """Finalization refused: some invoices of the period have usage without a rate."""

    def __init__(self, period: str, unpriced: dict[str, list[str]]) -> None:
        described = "; ".join(f"{iid}: {', '.join(models)}" for iid, models in unpriced.items())
        super().__init__(
            f"period {period} has usage of GPU models without a rate card ({described});"
            " add rate cards and retry, or finalize with force"
        )
        self.period = period
        self.unpriced = unpriced


@dataclass
class BatchResult:
    hours_changed: int = 0
    invoices_changed: list[str] = field(default_factory=list)


@dataclass
class FinalizeResult:
    period: str
    invoice_ids: list[str]
    forced: bool


async def recompute_project(
    conn: Connection,
    project_id: str,
    from_period: str | None,
    pricing: Pricing,
    finalized: frozenset[str],
) -> tuple[dict[str, list[UsageHour]], list[ComputedInvoice]]:
    """Rebuild the project's draft invoices of `from_period` and later (all when None).

    Later periods are rebuilt too because the subsidy cap carries from one period to the next.
    Returns the usage plan (invoice period -> hours it carries) and the invoices that changed.
    """
    plan = domain.assign_usage(await store.unbilled_usage(conn, project_id), finalized)
    stored = await store.invoice_subsidies(conn, project_id)
    periods = sorted(set(plan) | set(stored))
    subsidy_used = Decimal("0.00")
    changed = []
    for period in periods:
        status, stored_subsidy = stored.get(period, ("draft", Decimal("0.00")))
        if status == "finalized" or (from_period is not None and period < from_period):
            subsidy_used += stored_subsidy
            continue
        invoice = domain.build_invoice(
            project_id, period, plan.get(period, []), pricing, subsidy_used
        )
        subsidy_used += invoice.subsidy_hkd
        if await store.save_draft_invoice(conn, invoice):
            changed.append(invoice)
    return plan, changed


async def apply_hourly_batch(conn: Connection, totals: Sequence[HourlyTotal]) -> BatchResult:
    """Upsert hourly totals into the ledger and bring the affected drafts up to date, atomically."""
    result = BatchResult()
    async with conn.transaction():
        await store.lock_writes(conn)
        changed_hours = await store.upsert_hourly(conn, totals)
        result.hours_changed = len(changed_hours)
        if not changed_hours:
            return result
        finalized = await store.finalized_periods(conn)
        earliest: dict[str, str] = {}
        for project_id, _gpu_model, hour_start in changed_hours:
            period = domain.invoice_period_for(domain.period_of(hour_start), finalized)
            earliest[project_id] = min(period, earliest.get(project_id, period))
        pricing = await store.load_pricing(conn)
        for project_id, from_period in sorted(earliest.items()):
            _plan, changed = await recompute_project(
                conn, project_id, from_period, pricing, finalized
            )
            result.invoices_changed.extend(invoice.invoice_id for invoice in changed)
    return result


async def recompute_all_drafts(conn: Connection) -> list[str]:
    """Rebuild every draft (after a catalog change); the caller holds the transaction and lock."""
    finalized = await store.finalized_periods(conn)
    pricing = await store.load_pricing(conn)
    changed_ids: list[str] = []
    for project_id in await store.billable_project_ids(conn):
        _plan, changed = await recompute_project(conn, project_id, None, pricing, finalized)
        changed_ids.extend(invoice.invoice_id for invoice in changed)
    return changed_ids


async def finalize_period(conn: Connection, period: str, force: bool = False) -> FinalizeResult:
    """Freeze every invoice of `period`; refuse while any has unpriced usage unless forced."""
    period = domain.parse_period(period)
    async with conn.transaction():
        await store.lock_writes(conn)
        finalized = await store.finalized_periods(conn)
        if period in finalized:
            raise PeriodAlreadyFinalized(period)
        pricing = await store.load_pricing(conn)
        plans: dict[str, dict[str, list[UsageHour]]] = {}
        for project_id in await store.billable_project_ids(conn):
            plans[project_id], _changed = await recompute_project(
                conn, project_id, period, pricing, finalized
            )
        drafts = await store.load_invoices(conn, period=period, status="draft")
        unpriced = {
            invoice.invoice_id: sorted(
                {ln.gpu_model for ln in invoice.lines if ln.rate_hkd is None}
            )
            for invoice in drafts
            if invoice.has_unpriced_usage
        }
        if unpriced and not force:
            raise UnpricedUsage(period, unpriced)
        for invoice in drafts:
            extra_flags = [FLAG_FINALIZED_WITH_UNPRICED] if invoice.invoice_id in unpriced else []
            billed = plans.get(invoice.project_id, {}).get(period, [])
            await store.finalize_invoice(conn, invoice, billed, extra_flags)
        await store.insert_finalized_period(conn, period, forced=bool(unpriced))
    log.info("finalized period %s: %d invoices", period, len(drafts))
    return FinalizeResult(period, [invoice.invoice_id for invoice in drafts], bool(unpriced))


Send = Callable[[str, bytes], Awaitable[None]]


async def publish_pending(conn: Connection, send: Send) -> int:
    """Publish finalized invoices not yet published (an outbox), then mark them; returns the count.

    A crash between send and mark publishes the invoice again: consumers key on invoice_id.
    """
    published = 0
    for invoice in await store.load_invoices(conn, unpublished_only=True):
        await send(invoice.invoice_id, invoice.document().model_dump_json().encode())
        await store.mark_published(conn, invoice.invoice_id)
        metrics.INVOICES_PUBLISHED.inc()
        published += 1
    return published


async def with_db_retry(
    store_: store.Store,
    operation: Callable[[Connection], Awaitable[T]],
    what: str,
    max_backoff_s: float = 5.0,
) -> T:
    """Run `operation` on a pooled connection until it succeeds; connection failures are retried
    with backoff (a restarting PostgreSQL), anything else propagates."""
    backoff_s = 0.1
    while True:
        try:
            async with store_.acquire() as conn:
                return await operation(conn)
        except store.RETRYABLE_DB_ERRORS as exc:
            metrics.DB_RETRIES.labels(operation=what).inc()
            log.warning("%s: database unavailable (%r); retrying in %.1f s", what, exc, backoff_s)
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, max_backoff_s)
