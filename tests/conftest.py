"""One broker and one PostgreSQL per test session; each test gets its own topics and database."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from gpumeter.kafkabroker import KafkaCluster
from gpumeter.localstack import EmbeddedPostgres, TansuBroker, free_port
from tests.fixtures.oidc import idp  # noqa: F401 - a fixture, for every test
from tests.fixtures.secure_kafka import secure_kafka  # noqa: F401 - a fixture, for every test
from tests.fixtures.slurm import slurm, slurm_cluster  # noqa: F401 - fixtures, for every test

# The tests' API tokens are short and readable; every service under test accepts them only because
# this says so (tests/unit/test_billing_edges.py proves the refusal without it).
os.environ["ALLOW_INSECURE_TOKENS"] = "true"


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gpumeter")


# The brokers the broker-facing tests run on, each test once per broker: GPUMETER_TEST_BROKERS,
# a comma-separated list of `tansu` (Tansu, memory only) and `kafka` (Apache Kafka in KRaft mode,
# its jars fetched from Maven Central once: see gpumeter/kafkabroker.py); both unless it says.
# With KAFKA_BOOTSTRAP_SERVERS set, the broker it names, once.
TEST_BROKERS = ("tansu", "kafka")
BROKERS = [b.strip() for b in os.environ.get("GPUMETER_TEST_BROKERS", "tansu,kafka").split(",")]
if not BROKERS or any(broker not in TEST_BROKERS for broker in BROKERS):
    raise pytest.UsageError(
        f"GPUMETER_TEST_BROKERS={os.environ.get('GPUMETER_TEST_BROKERS')!r}: "
        f"name one or more of {', '.join(TEST_BROKERS)}, separated by commas"
    )
if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
    if "GPUMETER_TEST_BROKERS" not in os.environ:
        BROKERS = ["external"]  # the one broker it names
    elif len(BROKERS) > 1:
        raise pytest.UsageError(
            "KAFKA_BOOTSTRAP_SERVERS names one broker: GPUMETER_TEST_BROKERS would run every test "
            "on it once per name; name one broker or unset KAFKA_BOOTSTRAP_SERVERS"
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that talks to a broker, so `-m broker` selects them (make test-kafka)."""
    for item in items:
        if "bootstrap_servers" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.broker)


@pytest.fixture(scope="session", params=BROKERS)
def broker_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def bootstrap_servers(workdir: Path, broker_kind: str) -> Iterator[str]:
    """KAFKA_BOOTSTRAP_SERVERS names an existing broker; otherwise the session's broker is
    started (Tansu, or a one-node Apache Kafka)."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    if broker_kind == "kafka":
        cluster = KafkaCluster(workdir / "kafka").start()
        yield cluster.bootstrap_servers
        cluster.stop()
        return
    broker = TansuBroker(workdir / "tansu.log").start()
    yield broker.bootstrap_servers
    broker.stop()


@pytest.fixture(scope="session")
def postgres_server(workdir: Path) -> Iterator[EmbeddedPostgres | None]:
    if os.environ.get("DATABASE_URL"):
        yield None
        return
    # Not under pytest's temp root: a concurrent pytest run prunes old temp folders there. (As root,
    # PostgreSQL runs in a user namespace, so a mode-0700 folder like mkdtemp's is fine.)
    data_root = Path(tempfile.mkdtemp(prefix="gpumeter-pg-"))
    server = EmbeddedPostgres(data_root / "pgdata").start()
    yield server
    server.stop()
    shutil.rmtree(data_root, ignore_errors=True)


@pytest.fixture(scope="session")
def admin_dsn(postgres_server: EmbeddedPostgres | None) -> str:
    return postgres_server.dsn() if postgres_server else os.environ["DATABASE_URL"]


@pytest.fixture
def database_url(admin_dsn: str) -> Iterator[str]:
    """A fresh, empty database for this test."""
    name = f"t_{uuid.uuid4().hex[:12]}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    base = admin_dsn.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def topic_prefix() -> str:
    """Topics, consumer groups and Faust app ids of this test start with this."""
    return f"t{uuid.uuid4().hex[:8]}."


@pytest.fixture
def http_port() -> int:
    return free_port()
