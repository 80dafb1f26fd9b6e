"""Create topics up front, so consumers never join a group while topics are still appearing; tell
which broker answers (Apache Kafka or another, such as Tansu) where their answers differ."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
from collections.abc import Mapping
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from services.common.retry import retry

log = logging.getLogger(__name__)


async def ensure_topics(
    bootstrap_servers: str,
    topics: dict[str, int],
    compacted: set[str] | frozenset[str] = frozenset(),
    attempts: int = 30,
    configs: dict[str, dict[str, str]] | None = None,
    replication_factor: int = 1,
    security: Mapping[str, Any] | None = None,
) -> None:
    """Create each missing topic with its partition count and `replication_factor` copies
    (KAFKA_REPLICATION_FACTOR: 3 on a production cluster). Existing topics are left as they are."""

    async def attempt() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, **(security or {}))
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [
                NewTopic(
                    name,
                    partitions,
                    replication_factor,
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
        finally:
            await admin.close()

    await retry(
        attempt,
        f"broker {bootstrap_servers} not reachable yet",
        (KafkaConnectionError, OSError),
        attempts=attempts,
        initial_s=1.0,
        factor=1.0,
    )


async def fetched_end_offsets(
    bootstrap_servers: str,
    listed: Mapping[TopicPartition, int | None],
    timeout_s: float = 10.0,
    security: Mapping[str, Any] | None = None,
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
        bootstrap_servers=bootstrap_servers,
        enable_auto_commit=False,
        group_id=None,
        **(security or {}),
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


BrokerKind = Literal["kafka", "other"]

# ApiVersions keys only Apache Kafka (of the brokers the project runs on) advertises to clients:
# OffsetForLeaderEpoch (23, KIP-101, every Kafka since 0.11) is part of its replication protocol;
# Tansu answers neither it nor CreatePartitions (37).
_APACHE_KAFKA_KEYS = frozenset({23, 37})


async def broker_kind(
    bootstrap_servers: str, timeout_s: float = 10.0, ssl_context: ssl.SSLContext | None = None
) -> BrokerKind:
    """`kafka` when the first reachable bootstrap broker answers ApiVersions as Apache Kafka does,
    `other` otherwise (Tansu, or a broker this cannot tell): callers keep their broker
    workarounds on for `other`, since each is also right on Kafka, only slower.

    A plain ApiVersions v0 request on a socket of its own: the versions aiokafka negotiates are
    not public. Over TLS where the broker requires it (`ssl_context`); ApiVersions is answered
    before SASL authentication."""
    last: Exception | None = None
    for server in bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            keys = await asyncio.wait_for(
                _api_keys(host or "127.0.0.1", int(port), ssl_context), timeout_s
            )
        except (
            TimeoutError,
            OSError,
            ValueError,
            asyncio.IncompleteReadError,
            ssl.SSLError,
        ) as exc:
            last = exc
            continue
        return "kafka" if keys >= _APACHE_KAFKA_KEYS else "other"
    raise ConnectionError(f"no broker of {bootstrap_servers!r} answered ApiVersions: {last!r}")


async def _api_keys(host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> set[int]:
    reader, writer = await asyncio.open_connection(host, port, ssl=ssl_context)
    try:
        client_id = b"gpumeter-probe"
        # Request header v1: api_key, api_version, correlation_id, client_id; ApiVersions v0 has no body.
        body = struct.pack(">hhih", 18, 0, 1, len(client_id)) + client_id
        writer.write(struct.pack(">i", len(body)) + body)
        await writer.drain()
        (size,) = struct.unpack(">i", await reader.readexactly(4))
        response = await reader.readexactly(size)
        correlation_id, error_code, count = struct.unpack_from(">ihi", response)
        if correlation_id != 1 or error_code != 0:
            raise ValueError(f"ApiVersions answered error {error_code}")
        return {struct.unpack_from(">h", response, 10 + 6 * i)[0] for i in range(count)}
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
