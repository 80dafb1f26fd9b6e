"""The agent's sender without a broker: how spooled rounds become Kafka messages (a node's rounds
joined, in order, bounded in bytes), which records an acknowledgement removes, and what a failure
in the middle of a send leaves for the next one. A fake producer stands in for kafka-python."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, RequestTimedOutError

from gpumeter.localstack import free_port
from schemas.codec import decode_usage_message
from schemas.usage import MAX_MESSAGE_BYTES as USAGE_MAX_MESSAGE_BYTES
from services.agent.publisher import (
    BATCH_ROUNDS,
    MAX_MESSAGE_BYTES,
    AgentMetrics,
    Delivery,
    coalesce,
    kafka_producer_factory,
)
from services.agent.simulator import FleetConfig, FleetSimulator
from services.agent.spool import Spool, SpoolRecord

Sent = tuple[str, bytes]
Fails = Callable[[int, str, list[dict]], Exception | None]


def round_of(at: int, gpus: int = 4, nodes: tuple[str, ...] = ("node-a",)) -> dict[str, list]:
    return {
        node: [
            {"id": f"{node}/gpu-{g}/{at}", "subject": f"{node}-gpu-{g}", "time": at}
            for g in range(gpus)
        ]
        for node in nodes
    }


def value(metrics: AgentMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels or None) or 0.0


class Future:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def get(self, timeout: float | None = None) -> None:
        if self.error is not None:
            raise self.error


class FakeProducer:
    """Records what the broker may have: every send except those it refused as too large (a
    timed-out one may have arrived). `fails(n, key, events)` says how the n-th send of the test
    (0-based, over all its producers) fails, or None for an acknowledgement."""

    def __init__(
        self, log: list[Sent], attempts: list[int], fails: Fails, raises_on_send: bool
    ) -> None:
        self.log = log
        self.attempts = attempts
        self.fails = fails
        self.raises_on_send = raises_on_send

    def send(self, topic: str, value: bytes, key: bytes) -> Future:
        error = self.fails(len(self.attempts), key.decode(), json.loads(value))
        self.attempts.append(1)
        if error is not None and self.raises_on_send:
            raise error
        if not isinstance(error, MessageSizeTooLargeError):
            self.log.append((key.decode(), value))
        return Future(error)

    def close(self, timeout: float | None = None) -> None:
        pass


def delivery_with(
    spool: Spool,
    fails: Fails = lambda n, key, events: None,
    raises_on_send: bool = False,
    **options: int,
) -> tuple[Delivery, list[Sent], AgentMetrics]:
    sent: list[Sent] = []
    attempts: list[int] = []
    metrics = AgentMetrics()
    delivery = Delivery(
        spool,
        "gpu.usage.v1",
        metrics,
        lambda: FakeProducer(sent, attempts, fails, raises_on_send),
        **options,  # type: ignore[arg-type]
    )
    return delivery, sent, metrics


def send_once(delivery: Delivery) -> bool:
    return delivery._send(delivery.spool.peek(delivery.batch_rounds, delivery.batch_bytes))


def drain(delivery: Delivery, attempts: int = 50) -> None:
    for _ in range(attempts):
        if not len(delivery.spool):
            return
        send_once(delivery)
    raise AssertionError(f"{delivery.spool.samples} samples still spooled")


def compact_size(events: list[dict]) -> int:
    return len(json.dumps(events, separators=(",", ":")))


def events_of(sent: list[Sent]) -> list[dict]:
    return [event for _, value in sent for event in json.loads(value)]


def first_deliveries(sent: list[Sent]) -> dict[str, list[int]]:
    """Per GPU, the times of first deliveries in the order they were sent."""
    seen: set[str] = set()
    times: dict[str, list[int]] = {}
    for event in events_of(sent):
        if event["id"] not in seen:
            seen.add(event["id"])
            times.setdefault(event["subject"], []).append(event["time"])
    return times


def spool_of(tmp_path: Path, rounds: range, **round_options: object) -> Spool:
    spool = Spool(tmp_path / "spool", max_bytes=1 << 30, fsync=False)
    for at in rounds:
        per_node = round_of(at, **round_options)  # type: ignore[arg-type]
        spool.append(list(per_node.items()))
    return spool


# --- joining rounds into messages -------------------------------------------------------------


def records_of(rounds: list[dict[str, list]]) -> list[SpoolRecord]:
    return [
        SpoolRecord(
            seq,
            [
                (node, json.dumps(events, separators=(",", ":")).encode())
                for node, events in per_node.items()
            ],
            sum(map(len, per_node.values())),
        )
        for seq, per_node in enumerate(rounds, start=1)
    ]


def test_each_node_gets_one_message_holding_its_events_of_every_round_in_spool_order() -> None:
    rounds = [round_of(at, nodes=("node-a", "node-b")) for at in (10, 20, 30)]

    messages = coalesce(records_of(rounds), MAX_MESSAGE_BYTES)

    assert [(m.key, m.first, m.last) for m in messages] == [("node-a", 0, 2), ("node-b", 0, 2)]
    for message in messages:
        assert json.loads(message.value) == [e for r in rounds for e in r[message.key]]


def test_a_message_never_passes_the_byte_bound_and_a_node_s_pieces_keep_their_order() -> None:
    rounds = [round_of(at, nodes=("node-a", "node-b")) for at in range(1010, 1210, 10)]
    bound = 3 * compact_size(rounds[0]["node-a"]) + 10  # room for three rounds of a node, not four

    messages = coalesce(records_of(rounds), bound)

    assert all(len(m.value) <= bound for m in messages)
    for node in ("node-a", "node-b"):
        pieces = [m for m in messages if m.key == node]
        assert [(m.first, m.last) for m in pieces] == [(i, min(i + 2, 19)) for i in range(0, 20, 3)]
        assert [e for m in pieces for e in json.loads(m.value)] == [
            e for r in rounds for e in r[node]
        ]
    assert [m.first for m in messages] == sorted(m.first for m in messages)


def test_a_round_larger_than_the_bound_goes_alone_and_whole() -> None:
    rounds = [round_of(10, gpus=2), round_of(20, gpus=50), round_of(30, gpus=2)]
    bound = compact_size(rounds[0]["node-a"]) * 3

    messages = coalesce(records_of(rounds), bound)

    assert [(m.first, m.last) for m in messages] == [(0, 0), (1, 1), (2, 2)]
    assert len(json.loads(messages[1].value)) == 50


def test_a_joined_message_is_a_cloudevents_batch_metering_accepts() -> None:
    fleet = FleetSimulator(FleetConfig(nodes=2, interval_s=60))
    start = datetime(2026, 11, 28, tzinfo=UTC)
    rounds = [fleet.round(start + timedelta(minutes=i)) for i in range(1, BATCH_ROUNDS + 1)]

    messages = coalesce(records_of(rounds), MAX_MESSAGE_BYTES)

    assert len(messages) == 2
    for message in messages:
        assert len(message.value) <= USAGE_MAX_MESSAGE_BYTES // 2
        decoded = decode_usage_message(
            message.value, now=start + timedelta(hours=1), key=message.key.encode()
        )
        assert not decoded.errors
        assert len(decoded.events) == 8 * BATCH_ROUNDS


# --- acknowledgements and failures ------------------------------------------------------------


def test_a_send_joins_the_spooled_rounds_and_removes_them_once_all_are_acknowledged(
    tmp_path: Path,
) -> None:
    spool = spool_of(tmp_path, range(10, 110, 10), nodes=("node-a", "node-b"))
    delivery, sent, metrics = delivery_with(spool)

    assert send_once(delivery)

    assert [key for key, _ in sent] == ["node-a", "node-b"]
    assert first_deliveries(sent)["node-a-gpu-0"] == list(range(10, 110, 10))
    assert len(spool) == 0 and spool.samples == 0
    assert value(metrics, "gpumeter_agent_samples_sent_total") == 10 * 2 * 4
    assert delivery.broker_up is True


def test_one_send_takes_at_most_the_rounds_a_redelivery_may_repeat(tmp_path: Path) -> None:
    spool = spool_of(tmp_path, range(1, 101))
    delivery, sent, _ = delivery_with(spool)

    assert send_once(delivery)

    assert len(json.loads(sent[0][1])) == BATCH_ROUNDS * 4
    assert len(spool) == 100 - BATCH_ROUNDS


def test_a_failure_mid_send_removes_only_the_records_every_message_of_which_was_acknowledged(
    tmp_path: Path,
) -> None:
    # Given 6 rounds of two nodes, each node's events joined two rounds to a message
    spool = spool_of(tmp_path, range(10, 70, 10), nodes=("node-a", "node-b"))
    timed_out: list[int] = []

    def fails(n: int, key: str, events: list[dict]) -> Exception | None:
        if key == "node-a" and events[0]["time"] == 50 and not timed_out:
            timed_out.append(n)  # node-a's rounds 50 and 60: the first attempt times out
            return RequestTimedOutError()
        return None

    bound = 2 * compact_size(round_of(10)["node-a"]) + 10
    delivery, sent, metrics = delivery_with(spool, fails, max_message_bytes=bound)

    # When one send goes out
    assert not send_once(delivery)

    # Then the rounds all of whose messages were acknowledged left the spool, the rest stayed
    assert [(key, json.loads(v)[0]["time"]) for key, v in sent] == [
        ("node-a", 10),
        ("node-b", 10),
        ("node-a", 30),
        ("node-b", 30),
        ("node-a", 50),
        ("node-b", 50),
    ]
    assert [json.loads(v)[0]["time"] for _, v in spool.peek(10)[0].messages] == [50, 50]
    assert len(spool) == 2
    assert value(metrics, "gpumeter_agent_samples_sent_total") == 4 * 2 * 4
    assert delivery.broker_up is False
    assert value(metrics, "gpumeter_agent_send_failures_total", reason="RequestTimedOutError") == 1

    # And the next send starts over from the oldest unacknowledged round, with a fresh producer
    drain(delivery)
    assert [(key, json.loads(v)[0]["time"]) for key, v in sent[6:]] == [
        ("node-a", 50),
        ("node-b", 50),
    ]
    for gpu, times in first_deliveries(sent).items():
        assert times == list(range(10, 70, 10)), gpu
    assert len(spool) == 0
    assert value(metrics, "gpumeter_agent_samples_sent_total") == 6 * 2 * 4


def test_a_round_stays_spooled_until_the_message_of_every_node_holding_it_is_acknowledged(
    tmp_path: Path,
) -> None:
    # Given 6 rounds of a big node (split into messages of 2 rounds) and a small one (one message)
    spool = Spool(tmp_path / "spool", max_bytes=1 << 30, fsync=False)
    for at in range(10, 70, 10):
        big, small = (
            round_of(at, gpus=8, nodes=("node-a",)),
            round_of(at, gpus=1, nodes=("node-b",)),
        )
        spool.append([*big.items(), *small.items()])
    bound = 2 * compact_size(round_of(10, gpus=8)["node-a"]) + 10

    def fails(n: int, key: str, events: list[dict]) -> Exception | None:
        first_attempt = n < 4
        failing = key == "node-b" or events[0]["time"] == 30  # and node-a's rounds 30, 40
        return RequestTimedOutError() if first_attempt and failing else None

    delivery, sent, _ = delivery_with(spool, fails, max_message_bytes=bound)

    # When node-a's first message is acknowledged and the small node's one is not
    assert not send_once(delivery)

    # Then no round has left the spool: each still has events waiting for an acknowledgement
    assert sorted(key for key, _ in sent) == ["node-a"] * 3 + ["node-b"]
    assert len(spool) == 6
    drain(delivery)
    for gpu, times in first_deliveries(sent).items():
        assert times == list(range(10, 70, 10)), gpu


def test_a_failed_first_message_keeps_every_record_it_holds_and_the_retry_repeats_the_rest(
    tmp_path: Path,
) -> None:
    spool = spool_of(tmp_path, range(10, 50, 10), nodes=("node-a", "node-b"))
    delivery, sent, _ = delivery_with(
        spool, lambda n, key, events: RequestTimedOutError() if n == 0 else None
    )

    assert not send_once(delivery)
    assert len(spool) == 4  # node-a's message held rounds 10..40: none is wholly delivered

    drain(delivery)
    # both nodes' messages went out again (node-b's a re-delivery of the same ids), in order
    assert [key for key, _ in sent] == ["node-a", "node-b", "node-a", "node-b"]
    for gpu, times in first_deliveries(sent).items():
        assert times == [10, 20, 30, 40], gpu
    assert len(spool) == 0


def test_a_send_refused_before_it_left_removes_what_was_acknowledged_before_it(
    tmp_path: Path,
) -> None:
    spool = spool_of(tmp_path, range(10, 70, 10))
    one_round = compact_size(round_of(10)["node-a"])
    delivery, sent, _ = delivery_with(
        spool,
        lambda n, key, events: KafkaTimeoutError("buffer") if n == 1 else None,
        raises_on_send=True,
        max_message_bytes=3 * one_round + 10,
    )

    assert not send_once(delivery)

    assert len(sent) == 1 and len(spool) == 3
    drain(delivery)
    assert first_deliveries(sent)["node-a-gpu-0"] == list(range(10, 70, 10))


def test_a_message_the_broker_refuses_as_too_large_is_split_and_nothing_is_dropped(
    tmp_path: Path,
) -> None:
    spool = spool_of(tmp_path, range(10, 90, 10))
    one_round = compact_size(round_of(10)["node-a"])

    def fails(n: int, key: str, events: list[dict]) -> Exception | None:
        return MessageSizeTooLargeError() if compact_size(events) > 3 * one_round else None

    delivery, sent, metrics = delivery_with(spool, fails)

    drain(delivery)

    assert all(compact_size(json.loads(v)) <= 3 * one_round for _, v in sent)
    assert first_deliveries(sent)["node-a-gpu-0"] == list(range(10, 90, 10))
    assert value(metrics, "gpumeter_agent_samples_dropped_total", reason="too_large") == 0
    assert delivery.broker_up is not False


def test_a_single_round_the_broker_refuses_as_too_large_is_dropped_and_counted(
    tmp_path: Path,
) -> None:
    spool = spool_of(tmp_path, range(10, 50, 10))

    def fails(n: int, key: str, events: list[dict]) -> Exception | None:
        return MessageSizeTooLargeError() if any(e["time"] == 20 for e in events) else None

    delivery, sent, metrics = delivery_with(spool, fails)

    drain(delivery)

    assert value(metrics, "gpumeter_agent_samples_dropped_total", reason="too_large") == 4
    assert first_deliveries(sent)["node-a-gpu-0"] == [10, 30, 40]


def test_the_sender_survives_an_error_nobody_foresaw_and_delivers_afterwards(
    tmp_path: Path,
) -> None:
    spool = spool_of(tmp_path, range(10, 40, 10))
    sent: list[Sent] = []
    attempts: list[int] = []
    factories: list[int] = []

    def factory() -> FakeProducer:
        factories.append(1)
        if len(factories) == 1:
            raise ValueError("Unrecognized configs")  # say, a kafka-python upgrade
        return FakeProducer(sent, attempts, lambda n, key, events: None, False)

    metrics = AgentMetrics()
    delivery = Delivery(spool, "gpu.usage.v1", metrics, factory, backoff_s=(0.01, 0.02)).start()
    try:
        deadline = time.monotonic() + 10
        while len(spool) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        delivery.close(0)

    assert len(spool) == 0
    assert first_deliveries(sent)["node-a-gpu-0"] == [10, 20, 30]
    assert value(metrics, "gpumeter_agent_send_failures_total", reason="ValueError") == 1


# --- settings of the real producer and the spool bound ----------------------------------------


def test_the_producer_is_idempotent_compresses_and_batches_whole_joined_messages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kafka import KafkaProducer

    created: list[dict] = []
    monkeypatch.setattr(
        "services.agent.publisher.KafkaProducer", lambda **config: created.append(config)
    )

    kafka_producer_factory("127.0.0.1:9092", 2000)()

    (config,) = created
    assert set(config) <= set(KafkaProducer.DEFAULT_CONFIG), "a setting kafka-python lacks"
    assert config["acks"] == "all" and config["enable_idempotence"] is True
    assert config["compression_type"] == "gzip"
    assert config["batch_size"] >= MAX_MESSAGE_BYTES
    assert KafkaProducer.DEFAULT_CONFIG["max_request_size"] >= MAX_MESSAGE_BYTES
    assert MAX_MESSAGE_BYTES <= USAGE_MAX_MESSAGE_BYTES // 2


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
