"""Read-only queries behind the dashboard, over tables billing already keeps: the hourly usage
ledger (metering.usage.hourly.v1), metering's hour completeness, projects and invoices."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal

from schemas.catalog import Project
from services.billing.store import Connection, project_from_row

# Per UTC hour of [start, end): allocated GPU-seconds and utilization summed over every project and
# model, with metering's completeness of the hour; an hour with nodes online but nothing allocated
# comes from hour_completeness alone.
CENTRE_HOURS = """
SELECT hour_start,
       COALESCE(u.gpu_seconds, 0) AS gpu_seconds,
       COALESCE(u.util_gpu_seconds, 0) AS util_gpu_seconds,
       COALESCE(u.projects, 0) AS projects,
       c.nodes_online, c.complete
FROM (
    SELECT hour_start, sum(gpu_seconds) AS gpu_seconds, sum(util_gpu_seconds) AS util_gpu_seconds,
           count(DISTINCT project_id) AS projects
    FROM usage_hourly WHERE hour_start >= $1 AND hour_start < $2
    GROUP BY hour_start
) u
FULL JOIN (
    SELECT hour_start, nodes_online, complete FROM hour_completeness
    WHERE hour_start >= $1 AND hour_start < $2
) c USING (hour_start)
ORDER BY hour_start
"""


@dataclass(frozen=True)
class CentreHour:
    hour_start: dt.datetime
    gpu_seconds: Decimal
    util_gpu_seconds: Decimal
    projects: int
    nodes_online: int | None
    complete: bool | None


async def centre_hours(conn: Connection, start: dt.datetime, end: dt.datetime) -> list[CentreHour]:
    rows = await conn.fetch(CENTRE_HOURS, start, end)
    return [
        CentreHour(
            hour_start=row["hour_start"],
            gpu_seconds=row["gpu_seconds"],
            util_gpu_seconds=row["util_gpu_seconds"],
            projects=row["projects"],
            nodes_online=row["nodes_online"],
            complete=row["complete"],
        )
        for row in rows
    ]


@dataclass(frozen=True)
class CapPoint:
    period: str
    status: str
    subsidy_hkd: Decimal
    cap_remaining_hkd: Decimal | None


@dataclass(frozen=True)
class CapHistory:
    project: Project
    points: list[CapPoint]


async def cap_histories(conn: Connection) -> list[CapHistory]:
    """Every project with a subsidy approval and its invoices in period order (drafts included),
    each invoice's subsidy less what credit notes returned to the cap."""
    rows = await conn.fetch(
        "SELECT p.*, i.period, i.status, i.subsidy_hkd - COALESCE(c.credited, 0) AS subsidy_hkd,"
        " i.subsidy_cap_remaining_hkd + COALESCE(c.credited, 0) AS subsidy_cap_remaining_hkd"
        " FROM projects p LEFT JOIN invoices i ON i.project_id = p.project_id"
        " LEFT JOIN (SELECT invoice_id, sum(subsidy_hkd) AS credited FROM credit_notes"
        "            GROUP BY 1) c ON c.invoice_id = i.invoice_id"
        " WHERE p.subsidy_scheme IS NOT NULL ORDER BY p.project_id, i.period"
    )
    histories: dict[str, CapHistory] = {}
    for row in rows:
        history = histories.get(row["project_id"])
        if history is None:
            history = histories[row["project_id"]] = CapHistory(project_from_row(row), [])
        if row["period"] is not None:
            history.points.append(
                CapPoint(
                    period=row["period"],
                    status=row["status"],
                    subsidy_hkd=row["subsidy_hkd"],
                    cap_remaining_hkd=row["subsidy_cap_remaining_hkd"],
                )
            )
    return list(histories.values())


async def known_periods(conn: Connection) -> list[tuple[str, bool]]:
    """(period, finalized) of every period with an invoice or a finalization, newest first."""
    rows = await conn.fetch(
        "SELECT period, bool_or(finalized) AS finalized FROM ("
        " SELECT DISTINCT period, false AS finalized FROM invoices"
        " UNION ALL SELECT period, true FROM finalized_periods) p"
        " GROUP BY period ORDER BY period DESC"
    )
    return [(row["period"], row["finalized"]) for row in rows]


async def project(conn: Connection, project_id: str) -> Project | None:
    row = await conn.fetchrow("SELECT * FROM projects WHERE project_id = $1", project_id)
    return None if row is None else project_from_row(row)
