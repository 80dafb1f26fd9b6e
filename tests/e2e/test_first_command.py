"""The README's first command exactly as written, from the repository root, with its default data
directory (./var): `make run`, given only a duration so that it ends by itself. Run twice: the
second run on the same data directory keeps the first one's word (docs/contracts.md §4: invoices are
totals; §6: a notification is sent once per state change)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import threading
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

import httpx

from gpumeter.processes import marked
from tests.fixtures.processes import REPO_ROOT, wait_until

DATA_DIR = REPO_ROOT / "var"  # the default of `gpumeter up --data-dir`
RUN_S = 75
CENTRE = re.compile(r"\[[\d:]+\] allocation .*?(\d+) draft invoices for (\d{4}-\d{2}): gross HK\$")


def clean_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "GPUMETER_STACK", "MAKEFLAGS")
    }


class Run:
    """`make run ARGS="--duration N"` with its output in a file, its invoices polled per project
    through the billing API every second while it runs."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.started = time.monotonic()
        self.readings: list[dict[tuple[str, str], Decimal]] = []
        self.stopped = threading.Event()
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                ["make", "run", f"ARGS=--duration {RUN_S}"],
                cwd=REPO_ROOT,
                env=clean_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.poller = threading.Thread(target=self.poll, daemon=True)
        self.poller.start()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def poll(self) -> None:
        while self.process.poll() is None:
            # not up yet, or stopping: the next poll tries again
            with contextlib.suppress(httpx.HTTPError, OSError, ValueError, KeyError):
                self.read_invoices()
            time.sleep(1)

    def read_invoices(self) -> None:
        text = self.text()
        found = re.search(r"billing API   (http://127\.0\.0\.1:\d+) ", text)
        periods = set(re.findall(r"draft invoices for (\d{4}-\d{2})", text))
        if not found or not periods:
            return
        token = json.loads((DATA_DIR / "api-tokens.json").read_text())["billing"]
        reading: dict[tuple[str, str], Decimal] = {}
        for period in periods:
            response = httpx.get(
                f"{found.group(1)}/v1/invoices",
                params={"period": period},
                headers={"Authorization": f"Bearer {token}"},
                timeout=5,
            )
            if response.status_code != 200:
                return
            body = response.json()
            for invoice in body if isinstance(body, list) else body["invoices"]:
                reading[(period, invoice["project_id"])] = Decimal(invoice["gross_hkd"])
        self.readings.append(reading)

    def finish(self) -> str:
        self.process.wait(RUN_S + 240)
        self.poller.join(10)
        return self.text()


def notification_lines() -> list[str]:
    """The local webhook's record: one JSON line per notification, across runs."""
    path = DATA_DIR / "logs" / "notifications.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def alerts_in(lines: list[str]) -> list[tuple[str, str, str]]:
    """(fingerprint, status, startsAt) of every alert in these notifications, in order."""
    return [
        (alert["fingerprint"], alert["status"], alert["startsAt"])
        for line in lines
        for alert in json.loads(line).get("alerts", [])
    ]


def test_make_run_as_written_shows_the_centre_and_a_restart_keeps_its_word(tmp_path: Path) -> None:
    before = len(notification_lines())  # an earlier run of the user's on ./var, if any
    # when a new user types the first command (it ends by itself after RUN_S seconds)
    first = Run(tmp_path / "first.log")
    shown = wait_until(
        lambda: CENTRE.search(first.text()) and int(CENTRE.search(first.text()).group(1)),  # type: ignore[union-attr]
        150,
        interval_s=0.5,
        what="the centre: draft invoices in make run's output",
    )
    print(f"make run showed {shown} draft invoices after {time.monotonic() - first.started:.0f} s")
    text = first.finish()
    # then it showed the centre, stopped by itself and left nothing behind
    assert first.process.returncode == 0, text[-3000:]
    assert re.search(r"gross HK\$[1-9][\d,]*\.\d\d", text), text[-3000:]
    assert "stopped: no process left behind" in text, text[-3000:]
    assert not marked(str(DATA_DIR))
    assert first.readings and first.readings[-1], "billing never answered during the first run"
    after_first = first.readings[-1]
    lines_first = len(notification_lines())
    notified_first = alerts_in(notification_lines()[before:lines_first])

    # when it is run again on the same data directory
    second = Run(tmp_path / "second.log")
    text = second.finish()
    assert second.process.returncode == 0, text[-3000:]
    assert "stopped: no process left behind" in text, text[-3000:]
    assert second.readings, "billing never answered during the second run"

    # then no invoice went back: every reading of the second run is at least the first's last
    for reading in second.readings:
        for key, gross in after_first.items():
            if key in reading:
                assert reading[key] >= gross, (key, reading[key], gross)
    final = second.readings[-1]
    for key, gross in after_first.items():
        assert final.get(key, Decimal(0)) >= gross, (key, final.get(key), gross)
    # and none doubled: the second run replays the same day of the same seeded fleet, shifted by
    # the minute or two between the runs
    for key, gross in after_first.items():
        assert final[key] <= gross * Decimal("1.3") + 1, (key, final[key], gross)
    # and on-call was not notified again of what it had been told in the first run
    notified_second = alerts_in(notification_lines()[lines_first:])
    assert notified_first, "the first run notified nothing"
    again = sorted(set(notified_first) & set(notified_second))
    assert not again, f"notified again after the restart: {again[:5]}"
    twice = [n for n, count in Counter(notified_first + notified_second).items() if count > 1]
    assert not twice, f"notified twice: {twice[:5]}"
