"""The thin slice through all three services, on a real broker and a real PostgreSQL:
samples -> metering -> hourly totals -> billing drafts -> GET /v1/invoices, and
cluster minutes -> alerts -> a webhook when allocation reaches 90%."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from gpumeter.localstack import free_port
from tests.fixtures.factories import usage
from tests.fixtures.kafka import produce
from tests.fixtures.processes import REPO_ROOT, ServiceProcess, wait_until

CATALOG = {
    "currency": "HKD",
    "rate_cards": [
        {"gpu_model": "H800", "hkd_per_gpu_hour": "26.00", "effective_from": "2026-01-01"}
    ],
    "projects": [
        {
            "id": "e2e-lab",
            "name": "E2E Lab",
            "subsidy": {
                "scheme": "AISS",
                "rate": "0.70",
                "cap_hkd": "1000000.00",
                "valid_from": "2026-01-01",
                "valid_to": "2026-12-31",
            },
        },
    ],
}
ADMIN, READER = "e2e-admin-token", "e2e-billing-token"


class Inbox:
    def __init__(self) -> None:
        self.bodies: list[dict] = []
        inbox = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                inbox.bodies.append(
                    json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                )
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/hook"


def money(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


@pytest.fixture
def stack(bootstrap_servers: str, database_url: str, topic_prefix: str, tmp_path: Path):
    inbox = Inbox()
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps(CATALOG))
    ports = {name: free_port() for name in ("metering", "billing", "alerts")}
    common = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers,
        "DATABASE_URL": database_url,
        "TOPIC_PREFIX": topic_prefix,
        "KAFKA_REBALANCE_TIMEOUT_MS": "3000",
        "USAGE_PARTITIONS": "4",
        "API_TOKENS": f"{ADMIN}=admin,{READER}=billing",
        "ALERT_RULES_FILE": str(REPO_ROOT / "deploy" / "alert-rules.yaml"),
        "ALERT_WEBHOOK_URL": inbox.url,
    }
    applied = subprocess.run(
        [sys.executable, "-m", "services.billing", "catalog", "apply", str(catalog)],
        env={**common, "PATH": "/usr/bin:/bin", "ALLOW_INSECURE_TOKENS": "true"},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert applied.returncode == 0, applied.stderr
    services = {
        name: ServiceProcess(
            f"services.{name}",
            {**common, "HTTP_PORT": str(port)},
            tmp_path / f"{name}.log",
            http_port=port,
        ).start()
        for name, port in ports.items()
    }
    yield services, ports, inbox
    for service in services.values():
        service.stop()


def test_known_samples_become_exact_invoices_either_side_of_hk_midnight_and_a_full_centre_alerts(
    stack, bootstrap_servers: str, topic_prefix: str
) -> None:
    services, ports, inbox = stack
    # Given one node whose 8 GPUs all run e2e-lab, sampled every 10 s from 15:55:10Z to 16:03:00Z
    # on 31 October (HK midnight is 16:00Z): 30 rounds start in October (HK), 18 in November
    start = datetime(2026, 10, 31, 15, 55, tzinfo=UTC)
    messages = []
    for i in range(1, 49):
        at = start + timedelta(seconds=10 * i)
        batch = [
            usage(
                "node-001",
                g,
                at,
                gpu_uuid=f"GPU-{g}",
                project_id="e2e-lab",
                job_id="slurm:7",
                util_pct=80.0,
                mem_used_mib=50000,
                power_w=500.0,
                temp_c=60,
            )
            for g in range(8)
        ]
        messages.append((b"node-001", json.dumps(batch).encode()))
    produce(bootstrap_servers, f"{topic_prefix}gpu.usage.v1", messages)

    # Then each period's draft invoice holds exactly docs/contracts.md §4's figures
    expected = {}
    for period, rounds in (("2026-10", 30), ("2026-11", 18)):
        gpu_seconds = Decimal(rounds * 8 * 10)
        gross = money(gpu_seconds / 3600 * Decimal("26.00"))
        subsidy = money(gross * Decimal("0.70"))
        expected[period] = (gpu_seconds, gross, subsidy, gross - subsidy)
    api = f"http://127.0.0.1:{ports['billing']}"
    headers = {"Authorization": f"Bearer {READER}"}

    def invoice_of(period: str) -> dict | None:
        response = httpx.get(f"{api}/v1/invoices", params={"period": period}, headers=headers)
        response.raise_for_status()
        body = response.json()
        invoices = body if isinstance(body, list) else body["invoices"]
        if len(invoices) == 1 and Decimal(invoices[0]["gross_hkd"]) == expected[period][1]:
            return invoices[0]
        return None

    for period, (gpu_seconds, gross, subsidy, net) in expected.items():
        invoice = wait_until(lambda p=period: invoice_of(p), 90, what=f"invoice for {period}")
        assert invoice["project_id"] == "e2e-lab" and invoice["status"] == "draft"
        assert invoice["currency"] == "HKD" and invoice["period"] == period
        assert (invoice["gross_hkd"], invoice["subsidy_hkd"], invoice["net_hkd"]) == (
            f"{gross:.2f}",
            f"{subsidy:.2f}",
            f"{net:.2f}",
        )
        [line] = invoice["lines"]
        assert (
            line["gpu_model"] == "H800"
            and line["subsidised"] is True
            and line["rate_hkd"] == "26.00"
        )
        assert Decimal(line["gpu_hours"]) == (gpu_seconds / 3600).quantize(
            Decimal("0.000001"), ROUND_HALF_UP
        )
        assert line["amount_hkd"] == f"{gross:.2f}"

    # And the centre at 100% allocation for more than 5 minutes of event time fires the 90% alert
    def allocation_alert() -> dict | None:
        for body in inbox.bodies:
            for alert in body.get("alerts", []):
                if (
                    alert["status"] == "firing"
                    and "alloc" in alert["labels"].get("alertname", "").lower()
                ):
                    return alert
        return None

    alert = wait_until(allocation_alert, 90, what="allocation alert at the webhook")
    assert alert["labels"]["severity"] in {"warning", "critical"}
    assert inbox.bodies[0]["version"] == "4"
