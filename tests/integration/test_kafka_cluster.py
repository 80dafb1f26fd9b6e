"""The three-node Apache Kafka cluster the fault drill uses: a SIGKILLed leader and a node cut off
in its network namespace each move the partition's leadership, and nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from gpumeter.drill import partition_leader, read_topic
from gpumeter.kafkabroker import KafkaCluster
from services.common.kafka_admin import ensure_topics


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    cluster = KafkaCluster(tmp_path_factory.mktemp("kafka3"), size=3, netns=True).start()
    yield cluster
    cluster.stop()


def others(cluster: KafkaCluster, node_id: int) -> str:
    return ",".join(f"{n.host}:{n.port}" for n in cluster.nodes if n.node_id != node_id)


def leader_moves_off(cluster: KafkaCluster, topic: str, node_id: int, within_s: float) -> int:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            leader = asyncio.run(partition_leader(others(cluster, node_id), topic, 0))
        except Exception:  # noqa: BLE001 - metadata not available yet: ask again
            leader = None
        if leader is not None and leader != node_id:
            return leader
        time.sleep(1)
    raise AssertionError(f"{topic}[0] still led by node {node_id} after {within_s:g} s")


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for value in values:
                await producer.send_and_wait(topic, value, partition=0)
        finally:
            await producer.stop()

    asyncio.run(run())


def read_all(bootstrap: str, topic: str) -> list[bytes]:
    values: list[bytes] = []
    asyncio.run(read_topic(bootstrap, topic, lambda record: values.append(record.value)))
    return values


def test_a_killed_leader_and_an_isolated_one_each_hand_over_and_lose_nothing_acknowledged(
    cluster: KafkaCluster,
) -> None:
    bootstrap = cluster.bootstrap_servers
    assert all(node.host.startswith("10.231.") for node in cluster.nodes)
    asyncio.run(ensure_topics(bootstrap, {"drill.t": 1}, replication_factor=3))
    produce(bootstrap, "drill.t", [b"a", b"b"])
    first = asyncio.run(partition_leader(bootstrap, "drill.t", 0))
    assert first is not None

    # When the leader is SIGKILLed, another node leads, and a write with acks=all goes on
    cluster.kill_node(first)
    second = leader_moves_off(cluster, "drill.t", first, 60)
    produce(others(cluster, first), "drill.t", [b"c"])
    cluster.start_node(first)

    # When the new leader is cut off in its namespace (both ways), leadership moves again
    cluster.isolate(second)
    third = leader_moves_off(cluster, "drill.t", second, 60)
    assert third != second
    produce(others(cluster, second), "drill.t", [b"d"])
    cluster.reconnect(second)

    # Then every acknowledged record is there once, in order, read through the whole cluster
    assert read_all(bootstrap, "drill.t") == [b"a", b"b", b"c", b"d"]
    assert not cluster.isolated


def test_the_cluster_stop_removes_its_namespaces_and_bridge(tmp_path: Path) -> None:
    cluster = KafkaCluster(tmp_path / "k", size=1, netns=True)
    try:
        cluster.start()
        namespace, bridge = cluster.nodes[0].namespace, cluster.bridge
        assert namespace is not None and bridge is not None
    finally:
        cluster.stop()
    assert not Path(f"/run/netns/{namespace}").exists()
    assert not Path(f"/sys/class/net/{bridge}").exists()
