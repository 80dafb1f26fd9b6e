"""The rules file: the shipped default loads; mistakes are all reported at once."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from services.alerts import config
from services.alerts.domain import route

DEFAULT_RULES = Path(__file__).resolve().parents[2] / "deploy" / "alert-rules.yaml"


def test_the_default_rules_file_holds_the_contract_rules():
    loaded = config.load(DEFAULT_RULES, lambda name: None)
    rules = {rule.name: rule for rule in loaded.rules}
    high = rules["CentreAllocationHigh"]
    assert (str(high.threshold), str(high.clear_threshold), high.for_.total_seconds()) == (
        "0.90",
        "0.85",
        300,
    )
    assert high.labels["severity"] == "warning"
    critical = rules["CentreAllocationCritical"]
    assert (
        str(critical.threshold),
        critical.for_.total_seconds(),
        critical.labels["severity"],
    ) == ("0.97", 120, "critical")
    assert rules["NodeSilent"].threshold == 120
    assert rules["GpuAllocatedIdle"].for_.total_seconds() == 1800
    assert rules["GpuXidError"].threshold == 1
    for name in ("SubsidyCapNearlyUsed", "SubsidyCapUsedUp"):
        assert rules[name].signal == "billing.subsidy_used_ratio"
    assert (rules["SubsidyCapNearlyUsed"].threshold, rules["SubsidyCapUsedUp"].threshold) == (
        Decimal("0.80"),
        Decimal("1.00"),
    )
    assert (rules["UnpricedGpuModel"].op, rules["UnpricedGpuModel"].threshold) == (">", 0)
    dead_letters = rules["DeadLetterRateHigh"]
    assert (dead_letters.threshold, dead_letters.for_.total_seconds()) == (100, 300)
    lag = rules["MeteringLagging"]
    assert (lag.threshold, lag.for_.total_seconds()) == (300, 120)
    assert loaded.receivers == {}
    assert set(loaded.disabled) == {"webhook", "alertmanager", "slack", "pagerduty"}


def test_receivers_are_enabled_by_their_environment_variables_and_routed_on_labels():
    env = {"ALERT_WEBHOOK_URL": "http://127.0.0.1:9/hook", "PAGERDUTY_ROUTING_KEY": "key"}
    loaded = config.load(DEFAULT_RULES, env.get)
    assert loaded.receivers["webhook"].url == "http://127.0.0.1:9/hook"
    assert loaded.receivers["pagerduty"].url == config.PAGERDUTY_EVENTS_URL
    assert route(loaded.routes, {"severity": "critical"}) == ["webhook", "pagerduty"]
    assert route(loaded.routes, {"severity": "warning"}) == ["webhook"]


def test_every_problem_in_a_rules_file_is_listed():
    document = {
        "rules": [
            {"name": "A", "signal": "cluster.nope", "threshold": 1, "for": "5x"},
            {
                "name": "B",
                "signal": "cluster.allocation_ratio",
                "threshold": "0.9",
                "clear_threshold": "0.95",
            },
            {"name": "B", "signal": "node.xid_errors", "threshold": 1},
        ],
        "receivers": [{"name": "hook", "type": "webhook"}],
        "routes": [{"receivers": ["hook", "ghost"], "match_re": {"x": "("}}],
    }
    with pytest.raises(config.ConfigError) as raised:
        config.parse(document, lambda name: None)
    problems = "\n".join(raised.value.problems)
    for expected in (
        "rule A: for: not a duration",
        "unknown signal 'cluster.nope'",
        "clear_threshold",
        "B appears twice",
        "needs url",
        "unknown receivers ghost",
        "match_re.x",
    ):
        assert expected in problems
    assert len(raised.value.problems) == 7


def test_a_schema_error_names_its_place():
    with pytest.raises(config.ConfigError, match=r"rules\.0\.op"):
        config.parse(
            {"rules": [{"name": "A", "signal": "x", "op": "!=", "threshold": 1}]}, dict().get
        )
