"""Read side over HTTP: GET /v1/alerts, /v1/notifications/rejected, /healthz, /metrics.

The two /v1 routes need a bearer token: one from API_TOKENS, or a JWT from the centre's OIDC
provider (services/common/auth.py, services/common/oidc.py). Admin and
billing tokens read every alert, a project token only those labelled with its project (subsidy
alerts carry a project's used and approved HKD). /healthz and /metrics are open. Errors are JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.alerts.metrics import AlertsMetrics
from services.alerts.store import Store
from services.common.auth import Authenticator, auth_error_response, project_of
from services.common.oidc import AuthError

STATUS_FILTERS: dict[str, list[str]] = {
    "active": ["pending", "firing"],
    "firing": ["firing"],
    "pending": ["pending"],
    "resolved": ["resolved"],
    "all": ["pending", "firing", "resolved"],
}


class AlertView(BaseModel):
    fingerprint: str
    rule: str
    status: Literal["pending", "firing", "resolved", "inactive"]
    labels: dict[str, str]
    annotations: dict[str, str]
    pending_since: datetime | None
    starts_at: datetime | None
    ends_at: datetime | None
    last_value: Decimal | None
    last_notified_at: datetime | None
    # Firing, but its condition has been false since then: resolves after keep_firing_for
    keep_firing_since: datetime | None = None
    updated_at: datetime


class AlertList(BaseModel):
    alerts: list[AlertView]


class RejectedNotificationView(BaseModel):
    """A notification a receiver refused for good (a 4xx other than 408, 425, 429): not sent again."""

    seq: int
    receiver: str
    fingerprint: str
    rule: str
    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    starts_at: datetime
    http_status: int | None
    error: str | None
    attempts: int
    created_at: datetime
    rejected_at: datetime


class RejectedNotificationList(BaseModel):
    notifications: list[RejectedNotificationView]


# Texts a client may filter by: printable ASCII (a NUL is refused by PostgreSQL with a 500).
PRINTABLE = r"^[\x20-\x7e]*$"
MAX_WITHIN_S = 366 * 24 * 3600.0  # beyond it PostgreSQL's interval arithmetic overflows soon


class ErrorBody(BaseModel):
    error: str
    detail: str


# Request validation answers 400 with an error body (not FastAPI's 422 shape).
BAD_REQUEST: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "a query parameter out of its rule"},
    401: {"model": ErrorBody, "description": "no bearer token, or one that is not valid"},
    403: {"model": ErrorBody, "description": "a valid OIDC token whose groups give no role"},
    503: {"model": ErrorBody, "description": "the identity provider's keys are unavailable"},
}
BEARER = HTTPBearer(
    auto_error=False, description="a TOKEN from API_TOKENS, or a JWT from the OIDC provider"
)


async def caller_project(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
) -> str | None:
    """The project a caller may read (None: every project); 401 without a valid token."""
    authenticator: Authenticator = request.app.state.authenticator
    who = await authenticator.identify(request.headers.get("authorization"))
    return project_of(who.role)


CallerProject = Annotated[str | None, Depends(caller_project)]


def create_api(
    store: Store,
    metrics: AlertsMetrics,
    *,
    recent_s: float,
    health: Callable[[], dict[str, Any]],
    authenticator: Authenticator | None = None,
    metrics_require_token: bool = False,
) -> FastAPI:
    api = FastAPI(title="gpumeter alerts", version="1")
    api.state.authenticator = authenticator or Authenticator({})

    @api.exception_handler(AuthError)
    async def unauthorized(_: Request, exc: AuthError) -> JSONResponse:
        status, body, headers = auth_error_response(exc)
        return JSONResponse(body, status_code=status, headers=headers or None)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        names = {404: "not_found", 405: "method_not_allowed"}
        return JSONResponse(
            {"error": names.get(exc.status_code, "http_error"), "detail": exc.detail},
            status_code=exc.status_code,
            headers=dict(exc.headers) if exc.headers else None,  # 405's Allow (RFC 9110)
        )

    @api.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return JSONResponse({"error": "invalid_request", "detail": detail}, status_code=400)

    @api.get("/v1/alerts", response_model=AlertList, responses=BAD_REQUEST)
    async def list_alerts(
        project: CallerProject,
        status: Literal["active", "firing", "pending", "resolved", "all"] = "all",
        fingerprint: str | None = Query(None, max_length=256, pattern=PRINTABLE),
        limit: int = Query(500, ge=1, le=5000),
    ) -> AlertList:
        """Pending and firing alerts, and those resolved within the recent window (a project
        token: its project's only)."""
        rows = await store.list_alerts(
            statuses=STATUS_FILTERS[status],
            recent_s=recent_s,
            fingerprint=fingerprint,
            limit=limit,
            project=project,
        )
        return AlertList(alerts=[AlertView.model_validate(row) for row in rows])

    @api.get(
        "/v1/notifications/rejected", response_model=RejectedNotificationList, responses=BAD_REQUEST
    )
    async def list_rejected(
        project: CallerProject,
        receiver: str | None = Query(None, max_length=256, pattern=PRINTABLE),
        within_s: float | None = Query(
            None, gt=0, le=MAX_WITHIN_S, description="default: ALERT_RECENT_S; at most a year"
        ),
        limit: int = Query(500, ge=1, le=5000),
    ) -> RejectedNotificationList:
        """Notifications receivers refused for good within the window, newest first (a project
        token: its project's only)."""
        rows = await store.rejected(
            within_s=within_s or recent_s, receiver=receiver, limit=limit, project=project
        )
        return RejectedNotificationList(
            notifications=[
                RejectedNotificationView(
                    seq=row.seq,
                    receiver=row.receiver,
                    fingerprint=row.fingerprint,
                    rule=row.event.rule,
                    status=row.event.status,
                    labels=row.event.labels,
                    starts_at=row.event.starts_at,
                    http_status=row.http_status,
                    error=row.error,
                    attempts=row.attempts,
                    created_at=row.created_at,
                    rejected_at=row.rejected_at,
                )
                for row in rows
            ]
        )

    @api.get("/healthz", responses={503: {"description": "not healthy: the report says why"}})
    async def healthz() -> JSONResponse:
        report = health()
        return JSONResponse(report, status_code=200 if report.get("status") == "ok" else 503)

    @api.get("/metrics", response_class=PlainTextResponse, responses=BAD_REQUEST)
    async def prometheus_metrics(request: Request) -> Response:
        if metrics_require_token:
            await api.state.authenticator.identify(request.headers.get("authorization"))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return api
