"""What billing and alerts share about PostgreSQL errors."""

from __future__ import annotations

import asyncpg

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
