"""The billing dashboard and PDF invoices: one page (static HTML, JS and CSS shipped in this
package, no CDN) over the JSON API, a few read endpoints for what the API does not show (centre
allocation per hour, subsidy cap burn-down, periods, alerts from the alerts service) and
`GET /v1/invoices/{invoice_id}.pdf`.

The page itself is public and holds no data; every data endpoint needs a bearer token.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from services.billing import domain, service, store
from services.billing.api import (
    ERRORS,
    ApiError,
    Caller,
    InvoiceIdPath,
    PeriodQuery,
    invoice_id_project,
    period_param,
)
from services.billing.domain import period_bounds
from services.billing.export import safe_file_name
from services.billing.pdf import Issuer, JobLine, credit_note_pdf, invoice_pdf
from services.billing.settings import BillingSettings
from services.billing.web import queries
from services.common.oidc import AuthError

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
CREDIT_NOTE_ID = re.compile(r"CN-(INV-.+)-([1-9][0-9]{0,5})", re.DOTALL)
# The only files the page needs; served by name so no path reaches the file system unchecked.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
HKT = ZoneInfo("Asia/Hong_Kong")
ALERTS_TIMEOUT_S = 3.0
TWO_PLACES = Decimal("0.01")
ONE_PLACE = Decimal("0.1")


class DashboardPeriod(BaseModel):
    period: str
    finalized: bool


class DashboardInfo(BaseModel):
    current_period: str = Field(description="this month in Asia/Hong_Kong")
    periods: list[DashboardPeriod] = Field(description="periods with invoices, newest first")
    alerts_configured: bool
    provider_name: str


class CentreHourView(BaseModel):
    hour_start: dt.datetime
    allocated_gpus: str = Field(description="allocated GPU-hours of the hour: GPUs on average")
    util_pct: str | None = Field(description="mean utilization of the allocated GPUs")
    projects: int
    nodes_online: int | None = Field(description="from metering's completeness record, if any")
    complete: bool | None


class CentreUsage(BaseModel):
    period: str
    hours: list[CentreHourView]
    allocated_gpu_hours: str
    peak_allocated_gpus: str
    mean_util_pct: str | None


class CapPointView(BaseModel):
    period: str
    status: str
    subsidy_hkd: str
    cap_remaining_hkd: str | None


class CapBurnDown(BaseModel):
    project_id: str
    name: str
    scheme: str
    subsidy_rate: str
    cap_hkd: str
    valid_from: dt.date
    valid_to: dt.date
    used_hkd: str = Field(
        description="subsidy of all its invoices, drafts included, less credit notes"
    )
    cap_remaining_hkd: str
    burn_hkd_per_day: str | None = Field(
        None, description="subsidy drawn per day over the last 7 whole days (Hong Kong)"
    )
    cap_exhausted_on: dt.date | None = Field(
        None,
        description="when the cap runs out at that burn; null when it does not before the"
        " approval ends (valid_to)",
    )
    points: list[CapPointView]


class CapBurnDownList(BaseModel):
    projects: list[CapBurnDown]


class DashboardAlerts(BaseModel):
    configured: bool
    reachable: bool
    error: str | None = None
    alerts: list[dict[str, Any]]


def current_period() -> str:
    return dt.datetime.now(HKT).strftime("%Y-%m")


def two_places(value: Decimal) -> str:
    return str(value.quantize(TWO_PLACES))


def centre_usage(period: str, hours: list[queries.CentreHour]) -> CentreUsage:
    views = []
    for hour in hours:
        views.append(
            CentreHourView(
                hour_start=hour.hour_start,
                allocated_gpus=two_places(hour.gpu_seconds / 3600),
                util_pct=str((hour.util_gpu_seconds * 100 / hour.gpu_seconds).quantize(ONE_PLACE))
                if hour.gpu_seconds
                else None,
                projects=hour.projects,
                nodes_online=hour.nodes_online,
                complete=hour.complete,
            )
        )
    gpu_seconds = sum((hour.gpu_seconds for hour in hours), Decimal(0))
    util_seconds = sum((hour.util_gpu_seconds for hour in hours), Decimal(0))
    return CentreUsage(
        period=period,
        hours=views,
        allocated_gpu_hours=two_places(gpu_seconds / 3600),
        peak_allocated_gpus=two_places(
            max((hour.gpu_seconds for hour in hours), default=Decimal(0)) / 3600
        ),
        mean_util_pct=str((util_seconds * 100 / gpu_seconds).quantize(ONE_PLACE))
        if gpu_seconds
        else None,
    )


def cap_burn_down(
    history: queries.CapHistory, forecast: domain.SubsidyForecast | None = None
) -> CapBurnDown:
    subsidy = history.project.subsidy
    assert subsidy is not None  # the query selects subsidised projects only
    used = sum((point.subsidy_hkd for point in history.points), Decimal(0))
    return CapBurnDown(
        project_id=history.project.id,
        name=history.project.name,
        scheme=subsidy.scheme,
        subsidy_rate=str(subsidy.rate),
        cap_hkd=two_places(subsidy.cap_hkd),
        valid_from=subsidy.valid_from,
        valid_to=subsidy.valid_to,
        used_hkd=two_places(used),
        cap_remaining_hkd=two_places(subsidy.cap_hkd - used),
        burn_hkd_per_day=None if forecast is None else str(forecast.burn_hkd_per_day),
        cap_exhausted_on=None if forecast is None else forecast.exhausted_on,
        points=[
            CapPointView(
                period=point.period,
                status=point.status,
                subsidy_hkd=two_places(point.subsidy_hkd),
                cap_remaining_hkd=None
                if point.cap_remaining_hkd is None
                else two_places(point.cap_remaining_hkd),
            )
            for point in history.points
        ],
    )


def create_router(settings: BillingSettings, store_: store.Store) -> APIRouter:
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/dashboard")

    @router.get("/dashboard", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(
            STATIC_DIR / "index.html",
            media_type="text/html; charset=utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    @router.get("/dashboard/assets/{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        media_type = ASSETS.get(name)
        if media_type is None:
            raise ApiError(404, "not_found", f"no asset {name!r}")
        return FileResponse(
            STATIC_DIR / name, media_type=media_type, headers={"Cache-Control": "no-cache"}
        )

    @router.get("/dashboard/api/sign-in", include_in_schema=False)
    async def sign_in(request: Request) -> JSONResponse:
        """How the dashboard signs a person in with the centre's identity provider (public: it
        holds no data, only the provider's endpoints and this deployment's client id)."""
        oidc = request.app.state.authenticator.oidc
        if oidc is None:
            return JSONResponse({"enabled": False})
        try:
            endpoints = await oidc.sign_in_endpoints()
        except AuthError as exc:
            return JSONResponse(
                {"enabled": True, "error": exc.detail},
                status_code=503,
                headers={"Retry-After": "5"},
            )
        return JSONResponse(
            {
                "enabled": True,
                "client_id": settings.oidc_client_id or settings.oidc_audience,
                "scope": settings.oidc_scopes,
                **endpoints,
            },
            headers={"Cache-Control": "no-store"},
        )

    @router.get(
        "/dashboard/api/info", response_model=DashboardInfo, responses=ERRORS, tags=["dashboard"]
    )
    async def info(caller: Caller) -> DashboardInfo:
        """Periods to choose from and what the dashboard can show; any valid token."""
        async with store_.acquire() as conn:
            periods = await queries.known_periods(conn)
        return DashboardInfo(
            current_period=current_period(),
            periods=[DashboardPeriod(period=p, finalized=done) for p, done in periods],
            alerts_configured=settings.alerts_url is not None,
            provider_name=settings.provider_name,
        )

    @router.get(
        "/dashboard/api/centre", response_model=CentreUsage, responses=ERRORS, tags=["dashboard"]
    )
    async def centre(caller: Caller, period: PeriodQuery) -> CentreUsage:
        """Centre-wide allocated GPUs and their utilization per hour of the period, from the hourly
        usage ledger, with metering's nodes online and completeness per hour."""
        caller.require_read_all()
        period = period_param(period)
        start, end = period_bounds(period)
        async with store_.acquire() as conn:
            hours = await queries.centre_hours(conn, start, end)
        return centre_usage(period, hours)

    @router.get(
        "/dashboard/api/cap", response_model=CapBurnDownList, responses=ERRORS, tags=["dashboard"]
    )
    async def cap(caller: Caller) -> CapBurnDownList:
        """Each subsidised project's approved cap and what is left of it after each period."""
        caller.require_read_all()
        async with store_.acquire() as conn:
            histories = await queries.cap_histories(conn)
            forecasts = await service.subsidy_forecasts(conn, dt.datetime.now(dt.UTC))
        return CapBurnDownList(
            projects=[
                cap_burn_down(history, forecasts.get(history.project.id)) for history in histories
            ]
        )

    @router.get(
        "/dashboard/api/alerts",
        response_model=DashboardAlerts,
        responses=ERRORS,
        tags=["dashboard"],
    )
    async def alerts(caller: Caller, request: Request) -> DashboardAlerts:
        """Pending and firing alerts from the alerts service (ALERTS_URL), fetched server-side
        with the caller's own token (the two services share API_TOKENS)."""
        caller.require_read_all()
        if settings.alerts_url is None:
            return DashboardAlerts(configured=False, reachable=False, alerts=[])
        url = f"{settings.alerts_url}/v1/alerts"
        try:
            async with httpx.AsyncClient(timeout=ALERTS_TIMEOUT_S) as client:
                response = await client.get(
                    url,
                    params={"status": "active"},
                    headers={"Authorization": request.headers.get("Authorization", "")},
                )
            response.raise_for_status()
            body = response.json()
            found = body.get("alerts") if isinstance(body, dict) else None
            if not isinstance(found, list):
                raise ValueError("no 'alerts' list in the answer")
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("alerts service at %s: %r", url, exc)
            return DashboardAlerts(
                configured=True, reachable=False, error=f"{type(exc).__name__}: {exc}", alerts=[]
            )
        return DashboardAlerts(
            configured=True,
            reachable=True,
            alerts=[alert for alert in found if isinstance(alert, dict)],
        )

    @router.get(
        "/v1/invoices/{invoice_id}.pdf",
        response_class=Response,
        responses={**ERRORS, 200: {"content": {"application/pdf": {}}}},
        tags=["invoices"],
    )
    async def invoice_as_pdf(caller: Caller, invoice_id: InvoiceIdPath) -> Response:
        """The invoice as a PDF to send to the project: lines, list price, subsidy (scheme, rate,
        cap remaining) and the amount payable, exactly as the JSON invoice has them."""
        # As for the JSON invoice: the id names its project, so a project token is refused
        # another project's invoice before any lookup (the answer never tells it exists).
        caller.require_project(invoice_id_project(invoice_id))
        async with store_.acquire() as conn:
            found = await store.load_invoice(conn, invoice_id)
            if found is None:
                raise ApiError(404, "not_found", f"no invoice {invoice_id!r}")
            caller.require_project(found.project_id)
            project = await queries.project(conn, found.project_id)
            jobs = await service.invoice_jobs(conn, found.project_id, found.period)
        annex = [
            JobLine(
                job_id=job.job_id or "(no job id)",
                gpu_models=", ".join(job.gpu_models),
                gpu_hours=job.usage.gpu_hours,
                mean_util_pct="-"
                if job.usage.mean_util_pct is None
                else f"{job.usage.mean_util_pct}%",
                idle_gpu_hours=job.usage.idle_gpu_hours,
                energy_kwh=str(job.usage.energy_kwh),
                list_cost_hkd=domain.money(job.usage.list_cost_hkd),
            )
            for job in jobs
        ]
        # Rendering takes a fraction of a second: off the event loop, which serves everyone else.
        document = await run_in_threadpool(
            invoice_pdf,
            found.document(),
            project,
            issuer=Issuer.from_settings(settings),
            jobs=annex,
        )
        return Response(
            document,
            media_type="application/pdf",
            headers={
                "Content-Disposition": f'attachment; filename="{safe_file_name(invoice_id)}.pdf"'
            },
        )

    @router.get(
        "/v1/credit-notes/{credit_note_id}.pdf",
        response_class=Response,
        responses={**ERRORS, 200: {"content": {"application/pdf": {}}}},
        tags=["credit notes"],
    )
    async def credit_note_as_pdf(caller: Caller, credit_note_id: str) -> Response:
        """A credit note as a PDF: its number, the invoice it credits, the reason, the lines
        credited, the subsidy returned to the cap and the amount credited to the project.
        Credit note ids are CN-<invoice id>-<n>; a project token reads its own only."""
        parts = CREDIT_NOTE_ID.fullmatch(credit_note_id)
        if parts is None:
            raise ApiError(404, "not_found", f"no credit note {credit_note_id[:80]!r}")
        caller.require_project(invoice_id_project(parts.group(1)))
        async with store_.acquire() as conn:
            found = await service.credit_notes(conn, credit_note_id=credit_note_id)
            if not found:
                raise ApiError(404, "not_found", f"no credit note {credit_note_id[:80]!r}")
            caller.require_project(found[0].project_id)
            project = await queries.project(conn, found[0].project_id)
        document = await run_in_threadpool(
            credit_note_pdf, found[0], project, issuer=Issuer.from_settings(settings)
        )
        name = safe_file_name(credit_note_id)
        return Response(
            document,
            media_type="application/pdf",
            headers={"Content-Disposition": f'attachment; filename="{name}.pdf"'},
        )

    return router
