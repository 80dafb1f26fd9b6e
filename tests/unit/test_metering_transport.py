"""Metering's transport (services/metering/transport.py): selected by the broker URL, its state on
each app, and each fix shown against the upstream behaviour it corrects, on Faust's own objects
(no broker: nothing here connects)."""

from __future__ import annotations

import asyncio
from typing import Any

import faust
import pytest
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.transport.producer import ProducerBuffer
from faust.types import TP

from services.metering import transport
from services.metering.transport import (
    CompleteFlushBuffer,
    FixState,
    ListedEndOffsets,
    MeteringApp,
    broker_urls,
    register,
)

USAGE = "gpu.usage.v1"


def metering_app(name: str = "transport-test") -> MeteringApp:
    register()
    app = MeteringApp(
        name, broker=broker_urls("localhost:1,localhost:2"), store="memory://", autodiscover=False
    )
    app.fixes = FixState(ListedEndOffsets("localhost:1", "kafka"), fetch_max_wait_ms=50)
    app.fixes.stream_topics.add(USAGE)
    return app


def test_the_gpumeter_scheme_selects_metering_transport_and_kafka_stays_faust() -> None:
    async def scenario() -> None:
        app = metering_app()
        assert broker_urls(" a:9092, b:9092") == ["gpumeter://a:9092", "gpumeter://b:9092"]
        assert type(app.transport) is transport.Transport
        assert type(app.consumer) is transport.Consumer
        assert type(app.consumer._thread) is transport.ConsumerThread
        assert type(app.producer) is transport.Producer
        assert type(app.producer.buffer) is CompleteFlushBuffer
        assert app.producer.buffer.app is app

        plain = faust.App("plain", broker="kafka://localhost:1", autodiscover=False)
        assert type(plain.consumer) is faust_aiokafka.Consumer
        assert type(plain.producer.buffer) is ProducerBuffer

    asyncio.run(scenario())


def test_each_app_has_its_own_fix_state() -> None:
    async def scenario() -> None:
        first, second = metering_app("first"), metering_app("second")
        tp = TP(USAGE, 0)
        first.fixes.held.add(tp)
        assert tp not in second.fixes.held
        assert first.consumer._new_offset(tp) is None
        second.consumer._acked[tp].extend([0, 1, 2])
        assert second.consumer._new_offset(tp) == 3

    asyncio.run(scenario())


def test_a_faust_app_without_fix_state_is_refused_by_the_transport() -> None:
    async def scenario() -> None:
        register()
        app = faust.App("no-fixes", broker="gpumeter://localhost:1", autodiscover=False)
        with pytest.raises(TypeError, match="MeteringApp"):
            _ = app.consumer

    asyncio.run(scenario())


def test_a_commit_passes_over_the_committed_offsets_message_upstream_but_not_while_held() -> None:
    """Faust's `_new_offset` takes a first acknowledged offset of committed + 1 as contiguous: with
    10 committed (10 is the next to read) and 11, 12 acknowledged, it commits 13 and message 10 is
    never counted. Metering holds the partition until 10 is read again."""

    async def scenario() -> None:
        app = metering_app()
        consumer = app.consumer
        tp = TP(USAGE, 3)
        consumer._committed_offset[tp] = 10
        consumer._acked[tp].extend([11, 12])
        upstream = faust_aiokafka.Consumer._new_offset(consumer, tp)
        assert upstream == 13  # the upstream behaviour: past the unread message 10

        app.fixes.held.add(tp)
        assert consumer._new_offset(tp) is None  # held: nothing committed
        app.fixes.held.discard(tp)
        consumer._acked[tp][:] = [10, 11, 12]
        assert consumer._new_offset(tp) == 13  # read again and released: committed as usual

    asyncio.run(scenario())


def test_a_held_partition_has_no_read_offset_so_messages_read_again_are_delivered() -> None:
    async def scenario() -> None:
        app = metering_app()
        consumer = app.consumer
        tp = TP(USAGE, 1)
        consumer._read_offset[tp] = 40  # Faust drops any message of tp at or below this
        assert consumer._read_offset[tp] == 40
        app.fixes.held.add(tp)
        assert consumer._read_offset[tp] is None
        assert consumer._read_offset[TP(USAGE, 2)] is None  # unknown: None, as upstream's

    asyncio.run(scenario())


class FakeThread:
    """Stands in for the consumer thread's offset calls."""

    def __init__(self, committed: dict[TP, int | None], earliest: dict[TP, int]) -> None:
        self.committed = committed
        self.earliest = earliest
        self.seeks: list[tuple[TP, int]] = []

    async def seek_to_committed(self) -> dict[TP, int | None]:
        return dict(self.committed)

    async def earliest_offsets(self, *partitions: TP) -> dict[TP, int]:
        return {tp: self.earliest[tp] for tp in partitions}

    async def call_thread(self, fun: Any, *args: Any) -> Any:
        return await fun(*args)

    def seek(self, tp: TP, offset: int) -> None:
        self.seeks.append((tp, offset))


def test_a_never_committed_stream_partition_starts_at_its_earliest_offset() -> None:
    """Upstream leaves a partition with no committed offset where its fetch position happens to
    be (past what Faust fetched and dropped before the seek); metering seeks it to its earliest
    offset and records where each stream partition was started."""

    async def scenario() -> None:
        app = metering_app()
        consumer = app.consumer
        committed, never, table = TP(USAGE, 0), TP(USAGE, 1), TP("changelog", 0)
        thread = FakeThread({committed: 120, never: None, table: None}, {never: 7, table: 0})
        consumer._thread = thread  # type: ignore[assignment]

        upstream = await faust_aiokafka.Consumer.seek_to_committed(consumer)
        assert upstream[never] is None and thread.seeks == []  # upstream: no seek for it

        result = await consumer.seek_to_committed()
        assert result == {committed: 120, never: None, table: None}
        assert thread.seeks == [(never, 7)]  # only the stream topic's, not the table's
        assert app.fixes.earliest_starts == {never: 7}
        assert app.fixes.sought_at_assignment == {committed: 120}

    asyncio.run(scenario())


def test_the_consumers_faust_state_is_read_through_named_accessors() -> None:
    async def scenario() -> None:
        consumer = metering_app().consumer
        tp = TP(USAGE, 0)
        assert consumer.committed_offset(tp) is None
        consumer._committed_offset[tp] = 55
        assert consumer.committed_offset(tp) == 55
        assert consumer.fetched_partitions() == set()  # before the first assignment
        consumer._active_partitions = {tp}
        assert consumer.fetched_partitions() == {tp}
        consumer._buffered_partitions.add(tp)
        assert consumer.why_not_fetched(tp) == "paused: False, buffer full: True"

    asyncio.run(scenario())


class SlowChannel:
    """A channel whose publish takes `delay_s` (a broker under load)."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.published = 0

    async def publish_message(self, fut: Any, wait: bool = False) -> None:
        await asyncio.sleep(self.delay_s)
        self.published += 1


class Pending:
    def __init__(self, channel: SlowChannel) -> None:
        self.message = self
        self.channel = channel


def test_a_flush_returns_only_when_nothing_is_queued_and_hooks_run_first() -> None:
    """Upstream's ProducerBuffer.flush gives up after 0.1 s per message with messages still
    queued (and offsets are then committed past them); metering's waits for all of them."""

    async def run(buffer_class: type[ProducerBuffer]) -> tuple[int, int, list[str]]:
        app = metering_app()
        calls: list[str] = []

        async def before() -> None:
            calls.append("before")

        app.fixes.before_flush.append(before)
        buffer = buffer_class()
        buffer.app = app
        await buffer.start()
        channel = SlowChannel(0.25)
        try:
            for _ in range(3):
                buffer.put(Pending(channel))  # type: ignore[arg-type]
            await buffer.flush()
            left = buffer.size + getattr(buffer, "_inflight", 0)
            published = channel.published
            while channel.published < 3:  # let upstream's finish before stopping
                await asyncio.sleep(0.05)
            return left, published, calls
        finally:
            await buffer.stop()

    left, published, calls = asyncio.run(run(ProducerBuffer))
    assert left > 0 and published < 3 and calls == []  # upstream: returned early
    left, published, calls = asyncio.run(run(CompleteFlushBuffer))
    assert (left, published, calls) == (0, 3, ["before"])
