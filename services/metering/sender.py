"""Records sent straight into the Kafka client Faust uses, bypassing Faust's per-message buffer.

Faust's `send_soon` queues each record as a FutureMessage that one task publishes at a time, and
every stream stops taking messages while more than 100 are queued. A metering commit writes one
state record per node (1,875 at 15,000 GPUs) and a busy fleet one signal per node and round: that
queue, not the work, set the latency from sample to hourly total. Here a batch's records are
appended to the aiokafka producer in one task, in order; Faust's flush before every offset commit
still waits for them (it flushes that producer), and a record the broker refused fails the commit
instead of being passed over.
"""

from __future__ import annotations

import asyncio
from typing import Any


class DeliveryFailed(RuntimeError):
    """A record sent directly was not accepted by the broker: offsets must not be committed."""


class DirectSender:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.queued: list[tuple[str, int | None, bytes | None, bytes | None]] = []
        self.inflight: list[asyncio.Future[Any]] = []

    def add(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None
    ) -> None:
        self.queued.append((topic, partition, key, value))

    async def send(self) -> None:
        """Hand every queued record to the client (delivery follows; `check` reports it)."""
        if not self.queued:
            return
        producer = self.app.producer.kafka_producer()  # the one Faust flushes (transport.py)
        records, self.queued = self.queued, []
        inflight = self.inflight
        for topic, partition, key, value in records:
            inflight.append(await producer.send(topic, value=value, key=key, partition=partition))

    def check(self) -> None:
        """After the client's flush: raise if any record sent so far was refused."""
        pending = []
        for future in self.inflight:
            if not future.done():
                pending.append(future)
            elif future.cancelled():
                raise DeliveryFailed("a metering output's delivery was cancelled")
            elif (error := future.exception()) is not None:
                raise DeliveryFailed(f"a metering output was not delivered: {error!r}") from error
        self.inflight = pending
