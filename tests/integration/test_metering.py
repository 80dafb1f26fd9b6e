"""Metering against the real broker: counted once, batches equal singles, bad input dead-lettered."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from tests.fixtures.factories import usage
from tests.fixtures.hostile import hostile_messages
from tests.fixtures.kafka import latest_json_by_key, produce, read_topic
from tests.fixtures.metering import metering_process
from tests.fixtures.processes import ServiceProcess, wait_until

HOUR = datetime(2026, 11, 28, 1, 0, tzinfo=UTC)


def sample(
    node: str, gpu: int, at: datetime, project: str | None = "hkgai-llm", util: float = 50.0
) -> dict:
    return usage(
        node,
        gpu,
        at,
        project_id=project,
        job_id="slurm:1" if project else None,
        util_pct=util,
        power_w=360.0,
    )


@pytest.fixture
def metering(bootstrap_servers: str, topic_prefix: str, tmp_path: Path):
    service = metering_process(bootstrap_servers, topic_prefix, tmp_path / "metering.log").start()
    yield service
    service.stop()


def metric(service: ServiceProcess, series: str) -> float:
    """One series of the worker's /metrics (name with its labels as exposed), 0 when absent."""
    text = httpx.get(f"http://127.0.0.1:{service.http_port}/metrics", timeout=2).text
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def counted(service: ServiceProcess) -> float:
    """Samples this worker process has counted since it started (its /metrics counter)."""
    return metric(service, 'gpumeter_metering_samples_total{outcome="counted"}')


def fleet_rounds(nodes: list[str], first: int, last: int) -> list[tuple[bytes, bytes]]:
    """Rounds first..last-1 of 8 GPUs per node, one batched message per node and round."""
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


class SteadyProducer(threading.Thread):
    """Sends messages in small steps over the test, like agents do, while workers die and return."""

    def __init__(
        self, bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], pause_s: float
    ) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.messages = bootstrap, topic, messages
        self.pause_s = pause_s
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._send())
        except BaseException as exc:  # noqa: BLE001 - re-raised by finish() in the test thread
            self.error = exc

    async def _send(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
        await producer.start()
        try:
            for start in range(0, len(self.messages), 48):
                deliveries = [
                    await producer.send(self.topic, key=key, value=value)
                    for key, value in self.messages[start : start + 48]
                ]
                await producer.flush()
                for delivery in deliveries:
                    delivery.result()  # a message the broker refused fails the test as such
                await asyncio.sleep(self.pause_s)  # pacing the load, not waiting for anything
        finally:
            await producer.stop()

    def finish(self) -> None:
        self.join(60)
        assert not self.is_alive(), "producer did not finish"
        if self.error:
            raise self.error


def hourly_when(bootstrap: str, topic_prefix: str, expected_samples: dict[str, int]) -> dict:
    def done(messages: list) -> bool:
        latest = latest_json_by_key(messages)
        return all(latest.get(k, {}).get("samples") == n for k, n in expected_samples.items())

    return latest_json_by_key(
        read_topic(bootstrap, f"{topic_prefix}metering.usage.hourly.v1", done)
    )


def hourly_or_diagnosis(
    bootstrap: str, topic_prefix: str, expected_samples: dict[str, int], service: ServiceProcess
) -> dict:
    """hourly_when, failing with what the worker's dead letters and log say."""
    try:
        return hourly_when(bootstrap, topic_prefix, expected_samples)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{diagnosis(bootstrap, topic_prefix, service)}") from None


def dropping_worker(
    bootstrap: str, topic_prefix: str, tmp_path: Path, env: dict[str, str]
) -> ServiceProcess:
    """A started worker whose Faust layer drops fetched records (tests/fixtures/dropping_metering)."""
    return metering_process(
        bootstrap,
        topic_prefix,
        tmp_path / "metering.log",
        module="tests.fixtures.dropping_metering",
        env=env,
    ).start()


def diagnosis(bootstrap: str, topic_prefix: str, service: ServiceProcess) -> str:
    """What a failed exactness check needs to be understood: dead letters by reason, the log."""
    letters: list = []
    with contextlib.suppress(AssertionError):  # read for 5 s: what there is
        read_topic(
            bootstrap,
            f"{topic_prefix}gpu.usage.dlq.v1",
            lambda messages: letters.extend(messages[len(letters) :]) and False,
            timeout_s=5,
        )
    reasons = Counter(json.loads(m.value).get("reason") for m in letters)
    log = service.log_path.read_text(errors="replace")
    marks = ("Recovery", "generation", "never reached the stream", "reading it again")
    recovery = [line for line in log.splitlines() if any(mark in line for mark in marks)]
    return (
        f"dead letters by reason: {dict(reasons)}\n{per_node(bootstrap, topic_prefix, letters)}\n"
        + "\n".join(recovery[-40:])
    )


def per_node(bootstrap: str, topic_prefix: str, letters: list) -> str:
    """Where a node's samples stopped: its last stored state and its best partial, per hour."""
    found: dict[str, list] = {}
    topics = {
        "state": f"{topic_prefix}gpumeter-metering-node-state-changelog",
        "partial": f"{topic_prefix}metering.internal.node-hourly.v2",
        "usage": f"{topic_prefix}gpu.usage.v1",
    }
    for name, topic in topics.items():
        with contextlib.suppress(AssertionError):
            read_topic(
                bootstrap,
                topic,
                lambda messages, name=name: found.__setitem__(name, messages) and False,
                timeout_s=5,
            )
    states: dict[str, dict] = {}
    history: dict[str, list[str]] = {}  # each node's stored states: when, where, how many
    for message in found.get("state", []):
        if message.value is not None:
            node, state = json.loads(message.key), json.loads(message.value)
            states[node] = state
            history.setdefault(node, []).append(
                f"{message.timestamp % 100_000:>5} p{message.partition}@{message.offset}"
                f" counted {state['counted']} to {state['max_end_s']}"
            )
    partials: dict[tuple[str, str], int] = {}
    for message in found.get("partial", []):
        for key, node, partial in json.loads(message.value):
            partials[key, node] = max(partials.get((key, node), 0), partial["samples"])
    sent: dict[str, set] = {}
    for message in found.get("usage", []):
        for event in json.loads(message.value):
            sent.setdefault(event["data"]["node"], set()).add(event["id"])
    lines = [f"distinct samples on the usage topic, {n}: {len(ids)}" for n, ids in sent.items()]
    lines += [
        f"state {node}: counted {state.get('counted')} hours {state.get('hours')}"
        for node, state in sorted(states.items())
    ]
    lines += [f"best partial {key} {node}: {n}" for (key, node), n in sorted(partials.items())]
    for node, state in sorted(states.items()):
        if state["counted"] < len(sent.get(node, ())):  # the node that lost samples: its story
            lines += [f"{node} stored states (ms, partition@offset):", *history[node][-60:]]
            gpu = f"/GPU-{node}-0/"
            lines += [
                f"dead letter {letter['partition']}@{letter['offset']}: {letter['detail']}"
                for letter in map(lambda m: json.loads(m.value), letters)
                if gpu in letter["detail"]
            ][-60:]
    return "\n".join(lines)


def test_duplicates_count_once_and_a_batch_equals_the_same_samples_sent_singly(
    metering: ServiceProcess, bootstrap_servers: str, topic_prefix: str, broker_kind: str
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
    # And the per-job totals (metering.usage.jobs.hourly.v1) hold the same, by job
    jobs = latest_json_by_key(
        read_topic(
            bootstrap_servers,
            f"{topic_prefix}metering.usage.jobs.hourly.v1",
            lambda messages: (
                len([j for j in latest_json_by_key(messages).values() if j["samples"] == 120]) == 2
            ),
        )
    )
    for key in (key_a, key_b):
        project, model, hour = key.split("|")
        job = jobs[f"{project}|slurm:1|{model}|{hour}"]
        assert (job["job_id"], job["nodes"], job["samples"]) == ("slurm:1", 1, 120)
        for total in ("gpu_seconds", "util_gpu_seconds", "energy_wh"):
            assert Decimal(job[total]) == Decimal(latest[key][total]), total
        assert Decimal(job["idle_gpu_seconds"]) == 0  # 50% utilised
    metrics = httpx.get(f"http://127.0.0.1:{metering.http_port}/metrics").text
    assert 'gpumeter_metering_samples_total{outcome="duplicate"} 120.0' in metrics
    assert 'gpumeter_metering_consumer_lag{partition="' in metrics
    assert "gpumeter_metering_samples_per_second" in metrics
    # And table recovery corrects ListOffsets' end offsets on Tansu only (KAFKA_BROKER=auto)
    assert metric(metering, "gpumeter_metering_fetched_end_offsets") == (
        0 if broker_kind == "kafka" else 1
    )
    # And only /healthz and /metrics answer: none of Faust's own pages, which would serve the
    # tables holding these projects' sums (/table/...), route key look-ups or show the topology
    base = f"http://127.0.0.1:{metering.http_port}"
    for path in (
        "/",
        "/table/",
        "/table/hour-totals/",
        f"/table/hour-totals/{key_a}/",
        "/table/node-state/node-a/",
        "/router/",
        "/router/hour-totals/",
        "/graph/",
        "/assignment/",
        "/performance/",
    ):
        assert httpx.get(base + path, timeout=5).status_code == 404, path
    assert httpx.get(base + "/healthz", timeout=5).status_code == 200


def test_an_hour_is_complete_when_every_node_online_in_it_has_reported_past_its_end(
    metering: ServiceProcess, bootstrap_servers: str, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}gpu.usage.v1"
    completeness_topic = f"{topic_prefix}metering.completeness.v1"
    hour_key = HOUR.isoformat()

    def completeness_when(predicate) -> dict:
        messages = read_topic(
            bootstrap_servers,
            completeness_topic,
            lambda m: (
                hour_key in latest_json_by_key(m) and predicate(latest_json_by_key(m)[hour_key])
            ),
        )
        return latest_json_by_key(messages)[hour_key]

    # Given three nodes online in the hour (one of them unallocated), and only node-a past its end
    produce(
        bootstrap_servers,
        topic,
        [
            (b"node-a", json.dumps(sample("node-a", 0, HOUR + timedelta(minutes=30))).encode()),
            (b"node-b", json.dumps(sample("node-b", 0, HOUR + timedelta(minutes=59))).encode()),
            (
                b"node-c",
                json.dumps(sample("node-c", 0, HOUR + timedelta(seconds=10), None)).encode(),
            ),
            (b"node-a", json.dumps(sample("node-a", 0, HOUR + timedelta(hours=1))).encode()),
        ],
    )
    # Then the hour is incomplete, naming the nodes that have not reported through it
    first = completeness_when(lambda c: c["nodes_online"] == 3 and c["nodes_through"] == 1)
    assert first["missing_nodes"] == ["node-b", "node-c"] and first["complete"] is False

    # When node-b and node-c report samples of the next hour
    produce(
        bootstrap_servers,
        topic,
        [
            (
                b"node-b",
                json.dumps(sample("node-b", 0, HOUR + timedelta(hours=1, seconds=10))).encode(),
            ),
            (
                b"node-c",
                json.dumps(
                    sample("node-c", 0, HOUR + timedelta(hours=1, seconds=20), None)
                ).encode(),
            ),
        ],
    )
    # Then the hour is complete, with a higher revision
    last = completeness_when(lambda c: c["complete"])
    assert (last["nodes_online"], last["nodes_through"], last["missing_nodes"]) == (3, 3, [])
    assert last["revision"] > first["revision"]


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


def test_a_worker_killed_three_times_under_load_counts_every_sample_exactly_once(
    metering: ServiceProcess, bootstrap_servers: str, topic_prefix: str
) -> None:
    # Given six nodes sending steadily, and some rounds sent twice (an agent replaying its spool)
    topic = f"{topic_prefix}gpu.usage.v1"
    nodes = [f"node-{n}" for n in range(6)]
    key = "hkgai-llm|H800|2026-11-28T01:00:00+00:00"
    rounds = fleet_rounds(nodes, 1, 361)
    replayed = rounds[: 100 * 6] + fleet_rounds(nodes, 80, 120) + rounds[100 * 6 :]
    producer = SteadyProducer(bootstrap_servers, topic, replayed, 1.0)
    producer.start()
    # When the worker is killed with SIGKILL three times while the samples arrive, each time a
    # few seconds after it started counting, so that it has committed offsets and written state
    pauses = [1.5, 4.0, 2.5]
    for kill in range(3):
        wait_until(lambda: counted(metering) >= 200, 60, what=f"counting before kill {kill + 1}")
        time.sleep(pauses[kill])
        metering.kill()
        metering.start()
    producer.finish()
    # Then every distinct sample is counted exactly once: 360 rounds x 6 nodes x 8 GPUs
    try:
        latest = hourly_when(bootstrap_servers, topic_prefix, {key: 360 * 48})
    except AssertionError as error:
        why = diagnosis(bootstrap_servers, topic_prefix, metering)
        raise AssertionError(f"{error}\n{why}") from None
    assert Decimal(latest[key]["gpu_seconds"]) == Decimal(360 * 48 * 10)
    assert latest[key]["revision"] == 360 * 48


def test_two_workers_share_the_partitions_and_one_leaving_mid_run_loses_nothing(
    metering: ServiceProcess, bootstrap_servers: str, topic_prefix: str, tmp_path: Path
) -> None:
    # Given a second worker of the same app beside the first, both counting (once both hold
    # usage partitions: a broker that lets the first member join alone hands it all of them)
    topic = f"{topic_prefix}gpu.usage.v1"
    second = metering_process(bootstrap_servers, topic_prefix, tmp_path / "second.log").start()
    try:
        held = "gpumeter_metering_usage_partitions"
        wait_until(
            lambda: metric(metering, held) > 0 and metric(second, held) > 0,
            60,
            what="both workers holding usage partitions",
        )
        nodes = [f"node-{n}" for n in range(8)]
        produce(bootstrap_servers, topic, fleet_rounds(nodes, 1, 100))
        wait_until(
            lambda: counted(metering) >= 100 and counted(second) >= 100,
            60,
            what="both workers counting",
        )
        # When the second worker stops while samples keep arriving
        producer = SteadyProducer(bootstrap_servers, topic, fleet_rounds(nodes, 100, 241), 0.1)
        producer.start()
        second.stop()
        producer.finish()
    finally:
        second.stop()
    # Then the first takes over its partitions and the totals hold every sample exactly once
    key = "hkgai-llm|H800|2026-11-28T01:00:00+00:00"
    try:
        latest = hourly_when(bootstrap_servers, topic_prefix, {key: 240 * 64})
    except AssertionError as error:
        why = diagnosis(bootstrap_servers, topic_prefix, metering)
        second_log = second.log_path.read_text(errors="replace").splitlines()
        marks = ("Recovery", "generation", "never reached", "WARNING")
        why += "\nsecond worker:\n" + "\n".join(
            line for line in second_log[-400:] if any(mark in line for mark in marks)
        )
        raise AssertionError(f"{error}\n{why}") from None
    assert Decimal(latest[key]["gpu_seconds"]) == Decimal(240 * 64 * 10)


def test_records_dropped_after_the_consumer_fetched_them_are_read_again_and_counted_once(
    bootstrap_servers: str, topic_prefix: str, tmp_path: Path
) -> None:
    # Given a worker whose Faust layer drops fetched usage records once each, from offset 10 of
    # every partition on (as Faust's getmany does around an assignment), so that the consumer's
    # position is past them and no later message reveals the gap
    worker = dropping_worker(
        bootstrap_servers, topic_prefix, tmp_path, {"GPUMETER_TEST_DROP_FROM": "10"}
    )
    try:
        # When 8 nodes send 60 rounds, and then nothing more
        nodes = [f"node-{n}" for n in range(8)]
        produce(bootstrap_servers, f"{topic_prefix}gpu.usage.v1", fleet_rounds(nodes, 1, 61))
        # Then every sample is counted exactly once, and the stall was noticed and reported
        key = "hkgai-llm|H800|2026-11-28T01:00:00+00:00"
        latest = hourly_or_diagnosis(bootstrap_servers, topic_prefix, {key: 60 * 64}, worker)
        assert Decimal(latest[key]["gpu_seconds"]) == Decimal(60 * 64 * 10)
        assert metric(worker, "gpumeter_metering_usage_stalls_total") >= 1
        log = worker.log_path.read_text(errors="replace")
        assert "were fetched but have not reached the stream" in log
    finally:
        worker.stop()


@pytest.mark.parametrize("committed", [True, False], ids=["committed", "never-committed"])
def test_a_restarted_worker_whose_first_fetched_records_are_dropped_reads_them_again_first(
    bootstrap_servers: str, topic_prefix: str, tmp_path: Path, committed: bool
) -> None:
    # Given a worker that counted 30 rounds of 8 nodes, committed them and stopped (or a group
    # that never committed anything)
    topic = f"{topic_prefix}gpu.usage.v1"
    nodes = [f"node-{n}" for n in range(8)]
    key = "hkgai-llm|H800|2026-11-28T01:00:00+00:00"
    if committed:
        first = metering_process(bootstrap_servers, topic_prefix, tmp_path / "first.log").start()
        try:
            produce(bootstrap_servers, topic, fleet_rounds(nodes, 1, 31))
            hourly_when(bootstrap_servers, topic_prefix, {key: 30 * 64})
        finally:
            first.stop()
    else:
        produce(bootstrap_servers, topic, fleet_rounds(nodes, 1, 31))
    # When 30 more rounds arrive while it is down, and the restarted worker's Faust layer drops
    # the first 5 records it fetches of every partition (as Faust's getmany does around an
    # assignment), so that its stream starts 5 past where the assignment started it
    produce(bootstrap_servers, topic, fleet_rounds(nodes, 31, 61))
    worker = dropping_worker(
        bootstrap_servers, topic_prefix, tmp_path, {"GPUMETER_TEST_DROP_FIRST": "5"}
    )
    try:
        # Then it reads them again before counting anything newer: every sample once, in order
        latest = hourly_or_diagnosis(bootstrap_servers, topic_prefix, {key: 60 * 64}, worker)
        assert Decimal(latest[key]["gpu_seconds"]) == Decimal(60 * 64 * 10)
        assert counted(worker) == (30 if committed else 60) * 64
        # (reading again may deliver some samples twice: those are duplicates, counted once)
        assert metric(worker, 'gpumeter_metering_samples_total{outcome="out_of_order"}') == 0
        log = worker.log_path.read_text(errors="replace")
        assert "reading it again from" in log, log[-3000:]
    finally:
        worker.stop()


def test_hostile_messages_each_get_their_own_dead_letter_and_counting_goes_on_on_every_key(
    metering: ServiceProcess, bootstrap_servers: str, topic_prefix: str
) -> None:
    # Given every kind of message a careless or hostile writer produces, on one node's key
    at = HOUR + timedelta(seconds=10)
    hostile = hostile_messages("node-h", at)
    topic = f"{topic_prefix}gpu.usage.v1"
    # When they are sent first, and good samples after them on the same key and on another
    produce(bootstrap_servers, topic, [(b"node-h", raw) for _, raw, _ in hostile])
    produce(
        bootstrap_servers,
        topic,
        [
            (b"node-h", json.dumps([sample("node-h", g, at) for g in range(4)]).encode()),
            (b"node-g", json.dumps([sample("node-g", g, at) for g in range(4)]).encode()),
        ],
    )
    # Then each hostile message is one dead letter with its own reason, its bytes kept
    dlq = read_topic(
        bootstrap_servers, f"{topic_prefix}gpu.usage.dlq.v1", lambda m: len(m) >= len(hostile)
    )
    letters = [json.loads(m.value) for m in dlq]
    assert sorted(letter["reason"] for letter in letters) == sorted(r for _, _, r in hostile)
    by_offset = {letter["offset"]: letter for letter in letters}
    assert len(by_offset) == len(hostile)
    first = min(by_offset)
    for i, (what, raw, reason) in enumerate(hostile):
        letter = by_offset[first + i]
        assert letter["reason"] == reason, what
        assert (
            base64.b64decode(letter["raw"]) == (raw or b"")[: len(base64.b64decode(letter["raw"]))]
        )
    # and the good samples behind them count, on both keys
    latest = hourly_when(
        bootstrap_servers, topic_prefix, {"hkgai-llm|H800|2026-11-28T01:00:00+00:00": 8}
    )
    assert Decimal(latest["hkgai-llm|H800|2026-11-28T01:00:00+00:00"]["gpu_seconds"]) == 80
    assert metering.healthy()
    text = httpx.get(f"http://127.0.0.1:{metering.http_port}/metrics", timeout=2).text
    assert 'gpumeter_metering_dead_letters_total{reason="internal_error"}' not in text


def test_health_turns_unhealthy_when_the_stream_stops_with_lag_and_names_the_partitions(
    bootstrap_servers: str, topic_prefix: str, tmp_path: Path
) -> None:
    # Given a worker whose stream never gets past offset 5 of any usage partition
    worker = dropping_worker(
        bootstrap_servers,
        topic_prefix,
        tmp_path,
        {
            "GPUMETER_TEST_DROP_FROM": "5",
            "GPUMETER_TEST_DROP_ALWAYS": "1",
            "STALL_UNHEALTHY_S": "10",
        },
    )
    try:
        assert worker.healthy()
        # When samples arrive that it cannot get to
        nodes = [f"node-{n}" for n in range(8)]
        produce(bootstrap_servers, f"{topic_prefix}gpu.usage.v1", fleet_rounds(nodes, 1, 21))

        # Then /healthz answers 503 within the stall time, saying which partitions are behind
        def stalled() -> dict:
            response = httpx.get(f"http://127.0.0.1:{worker.http_port}/healthz", timeout=2)
            return response.json() if response.status_code == 503 else {}

        report = wait_until(stalled, 60, what="metering /healthz to report the stall")
        assert report["status"] == "stalled" and report["lag"], report
        assert "nothing processed for" in report["detail"]
    finally:
        worker.stop()


def test_binary_content_mode_events_from_the_cloudevents_sdk_are_counted(
    metering: ServiceProcess, bootstrap_servers: str, topic_prefix: str
) -> None:
    from aiokafka import AIOKafkaProducer
    from cloudevents.core.bindings.kafka import to_binary
    from cloudevents.core.formats.json import JSONFormat
    from cloudevents.core.v1.event import CloudEvent

    # Given four GPUs' samples converted by the official SDK to Kafka binary content mode
    at = HOUR + timedelta(seconds=10)
    messages = []
    for gpu in range(4):
        structured = sample("node-b", gpu, at)
        attributes = {k: v for k, v in structured.items() if k != "data"}
        attributes["time"] = at
        attributes["partitionkey"] = "node-b"
        messages.append(
            to_binary(CloudEvent(attributes=attributes, data=structured["data"]), JSONFormat())
        )
    bad = to_binary(
        CloudEvent(
            attributes={**attributes, "id": "x|y", "time": at}, data=sample("node-b", 9, at)["data"]
        ),
        JSONFormat(),
    )

    # When a plain Kafka client sends them, headers and all
    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all")
        await producer.start()
        try:
            for message in [*messages, bad]:
                key = message.key.encode() if isinstance(message.key, str) else message.key
                await producer.send(
                    f"{topic_prefix}gpu.usage.v1",
                    key=key or b"node-b",
                    value=message.value,
                    headers=list(message.headers.items()),
                )
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(send())
    # Then the four count, and the bad one is a dead letter with its reason
    latest = hourly_when(
        bootstrap_servers, topic_prefix, {"hkgai-llm|H800|2026-11-28T01:00:00+00:00": 4}
    )
    assert Decimal(latest["hkgai-llm|H800|2026-11-28T01:00:00+00:00"]["gpu_seconds"]) == 40
    dlq = read_topic(bootstrap_servers, f"{topic_prefix}gpu.usage.dlq.v1", lambda m: len(m) >= 1)
    assert [json.loads(m.value)["reason"] for m in dlq] == ["invalid_text"]


def test_samples_redelivered_hours_later_are_counted_as_duplicates_not_dead_lettered(
    metering: ServiceProcess, bootstrap_servers: str, topic_prefix: str
) -> None:
    # Given a node that has sent three hours of samples, all counted
    topic = f"{topic_prefix}gpu.usage.v1"
    rounds = [
        (b"node-r", json.dumps(sample("node-r", 0, HOUR + timedelta(seconds=10 * i))).encode())
        for i in range(1, 3 * 360 + 1)
    ]
    produce(bootstrap_servers, topic, rounds)
    hourly_when(bootstrap_servers, topic_prefix, {"hkgai-llm|H800|2026-11-28T03:00:00+00:00": 360})
    # When an outside client delivers 200 of the oldest again
    produce(bootstrap_servers, topic, rounds[:200])

    # Then all 200 are duplicates in the metric, none a dead letter, and the totals do not move
    def duplicates() -> float:
        return metric(metering, 'gpumeter_metering_samples_total{outcome="duplicate"}')

    wait_until(lambda: duplicates() >= 200, 60, what="200 duplicates")
    assert duplicates() == 200
    with contextlib.suppress(AssertionError):
        read_topic(
            bootstrap_servers, f"{topic_prefix}gpu.usage.dlq.v1", lambda m: len(m) > 0, timeout_s=3
        )
        raise AssertionError("a redelivered sample was dead-lettered")
    latest = hourly_when(
        bootstrap_servers, topic_prefix, {"hkgai-llm|H800|2026-11-28T01:00:00+00:00": 360}
    )
    assert Decimal(latest["hkgai-llm|H800|2026-11-28T01:00:00+00:00"]["gpu_seconds"]) == 3600


def test_a_node_silent_past_the_retention_is_forgotten_then_deleted_and_counts_nothing_twice(
    bootstrap_servers: str, topic_prefix: str, tmp_path: Path
) -> None:
    # Given a worker with a short retention, and a node that reported an hour and fell silent
    worker = metering_process(
        bootstrap_servers,
        topic_prefix,
        tmp_path / "metering.log",
        env={
            "HOUR_RETENTION_S": "3600",
            "TABLE_RETENTION_S": "14400",
            "NODE_EXPIRY_CHECK_S": "1",
        },
    ).start()
    topic = f"{topic_prefix}gpu.usage.v1"
    changelog = f"{topic_prefix}gpumeter-metering-node-state-changelog"
    try:
        old = [
            (
                b"node-old",
                json.dumps(sample("node-old", 0, HOUR + timedelta(seconds=10 * i))).encode(),
            )
            for i in range(1, 361)
        ]
        produce(bootstrap_servers, topic, old)
        hourly_when(
            bootstrap_servers, topic_prefix, {"hkgai-llm|H800|2026-11-28T01:00:00+00:00": 360}
        )

        def node_old_records(messages: list) -> list:
            return [m for m in messages if m.key == b'"node-old"']

        # When another node reports four hours later, node-old is forgotten: a small record
        produce(
            bootstrap_servers,
            topic,
            [(b"node-new", json.dumps(sample("node-new", 0, HOUR + timedelta(hours=4))).encode())],
        )
        records = read_topic(
            bootstrap_servers,
            changelog,
            lambda m: any(r.value and b"floor_s" in r.value for r in node_old_records(m)),
        )
        forgotten = node_old_records(records)[-1].value
        assert len(forgotten) < 100 and b'"gpus"' not in forgotten, forgotten
        # and its redelivered samples count nothing: beyond the retention, not a second time
        produce(bootstrap_servers, topic, old[:10])
        dlq = read_topic(
            bootstrap_servers, f"{topic_prefix}gpu.usage.dlq.v1", lambda m: len(m) >= 10
        )
        assert {json.loads(m.value)["reason"] for m in dlq} == {"beyond_retention"}
        # When the centre is past the sums' retention too, its record is deleted (a tombstone)
        produce(
            bootstrap_servers,
            topic,
            [(b"node-new", json.dumps(sample("node-new", 0, HOUR + timedelta(hours=7))).encode())],
        )
        read_topic(
            bootstrap_servers,
            changelog,
            lambda m: bool(node_old_records(m)) and node_old_records(m)[-1].value is None,
        )
        latest = hourly_when(
            bootstrap_servers, topic_prefix, {"hkgai-llm|H800|2026-11-28T01:00:00+00:00": 360}
        )
        assert Decimal(latest["hkgai-llm|H800|2026-11-28T01:00:00+00:00"]["gpu_seconds"]) == 3600
        forgotten_total = "gpumeter_metering_nodes_forgotten_total"
        assert metric(worker, forgotten_total + '{stage="forgotten"}') == 1
        assert metric(worker, forgotten_total + '{stage="deleted"}') == 1
    finally:
        worker.stop()
