"""Nodes silent past the retention are forgotten with their series, on plain values; a flood of
fake nodes leaves nothing behind once they are."""

from __future__ import annotations

import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

from schemas.metering import NodeSignal
from services.alerts import config
from services.alerts.domain import Evaluator

T0 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)
MINUTE = timedelta(minutes=1)
DAY = timedelta(days=1)
RETENTION = 7 * DAY
DEFAULT_RULES = Path(__file__).resolve().parents[2] / "deploy" / "alert-rules.yaml"
RULES = config.load(DEFAULT_RULES, lambda name: None).rules


def signal(node: str, at: datetime, **fields: object) -> NodeSignal:
    return NodeSignal(node=node, last_sample_time=at, gpus=8, **fields)  # type: ignore[arg-type]


def test_a_node_silent_past_the_retention_resolves_its_node_silent_and_is_forgotten():
    # given a node heard once, silent long enough for NodeSilent to fire
    alerts = Evaluator(RULES, started_at=T0)
    alerts.on_node_signal(signal("node-1", T0), T0)
    alerts.on_node_signal(signal("node-2", T0), T0)
    [fired, _] = alerts.check_absence(T0 + 3 * MINUTE)
    assert (fired.rule, fired.status) == ("NodeSilent", "firing")
    alerts.drain()
    # when node-2 keeps reporting and the retention passes for node-1
    alerts.on_node_signal(signal("node-2", T0 + 6 * DAY), T0 + 6 * DAY)
    alerts.check_absence(T0 + 6 * DAY)
    assert alerts.expire_nodes(T0 + 7 * DAY, RETENTION, limit=100) == []  # not quite yet
    alerts.drain()
    now = T0 + 7 * DAY + SECOND
    [resolved] = alerts.expire_nodes(now, RETENTION, limit=100)
    # then node-1's NodeSilent resolves, saying why, and node-1 and its series are forgotten
    assert (resolved.rule, resolved.status, resolved.labels["node"]) == (
        "NodeSilent",
        "resolved",
        "node-1",
    )
    assert resolved.ends_at == now
    assert resolved.starts_at == fired.starts_at
    assert "forgotten: silent for more than 7 days" in resolved.annotations["resolution"]
    assert set(alerts.nodes) == {"node-2"}
    assert all(s.labels["node"] == "node-2" for s in alerts.states.values())
    dirty = alerts.drain()
    assert dirty.nodes_removed == {"node-1"}
    assert dirty.states_removed == {fired.fingerprint}
    # and it does not fire again: there is nothing left to be silent
    assert "node-1" not in [c.labels["node"] for c in alerts.check_absence(now + MINUTE)]


def test_a_forgotten_node_that_reports_again_is_a_new_node_and_is_kept():
    alerts = Evaluator(RULES, started_at=T0)
    alerts.on_node_signal(signal("node-1", T0, xid_errors=2, xid_gpus=["GPU-1"]), T0)
    alerts.drain()
    [xid_resolved] = alerts.expire_nodes(T0 + 8 * DAY, RETENTION, limit=100)
    assert (xid_resolved.rule, xid_resolved.status) == ("GpuXidError", "resolved")
    # the node reports again in the same batch as it was forgotten
    alerts.on_node_signal(signal("node-1", T0 + 8 * DAY), T0 + 8 * DAY)
    dirty = alerts.drain()
    assert "node-1" in dirty.nodes and "node-1" not in dirty.nodes_removed
    assert set(alerts.nodes) == {"node-1"}


def test_expiry_is_batched_by_the_limit():
    alerts = Evaluator(RULES, started_at=T0)
    for i in range(25):
        alerts.on_node_signal(signal(f"node-{i:02}", T0), T0)
    alerts.check_absence(T0 + 3 * MINUTE)
    alerts.drain()
    first = alerts.expire_nodes(T0 + 8 * DAY, RETENTION, limit=10)
    assert len(first) == 10 and len(alerts.nodes) == 15
    assert len(alerts.drain().nodes_removed) == 10
    alerts.expire_nodes(T0 + 8 * DAY, RETENTION, limit=10)
    alerts.expire_nodes(T0 + 8 * DAY, RETENTION, limit=10)
    assert alerts.nodes == {} and alerts.states == {} and alerts._series_by_node == {}


def test_a_flood_of_ten_thousand_fake_nodes_is_gone_from_memory_after_the_retention():
    tracemalloc.start()
    try:
        alerts = Evaluator(RULES, started_at=T0)
        baseline, _ = tracemalloc.get_traced_memory()
        # given 10,000 fake nodes sending three samples each, then falling silent
        for sample in range(3):
            at = T0 + sample * 10 * SECOND
            for i in range(10_000):
                alerts.on_node_signal(signal(f"fake-{i:05}", at), at)
        fired = alerts.check_absence(T0 + 3 * MINUTE)
        alerts.drain()
        flooded, _ = tracemalloc.get_traced_memory()
        assert len(fired) == 10_000 and len(alerts.states) == 10_000
        # when the retention passes and the cleanup runs in batches of 1,000
        resolved = 0
        del fired
        while alerts.nodes:
            changes = alerts.expire_nodes(T0 + 8 * DAY, RETENTION, limit=1000)
            resolved += sum(1 for c in changes if c.status == "resolved")
            alerts.drain()
        del changes
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # then every NodeSilent resolved and nothing is left of the flood
    assert resolved == 10_000
    assert alerts.nodes == {} and alerts.states == {} and alerts._series_by_node == {}
    print(
        f"flood: +{(flooded - baseline) / 1e6:.1f} MB traced;"
        f" after expiry: +{(after - baseline) / 1e6:.3f} MB"
    )
    assert flooded - baseline > 5_000_000
    assert after - baseline < 200_000
