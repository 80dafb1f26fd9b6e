"""The agent's on-disk spool: order, bounds, restarts, and what a crash can leave behind."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from services.agent.spool import (
    Spool,
    SpoolCorrupt,
    SpoolLocked,
    encode_record,
    spooled_events,
    spooled_files,
)


def events(node: str, at: int, gpus: int = 2) -> list[dict]:
    return [{"id": f"{node}/gpu-{g}/{at}", "time": at} for g in range(gpus)]


def times(records: list) -> list[int]:
    return [json.loads(value)[0]["time"] for record in records for _key, value in record.messages]


def test_records_come_back_in_the_order_they_were_written_with_one_message_per_node(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, fsync=False)
    for at in (10, 20, 30):
        assert spool.append([("node-a", events("node-a", at)), ("node-b", events("node-b", at))])

    records = spool.peek(10)

    assert [r.seq for r in records] == [1, 2, 3]
    assert [key for key, _ in records[0].messages] == ["node-a", "node-b"]
    assert times(records) == [10, 10, 20, 20, 30, 30]
    assert spool.samples == 12 and len(spool) == 3


def test_a_record_leaves_only_when_acknowledged_and_a_restart_replays_the_rest_in_order(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    for at in range(10, 60, 10):
        spool.append([("node-a", events("node-a", at))])
    assert spool.remove_through(spool.peek(2)[-1].seq) == 4
    spool.close()

    reopened = Spool(tmp_path, max_bytes=1 << 20)
    reopened.append([("node-a", events("node-a", 60))])

    assert times(reopened.peek(10)) == [30, 40, 50, 60]
    assert reopened.samples == 8
    assert reopened.bytes == sum(path.stat().st_size for path, _ in spooled_files(tmp_path))


def test_when_full_the_oldest_samples_are_kept_and_the_newest_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    one_record = len(encode_record([("node-a", events("node-a", 100))]))
    spool = Spool(tmp_path, max_bytes=one_record * 10, fsync=False)

    with caplog.at_level(logging.WARNING):
        accepted = [spool.append([("node-a", events("node-a", at))]) for at in range(100, 220, 10)]

    assert accepted == [True] * 10 + [False, False]
    assert times(spool.peek(20)) == list(range(100, 200, 10))
    assert spool.bytes <= spool.max_bytes
    warnings = [r.getMessage() for r in caplog.records if "full" in r.getMessage()]
    assert [w.split(" is ")[1].split("%")[0] for w in warnings] == ["50", "80", "100"]
    spool.remove_through(1)
    assert spool.append([("node-a", events("node-a", 220))])


def test_a_write_interrupted_by_a_crash_is_discarded_at_start(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append([("node-a", events("node-a", 10))])
    (tmp_path / ".tmp-0000000000000002-2.rec").write_text('{"crc32": "0000", "mess')
    spool.close()

    reopened = Spool(tmp_path, max_bytes=1 << 20)

    assert times(reopened.peek(10)) == [10]
    assert not list(tmp_path.glob(".tmp-*"))
    reopened.append([("node-a", events("node-a", 20))])
    assert [r.seq for r in reopened.peek(10)] == [1, 2]


def test_an_unreadable_record_is_reported_once_the_good_ones_before_it_are_handed_out(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    for at in (10, 20, 30):
        spool.append([("node-a", events("node-a", at))])
    (tmp_path / "0000000000000002-2.rec").write_bytes(
        encode_record([("node-a", events("node-a", 20))]).replace(b"/gpu-1/", b"/gpu-7/")
    )

    assert times(spool.peek(10)) == [10]
    spool.remove_through(1)
    with pytest.raises(SpoolCorrupt) as raised:
        spool.peek(10)
    assert raised.value.entry.seq == 2 and raised.value.entry.samples == 2
    spool.remove_through(raised.value.entry.seq)
    assert times(spool.peek(10)) == [30]


def test_a_record_is_each_node_s_batch_as_the_bytes_that_go_to_kafka(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, fsync=False)
    batch = events("node-a", 10)
    spool.append([("node-a", batch), ("node-b", events("node-b", 10))])

    (record,) = spool.peek(10)

    assert record.messages[0] == ("node-a", json.dumps(batch, separators=(",", ":")).encode())
    assert [e["id"] for e in spooled_events(tmp_path)] == [
        "node-a/gpu-0/10",
        "node-a/gpu-1/10",
        "node-b/gpu-0/10",
        "node-b/gpu-1/10",
    ]
    assert [samples for _, samples in spooled_files(tmp_path)] == [4]


def test_records_an_earlier_version_left_in_the_spool_are_replayed_first(tmp_path: Path) -> None:
    earlier = [{"key": "node-a", "events": events("node-a", 10)}]
    (tmp_path / "0000000000000001-2.json").write_text(json.dumps(earlier))

    spool = Spool(tmp_path, max_bytes=1 << 20, fsync=False)
    spool.append([("node-a", events("node-a", 20))])

    assert times(spool.peek(10)) == [10, 20]
    assert [r.seq for r in spool.peek(10)] == [1, 2]
    assert spool.samples == 4


def test_a_second_agent_cannot_open_a_spool_in_use(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, fsync=False)

    with pytest.raises(SpoolLocked):
        Spool(tmp_path, max_bytes=1 << 20, fsync=False)

    spool.close()
    with Spool(tmp_path, max_bytes=1 << 20, fsync=False) as reopened:
        assert len(reopened) == 0


def test_a_peek_is_bounded_by_bytes_but_always_hands_out_the_oldest_record(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, fsync=False)
    for at in (10, 20, 30):
        spool.append([("node-a", events("node-a", at))])
    one_record = spool.bytes // 3

    assert len(spool.peek(10, max_bytes=2 * one_record)) == 2
    assert len(spool.peek(10, max_bytes=1)) == 1
