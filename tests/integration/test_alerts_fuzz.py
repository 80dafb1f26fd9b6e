"""Schemathesis against the real alerts service's /openapi.json: every conformance check holds,
and no generated request makes it answer 5xx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.fixtures.alerts import ONCALL_TOKEN, alerts_env
from tests.fixtures.processes import ServiceProcess


def test_schemathesis_finds_no_server_error_in_the_alerts_api(
    bootstrap_servers: str, database_url: str, topic_prefix: str, http_port: int, tmp_path: Path
) -> None:
    # Given the real service on the real broker and PostgreSQL
    env = alerts_env(bootstrap_servers, database_url, topic_prefix, http_port)
    service = ServiceProcess("services.alerts", env, tmp_path / "alerts.log", http_port).start()
    try:
        # When Schemathesis runs every check that holds the service to its own document
        # (allow_header_conformance is Starlette's 405 handling, not ours)
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "run",
                f"http://127.0.0.1:{http_port}/openapi.json",
                "--checks",
                "all",
                "--exclude-checks",
                "allow_header_conformance",
                "--max-examples",
                "30",
                "--seed",
                "20261202",
                "--workers",
                "1",  # hypothesis' lambda descriptions are not thread-safe on Python 3.11
                "--no-color",
                "--header",
                f"Authorization: Bearer {ONCALL_TOKEN}",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=150,
            check=False,
        )
        # Then every check passes and the service logged no server error
        report = run.stdout[-12000:] + run.stderr[-2000:]
        assert run.returncode == 0, report
        assert " 500 " not in service.log_path.read_text(errors="replace"), report
    finally:
        service.stop()
