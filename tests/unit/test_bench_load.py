"""The steady benchmark's load: a substituted template is the message built for that time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from gpumeter.bench import TEMPLATE_AT, TEMPLATE_EPOCH, TEMPLATE_TIME, fleet_message
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
