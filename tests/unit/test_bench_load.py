"""The steady benchmark's load: a substituted template is the message built for that time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from gpumeter.bench import (
    TEMPLATE_AT,
    TEMPLATE_EPOCH,
    TEMPLATE_TIME,
    counted_samples,
    fleet_message,
)
from schemas.codec import decode_usage_message


@given(st.integers(min_value=0, max_value=10 * 365 * 86400))
def test_a_substituted_template_equals_the_message_built_at_that_time(seconds: int) -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)
    template = fleet_message("node-00042", TEMPLATE_AT)
    value = template.replace(TEMPLATE_EPOCH, str(int(at.timestamp()))).replace(
        TEMPLATE_TIME, at.isoformat().replace("+00:00", "Z")
    )
    assert value == fleet_message("node-00042", at)
    decoded = decode_usage_message(value.encode(), now=at, key=b"node-00042")
    assert not decoded.errors and len(decoded.events) == 8


def test_counted_samples_sum_a_supervisors_worker_processes_and_read_a_single_worker() -> None:
    merged = (
        "# TYPE gpumeter_metering_samples_total counter\n"
        'gpumeter_metering_samples_total{process="0",outcome="counted"} 1200.0\n'
        'gpumeter_metering_samples_total{process="0",outcome="duplicate"} 7.0\n'
        'gpumeter_metering_samples_total{process="1",outcome="counted"} 800.0\n'
        'gpumeter_metering_samples_created{process="1",outcome="counted"} 1.7e9\n'
    )
    assert counted_samples(merged) == 2000.0
    assert counted_samples('gpumeter_metering_samples_total{outcome="counted"} 5.0\n') == 5.0
