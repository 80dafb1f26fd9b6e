"""The agent against a real broker behind a proxy that the tests cut: every sample sampled while the
broker is away arrives afterwards in per-GPU order, and a SIGKILLed agent loses nothing it spooled
while metering counts each sample once. A SIGKILL in the middle of a replay leaves every sample the
fleet produced on the broker or in the spool, and the next start delivers the rest."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer

from gpumeter.localstack import free_port
from services.agent.simulator import FleetConfig, FleetSimulator, aligned
from services.agent.spool import spooled_events, spooled_files
from services.common.kafka_admin import ensure_topics
from tests.fixtures.kafka import latest_json_by_key, read_topic, topic_partitions
from tests.fixtures.kafka_proxy import KafkaProxy
from tests.fixtures.processes import ServiceProcess, wait_until

INTERVAL_S = 10


@pytest.fixture
def proxy(bootstrap_servers: str) -> Iterator[KafkaProxy]:
    proxy = KafkaProxy(bootstrap_servers).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def agents() -> Iterator[list[ServiceProcess]]:
    """Agents a test started; stopped at the end whatever happened."""
    started: list[ServiceProcess] = []
    yield started
    for service in started:
        service.kill()


def create_topics(bootstrap: str, prefix: str) -> None:
    asyncio.run(ensure_topics(bootstrap, {f"{prefix}gpu.usage.v1": 4}))


def agent(
    started: list[ServiceProcess],
    proxy: KafkaProxy,
    prefix: str,
    spool: Path,
    log: Path,
    **settings: str,
) -> ServiceProcess:
    port = free_port()
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": proxy.bootstrap_servers,
        "TOPIC_PREFIX": prefix,
        "AGENT_HTTP_PORT": str(port),
        "AGENT_SPOOL_DIR": str(spool),
        "AGENT_KAFKA_TIMEOUT_MS": "2000",
        "AGENT_INTERVAL_S": str(INTERVAL_S),
        **settings,
    }
    service = ServiceProcess("services.agent", env, log, http_port=port, args=["--simulate"])
    started.append(service)
    return service


def metric(service: ServiceProcess, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{service.http_port}/metrics", timeout=2).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def events_of(messages: list[Any]) -> list[dict]:
    events: list[dict] = []
    for message in messages:
        value = json.loads(message.value)
        events.extend(value if isinstance(value, list) else [value])
    return events


def assert_each_gpu_in_time_order(events: list[dict]) -> dict[str, list[str]]:
    """First deliveries strictly increase in time per GPU; a re-delivery is a known id."""
    seen: set[str] = set()
    times: dict[str, list[str]] = defaultdict(list)
    for event in events:
        if event["id"] in seen:
            continue  # a re-delivery after a lost acknowledgement: same id, dropped by metering
        seen.add(event["id"])
        gpu = event["subject"]
        assert not times[gpu] or event["time"] > times[gpu][-1], (
            f"{gpu}: {event['time']} after {times[gpu][-1]}"
        )
        times[gpu].append(event["time"])
    return times


def test_every_sample_taken_while_the_broker_is_unreachable_arrives_later_in_per_gpu_order(
    agents: list[ServiceProcess],
    proxy: KafkaProxy,
    bootstrap_servers: str,
    topic_prefix: str,
    tmp_path: Path,
) -> None:
    # Given an agent for 2 nodes x 4 GPUs sampling 120 rounds of 10 s at 20x real time
    create_topics(bootstrap_servers, topic_prefix)
    start = aligned(datetime.now(UTC) - timedelta(hours=2), INTERVAL_S)
    rounds = 120
    until = start + timedelta(seconds=INTERVAL_S * rounds)
    service = agent(
        agents,
        proxy,
        topic_prefix,
        tmp_path / "spool",
        tmp_path / "agent.log",
        AGENT_SIM_NODES="2",
        AGENT_SIM_GPUS_PER_NODE="4",
        AGENT_SIM_SPEED="20",
        AGENT_SIM_START=start.isoformat(),
        AGENT_SIM_UNTIL=until.isoformat(),
    ).start()
    wait_until(lambda: metric(service, "gpumeter_agent_samples_sent_total") >= 40, 30)

    # When the broker is cut off for 30 s while the agent keeps sampling
    proxy.cut()
    cut_at = time.monotonic()
    wait_until(lambda: metric(service, "gpumeter_agent_broker_up") == 0, 20, what="down")
    wait_until(
        lambda: (
            time.monotonic() - cut_at >= 30
            and metric(service, "gpumeter_agent_spool_samples") >= 8 * 40
        ),
        60,
        what="30 s of outage with samples spooled",
    )
    assert metric(service, "gpumeter_agent_spool_bytes") > 0
    proxy.restore()

    # Then the agent replays its spool, finishes the simulation and exits cleanly
    assert service.process is not None
    assert service.process.wait(60) == 0

    expected = [iso(start + timedelta(seconds=INTERVAL_S * i)) for i in range(1, rounds + 1)]
    messages = read_topic(
        bootstrap_servers,
        f"{topic_prefix}gpu.usage.v1",
        lambda m: len({e["id"] for e in events_of(m)}) >= 8 * rounds,
    )
    events = events_of(messages)
    times = assert_each_gpu_in_time_order(events)
    assert len(times) == 8
    for gpu, gpu_times in times.items():
        assert gpu_times == expected, f"{gpu} is missing samples"
    assert all(m.key.decode() == json.loads(m.value)[0]["data"]["node"] for m in messages)
    assert not list(spooled_files(tmp_path / "spool")), "spool not emptied"


@pytest.fixture
def metering(bootstrap_servers: str, topic_prefix: str, tmp_path: Path) -> Iterator[ServiceProcess]:
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


def test_a_killed_agent_sends_what_it_spooled_after_restart_and_metering_counts_it_once(
    metering: ServiceProcess,
    agents: list[ServiceProcess],
    proxy: KafkaProxy,
    bootstrap_servers: str,
    topic_prefix: str,
    tmp_path: Path,
) -> None:
    # Given an agent for one node of 8 GPUs at 50x real time whose broker went away
    create_topics(bootstrap_servers, topic_prefix)
    spool = tmp_path / "spool"
    start = aligned(datetime.now(UTC) - timedelta(hours=1), INTERVAL_S)
    first = agent(
        agents,
        proxy,
        topic_prefix,
        spool,
        tmp_path / "agent-1.log",
        AGENT_SIM_NODES="1",
        AGENT_SIM_SPEED="50",
        AGENT_SIM_START=start.isoformat(),
    ).start()
    wait_until(lambda: metric(first, "gpumeter_agent_samples_sent_total") >= 40, 30)
    proxy.cut()
    wait_until(lambda: metric(first, "gpumeter_agent_spool_samples") >= 80, 30)

    # When it is killed outright with samples in its spool
    first.kill()
    left_behind = spooled_events(spool)
    assert len(left_behind) >= 80

    # And starts again, once the broker is back, where the first run stopped
    proxy.restore()
    last = max(datetime.fromisoformat(e["time"]) for e in left_behind)
    second = agent(
        agents,
        proxy,
        topic_prefix,
        spool,
        tmp_path / "agent-2.log",
        AGENT_SIM_NODES="1",
        AGENT_SIM_SPEED="50",
        AGENT_SIM_START=last.isoformat(),
        AGENT_SIM_UNTIL=(last + timedelta(seconds=INTERVAL_S * 20)).isoformat(),
    ).start()
    assert second.process is not None
    assert second.process.wait(60) == 0

    # Then every spooled sample reached the topic, each GPU in time order
    events = events_of(
        read_topic(
            bootstrap_servers,
            f"{topic_prefix}gpu.usage.v1",
            lambda m: {e["id"] for e in left_behind} <= {e["id"] for e in events_of(m)},
        )
    )
    assert_each_gpu_in_time_order(events)

    # And metering counts every distinct sample exactly once per project and hour
    unique = {e["id"]: e for e in events}.values()
    expected = Counter(
        f"{e['data']['project_id']}|H800|{hour_of(e)}"
        for e in unique
        if e["data"]["project_id"] is not None
    )
    latest = latest_json_by_key(
        read_topic(
            bootstrap_servers,
            f"{topic_prefix}metering.usage.hourly.v1",
            lambda m: all(
                latest_json_by_key(m).get(k, {}).get("samples") == n for k, n in expected.items()
            ),
        )
    )
    assert {k: v["samples"] for k, v in latest.items()} == dict(expected)


def hour_of(event: dict) -> str:
    end = datetime.fromisoformat(event["time"])
    begin = end - timedelta(seconds=event["data"]["interval_s"])
    return begin.replace(minute=0, second=0, microsecond=0).isoformat()


def test_sigterm_flushes_the_spool_before_the_agent_exits(
    agents: list[ServiceProcess],
    proxy: KafkaProxy,
    bootstrap_servers: str,
    topic_prefix: str,
    tmp_path: Path,
) -> None:
    # Given an agent whose broker is away, so that samples pile up in its spool
    create_topics(bootstrap_servers, topic_prefix)
    start = aligned(datetime.now(UTC) - timedelta(hours=1), INTERVAL_S)
    service = agent(
        agents,
        proxy,
        topic_prefix,
        tmp_path / "spool",
        tmp_path / "agent.log",
        AGENT_SIM_NODES="1",
        AGENT_SIM_SPEED="50",
        AGENT_SIM_START=start.isoformat(),
    ).start()
    proxy.cut()
    wait_until(lambda: metric(service, "gpumeter_agent_spool_samples") >= 80, 30)
    proxy.restore()

    # When it is asked to stop
    assert service.process is not None
    service.process.send_signal(signal.SIGTERM)

    # Then it sends everything it sampled before exiting, and leaves its spool empty
    assert service.process.wait(30) == 0
    stopped_at = re.findall(r'"simulated_time": "([^"]+)"', (tmp_path / "agent.log").read_text())
    last = datetime.fromisoformat(stopped_at[-1])
    rounds = int((last - start).total_seconds()) // INTERVAL_S
    assert not list(spooled_files(tmp_path / "spool"))
    messages = read_topic(
        bootstrap_servers,
        f"{topic_prefix}gpu.usage.v1",
        lambda m: len({e["id"] for e in events_of(m)}) >= 8 * rounds,
        timeout_s=10,
    )
    times = assert_each_gpu_in_time_order(events_of(messages))
    assert {len(gpu_times) for gpu_times in times.values()} == {rounds}


def topic_events(bootstrap: str, topic: str) -> list[dict]:
    """Everything on `topic` now, in partition order (for a topic nobody writes to any more)."""

    async def run() -> list[Any]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            partitions = await topic_partitions(consumer, topic)
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            ends = await consumer.end_offsets(partitions)
            messages: list[Any] = []
            while [p for p in partitions if await consumer.position(p) < ends[p]]:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    messages.extend(records)
            return messages
        finally:
            await consumer.stop()

    return events_of(asyncio.run(run()))


def fleet_ids(nodes: int, start: datetime, through: datetime) -> list[str]:
    """The ids of every sample the seeded fleet (the agent's defaults) makes after `start`."""
    fleet = FleetSimulator(FleetConfig(nodes=nodes, interval_s=60.0))
    ids, at = [], start + timedelta(seconds=60)
    while at <= through:
        ids.extend(e["id"] for events in fleet.round(at).values() for e in events)
        at += timedelta(seconds=60)
    return ids


def newest(events: list[dict]) -> datetime:
    return max(datetime.fromisoformat(e["time"]) for e in events)


def test_an_agent_sigkilled_while_it_replays_a_backlog_leaves_no_sample_of_its_fleet_missing(
    agents: list[ServiceProcess],
    proxy: KafkaProxy,
    bootstrap_servers: str,
    topic_prefix: str,
    tmp_path: Path,
) -> None:
    # Given an agent simulating 4 nodes x 8 GPUs far in the past at 1800x (30 rounds a second)
    create_topics(bootstrap_servers, topic_prefix)
    topic = f"{topic_prefix}gpu.usage.v1"
    spool = tmp_path / "spool"
    start = aligned(datetime.now(UTC) - timedelta(days=10), 60)
    fleet = {
        "AGENT_SIM_NODES": "4",
        "AGENT_INTERVAL_S": "60",
        "AGENT_SIM_SPEED": "1800",
    }
    first = agent(
        agents,
        proxy,
        topic_prefix,
        spool,
        tmp_path / "agent-1.log",
        AGENT_SIM_START=start.isoformat(),
        **fleet,
    ).start()
    wait_until(lambda: metric(first, "gpumeter_agent_samples_sent_total") >= 500, 30)

    # And a backlog in its spool from a cut link, which it is sending when the link is back
    proxy.cut()
    wait_until(lambda: metric(first, "gpumeter_agent_spool_samples") >= 32 * 300, 60)
    sent_before = metric(first, "gpumeter_agent_samples_sent_total")
    proxy.restore()
    wait_until(
        lambda: metric(first, "gpumeter_agent_samples_sent_total") > sent_before,
        30,
        interval_s=0.02,
    )

    # When it is SIGKILLed in the middle of that
    first.kill()

    # Then every sample its fleet produced is on the broker or still in its spool
    on_broker = topic_events(bootstrap_servers, topic)
    left_behind = spooled_events(spool)
    produced_through = newest(on_broker + left_behind)
    produced = fleet_ids(4, start, produced_through)
    somewhere = {e["id"] for e in on_broker} | {e["id"] for e in left_behind}
    missing = [i for i in produced if i not in somewhere]
    assert not missing, f"{len(missing)} samples neither acknowledged nor spooled: {missing[:3]}"

    # And when it starts again on its spool, the fleet going on where it stopped
    second = agent(
        agents,
        proxy,
        topic_prefix,
        spool,
        tmp_path / "agent-2.log",
        AGENT_SIM_START=produced_through.isoformat(),
        AGENT_SIM_UNTIL=(produced_through + timedelta(minutes=20)).isoformat(),
        **fleet,
    ).start()
    assert second.process is not None
    assert second.process.wait(60) == 0

    # Then the broker has every sample of both runs, each GPU in time order, and the spool is empty
    events = topic_events(bootstrap_servers, topic)
    delivered = {e["id"] for e in events}
    missing = [i for i in produced if i not in delivered]
    assert not missing, f"{len(missing)} samples of the killed run never arrived: {missing[:3]}"
    assert len(delivered) == len(produced) + 4 * 8 * 20
    assert_each_gpu_in_time_order(events)
    assert not list(spooled_files(spool))


def test_a_simulated_fleet_without_a_spool_dir_replays_what_a_sigkilled_run_left_behind(
    agents: list[ServiceProcess],
    proxy: KafkaProxy,
    bootstrap_servers: str,
    topic_prefix: str,
    tmp_path: Path,
) -> None:
    # Given a simulated fleet with no AGENT_SPOOL_DIR whose broker is away
    create_topics(bootstrap_servers, topic_prefix)
    start = aligned(datetime.now(UTC) - timedelta(hours=1), INTERVAL_S)
    temp = tmp_path / "tmp"
    temp.mkdir()
    fleet = {
        "AGENT_SPOOL_DIR": "",
        "TMPDIR": str(temp),
        "AGENT_SIM_NODES": "1",
        "AGENT_SIM_SPEED": "50",
    }
    proxy.cut()
    first = agent(
        agents,
        proxy,
        topic_prefix,
        tmp_path / "unused",
        tmp_path / "agent-1.log",
        AGENT_SIM_START=start.isoformat(),
        **fleet,
    ).start()
    wait_until(lambda: metric(first, "gpumeter_agent_spool_samples") >= 80, 30)

    # When it is SIGKILLed, and the same fleet starts again once the broker is back
    first.kill()
    (spool,) = temp.glob("gpumeter-agent-sim-*")
    left_behind = spooled_events(spool)
    assert len(left_behind) >= 80
    proxy.restore()
    last = newest(left_behind)
    second = agent(
        agents,
        proxy,
        topic_prefix,
        tmp_path / "unused",
        tmp_path / "agent-2.log",
        AGENT_SIM_START=last.isoformat(),
        AGENT_SIM_UNTIL=(last + timedelta(seconds=INTERVAL_S * 5)).isoformat(),
        **fleet,
    ).start()
    assert second.process is not None
    assert second.process.wait(60) == 0

    # Then what the killed run spooled reached the broker, and the drained spool is gone
    delivered = {e["id"] for e in topic_events(bootstrap_servers, f"{topic_prefix}gpu.usage.v1")}
    assert {e["id"] for e in left_behind} <= delivered
    assert not spool.exists()
