"""PostgreSQL adapter (asyncpg): series state, the notification outbox, evaluator progress.

A state change and its outbox rows are written in one transaction; Kafka offsets are committed by
the caller only after it, so input is at-least-once and replays are absorbed by the state rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from schemas.alert import AlertEvent
from schemas.metering import ClusterMinute
from services.alerts.domain import (
    Dirty,
    NodeSeen,
    RejectedCount,
    SeriesState,
    StateChange,
    Watermark,
)
from services.common.db import RETRYABLE_DB_ERRORS, apply_migrations

# What the outbox loops wait out: the above, and any error PostgreSQL itself reports.
DB_ERRORS: tuple[type[Exception], ...] = (asyncpg.PostgresError, *RETRYABLE_DB_ERRORS)

MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATION_LOCK = 0x616C65727473  # pg_advisory_lock key: "alerts"


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    receiver: str
    fingerprint: str
    status: str
    event: AlertEvent
    attempts: int
    created_at: datetime | None = None


@dataclass(frozen=True)
class RejectedRow:
    """A notification a receiver refused for good; it is not sent again."""

    seq: int
    receiver: str
    fingerprint: str
    status: str  # of the alert: firing or resolved
    event: AlertEvent
    http_status: int | None
    error: str | None
    attempts: int
    created_at: datetime
    rejected_at: datetime


@dataclass(frozen=True)
class Loaded:
    states: list[SeriesState]
    pending_minutes: list[ClusterMinute]
    watermark: Watermark
    nodes: list[NodeSeen]


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def connect(cls, dsn: str, max_size: int = 5) -> Store:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=max_size, init=_init_connection)
        return cls(pool)

    async def close(self) -> None:
        await self.pool.close()

    async def migrate(self) -> list[str]:
        """Apply the versioned SQL files not applied yet, in name order; returns what it applied."""
        async with self.pool.acquire() as conn:
            return await apply_migrations(
                conn, MIGRATIONS, "alerts_schema_migrations", MIGRATION_LOCK, "alerts"
            )

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")

    # evaluator state ---------------------------------------------------------------------------
    async def load(self) -> Loaded:
        async with self.pool.acquire() as conn:
            state_rows = await conn.fetch("SELECT * FROM alert_states")
            minute_rows = await conn.fetch("SELECT payload FROM alert_cluster_minutes")
            mark = await conn.fetchrow("SELECT * FROM alert_watermark WHERE id = 1")
            node_rows = await conn.fetch("SELECT * FROM alert_nodes")
        return Loaded(
            states=[
                SeriesState(
                    fingerprint=r["fingerprint"],
                    rule=r["rule"],
                    labels=r["labels"],
                    status=r["status"],
                    pending_since=r["pending_since"],
                    starts_at=r["starts_at"],
                    ends_at=r["ends_at"],
                    last_value=r["last_value"],
                    last_observed_at=r["last_observed_at"],
                    last_active_at=r["last_active_at"],
                    keep_firing_since=r["keep_firing_since"],
                    last_notified_at=r["last_notified_at"],
                    annotations=r["annotations"],
                )
                for r in state_rows
            ],
            pending_minutes=[ClusterMinute.model_validate(r["payload"]) for r in minute_rows],
            watermark=Watermark(
                mark["max_minute_seen"],
                mark["last_evaluated_minute"],
                mark["last_evaluated_gpus_online"],
            )
            if mark
            else Watermark(),
            nodes=[
                NodeSeen(r["node"], r["last_received_at"], r["last_sample_time"]) for r in node_rows
            ],
        )

    async def apply(
        self, dirty: Dirty, watermark: Watermark, notifications: list[tuple[str, StateChange]]
    ) -> None:
        """Write one batch's effects atomically: states, minutes, nodes, watermark, outbox."""
        async with self.pool.acquire() as conn, conn.transaction():
            # Forgotten first: a series or node forgotten and seen again in one batch is upserted.
            if dirty.states_removed:
                await conn.execute(
                    "DELETE FROM alert_states WHERE fingerprint = ANY($1::text[])",
                    sorted(dirty.states_removed),
                )
            if dirty.nodes_removed:
                await conn.execute(
                    "DELETE FROM alert_nodes WHERE node = ANY($1::text[])",
                    sorted(dirty.nodes_removed),
                )
            if dirty.states:
                await conn.executemany(
                    """
                    INSERT INTO alert_states (fingerprint, rule, labels, annotations, status,
                        pending_since, starts_at, ends_at, last_value, last_observed_at,
                        last_active_at, last_notified_at, keep_firing_since, updated_at)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, now())
                    ON CONFLICT (fingerprint) DO UPDATE SET
                        annotations = EXCLUDED.annotations, status = EXCLUDED.status,
                        pending_since = EXCLUDED.pending_since, starts_at = EXCLUDED.starts_at,
                        ends_at = EXCLUDED.ends_at, last_value = EXCLUDED.last_value,
                        last_observed_at = EXCLUDED.last_observed_at,
                        last_active_at = EXCLUDED.last_active_at,
                        last_notified_at = EXCLUDED.last_notified_at,
                        keep_firing_since = EXCLUDED.keep_firing_since,
                        updated_at = CASE WHEN alert_states.status = EXCLUDED.status
                            THEN alert_states.updated_at ELSE now() END
                    """,
                    [
                        (
                            s.fingerprint,
                            s.rule,
                            s.labels,
                            s.annotations,
                            s.status,
                            s.pending_since,
                            s.starts_at,
                            s.ends_at,
                            s.last_value,
                            s.last_observed_at,
                            s.last_active_at,
                            s.last_notified_at,
                            s.keep_firing_since,
                        )
                        for s in dirty.states.values()
                    ],
                )
            if dirty.minutes_upserted:
                await conn.executemany(
                    """
                    INSERT INTO alert_cluster_minutes (minute_start, revision, payload)
                    VALUES ($1, $2, $3)
                    ON CONFLICT (minute_start) DO UPDATE
                        SET revision = EXCLUDED.revision, payload = EXCLUDED.payload
                        WHERE alert_cluster_minutes.revision < EXCLUDED.revision
                    """,
                    [
                        (start, m.revision, m.model_dump(mode="json"))
                        for start, m in dirty.minutes_upserted.items()
                    ],
                )
            if dirty.minutes_removed:
                await conn.execute(
                    "DELETE FROM alert_cluster_minutes WHERE minute_start = ANY($1::timestamptz[])",
                    sorted(dirty.minutes_removed),
                )
            if dirty.nodes:
                await conn.executemany(
                    """
                    INSERT INTO alert_nodes (node, last_received_at, last_sample_time)
                    VALUES ($1, $2, $3)
                    ON CONFLICT (node) DO UPDATE SET
                        last_received_at = GREATEST(alert_nodes.last_received_at, EXCLUDED.last_received_at),
                        last_sample_time = GREATEST(alert_nodes.last_sample_time, EXCLUDED.last_sample_time)
                    """,
                    [
                        (n.node, n.last_received_at, n.last_sample_time)
                        for n in dirty.nodes.values()
                    ],
                )
            if dirty.watermark_changed:
                await conn.execute(
                    """
                    INSERT INTO alert_watermark (id, max_minute_seen, last_evaluated_minute,
                        last_evaluated_gpus_online)
                    VALUES (1, $1, $2, $3)
                    ON CONFLICT (id) DO UPDATE SET max_minute_seen = EXCLUDED.max_minute_seen,
                        last_evaluated_minute = EXCLUDED.last_evaluated_minute,
                        last_evaluated_gpus_online = EXCLUDED.last_evaluated_gpus_online
                    """,
                    watermark.max_minute_seen,
                    watermark.last_evaluated_minute,
                    watermark.last_evaluated_gpus_online,
                )
            if notifications:
                await conn.executemany(
                    "INSERT INTO alert_outbox (receiver, fingerprint, status, event, notified_at)"
                    " VALUES ($1, $2, $3, $4, $5)"
                    " ON CONFLICT (receiver, fingerprint, status, notified_at) DO NOTHING",
                    [
                        (
                            receiver,
                            change.fingerprint,
                            change.status,
                            change.to_event().model_dump(mode="json"),
                            change.notified_at,
                        )
                        for receiver, change in notifications
                    ],
                )

    # outbox -------------------------------------------------------------------------------------
    async def undelivered(self, receiver: str, limit: int = 50) -> list[OutboxRow]:
        rows = await self.pool.fetch(
            """
            SELECT seq, receiver, fingerprint, status, event, attempts, created_at FROM alert_outbox
            WHERE receiver = $1 AND delivered_at IS NULL AND rejected_at IS NULL
            ORDER BY seq LIMIT $2
            """,
            receiver,
            limit,
        )
        return [
            OutboxRow(
                r["seq"],
                r["receiver"],
                r["fingerprint"],
                r["status"],
                AlertEvent.model_validate(r["event"]),
                r["attempts"],
                r["created_at"],
            )
            for r in rows
        ]

    async def mark_delivered(self, seq: int) -> None:
        await self.pool.execute(
            "UPDATE alert_outbox SET delivered_at = now(), attempts = attempts + 1 WHERE seq = $1",
            seq,
        )

    async def mark_failed(
        self, seq: int, error: str, *, rejected: bool, http_status: int | None = None
    ) -> None:
        await self.pool.execute(
            """
            UPDATE alert_outbox SET attempts = attempts + 1, last_error = $2,
                rejected_at = CASE WHEN $3 THEN now() ELSE rejected_at END,
                rejected_status = CASE WHEN $3 THEN $4::integer ELSE rejected_status END
            WHERE seq = $1
            """,
            seq,
            error[:2000],
            rejected,
            http_status,
        )

    async def rejected(
        self,
        *,
        within_s: float,
        receiver: str | None = None,
        limit: int = 500,
        project: str | None = None,
    ) -> list[RejectedRow]:
        """Notifications refused for good within the last `within_s` seconds, newest first
        (with `project`, only those of alerts labelled with it)."""
        rows = await self.pool.fetch(
            """
            SELECT seq, receiver, fingerprint, status, event, rejected_status, last_error,
                attempts, created_at, rejected_at
            FROM alert_outbox
            WHERE rejected_at IS NOT NULL
              AND rejected_at > now() - make_interval(secs => $1)
              AND ($2::text IS NULL OR receiver = $2)
              AND ($4::text IS NULL OR event->'labels'->>'project' = $4)
            ORDER BY rejected_at DESC, seq DESC
            LIMIT $3
            """,
            within_s,
            receiver,
            limit,
            project,
        )
        return [
            RejectedRow(
                seq=r["seq"],
                receiver=r["receiver"],
                fingerprint=r["fingerprint"],
                status=r["status"],
                event=AlertEvent.model_validate(r["event"]),
                http_status=r["rejected_status"],
                error=r["last_error"],
                attempts=r["attempts"],
                created_at=r["created_at"],
                rejected_at=r["rejected_at"],
            )
            for r in rows
        ]

    async def rejected_counts(
        self, *, within_s: float, excluding_rules: list[str]
    ) -> dict[str, RejectedCount]:
        """Per receiver: notifications refused for good within `within_s` seconds, leaving out
        those of `excluding_rules` (the rules that report rejections: a receiver refusing those
        must not keep them firing)."""
        rows = await self.pool.fetch(
            """
            SELECT receiver, count(*) AS rejected,
                (array_agg(rejected_status ORDER BY rejected_at DESC, seq DESC))[1] AS last_status
            FROM alert_outbox
            WHERE rejected_at IS NOT NULL
              AND rejected_at > now() - make_interval(secs => $1)
              AND NOT (event->>'rule' = ANY($2::text[]))
            GROUP BY receiver
            """,
            within_s,
            excluding_rules,
        )
        return {r["receiver"]: RejectedCount(r["rejected"], r["last_status"]) for r in rows}

    async def delete_finished_outbox(self, *, older_than_s: float, limit: int) -> int:
        """Delete up to `limit` notifications delivered or refused for good, made more than
        `older_than_s` seconds ago; returns how many. Undelivered ones are never deleted."""
        status = await self.pool.execute(
            """
            DELETE FROM alert_outbox WHERE seq IN (
                SELECT seq FROM alert_outbox
                WHERE (delivered_at IS NOT NULL OR rejected_at IS NOT NULL)
                  AND created_at < now() - make_interval(secs => $1)
                ORDER BY seq LIMIT $2)
            """,
            older_than_s,
            limit,
        )
        return int(status.split()[-1])

    async def outbox_depths(self) -> dict[str, int]:
        rows = await self.pool.fetch(
            "SELECT receiver, count(*) AS depth FROM alert_outbox"
            " WHERE delivered_at IS NULL AND rejected_at IS NULL GROUP BY receiver"
        )
        return {r["receiver"]: r["depth"] for r in rows}

    # read side ----------------------------------------------------------------------------------
    async def list_alerts(
        self,
        *,
        statuses: list[str],
        recent_s: float,
        fingerprint: str | None = None,
        limit: int = 500,
        project: str | None = None,
    ) -> list[dict[str, Any]]:
        """With `project`, only the alerts labelled with that project."""
        rows = await self.pool.fetch(
            """
            SELECT * FROM alert_states
            WHERE status = ANY($1::text[])
              AND (status <> 'resolved' OR updated_at > now() - make_interval(secs => $2))
              AND ($3::text IS NULL OR fingerprint = $3)
              AND ($5::text IS NULL OR labels->>'project' = $5)
            ORDER BY CASE status WHEN 'firing' THEN 0 WHEN 'pending' THEN 1 ELSE 2 END,
                     updated_at DESC
            LIMIT $4
            """,
            statuses,
            recent_s,
            fingerprint,
            limit,
            project,
        )
        return [dict(r) for r in rows]

    async def alertmanager_snapshot(
        self, resolved_within_s: float
    ) -> list[tuple[AlertEvent, datetime]]:
        """Firing alerts, and those resolved recently, with when the row last changed."""
        rows = await self.pool.fetch(
            """
            SELECT *, now() AS db_now FROM alert_states
            WHERE status = 'firing'
               OR (status = 'resolved' AND updated_at > now() - make_interval(secs => $1))
            ORDER BY fingerprint
            """,
            resolved_within_s,
        )
        return [
            (
                AlertEvent(
                    fingerprint=r["fingerprint"],
                    rule=r["rule"],
                    status=r["status"],
                    labels=r["labels"],
                    annotations=r["annotations"],
                    starts_at=r["starts_at"],
                    ends_at=r["ends_at"] if r["status"] == "resolved" else None,
                    value=float(r["last_value"]) if r["last_value"] is not None else None,
                ),
                r["db_now"],
            )
            for r in rows
            if r["starts_at"] is not None
        ]
