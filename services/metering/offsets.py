"""Which usage messages metering counts, around rebalances and restarts: plain offsets in, a
decision out, no Faust (the consumer's seeks are queued for the app to perform).

The broker's offsets are contiguous on gpu.usage.v1, so metering knows which offset each
partition must deliver next. Faust does not always deliver it (docs/scaling.md, "Faust's
fixes"): it drops what it fetched around an assignment, resumes streams before it seeks them,
and its commits can pass over a skipped message. So:

- the first message of a partition since the assignment must be where the assignment started it
  (the committed offset Faust sought it to, or the earliest offset of a partition never
  committed); one that arrives before that seek is known is held (not counted) until it is;
- a message past the one due makes the partition be read again from the one due: it is held
  (nothing committed past it, see `transport.Consumer._new_offset`) and messages past
  that offset are skipped until the seek takes effect;
- after `give_up_s` without the message due (deleted by retention), the gap is counted as lost
  and logged, and counting goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# How long a held partition waits for the skipped message before it is reported lost (a message
# deleted by retention never comes back) and commits go on.
RESEEK_GIVE_UP_S = 30.0


@dataclass(frozen=True)
class Admit:
    """Count the message; `lost_from` is the first offset of a gap given up on before it."""

    lost_from: int | None = None


SKIP = None  # not counted now: it comes again after a seek


class UsageOffsets:
    """Per usage partition: the offset due next, partitions being read again, and partitions
    whose first messages came before the assignment's seek.

    `held` is the set the commit fix reads (nothing is committed past a held partition's
    committed offset); `sought_at_assignment` and `earliest_starts` are filled in by the seek
    fixes; `committed_of(tp)` is the consumer's committed offset, if any; `on_read_again` is
    called for each partition sent back (a metric)."""

    def __init__(
        self,
        held: set[Any],
        sought_at_assignment: dict[Any, int],
        earliest_starts: dict[Any, int],
        committed_of: Callable[[Any], int | None],
        on_read_again: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        give_up_s: float = RESEEK_GIVE_UP_S,
    ) -> None:
        self.held = held
        self.sought_at_assignment = sought_at_assignment
        self.earliest_starts = earliest_starts
        self.committed_of = committed_of
        self.on_read_again = on_read_again
        self.clock = clock
        self.give_up_s = give_up_s
        # The next usage offset each partition should deliver, to notice messages skipped over.
        self.next_offset: dict[int, int] = {}
        # Partitions read again from an offset: (that offset, when to give up).
        self.reseeking: dict[int, tuple[int, float]] = {}
        # Seeks for the app to perform on the consumer: (partition, offset).
        self.seeks_due: list[tuple[Any, int]] = []
        # Partitions with messages that arrived before the assignment's seek: (the first such
        # offset, since when). They are read again from where the seek started them.
        self.unsought: dict[Any, tuple[int, float]] = {}

    def reset(self) -> None:
        """A new assignment: the streams restart from the committed offsets."""
        self.next_offset.clear()
        self.reseeking.clear()
        self.seeks_due.clear()
        self.unsought.clear()
        self.held.clear()
        self.sought_at_assignment.clear()
        self.earliest_starts.clear()

    def assignment_start(self, tp: Any) -> int | None:
        """The offset the stream of a usage partition must deliver first since the assignment,
        or None while Faust has not sought it there yet: the committed offset its seek returned,
        or for a partition never committed its earliest offset."""
        sought = self.sought_at_assignment.get(tp)
        earliest = self.earliest_starts.get(tp)
        if earliest is not None and (sought is None or sought < earliest):
            return earliest
        return sought

    def read_again(self, tp: Any, offset: int) -> None:
        """Hold the partition at `offset` and have it read again from there: messages past it
        that arrive before the seek takes effect are skipped (they come again after it)."""
        self.on_read_again()
        self.held.add(tp)
        previous = self.reseeking.get(tp.partition)
        give_up_at = (
            previous[1]  # read again for the same offset: the first deadline holds
            if previous is not None and previous[0] == offset
            else self.clock() + self.give_up_s
        )
        self.reseeking[tp.partition] = (offset, give_up_at)
        self.seeks_due.append((tp, offset))

    def read_unsought_again(self) -> None:
        """Partitions whose early messages came before the assignment's seek: read again from
        where the seek started them, once that is known (or, after `give_up_s` with no seek,
        from the lower of the first message and the committed offset)."""
        for tp, (first, since) in list(self.unsought.items()):
            start = self.assignment_start(tp)
            if start is None and self.clock() - since < self.give_up_s:
                continue
            del self.unsought[tp]
            if start is None:
                committed = self.committed_of(tp)
                start = min(first, committed) if isinstance(committed, int) else first
                log.warning(
                    "usage partition %d: no seek since the assignment in %.0f s; reading it "
                    "again from %d",
                    tp.partition,
                    self.give_up_s,
                    start,
                )
            else:
                log.info(
                    "usage partition %d: sought to %d by the assignment; reading it again from "
                    "there (offset %d had arrived first)",
                    tp.partition,
                    start,
                    first,
                )
            self.read_again(tp, start)

    def admit(self, tp: Any, offset: int) -> Admit | None:
        """Whether to count the message at `offset` of usage partition `tp` now (an `Admit`), or
        not (None: it comes again after a seek, which this queues where needed)."""
        partition = tp.partition
        expected = self.next_offset.get(partition)
        restart_at = None
        if partition in self.reseeking:
            target, give_up_at = self.reseeking[partition]
            if offset > target and self.clock() < give_up_at:
                return SKIP  # read before the seek took effect: it comes again after `target`
            del self.reseeking[partition]
            self.held.discard(tp)
            expected = target
        elif expected is None:
            # The first message since the assignment: it should be where the assignment started
            # the partition.
            committed = self.assignment_start(tp)
            if committed is None:  # arrived before the seek: read again once it is done
                if tp not in self.unsought:
                    self.unsought[tp] = (offset, self.clock())
                    self.held.add(tp)
                    log.info(
                        "usage partition %d: offset %d arrived before the assignment's seek; "
                        "reading the partition again once it is done",
                        partition,
                        offset,
                    )
                return SKIP
            log.info(
                "usage partition %d: first message since the assignment at offset %d "
                "(committed %s)",
                partition,
                offset,
                committed,
            )
            if isinstance(committed, int) and offset > committed:
                restart_at = committed
        elif offset > expected:
            # A jump: the stream did not hand us messages that were read (Faust drops what it
            # fetches for a partition paused around a rebalance, and its commits then pass over
            # them).
            restart_at = expected
        if restart_at is not None:
            log.warning(
                "usage partition %d: offset %d arrived where %d was due; reading it again from %d",
                partition,
                offset,
                restart_at,
                restart_at,
            )
            self.read_again(tp, restart_at)
            return SKIP
        self.next_offset[partition] = offset + 1
        if expected is not None and offset > expected:
            # Read again and still not there after give_up_s (deleted by retention): a loss.
            log.warning(
                "usage partition %d: offsets %d..%d never reached the stream",
                partition,
                expected,
                offset - 1,
            )
            return Admit(lost_from=expected)
        return Admit()

    def offset_due(self, tp: Any) -> int | None:
        """The next offset of a usage partition metering has to process, if it can tell."""
        if tp.partition in self.reseeking:
            return self.reseeking[tp.partition][0]
        due = self.next_offset.get(tp.partition)
        return self.assignment_start(tp) if due is None else due

    def given_up(self, tp: Any) -> bool:
        """Read again and past its deadline: the next message reports the gap."""
        found = self.reseeking.get(tp.partition)
        return found is not None and self.clock() >= found[1]
