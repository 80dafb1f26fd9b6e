"""The supervisor's /metrics: several workers' expositions as one valid exposition."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.metering.supervisor import merge_expositions


def worker_exposition(counted: int, lag: dict[str, int]) -> str:
    registry = CollectorRegistry()
    samples = Counter("samples", "Samples", ["outcome"], registry=registry)
    samples.labels("counted").inc(counted)
    samples.labels("duplicate").inc(1)
    gauge = Gauge("consumer_lag", "Lag", ["partition"], registry=registry)
    for partition, value in lag.items():
        gauge.labels(partition).set(value)
    Gauge("nodes", "Nodes", registry=registry).set(counted // 8)
    Histogram("batch_seconds", "Batches", registry=registry).observe(0.01)
    return generate_latest(registry).decode()


def test_every_sample_gains_its_process_and_each_family_is_declared_once() -> None:
    merged = merge_expositions(
        [("0", worker_exposition(800, {"0": 3, "1": 0})), ("1", worker_exposition(640, {"2": 7}))]
    )
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    counted = {
        s.labels["process"]: s.value
        for s in families["samples"].samples
        if s.name == "samples_total" and s.labels["outcome"] == "counted"
    }
    assert counted == {"0": 800.0, "1": 640.0}
    assert {
        (s.labels["process"], s.labels["partition"]) for s in families["consumer_lag"].samples
    } == {
        ("0", "0"),
        ("0", "1"),
        ("1", "2"),
    }
    assert {s.labels["process"]: s.value for s in families["nodes"].samples} == {
        "0": 100.0,
        "1": 80.0,
    }
    assert merged.count("# TYPE samples_total counter") == 1
    assert merged.count("# HELP nodes Nodes") == 1
    # a family's samples stay together under its header (the exposition format asks for it)
    lines = merged.splitlines()
    nodes = [i for i, line in enumerate(lines) if line.startswith("nodes{")]
    assert nodes == list(range(nodes[0], nodes[0] + 2))
    assert lines[nodes[0] - 1] == "# TYPE nodes gauge"


def test_no_worker_answering_gives_an_empty_exposition() -> None:
    assert merge_expositions([]) == ""
