"""The billing dashboard in a real browser (headless Chromium) over the real stack: samples ->
metering -> billing, alerts from the alerts service; what the page shows must equal what the JSON
API returns, and its PDF and CSV downloads must work."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from pypdf import PdfReader

from gpumeter.localstack import free_port
from tests.fixtures.billing import billing_process
from tests.fixtures.browser import dashboard_dom
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
            "name": "E2E Lab <b>(bold?)</b> & co",
            "subsidy": {
                "scheme": "AISS",
                "rate": "0.70",
                "cap_hkd": "1000000.00",
                "valid_from": "2026-01-01",
                "valid_to": "2026-12-31",
            },
        },
        {
            "id": "idle-lab",
            "name": "Idle Lab",
            "subsidy": {
                "scheme": "AISS",
                "rate": "0.90",
                "cap_hkd": "500000.00",
                "valid_from": "2026-01-01",
                "valid_to": "2026-12-31",
            },
        },
        {"id": "plain-lab", "name": "Plain Lab"},
    ],
}
ADMIN, READER, PLAIN = "dash-admin-token", "dash-billing-token", "dash-plain-token"
TOKENS = f"{ADMIN}=admin,{READER}=billing,{PLAIN}=project:plain-lab"
PERIOD = "2026-10"


def catalog_file(tmp_path: Path) -> Path:
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps(CATALOG))
    return catalog


@pytest.fixture
def stack(
    bootstrap_servers: str,
    database_url: str,
    topic_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[dict[str, int]]:
    ports = {name: free_port() for name in ("metering", "billing", "alerts")}
    billing = billing_process(
        bootstrap_servers,
        database_url,
        topic_prefix,
        ports["billing"],
        tmp_path / "billing.log",
        monkeypatch,
        catalog=catalog_file(tmp_path),
        hourly_partitions=None,  # metering makes it, compacted
        USAGE_PARTITIONS="4",
        API_TOKENS=TOKENS,
        ALERT_RULES_FILE=str(REPO_ROOT / "deploy" / "alert-rules.yaml"),
        ALERTS_URL=f"http://127.0.0.1:{ports['alerts']}",
    )
    services = []
    for name, port in ports.items():  # metering, billing, alerts
        if name == "billing":
            services.append(billing.start())
            continue
        env = {**billing.env, "HTTP_PORT": str(port)}  # billing's settings, on its own port
        service = ServiceProcess(f"services.{name}", env, tmp_path / f"{name}.log", port)
        services.append(service.start())
    yield ports
    for service in services:
        service.stop()


def produce_samples(bootstrap_servers: str, topic_prefix: str) -> None:
    """One node of 8 H800s, fully allocated (6 GPUs to e2e-lab, 2 to plain-lab), sampled every
    10 s from 15:55:10Z to 16:03:00Z on 31 October: 30 rounds fall in October (HK), 18 in
    November."""
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
                project_id="e2e-lab" if g < 6 else "plain-lab",
                job_id=f"slurm:{7 if g < 6 else 8}",
                util_pct=80.0 if g < 6 else 40.0,
                mem_used_mib=50000,
                power_w=500.0,
                temp_c=60,
            )
            for g in range(8)
        ]
        messages.append((b"node-001", json.dumps(batch).encode()))
    produce(bootstrap_servers, f"{topic_prefix}gpu.usage.v1", messages)


def test_the_dashboard_shows_what_the_api_returns_and_its_downloads_work(
    stack: dict[str, int], bootstrap_servers: str, topic_prefix: str, tmp_path: Path
) -> None:
    # Given usage of two projects in October and November (HK) and a full centre
    produce_samples(bootstrap_servers, topic_prefix)
    api = httpx.Client(
        base_url=f"http://127.0.0.1:{stack['billing']}",
        headers={"Authorization": f"Bearer {READER}"},
        timeout=10,
    )
    alerts_api = f"http://127.0.0.1:{stack['alerts']}/v1/alerts"

    def october_invoices() -> list[dict] | None:
        body = api.get("/v1/invoices", params={"period": PERIOD}).raise_for_status().json()
        # e2e-lab: 30 rounds x 6 GPUs x 10 s = 0.5 GPU-hours; plain-lab: 1/6 GPU-hour
        grosses = {i["project_id"]: i["gross_hkd"] for i in body["invoices"]}
        return body["invoices"] if grosses == {"e2e-lab": "13.00", "plain-lab": "4.33"} else None

    invoices = wait_until(october_invoices, 90, what="October's draft invoices")
    wait_until(
        lambda: any(
            "alloc" in alert["labels"].get("alertname", "").lower()
            for alert in httpx.get(
                alerts_api, params={"status": "active"}, headers=api.headers
            ).json()["alerts"]
        ),
        90,
        what="the centre allocation alert",
    )
    alerts_before = httpx.get(alerts_api, params={"status": "active"}, headers=api.headers).json()[
        "alerts"
    ]

    # When the dashboard is opened with a billing token in the link
    dom, _ = dashboard_dom(
        f"http://127.0.0.1:{stack['billing']}/#token={READER}&period={PERIOD}",
        tmp_path / "profile",
    )
    alerts_after = httpx.get(alerts_api, params={"status": "active"}, headers=api.headers).json()[
        "alerts"
    ]

    # Then each project's spend, subsidy and amount payable are the API's
    invoices = api.get("/v1/invoices", params={"period": PERIOD}).json()["invoices"]
    rows = {row.attrs["data-project"]: row for row in dom.find("invoice-row")}
    assert set(rows) == {invoice["project_id"] for invoice in invoices} == {"e2e-lab", "plain-lab"}
    for invoice in invoices:
        row = rows[invoice["project_id"]]
        assert row.one("invoice-id").value == invoice["invoice_id"]
        assert row.one("invoice-status").value == invoice["status"]
        assert row.one("gross").value == invoice["gross_hkd"]
        assert row.one("subsidy").value == invoice["subsidy_hkd"]
        assert row.one("net").value == invoice["net_hkd"]
        assert row.one("cap-remaining").value == (invoice["subsidy_cap_remaining_hkd"] or "-")
        # And its PDF and CSV download links point at the API
        invoice_path = f"/v1/invoices/{invoice['invoice_id']}"
        assert row.one("pdf-link").attrs["href"] == f"{invoice_path}.pdf"
        assert row.one("csv-link").attrs["href"] == f"{invoice_path}.csv"
    lab = next(invoice for invoice in invoices if invoice["project_id"] == "e2e-lab")
    assert (lab["gross_hkd"], lab["subsidy_hkd"], lab["net_hkd"]) == ("13.00", "9.10", "3.90")
    assert "E2E Lab <b>(bold?)</b> & co" in rows["e2e-lab"].text  # shown as text, not markup
    assert dom.one("total-gross").value == "17.33"
    assert dom.one("total-subsidy").value == "9.10"
    assert dom.one("total-net").value == "8.23"
    assert dom.one("invoice-count").value == "2"
    options = dom.one("period-select").children
    assert [o.attrs["value"] for o in options if "selected" in o.attrs] == [PERIOD]

    # And the subsidy cap burn-down is the cap endpoint's, for every subsidised project
    caps = api.get("/dashboard/api/cap").json()["projects"]
    cap_rows = {row.attrs["data-project"]: row for row in dom.find("cap-row")}
    assert set(cap_rows) == {cap["project_id"] for cap in caps} == {"e2e-lab", "idle-lab"}
    for cap in caps:
        row = cap_rows[cap["project_id"]]
        assert row.one("cap").value == cap["cap_hkd"]
        assert row.one("cap-used").value == cap["used_hkd"]
        assert row.one("cap-left").value == cap["cap_remaining_hkd"]
        assert row.one("cap-burn").value == (cap["burn_hkd_per_day"] or "-")
        runs_out = cap["cap_exhausted_on"] or "not before the approval ends"
        assert row.one("cap-runs-out").value == runs_out
    # And the efficiency panel is the efficiency report's: per project GPU-hours, idle hours,
    # energy and its top jobs (metering's per-job totals, through billing)
    efficiency = api.get("/v1/efficiency", params={"period": PERIOD}).json()["projects"]
    effective = {row.attrs["data-project"]: row for row in dom.find("efficiency-row")}
    assert set(effective) == {p["project_id"] for p in efficiency} >= {"e2e-lab"}
    for found in efficiency:
        row = effective[found["project_id"]]
        assert row.one("eff-gpu-hours").value == found["gpu_hours"]
        assert row.one("eff-energy").value == found["energy_kwh"]
        assert row.one("eff-idle-hours").value.startswith(found["idle_gpu_hours"])
        shown_jobs = [job.text.split(":")[0] for job in row.find("top-job")]
        assert len(shown_jobs) == len(found["top_jobs"]) >= 1
        # And the audit trail is for admins: a billing token is told so
    assert dom.find("audit-row") == []
    assert dom.one("audit-empty").text == "The audit trail is shown to admin tokens only."
    lab_cap = next(cap for cap in caps if cap["project_id"] == "e2e-lab")
    november = api.get("/v1/invoices/INV-2026-11-e2e-lab").json()
    assert lab_cap["cap_remaining_hkd"] == november["subsidy_cap_remaining_hkd"]
    assert [point["period"] for point in lab_cap["points"]] == ["2026-10", "2026-11"]
    assert dom.one("cap-chart").children[0].tag == "svg"

    # And centre allocation and utilization are the centre endpoint's
    centre = api.get("/dashboard/api/centre", params={"period": PERIOD}).json()
    assert centre["allocated_gpu_hours"] == "0.67"  # 30 rounds x 8 GPUs x 10 s
    assert [hour["allocated_gpus"] for hour in centre["hours"] if hour["allocated_gpus"] != "0.00"]
    assert dom.one("allocated-gpu-hours").value == centre["allocated_gpu_hours"]
    assert dom.one("peak-allocated-gpus").value == centre["peak_allocated_gpus"]
    assert dom.one("mean-util").value == f"{centre['mean_util_pct']}%" == "70.0%"
    assert dom.one("centre-chart").children[0].tag == "svg"

    # And the period's completeness is the API's
    completeness = api.get(f"/v1/periods/{PERIOD}/completeness").json()
    assert dom.one("completeness-status").value == completeness["status"]
    assert dom.one("complete-hours").value == str(completeness["complete_hours"])
    assert dom.one("incomplete-hour-count").value == str(len(completeness["incomplete_hours"]))
    assert dom.one("unknown-hour-count").value == str(len(completeness["unknown_hours"]))

    # And the active alerts are the alerts service's
    shown = {item.attrs["data-fingerprint"] for item in dom.find("alert")}
    before = {alert["fingerprint"] for alert in alerts_before}
    after = {alert["fingerprint"] for alert in alerts_after}
    assert before & after <= shown <= before | after
    allocation = [a for a in alerts_before if "alloc" in a["labels"]["alertname"].lower()]
    assert allocation and allocation[0]["fingerprint"] in shown
    assert dom.one("alerts-empty").attrs.get("hidden") is not None

    # And downloading the PDF over HTTP gives the invoice, to the same readers as the JSON
    pdf = api.get(f"/v1/invoices/{lab['invoice_id']}.pdf")
    assert pdf.status_code == 200, pdf.text
    assert pdf.headers["content-type"] == "application/pdf"
    assert 'filename="INV-2026-10-e2e-lab.pdf"' in pdf.headers["content-disposition"]
    assert pdf.content.startswith(b"%PDF-1.4")
    shown = " ".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf.content)).pages)
    for amount in (lab["gross_hkd"], lab["subsidy_hkd"], lab["net_hkd"]):
        assert f"{Decimal(amount):,.2f}" in shown, amount
    assert "Amount payable by" in shown and "DRAFT" in shown
    assert lab["invoice_id"] not in shown  # an internal reference: not on the document
    csv = api.get(f"/v1/invoices/{lab['invoice_id']}.csv")
    assert csv.status_code == 200 and lab["invoice_id"] in csv.text
    anonymous = httpx.get(f"{api.base_url}/v1/invoices/{lab['invoice_id']}.pdf")
    assert anonymous.status_code == 401 and anonymous.json()["error"] == "unauthorized"
    other = httpx.get(
        f"{api.base_url}/v1/invoices/{lab['invoice_id']}.pdf",
        headers={"Authorization": f"Bearer {PLAIN}"},
    )
    assert other.status_code == 403 and other.json()["error"] == "forbidden"
    missing = api.get("/v1/invoices/INV-2026-10-nobody.pdf")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"


def test_without_a_token_data_or_alerts_service_the_dashboard_says_so(
    bootstrap_servers: str,
    database_url: str,
    topic_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given billing alone, with a catalog but no usage and no ALERTS_URL
    port = free_port()
    billing = billing_process(
        bootstrap_servers,
        database_url,
        topic_prefix,
        port,
        tmp_path / "billing.log",
        monkeypatch,
        catalog=catalog_file(tmp_path),
        hourly_partitions=None,
        USAGE_PARTITIONS="4",
        API_TOKENS=TOKENS,
    ).start()
    try:
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/").headers["location"] == "/dashboard"
        page = httpx.get(f"{base}/dashboard")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "http" not in page.text.replace("http://www.w3.org", "")  # no external asset
        assert httpx.get(f"{base}/dashboard/assets/app.js").status_code == 200
        assert httpx.get(f"{base}/dashboard/assets/..%2Fpdf.py").status_code == 404
        assert httpx.get(f"{base}/dashboard/api/info").status_code == 401

        # When the page is opened without a token
        dom, _ = dashboard_dom(f"{base}/dashboard", tmp_path / "anonymous")
        # Then it asks for one
        assert "Paste an API token" in dom.one("invoices-empty").text
        assert dom.find("invoice-row") == []

        # When it is opened with a billing token for a period without usage
        dom, _ = dashboard_dom(
            f"{base}/dashboard#token={READER}&period=2026-03", tmp_path / "reader"
        )
        # Then every panel shows its empty state
        assert dom.one("invoices-empty").text == "No invoices for 2026-03: no billable usage yet."
        assert dom.one("total-gross").value == "0.00" and dom.one("invoice-count").value == "0"
        assert "No usage reported for 2026-03" in dom.one("centre-facts").text
        assert "Alerts service not configured" in dom.one("alerts-empty").text
        assert {row.attrs["data-project"] for row in dom.find("cap-row")} == {
            "e2e-lab",
            "idle-lab",
        }
        assert dom.one("completeness-status").value == "complete"
        assert "No usage in this period yet" in dom.one("completeness-text").text

        # When an admin opens it, the audit trail says who applied the catalog
        dom, _ = dashboard_dom(f"{base}/dashboard#token={ADMIN}&period=2026-03", tmp_path / "admin")
        audit = httpx.get(f"{base}/v1/audit", headers={"Authorization": f"Bearer {ADMIN}"}).json()[
            "entries"
        ]
        rows = dom.find("audit-row")
        assert [row.attrs["data-action"] for row in rows] == [e["action"] for e in audit]
        assert "catalog.apply" in [row.attrs["data-action"] for row in rows]
        assert "added" in rows[-1].text  # the catalog's summary
    finally:
        billing.stop()
