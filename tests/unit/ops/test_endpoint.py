"""The agents' HTTP endpoints under floods, in counts: a probe runs no readiness check, slow
connections take no thread each, and a /metrics flood fails no health probe."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from cni_plugin.ops import endpoint

LOOPBACK = ("127.0.0.1", 0)


class CountingCheck:
    """A readiness check that counts its runs (the agent's takes the IPAM lock and writes a file)."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self) -> str | None:
        self.runs += 1
        return None


@pytest.fixture
def readiness() -> Iterator[endpoint.Readiness]:
    checks = endpoint.Readiness(interval=3600)  # only the runs `add` asks for
    yield checks
    checks.close()


@contextlib.contextmanager
def serving(readiness: endpoint.Readiness, registry: CollectorRegistry | None = None
            ) -> Iterator[endpoint.Endpoint]:
    server = endpoint.Endpoint(LOOPBACK, readiness, registry)
    try:
        yield server
    finally:
        server.close()


def get(port: int, path: str, timeout: float = 1.0) -> int:
    """The status of one GET, as a kubelet probe makes it (1 s is its default timeout); 0 when
    it got no answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


def wait_status(port: int, path: str, status: int) -> None:
    deadline = time.monotonic() + 10
    while get(port, path) != status:
        assert time.monotonic() < deadline, f"{path} never answered {status}"
        time.sleep(0.05)


def test_readyz_runs_no_check(readiness: endpoint.Readiness) -> None:
    """/readyz answers from the last run of the checks: 100 probes, no check run."""
    check = CountingCheck()
    with serving(readiness) as server:
        readiness.add("counted", check)
        wait_status(server.port, "/readyz", 200)
        before = check.runs
        answered = sum(get(server.port, "/readyz") == 200 for _ in range(100))
        assert (answered, check.runs) == (100, before)


def test_readiness_reports_the_first_failing_check(readiness: endpoint.Readiness) -> None:
    readiness.add("fine", lambda: None)
    readiness.add("store", lambda: "IPAM store not writable")
    readiness.add("broken", lambda: 1 // 0)  # type: ignore[func-returns-value]
    deadline = time.monotonic() + 5
    while readiness.reason() != "IPAM store not writable":
        assert time.monotonic() < deadline, readiness.reason()
        time.sleep(0.01)
    readiness.add("store", lambda: None)  # same name: replaced
    while "broken: check failed: ZeroDivisionError" not in (readiness.reason() or ""):
        assert time.monotonic() < deadline, readiness.reason()
        time.sleep(0.01)


def _threads() -> int:
    return threading.active_count()


def test_slow_connections_take_no_thread(readiness: endpoint.Readiness) -> None:
    """300 connections that send half a request head: no thread each, the health endpoint
    answers every probe meanwhile, and once they are cut off the endpoint serves again."""
    readiness.add("ready", lambda: None)
    with serving(readiness) as server, serving(readiness) as health:
        wait_status(server.port, "/healthz", 200)
        threads = _threads()
        slow = []
        try:
            for _ in range(300):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", server.port))  # completes in the backlog or never
                slow.append(sock)
            time.sleep(0.2)  # let the endpoint accept what it will
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never the blank line
            probes = [get(health.port, "/healthz") for _ in range(20)]
            assert (_threads() - threads, probes.count(200)) == (0, 20)
        finally:
            for sock in slow:
                sock.close()
        wait_status(server.port, "/healthz", 200)


def test_metrics_flood_fails_no_health_probe(readiness: endpoint.Readiness) -> None:
    """Eight clients scrape /metrics back to back while a kubelet-like prober calls /healthz and
    /readyz on the health endpoint 20 times: every probe answered 200."""
    registry = CollectorRegistry()
    Counter("flood_test", "a series to render", ["n"], registry=registry).labels("1").inc()
    readiness.add("ready", lambda: None)
    stop = threading.Event()
    scrapes: list[int] = []

    def flood(port: int) -> None:
        while not stop.is_set():
            scrapes.append(get(port, "/metrics", timeout=0.5))

    with serving(readiness, registry) as server, serving(readiness) as health:
        wait_status(health.port, "/readyz", 200)
        flooders = [threading.Thread(target=flood, args=(server.port,)) for _ in range(8)]
        for thread in flooders:
            thread.start()
        try:
            while len(scrapes) < 100:
                time.sleep(0.01)
            probes = [get(health.port, path) for _ in range(10) for path in endpoint.HEALTH_PATHS]
        finally:
            stop.set()
            for thread in flooders:
                thread.join()
    assert probes.count(200) == 20
    assert 200 in scrapes  # the flood itself was served, some of it


def test_metrics_render_at_most_once_per_interval(readiness: endpoint.Readiness) -> None:
    """A scrape flood renders the registry (whose collectors may take the IPAM lock) at most
    once per RENDER_INTERVAL: 30 scrapes in a row, one render."""
    renders = []

    class Collector:
        def collect(self) -> Iterator[object]:
            renders.append(1)
            return iter(())

    registry = CollectorRegistry()
    registry.register(Collector())  # type: ignore[arg-type]
    with serving(readiness, registry) as server:
        started = time.monotonic()
        statuses = [get(server.port, "/metrics") for _ in range(30)]
        elapsed = time.monotonic() - started
    assert statuses.count(200) >= 1
    assert len(renders) <= 1 + int(elapsed / endpoint.RENDER_INTERVAL)


def test_a_failing_collector_fails_its_scrape_only(readiness: endpoint.Readiness) -> None:
    """A collector that raises: each scrape answers 500, the worker lives on, health answers."""

    class Broken:
        def collect(self) -> Iterator[object]:
            raise RuntimeError("collector bug")

    registry = CollectorRegistry()
    registry.register(Broken())  # type: ignore[arg-type]
    readiness.add("ready", lambda: None)
    with serving(readiness, registry) as server:
        statuses = [get(server.port, "/metrics") for _ in range(3)]
        assert (statuses, get(server.port, "/healthz")) == ([500, 500, 500], 200)
