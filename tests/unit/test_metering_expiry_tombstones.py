"""Expired sums leave real tombstones (null values) in their changelog, and a None restored from an
older changelog is dropped instead of crashing the agent (seen on Kafka in the three-node drill)."""

from __future__ import annotations

from typing import Any

from faust.serializers.codecs import dumps

from services.metering.stages import expire_sums


class Table:
    """The two things expire_sums uses of a Faust table: its data and send_changelog."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.sent: list[tuple[int | None, str, Any, Any]] = []

    def send_changelog(
        self, partition: int | None, key: str, value: Any, value_serializer: Any = None
    ) -> None:
        self.sent.append((partition, key, value, value_serializer))


def epoch_of(key: str) -> int:
    return int(key.split("|")[1])


def test_faust_writes_none_as_json_null_and_only_raw_none_as_a_tombstone() -> None:
    # The upstream behaviour the fix depends on: the table's JSON serializer turns None into bytes
    assert dumps("json", None) == b"null"
    assert dumps("raw", None) is None


def test_expired_sums_are_deleted_with_raw_tombstones_on_their_partition() -> None:
    table = Table(
        {
            "a|100": {"p": 2, "n": {}},
            "b|7000": {"p": 1, "n": {}},
            "c|50": {"p": 3, "n": {}},
        }
    )

    expire_sums(table, newest_epoch=7200, retention_s=3600, epoch_of=epoch_of)

    assert set(table.data) == {"b|7000"}
    assert sorted(table.sent) == [(2, "a|100", None, "raw"), (3, "c|50", None, "raw")]
    assert all(dumps(serializer, value) is None for _, _, value, serializer in table.sent)


def test_a_none_restored_from_an_old_changelog_is_dropped_without_a_crash() -> None:
    # A key restored from a `null` record written before the fix holds None
    table = Table({"a|100": None, "b|200": {"p": 0, "n": {}}})

    expire_sums(table, newest_epoch=7200, retention_s=3600, epoch_of=epoch_of)

    assert table.data == {}
    assert table.sent == [(0, "b|200", None, "raw")]  # nothing to delete twice for the None
