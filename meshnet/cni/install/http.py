"""The installer's HTTP server: `/readyz` (readiness port) and `/metrics` (monitoring port)."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler
from typing import Any

from meshnet.cni import metrics
from meshnet.errors import InstallError

# A route answers (status, body, content type).
Route = Callable[[], tuple[int, bytes, str]]
_TEXT = "text/plain; charset=utf-8"


def readyz_route(problems: Callable[[], list[str]]) -> Route:
    """`/readyz`: 200 `ok`, or 503 with one line per missing piece."""

    def answer() -> tuple[int, bytes, str]:
        missing = problems()
        if not missing:
            return 200, b"ok\n", _TEXT
        return 503, "".join(f"not ready: {line}\n" for line in missing).encode(), _TEXT

    return answer


def metrics_route() -> tuple[int, bytes, str]:
    body, content_type = metrics.exposition()
    return 200, body, content_type


class _HttpServer(socketserver.ThreadingTCPServer):
    """A few GET routes. A bare TCPServer: HTTPServer's bind does a reverse DNS lookup."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(
        self, port: int, routes: Mapping[str, Route], family: socket.AddressFamily
    ) -> None:
        self.address_family = family
        self.routes = routes
        # All addresses: the kubelet probes the pod IP.
        host = "::" if family == socket.AF_INET6 else "0.0.0.0"
        super().__init__((host, port), _RouteHandler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:  # one socket for IPv4 and IPv6, as Go's ":8000"
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _RouteHandler(BaseHTTPRequestHandler):
    server: _HttpServer

    def do_GET(self) -> None:
        route = self.server.routes.get(self.path.split("?", 1)[0])
        if route is None:
            self._reply(404, b"not found\n", _TEXT)
        else:
            self._reply(*route())

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the kubelet and Prometheus ask every few seconds; a line per request is noise


def serve(port: int, routes: Mapping[str, Route], option: str) -> _HttpServer:
    """Serve `routes` on all addresses in a daemon thread; `option` names the port's variable."""
    try:
        server = _HttpServer(port, routes, socket.AF_INET6)
    except OSError:
        try:  # no IPv6 in this kernel or namespace
            server = _HttpServer(port, routes, socket.AF_INET)
        except OSError as err:
            raise InstallError(
                f"cannot serve {', '.join(routes)} on port {port}: {err.strerror} (set {option})"
            ) from None
    # A short poll so that shutdown() at exit returns at once (the default waits up to 0.5 s).
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=option, daemon=True
    )
    thread.start()
    return server


def serve_readiness(port: int, problems: Callable[[], list[str]]) -> _HttpServer:
    return serve(port, {"/readyz": readyz_route(problems)}, "MESHNET_CNI_READINESS_PORT")


def serve_metrics(port: int) -> _HttpServer:
    return serve(port, {"/metrics": metrics_route}, "MONITORING_PORT")
