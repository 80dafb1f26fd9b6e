"""The dashboard's read models, from plain values."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from services.billing.export import safe_file_name as file_name
from services.billing.web.queries import CentreHour
from services.billing.web.routes import centre_usage

HOUR = dt.datetime(2026, 11, 1, 0, tzinfo=dt.UTC)


def hour(offset: int, gpu_seconds: str, util_gpu_seconds: str) -> CentreHour:
    return CentreHour(
        hour_start=HOUR + dt.timedelta(hours=offset),
        gpu_seconds=Decimal(gpu_seconds),
        util_gpu_seconds=Decimal(util_gpu_seconds),
        projects=1,
        nodes_online=2,
        complete=True,
    )


def test_centre_usage_gives_gpus_on_average_and_utilization_weighted_by_gpu_seconds() -> None:
    usage = centre_usage("2026-11", [hour(0, "28800", "23040"), hour(1, "7200", "0")])

    assert [h.allocated_gpus for h in usage.hours] == ["8.00", "2.00"]
    assert [h.util_pct for h in usage.hours] == ["80.0", "0.0"]
    assert usage.allocated_gpu_hours == "10.00"
    assert usage.peak_allocated_gpus == "8.00"
    assert usage.mean_util_pct == "64.0"


def test_an_hour_with_nodes_online_but_nothing_allocated_has_no_utilization() -> None:
    usage = centre_usage("2026-11", [hour(0, "0", "0")])

    assert usage.hours[0].allocated_gpus == "0.00" and usage.hours[0].util_pct is None
    assert usage.mean_util_pct is None


def test_an_empty_period_has_zero_totals() -> None:
    usage = centre_usage("2026-11", [])

    assert (usage.hours, usage.allocated_gpu_hours, usage.peak_allocated_gpus) == (
        [],
        "0.00",
        "0.00",
    )


def test_download_names_keep_only_safe_characters() -> None:
    assert file_name("INV-2026-11-hkgai-llm") == "INV-2026-11-hkgai-llm"
    assert file_name('INV-2026-11-a"b/香港') == "INV-2026-11-a_b___"
