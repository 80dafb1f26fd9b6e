"""End offsets that a reader can trust, on whichever broker runs the tests."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.common.kafka_admin import broker_kind as ask_broker_kind
from services.common.kafka_admin import ensure_topics, fetched_end_offsets


def test_the_broker_says_whether_it_is_apache_kafka(
    bootstrap_servers: str, broker_kind: str
) -> None:
    # Metering takes ListOffsets' end offsets as they are on Apache Kafka only
    assert asyncio.run(ask_broker_kind(bootstrap_servers)) == (
        "kafka" if broker_kind == "kafka" else "other"
    )


def test_a_broker_that_cannot_be_reached_is_named_in_the_error() -> None:
    with pytest.raises(ConnectionError, match="127.0.0.1:1"):
        asyncio.run(ask_broker_kind("127.0.0.1:1", timeout_s=2))


def test_end_offsets_count_every_record_of_a_multi_record_batch(
    bootstrap_servers: str, topic_prefix: str, broker_kind: str
) -> None:
    topic = f"{topic_prefix}offsets"
    tp = TopicPartition(topic, 0)

    async def run() -> tuple[dict, dict]:
        await ensure_topics(bootstrap_servers, {topic: 1})
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, linger_ms=50)
        await producer.start()
        try:
            # Given one batch of three records, one of one, and one of two (six records in all)
            for batch in ([b"a", b"b", b"c"], [b"d"], [b"e", b"f"]):
                for value in batch:
                    await producer.send(topic, value, key=b"k")
                await producer.flush()
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers)
        await consumer.start()
        try:
            listed = await consumer.end_offsets([tp])
        finally:
            await consumer.stop()
        return listed, await fetched_end_offsets(bootstrap_servers, listed)

    listed, fetched = asyncio.run(run())
    # Then the end offset is the last offset + 1, whatever ListOffsets said
    assert fetched[tp] == 6
    # And ListOffsets is exact on Apache Kafka only: Tansu answers the last batch's base offset + 1,
    # which is why metering corrects it there (and only there: ListedEndOffsets)
    assert listed[tp] == (6 if broker_kind == "kafka" else 5)


def test_empty_partitions_keep_their_listed_end(bootstrap_servers: str, topic_prefix: str) -> None:
    tp = TopicPartition(f"{topic_prefix}empty", 0)
    assert asyncio.run(fetched_end_offsets(bootstrap_servers, {tp: 0})) == {tp: 0}
