"""Metering's stages on plain values (services/metering/stages.py): messages as small objects, the
tables as dictionaries, the sender as a list. No Faust, no broker."""

from __future__ import annotations

import json
from collections import namedtuple
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from services.metering import domain
from services.metering.metrics import MeteringMetrics
from services.metering.offsets import UsageOffsets
from services.metering.stages import SumsStage, UsageLimits, UsageStage, UsageTopics
from tests.fixtures.factories import usage

TP = namedtuple("TP", "topic partition")
T0 = datetime(2026, 11, 30, 15, 0, 10, tzinfo=UTC)
NOW = T0 + timedelta(minutes=5)
TOPICS = UsageTopics(
    node_state_changelog="node-state-changelog",
    node_hourly="node-hourly",
    node_minutely="node-minutely",
    node_job_hourly="node-job-hourly",
    node_completeness="node-completeness",
    signals="signals",
    partitions=4,
)
LIMITS = UsageLimits(
    hour_retention_s=6 * 3600,
    minute_retention_s=900,
    max_gpus_per_node=64,
    max_hour_keys_per_node=1024,
)


@dataclass
class Message:
    offset: int
    value: bytes | None
    partition: int = 0
    topic: str = "gpu.usage.v1"
    key: bytes | None = None
    headers: Any = None

    @property
    def tp(self) -> TP:
        return TP(self.topic, self.partition)


@dataclass
class Sender:
    records: list[tuple[str, bytes | None, bytes | None, int | None]] = field(default_factory=list)

    def add(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None
    ) -> None:
        self.records.append((topic, key, value, partition))

    def to(self, topic: str) -> list[tuple[bytes | None, bytes | None, int | None]]:
        return [(k, v, p) for t, k, v, p in self.records if t == topic]

    def partials(self, topic: str) -> list[list[Any]]:
        return [entry for _, value, _ in self.to(topic) for entry in json.loads(value or b"[]")]


def stage(states: dict[str, bytes] | None = None) -> tuple[UsageStage, Sender, list[bytes]]:
    sender = Sender()
    letters: list[bytes] = []
    # Every partition sought to offset 0 at the assignment (services/metering/offsets.py).
    sought = {TP("gpu.usage.v1", partition): 0 for partition in range(4)}
    offsets = UsageOffsets(set(), sought, {}, committed_of=lambda tp: None)
    usage_stage = UsageStage(
        states={} if states is None else states,
        sender=sender,
        topics=TOPICS,
        limits=LIMITS,
        offsets=offsets,
        metrics=MeteringMetrics(),
        publish_dead_letter=lambda key, value: letters.append(value),
    )
    return usage_stage, sender, letters


def event(node: str, gpu: int, at: datetime, **fields: Any) -> bytes:
    return json.dumps(usage(node, gpu, at, **fields)).encode()


def test_a_batch_becomes_partials_a_signal_and_a_state_written_at_the_commit() -> None:
    usage_stage, sender, letters = stage()
    messages = [Message(o, event("n1", g, T0)) for o, g in enumerate(range(2))]
    usage_stage.process(messages, NOW)

    hours = sender.partials(TOPICS.node_hourly)
    assert [(key, node) for key, node, _ in hours] == [
        ("hkgai-llm|H800|2026-11-30T15:00:00+00:00", "n1")
    ]
    assert hours[0][2] == {"gpu_s": "20", "util_s": "10", "energy_J": "6000", "samples": 2}
    assert sender.partials(TOPICS.node_job_hourly) == []  # per-job partials go at the commit
    minutes = sender.partials(TOPICS.node_minutely)
    assert minutes[0][2]["gpus"] == 2 and minutes[0][2]["alloc"] == 2
    assert [fact for _, _, fact in sender.partials(TOPICS.node_completeness)] == [
        {"through": False, "rev": 2}
    ]
    assert len(sender.to(TOPICS.signals)) == 1
    assert sender.to(TOPICS.node_state_changelog) == []  # not before the commit
    assert letters == []

    usage_stage.queue_dirty_states()
    [(job_key, _node, job)] = sender.partials(TOPICS.node_job_hourly)
    assert job_key == "hkgai-llm|slurm:1|H800|2026-11-30T15:00:00+00:00"
    assert job == {"gpu_s": "20", "util_s": "10", "energy_J": "6000", "idle_s": "0", "samples": 2}
    [(key, record, partition)] = sender.to(TOPICS.node_state_changelog)
    assert key == b'"n1"' and partition == 0
    assert usage_stage.states["n1"] == record
    assert json.loads(record or b"")["counted"] == 2
    usage_stage.queue_dirty_states()  # nothing changed since: nothing written again
    assert len(sender.to(TOPICS.node_state_changelog)) == 1


def test_a_message_delivered_twice_counts_once() -> None:
    usage_stage, sender, _ = stage()
    value = event("n1", 0, T0)
    usage_stage.process([Message(0, value)], NOW)
    usage_stage.process([Message(1, value)], NOW)  # the agent's spool sent it again
    last_partial = sender.partials(TOPICS.node_hourly)[-1][2]
    assert last_partial["samples"] == 1 and last_partial["gpu_s"] == "10"


def test_bad_messages_are_dead_lettered_and_the_rest_of_the_batch_counts() -> None:
    usage_stage, sender, letters = stage()
    usage_stage.process(
        [Message(0, b"{not json"), Message(1, event("n1", 0, T0)), Message(2, None)], NOW
    )
    reasons = [json.loads(letter)["reason"] for letter in letters]
    assert len(reasons) == 2 and all(reasons)
    assert sender.partials(TOPICS.node_hourly)[0][2]["samples"] == 1


def test_an_unforeseen_error_is_one_internal_error_dead_letter_not_a_crash(
    monkeypatch: Any,
) -> None:
    usage_stage, _, letters = stage()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(domain.NodeState, "apply", broken)
    usage_stage.process([Message(0, event("n1", 0, T0)), Message(1, event("n1", 1, T0))], NOW)
    letters_read = [json.loads(letter) for letter in letters]
    assert [letter["reason"] for letter in letters_read] == ["internal_error"] * 2
    assert "ZeroDivisionError: a bug" in letters_read[0]["detail"]


def test_after_an_assignment_the_restored_states_partials_are_sent_again_once_recovered() -> None:
    first, first_sender, _ = stage()
    first.process([Message(0, event("n1", 0, T0))], NOW)
    first.queue_dirty_states()
    states = dict(first.states)

    restarted, sender, _ = stage(states)
    restarted.on_assigned()
    assert not restarted.resend_due()  # not from a state still being restored
    restarted.recovered = True
    assert restarted.resend_due()
    restarted.process([], NOW)
    assert sender.partials(TOPICS.node_hourly) == first_sender.partials(TOPICS.node_hourly)
    assert not restarted.resend_due()


def test_an_assignment_writes_what_was_dirty_before_dropping_the_live_states() -> None:
    usage_stage, sender, _ = stage()
    usage_stage.process([Message(0, event("n1", 0, T0))], NOW)
    usage_stage.on_assigned()
    assert len(sender.to(TOPICS.node_state_changelog)) == 1
    assert usage_stage.live_states == {} and usage_stage.dirty_states == {}


def test_silent_nodes_are_forgotten_then_deleted_only_on_this_workers_partitions() -> None:
    usage_stage, sender, _ = stage()
    usage_stage.process([Message(0, event("quiet", 0, T0), partition=1)], NOW)
    later = T0 + timedelta(hours=8)
    usage_stage.process([Message(1, event("busy", 0, later), partition=1)], later)
    usage_stage.queue_dirty_states()

    assert usage_stage.forget_silent({0}, table_retention_s=35 * 86400) == 0  # not my partition
    assert usage_stage.forget_silent({1}, table_retention_s=35 * 86400) == 1
    forgotten = json.loads(usage_stage.states["quiet"])
    assert set(forgotten) == {"floor_s", "partition"}
    assert json.loads(sender.to(TOPICS.node_state_changelog)[-1][1] or b"") == forgotten

    assert usage_stage.forget_silent({1}, table_retention_s=3600) == 1  # past the sums' retention
    assert "quiet" not in usage_stage.states
    assert sender.to(TOPICS.node_state_changelog)[-1] == (b'"quiet"', None, 1)  # a tombstone


class Table:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.changelog: list[tuple[int | None, str, Any]] = []

    def send_changelog(
        self, partition: int | None, key: Any, value: Any, *a: Any, **k: Any
    ) -> None:
        self.changelog.append((partition, key, value))


def partials_message(
    offset: int, *entries: tuple[str, str, dict[str, Any]], partition: int = 2
) -> Message:
    return Message(offset, json.dumps([list(e) for e in entries]).encode(), partition=partition)


def test_sums_keep_each_nodes_latest_partial_and_emit_each_touched_key_once() -> None:
    table = Table()
    emitted: list[tuple[str, Any]] = []
    sums = SumsStage(
        "hourly",
        table,
        merge=domain.merge_partial,
        emit=lambda key, record: emitted.append((key, domain.hourly_total(key, record))),
        epoch_of=domain.hour_of_key,
        retention_s=3600,
        expire_every=1,
        metrics=MeteringMetrics(),
    )
    key = "p1|H800|2026-11-30T15:00:00+00:00"

    def partial(gpu_s: str, samples: int) -> dict[str, Any]:
        return {"gpu_s": gpu_s, "util_s": "0", "energy_J": "0", "samples": samples}

    sums.process(
        [
            partials_message(0, (key, "n1", partial("10", 1)), (key, "n2", partial("10", 1))),
            partials_message(1, (key, "n1", partial("20", 2))),
            partials_message(2, (key, "n1", partial("10", 1))),  # an older state, re-sent
        ]
    )
    assert [(k, total.gpu_seconds, total.samples) for k, total in emitted] == [
        (key, Decimal("30"), 3)
    ]
    assert [(p, k) for p, k, _ in table.changelog] == [(2, key)]  # once per key and batch

    later = "p1|H800|2026-11-30T18:00:00+00:00"
    sums.process([partials_message(3, (later, "n1", partial("10", 1)))])
    assert key not in table.data  # older than the retention before the newest touched
    assert table.changelog[-1] == (2, key, None)
