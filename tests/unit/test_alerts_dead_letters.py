"""Dead letters by reason on plain values: the window counting, the two signals and their rules,
and reading a letter's reason."""

from __future__ import annotations

import json
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.alerts import config
from services.alerts.dead_letters import parse_letter
from services.alerts.domain import Evaluator, ReasonWindow, describe_counts, reason_name

T0 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)
MINUTE = timedelta(minutes=1)
DEFAULT_RULES = Path(__file__).resolve().parents[2] / "deploy" / "alert-rules.yaml"
SHIPPED = {rule.name: rule for rule in config.load(DEFAULT_RULES, lambda name: None).rules}


def test_a_letter_counts_for_the_window_and_not_after_it():
    window = ReasonWindow(60 * SECOND)
    assert window.add("internal_error", T0, T0)
    assert window.counts(T0 + 59 * SECOND) == {"internal_error": 1}
    # within one bucket (1/60 of the window) of its end, then gone
    assert window.counts(T0 + 61 * SECOND) == {}


def test_a_letter_older_than_the_window_is_not_counted_and_a_future_one_counts_as_now():
    window = ReasonWindow(60 * SECOND)
    assert not window.add("not_json", T0 - 60 * SECOND, T0)
    assert window.add("not_json", T0 + MINUTE, T0)  # a producer clock ahead of ours
    assert window.counts(T0 + 59 * SECOND) == {"not_json": 1}
    assert window.counts(T0 + 61 * SECOND) == {}


def test_counts_are_per_reason_and_letters_out_of_order_count_by_their_own_time():
    window = ReasonWindow(60 * SECOND)
    window.add("not_json", T0 + 30 * SECOND, T0 + 30 * SECOND)
    window.add("refused_by_database", T0 + 5 * SECOND, T0 + 30 * SECOND)
    window.add("not_json", T0 + 10 * SECOND, T0 + 30 * SECOND)
    assert window.counts(T0 + 30 * SECOND) == {"not_json": 2, "refused_by_database": 1}
    assert window.counts(T0 + 67 * SECOND) == {"not_json": 2}
    assert window.counts(T0 + 71 * SECOND) == {"not_json": 1}
    assert describe_counts({"a": 1, "refused_by_database": 1, "not_json": 2}) == (
        "not_json: 2, a: 1, refused_by_database: 1"
    )


def test_memory_is_bounded_by_buckets_and_reasons_not_by_letters():
    window = ReasonWindow(60 * SECOND, buckets=60, max_reasons=4)
    tracemalloc.start()
    try:
        for i in range(20_000):
            at = T0 + i * 10 * timedelta(milliseconds=1)
            window.add(f"reason_{i % 10}", at, at, detail="x" * 5000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(window._buckets) <= 61
    counts = window.counts(T0 + 200 * SECOND)
    assert set(counts) <= {"reason_0", "reason_1", "reason_2", "reason_3", "other"}
    # the last 60 s of 200 s, 100 a second, less the bucket the window's start falls in
    assert sum(counts.values()) == 5900
    assert peak < 200_000, peak
    assert len(window.latest_detail("reason_0")) == 200


def test_reasons_are_short_snake_case_names_or_unreadable():
    assert reason_name("internal_error") == "internal_error"
    assert reason_name("Internal Error") == "unreadable"
    assert reason_name("x" * 65) == "unreadable"
    assert reason_name(None) == "unreadable"


def test_a_letter_is_read_for_its_reason_and_detail_and_anything_else_is_unreadable():
    letter = {"reason": "internal_error", "detail": "KeyError: 'gpu'", "topic": "t"}
    assert parse_letter(json.dumps(letter).encode()) == ("internal_error", "KeyError: 'gpu'")
    assert parse_letter(b"not json") == ("unreadable", "")
    assert parse_letter(b"[1, 2]") == ("unreadable", "")
    assert parse_letter(None) == ("unreadable", "")
    assert parse_letter(b'{"reason": 3, "detail": null}') == ("unreadable", "")


def evaluator(window: timedelta = 60 * SECOND) -> Evaluator:
    rules = [SHIPPED["MeteringInternalErrors"], SHIPPED["BillingDeadLetters"]]
    return Evaluator(rules, started_at=T0, dead_letter_count_window=window)


def test_one_internal_error_fires_a_warning_that_resolves_once_the_window_passes():
    alerts = evaluator()
    assert alerts.on_dead_letter_counts(T0) == []
    # other metering reasons are the dead-letter rate's business, not this rule's
    alerts.record_dead_letter("metering", "not_json", T0, T0)
    assert alerts.on_dead_letter_counts(T0 + SECOND) == []
    alerts.record_dead_letter("metering", "internal_error", T0, T0, "ZeroDivisionError: boom")
    [fired] = alerts.on_dead_letter_counts(T0 + 2 * SECOND)
    assert (fired.rule, fired.status, fired.value) == ("MeteringInternalErrors", "firing", 1)
    assert fired.labels["severity"] == "warning"
    assert "1 usage messages as internal_error in the last 60 s" in fired.annotations["summary"]
    assert "ZeroDivisionError: boom" in fired.annotations["summary"]
    # a second one in the window: still the same alert, no new notification
    alerts.record_dead_letter("metering", "internal_error", T0 + 30 * SECOND, T0 + 30 * SECOND)
    assert alerts.on_dead_letter_counts(T0 + 31 * SECOND) == []
    assert alerts.on_dead_letter_counts(T0 + 89 * SECOND) == []
    [resolved] = alerts.on_dead_letter_counts(T0 + 92 * SECOND)
    assert (resolved.rule, resolved.status) == ("MeteringInternalErrors", "resolved")
    assert resolved.ends_at == T0 + 92 * SECOND


def test_billing_dead_letters_fire_critical_with_the_reasons():
    alerts = evaluator()
    alerts.record_dead_letter("billing", "not_json", T0, T0)
    alerts.record_dead_letter("billing", "refused_by_database", T0, T0)
    alerts.record_dead_letter("billing", "not_json", T0, T0)
    [fired] = alerts.on_dead_letter_counts(T0 + SECOND)
    assert (fired.rule, fired.status, fired.value) == ("BillingDeadLetters", "firing", 3)
    assert fired.labels["severity"] == "critical"
    assert "(not_json: 2, refused_by_database: 1)" in fired.annotations["summary"]
    assert "in no invoice" in fired.annotations["summary"]
    [resolved] = alerts.on_dead_letter_counts(T0 + 62 * SECOND)
    assert resolved.status == "resolved"


def test_a_restart_refilled_from_the_window_goes_on_firing_and_old_letters_fire_nothing():
    # given an alert firing on a letter at T0, its state persisted
    before = evaluator()
    before.record_dead_letter("billing", "invalid_record", T0, T0)
    [fired] = before.on_dead_letter_counts(T0 + SECOND)
    state = before.states[fired.fingerprint]
    # when the service restarts within the window and re-reads the letter from the topic
    after = evaluator()
    after.states = {state.fingerprint: state}
    assert after.record_dead_letter("billing", "invalid_record", T0, T0 + 10 * SECOND)
    # then it goes on firing, notifying nothing
    assert after.on_dead_letter_counts(T0 + 11 * SECOND) == []
    # and a restart after the window does not count the old letter again: nothing fires
    later = evaluator()
    assert not later.record_dead_letter("billing", "invalid_record", T0, T0 + 2 * MINUTE)
    assert later.on_dead_letter_counts(T0 + 2 * MINUTE) == []


@pytest.mark.parametrize("signal", ["pipeline.internal_errors", "billing.dead_letters"])
def test_the_signals_are_known_to_the_rules_file(signal: str):
    document = {"rules": [{"name": "R", "signal": signal, "op": ">", "threshold": 0}]}
    [rule] = config.parse(document, lambda name: None).rules
    assert rule.signal == signal
