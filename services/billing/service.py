"""Billing's rules in transactions: ledger batches, draft invoices, finalization, publication.

Each function here runs one transaction on a connection it is given, under the billing write lock,
so the consumer, the API and the CLI can work on the same database at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

from schemas.billing import SlurmHold, SubsidyUsage
from schemas.billing import UnpricedUsage as UnpricedUsageSignal
from schemas.invoice import CreditNote, CreditNoteLine
from schemas.metering import HourCompleteness, HourlyTotal
from services.billing import domain, metrics, store
from services.billing.domain import ComputedInvoice, Pricing, UsageHour
from services.billing.store import Connection
from services.common.db import retry_db

log = logging.getLogger(__name__)

T = TypeVar("T")

FLAG_FINALIZED_WITH_UNPRICED = "finalized_with_unpriced_usage"

# Projects whose drafts the engine computes between yields to the event loop: the consumer and
# the API share the loop with the draft drainer, and must not wait for a whole bulk rebuild.
ENGINE_SLICE = 25
DRAIN_CHUNK = 200  # projects per query while draining: decoding a chunk also holds the loop


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


class IncompleteHours(Exception):
    """Finalization refused: metering reports hours of the period with usage as incomplete."""

    def __init__(self, period: str, hours: list[domain.HourStatus]) -> None:
        shown = ", ".join(hour.hour_start.isoformat() for hour in hours[:5])
        more = f" and {len(hours) - 5} more" if len(hours) > 5 else ""
        super().__init__(
            f"period {period} has {len(hours)} hours with usage that metering reports incomplete"
            f" ({shown}{more}); wait for the missing nodes, or finalize with force"
        )
        self.period = period
        self.hours = hours


@dataclass
class BatchResult:
    hours_changed: int = 0
    invoices_changed: list[str] = field(default_factory=list)


@dataclass
class FinalizeResult:
    period: str
    invoice_ids: list[str]
    forced: bool
    invoice_numbers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Numbering:
    """How finalized documents are numbered and dated (BillingSettings): PREFIX-YYYY-NNNNNN for
    invoices and PREFIX-CN-YYYY-NNNNNN for credit notes, gapless per calendar year of the issue
    date (Asia/Hong_Kong); due = issue + payment terms."""

    prefix: str = "AISC"
    payment_terms_days: int = 30

    def invoice_number(self, year: int, number: int) -> str:
        return f"{self.prefix}-{year:04d}-{number:06d}"

    def credit_note_number(self, year: int, number: int) -> str:
        return f"{self.prefix}-CN-{year:04d}-{number:06d}"


# Who did something, when nobody is known (a test or a script calling the service directly).
SYSTEM_ACTOR = "system"


def today_in_hong_kong() -> dt.date:
    return dt.datetime.now(dt.UTC).astimezone(domain.HONG_KONG).date()


def _rebuild_project(
    project_id: str,
    from_period: str | None,
    usage: list[UsageHour],
    stored: dict[str, tuple[str, Decimal]],
    pricing: Pricing,
    finalized: frozenset[str],
) -> tuple[dict[str, list[UsageHour]], list[ComputedInvoice]]:
    """The usage plan of one project and its drafts of `from_period` and later (pure)."""
    plan = domain.assign_usage(usage, finalized)
    periods = sorted(set(plan) | set(stored))
    subsidy_used = Decimal("0.00")
    drafts = []
    for period in periods:
        status, stored_subsidy = stored.get(period, ("draft", Decimal("0.00")))
        if status == "finalized" or (from_period is not None and period < from_period):
            subsidy_used += stored_subsidy
            continue
        invoice = domain.build_invoice(
            project_id, period, plan.get(period, []), pricing, subsidy_used
        )
        subsidy_used += invoice.subsidy_hkd
        drafts.append(invoice)
    return plan, drafts


async def recompute_projects(
    conn: Connection,
    from_periods: dict[str, str | None],
    pricing: Pricing,
    finalized: frozenset[str],
    per_hour: bool = False,
    chunk_size: int = 5000,
) -> tuple[dict[str, dict[str, list[UsageHour]]], list[ComputedInvoice]]:
    """Rebuild the draft invoices of many projects, each of its period and later (all when None).

    Set-based: per chunk of projects, one query reads their unbilled usage (per HK day unless
    `per_hour`), one reads their stored invoices, the engine builds the drafts and the changed ones
    are written in bulk. Later periods are rebuilt too because the subsidy cap carries from one
    period to the next. Returns the usage plans (project -> invoice period -> hours it carries) and
    the invoices that changed.
    """
    plans: dict[str, dict[str, list[UsageHour]]] = {}
    changed: list[ComputedInvoice] = []
    project_ids = sorted(from_periods)
    for offset in range(0, len(project_ids), chunk_size):
        chunk = project_ids[offset : offset + chunk_size]
        usage = await store.unbilled_usage_many(conn, chunk, per_day=not per_hour)
        stored = await store.invoice_subsidies_many(conn, chunk)
        drafts: list[ComputedInvoice] = []
        for index, project_id in enumerate(chunk, start=1):
            if index % ENGINE_SLICE == 0:
                await asyncio.sleep(0)  # let the consumer on this event loop go on meanwhile
            plans[project_id], built = _rebuild_project(
                project_id,
                from_periods[project_id],
                usage[project_id],
                stored[project_id],
                pricing,
                finalized,
            )
            drafts.extend(built)
        changed.extend(await store.save_draft_invoices(conn, drafts))
    return plans, changed


async def ingest_hourly_batch(conn: Connection, totals: Sequence[HourlyTotal]) -> int:
    """Upsert hourly totals into the ledger and its daily sums and mark the projects whose drafts
    they change as dirty (with the earliest usage period changed), atomically; returns the hours
    changed.

    The drafts are rebuilt later by drain_dirty_projects(). No write lock is taken: the upsert
    is guarded by revision, the daily sums take each hour's delta from the row it replaced, the
    mark keeps the earliest period, and the drainer deletes a mark only at the version it read.
    It is a single statement, so it needs no transaction of its own.
    """
    return await store.ingest_hourly(conn, totals)


async def drain_dirty_projects(conn: Connection, limit: int | None = None) -> list[str]:
    """Rebuild the drafts of the projects marked dirty (up to `limit` of them) and clear their
    marks, in one transaction under the write lock; returns the invoices that changed."""
    async with conn.transaction():
        await store.lock_writes(conn)
        return await _drain(conn, limit)


async def _drain(conn: Connection, limit: int | None = None) -> list[str]:
    """drain_dirty_projects() in the caller's transaction, which holds the write lock."""
    marks = await store.dirty_projects(conn, limit)
    if not marks:
        return []
    finalized = await store.finalized_periods(conn)
    pricing = await store.load_pricing(conn)
    from_periods: dict[str, str | None] = {
        project_id: domain.invoice_period_for(period, finalized)
        for project_id, period, _version in marks
    }
    _plans, changed = await recompute_projects(
        conn, from_periods, pricing, finalized, chunk_size=DRAIN_CHUNK
    )
    await store.clear_dirty(conn, marks)
    if changed:
        await refresh_signals(conn)
    return [invoice.invoice_id for invoice in changed]


async def apply_hourly_batch(conn: Connection, totals: Sequence[HourlyTotal]) -> BatchResult:
    """Upsert hourly totals and bring the affected drafts up to date at once, in one transaction
    (ingest_hourly_batch() followed by drain_dirty_projects()); for callers that need the drafts
    current when it returns."""
    result = BatchResult()
    async with conn.transaction():
        await store.lock_writes(conn)
        result.hours_changed = await store.ingest_hourly(conn, totals)
        result.invoices_changed = await _drain(conn)
    return result


async def recompute_all_drafts(conn: Connection) -> list[str]:
    """Rebuild every draft (after a catalog change); the caller holds the transaction and lock.

    Covers the projects marked dirty, whose marks are cleared.
    """
    marks = await store.dirty_projects(conn)
    finalized = await store.finalized_periods(conn)
    pricing = await store.load_pricing(conn)
    project_ids = await store.billable_project_ids(conn)
    _plans, changed = await recompute_projects(conn, dict.fromkeys(project_ids), pricing, finalized)
    await store.clear_dirty(conn, marks)
    await refresh_signals(conn)
    return [invoice.invoice_id for invoice in changed]


async def finalize_period(
    conn: Connection,
    period: str,
    force: bool = False,
    *,
    actor: str = SYSTEM_ACTOR,
    numbering: Numbering = Numbering(),
    issued_on: dt.date | None = None,
) -> FinalizeResult:
    """Freeze every invoice of `period`, each with the next invoice number of the issue date's
    year; refuse while any has unpriced usage unless forced. Recorded in the audit trail."""
    period = domain.parse_period(period)
    issued_on = issued_on or today_in_hong_kong()
    due_on = issued_on + dt.timedelta(days=numbering.payment_terms_days)
    async with conn.transaction():
        await store.lock_writes(conn)
        finalized = await store.finalized_periods(conn)
        if period in finalized:
            raise PeriodAlreadyFinalized(period)
        await _drain(conn)  # no decision on drafts that lag behind the ledger
        pricing = await store.load_pricing(conn)
        plans, _changed = await recompute_projects(
            conn,
            dict.fromkeys(await store.billable_project_ids(conn), period),
            pricing,
            finalized,
            per_hour=True,
            chunk_size=200,
        )
        completeness = await store.period_completeness(conn, period)
        if completeness.incomplete and not force:
            raise IncompleteHours(period, completeness.incomplete)
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
        numbers = []
        drafts.sort(key=lambda found: found.project_id)  # numbered in project order
        for invoice in drafts:
            extra_flags = [FLAG_FINALIZED_WITH_UNPRICED] if invoice.invoice_id in unpriced else []
            billed = plans.get(invoice.project_id, {}).get(period, [])
            project = pricing.projects.get(invoice.project_id)
            line_nos = {domain.key_of_line(line): n for n, line in enumerate(invoice.lines, 1)}
            charged = [
                (hour, line_nos[domain.line_key(hour, period, pricing, project)]) for hour in billed
            ]
            sequence = await store.next_document_number(conn, "invoice", issued_on.year)
            number = numbering.invoice_number(issued_on.year, sequence)
            numbers.append(number)
            await store.finalize_invoice(
                conn, invoice, charged, extra_flags, (number, issued_on, due_on)
            )
        forced = bool(unpriced or completeness.incomplete)
        await store.insert_finalized_period(conn, period, forced=forced)
        await store.record_audit(
            conn,
            actor,
            "period.finalize_forced" if forced else "period.finalize",
            period,
            {
                "invoices": len(drafts),
                "invoice_numbers": [numbers[0], numbers[-1]] if numbers else [],
                "force_requested": force,
                "unpriced_invoices": sorted(unpriced),
                "incomplete_hours": len(completeness.incomplete),
            },
        )
        await refresh_signals(conn)
    log.info("finalized period %s: %d invoices", period, len(drafts))
    return FinalizeResult(
        period, [invoice.invoice_id for invoice in drafts], bool(unpriced), numbers
    )


def signal_key_subsidy(project_id: str) -> str:
    return f"subsidy|{project_id}"


def signal_key_unpriced(gpu_model: str, period: str) -> str:
    return f"unpriced|{gpu_model}|{period}"


def _payload(model: SubsidyUsage | UnpricedUsageSignal | SlurmHold) -> str:
    # as_of is left out so that only a change of the facts makes a new version.
    return json.dumps(model.model_dump(mode="json", exclude={"as_of"}), sort_keys=True)


async def refresh_signals(conn: Connection) -> int:
    """Bring the billing.signals.v1 outbox up to date with the invoices; returns the keys changed.

    The caller holds the transaction. A key that no longer applies (a model priced since, a period
    finalized, a subsidy withdrawn) gets a zero value so that its alert resolves.
    """
    now = dt.datetime.now(dt.UTC)
    wanted: dict[str, tuple[str, str]] = {}
    usage_rows = await store.subsidy_usage_rows(conn)
    forecasts = await subsidy_forecasts(conn, now, usage_rows)
    for row in usage_rows:
        cap, used = row["subsidy_cap_hkd"], row["used_hkd"]
        forecast = forecasts.get(row["project_id"])
        wanted[signal_key_subsidy(row["project_id"])] = (
            "subsidy_usage",
            _payload(
                SubsidyUsage(
                    project_id=row["project_id"],
                    scheme=row["subsidy_scheme"],
                    cap_hkd=cap,
                    used_hkd=used,
                    used_ratio=domain.subsidy_used_ratio(used, cap),
                    as_of=now,
                    burn_hkd_per_day=forecast.burn_hkd_per_day if forecast else None,
                    exhausted_on=forecast.exhausted_on if forecast else None,
                    approval_ends_on=forecast.approval_ends_on if forecast else None,
                    days_left=forecast.days_left if forecast else None,
                )
            ),
        )
    for row in await store.unpriced_usage_rows(conn):
        wanted[signal_key_unpriced(row["gpu_model"], row["period"])] = (
            "unpriced_usage",
            _payload(
                UnpricedUsageSignal(
                    gpu_model=row["gpu_model"],
                    period=row["period"],
                    gpu_hours=Decimal(domain.gpu_hours_text(row["gpu_seconds"])),
                    projects=list(row["projects"]),
                    as_of=now,
                )
            ),
        )
    for row in (await store.enforcement_states(conn)).values():
        wanted[f"slurm_hold|{row['project_id']}"] = (
            "slurm_hold",
            _payload(
                SlurmHold(
                    project_id=row["project_id"],
                    held=row["held"],
                    dry_run=row["dry_run"],
                    reason=row["reason"],
                    as_of=row["since"],
                )
            ),
        )
    for key, (kind, payload) in (await store.signal_payloads(conn)).items():
        if key in wanted:
            continue
        gone = json.loads(payload)
        if kind == "slurm_hold":
            gone.update(held=False)
        elif kind == "subsidy_usage":
            gone.update(
                cap_hkd="0.00",
                used_hkd="0.00",
                used_ratio="0.000000",
                burn_hkd_per_day=None,
                exhausted_on=None,
                days_left=None,
            )
        else:
            gone.update(gpu_hours="0.000000", projects=[])
        wanted[key] = (kind, json.dumps(gone, sort_keys=True))
    changed = await store.upsert_signals(
        conn, [(key, kind, payload) for key, (kind, payload) in sorted(wanted.items())], now
    )
    return changed


async def subsidy_forecasts(
    conn: Connection, now: dt.datetime, usage_rows: Sequence[Any] | None = None
) -> dict[str, domain.SubsidyForecast]:
    """Per subsidised project: when its cap runs out at the burn of the last 7 whole days (Hong
    Kong), from the subsidy used so far (drafts included, credit notes deducted). `usage_rows`:
    store.subsidy_usage_rows() when the caller has read them already."""
    today = now.astimezone(domain.HONG_KONG).date()
    pricing = await store.load_pricing(conn)
    subsidised = {pid: p for pid, p in pricing.projects.items() if p.subsidy is not None}
    window = await store.usage_days(
        conn, sorted(subsidised), today - dt.timedelta(days=domain.BURN_WINDOW_DAYS), today
    )
    forecasts = {}
    if usage_rows is None:
        usage_rows = await store.subsidy_usage_rows(conn)
    for row in usage_rows:
        project = subsidised.get(row["project_id"])
        if project is None or project.subsidy is None:
            continue
        burn = domain.subsidised_burn(window.get(project.id, []), project, pricing)
        forecasts[project.id] = domain.subsidy_forecast(
            row["subsidy_cap_hkd"], row["used_hkd"], burn, today, project.subsidy.valid_to
        )
    return forecasts


Send = Callable[[str, bytes], Awaitable[None]]


async def publish_signals(conn: Connection, send: Send) -> int:
    """Send pending billing signals (latest value per key), then mark them; returns the count."""
    published = 0
    for row in await store.pending_signals(conn):
        document = json.loads(row["payload"])
        document["as_of"] = row["as_of"].astimezone(dt.UTC).isoformat()
        await send(row["key"], json.dumps(document).encode())
        await store.mark_signal_published(conn, row["key"], row["version"])
        published += 1
    return published


async def apply_completeness_batch(conn: Connection, records: Sequence[HourCompleteness]) -> int:
    """Store metering's completeness watermarks (highest revision per hour wins)."""
    async with conn.transaction():
        return await store.upsert_completeness(conn, records)


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

    async def on_a_connection() -> T:
        async with store_.acquire() as conn:
            return await operation(conn)

    return await retry_db(
        on_a_connection,
        what,
        max_backoff_s=max_backoff_s,
        on_retry=lambda _exc: metrics.DB_RETRIES.labels(operation=what).inc(),
    )


# --- credit notes --------------------------------------------------------------------------------


class InvoiceNotFound(LookupError):
    def __init__(self, invoice_id: str) -> None:
        super().__init__(f"invoice {invoice_id} not found")
        self.invoice_id = invoice_id


def credit_note_document(head: Any, lines: Sequence[Any]) -> CreditNote:
    return CreditNote(
        credit_note_id=head["credit_note_id"],
        credit_note_number=head["credit_note_number"],
        invoice_id=head["invoice_id"],
        invoice_number=head["invoice_number"],
        project_id=head["project_id"],
        period=head["period"],
        issued_on=head["issued_on"],
        reason=head["reason"],
        lines=[
            CreditNoteLine(
                line_no=line["line_no"],
                gpu_model=line["gpu_model"],
                gpu_hours=domain.gpu_hours_text(line["gpu_seconds"]),
                rate_hkd=None if line["rate_hkd"] is None else domain.money(line["rate_hkd"]),
                subsidised=line["subsidised"],
                amount_hkd=None if line["amount_hkd"] is None else domain.money(line["amount_hkd"]),
                adjustment_for_period=line["adjustment_for_period"],
            )
            for line in lines
        ],
        gross_hkd=domain.money(head["gross_hkd"]),
        subsidy_hkd=domain.money(head["subsidy_hkd"]),
        net_hkd=domain.money(head["net_hkd"]),
        created_by=head["created_by"],
    )


async def issue_credit_note(
    conn: Connection,
    invoice_id: str,
    reason: str,
    line_nos: Sequence[int] | None = None,
    *,
    actor: str = SYSTEM_ACTOR,
    numbering: Numbering = Numbering(),
    issued_on: dt.date | None = None,
) -> CreditNote:
    """Credit a finalized invoice in whole (`line_nos` None) or by lines (domain.plan_credit).

    The hours of the credited lines become unbilled again, so the project's drafts are rebuilt:
    those hours are charged, at the catalog's current rates, on the next open invoice as
    adjustment lines naming their period; the subsidy credited returns to the project's cap, so
    later invoices' subsidy and cap remaining follow. One transaction under the write lock, with
    its audit entry."""
    issued_on = issued_on or today_in_hong_kong()
    async with conn.transaction():
        await store.lock_writes(conn)
        invoice = await store.load_invoice(conn, invoice_id)
        if invoice is None:
            raise InvoiceNotFound(invoice_id)
        pricing = await store.load_pricing(conn)
        project = pricing.projects.get(invoice.project_id)
        by_line = await store.finalized_line_numbers(conn, invoice_id)
        if line_nos is not None and not by_line and invoice.lines:
            raise domain.CreditRefused(
                f"invoice {invoice_id} was finalized before lines were recorded per hour:"
                " it can be credited in whole only (leave lines out)"
            )
        plan = domain.plan_credit(
            invoice,
            line_nos,
            (await store.credited_lines(conn, invoice_id)).keys(),
            await store.credited_subsidy(conn, invoice_id),
            project.subsidy.rate if project and project.subsidy else None,
        )
        if by_line:
            released = [hour for n, _line in plan.lines for hour in by_line.get(n, [])]
        else:  # finalized before line numbers were kept: credited in whole
            released = await store.billed_hours(conn, invoice_id)
        existing = await store.credit_note_rows(conn, invoice_id=invoice_id)
        sequence = await store.next_document_number(conn, "credit_note", issued_on.year)
        credit_note_id = f"CN-{invoice_id}-{len(existing) + 1}"
        credit_note_number = numbering.credit_note_number(issued_on.year, sequence)
        head: dict[str, Any] = {
            "credit_note_id": credit_note_id,
            "credit_note_number": credit_note_number,
            "invoice_id": invoice_id,
            "project_id": invoice.project_id,
            "period": invoice.period,
            "issued_on": issued_on,
            "reason": reason,
            "gross_hkd": plan.gross_hkd,
            "subsidy_hkd": plan.subsidy_hkd,
            "net_hkd": plan.net_hkd,
            "created_by": actor,
        }
        lines = [
            {
                "line_no": n,
                "gpu_model": line.gpu_model,
                "gpu_seconds": line.gpu_seconds,
                "rate_hkd": line.rate_hkd,
                "subsidised": line.subsidised,
                "amount_hkd": line.amount_hkd,
                "adjustment_for_period": line.adjustment_for_period,
            }
            for n, line in plan.lines
        ]
        await store.insert_credit_note(conn, head, lines, released)
        await store.record_audit(
            conn,
            actor,
            "credit_note.issue",
            credit_note_id,
            {
                "credit_note_number": credit_note_number,
                "invoice_id": invoice_id,
                "invoice_number": invoice.invoice_number,
                "lines": [n for n, _line in plan.lines],
                "reason": reason,
                "gross_hkd": domain.money(plan.gross_hkd),
                "subsidy_hkd": domain.money(plan.subsidy_hkd),
                "net_hkd": domain.money(plan.net_hkd),
            },
        )
        finalized = await store.finalized_periods(conn)
        await recompute_projects(
            conn,
            {invoice.project_id: domain.invoice_period_for(invoice.period, finalized)},
            pricing,
            finalized,
        )
        await refresh_signals(conn)
        [(stored_head, stored_lines)] = await store.credit_note_rows(
            conn, credit_note_id=credit_note_id
        )
    log.info("credit note %s against %s: %s HKD", credit_note_number, invoice_id, plan.net_hkd)
    return credit_note_document(stored_head, stored_lines)


async def credit_notes(
    conn: Connection,
    *,
    invoice_id: str | None = None,
    period: str | None = None,
    project_id: str | None = None,
    credit_note_id: str | None = None,
) -> list[CreditNote]:
    rows = await store.credit_note_rows(
        conn,
        invoice_id=invoice_id,
        period=period,
        project_id=project_id,
        credit_note_id=credit_note_id,
    )
    return [credit_note_document(head, lines) for head, lines in rows]


# --- per-job usage -------------------------------------------------------------------------------


async def job_days(
    conn: Connection, project_ids: Sequence[str] | None, period: str
) -> tuple[dict[str, list[domain.JobDay]], Pricing]:
    """Per project (all when None): its jobs' usage per model and Hong Kong day in `period`, and
    the pricing to cost it with."""
    start, end = domain.period_bounds(period)
    rows = await store.job_days(conn, project_ids, start, end)
    pricing = await store.load_pricing(conn)
    days: dict[str, list[domain.JobDay]] = {}
    for row in rows:
        days.setdefault(row["project_id"], []).append(
            domain.JobDay(
                project_id=row["project_id"],
                job_id=row["job_id"],
                gpu_model=row["gpu_model"],
                day=row["hk_date"],
                gpu_seconds=row["gpu_seconds"],
                util_gpu_seconds=row["util_gpu_seconds"],
                idle_gpu_seconds=row["idle_gpu_seconds"],
                energy_wh=row["energy_wh"],
                nodes=row["nodes"],
                first_hour=row["first_hour"],
                last_hour=row["last_hour"],
            )
        )
    return days, pricing


async def invoice_jobs(conn: Connection, project_id: str, period: str) -> list[domain.JobUsage]:
    """The job annex of a project's invoice of `period`."""
    days, pricing = await job_days(conn, [project_id], period)
    return domain.jobs_of(days.get(project_id, []), pricing)
