"""Which usage messages metering counts around rebalances and restarts, on plain offsets: a fake
partition, a fake clock, no Faust and no broker (services/metering/offsets.py). The SIGKILL and
two-worker tests reach these paths only by chance; these reach each one on purpose."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

from services.metering.offsets import Admit, UsageOffsets

TP = namedtuple("TP", "topic partition")
P0 = TP("gpu.usage.v1", 0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def offsets(committed: dict[Any, int] | None = None) -> tuple[UsageOffsets, Clock, list[int]]:
    clock = Clock()
    reads: list[int] = []
    tracker = UsageOffsets(
        held=set(),
        sought_at_assignment={},
        earliest_starts={},
        committed_of=lambda tp: (committed or {}).get(tp),
        on_read_again=lambda: reads.append(1),
        clock=clock,
        give_up_s=30.0,
    )
    return tracker, clock, reads


def feed(tracker: UsageOffsets, *offsets_: int) -> list[int]:
    """The offsets counted, of those delivered in this order."""
    return [o for o in offsets_ if tracker.admit(P0, o) is not None]


def test_a_partition_delivered_from_its_committed_offset_counts_everything_once() -> None:
    tracker, _, reads = offsets()
    tracker.sought_at_assignment[P0] = 100
    assert feed(tracker, 100, 101, 102) == [100, 101, 102]
    assert tracker.offset_due(P0) == 103
    assert (tracker.held, tracker.seeks_due, reads) == (set(), [], [])


def test_a_first_message_past_the_committed_offset_is_read_again_from_it() -> None:
    # Given a restart whose seek put the partition at 100, and a stream that starts at 105
    # (Faust dropped 100..104 with the queues its seek cleared)
    tracker, _, reads = offsets()
    tracker.sought_at_assignment[P0] = 100
    # Then 105 and what follows are not counted; the partition is held and sought to 100
    assert feed(tracker, 105, 106) == []
    assert P0 in tracker.held and tracker.seeks_due == [(P0, 100)] and reads == [1]
    assert tracker.offset_due(P0) == 100
    # When the seek takes effect, every message from 100 on is counted once, and the hold ends
    assert feed(tracker, 100, 101, 102, 103, 104, 105, 106) == [100, 101, 102, 103, 104, 105, 106]
    assert tracker.held == set()


def test_a_gap_in_the_stream_is_read_again_and_counted_once_when_it_comes() -> None:
    tracker, _, _ = offsets()
    tracker.sought_at_assignment[P0] = 0
    assert feed(tracker, 0, 1, 2) == [0, 1, 2]
    # 3 and 4 never reach the stream (dropped around a pause): 5 arrives where 3 was due
    assert feed(tracker, 5) == []
    assert tracker.seeks_due == [(P0, 3)] and P0 in tracker.held
    # Messages fetched before the seek took effect keep coming, and are skipped
    assert feed(tracker, 6, 7) == []
    assert feed(tracker, 3, 4, 5, 6, 7, 8) == [3, 4, 5, 6, 7, 8]
    assert tracker.offset_due(P0) == 9 and tracker.held == set()


def test_a_gap_that_never_comes_is_counted_as_lost_after_the_wait_and_counting_goes_on() -> None:
    tracker, clock, _ = offsets()
    tracker.sought_at_assignment[P0] = 0
    feed(tracker, 0, 1)
    assert feed(tracker, 4) == []  # 2 and 3 missing: read again from 2
    clock.now += 29.0
    assert feed(tracker, 4) == [] and not tracker.given_up(P0)
    clock.now += 2.0  # past the 30 s: deleted by retention, say
    assert tracker.given_up(P0)
    assert tracker.admit(P0, 4) == Admit(lost_from=2)
    assert tracker.held == set() and feed(tracker, 5) == [5]


def test_a_partition_never_committed_starts_at_its_earliest_offset() -> None:
    # Given a partition the group never committed, started at its earliest offset (50), and a
    # committed offset of 0 from Faust's seek (it seeks nowhere for "nothing committed")
    tracker, _, _ = offsets()
    tracker.sought_at_assignment[P0] = 0
    tracker.earliest_starts[P0] = 50
    assert tracker.assignment_start(P0) == 50
    # A first message past it is read again from 50, not from 0
    assert feed(tracker, 52) == [] and tracker.seeks_due == [(P0, 50)]
    assert feed(tracker, 50, 51, 52) == [50, 51, 52]


def test_messages_before_the_assignments_seek_are_held_until_it_is_known() -> None:
    tracker, _, _ = offsets()
    # Messages arrive before Faust sought the partition: not counted, the partition held
    assert feed(tracker, 140, 141) == []
    assert P0 in tracker.held and P0 in tracker.unsought and tracker.seeks_due == []
    # Once the seek is known (committed 120), the partition is read again from there
    tracker.sought_at_assignment[P0] = 120
    tracker.read_unsought_again()
    assert tracker.seeks_due == [(P0, 120)] and P0 not in tracker.unsought
    assert feed(tracker, 142) == []  # still from before the seek
    assert feed(tracker, 120, 121) == [120, 121]


def test_with_no_seek_at_all_the_partition_is_read_from_the_lower_of_first_and_committed() -> None:
    tracker, clock, _ = offsets(committed={P0: 130})
    assert feed(tracker, 140) == []
    tracker.read_unsought_again()
    assert tracker.seeks_due == []  # still waiting for the seek
    clock.now += 31.0
    tracker.read_unsought_again()
    assert tracker.seeks_due == [(P0, 130)]


def test_a_new_assignment_forgets_everything_of_the_last() -> None:
    tracker, _, _ = offsets()
    tracker.sought_at_assignment[P0] = 0
    feed(tracker, 0, 1, 5)
    assert tracker.held and tracker.seeks_due and tracker.reseeking
    tracker.reset()
    assert (tracker.held, tracker.seeks_due, tracker.reseeking, tracker.next_offset) == (
        set(),
        [],
        {},
        {},
    )
    assert tracker.sought_at_assignment == {} and tracker.offset_due(P0) is None


def test_reading_the_same_offset_again_keeps_the_first_deadline() -> None:
    tracker, clock, reads = offsets()
    tracker.read_again(P0, 10)
    first = tracker.reseeking[0][1]
    clock.now += 20
    tracker.read_again(P0, 10)  # the stall check asks again for the same offset
    assert tracker.reseeking[0][1] == first and len(reads) == 2
    tracker.read_again(P0, 11)  # another offset: a new deadline
    assert tracker.reseeking[0][1] == clock.now + 30.0
