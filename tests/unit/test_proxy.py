"""The fault drill's Kafka proxy: address rewriting of any length, and a cut that keeps its port."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from gpumeter.proxy import KafkaProxy, KafkaProxyGroup, _rewrites


def broker_entry_flexible(node_id: int, host: str, port: int) -> bytes:
    """A Metadata v12 broker entry: node id, compact host (varint length + 1), port, no rack."""
    encoded = host.encode()
    return (
        struct.pack(">i", node_id) + bytes([len(encoded) + 1]) + encoded + struct.pack(">i", port)
    )


def broker_entry_classic(node_id: int, host: str, port: int) -> bytes:
    """A Metadata v1 broker entry: node id, INT16-length host, port."""
    encoded = host.encode()
    return struct.pack(">ih", node_id, len(encoded)) + encoded + struct.pack(">i", port)


@pytest.mark.parametrize("entry", [broker_entry_flexible, broker_entry_classic])
def test_an_address_of_another_length_is_rewritten_with_its_length_prefix(entry) -> None:
    # Given a broker in a network namespace (an address longer than 127.0.0.1) and a proxy port
    body = b"\x00\x00\x00\x07" + entry(2, "10.231.17.12", 9092) + entry(3, "10.231.17.13", 9092)

    # When the rewrites of the first broker apply
    for advertised, replacement in _rewrites("10.231.17.12", 9092, 40001):
        body = body.replace(advertised, replacement)

    # Then that broker reads 127.0.0.1:40001 with a consistent length; the other is untouched
    assert entry(2, "127.0.0.1", 40001) in body
    assert entry(3, "10.231.17.13", 9092) in body


def test_a_port_number_alone_is_never_rewritten() -> None:
    # A 9092 that is not right after the broker's host (an offset, a size) stays as it is
    body = struct.pack(">ii", 9092, 9092) + b"10.231.17.12"
    rewritten = body
    for advertised, replacement in _rewrites("10.231.17.12", 9092, 40001):
        rewritten = rewritten.replace(advertised, replacement)
    assert rewritten == body


@pytest.fixture
def echo_server() -> Iterator[int]:
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return

            def echo(conn: socket.socket = conn) -> None:
                with conn:
                    while data := conn.recv(1024):
                        conn.sendall(data)

            threading.Thread(target=echo, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()


PING = struct.pack(">i", 4) + b"ping"  # one Kafka-framed message: the proxy re-frames responses


def roundtrip(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as conn:
        conn.sendall(PING)
        try:
            return conn.recv(16)
        except OSError:
            return b""


def test_a_cut_proxy_keeps_its_port_drops_every_connection_and_comes_back(echo_server: int) -> None:
    # Given a plain TCP client through the proxy
    proxy = KafkaProxy(f"127.0.0.1:{echo_server}").start()
    try:
        assert roundtrip(proxy.port) == PING

        # When it is cut, a connection is closed at once, and the port stays bound meanwhile
        proxy.cut()
        assert proxy.is_cut
        assert roundtrip(proxy.port) == b""
        with pytest.raises(OSError):
            socket.create_server(("127.0.0.1", proxy.port))

        # Then restored on the very same port, it forwards again
        proxy.restore()
        assert not proxy.is_cut
        assert roundtrip(proxy.port) == PING
    finally:
        proxy.stop()


def test_a_group_names_one_proxy_per_broker_and_cuts_them_all(echo_server: int) -> None:
    group = KafkaProxyGroup(f"127.0.0.1:{echo_server},127.0.0.1:{echo_server}").start()
    try:
        ports = [int(address.rsplit(":", 1)[1]) for address in group.bootstrap_servers.split(",")]
        assert len(set(ports)) == 2
        assert all(roundtrip(port) == PING for port in ports)
        group.cut()
        assert all(roundtrip(port) == b"" for port in ports)
        group.restore()
        assert all(roundtrip(port) == PING for port in ports)
    finally:
        group.stop()
