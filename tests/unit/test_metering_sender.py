"""DirectSender: records go to the client in order, and a refused one stops the offset commit."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.metering.sender import DeliveryFailed, DirectSender


class RecordingClient:
    """Stands in for aiokafka's producer: `send` returns a delivery future, as aiokafka does."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any, Any, Any]] = []
        self.futures: list[asyncio.Future[Any]] = []

    async def send(self, topic: str, *, value: Any, key: Any, partition: Any) -> Any:
        self.sent.append((topic, key, value, partition))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        return future


class App:
    def __init__(self, client: RecordingClient) -> None:
        self.producer = self
        self.client = client

    def kafka_producer(self) -> RecordingClient:
        return self.client


def test_records_reach_the_client_in_the_order_they_were_added() -> None:
    async def scenario() -> RecordingClient:
        client = RecordingClient()
        sender = DirectSender(App(client))
        sender.add("t", b"k1", b"v1", 0)
        sender.add("t", None, b"v2")
        sender.add("u", b"k3", b"v3", 2)
        await sender.send()
        await sender.send()  # nothing queued: nothing sent twice
        return client

    client = asyncio.run(scenario())
    assert client.sent == [("t", b"k1", b"v1", 0), ("t", None, b"v2", None), ("u", b"k3", b"v3", 2)]


def test_a_refused_record_fails_the_check_and_delivered_ones_are_forgotten() -> None:
    async def scenario() -> None:
        client = RecordingClient()
        sender = DirectSender(App(client))
        for i in range(3):
            sender.add("t", None, str(i).encode())
        await sender.send()
        client.futures[0].set_result("ok")
        sender.check()  # one delivered, two still on their way: nothing to refuse yet
        assert len(sender.inflight) == 2
        client.futures[1].set_result("ok")
        client.futures[2].set_exception(RuntimeError("broker refused"))
        with pytest.raises(DeliveryFailed, match="broker refused"):
            sender.check()

    asyncio.run(scenario())


def test_a_cancelled_delivery_fails_the_check() -> None:
    async def scenario() -> None:
        client = RecordingClient()
        sender = DirectSender(App(client))
        sender.add("t", None, b"v")
        await sender.send()
        client.futures[0].cancel()
        with pytest.raises(DeliveryFailed, match="cancelled"):
            sender.check()

    asyncio.run(scenario())
