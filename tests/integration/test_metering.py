"""Metering against the real broker: counted once, batches equal singles, bad input dead-lettered."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from gpumeter.localstack import free_port
from services.agent.simulator import usage_event
from tests.fixtures.kafka import latest_json_by_key, produce, read_topic
from tests.fixtures.processes import ServiceProcess

HOUR = datetime(2026, 11, 28, 1, 0, tzinfo=UTC)


def sample(
    node: str, gpu: int, at: datetime, project: str | None = "hkgai-llm", util: float = 50.0
) -> dict:
    return usage_event(
        node=node,
        gpu_uuid=f"GPU-{node}-{gpu}",
        gpu_index=gpu,
        gpu_model="H800",
        at=at,
        interval_s=10.0,
        project_id=project,
        job_id="slurm:1" if project else None,
        util_pct=util,
        mem_used_mib=1000,
        power_w=360.0,
        temp_c=50,
        xid_errors=0,
    )


@pytest.fixture
def metering(bootstrap_servers: str, topic_prefix: str, tmp_path: Path):
    port = free_port()
    service = ServiceProcess(
        "services.metering",
        {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers,
            "TOPIC_PREFIX": topic_prefix,
            "HTTP_PORT": str(port),
            "KAFKA_REBALANCE_TIMEOUT_MS": "3000",
            "USAGE_PARTITIONS": "4",
        },
        tmp_path / "metering.log",
        http_port=port,
    ).start()
    yield service
    service.stop()


def hourly_when(bootstrap: str, topic_prefix: str, expected_samples: dict[str, int]) -> dict:
    def done(messages: list) -> bool:
        latest = latest_json_by_key(messages)
        return all(latest.get(k, {}).get("samples") == n for k, n in expected_samples.items())

    return latest_json_by_key(
        read_topic(bootstrap, f"{topic_prefix}metering.usage.hourly.v1", done)
    )


def test_duplicates_count_once_and_a_batch_equals_the_same_samples_sent_singly(
    metering: ServiceProcess, bootstrap_servers: str, topic_prefix: str
) -> None:
    # Given node A sends 30 rounds of 4 GPUs as batches, every batch delivered twice,
    # and node B sends the same shape of samples one event per message
    messages = []
    for i in range(1, 31):
        at = HOUR + timedelta(seconds=10 * i)
        batch = [sample("node-a", g, at) for g in range(4)]
        messages += [(b"node-a", json.dumps(batch).encode())] * 2
        for g in range(4):
            messages.append(
                (b"node-b", json.dumps(sample("node-b", g, at, project="cuhk-med-ai")).encode())
            )
    produce(bootstrap_servers, f"{topic_prefix}gpu.usage.v1", messages)

    # Then each project's hour holds exactly 120 samples of 10 s: 1200 GPU-seconds, half utilised
    key_a = "hkgai-llm|H800|2026-11-28T01:00:00+00:00"
    key_b = "cuhk-med-ai|H800|2026-11-28T01:00:00+00:00"
    latest = hourly_when(bootstrap_servers, topic_prefix, {key_a: 120, key_b: 120})
    for key in (key_a, key_b):
        assert Decimal(latest[key]["gpu_seconds"]) == Decimal(1200)
        assert Decimal(latest[key]["util_gpu_seconds"]) == Decimal(600)
        assert Decimal(latest[key]["energy_wh"]) == Decimal(120)  # 360 W x 1200 s / 3600
    metrics = __import__("httpx").get(f"http://127.0.0.1:{metering.http_port}/metrics").text
    assert 'gpumeter_metering_samples_total{outcome="duplicate"} 120.0' in metrics


def test_each_class_of_bad_input_is_dead_lettered_and_good_samples_around_it_still_count(
    metering: ServiceProcess, bootstrap_servers: str, topic_prefix: str
) -> None:
    at = HOUR + timedelta(seconds=10)
    future = sample("node-c", 9, datetime.now(UTC) + timedelta(minutes=10))
    bad_util = sample("node-c", 8, at)
    bad_util["data"]["util_pct"] = 140.0
    bad_interval = sample("node-c", 7, at)
    bad_interval["data"]["interval_s"] = 0
    unknown_type = {**sample("node-c", 6, at), "type": "io.gpumeter.gpu.usage.v9"}
    missing_field = sample("node-c", 5, at)
    del missing_field["data"]["gpu_model"]
    not_cloudevent = {"hello": "world"}
    bad = [
        (b"node-c", b"this is not json"),
        (b"node-c", b"[" + b" " * (1024 * 1024) + b"]"),
        (b"node-c", json.dumps(not_cloudevent).encode()),
        (b"node-c", json.dumps(unknown_type).encode()),
        (b"node-c", json.dumps(missing_field).encode()),
        (b"node-c", json.dumps(bad_util).encode()),
        (b"node-c", json.dumps(bad_interval).encode()),
        (b"node-c", json.dumps(future).encode()),
        (b"node-x", json.dumps(sample("node-c", 4, at)).encode()),
    ]
    good = [(b"node-c", json.dumps([sample("node-c", g, at) for g in range(3)]).encode())]
    produce(bootstrap_servers, f"{topic_prefix}gpu.usage.v1", good + bad + good)

    dlq = read_topic(
        bootstrap_servers, f"{topic_prefix}gpu.usage.dlq.v1", lambda m: len(m) >= len(bad)
    )
    letters = [json.loads(m.value) for m in dlq]
    assert sorted(letter["reason"] for letter in letters) == sorted(
        [
            "not_json",
            "too_large",
            "not_cloudevent",
            "unknown_type",
            "invalid_field",
            "util_out_of_range",
            "interval_out_of_range",
            "time_in_future",
            "key_mismatch",
        ]
    )
    not_json = next(letter for letter in letters if letter["reason"] == "not_json")
    assert base64.b64decode(not_json["raw"]) == b"this is not json"
    assert not_json["topic"] == f"{topic_prefix}gpu.usage.v1" and not_json["offset"] >= 0
    latest = hourly_when(
        bootstrap_servers, topic_prefix, {"hkgai-llm|H800|2026-11-28T01:00:00+00:00": 3}
    )
    assert Decimal(latest["hkgai-llm|H800|2026-11-28T01:00:00+00:00"]["gpu_seconds"]) == Decimal(30)
    assert metering.healthy()


def test_a_worker_killed_mid_run_restarts_from_its_changelog_and_counts_exactly(
    metering: ServiceProcess, bootstrap_servers: str, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}gpu.usage.v1"
    nodes = [f"node-{n}" for n in range(6)]

    def rounds(first: int, last: int) -> list[tuple[bytes, bytes]]:
        return [
            (
                node.encode(),
                json.dumps(
                    [sample(node, g, HOUR + timedelta(seconds=10 * i)) for g in range(8)]
                ).encode(),
            )
            for i in range(first, last)
            for node in nodes
        ]

    key = "hkgai-llm|H800|2026-11-28T01:00:00+00:00"
    produce(bootstrap_servers, topic, rounds(1, 150))
    hourly_when(bootstrap_servers, topic_prefix, {key: 149 * 48})
    # When the worker is killed with SIGKILL, and the same rounds plus new ones arrive while it is down
    metering.kill()
    produce(bootstrap_servers, topic, rounds(100, 300))
    metering.start()
    produce(bootstrap_servers, topic, rounds(250, 361))
    # Then every distinct sample is counted exactly once: 360 rounds x 6 nodes x 8 GPUs
    latest = hourly_when(bootstrap_servers, topic_prefix, {key: 360 * 48})
    assert Decimal(latest[key]["gpu_seconds"]) == Decimal(360 * 48 * 10)
