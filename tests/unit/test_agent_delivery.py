"""What the agent counts when its spool cannot take a round (no broker needed: nothing is sent)."""

from __future__ import annotations

from pathlib import Path

from gpumeter.localstack import free_port
from services.agent.publisher import AgentMetrics, Delivery, kafka_producer_factory
from services.agent.spool import Spool


def round_of(at: int, gpus: int = 4) -> dict[str, list[dict]]:
    return {"node-a": [{"id": f"node-a/gpu-{g}/{at}", "time": at} for g in range(gpus)]}


def value(metrics: AgentMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels or None) or 0.0


def test_rounds_past_the_spool_bound_are_dropped_and_counted_with_a_reason(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path, max_bytes=1000, fsync=False)
    metrics = AgentMetrics()
    unreachable = kafka_producer_factory(f"127.0.0.1:{free_port()}", 1000)
    delivery = Delivery(spool, "gpu.usage.v1", metrics, unreachable)  # never started: no sender

    for at in range(100, 300, 10):
        delivery.submit(round_of(at))

    spooled = value(metrics, "gpumeter_agent_samples_spooled_total")
    dropped = value(metrics, "gpumeter_agent_samples_dropped_total", reason="spool_full")
    assert spooled == spool.samples > 0
    assert dropped == 20 * 4 - spooled
    assert value(metrics, "gpumeter_agent_spool_bytes") == spool.bytes <= 1000
    assert value(metrics, "gpumeter_agent_spool_max_bytes") == 1000
