"""What billing and alerts share about PostgreSQL errors."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import asyncpg

from services.common.retry import retry

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors after which the same operation may succeed on a fresh connection: PostgreSQL restarting
# or unreachable, a connection dropped under us, or a transaction PostgreSQL asks us to retry.
# Callers retry only idempotent work (upserts keyed by natural keys, whole transactions).
RETRYABLE_DB_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.TooManyConnectionsError,
    # A pooled connection whose server went away mid-operation can be left in a state asyncpg
    # refuses to use ("cannot switch to state ..."): the pool replaces it on the next try.
    asyncpg.exceptions.InternalClientError,
    ConnectionError,
    OSError,
    TimeoutError,
)


async def retry_db(
    call: Callable[[], Awaitable[T]],
    what: str,
    *,
    max_backoff_s: float = 5.0,
    initial_backoff_s: float = 0.1,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """Await `call()` until it succeeds, waiting out RETRYABLE_DB_ERRORS with doubling backoff (a
    restarting PostgreSQL); anything else propagates. `call` must be safe to run again."""
    return await retry(
        call,
        f"{what}: database unavailable",
        RETRYABLE_DB_ERRORS,
        initial_s=initial_backoff_s,
        max_s=max_backoff_s,
        on_retry=on_retry,
    )


async def apply_migrations(
    conn: asyncpg.Connection, folder: Path, table: str, lock_id: int, log_as: str
) -> list[str]:
    """Apply the `*.sql` files of `folder` not yet recorded in `table`, in name order, each in a
    transaction with its record; returns the versions (file stems) applied. An advisory lock
    (`lock_id`) keeps two starting processes from applying the same file twice. One runner for
    billing and alerts; each keeps its own table and lock."""
    await conn.execute("SELECT pg_advisory_lock($1)", lock_id)
    try:
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {table} ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row["version"] for row in await conn.fetch(f"SELECT version FROM {table}")}
        applied = []
        for path in sorted(folder.glob("[0-9]*.sql")):
            if path.stem in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute(f"INSERT INTO {table} (version) VALUES ($1)", path.stem)
            log.info("%s: applied migration %s", log_as, path.stem)
            applied.append(path.stem)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", lock_id)
