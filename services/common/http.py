"""/healthz and /metrics for services without a web framework of their own (a thread, stdlib only)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a server started next (tests, local stack, workers)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def serve_health_and_metrics(
    host: str,
    port: int,
    registry: CollectorRegistry,
    health: Callable[[], dict],
    metrics: Callable[[], bytes] | None = None,
) -> ThreadingHTTPServer:
    """`metrics`, when given, makes the /metrics body instead of the registry alone."""
    exposition = metrics or (lambda: generate_latest(registry))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                body, ctype, status = exposition(), CONTENT_TYPE_LATEST, 200
            elif self.path == "/healthz":
                report = health()
                status = 200 if report.get("status") == "ok" else 503
                body, ctype = json.dumps(report).encode(), "application/json"
            else:
                body, ctype, status = (
                    b'{"error": "not_found", "detail": "no such path"}',
                    "application/json",
                    404,
                )
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health-http", daemon=True).start()
    return server
