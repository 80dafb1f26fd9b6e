"""A TCP proxy in front of a Kafka broker that can be cut and restored (the fault drill, tests).

Kafka clients only bootstrap through the address they are given; after that they connect to the
addresses the broker advertises in Metadata (and FindCoordinator) responses. So that every
connection goes through the proxy, responses are re-framed and the advertised `127.0.0.1:<broker>`
is rewritten to `127.0.0.1:<proxy>`. Both ports are 4-byte integers right after the host string,
so the rewrite keeps every length in the frame intact.
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
        self._from = b"127.0.0.1" + struct.pack(">i", self.broker_port)
        self._to = b"127.0.0.1" + struct.pack(">i", self.port)
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None

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
        """Refuse new connections and break every open one, as a dead broker or network would."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    @property
    def is_cut(self) -> bool:
        return self._listener is None

    def restore(self) -> None:
        if self._listener is None:
            self.start()

    def stop(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection((self.broker_host, self.broker_port), 5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut while connecting
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
                target.sendall(header + body.replace(self._from, self._to))
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


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    parts = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)
