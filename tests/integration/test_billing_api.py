"""`python -m services.billing` as a real process: HTTP API, auth, finalization, publication, CLI."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import signal
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer
from pypdf import PdfReader

from schemas.metering import JobHourlyTotal
from services.billing import cli
from services.billing.domain import HONG_KONG
from tests.fixtures.billing import SAMPLE_CATALOG, billing_process, hourly, produce_hourly
from tests.fixtures.kafka import topic_partitions
from tests.fixtures.processes import ServiceProcess, wait_until

UTC = dt.UTC
TOKENS = (
    "adm-token=admin,bill-token=billing,llm-token=project:hkgai-llm,cv-token=project:hku-vision-lab"
)
ADMIN = {"Authorization": "Bearer adm-token"}
BILLING = {"Authorization": "Bearer bill-token"}
LLM = {"Authorization": "Bearer llm-token"}
VISION = {"Authorization": "Bearer cv-token"}


def read_topic(bootstrap_servers: str, topic: str, timeout_s: float = 20.0) -> dict[str, dict]:
    """Every message on the topic so far, by key (no consumer group)."""

    async def run() -> dict[str, dict]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            assigned = await topic_partitions(consumer, topic)
            consumer.assign(assigned)
            await consumer.seek_to_beginning(*assigned)
            ends = await consumer.end_offsets(assigned)
            found: dict[str, dict] = {}
            async with asyncio.timeout(timeout_s):
                while [tp for tp in assigned if await consumer.position(tp) < ends[tp]]:
                    for records in (await consumer.getmany(timeout_ms=500)).values():
                        for record in records:
                            found[record.key.decode()] = json.loads(record.value)
            return found
        finally:
            await consumer.stop()

    return asyncio.run(run())


@pytest.fixture
def billing_service(
    database_url: str,
    bootstrap_servers: str,
    topic_prefix: str,
    http_port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[ServiceProcess]:
    service = billing_process(
        bootstrap_servers,
        database_url,
        topic_prefix,
        http_port,
        tmp_path / "billing.log",
        monkeypatch,
        API_TOKENS=TOKENS,
    ).start()
    yield service
    service.stop()


def api(http_port: int) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10)


def assert_error(response: httpx.Response, status: int, error: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    if error is not None:
        assert body["error"] == error, body
    return body


def test_api_answers_with_exact_invoices_and_json_errors_for_every_refusal(
    billing_service: ServiceProcess, bootstrap_servers: str, topic_prefix: str, http_port: int
) -> None:
    hour = dt.datetime(2026, 11, 12, 1, tzinfo=UTC)
    produce_hourly(
        bootstrap_servers,
        f"{topic_prefix}metering.usage.hourly.v1",
        [
            hourly("hkgai-llm", hour, "3600", 1),
            hourly("hkgai-llm", hour, "7200", 2),  # two H800 hours by revision 2
            hourly("hkgai-llm", hour, "900", 1, gpu_model="A100"),
            hourly("hku-vision-lab", hour, "1800", 1, gpu_model="H100"),
        ],
    )
    with api(http_port) as client:
        llm = wait_until(
            lambda: (
                (r := client.get("/v1/invoices/INV-2026-11-hkgai-llm", headers=LLM)).status_code
                == 200
                and r.json()["gross_hkd"] == "55.25"
                and r.json()
            ),
            timeout_s=30,
            what="hkgai-llm's November invoice",
        )
        # 2 h * 26.00 = 52.00; 0.25 h * 13.00 = 3.25; subsidy 0.70 * 55.25 = 38.675 -> 38.68
        assert llm == {
            "invoice_id": "INV-2026-11-hkgai-llm",
            "project_id": "hkgai-llm",
            "period": "2026-11",
            "currency": "HKD",
            "status": "draft",
            "lines": [
                {
                    "gpu_model": "A100",
                    "gpu_hours": "0.250000",
                    "rate_hkd": "13.00",
                    "subsidised": True,
                    "amount_hkd": "3.25",
                    "adjustment_for_period": None,
                },
                {
                    "gpu_model": "H800",
                    "gpu_hours": "2.000000",
                    "rate_hkd": "26.00",
                    "subsidised": True,
                    "amount_hkd": "52.00",
                    "adjustment_for_period": None,
                },
            ],
            "gross_hkd": "55.25",
            "subsidy_hkd": "38.68",
            "net_hkd": "16.57",
            "subsidy_cap_remaining_hkd": "29999961.32",
            "flags": [],
            "invoice_number": None,  # drafts have no number or dates
            "issued_on": None,
            "due_on": None,
        }

        # authentication: none or unknown -> 401; authorization: wrong role or project -> 403
        assert_error(client.get("/v1/invoices/INV-2026-11-hkgai-llm"), 401, "unauthorized")
        assert_error(
            client.get(
                "/v1/invoices/INV-2026-11-hkgai-llm", headers={"Authorization": "Bearer nope"}
            ),
            401,
        )
        assert_error(
            client.get("/v1/invoices/INV-2026-11-hkgai-llm", headers=VISION), 403, "forbidden"
        )
        assert_error(
            client.get("/v1/invoices?period=2026-11&project_id=hkgai-llm", headers=VISION), 403
        )
        assert_error(client.get("/v1/projects/hkgai-llm/usage", headers=VISION), 403)
        assert_error(client.post("/v1/periods/2026-11/finalize", headers=BILLING), 403)
        assert_error(client.get("/v1/subsidy/report?period=2026-11", headers=LLM), 403)
        assert_error(client.get("/v1/catalog", headers=LLM), 403)
        # bad input -> 4xx JSON, never 500
        assert_error(
            client.get("/v1/invoices?period=2026-13", headers=BILLING), 400, "invalid_period"
        )
        assert_error(client.get("/v1/invoices", headers=BILLING), 422, "invalid_request")
        assert_error(client.post("/v1/periods/november/finalize", headers=ADMIN), 400)
        assert_error(client.post("/v1/periods/2026-11/finalize?force=maybe", headers=ADMIN), 422)
        assert_error(client.get("/v1/projects/hkgai-llm/usage?from=yesterday", headers=LLM), 422)
        assert_error(client.get("/v1/invoices/INV-nope", headers=BILLING), 404, "not_found")
        assert_error(client.get("/v1/nowhere", headers=BILLING), 404)
        assert_error(client.put("/v1/catalog", headers=ADMIN, json={"currency": "USD"}), 422)

        # a project token sees only its own invoices; billing sees all
        own = client.get("/v1/invoices?period=2026-11", headers=LLM).json()["invoices"]
        assert [i["invoice_id"] for i in own] == ["INV-2026-11-hkgai-llm"]
        every = client.get("/v1/invoices?period=2026-11", headers=BILLING).json()["invoices"]
        assert [i["invoice_id"] for i in every] == [
            "INV-2026-11-hkgai-llm",
            "INV-2026-11-hku-vision-lab",
        ]

        csv_text = client.get("/v1/invoices/INV-2026-11-hkgai-llm.csv", headers=LLM).text
        assert csv_text.splitlines()[0].startswith("invoice_id,project_id,period,status,record")
        assert "INV-2026-11-hkgai-llm,hkgai-llm,2026-11,draft,net,,,,,16.57," in csv_text

        usage = client.get(
            "/v1/projects/hkgai-llm/usage?from=2026-11-12T00:00:00Z&to=2026-11-12T02:00:00%2B00:00",
            headers=LLM,
        ).json()
        assert [(h["gpu_model"], h["gpu_seconds"], h["revision"]) for h in usage["hours"]] == [
            ("A100", "900", 1),
            ("H800", "7200", 2),
        ]

        report = client.get("/v1/subsidy/report?period=2026-11", headers=BILLING).json()
        rows = {row["project_id"]: row for row in report["projects"]}
        assert rows["hkgai-llm"]["subsidised_gpu_hours"] == "2.250000"
        assert rows["hkgai-llm"]["cap_remaining_hkd"] == "29999961.32"
        # hku-vision-lab: 0.5 h * 28.00 = 14.00, subsidy 9.80 of a 4000000.00 cap
        assert (
            rows["hku-vision-lab"]["subsidy_hkd"],
            rows["hku-vision-lab"]["cap_remaining_hkd"],
        ) == (
            "9.80",
            "3999990.20",
        )
        assert rows["startup-legaltech"]["subsidy_hkd"] == "0.00"
        assert report["totals"] == {
            "subsidised_gpu_hours": "2.750000",
            "subsidy_hkd": "48.48",
            "credited_subsidy_hkd": "0.00",
        }

        catalog = client.get("/v1/catalog", headers=BILLING).json()
        assert len(catalog["projects"]) == 12 and catalog["currency"] == "HKD"
        assert client.get("/openapi.json").json()["paths"]["/v1/periods/{period}/finalize"]
        metrics_text = client.get("/metrics").text
        assert "billing_hourly_records_total" in metrics_text
        assert client.get("/healthz").json()["status"] == "ok"

    # and SIGTERM stops the service cleanly
    assert billing_service.process is not None
    billing_service.process.send_signal(signal.SIGTERM)
    assert billing_service.process.wait(20) == 0


def test_finalized_invoices_are_published_frozen_and_late_usage_becomes_an_adjustment(
    billing_service: ServiceProcess,
    bootstrap_servers: str,
    topic_prefix: str,
    http_port: int,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    hourly_topic = f"{topic_prefix}metering.usage.hourly.v1"
    last_november_hour = dt.datetime(2026, 11, 30, 15, tzinfo=UTC)  # HK 23:00, 30 November
    produce_hourly(
        bootstrap_servers,
        hourly_topic,
        [
            hourly("polyu-climate", last_november_hour, "36000", 1),  # 10 h, rate 0.90
            hourly("polyu-climate", last_november_hour, "1800", 1, gpu_model="MI300X"),  # no rate
        ],
    )
    with api(http_port) as client:
        wait_until(
            lambda: (
                client.get("/v1/invoices/INV-2026-11-polyu-climate", headers=BILLING).status_code
                == 200
            ),
            timeout_s=30,
            what="the polyu-climate invoice",
        )
        # finalization refuses unpriced usage, saying why
        refused = assert_error(client.post("/v1/periods/2026-11/finalize", headers=ADMIN), 409)
        assert refused["error"] == "unpriced_usage"
        assert refused["detail"]["unpriced_models"] == {"INV-2026-11-polyu-climate": ["MI300X"]}

        forced = client.post("/v1/periods/2026-11/finalize?force=true", headers=ADMIN)
        assert forced.status_code == 200, forced.text
        frozen = client.get("/v1/invoices/INV-2026-11-polyu-climate", headers=BILLING).json()
        issued_on = dt.date.fromisoformat(frozen["issued_on"])  # today in Hong Kong
        assert abs(issued_on - dt.datetime.now(HONG_KONG).date()) <= dt.timedelta(days=1)
        assert forced.json() == {
            "period": "2026-11",
            "invoice_ids": ["INV-2026-11-polyu-climate"],
            "forced": True,
            "invoice_numbers": [f"AISC-{issued_on.year}-000001"],  # the year's first
        }
        assert_error(
            client.post("/v1/periods/2026-11/finalize", headers=ADMIN),
            409,
            "period_already_finalized",
        )
        frozen = client.get("/v1/invoices/INV-2026-11-polyu-climate", headers=BILLING).json()
        # 10 h * 26.00 = 260.00; subsidy 0.90 -> 234.00
        assert (
            frozen["status"],
            frozen["gross_hkd"],
            frozen["subsidy_hkd"],
            frozen["net_hkd"],
        ) == ("finalized", "260.00", "234.00", "26.00")
        assert frozen["invoice_number"] == f"AISC-{issued_on.year}-000001"
        assert frozen["issued_on"] == issued_on.isoformat()
        assert frozen["due_on"] == (issued_on + dt.timedelta(days=30)).isoformat()

        # the finalized invoice is published on the invoices topic, keyed by its id
        invoices_topic = f"{topic_prefix}billing.invoices.v1"
        published = wait_until(
            lambda: read_topic(bootstrap_servers, invoices_topic).get("INV-2026-11-polyu-climate"),
            timeout_s=30,
            what="the published invoice",
        )
        assert published == frozen

        # when 30 more minutes of November arrive late
        produce_hourly(
            bootstrap_servers,
            hourly_topic,
            [hourly("polyu-climate", last_november_hour, "37800", 2)],
        )
        december = wait_until(
            lambda: (
                (
                    r := client.get("/v1/invoices/INV-2026-12-polyu-climate", headers=BILLING)
                ).status_code
                == 200
                and r.json()
            ),
            timeout_s=30,
            what="December's adjustment",
        )
        # then December carries it as an adjustment for November, and November is untouched
        assert [
            (ln["adjustment_for_period"], ln["gpu_hours"], ln["amount_hkd"])
            for ln in december["lines"]
        ] == [("2026-11", "0.500000", "13.00")]
        assert (december["gross_hkd"], december["subsidy_hkd"], december["net_hkd"]) == (
            "13.00",
            "11.70",
            "1.30",
        )
        assert (
            client.get("/v1/invoices/INV-2026-11-polyu-climate", headers=BILLING).json() == frozen
        )

    # the CLI reads the same invoices
    capsys.readouterr()
    assert cli.main(["invoices", "list", "--period", "2026-12"]) == 0
    assert "INV-2026-12-polyu-climate" in capsys.readouterr().out
    assert cli.main(["invoices", "show", "INV-2026-11-polyu-climate"]) == 0
    assert json.loads(capsys.readouterr().out) == frozen
    out = tmp_path / "export.json"
    assert (
        cli.main(
            ["invoices", "export", "--period", "2026-11", "--format", "json", "--out", str(out)]
        )
        == 0
    )
    assert json.loads(out.read_text()) == [frozen]
    assert cli.main(["invoices", "export", "--period", "2026-12", "--format", "csv"]) == 0
    assert ",line,H800,0.500000,26.00,true,13.00,2026-11" in capsys.readouterr().out
    assert cli.main(["periods", "finalize", "2026-11"]) == 1
    assert "already finalized" in capsys.readouterr().err
    assert cli.main(["periods", "finalize", "2026-12"]) == 0
    assert "1 invoices finalized" in capsys.readouterr().out
    assert cli.main(["catalog", "apply", str(SAMPLE_CATALOG)]) == 0
    assert "catalog unchanged" in capsys.readouterr().out
    assert cli.main(["invoices", "show", "INV-nope"]) == 1
    assert cli.main(["invoices", "list", "--period", "2026-1"]) == 1


def test_a_credit_note_over_http_is_admins_numbered_listed_for_its_project_and_audited(
    billing_service: ServiceProcess, bootstrap_servers: str, topic_prefix: str, http_port: int
) -> None:
    hour = dt.datetime(2026, 10, 6, 2, tzinfo=UTC)
    produce_hourly(
        bootstrap_servers,
        f"{topic_prefix}metering.usage.hourly.v1",
        [hourly("hkgai-llm", hour, "36000", 1), hourly("hkgai-llm", hour, "3600", 1, "A100")],
    )
    path = "/v1/invoices/INV-2026-10-hkgai-llm/credit-notes"
    with api(http_port) as client:
        wait_until(
            lambda: (
                client.get("/v1/invoices/INV-2026-10-hkgai-llm", headers=LLM).status_code == 200
            ),
            timeout_s=30,
            what="October's draft",
        )
        # a draft is not credited; a finalized one is, by an admin only
        assert_error(
            client.post(path, json={"reason": "early"}, headers=ADMIN), 409, "credit_refused"
        )
        finalized = client.post("/v1/periods/2026-10/finalize", headers=ADMIN)
        assert finalized.status_code == 200, finalized.text
        for who in (BILLING, LLM):
            assert_error(client.post(path, json={"reason": "x"}, headers=who), 403, "forbidden")
        assert_error(client.post(path, json={"lines": [1]}, headers=ADMIN), 422)  # no reason
        assert_error(client.post(path, json={"reason": "x", "lines": [9]}, headers=ADMIN), 409)
        created = client.post(
            path, json={"reason": "A100 hours belonged to a test", "lines": [1]}, headers=ADMIN
        )
        assert created.status_code == 201, created.text
        note = created.json()
        invoice = client.get("/v1/invoices/INV-2026-10-hkgai-llm", headers=ADMIN).json()
        assert note["credit_note_number"].startswith("AISC-CN-")
        assert note["invoice_number"] == invoice["invoice_number"]
        assert [(ln["line_no"], ln["gpu_model"], ln["amount_hkd"]) for ln in note["lines"]] == [
            (1, "A100", "13.00")
        ]
        assert (note["subsidy_hkd"], note["net_hkd"], note["created_by"]) == (
            "9.10",
            "3.90",
            "token:1",
        )
        # the project sees its credit notes; another project cannot tell they exist
        listed = client.get(path, headers=LLM).json()["credit_notes"]
        assert [found["credit_note_id"] for found in listed] == [note["credit_note_id"]]
        assert client.get(path, headers=VISION).status_code == 403
        by_period = client.get("/v1/credit-notes", params={"period": "2026-10"}, headers=VISION)
        assert by_period.json() == {"credit_notes": []}
        # the audit trail says who did each, for admins only
        assert_error(client.get("/v1/audit", headers=BILLING), 403, "forbidden")
        trail = client.get("/v1/audit", headers=ADMIN).json()
        assert [(e["actor"], e["action"]) for e in trail["entries"][:2]] == [
            ("token:1", "credit_note.issue"),
            ("token:1", "period.finalize"),
        ]
        assert trail["entries"][0]["details"]["reason"] == "A100 hours belonged to a test"
        assert_error(client.get("/v1/audit?limit=0", headers=ADMIN), 422)

        # the subsidy report, the invoice's CSV and the FOCUS export carry the credit note
        report = client.get("/v1/subsidy/report?period=2026-10", headers=BILLING).json()
        [row] = [r for r in report["projects"] if r["project_id"] == "hkgai-llm"]
        assert row["credited_subsidy_hkd"] == "9.10"
        restored = Decimal(invoice["subsidy_cap_remaining_hkd"]) + Decimal("9.10")
        assert row["cap_remaining_hkd"] == str(restored)
        invoice_csv = client.get("/v1/invoices/INV-2026-10-hkgai-llm.csv", headers=LLM).text
        assert f",credit_net,,,,,-3.90,,{note['credit_note_number']}," in invoice_csv
        focus = client.get("/v1/exports/focus?period=2026-10", headers=BILLING).text
        assert focus.count(",Correction,") == 2  # the credited line and the subsidy returned

        # and the credit note as a PDF, to its project only
        pdf_path = f"/v1/credit-notes/{note['credit_note_id']}.pdf"
        pdf = client.get(pdf_path, headers=LLM)
        assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
        shown = " ".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf.content)).pages)
        assert "CREDIT NOTE" in shown and note["credit_note_number"] in shown
        assert invoice["invoice_number"] in shown and "A100 hours belonged to a test" in shown
        assert_error(client.get(pdf_path, headers=VISION), 403, "forbidden")
        assert_error(
            client.get("/v1/credit-notes/CN-INV-2026-10-hkgai-llm-9.pdf", headers=LLM), 404
        )


def job_total(
    job: str | None, hour: dt.datetime, gpu_s: str, util_s: str, idle_s: str, revision: int = 1
) -> JobHourlyTotal:
    return JobHourlyTotal(
        project_id="hkgai-llm",
        job_id=job,
        gpu_model="H800",
        hour_start=hour,
        gpu_seconds=Decimal(gpu_s),
        util_gpu_seconds=Decimal(util_s),
        idle_gpu_seconds=Decimal(idle_s),
        energy_wh=Decimal("1500.5"),
        nodes=2,
        samples=revision,
        revision=revision,
    )


def test_project_owners_see_their_jobs_idle_hours_and_efficiency(
    billing_service: ServiceProcess, bootstrap_servers: str, topic_prefix: str, http_port: int
) -> None:
    hour = dt.datetime(2026, 9, 3, 2, tzinfo=UTC)
    topic = f"{topic_prefix}metering.usage.jobs.hourly.v1"
    produce_hourly(
        bootstrap_servers,
        topic,
        [
            job_total("slurm:7", hour, "36000", "18000", "0"),  # 10 h at 26.00 = 260.00
            job_total("slurm:7", hour, "72000", "36000", "0", revision=2),  # replaces it: 20 h
            job_total("slurm:8", hour, "7200", "72", "7200"),  # 2 h, all idle: 52.00 idle
            job_total(None, hour + dt.timedelta(hours=1), "3600", "1800", "0"),
        ],
    )
    with api(http_port) as client:

        def three_jobs() -> dict | None:
            r = client.get("/v1/projects/hkgai-llm/jobs?period=2026-09", headers=LLM)
            body = r.json() if r.status_code == 200 else {"jobs": []}
            done = len(body["jobs"]) == 3 and body["jobs"][0]["gpu_hours"] == "20.000000"
            return body if done else None

        jobs = wait_until(
            three_jobs,
            timeout_s=30,
            what="the project's jobs",
        )
        assert [
            (
                j["job_id"],
                j["gpu_hours"],
                j["idle_gpu_hours"],
                j["mean_util_pct"],
                j["list_cost_hkd"],
            )
            for j in jobs["jobs"]
        ] == [
            ("slurm:7", "20.000000", "0.000000", "50.0", "520.00"),
            ("slurm:8", "2.000000", "2.000000", "1.0", "52.00"),
            (None, "1.000000", "0.000000", "50.0", "26.00"),
        ]
        assert jobs["jobs"][0]["energy_kwh"] == "1.501" and jobs["jobs"][0]["nodes"] == 2
        assert (jobs["totals"]["gpu_hours"], jobs["totals"]["idle_list_cost_hkd"]) == (
            "23.000000",
            "52.00",
        )
        # another project's token: refused, and its own efficiency holds nothing of ours
        assert_error(client.get("/v1/projects/hkgai-llm/jobs?period=2026-09", headers=VISION), 403)
        assert client.get("/v1/efficiency?period=2026-09", headers=VISION).json()["projects"] == []
        report = client.get("/v1/efficiency?period=2026-09", headers=BILLING).json()
        [llm] = report["projects"]
        assert (llm["project_id"], llm["idle_gpu_hours"], llm["idle_share_pct"]) == (
            "hkgai-llm",
            "2.000000",
            "8.7",
        )
        assert [j["job_id"] for j in llm["top_jobs"]] == ["slurm:7", "slurm:8", None]
        csv_text = client.get("/v1/efficiency.csv?period=2026-09", headers=LLM).text
        assert csv_text.splitlines()[1].startswith("hkgai-llm,23.000000,2.000000,8.7,")
        assert_error(client.get("/v1/projects/hkgai-llm/jobs?period=2026-13", headers=LLM), 400)

        # and the invoice of the period lists them in a job annex, in CSV and in its PDF
        produce_hourly(
            bootstrap_servers,
            f"{topic_prefix}metering.usage.hourly.v1",
            [
                hourly("hkgai-llm", hour, "79200", 1),
                hourly("hkgai-llm", hour + dt.timedelta(hours=1), "3600", 1),
            ],
        )
        invoice_csv = wait_until(
            lambda: (
                r.text
                if (
                    r := client.get("/v1/invoices/INV-2026-09-hkgai-llm.csv", headers=LLM)
                ).status_code
                == 200
                else None
            ),
            timeout_s=30,
            what="September's invoice",
        )
        annex = [row for row in invoice_csv.splitlines() if ",job," in row]
        assert annex[0].endswith(",job,H800,20.000000,,,520.00,,,,slurm:7")
        assert len(annex) == 3
        pdf = client.get("/v1/invoices/INV-2026-09-hkgai-llm.pdf", headers=LLM)
        shown = " ".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf.content)).pages)
        assert "Annex: jobs in September 2026" in shown and "slurm:8" in shown
        assert "(no job id)" in shown
