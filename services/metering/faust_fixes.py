"""Metering's fixes to faust-streaming (and the aiokafka client under it), in one place.

Each fix replaces or wraps one upstream function and says which upstream behaviour it corrects;
`apply_faust_fixes()` applies them all, once per process, before an app is made. The upstream
functions each one depends on are pinned by a hash of their source
(tests/unit/test_upstream_watch.py), and the bug reports for upstream are in docs/upstream/.
Which broker needs which fix: docs/scaling.md, "Faust's fixes".

The state the fixes share with the app (held partitions, where streams started, the flush hooks)
is module-level: one metering app per process, as `python -m services.metering` runs it (the
supervisor runs each worker as a process of its own).
"""

from __future__ import annotations

import asyncio
import logging
import types
import weakref
from collections import defaultdict
from typing import Any

from mode import Service
from mode.services import WaitResults

from services.common.kafka_admin import broker_kind, fetched_end_offsets

log = logging.getLogger(__name__)

# Awaited at the start of every full producer flush (before each offset commit): send what must be
# durable before the offsets that produced it are committed.
BEFORE_FLUSH: list[Any] = []
# Called after the Kafka client's flush, before offsets are committed: raise to stop the commit.
AFTER_FLUSH: list[Any] = []
# Faust stops every stream while more than this many records wait in its producer buffer (its
# default is 100). Bulk outputs go through DirectSender; this keeps the remaining ones from
# stalling the streams while a handful are in flight.
PRODUCER_BUFFER_MAX_MESSAGES = 10_000
# Usage partitions whose stream skipped the committed offset's message: nothing is committed
# past that offset until the message is read again (see `_make_commits_wait_for_held`).
HELD_PARTITIONS: set[Any] = set()
# Stream topics whose partitions start at their earliest offset when the group committed nothing
# for them (see `_make_uncommitted_partitions_start_at_earliest`).
STREAM_TOPICS: set[str] = set()


# Where each never-committed stream partition was started (its earliest offset), for the check
# below: what the stream should deliver first when the group has no committed offset.
EARLIEST_STARTS: dict[Any, int] = {}
# The committed offsets Faust sought the stream partitions to at the last assignment, filled in
# once the seek is done. Faust resumes the streams before it seeks, so messages fetched from the
# consumer's position before the seek reach the stream, and the seek then delivers the committed
# offset's messages after them (seen as a restarted worker under load that counted rounds 145..152
# and then got 120..144, out of order). Metering counts nothing of a partition before its seek.
SOUGHT_AT_ASSIGNMENT: dict[Any, int] = {}


def _make_producer_flush_complete() -> None:
    """faust-streaming's ProducerBuffer.flush returns as soon as one send takes over 0.1 s, with
    messages still queued; Faust then commits offsets past state and outputs never sent, and a
    crash loses those samples (seen under load with SIGKILL). Wait until nothing is queued or on
    its way into the Kafka client; the client's own flush, which follows, waits for delivery.
    BEFORE_FLUSH hooks send their records first, so they are part of what the flush delivers;
    AFTER_FLUSH hooks run once the client's flush returns and may refuse the commit."""
    from faust.transport.drivers.aiokafka import Producer
    from faust.transport.producer import ProducerBuffer

    if getattr(ProducerBuffer, "_gpumeter_complete_flush", False):
        return
    send_pending = ProducerBuffer._send_pending

    async def counted_send_pending(self: Any, fut: Any) -> None:
        self._gpumeter_inflight = getattr(self, "_gpumeter_inflight", 0) + 1
        try:
            await send_pending(self, fut)
        finally:
            self._gpumeter_inflight -= 1

    async def flush_completely(self: Any) -> None:
        if not self.should_stop:  # stopping: what was not committed is read again on restart
            for hook in BEFORE_FLUSH:
                await hook()
        while self.size or getattr(self, "_gpumeter_inflight", 0):
            if self.size:
                await self.flush_atmost(None)
            else:
                await asyncio.sleep(0.001)

    client_flush = Producer.flush

    async def flush_and_check(self: Any) -> None:
        await client_flush(self)
        for hook in AFTER_FLUSH:
            hook()

    ProducerBuffer._send_pending = counted_send_pending  # type: ignore[method-assign]
    ProducerBuffer.flush = flush_completely  # type: ignore[method-assign]
    ProducerBuffer.max_messages = PRODUCER_BUFFER_MAX_MESSAGES
    ProducerBuffer._gpumeter_complete_flush = True  # type: ignore[attr-defined]
    Producer.flush = flush_and_check  # type: ignore[method-assign]


def _make_commits_wait_for_held() -> None:
    """Commit nothing past the committed offset of a partition in HELD_PARTITIONS.

    After a restart the stream now and then starts one message past the committed offset: Faust
    resumes fetching stream partitions before it seeks them, and a message read then is dropped
    with the queues its seek clears. Faust's commit check then passes over it, as it treats a
    first acknowledged offset of committed + 1 as contiguous (its committed offset is the next
    to read, so that is a gap of one). Seen as one node-round missing after SIGKILL in about 1
    of 10 runs. Metering holds such a partition, reads it again from the committed offset, and
    releases it once that message is processed.

    While a partition is held, Faust's consumer also delivers every message of it: it drops a
    message below the highest offset it delivered, and messages fetched before metering's seek
    (which metering skips) would otherwise make it drop the ones read again."""
    from faust.transport.consumer import Consumer

    if getattr(Consumer, "_gpumeter_hold", False):
        return
    new_offset = Consumer._new_offset
    init = Consumer.__init__

    def new_offset_unless_held(self: Any, tp: Any) -> Any:
        if tp in HELD_PARTITIONS:
            return None
        return new_offset(self, tp)

    def init_with_held_read_offsets(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self._read_offset = _ReadOffsets(self._read_offset)

    Consumer._new_offset = new_offset_unless_held  # type: ignore[method-assign]
    Consumer.__init__ = init_with_held_read_offsets  # type: ignore[method-assign]
    Consumer._gpumeter_hold = True  # type: ignore[attr-defined]


class _ReadOffsets(defaultdict):
    """Faust's highest delivered offset per partition; none for a held partition."""

    def __init__(self, offsets: Any) -> None:
        super().__init__(lambda: None, offsets)

    def __getitem__(self, tp: Any) -> Any:
        if tp in HELD_PARTITIONS:
            return None
        return super().__getitem__(tp)


def _make_uncommitted_partitions_start_at_earliest() -> None:
    """Seek stream partitions with no committed offset to their earliest offset after Faust's
    seek to the committed ones.

    Faust starts fetching a new assignment before it seeks, and drops what it fetches for
    partitions whose streams are not yet resumed; the seek to the committed offset then reads
    those messages again. A partition the group never committed (its worker was killed before
    its first commit) has no committed offset to seek to, so the fetch position stayed past the
    dropped messages: seen as a restarted worker of two that never counted one node's first
    100 rounds. The consumer's `earliest` reset is what such a partition must start from."""
    from faust.transport.consumer import ThreadDelegateConsumer

    if getattr(ThreadDelegateConsumer, "_gpumeter_earliest_when_uncommitted", False):
        return
    seek_to_committed = ThreadDelegateConsumer.seek_to_committed

    async def seek_to_committed_or_earliest(self: Any) -> Any:
        committed = await seek_to_committed(self)
        never = [
            tp
            for tp, offset in committed.items()
            if tp.topic in STREAM_TOPICS and (offset is None or offset <= 0)
        ]
        if never:
            earliest = await self.earliest_offsets(*never)
            for tp in never:
                offset = earliest.get(tp)
                if offset is not None:
                    log.debug("%s[%d]: nothing committed; reading from %d", *tp, offset)
                    await self._seek(tp, offset)
                    EARLIEST_STARTS[tp] = offset
        # Last, once every partition is where it starts: metering counts a partition's messages
        # only from then on (see `assignment_start` in create_app).
        SOUGHT_AT_ASSIGNMENT.update(
            {tp: offset for tp, offset in committed.items() if isinstance(offset, int)}
        )
        return committed

    ThreadDelegateConsumer.seek_to_committed = seek_to_committed_or_earliest  # type: ignore[method-assign]
    ThreadDelegateConsumer._gpumeter_earliest_when_uncommitted = True  # type: ignore[attr-defined]


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


# Each app's end-offset policy, looked up by the consumer thread of that app.
END_OFFSETS: weakref.WeakKeyDictionary[Any, ListedEndOffsets] = weakref.WeakKeyDictionary()


def _make_highwaters_exact() -> None:
    """Faust restores tables by reading each changelog partition up to its highwater, taken from
    ListOffsets. On Tansu that under-reports a partition whose last batch holds several records
    (see `fetched_end_offsets`): the newest node states were never restored, and a restarted
    worker counted those nodes from an old state (issue #4's loss). Take the fetch's figure
    there; on Apache Kafka ListOffsets is exact and is taken as it is (`ListedEndOffsets`)."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    if getattr(AIOKafkaConsumerThread, "_gpumeter_exact_highwaters", False):
        return
    listed_highwaters = AIOKafkaConsumerThread._highwaters

    async def exact_highwaters(self: Any, partitions: Any) -> Any:
        listed = await listed_highwaters(self, partitions)
        policy = END_OFFSETS.get(self.consumer.app)
        if self.consumer.in_transaction or policy is None or await policy.exact():
            return listed
        return await fetched_end_offsets(
            policy.bootstrap_servers,
            listed,
            security=policy.security.aiokafka() if policy.security else None,
        )

    AIOKafkaConsumerThread._highwaters = exact_highwaters  # type: ignore[method-assign]
    AIOKafkaConsumerThread._gpumeter_exact_highwaters = True  # type: ignore[attr-defined]


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


def _close_unstarted(coros: Any) -> None:
    for other in coros:
        if asyncio.iscoroutine(other):
            other.close()  # never started: closed, so no "never awaited" warning


_SERVICE_WAIT_FIRST = Service.wait_first


async def wait_first_in_place(self: Any, *coros: Any, timeout: Any = None) -> Any:
    """`Service.wait_first`, but a first coroutine that completes without suspending is run in
    place: no tasks, no `asyncio.wait`. One that suspends is handed, resumed, to the original."""
    first = coros[0] if coros else None
    if not asyncio.iscoroutine(first) or self._stopped.is_set() or self._crashed.is_set():
        return await _SERVICE_WAIT_FIRST(self, *coros, timeout=timeout)
    try:
        yielded = first.send(None)
    except StopIteration as stop:
        _close_unstarted(coros[1:])
        return WaitResults([first], [stop.value], False)
    except BaseException:
        _close_unstarted(coros[1:])
        raise
    return await _SERVICE_WAIT_FIRST(self, _finish(first, yielded), *coros[1:], timeout=timeout)


def _make_drain_skip_wait_first() -> None:
    """Faust's consumer hands each fetched message to the streams through
    `wait_first(callback(message), suspend_flow.wait())`: four tasks and an `asyncio.wait` per
    message, so that a callback blocked on a full stream buffer is abandoned when a rebalance
    suspends the flow. Almost every callback completes without suspending; running those in
    place took end-to-end metering from 41k to 59k samples/s in `make bench`."""
    from faust.transport.consumer import Consumer

    Consumer.wait_first = wait_first_in_place  # type: ignore[method-assign]


def _make_seeks_run_on_the_consumer_thread() -> None:
    """Faust's `ThreadDelegateConsumer._seek` calls aiokafka's `seek` from the app's thread, while
    the aiokafka consumer and its fetcher run on Faust's consumer thread. `Fetcher.seek_to` then
    deletes a partition's fetched records while `fetched_records`, on the other thread, is between
    listing and deleting them: `KeyError: TopicPartition(...)`, the fetcher crashes and the worker
    exits. Seen on Apache Kafka in the three-node drill, when a rebalance after a partition made
    metering seek its usage partitions again. The seek now runs on the consumer thread, as Faust's
    own `seek_wait` and `seek_to_committed` already do."""
    from faust.transport.consumer import ThreadDelegateConsumer

    if getattr(ThreadDelegateConsumer, "_gpumeter_seek_on_thread", False):
        return

    async def _seek(self: Any, partition: Any, offset: int) -> None:
        thread = self._thread
        await thread.call_thread(seek_on_thread, thread, partition, offset)

    ThreadDelegateConsumer._seek = _seek  # type: ignore[method-assign]
    ThreadDelegateConsumer._gpumeter_seek_on_thread = True  # type: ignore[attr-defined]


def seek_on_thread(thread: Any, partition: Any, offset: int) -> None:
    """Run by the consumer thread (see `_make_seeks_run_on_the_consumer_thread`)."""
    thread.seek(partition, offset)


def _set_fetch_max_wait(wait_ms: int) -> None:
    """Faust creates its consumer with fetch_max_wait_ms=1500 and no setting to change it: set
    it on the consumer before it starts (its fetcher reads it then)."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    create = getattr(AIOKafkaConsumerThread, "_gpumeter_create_worker_consumer", None)
    if create is None:
        create = AIOKafkaConsumerThread._create_worker_consumer
        AIOKafkaConsumerThread._gpumeter_create_worker_consumer = create  # type: ignore[attr-defined]

    def create_worker_consumer(self: Any, transport: Any) -> Any:
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = wait_ms
        return consumer

    AIOKafkaConsumerThread._create_worker_consumer = create_worker_consumer  # type: ignore[method-assign]


def apply_faust_fixes(fetch_max_wait_ms: int) -> None:
    """Apply every fix (each only once per process) and start the shared state afresh."""
    BEFORE_FLUSH.clear()
    AFTER_FLUSH.clear()
    HELD_PARTITIONS.clear()
    STREAM_TOPICS.clear()
    EARLIEST_STARTS.clear()
    SOUGHT_AT_ASSIGNMENT.clear()
    _make_producer_flush_complete()
    _make_uncommitted_partitions_start_at_earliest()
    _make_commits_wait_for_held()
    _make_highwaters_exact()
    _set_fetch_max_wait(fetch_max_wait_ms)
    _make_drain_skip_wait_first()
    _make_seeks_run_on_the_consumer_thread()


# Faust's consumer state metering reads, without a public getter. Read directly, not through
# getattr with a default: a rename must fail loudly, not turn a check off (Consumer.__init__,
# which creates them, is watched by tests/unit/test_upstream_watch.py).


def committed_offset(consumer: Any, tp: Any) -> int | None:
    """The offset Faust last committed for `tp` in this process, if any."""
    offset = consumer._committed_offset.get(tp)
    return offset if isinstance(offset, int) else None


def fetched_partitions(consumer: Any) -> set[Any] | None:
    """The partitions Faust fetches now (its "active" ones); None before its first assignment."""
    active = consumer._active_partitions
    return None if active is None else set(active)


def why_not_fetched(consumer: Any, tp: Any) -> str:
    """Whether Faust has `tp` paused, its stream buffer full, both or neither."""
    paused = tp in consumer._paused_partitions
    buffered = tp in consumer._buffered_partitions
    return f"paused: {paused}, buffer full: {buffered}"


def fetch_again(consumer: Any, tp: Any) -> None:
    """Put `tp` back among the partitions Faust fetches (see `resume_forgotten_partitions`)."""
    consumer._buffered_partitions.discard(tp)
    consumer.resume_partitions({tp})
