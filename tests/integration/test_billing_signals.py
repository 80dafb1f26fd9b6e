"""Billing signals, hour completeness and the FOCUS export, on the real broker and PostgreSQL."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer

from schemas.metering import HourCompleteness, HourlyTotal
from services.billing import catalog as catalog_files
from services.billing import cli, service, store
from services.common.kafka_admin import ensure_topics
from tests.fixtures.billing import billing_process
from tests.fixtures.kafka import latest_json_by_key, produce, read_topic
from tests.fixtures.processes import ServiceProcess, wait_until

UTC = dt.UTC
ADMIN = {"Authorization": "Bearer adm-token"}
PROJECT = {"Authorization": "Bearer llm-token"}
CATALOG = """
currency: HKD
rate_cards:
  - {gpu_model: H800, hkd_per_gpu_hour: "26.00", effective_from: 2026-01-01}
projects:
  - id: hkgai-llm
    name: LLM
    subsidy: {scheme: AISS, rate: "0.70", cap_hkd: "1000.00", valid_from: 2026-01-01, valid_to: 2026-12-31}
  - id: commercial-partner
    name: No subsidy
"""
PRICED_B200 = CATALOG.replace(
    "rate_cards:\n",
    'rate_cards:\n  - {gpu_model: B200, hkd_per_gpu_hour: "40.00", effective_from: 2026-01-01}\n',
)
# 2026-11-02 00:00 and 01:00 HKT.
HOUR_1 = dt.datetime(2026, 11, 1, 16, tzinfo=UTC)
HOUR_2 = dt.datetime(2026, 11, 1, 17, tzinfo=UTC)
HOUR_3 = dt.datetime(2026, 11, 1, 18, tzinfo=UTC)


def hourly(
    project_id: str, gpu_model: str, hour: dt.datetime, gpu_seconds: str, revision: int = 1
) -> HourlyTotal:
    return HourlyTotal(
        project_id=project_id,
        gpu_model=gpu_model,
        hour_start=hour,
        gpu_seconds=Decimal(gpu_seconds),
        util_gpu_seconds=Decimal(gpu_seconds),
        energy_wh=Decimal("10"),
        samples=revision,
        revision=revision,
    )


def completeness(
    hour: dt.datetime, complete: bool, revision: int, missing: list[str] | None = None
) -> HourCompleteness:
    return HourCompleteness(
        hour_start=hour,
        nodes_online=4,
        nodes_through=4 - len(missing or []),
        missing_nodes=missing or [],
        complete=complete,
        revision=revision,
    )


def send(bootstrap: str, topic: str, records: list[HourlyTotal] | list[HourCompleteness]) -> None:
    produce(
        bootstrap,
        topic,
        [
            (
                (r.key if isinstance(r, HourlyTotal) else r.hour_start.isoformat()).encode(),
                r.model_dump_json().encode(),
            )
            for r in records
        ],
    )


@pytest.fixture
def billing_service(
    database_url: str,
    bootstrap_servers: str,
    topic_prefix: str,
    http_port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[ServiceProcess]:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG)
    process = billing_process(
        bootstrap_servers,
        database_url,
        topic_prefix,
        http_port,
        tmp_path / "billing.log",
        monkeypatch,
        catalog=catalog,
        hourly_partitions=None,
        API_TOKENS="adm-token=admin,llm-token=project:hkgai-llm",
        PROVIDER_NAME="HK GPU Centre",
    ).start()
    yield process
    process.stop()


def assert_focus_reconciles(focus_text: str, invoices: list[dict]) -> None:
    """BilledCost per invoice sums to its net, to the cent; usage and adjustments to its gross."""
    billed: dict[str, Decimal] = defaultdict(Decimal)
    charged: dict[str, Decimal] = defaultdict(Decimal)
    credits: dict[str, Decimal] = defaultdict(Decimal)
    for row in csv.DictReader(io.StringIO(focus_text)):
        cost = Decimal(row["BilledCost"])
        billed[row["InvoiceId"]] += cost
        if row["ChargeCategory"] == "Credit":
            credits[row["InvoiceId"]] += cost
        else:
            charged[row["InvoiceId"]] += cost
        assert row["BillingCurrency"] == "HKD"
        assert row["ProviderName"] == row["InvoiceIssuerName"] == "HK GPU Centre"
    assert set(billed) == {invoice["invoice_id"] for invoice in invoices}
    for invoice in invoices:
        assert billed[invoice["invoice_id"]] == Decimal(invoice["net_hkd"])
        assert charged[invoice["invoice_id"]] == Decimal(invoice["gross_hkd"])
        assert -credits[invoice["invoice_id"]] == Decimal(invoice["subsidy_hkd"])
    assert sum(billed.values()) == sum(Decimal(invoice["net_hkd"]) for invoice in invoices)


def test_signals_completeness_watermarks_and_focus_export_follow_the_invoices(
    billing_service: ServiceProcess,
    bootstrap_servers: str,
    topic_prefix: str,
    http_port: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hourly_topic = f"{topic_prefix}metering.usage.hourly.v1"
    completeness_topic = f"{topic_prefix}metering.completeness.v1"
    signals_topic = f"{topic_prefix}billing.signals.v1"
    client = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10)

    # Given usage of a priced and an unpriced model, and completeness for two of its three hours
    send(
        bootstrap_servers,
        hourly_topic,
        [
            hourly("hkgai-llm", "H800", HOUR_1, "36000"),  # 10 h x 26 = 260.00, subsidy 182.00
            hourly("hkgai-llm", "H800", HOUR_2, "18000"),  # 5 h x 26 = 130.00, subsidy 91.00
            hourly("hkgai-llm", "B200", HOUR_2, "7200"),  # 2 h, no rate
            hourly("commercial-partner", "B200", HOUR_3, "3600"),  # 1 h, no rate
        ],
    )
    send(
        bootstrap_servers,
        completeness_topic,
        [
            completeness(HOUR_1, True, revision=1),
            completeness(HOUR_2, False, revision=2, missing=["node-07"]),
            completeness(HOUR_2, True, revision=1),  # stale: the higher revision wins
        ],
    )

    # Then billing publishes subsidy usage and unpriced usage for the alerts service
    def signals_show_usage(messages: list) -> bool:
        latest = latest_json_by_key(messages)
        return (
            latest.get("subsidy|hkgai-llm", {}).get("used_hkd") == "273.00"
            and latest.get("unpriced|B200|2026-11", {}).get("gpu_hours") == "3.000000"
        )

    latest = latest_json_by_key(read_topic(bootstrap_servers, signals_topic, signals_show_usage))
    assert latest["subsidy|hkgai-llm"] | {"as_of": None} == {
        "kind": "subsidy_usage",
        "project_id": "hkgai-llm",
        "scheme": "AISS",
        "cap_hkd": "1000.00",
        "used_hkd": "273.00",
        "used_ratio": "0.273000",
        "as_of": None,
        # the forecast: this usage is older than the trailing 7 days, so nothing burns now
        "burn_hkd_per_day": "0",
        "exhausted_on": None,
        "approval_ends_on": "2026-12-31",
        "days_left": None,
    }
    assert latest["unpriced|B200|2026-11"]["projects"] == ["commercial-partner", "hkgai-llm"]
    assert "subsidy|commercial-partner" not in latest

    # And the period's completeness names the incomplete hour and the unreported one
    def period_completeness() -> dict:
        body = client.get("/v1/periods/2026-11/completeness", headers=ADMIN).json()
        return body if body.get("incomplete_hours") and body["complete_hours"] == 1 else {}

    found = wait_until(period_completeness, 30, what="completeness of 2026-11")
    assert found["status"] == "incomplete"
    assert found["hours_with_usage"] == 3
    assert found["incomplete_hours"][0]["missing_nodes"] == ["node-07"]
    assert [dt.datetime.fromisoformat(h) for h in found["unknown_hours"]] == [HOUR_3]
    listing = client.get("/v1/invoices", params={"period": "2026-11"}, headers=PROJECT).json()
    assert listing["completeness"] == {
        "status": "incomplete",
        "hours_with_usage": 3,
        "complete_hours": 1,
        "incomplete_hours": 1,
        "unknown_hours": 1,
    }
    assert client.get("/v1/periods/2026-11/completeness", headers=PROJECT).status_code == 403

    # When finalization is asked while an hour is incomplete, it is refused naming the hour
    refused = client.post("/v1/periods/2026-11/finalize", headers=ADMIN)
    assert refused.status_code == 409
    assert refused.json()["error"] == "incomplete_hours"
    assert refused.json()["detail"]["incomplete_hours"][0]["hour_start"].startswith(
        "2026-11-01T17:00:00"
    )

    # When metering completes the hour, finalization is refused only for the unpriced model
    send(bootstrap_servers, completeness_topic, [completeness(HOUR_2, True, revision=3)])
    wait_until(
        lambda: (
            client.get("/v1/periods/2026-11/completeness", headers=ADMIN).json()["status"]
            == "unknown"
        ),
        30,
        what="hour 2 complete",
    )
    assert client.post("/v1/periods/2026-11/finalize", headers=ADMIN).json()["error"] == (
        "unpriced_usage"
    )

    # When B200 gets a rate, the unpriced signal drops to zero so the alert resolves
    applied = client.put(
        "/v1/catalog",
        headers=ADMIN,
        json=catalog_files.parse_catalog(PRICED_B200).model_dump(mode="json"),
    )
    assert applied.status_code == 200, applied.text
    latest = latest_json_by_key(
        read_topic(
            bootstrap_servers,
            signals_topic,
            lambda messages: (
                latest_json_by_key(messages)["unpriced|B200|2026-11"]["gpu_hours"] == "0.000000"
            ),
        )
    )
    assert latest["unpriced|B200|2026-11"]["projects"] == []
    # 260 + 130 + 80 = 470.00 subsidised at 0.70 = 329.00
    assert latest["subsidy|hkgai-llm"]["used_hkd"] == "329.00"

    # Then the FOCUS export of the finalized period reconciles to the invoices to the cent
    finalized = client.post("/v1/periods/2026-11/finalize", headers=ADMIN)
    assert finalized.status_code == 200, finalized.text
    invoices = client.get("/v1/invoices", params={"period": "2026-11"}, headers=ADMIN).json()
    assert [invoice["net_hkd"] for invoice in invoices["invoices"]] == ["40.00", "141.00"]
    export = client.get("/v1/exports/focus", params={"period": "2026-11"}, headers=ADMIN)
    assert export.status_code == 200
    assert export.headers["content-type"].startswith("text/csv")
    assert_focus_reconciles(export.text, invoices["invoices"])
    assert client.get("/v1/exports/focus?period=2026-11", headers=PROJECT).status_code == 403
    assert client.get("/v1/exports/focus?period=2026-13", headers=ADMIN).status_code == 400

    out_file = tmp_path / "focus.csv"
    capsys.readouterr()
    assert cli.main(["invoices", "export", "--period", "2026-11", "--format", "focus"]) == 0
    assert capsys.readouterr().out == export.text
    assert (
        cli.main(
            [
                "invoices",
                "export",
                "--period",
                "2026-11",
                "--format",
                "focus",
                "--out",
                str(out_file),
            ]
        )
        == 0
    )
    assert_focus_reconciles(out_file.read_text(), invoices["invoices"])


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    await store.migrate(database_url)
    connection = await asyncpg.connect(database_url)
    await catalog_files.apply_catalog(connection, catalog_files.parse_catalog(CATALOG))
    yield connection
    await connection.close()


async def test_signals_wait_in_the_outbox_while_kafka_is_down_and_go_out_once_it_is_back(
    conn: asyncpg.Connection, bootstrap_servers: str, topic_prefix: str
) -> None:
    # Given a batch that changes the subsidy used, and a broker that refuses every send
    await service.apply_hourly_batch(conn, [hourly("hkgai-llm", "H800", HOUR_1, "3600")])

    async def broken_send(key: str, value: bytes) -> None:
        raise ConnectionError("broker down")

    # When publishing fails, the signal stays pending
    with pytest.raises(ConnectionError):
        await service.publish_signals(conn, broken_send)
    assert [row["key"] for row in await store.pending_signals(conn)] == ["subsidy|hkgai-llm"]

    # Then a later publish to the real broker sends it and clears the outbox
    topic = f"{topic_prefix}billing.signals.v1"
    await ensure_topics(bootstrap_servers, {topic: 1}, compacted={topic})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers)
    await producer.start()
    try:

        async def kafka_send(key: str, value: bytes) -> None:
            await producer.send_and_wait(topic, key=key.encode(), value=value)

        assert await service.publish_signals(conn, kafka_send) == 1
    finally:
        await producer.stop()
    assert await store.pending_signals(conn) == []
    messages = await asyncio.to_thread(read_topic, bootstrap_servers, topic, bool)
    assert json.loads(messages[0].value)["used_hkd"] == "18.20"  # 26.00 x 0.70

    # And an unchanged recompute publishes nothing new
    await service.apply_hourly_batch(conn, [hourly("hkgai-llm", "H800", HOUR_1, "3600")])
    async with conn.transaction():
        assert await service.refresh_signals(conn) == 0
    assert await store.pending_signals(conn) == []
