"""Metering's Kafka transport: Faust's aiokafka transport with metering's fixes, in one place.

faust-streaming 0.15 (and the aiokafka client under it) loses or repeats messages around
restarts and rebalances in ways that metering, which must count every sample once, cannot live
with. Each fix here overrides one upstream method in a subclass and says which upstream behaviour
it corrects; the fixes are selected by the broker URL scheme `gpumeter://` (registered in
Faust's transport registry by `register()`), so a Faust app that does not ask for them is
untouched, and the state they share with the app lives on the app (`FixState`), one per app.

The upstream methods each fix overrides or relies on are pinned by a hash of their source
(tests/unit/test_upstream_watch.py), the bug reports for upstream are in docs/upstream/, and
which broker needs which fix is in docs/scaling.md, "Faust's fixes".
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, ClassVar, cast

import faust
from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.transport.producer import ProducerBuffer
from faust.types import TP
from mode import Service
from mode.services import WaitResults

from services.common.kafka_admin import broker_kind, fetched_end_offsets

log = logging.getLogger(__name__)

SCHEME = "gpumeter"

# Faust stops every stream while more than this many records wait in its producer buffer (its
# default is 100). Bulk outputs go through DirectSender; this keeps the remaining ones from
# stalling the streams while a handful are in flight.
PRODUCER_BUFFER_MAX_MESSAGES = 10_000


class ListedEndOffsets:
    """Whether ListOffsets' end offsets can be taken as they are (Apache Kafka) or must be
    corrected by a fetch's (Tansu: see `fetched_end_offsets`). Asked of the broker once, when
    KAFKA_BROKER is `auto`; a broker that cannot be told keeps the correction, which is right on
    both (one extra fetch per table recovery)."""

    def __init__(self, bootstrap_servers: str, broker: str, security: Any = None) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.broker = broker
        self.security = security  # services.common.kafka_security.KafkaSecurity, or None
        self._exact: bool | None = {"kafka": True, "tansu": False}.get(broker)
        self._lock = asyncio.Lock()

    async def exact(self) -> bool:
        if self._exact is None:
            async with self._lock:
                if self._exact is None:
                    try:
                        kind = await broker_kind(
                            self.bootstrap_servers,
                            ssl_context=self.security.ssl_context() if self.security else None,
                        )
                    except ConnectionError as exc:
                        log.warning("broker kind unknown (%s): correcting its end offsets", exc)
                        return False  # asked again next time
                    self._exact = kind == "kafka"
                    log.info(
                        "broker: %s; table recovery takes %s end offsets",
                        "Apache Kafka" if self._exact else "not Apache Kafka",
                        "ListOffsets'" if self._exact else "fetched",
                    )
        return self._exact


class FixState:
    """What the fixes share with one metering app (`MeteringApp.fixes`)."""

    def __init__(self, end_offsets: ListedEndOffsets, fetch_max_wait_ms: int) -> None:
        self.end_offsets = end_offsets
        self.fetch_max_wait_ms = fetch_max_wait_ms
        # Awaited at the start of every full producer flush (before each offset commit): send
        # what must be durable before the offsets that produced it are committed.
        self.before_flush: list[Callable[[], Awaitable[None]]] = []
        # Called after the Kafka client's flush, before offsets are committed: raise to stop it.
        self.after_flush: list[Callable[[], None]] = []
        # Usage partitions whose stream skipped the committed offset's message: nothing is
        # committed past that offset until the message is read again (`Consumer._new_offset`).
        self.held: set[TP] = set()
        # Stream topics whose partitions start at their earliest offset when the group committed
        # nothing for them (`Consumer.seek_to_committed`).
        self.stream_topics: set[str] = set()
        # Where each never-committed stream partition was started (its earliest offset): what
        # the stream should deliver first when the group has no committed offset.
        self.earliest_starts: dict[TP, int] = {}
        # The committed offsets Faust sought the stream partitions to at the last assignment,
        # filled in once the seek is done. Faust resumes the streams before it seeks, so messages
        # fetched from the consumer's position before the seek reach the stream, and the seek
        # then delivers the committed offset's messages after them (seen as a restarted worker
        # under load that counted rounds 145..152 and then got 120..144, out of order). Metering
        # counts nothing of a partition before its seek.
        self.sought_at_assignment: dict[TP, int] = {}


class MeteringApp(faust.App):
    """A Faust app that carries the state of its transport's fixes."""

    fixes: FixState


def fixes_of(app: Any) -> FixState:
    fixes = getattr(app, "fixes", None)
    if not isinstance(fixes, FixState):
        raise TypeError(f"the {SCHEME}:// transport needs a MeteringApp with its fixes set")
    return fixes


class CompleteFlushBuffer(ProducerBuffer):
    """faust-streaming's ProducerBuffer.flush returns as soon as one send takes over 0.1 s, with
    messages still queued; Faust then commits offsets past state and outputs never sent, and a
    crash loses those samples (seen under load with SIGKILL). This one waits until nothing is
    queued or on its way into the Kafka client; the client's own flush, which follows, waits for
    delivery. The app's `before_flush` hooks send their records first, so they are part of what
    the flush delivers. (docs/upstream/faust-producer-flush-returns-early.md)"""

    max_messages = PRODUCER_BUFFER_MAX_MESSAGES
    _inflight = 0

    async def _send_pending(self, fut: Any) -> None:
        self._inflight += 1
        try:
            await super()._send_pending(fut)
        finally:
            self._inflight -= 1

    async def flush(self) -> None:
        if not self.should_stop:  # stopping: what was not committed is read again on restart
            for hook in fixes_of(self.app).before_flush:
                await hook()
        while self.size or self._inflight:
            if self.size:
                await self.flush_atmost(None)
            else:
                await asyncio.sleep(0.001)


class Producer(faust_aiokafka.Producer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        made = cast(ProducerBuffer, self.buffer)  # Faust's, made by the base class: replaced
        buffer = CompleteFlushBuffer(loop=self.loop, beacon=self.beacon)
        buffer.app = made.app
        if self.threaded_producer is not None:
            buffer.threaded_producer = self.threaded_producer
        self.buffer = buffer

    def kafka_producer(self) -> Any:
        """The aiokafka producer this one flushes before each offset commit: records appended
        to it directly (services/metering/sender.py) are delivered before the commit too."""
        return self._ensure_producer()

    async def flush(self) -> None:
        """The client's flush, then the app's `after_flush` hooks, which may refuse the commit
        that follows (a record the broker refused)."""
        await super().flush()
        for hook in fixes_of(self.app).after_flush:
            hook()


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    async def _highwaters(self, partitions: list[TP]) -> Mapping[TP, int]:
        """Faust restores tables by reading each changelog partition up to its highwater, taken
        from ListOffsets. On Tansu that under-reports a partition whose last batch holds several
        records (see `fetched_end_offsets`): the newest node states were never restored, and a
        restarted worker counted those nodes from an old state (issue #4's loss). Take the
        fetch's figure there; on Apache Kafka ListOffsets is exact and is taken as it is.
        (docs/upstream/tansu-listoffsets-latest-under-reports.md)"""
        listed = await super()._highwaters(partitions)
        policy = fixes_of(self.app).end_offsets
        if self.consumer.in_transaction or await policy.exact():
            return listed
        return cast(
            Mapping[TP, int],
            await fetched_end_offsets(
                policy.bootstrap_servers,
                dict(listed),
                security=policy.security.aiokafka() if policy.security else None,
            ),
        )

    def _create_worker_consumer(self, transport: Any) -> Any:
        """Faust creates its consumer with fetch_max_wait_ms=1500 and no setting to change it:
        set it on the consumer before it starts (its fetcher reads it then)."""
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = fixes_of(self.app).fetch_max_wait_ms
        return consumer


class _ReadOffsets(defaultdict):  # type: ignore[type-arg]
    """Faust's highest delivered offset per partition; none for a held partition."""

    def __init__(self, offsets: Any, held: set[TP]) -> None:
        super().__init__(lambda: None, offsets)
        self.held = held

    def __getitem__(self, tp: Any) -> Any:
        if tp in self.held:
            return None
        return super().__getitem__(tp)


@types.coroutine
def _resumed(coro: Any, yielded: Any) -> Any:
    """Go on driving `coro`, already started and suspended on `yielded`, as `yield from` would."""
    while True:
        try:
            value = yield yielded
        except BaseException as exc:  # noqa: BLE001 - thrown in by the task driving us: handed on to `coro`
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(value)
            except StopIteration as stop:
                return stop.value


async def _finish(coro: Any, yielded: Any) -> Any:
    return await _resumed(coro, yielded)  # a native coroutine: wait_first wants an Awaitable


def _close_unstarted(coros: Iterable[Any]) -> None:
    for other in coros:
        if asyncio.iscoroutine(other):
            other.close()  # never started: closed, so no "never awaited" warning


async def wait_first_in_place(service: Service, *coros: Any, timeout: Any = None) -> WaitResults:
    """`Service.wait_first`, but a first coroutine that completes without suspending is run in
    place: no tasks, no `asyncio.wait`. One that suspends is handed, resumed, to the original."""
    first = coros[0] if coros else None
    if not asyncio.iscoroutine(first) or service._stopped.is_set() or service._crashed.is_set():
        return await Service.wait_first(service, *coros, timeout=timeout)
    try:
        yielded = first.send(None)
    except StopIteration as stop:
        _close_unstarted(coros[1:])
        return WaitResults([first], [stop.value], False)
    except BaseException:
        _close_unstarted(coros[1:])
        raise
    return await Service.wait_first(service, _finish(first, yielded), *coros[1:], timeout=timeout)


async def seek_on_thread(thread: Any, partition: TP, offset: int) -> None:
    """Run by the consumer thread, on its event loop (see `Consumer._seek`)."""
    thread.seek(partition, offset)


class Consumer(faust_aiokafka.Consumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fixes = fixes_of(self.app)
        # While a partition is held, Faust's consumer delivers every message of it: it drops a
        # message below the highest offset it delivered, and messages fetched before metering's
        # seek (which metering skips) would otherwise make it drop the ones read again.
        # (docs/upstream/faust-messages-dropped-below-read-offset-after-seek.md)
        self._read_offset = _ReadOffsets(self._read_offset, self.fixes.held)

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def _new_offset(self, tp: TP) -> int | None:
        """Commit nothing past the committed offset of a held partition.

        After a restart the stream now and then starts one message past the committed offset:
        Faust resumes fetching stream partitions before it seeks them, and a message read then is
        dropped with the queues its seek clears. Faust's commit check then passes over it, as it
        treats a first acknowledged offset of committed + 1 as contiguous (its committed offset
        is the next to read, so that is a gap of one). Seen as one node-round missing after
        SIGKILL in about 1 of 10 runs. Metering holds such a partition, reads it again from the
        committed offset, and releases it once that message is processed.
        (docs/upstream/faust-messages-dropped-below-read-offset-after-seek.md)"""
        if tp in self.fixes.held:
            return None
        return super()._new_offset(tp)

    async def seek_to_committed(self) -> Mapping[TP, int]:
        """Seek stream partitions with no committed offset to their earliest offset after
        Faust's seek to the committed ones.

        Faust starts fetching a new assignment before it seeks, and drops what it fetches for
        partitions whose streams are not yet resumed; the seek to the committed offset then reads
        those messages again. A partition the group never committed (its worker was killed
        before its first commit) has no committed offset to seek to, so the fetch position stayed
        past the dropped messages: seen as a restarted worker of two that never counted one
        node's first 100 rounds. The consumer's `earliest` reset is what such a partition must
        start from. (docs/upstream/faust-uncommitted-partition-start-position.md)"""
        committed = await super().seek_to_committed()
        fixes = self.fixes
        never = [
            tp
            for tp, offset in committed.items()
            if tp.topic in fixes.stream_topics and (offset is None or offset <= 0)
        ]
        if never:
            earliest = await self.earliest_offsets(*never)
            for tp in never:
                offset = earliest.get(tp)
                if offset is not None:
                    log.debug("%s[%d]: nothing committed; reading from %d", *tp, offset)
                    await self._seek(tp, offset)
                    fixes.earliest_starts[tp] = offset
        # Last, once every partition is where it starts: metering counts a partition's messages
        # only from then on (docs/upstream/faust-streams-resumed-before-seek.md).
        fixes.sought_at_assignment.update(
            {tp: offset for tp, offset in committed.items() if isinstance(offset, int)}
        )
        return committed

    async def _seek(self, partition: TP, offset: int) -> None:
        """Faust's `ThreadDelegateConsumer._seek` calls aiokafka's `seek` from the app's thread,
        while the aiokafka consumer and its fetcher run on Faust's consumer thread.
        `Fetcher.seek_to` then deletes a partition's fetched records while `fetched_records`, on
        the other thread, is between listing and deleting them: `KeyError: TopicPartition(...)`,
        the fetcher crashes and the worker exits. Seen on Apache Kafka in the three-node drill,
        when a rebalance after a partition made metering seek its usage partitions again. The
        seek runs on the consumer thread, as Faust's own `seek_wait` and `seek_to_committed` do.
        (docs/upstream/faust-seek-on-wrong-thread.md)"""
        thread = self._thread
        await thread.call_thread(seek_on_thread, thread, partition, offset)

    async def wait_first(self, *coros: Any, timeout: Any = None) -> WaitResults:
        """Faust's consumer hands each fetched message to the streams through
        `wait_first(callback(message), suspend_flow.wait())`: four tasks and an `asyncio.wait`
        per message, so that a callback blocked on a full stream buffer is abandoned when a
        rebalance suspends the flow. Almost every callback completes without suspending; running
        those in place took end-to-end metering from 41k to 59k samples/s in `make bench`."""
        return await wait_first_in_place(self, *coros, timeout=timeout)

    # Faust's consumer state metering reads, without a public getter. Read directly, not through
    # getattr with a default: a rename must fail loudly, not turn a check off
    # (Consumer.__init__, which creates them, is watched by tests/unit/test_upstream_watch.py).

    def committed_offset(self, tp: TP) -> int | None:
        """The offset Faust last committed for `tp` in this process, if any."""
        offset = self._committed_offset.get(tp)
        return offset if isinstance(offset, int) else None

    def fetched_partitions(self) -> set[TP]:
        """The partitions Faust fetches now (its "active" ones)."""
        return set(self._active_partitions)

    def why_not_fetched(self, tp: TP) -> str:
        """Whether Faust has `tp` paused, its stream buffer full, both or neither."""
        paused = tp in self._paused_partitions
        buffered = tp in self._buffered_partitions
        return f"paused: {paused}, buffer full: {buffered}"

    def fetch_again(self, tp: TP) -> None:
        """Put `tp` back among the partitions Faust fetches: Faust pauses partitions for a
        rebalance, a table recovery or a full stream buffer and resumes them after; one it
        failed to resume is never fetched again (seen on Apache Kafka after a broker fault)."""
        self._buffered_partitions.discard(tp)
        self.resume_partitions({tp})


class Transport(faust_aiokafka.Transport):
    """Faust's aiokafka transport with metering's consumer and producer."""

    Consumer: ClassVar[type[Any]] = Consumer
    Producer: ClassVar[type[Any]] = Producer


def register() -> None:
    """Make `gpumeter://host:port` broker URLs select this transport (Faust's registry)."""
    TRANSPORTS.data.setdefault(SCHEME, f"{__name__}:Transport")


def broker_urls(bootstrap_servers: str) -> list[str]:
    return [f"{SCHEME}://{server.strip()}" for server in bootstrap_servers.split(",")]
