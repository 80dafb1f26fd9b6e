"""A TCP proxy in front of a Kafka broker that can be cut and restored (the fault drill, tests).

Kafka clients only bootstrap through the address they are given; after that they connect to the
addresses the broker advertises in Metadata (and FindCoordinator) responses. So that every
connection goes through the proxy, responses are re-framed and the advertised `127.0.0.1:<broker>`
is rewritten to `127.0.0.1:<proxy>`. The port is a 4-byte integer right after the host string,
which is length-prefixed (INT16 in older versions, an unsigned varint of length + 1 in flexible
ones): the rewrite matches prefix, host and port together and re-frames the response.

A `KafkaProxyGroup` puts one in front of every broker of a cluster, each rewriting every broker's
address, so that a client reaches the cluster only through the group.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

from gpumeter.localstack import free_port


class KafkaProxy:
    def __init__(self, broker: str, port: int | None = None) -> None:
        host, broker_port = broker.rsplit(":", 1)
        self.broker_host, self.broker_port = host, int(broker_port)
        self.port = port or free_port()
        # (advertised, replacement): this broker's address, or every broker's in a group.
        self._rewrites = _rewrites(host, self.broker_port, self.port)
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._cut = False

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> KafkaProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def cut(self) -> None:
        """Break every open connection and every new one at once, as a dead broker or network
        would. The port stays bound meanwhile: a port let go could be taken as the local port of
        some outgoing connection, and the proxy could not come back on it."""
        with self._lock:
            self._cut = True
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    @property
    def is_cut(self) -> bool:
        return self._cut or self._listener is None

    def restore(self) -> None:
        with self._lock:
            self._cut = False
        if self._listener is None:
            self.start()

    def stop(self) -> None:
        self.cut()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            if self._cut:
                client.close()
                continue
            try:
                upstream = socket.create_connection((self.broker_host, self.broker_port), 5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._cut or self._listener is not listener:  # cut while connecting
                    client.close()
                    upstream.close()
                    continue
                self._sockets.update((client, upstream))
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._responses, args=(upstream, client), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                target.sendall(chunk)
        except OSError:
            pass
        self._close(source, target)

    def _responses(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while True:
                header = _recv_exactly(source, 4)
                if header is None:
                    break
                (length,) = struct.unpack(">i", header)
                body = _recv_exactly(source, length)
                if body is None:
                    break
                for advertised, replacement in self._rewrites:
                    body = body.replace(advertised, replacement)
                target.sendall(struct.pack(">i", len(body)) + body)
        except OSError:
            pass
        self._close(source, target)

    def _close(self, *sockets: socket.socket) -> None:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            with self._lock:
                self._sockets.discard(sock)


class KafkaProxyGroup:
    """A rewriting proxy in front of every broker of a cluster, each rewriting every broker's
    advertised address to its proxy's: a client given `bootstrap_servers` reaches the cluster only
    through the group, so `cut()` takes its whole link away, as a network fault between an agent
    and a cluster of several brokers would."""

    def __init__(self, bootstrap_servers: str) -> None:
        self.proxies = [KafkaProxy(address.strip()) for address in bootstrap_servers.split(",")]
        rewrites = [
            pair for p in self.proxies for pair in _rewrites(p.broker_host, p.broker_port, p.port)
        ]
        for proxy in self.proxies:
            proxy._rewrites = rewrites

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(proxy.bootstrap_servers for proxy in self.proxies)

    def start(self) -> KafkaProxyGroup:
        for proxy in self.proxies:
            proxy.start()
        return self

    def cut(self) -> None:
        for proxy in self.proxies:
            proxy.cut()

    def restore(self) -> None:
        for proxy in self.proxies:
            proxy.restore()

    def stop(self) -> None:
        self.cut()


def _rewrites(host: str, port: int, proxy_port: int) -> list[tuple[bytes, bytes]]:
    """`host:port` -> `127.0.0.1:proxy_port` as a Metadata or FindCoordinator response carries
    them: with an INT16 length before the host, and with a flexible version's varint length + 1."""
    old, new = host.encode(), b"127.0.0.1"
    old_port, new_port = struct.pack(">i", port), struct.pack(">i", proxy_port)
    return [
        (
            struct.pack(">h", len(old)) + old + old_port,
            struct.pack(">h", len(new)) + new + new_port,
        ),
        (bytes([len(old) + 1]) + old + old_port, bytes([len(new) + 1]) + new + new_port),
    ]


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    parts = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)
