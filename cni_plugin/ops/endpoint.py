"""The HTTP endpoint of a resident agent: /metrics (prometheus_client's exposition), /healthz, /readyz.

`--metrics-address HOST:PORT` (env PYBRIDGE_METRICS_ADDRESS) says where it listens, `off` disables
it. The default is loopback: with hostNetwork that is the node itself and nothing beyond it.
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, disable_created_metrics, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

ADDRESS_ENV = "PYBRIDGE_METRICS_ADDRESS"
OFF = "off"
REQUEST_TIMEOUT = 10.0  # a client that stops sending mid-request holds a thread no longer

disable_created_metrics()  # type: ignore[no-untyped-call]  # the `_created` series only double what scrapers see

Readiness = Callable[[], str | None]  # None when ready, else why not
StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def parse_address(value: str) -> tuple[str, int] | None:
    """HOST:PORT or [V6]:PORT; None for `off`. ValueError names what is wrong."""
    if value.strip().lower() == OFF:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"metrics address {value!r}: HOST:PORT or 'off' expected")
    return host.removeprefix("[").removesuffix("]"), int(port)


class _Quiet(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would drown the agent's own log


def _app(registry: CollectorRegistry, readiness: Readiness) -> Callable[[dict[str, Any], StartResponse],
                                                                         Iterable[bytes]]:
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return _text(start_response, "200 OK", "ok")
        if path == "/readyz":
            reason = readiness()
            return _text(start_response, "503 Service Unavailable", reason) if reason else \
                _text(start_response, "200 OK", "ok")
        if path == "/metrics":
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        return _text(start_response, "404 Not Found", "not found: /metrics, /healthz, /readyz")

    return app


def _text(start_response: StartResponse, status: str, body: str) -> list[bytes]:
    data = f"{body}\n".encode()
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))]
    start_response(status, headers)
    return [data]


def listen(address: tuple[str, int], registry: CollectorRegistry, readiness: Readiness) -> Endpoint | None:
    """The endpoint, or None (said on stderr) when the address cannot be bound: metrics are not
    worth stopping the agent for, e.g. in a netns whose loopback is down."""
    try:
        return Endpoint(address, registry, readiness)
    except OSError as exc:
        print(f"pybridge: metrics endpoint {address[0]}:{address[1]} not served: {exc}", file=sys.stderr,
              flush=True)
        return None


class Endpoint:
    """A listening endpoint served by a daemon thread until `close()`."""

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry, readiness: Readiness) -> None:
        host, port = address
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

        class Server(ThreadingWSGIServer):
            address_family = family

        self._server = make_server(host, port, _app(registry, readiness), Server, _Quiet)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(REQUEST_TIMEOUT)
