"""Billing HTTP API (docs/contracts.md §5): invoices, finalization, usage, subsidy report,
catalog."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.catalog import Catalog
from schemas.invoice import CreditNote, Invoice
from schemas.usage import MAX_TEXT_CHARS, TEXT_CHARS, TEXT_RULE
from services.billing import catalog as catalog_files
from services.billing import domain, metrics, service, slurm, store
from services.billing.export import (
    efficiency_csv_text,
    focus_csv,
    invoices_csv,
    reconciliation_csv_text,
    safe_file_name,
)
from services.billing.settings import (
    PROJECT_ROLE_PREFIX,
    ROLE_ADMIN,
    ROLE_BILLING,
    BillingSettings,
)
from services.common.auth import Authenticator, auth_error_response
from services.common.oidc import AuthError

log = logging.getLogger(__name__)

MAX_USAGE_ROWS = 50_000


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: Any, headers: dict[str, str] | None = None):
        super().__init__(f"{error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers


class ErrorResponse(BaseModel):
    error: str
    detail: Any = None


class CompletenessSummary(BaseModel):
    status: str = Field(
        description="complete | incomplete (finalization refused) | unknown (hours unreported)"
    )
    hours_with_usage: int
    complete_hours: int
    incomplete_hours: int
    unknown_hours: int


class IncompleteHour(BaseModel):
    hour_start: dt.datetime
    nodes_online: int | None
    nodes_through: int | None
    missing_nodes: list[str]


class PeriodCompletenessResponse(BaseModel):
    period: str
    status: str = Field(
        description="complete | incomplete (finalization refused) | unknown (hours unreported)"
    )
    hours_with_usage: int
    complete_hours: int
    incomplete_hours: list[IncompleteHour]
    unknown_hours: list[dt.datetime] = Field(
        description="hours with usage that metering has sent no completeness record for"
    )


def completeness_summary(found: domain.PeriodCompleteness) -> CompletenessSummary:
    return CompletenessSummary(
        status=found.status,
        hours_with_usage=len(found.hours),
        complete_hours=found.complete_count,
        incomplete_hours=len(found.incomplete),
        unknown_hours=len(found.unknown),
    )


def incomplete_hour(hour: domain.HourStatus) -> IncompleteHour:
    return IncompleteHour(
        hour_start=hour.hour_start,
        nodes_online=hour.nodes_online,
        nodes_through=hour.nodes_through,
        missing_nodes=list(hour.missing_nodes),
    )


class InvoiceList(BaseModel):
    period: str
    invoices: list[Invoice]
    completeness: CompletenessSummary


class FinalizeResponse(BaseModel):
    period: str
    invoice_ids: list[str]
    forced: bool
    invoice_numbers: list[str] = Field(
        default_factory=list, description="the numbers assigned, in the order of invoice_ids"
    )


class CreditNoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(
        min_length=1, max_length=2000, description="why: printed on the credit note, audited"
    )
    lines: list[Annotated[int, Field(ge=1, le=100_000)]] | None = Field(
        None,
        max_length=10_000,
        description="the invoice's line numbers to credit (1-based, in the invoice's order);"
        " left out: every line not yet credited",
    )


class CreditNoteList(BaseModel):
    credit_notes: list[CreditNote]


class AuditEntry(BaseModel):
    audit_id: int
    at: dt.datetime
    actor: str = Field(
        description="token:<n> (the n-th API_TOKENS entry), oidc:<subject>, cli:<user> or system"
    )
    action: str
    subject: str | None
    details: dict[str, Any]


class AuditPage(BaseModel):
    entries: list[AuditEntry]
    next_before_id: int | None = Field(
        description="pass as before_id for the next (older) page; null on the last"
    )


class UsageHourRow(BaseModel):
    gpu_model: str
    hour_start: dt.datetime
    gpu_seconds: str
    gpu_hours: str
    util_gpu_seconds: str
    energy_wh: str
    samples: int
    revision: int


class UsageResponse(BaseModel):
    project_id: str
    start: dt.datetime | None = Field(None, description="inclusive lower bound on hour_start")
    end: dt.datetime | None = Field(None, description="exclusive upper bound on hour_start")
    hours: list[UsageHourRow]
    truncated: bool


class SubsidyReportRow(BaseModel):
    project_id: str
    scheme: str | None
    subsidy_rate: str | None
    cap_hkd: str | None
    invoice_id: str | None
    invoice_status: str | None
    subsidised_gpu_hours: str
    subsidy_hkd: str
    credited_subsidy_hkd: str = Field(
        "0.00",
        description="subsidy of this period's invoice returned to the cap by credit notes",
    )
    cap_remaining_hkd: str | None = Field(
        description="after this period's subsidy, less what credit notes returned"
    )
    burn_hkd_per_day: str | None = Field(
        None, description="now: subsidy drawn per day over the last 7 whole days (Hong Kong)"
    )
    cap_exhausted_on: dt.date | None = Field(
        None,
        description="now: the day the cap runs out at that burn; null when it does not before"
        " the approval ends",
    )
    approval_ends_on: dt.date | None = None


class SubsidyReportTotals(BaseModel):
    subsidised_gpu_hours: str
    subsidy_hkd: str
    credited_subsidy_hkd: str = "0.00"


class SubsidyReport(BaseModel):
    period: str
    projects: list[SubsidyReportRow]
    totals: SubsidyReportTotals


class UsageFigures(BaseModel):
    gpu_hours: str = Field(description="GPU-hours allocated")
    idle_gpu_hours: str = Field(description="GPU-hours allocated at under 5% utilization")
    mean_util_pct: str | None
    energy_kwh: str = Field(description="measured GPU energy")
    list_cost_hkd: str = Field(description="the GPU-hours at list price, before any subsidy")
    idle_list_cost_hkd: str = Field(description="the idle GPU-hours at list price")
    unpriced_models: list[str] = Field(description="models with no rate card: in no cost")


def usage_figures(summary: domain.UsageSummary) -> UsageFigures:
    return UsageFigures(
        gpu_hours=summary.gpu_hours,
        idle_gpu_hours=summary.idle_gpu_hours,
        mean_util_pct=None if summary.mean_util_pct is None else str(summary.mean_util_pct),
        energy_kwh=str(summary.energy_kwh),
        list_cost_hkd=domain.money(summary.list_cost_hkd),
        idle_list_cost_hkd=domain.money(summary.idle_list_cost_hkd),
        unpriced_models=list(summary.unpriced_models),
    )


class JobRow(UsageFigures):
    job_id: str | None = Field(description="null: GPUs allocated to the project with no job id")
    gpu_models: list[str]
    nodes: int = Field(description="the most nodes it ran on in one hour")
    first_hour: dt.datetime
    last_hour: dt.datetime


def job_row(job: domain.JobUsage) -> JobRow:
    return JobRow(
        job_id=job.job_id or None,
        gpu_models=list(job.gpu_models),
        nodes=job.nodes,
        first_hour=job.first_hour,
        last_hour=job.last_hour,
        **usage_figures(job.usage).model_dump(),
    )


class ProjectJobs(BaseModel):
    project_id: str
    period: str
    jobs: list[JobRow] = Field(description="the most expensive first")
    totals: UsageFigures


class ProjectEfficiency(UsageFigures):
    project_id: str
    idle_share_pct: str | None = Field(description="idle GPU-hours as a share of allocated")
    top_jobs: list[JobRow] = Field(description="up to 3, the most expensive first")


class EfficiencyReport(BaseModel):
    period: str
    projects: list[ProjectEfficiency]


class ReconciliationDifference(BaseModel):
    job_id: str = Field(description="Slurm's JobID")
    project_id: str | None
    kind: str = Field(
        description="missing_in_gpumeter | missing_in_slurm | hours_differ | project_differs"
    )
    metered_gpu_hours: str
    slurm_gpu_hours: str
    detail: str


class Reconciliation(BaseModel):
    start: dt.datetime = Field(description="hours from (inclusive), on the hour")
    end: dt.datetime = Field(description="hours to (exclusive), on the hour")
    tolerance_pct: str
    tolerance_gpu_seconds: str
    slurm_jobs: int = Field(description="jobs with GPUs Slurm's accounting has in the window")
    metered_jobs: int
    differences: list[ReconciliationDifference]


class CatalogApplied(BaseModel):
    added: list[str]
    changed: list[str]
    removed: list[str]
    unchanged: int
    invoices_changed: list[str]


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 422, 503)
}
BODY_ERRORS = {**ERRORS, 413: {"model": ErrorResponse}}  # routes that take a body (GuardBodies)


def error_response(
    status: int, error: str, detail: Any, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


# The rules of each path and query parameter, in the OpenAPI document too (`pattern` there is
# documentation: the handlers check, so that a refusal names its reason in the error body).
PERIOD_DESCRIPTION = f"billing period: {domain.PERIOD_RULE} (a calendar month in Asia/Hong_Kong)"
PROJECT_ID_RULE = (
    f"1 to {MAX_TEXT_CHARS} printable ASCII characters (space to tilde) other than `|`,"
    " as usage samples carry it (docs/contracts.md)"
)
PROJECT_ID_DESCRIPTION = f"project id: {PROJECT_ID_RULE}"
PROJECT_ID_JSON_PATTERN = f"^{TEXT_CHARS}{{1,{MAX_TEXT_CHARS}}}$"
INVOICE_ID_DESCRIPTION = (
    "invoice id: INV-<period>-<project id>, the period and the project id as their parameters"
    " take them; any other text names no invoice (404)"
)
INVOICE_ID_JSON_PATTERN = (
    f"^INV-{domain.PERIOD_JSON_PATTERN[1:-1]}-{TEXT_CHARS}{{1,{MAX_TEXT_CHARS}}}$"
)
INVOICE_ID_PARTS = re.compile(r"INV-([0-9]{4}-[0-9]{2})-(.*)", re.DOTALL)
QUOTED_CHARS = 80  # of a refused value echoed in an error's detail


def period_param(period: str) -> str:
    try:
        return domain.parse_period(period)
    except domain.InvalidPeriod as exc:
        raise ApiError(400, "invalid_period", str(exc)) from None


def project_id_param(project_id: str) -> str:
    if not TEXT_RULE.fullmatch(project_id):
        raise ApiError(
            400,
            "invalid_project_id",
            f"project id {project_id[:QUOTED_CHARS]!r} is not {PROJECT_ID_RULE}",
        )
    return project_id


def invoice_id_project(invoice_id: str) -> str:
    """The project an invoice id names; 404 for a text that can name no invoice."""
    parts = INVOICE_ID_PARTS.fullmatch(invoice_id)
    try:
        if parts is None:
            raise ValueError
        domain.parse_period(parts.group(1))
        return project_id_param(parts.group(2))
    except (ValueError, ApiError):
        raise ApiError(
            404,
            "not_found",
            f"no invoice {invoice_id[:QUOTED_CHARS]!r}: invoice ids are INV-YYYY-MM-<project id>",
        ) from None


def time_param(name: str, moment: dt.datetime | None) -> dt.datetime | None:
    if moment is None:
        return None
    try:
        return domain.query_time(moment)
    except domain.InvalidTime as exc:
        raise ApiError(400, "invalid_time", f"{name!r}: {exc}") from None


def rfc3339_text(value: Any) -> Any:
    """Only RFC 3339 text reaches pydantic's datetime parsing, which also takes Unix seconds."""
    if isinstance(value, str) and not domain.RFC3339_PATTERN.fullmatch(value):
        raise ValueError("not an RFC 3339 time such as 2026-11-01T00:00:00+08:00")
    return value


PeriodQuery = Annotated[
    str,
    Query(
        description=PERIOD_DESCRIPTION,
        json_schema_extra={"pattern": domain.PERIOD_JSON_PATTERN},
    ),
]
PeriodPath = Annotated[
    str,
    Path(
        description=PERIOD_DESCRIPTION,
        json_schema_extra={"pattern": domain.PERIOD_JSON_PATTERN},
    ),
]
ProjectIdPath = Annotated[
    str,
    Path(
        description=PROJECT_ID_DESCRIPTION,
        json_schema_extra={"pattern": PROJECT_ID_JSON_PATTERN},
    ),
]
InvoiceIdPath = Annotated[
    str,
    Path(
        description=INVOICE_ID_DESCRIPTION,
        json_schema_extra={"pattern": INVOICE_ID_JSON_PATTERN},
    ),
]


ReconcileFrom = Annotated[
    dt.datetime | None,
    BeforeValidator(rfc3339_text),
    Query(alias="from", description="default: 24 hours before `to`; rounded down to the hour"),
]
ReconcileTo = Annotated[
    dt.datetime | None,
    BeforeValidator(rfc3339_text),
    Query(alias="to", description="default: now; rounded up to the hour"),
]


class Principal:
    def __init__(self, role: str, subject: str = "") -> None:
        self.role = role
        self.subject = subject  # token:<n> or oidc:<sub>, for the audit trail

    @property
    def reads_all(self) -> bool:
        return self.role in (ROLE_ADMIN, ROLE_BILLING)

    @property
    def project_id(self) -> str | None:
        return self.role.removeprefix(PROJECT_ROLE_PREFIX) if not self.reads_all else None

    def require_admin(self) -> None:
        if self.role != ROLE_ADMIN:
            raise ApiError(403, "forbidden", "this needs an admin token")

    def require_read_all(self) -> None:
        if not self.reads_all:
            raise ApiError(403, "forbidden", "this needs an admin or billing token")

    def require_project(self, project_id: str) -> None:
        if not self.reads_all and self.project_id != project_id:
            raise ApiError(403, "forbidden", f"this token may not read project {project_id!r}")


BEARER = HTTPBearer(
    auto_error=False, description="a TOKEN from API_TOKENS, or a JWT from the OIDC provider"
)


def auth_error(exc: AuthError) -> ApiError:
    status, body, headers = auth_error_response(exc)
    return ApiError(status, body["error"], body["detail"], headers or None)


async def principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
) -> Principal:
    """The caller's role from its bearer token: 401 without one or with an unknown one."""
    authenticator: Authenticator = request.app.state.authenticator
    try:
        who = await authenticator.identify(request.headers.get("authorization"))
    except AuthError as exc:
        raise auth_error(exc) from None
    return Principal(who.role, who.subject)


class BodyTooLarge(StarletteHTTPException):
    """Raised from the body's stream: FastAPI passes an HTTPException through its body parsing
    (anything else becomes a 400) and the app's handler answers it."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"a request body may hold at most {max_bytes} bytes")


class GuardBodies:
    """ASGI middleware in front of every route that takes a body (POST, PUT, PATCH): a request
    without a known bearer token is answered 401 before any of its body is read, and one whose
    body exceeds `max_bytes` 413, from its Content-Length or, without one, as the body streams
    in. FastAPI reads and parses a body before the route's dependencies (the token check) run."""

    def __init__(self, app: Any, authenticator: Authenticator, max_bytes: int) -> None:
        self.app, self.authenticator, self.max_bytes = app, authenticator, max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        try:
            await self.authenticator.identify(headers.get(b"authorization"))
        except AuthError as exc:
            error = auth_error(exc)
            await error_response(error.status, error.error, error.detail, error.headers)(
                scope, receive, send
            )
            return
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self.too_large(scope, receive, send)
            return
        received = 0

        async def counted() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counted, send)

    async def too_large(self, scope: Any, receive: Any, send: Any) -> None:
        error = BodyTooLarge(self.max_bytes)
        await error_response(413, "payload_too_large", error.detail)(scope, receive, send)


Caller = Annotated[Principal, Depends(principal)]


def create_api(
    settings: BillingSettings,
    store_: store.Store,
    on_finalized: Callable[[], None] | None = None,
    health: Callable[[], dict[str, Any]] | None = None,
) -> FastAPI:
    app = FastAPI(
        title="gpumeter billing",
        version="1.0.0",
        description=(
            "Invoices with AISS subsidy for GPU usage (docs/contracts.md §4-5). Money is HKD text."
        ),
    )
    app.state.authenticator = settings.authenticator()
    numbering = service.Numbering(settings.invoice_number_prefix, settings.payment_terms_days)
    app.add_middleware(
        GuardBodies, authenticator=app.state.authenticator, max_bytes=settings.max_request_bytes
    )

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.error, exc.detail, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        names = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        return error_response(
            exc.status_code,
            names.get(exc.status_code, "http_error"),
            exc.detail,
            dict(exc.headers) if exc.headers else None,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()
        ]
        return error_response(422, "invalid_request", "; ".join(problems))

    @app.exception_handler(service.PeriodAlreadyFinalized)
    async def _already(_request: Request, exc: service.PeriodAlreadyFinalized) -> JSONResponse:
        return error_response(409, "period_already_finalized", str(exc))

    @app.exception_handler(service.IncompleteHours)
    async def _incomplete(_request: Request, exc: service.IncompleteHours) -> JSONResponse:
        return error_response(
            409,
            "incomplete_hours",
            {
                "message": str(exc),
                "incomplete_hours": [
                    incomplete_hour(hour).model_dump(mode="json") for hour in exc.hours
                ],
            },
        )

    @app.exception_handler(service.UnpricedUsage)
    async def _unpriced(_request: Request, exc: service.UnpricedUsage) -> JSONResponse:
        return error_response(
            409, "unpriced_usage", {"message": str(exc), "unpriced_models": exc.unpriced}
        )

    @app.exception_handler(catalog_files.CatalogError)
    async def _bad_catalog(_request: Request, exc: catalog_files.CatalogError) -> JSONResponse:
        return error_response(422, "invalid_catalog", exc.errors)

    @app.exception_handler(asyncpg.DataError)
    async def _unstorable(_request: Request, exc: asyncpg.DataError) -> JSONResponse:
        # A value valid by the schema that PostgreSQL cannot hold (range, encoding): bad input.
        return error_response(422, "invalid_value", str(exc))

    @app.exception_handler(UnicodeEncodeError)
    async def _unencodable(_request: Request, exc: UnicodeEncodeError) -> JSONResponse:
        return error_response(422, "invalid_value", f"text is not valid Unicode: {exc.reason}")

    async def _database_down(_request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %r", exc)
        return error_response(503, "database_unavailable", "try again shortly")

    for error_type in store.RETRYABLE_DB_ERRORS:
        app.add_exception_handler(error_type, _database_down)

    # Dashboard and PDF invoices; imported here because they use this module's auth and errors.
    # Included before /v1/invoices/{invoice_id} so that its .pdf route matches first.
    from services.billing.web.routes import create_router

    app.include_router(create_router(settings, store_))

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> JSONResponse:
        report: dict[str, Any] = {"status": "ok", "database": await store_.ping()}
        if health is not None:
            report.update(health())
        if not report["database"] or not all(v for k, v in report.items() if k != "status"):
            report["status"] = "degraded"
        return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

    @app.get("/metrics", tags=["ops"], response_class=Response, responses=ERRORS)
    async def prometheus_metrics(request: Request) -> Response:
        if settings.metrics_require_token:
            try:
                await app.state.authenticator.identify(request.headers.get("authorization"))
            except AuthError as exc:
                raise auth_error(exc) from None
        try:
            async with store_.acquire() as conn:
                metrics.UNPRICED_DRAFTS.set(await store.count_unpriced_drafts(conn))
        except store.RETRYABLE_DB_ERRORS:
            pass  # the gauge keeps its last value while the database is away
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/invoices", response_model=InvoiceList, responses=ERRORS, tags=["invoices"])
    async def list_invoices(
        caller: Caller,
        period: PeriodQuery,
        project_id: Annotated[
            str | None,
            Query(
                description=PROJECT_ID_DESCRIPTION,
                json_schema_extra={"pattern": PROJECT_ID_JSON_PATTERN},
            ),
        ] = None,
    ) -> InvoiceList:
        period = period_param(period)
        if project_id is not None:
            caller.require_project(project_id_param(project_id))
        elif not caller.reads_all:
            project_id = caller.project_id
        async with store_.acquire() as conn:
            found = await store.load_invoices(conn, period=period, project_id=project_id)
            completeness = await store.period_completeness(conn, period)
        return InvoiceList(
            period=period,
            invoices=[invoice.document() for invoice in found],
            completeness=completeness_summary(completeness),
        )

    async def one_invoice(caller: Principal, invoice_id: str) -> Invoice:
        # The id names its project: a project token is refused another's without a lookup, so
        # the answer never tells whether that invoice exists.
        caller.require_project(invoice_id_project(invoice_id))
        async with store_.acquire() as conn:
            found = await store.load_invoice(conn, invoice_id)
        if found is None:
            raise ApiError(404, "not_found", f"no invoice {invoice_id!r}")
        caller.require_project(found.project_id)
        return found.document()

    @app.get(
        "/v1/invoices/{invoice_id}.csv",
        response_class=Response,
        responses={**ERRORS, 200: {"content": {"text/csv": {}}}},
        tags=["invoices"],
    )
    async def invoice_as_csv(caller: Caller, invoice_id: InvoiceIdPath) -> Response:
        invoice = await one_invoice(caller, invoice_id)
        async with store_.acquire() as conn:
            notes = await service.credit_notes(conn, invoice_id=invoice.invoice_id)
            jobs = await service.invoice_jobs(conn, invoice.project_id, invoice.period)
        return Response(
            invoices_csv([invoice], notes, {invoice.invoice_id: jobs}),
            media_type="text/csv; charset=utf-8",
            headers={
                "Content-Disposition": (
                    f'attachment; filename="{safe_file_name(invoice.invoice_id)}.csv"'
                )
            },
        )

    @app.get(
        "/v1/invoices/{invoice_id}", response_model=Invoice, responses=ERRORS, tags=["invoices"]
    )
    async def get_invoice(caller: Caller, invoice_id: InvoiceIdPath) -> Invoice:
        return await one_invoice(caller, invoice_id)

    @app.post(
        "/v1/periods/{period}/finalize",
        response_model=FinalizeResponse,
        responses=BODY_ERRORS,
        tags=["periods"],
    )
    async def finalize(caller: Caller, period: PeriodPath, force: bool = False) -> FinalizeResponse:
        caller.require_admin()
        period = period_param(period)
        async with store_.acquire() as conn:
            result = await service.finalize_period(
                conn, period, force, actor=caller.subject, numbering=numbering
            )
        metrics.PERIODS_FINALIZED.inc()
        if on_finalized is not None:
            on_finalized()
        return FinalizeResponse(
            period=result.period,
            invoice_ids=result.invoice_ids,
            forced=result.forced,
            invoice_numbers=result.invoice_numbers,
        )

    @app.post(
        "/v1/invoices/{invoice_id}/credit-notes",
        response_model=CreditNote,
        status_code=201,
        responses=BODY_ERRORS,
        tags=["credit notes"],
    )
    async def post_credit_note(
        caller: Caller, invoice_id: InvoiceIdPath, request: CreditNoteRequest
    ) -> CreditNote:
        """Credit a finalized invoice in whole or by lines (docs/contracts.md §5, credit notes):
        a numbered credit note; the subsidy it carried returns to the project's cap and the
        credited hours are charged again, at current rates, on the project's next open invoice."""
        caller.require_admin()
        invoice_id_project(invoice_id)
        async with store_.acquire() as conn:
            try:
                return await service.issue_credit_note(
                    conn,
                    invoice_id,
                    request.reason,
                    request.lines,
                    actor=caller.subject,
                    numbering=numbering,
                )
            except service.InvoiceNotFound as exc:
                raise ApiError(404, "not_found", str(exc)) from None
            except domain.CreditRefused as exc:
                raise ApiError(409, "credit_refused", str(exc)) from None

    @app.get(
        "/v1/invoices/{invoice_id}/credit-notes",
        response_model=CreditNoteList,
        responses=ERRORS,
        tags=["credit notes"],
    )
    async def get_invoice_credit_notes(caller: Caller, invoice_id: InvoiceIdPath) -> CreditNoteList:
        await one_invoice(caller, invoice_id)  # 404 and the project check, as for the invoice
        async with store_.acquire() as conn:
            return CreditNoteList(
                credit_notes=await service.credit_notes(conn, invoice_id=invoice_id)
            )

    @app.get(
        "/v1/credit-notes", response_model=CreditNoteList, responses=ERRORS, tags=["credit notes"]
    )
    async def list_credit_notes(
        caller: Caller, period: PeriodQuery, project_id: str | None = None
    ) -> CreditNoteList:
        """Credit notes against the invoices of a period (a project token: its own only)."""
        period = period_param(period)
        if project_id is not None:
            project_id_param(project_id)
            caller.require_project(project_id)
        elif not caller.reads_all:
            project_id = caller.project_id
        async with store_.acquire() as conn:
            return CreditNoteList(
                credit_notes=await service.credit_notes(conn, period=period, project_id=project_id)
            )

    @app.get("/v1/audit", response_model=AuditPage, responses=ERRORS, tags=["audit"])
    async def get_audit(
        caller: Caller,
        action: Annotated[str | None, Query(max_length=100)] = None,
        since: Annotated[dt.datetime | None, BeforeValidator(rfc3339_text)] = None,
        before_id: Annotated[int | None, Query(ge=1)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> AuditPage:
        """Who did what, newest first: catalog applies (each entry before and after),
        finalizations (forced or not) and credit notes. Append-only."""
        caller.require_admin()
        since = time_param("since", since)
        async with store_.acquire() as conn:
            rows = await store.audit_rows(
                conn, action=action, since=since, before_id=before_id, limit=limit
            )
        entries = [
            AuditEntry(
                audit_id=row["audit_id"],
                at=row["at"],
                actor=row["actor"],
                action=row["action"],
                subject=row["subject"],
                details=json.loads(row["details"]),
            )
            for row in rows
        ]
        return AuditPage(
            entries=entries,
            next_before_id=entries[-1].audit_id if len(entries) == limit else None,
        )

    @app.get(
        "/v1/periods/{period}/completeness",
        response_model=PeriodCompletenessResponse,
        responses=ERRORS,
        tags=["periods"],
    )
    async def get_completeness(caller: Caller, period: PeriodPath) -> PeriodCompletenessResponse:
        """Metering's completeness of each hour of the period with usage. Hours without a record
        are unknown: reported, but they do not block finalization."""
        caller.require_read_all()
        period = period_param(period)
        async with store_.acquire() as conn:
            found = await store.period_completeness(conn, period)
        return PeriodCompletenessResponse(
            period=period,
            status=found.status,
            hours_with_usage=len(found.hours),
            complete_hours=found.complete_count,
            incomplete_hours=[incomplete_hour(hour) for hour in found.incomplete],
            unknown_hours=[hour.hour_start for hour in found.unknown],
        )

    @app.get(
        "/v1/exports/focus",
        response_class=Response,
        responses={**ERRORS, 200: {"content": {"text/csv": {}}}},
        tags=["exports"],
    )
    async def export_focus(caller: Caller, period: PeriodQuery) -> Response:
        """The period's invoices as FinOps FOCUS cost rows (CSV); BilledCost sums to the nets."""
        caller.require_read_all()
        period = period_param(period)
        async with store_.acquire() as conn:
            found = await store.load_invoices(conn, period=period)
            projects = {project.id: project for project in await store.projects(conn)}
            notes = await service.credit_notes(conn, period=period)
        return Response(
            focus_csv([i.document() for i in found], projects, settings.provider_name, notes),
            media_type="text/csv; charset=utf-8",
            headers={
                "Content-Disposition": f'attachment; filename="{safe_file_name(f"focus-{period}")}.csv"'
            },
        )

    async def job_usage(
        project_ids: list[str] | None, period: str
    ) -> tuple[dict[str, list[domain.JobDay]], domain.Pricing]:
        async with store_.acquire() as conn:
            return await service.job_days(conn, project_ids, period)

    @app.get(
        "/v1/projects/{project_id}/jobs",
        response_model=ProjectJobs,
        responses=ERRORS,
        tags=["usage"],
    )
    async def project_jobs(
        caller: Caller, project_id: ProjectIdPath, period: PeriodQuery
    ) -> ProjectJobs:
        """Which jobs spent the project's GPU-hours in a period (usage hours of the period, in
        Hong Kong): per job GPU-hours, mean utilization, idle GPU-hours, energy and list cost."""
        caller.require_project(project_id_param(project_id))
        period = period_param(period)
        days, pricing = await job_usage([project_id], period)
        found = days.get(project_id, [])
        return ProjectJobs(
            project_id=project_id,
            period=period,
            jobs=[job_row(job) for job in domain.jobs_of(found, pricing)],
            totals=usage_figures(domain.summarize(found, pricing)),
        )

    async def efficiency_of(
        caller: Principal, period: str, project_id: str | None
    ) -> EfficiencyReport:
        period = period_param(period)
        if project_id is not None:
            caller.require_project(project_id_param(project_id))
        elif not caller.reads_all:
            project_id = caller.project_id
        days, pricing = await job_usage(None if project_id is None else [project_id], period)
        projects = []
        for pid in sorted(days):
            summary = domain.summarize(days[pid], pricing)
            share = (
                None
                if not summary.gpu_seconds
                else str(
                    (summary.idle_gpu_seconds * 100 / summary.gpu_seconds).quantize(Decimal("0.1"))
                )
            )
            projects.append(
                ProjectEfficiency(
                    project_id=pid,
                    idle_share_pct=share,
                    top_jobs=[job_row(job) for job in domain.jobs_of(days[pid], pricing)[:3]],
                    **usage_figures(summary).model_dump(),
                )
            )
        return EfficiencyReport(period=period, projects=projects)

    @app.get("/v1/efficiency", response_model=EfficiencyReport, responses=ERRORS, tags=["usage"])
    async def efficiency(
        caller: Caller, period: PeriodQuery, project_id: str | None = None
    ) -> EfficiencyReport:
        """Per project and period: allocated GPU-hours, GPU-hours allocated at under 5%
        utilization and their list cost, mean utilization, measured energy, and the top jobs.
        A project token sees its own project only."""
        return await efficiency_of(caller, period, project_id)

    @app.get(
        "/v1/efficiency.csv",
        response_class=Response,
        responses={**ERRORS, 200: {"content": {"text/csv": {}}}},
        tags=["usage"],
    )
    async def efficiency_csv(
        caller: Caller, period: PeriodQuery, project_id: str | None = None
    ) -> Response:
        report = await efficiency_of(caller, period, project_id)
        return Response(
            efficiency_csv_text(report.model_dump(mode="json")["projects"]),
            media_type="text/csv; charset=utf-8",
            headers={
                "Content-Disposition": (
                    f'attachment; filename="{safe_file_name(f"efficiency-{report.period}")}.csv"'
                )
            },
        )

    async def reconciliation_of(
        start: dt.datetime | None, end: dt.datetime | None
    ) -> Reconciliation:
        now = dt.datetime.now(dt.UTC)
        end = end or now
        start = start or end - dt.timedelta(days=1)
        start = start.replace(minute=0, second=0, microsecond=0)
        if end.minute or end.second or end.microsecond:
            end = end.replace(minute=0, second=0, microsecond=0) + dt.timedelta(hours=1)
        if end <= start:
            raise ApiError(400, "invalid_range", "'to' is not after 'from'")
        if end - start > dt.timedelta(days=93):
            raise ApiError(400, "invalid_range", "at most 93 days at a time")
        if settings.slurm_sacct is None:
            # Not a fault of the service (no 5xx): this deployment has no Slurm to compare with.
            raise ApiError(
                404,
                "not_configured",
                "reconciliation with Slurm is off here: set SLURM_SACCT (and SLURM_CONF)",
            )
        try:
            jobs = await slurm.sacct_jobs(settings.slurm_sacct, start, end)
        except slurm.SacctError as exc:
            raise ApiError(503, "slurm_unavailable", str(exc)) from None
        async with store_.acquire() as conn:
            metered = await store.metered_jobs(conn, start, end)
        found = slurm.reconcile(
            metered,
            jobs,
            start,
            end,
            now,
            settings.reconcile_tolerance_pct,
            settings.reconcile_tolerance_gpu_seconds,
        )
        return Reconciliation(
            start=start,
            end=end,
            tolerance_pct=str(settings.reconcile_tolerance_pct),
            tolerance_gpu_seconds=str(settings.reconcile_tolerance_gpu_seconds),
            slurm_jobs=sum(1 for job in jobs if job.gpu_seconds_within(start, end, now)),
            metered_jobs=len(metered),
            differences=[
                ReconciliationDifference(
                    job_id=d.job_id,
                    project_id=d.project_id,
                    kind=d.kind,
                    metered_gpu_hours=domain.gpu_hours_text(d.metered_gpu_seconds),
                    slurm_gpu_hours=domain.gpu_hours_text(d.slurm_gpu_seconds),
                    detail=d.detail,
                )
                for d in found
            ],
        )

    @app.get("/v1/reconciliation", response_model=Reconciliation, responses=ERRORS, tags=["slurm"])
    async def reconciliation(
        caller: Caller, start: ReconcileFrom = None, end: ReconcileTo = None
    ) -> Reconciliation:
        """GPU-hours per job as gpumeter metered them against Slurm's accounting (sacct: allocated
        gres/gpu x the time each job ran in the window), with every job that differs beyond the
        tolerance or that only one side knows."""
        caller.require_read_all()
        return await reconciliation_of(time_param("from", start), time_param("to", end))

    @app.get(
        "/v1/reconciliation.csv",
        response_class=Response,
        responses={**ERRORS, 200: {"content": {"text/csv": {}}}},
        tags=["slurm"],
    )
    async def reconciliation_csv(
        caller: Caller, start: ReconcileFrom = None, end: ReconcileTo = None
    ) -> Response:
        caller.require_read_all()
        report = await reconciliation_of(time_param("from", start), time_param("to", end))
        rows = [d.model_dump() for d in report.differences]
        return Response(
            reconciliation_csv_text(rows),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": 'attachment; filename="reconciliation.csv"'},
        )

    @app.get(
        "/v1/projects/{project_id}/usage",
        response_model=UsageResponse,
        responses=ERRORS,
        tags=["usage"],
    )
    async def project_usage(
        caller: Caller,
        project_id: ProjectIdPath,
        start: Annotated[
            dt.datetime | None,
            BeforeValidator(rfc3339_text),
            Query(
                alias="from",
                description=f"hours starting at or after it: {domain.QUERY_TIME_RULE}",
            ),
        ] = None,
        end: Annotated[
            dt.datetime | None,
            BeforeValidator(rfc3339_text),
            Query(alias="to", description=f"hours starting before it: {domain.QUERY_TIME_RULE}"),
        ] = None,
    ) -> UsageResponse:
        caller.require_project(project_id_param(project_id))
        start, end = time_param("from", start), time_param("to", end)
        if start is not None and end is not None and end < start:
            raise ApiError(400, "invalid_range", "'to' is before 'from'")
        async with store_.acquire() as conn:
            rows = await store.usage_rows(conn, project_id, start, end, MAX_USAGE_ROWS + 1)
        hours = [
            UsageHourRow(
                gpu_model=row["gpu_model"],
                hour_start=row["hour_start"],
                gpu_seconds=str(row["gpu_seconds"]),
                gpu_hours=domain.gpu_hours_text(row["gpu_seconds"]),
                util_gpu_seconds=str(row["util_gpu_seconds"]),
                energy_wh=str(row["energy_wh"]),
                samples=row["samples"],
                revision=row["revision"],
            )
            for row in rows[:MAX_USAGE_ROWS]
        ]
        return UsageResponse(
            project_id=project_id,
            start=start,
            end=end,
            hours=hours,
            truncated=len(rows) > MAX_USAGE_ROWS,
        )

    @app.get("/v1/subsidy/report", response_model=SubsidyReport, responses=ERRORS, tags=["subsidy"])
    async def subsidy_report(caller: Caller, period: PeriodQuery) -> SubsidyReport:
        caller.require_read_all()
        period = period_param(period)
        async with store_.acquire() as conn:
            invoices = {i.project_id: i for i in await store.load_invoices(conn, period=period)}
            projects = {p.id: p for p in await store.projects(conn)}
            forecasts = await service.subsidy_forecasts(conn, dt.datetime.now(dt.UTC))
            credited: dict[str, Decimal] = {}
            for note in await service.credit_notes(conn, period=period):
                credited[note.project_id] = credited.get(note.project_id, Decimal(0)) + Decimal(
                    note.subsidy_hkd
                )
            rows = []
            for project_id in sorted(
                set(invoices) | {p.id for p in projects.values() if p.subsidy}
            ):
                project, invoice = projects.get(project_id), invoices.get(project_id)
                forecast = forecasts.get(project_id)
                subsidy = project.subsidy if project else None
                subsidised_seconds = (
                    sum(
                        (line.gpu_seconds for line in invoice.lines if line.subsidised),
                        Decimal(0),
                    )
                    if invoice
                    else Decimal(0)
                )
                if invoice is not None and invoice.subsidy_cap_remaining_hkd is not None:
                    cap_remaining = invoice.subsidy_cap_remaining_hkd + credited.get(
                        project_id, Decimal(0)
                    )
                elif invoice is not None:
                    cap_remaining = None
                elif subsidy is not None:
                    used = await store.subsidy_used_through(conn, project_id, period)
                    cap_remaining = subsidy.cap_hkd - used
                else:
                    cap_remaining = None
                rows.append(
                    SubsidyReportRow(
                        project_id=project_id,
                        scheme=subsidy.scheme if subsidy else None,
                        subsidy_rate=str(subsidy.rate) if subsidy else None,
                        cap_hkd=domain.money(subsidy.cap_hkd) if subsidy else None,
                        invoice_id=invoice.invoice_id if invoice else None,
                        invoice_status=invoice.status if invoice else None,
                        subsidised_gpu_hours=domain.gpu_hours_text(subsidised_seconds),
                        subsidy_hkd=domain.money(invoice.subsidy_hkd if invoice else Decimal(0)),
                        credited_subsidy_hkd=domain.money(credited.get(project_id, Decimal(0))),
                        burn_hkd_per_day=str(forecast.burn_hkd_per_day) if forecast else None,
                        cap_exhausted_on=forecast.exhausted_on if forecast else None,
                        approval_ends_on=subsidy.valid_to if subsidy else None,
                        cap_remaining_hkd=None
                        if cap_remaining is None
                        else domain.money(cap_remaining),
                    )
                )
        total_seconds = sum(
            (
                line.gpu_seconds
                for invoice in invoices.values()
                for line in invoice.lines
                if line.subsidised
            ),
            Decimal(0),
        )
        total_subsidy = sum((invoice.subsidy_hkd for invoice in invoices.values()), Decimal(0))
        return SubsidyReport(
            period=period,
            projects=rows,
            totals=SubsidyReportTotals(
                subsidised_gpu_hours=str(domain.round_half_up(Fraction(total_seconds) / 3600, 6)),
                subsidy_hkd=domain.money(total_subsidy),
                credited_subsidy_hkd=domain.money(sum(credited.values(), Decimal(0))),
            ),
        )

    @app.get("/v1/catalog", response_model=Catalog, responses=ERRORS, tags=["catalog"])
    async def get_catalog(caller: Caller) -> Catalog:
        caller.require_read_all()
        async with store_.acquire() as conn:
            return await catalog_files.read_catalog(conn)

    @app.put("/v1/catalog", response_model=CatalogApplied, responses=BODY_ERRORS, tags=["catalog"])
    async def put_catalog(caller: Caller, catalog: Catalog, prune: bool = False) -> CatalogApplied:
        """Apply a catalog (same rules as `gpumeter catalog apply`): idempotent upsert."""
        caller.require_admin()
        async with store_.acquire() as conn:
            changes = await catalog_files.apply_catalog(
                conn, catalog, prune=prune, actor=caller.subject
            )
        return CatalogApplied(
            added=changes.added,
            changed=changes.changed,
            removed=changes.removed,
            unchanged=changes.unchanged,
            invoices_changed=changes.invoices_changed,
        )

    return app
