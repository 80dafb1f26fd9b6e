"""Schemathesis against the real billing service's /openapi.json: no request makes it answer 5xx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.billing import billing_process


def test_no_generated_request_gets_a_server_error(
    database_url: str,
    bootstrap_servers: str,
    topic_prefix: str,
    http_port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given the service with a catalog, reached with an admin token (so handlers run, not only auth)
    service = billing_process(
        bootstrap_servers,
        database_url,
        topic_prefix,
        http_port,
        tmp_path / "billing.log",
        monkeypatch,
        hourly_partitions=None,
        API_TOKENS="fuzz-admin=admin",
    ).start()
    try:
        # When schemathesis generates requests for every operation of its OpenAPI document
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "run",
                f"http://127.0.0.1:{http_port}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--max-examples",
                "5",
                "--seed",
                "20261101",
                "--max-time",
                "20",
                "--workers",
                "2",
                "--header",
                "Authorization: Bearer fuzz-admin",
                "--no-color",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        service.stop()
    # Then it finds no server error
    report = run.stdout[-12000:] + run.stderr[-2000:]
    print(report)  # shown with -s or on failure
    assert run.returncode == 0, report
    assert " 500 " not in (tmp_path / "billing.log").read_text(errors="replace"), report
