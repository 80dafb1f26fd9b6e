"""Create topics up front, so consumers never join a group while topics are still appearing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

log = logging.getLogger(__name__)


async def ensure_topics(
    bootstrap_servers: str,
    topics: dict[str, int],
    compacted: set[str] | frozenset[str] = frozenset(),
    attempts: int = 30,
    configs: dict[str, dict[str, str]] | None = None,
) -> None:
    """Create each missing topic with its partition count. Existing topics are left as they are."""
    for attempt in range(attempts):
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [
                NewTopic(
                    name,
                    partitions,
                    1,
                    topic_configs={
                        **({"cleanup.policy": "compact"} if name in compacted else {}),
                        **(configs or {}).get(name, {}),
                    },
                )
                for name, partitions in topics.items()
                if name not in existing
            ]
            if missing:
                with contextlib.suppress(TopicAlreadyExistsError):  # another service was first
                    await admin.create_topics(missing)
                log.info("created topics %s", ", ".join(t.name for t in missing))
            return
        except (KafkaConnectionError, OSError) as exc:
            if attempt == attempts - 1:
                raise
            log.warning("broker %s not reachable yet (%s); retrying", bootstrap_servers, exc)
            await asyncio.sleep(1.0)
        finally:
            await admin.close()


async def fetched_end_offsets(
    bootstrap_servers: str, listed: Mapping[TopicPartition, int | None], timeout_s: float = 10.0
) -> dict[TopicPartition, int | None]:
    """End offsets as a fetch reports them, given those ListOffsets reported.

    Tansu's ListOffsets(latest) answers the base offset of the partition's last record batch + 1,
    not its last offset + 1: a batch of several records hides all but its first from anyone who
    reads "until the end" (Faust's changelog recovery did, and restored stale state). A fetch's
    high watermark is right on Tansu and equal to ListOffsets on Apache Kafka, so read one batch
    from just before the listed end and keep the larger figure."""
    wanted = {tp: end for tp, end in listed.items() if end}
    result: dict[TopicPartition, int | None] = dict(listed)
    if not wanted:
        return result
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers, enable_auto_commit=False, group_id=None
    )
    await consumer.start()
    try:
        consumer.assign(list(wanted))
        for tp, end in wanted.items():
            consumer.seek(tp, end - 1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        pending = set(wanted)
        while pending and loop.time() < deadline:
            await consumer.getmany(*pending, timeout_ms=200)
            for tp in list(pending):
                highwater = consumer.highwater(tp)
                if highwater is not None:
                    result[tp] = max(wanted[tp], highwater)
                    pending.discard(tp)
        if pending:
            log.warning("no fetch answered for %s: keeping the listed end offsets", pending)
    finally:
        await consumer.stop()
    return result
