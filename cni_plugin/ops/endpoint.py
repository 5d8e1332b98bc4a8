"""The HTTP endpoints of the resident agents: /metrics (prometheus_client's exposition), /healthz
and /readyz.

`--metrics-address HOST:PORT` (env PYBRIDGE_METRICS_ADDRESS) serves all three; `--health-address`
(env PYBRIDGE_HEALTH_ADDRESS) serves /healthz and /readyz only, for the kubelet's probes; `off`
disables either. The defaults are loopback: with hostNetwork that is the node itself and nothing
beyond it (not its pods).

Whoever reaches an endpoint (every pod, when it listens on the node's address) may flood it, so
a request costs the agent next to nothing and never a thread of its own:
- one thread per endpoint runs a selector over the listener and the connections whose request
  head is still arriving; a connection costs a buffer, and has REQUEST_DEADLINE for its whole
  head (a client trickling bytes is cut off, not waited for);
- connections are accepted at most ACCEPT_RATE a second and MAX_OPEN at once; beyond that the
  listener is not polled and its small backlog holds (then the kernel drops) new connections,
  so a flood costs the kernel, not the agent's Python;
- /healthz and /readyz are answered by that thread from state in memory: readiness is a
  registry of checks run by a thread of their own every READINESS_INTERVAL (`Readiness`), never
  by a request, so no probe takes a lock or touches a file;
- /metrics is rendered by one worker, at most once per RENDER_INTERVAL (later requests get the
  same bytes); while the worker is busy, further /metrics requests get 503 at once.
"""

from __future__ import annotations

import contextlib
import queue
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.exposition import choose_encoder

ADDRESS_ENV = "PYBRIDGE_METRICS_ADDRESS"
HEALTH_ADDRESS_ENV = "PYBRIDGE_HEALTH_ADDRESS"
OFF = "off"
REQUEST_DEADLINE = 2.0  # from accept to the request head's last byte
SEND_DEADLINE = 5.0  # for a /metrics answer to a client that reads slowly
MAX_HEAD = 4096  # a GET's request line and headers; anything longer is not one of ours
MAX_OPEN = 64  # connections whose request head is arriving
ACCEPT_RATE = 20.0  # connections accepted per second, in bursts of up to ACCEPT_BURST: probes come
# every 10 s, scrapes every 15 s or more; a flood gets this many answers a second and no more
ACCEPT_BURST = 10.0
BACKLOG = 16  # connections the kernel holds for us while we do not accept
METRICS_QUEUE = 2  # /metrics requests waiting for the worker
RENDER_INTERVAL = 1.0  # a scrape sooner than this after the last gets the same exposition
READINESS_INTERVAL = 5.0  # seconds between runs of the readiness checks (kubelet probes every 10)
HEALTH_PATHS = ("/healthz", "/readyz")
TEXT = "text/plain; charset=utf-8"

disable_created_metrics()  # type: ignore[no-untyped-call]  # the `_created` series only double what scrapers see

Check = Callable[[], str | None]  # None when ready, else why not


def parse_address(value: str) -> tuple[str, int] | None:
    """HOST:PORT or [V6]:PORT; None for `off`. ValueError names what is wrong."""
    if value.strip().lower() == OFF:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"metrics address {value!r}: HOST:PORT or 'off' expected")
    return host.removeprefix("[").removesuffix("]"), int(port)


class Readiness:
    """Named readiness checks, run together by a thread of their own; `reason()` is the outcome
    of the last run (None: ready). Another input is one more `add`."""

    def __init__(self, interval: float = READINESS_INTERVAL) -> None:
        self.interval = interval
        self._checks: dict[str, Check] = {}
        self._lock = threading.Lock()
        self._reason: str | None = "readiness not checked yet"
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="readiness", daemon=True)
        self._thread.start()

    def add(self, name: str, check: Check) -> None:
        with self._lock:
            self._checks[name] = check
        self.refresh()

    def refresh(self) -> None:
        """Run the checks now (in the checking thread) rather than at the next interval."""
        self._wake.set()

    def reason(self) -> str | None:
        return self._reason

    def close(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(self.interval)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            self._reason = self._run()
            self._wake.wait(self.interval)

    def _run(self) -> str | None:
        with self._lock:
            checks = list(self._checks.items())
        if not checks:
            return "no readiness check registered"
        for name, check in checks:
            try:
                reason = check()
            except Exception as exc:  # a check's bug is a reason not to be ready, not a dead thread
                reason = f"{name}: check failed: {exc!r}"
            if reason:
                return reason
        return None


def listen(address: tuple[str, int], readiness: Readiness, registry: CollectorRegistry | None = None
           ) -> Endpoint | None:
    """The endpoint (with /metrics when given a registry), or None (said on stderr) when the
    address cannot be bound: metrics are not worth stopping the agent for, e.g. in a netns whose
    loopback is down."""
    try:
        return Endpoint(address, readiness, registry)
    except OSError as exc:
        print(f"pybridge: endpoint {address[0]}:{address[1]} not served: {exc}", file=sys.stderr, flush=True)
        return None


def listen_all(wanted: list[tuple[tuple[str, int] | None, CollectorRegistry | None]], readiness: Readiness
               ) -> list[Endpoint]:
    """An endpoint per (address, registry or None for health only) whose address is not off."""
    served = (listen(address, readiness, registry) for address, registry in wanted if address is not None)
    return [server for server in served if server is not None]


@dataclass
class _Arriving:
    """A connection whose request head is still arriving."""

    conn: socket.socket
    deadline: float
    head: bytearray = field(default_factory=bytearray)


class Endpoint:
    """A listening endpoint served by a daemon thread (and a /metrics worker) until `close()`."""

    def __init__(self, address: tuple[str, int], readiness: Readiness,
                 registry: CollectorRegistry | None = None) -> None:
        host, port = address
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        self._sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
        self._sock.setblocking(False)
        self.port: int = self._sock.getsockname()[1]
        self._readiness = readiness
        self._registry = registry
        self._arriving: dict[int, _Arriving] = {}
        self._tokens = ACCEPT_BURST
        self._refilled = time.monotonic()
        self._wake_r, self._wake_w = socket.socketpair()
        self._closing = False
        self._rendered: dict[str, tuple[float, bytes]] = {}  # content type -> (when, exposition)
        self._jobs: queue.Queue[tuple[socket.socket, str] | None] = queue.Queue(METRICS_QUEUE)
        self._threads = [threading.Thread(target=self._serve, name="endpoint", daemon=True)]
        if registry is not None:
            self._threads.append(threading.Thread(target=self._render_jobs, name="metrics", daemon=True))
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        with contextlib.suppress(queue.Full):
            self._jobs.put_nowait(None)
        for thread in self._threads:
            thread.join(SEND_DEADLINE)
        self._wake_w.close()

    # --- the selector thread ------------------------------------------------------------------

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            accepting = False
            try:
                while not self._closing:
                    now = time.monotonic()
                    self._expire(selector, now)
                    want = self._may_accept(now)
                    if want != accepting:
                        if want:
                            selector.register(self._sock, selectors.EVENT_READ)
                        else:
                            selector.unregister(self._sock)
                        accepting = want
                    for key, _ in selector.select(self._timeout(now)):
                        if key.fileobj is self._sock:
                            self._accept(selector)
                        elif key.fileobj is not self._wake_r:
                            self._receive(selector, key.data)
            finally:
                for arriving in self._arriving.values():
                    arriving.conn.close()
                self._sock.close()
                self._wake_r.close()

    def _may_accept(self, now: float) -> bool:
        self._tokens = min(ACCEPT_BURST, self._tokens + (now - self._refilled) * ACCEPT_RATE)
        self._refilled = now
        return self._tokens >= 1 and len(self._arriving) < MAX_OPEN

    def _timeout(self, now: float) -> float:
        waits = [a.deadline - now for a in self._arriving.values()]
        if self._tokens < 1:
            waits.append((1 - self._tokens) / ACCEPT_RATE)
        return max(min(waits, default=1.0), 0.001)

    def _expire(self, selector: selectors.BaseSelector, now: float) -> None:
        for arriving in [a for a in self._arriving.values() if a.deadline <= now]:
            self._drop(selector, arriving)

    def _drop(self, selector: selectors.BaseSelector, arriving: _Arriving) -> None:
        selector.unregister(arriving.conn)
        del self._arriving[arriving.conn.fileno()]
        arriving.conn.close()

    def _accept(self, selector: selectors.BaseSelector) -> None:
        try:
            conn, _ = self._sock.accept()
        except OSError:  # gone before we took it, or out of fds: the next round retries
            return
        self._tokens -= 1
        conn.setblocking(False)
        arriving = _Arriving(conn, time.monotonic() + REQUEST_DEADLINE)
        self._arriving[conn.fileno()] = arriving
        selector.register(conn, selectors.EVENT_READ, arriving)

    def _receive(self, selector: selectors.BaseSelector, arriving: _Arriving) -> None:
        try:
            chunk = arriving.conn.recv(MAX_HEAD - len(arriving.head))
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        arriving.head += chunk
        end = arriving.head.find(b"\r\n\r\n")
        if not chunk or (end < 0 and len(arriving.head) >= MAX_HEAD):
            self._drop(selector, arriving)
        elif end >= 0:
            selector.unregister(arriving.conn)
            del self._arriving[arriving.conn.fileno()]
            self._route(arriving.conn, bytes(arriving.head[:end]))

    def _route(self, conn: socket.socket, head: bytes) -> None:
        """Answer from memory, or hand /metrics to the worker; the connection is closed or handed."""
        lines = head.decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if method != "GET":
            return _answer_now(conn, "405 Method Not Allowed", "GET only")
        if path == "/healthz":
            return _answer_now(conn, "200 OK", "ok")
        if path == "/readyz":
            reason = self._readiness.reason()
            return _answer_now(conn, "503 Service Unavailable", reason) if reason else \
                _answer_now(conn, "200 OK", "ok")
        if path == "/metrics" and self._registry is not None:
            accept = next((line.partition(":")[2].strip() for line in lines[1:]
                           if line.lower().startswith("accept:")), "")
            try:
                self._jobs.put_nowait((conn, accept))
            except queue.Full:
                _answer_now(conn, "503 Service Unavailable", "busy: try again")
            return None
        paths = ", ".join(("/metrics", *HEALTH_PATHS) if self._registry is not None else HEALTH_PATHS)
        return _answer_now(conn, "404 Not Found", f"not found: {paths}")

    # --- the /metrics worker ------------------------------------------------------------------

    def _render_jobs(self) -> None:
        while (job := self._jobs.get()) is not None:
            conn, accept = job
            try:
                content_type, body = self._exposition(accept)
                response = _response("200 OK", content_type, body)
            except Exception as exc:  # a collector's bug fails this scrape, not the worker
                response = _response("500 Internal Server Error", TEXT, f"{exc!r}\n".encode())
            try:
                _send(conn, response, time.monotonic() + SEND_DEADLINE)
            except OSError:
                pass  # the scraper went away or read too slowly: its loss
            finally:
                conn.close()

    def _exposition(self, accept: str) -> tuple[str, bytes]:
        encoder, content_type = choose_encoder(accept)
        now = time.monotonic()
        when, body = self._rendered.get(content_type, (-RENDER_INTERVAL, b""))
        if now - when >= RENDER_INTERVAL:
            assert self._registry is not None
            body = encoder(self._registry)
            self._rendered[content_type] = (now, body)
        return content_type, body


def _response(status: str, content_type: str, body: bytes) -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + body


def _answer_now(conn: socket.socket, status: str, text: str) -> None:
    """A short answer, sent without waiting: it fits the new connection's empty send buffer; a
    client whose buffer is full anyway gets nothing."""
    with conn, contextlib.suppress(OSError):
        conn.send(_response(status, TEXT, f"{text}\n".encode()))


def _send(conn: socket.socket, data: bytes, deadline: float) -> None:
    """All of `data` by `deadline`, or TimeoutError/OSError."""
    view = memoryview(data)
    while view:
        conn.settimeout(max(deadline - time.monotonic(), 0.001))
        view = view[conn.send(view):]
