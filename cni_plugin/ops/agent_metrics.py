"""The agent's metrics: CNI calls by verb and result code, latency, calls in flight, declined,
undone and run without a turn, the collector's releases and runs, and per network the IPAM pool
(read from the stores at scrape time, so the figures are what `pyipam ls` shows whichever process
made the reservations)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cnikit.spec.errors import CNIError
from ipam.config import pool_size

from . import endpoint, networks

VERBS = ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DEFAULT_ADDRESS = "127.0.0.1:9430"
DEFAULT_HEALTH_ADDRESS = "127.0.0.1:9432"


def _verb(value: str) -> str:
    return value if value in VERBS else "other"  # label values must not come from the caller


def _code(value: int) -> str:
    return str(value) if 0 <= value < 1000 else "other"


class Metrics:
    """The agent's Observer, backed by a registry of its own."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter("pybridge_cni_calls", "CNI calls served, by program, verb and result code "
                             "(0: success, else the CNI error code)", ["program", "verb", "code"],
                             registry=registry)
        # containerd's own is network_plugin_operations_duration_seconds{operation_type}
        self.latency = Histogram("pybridge_cni_operation_duration_seconds", "Time to serve a CNI call",
                                 ["program", "verb"], buckets=LATENCY_BUCKETS, registry=registry)
        self.in_flight = Gauge("pybridge_cni_calls_in_flight", "CNI calls being served", registry=registry)
        self.declined_calls = Counter("pybridge_cni_calls_declined", "Calls the agent declined (the client "
                                      "then serves them in-process)", registry=registry)
        self.undone = Counter("pybridge_cni_adds_undone", "Successful ADDs undone because the caller left "
                              "before the result was delivered", registry=registry)
        self.without_turn = Counter("pybridge_cni_calls_without_turn", "Calls that waited the longest "
                                    "allowed for a turn and ran without one (the agent is saturated, or "
                                    "calls hold their turns while blocked)", registry=registry)
        self.gc_released = Counter("pybridge_ipam_gc_released_addresses", "Addresses released by IPAM GC",
                                   ["network"], registry=registry)
        self.collector_released = Counter("pybridge_gc_released", "Attachments the agent's collector "
                                          "released (their sandbox's netns and veth gone)", ["network"],
                                          registry=registry)
        self.collector_runs = Counter("pybridge_gc_runs", "Collector runs by outcome: done, "
                                      "runtime_unreachable (nothing released), failed (the observation or "
                                      "a release failed)", ["outcome"], registry=registry)

    def call_started(self) -> None:
        self.in_flight.inc()

    def call_finished(self, program: str, verb: str, code: int, seconds: float) -> None:
        self.in_flight.dec()
        self.calls.labels(program, _verb(verb), _code(code)).inc()
        self.latency.labels(program, _verb(verb)).observe(seconds)

    def declined(self) -> None:
        self.declined_calls.inc()

    def add_undone(self) -> None:
        self.undone.inc()

    def ran_without_turn(self) -> None:
        self.without_turn.inc()

    def ipam_released(self, network: str, count: int) -> None:
        self.gc_released.labels(network).inc(count)

    def collected(self, network: str) -> None:
        self.collector_released.labels(network).inc()

    def collection(self, outcome: str) -> None:
        self.collector_runs.labels(outcome).inc()


class PoolCollector(Collector):
    """Pool size, reserved and free addresses per network of the conf dir, read at each scrape."""

    def __init__(self, conf_dir: str) -> None:
        self.conf_dir = conf_dir

    def collect(self) -> Iterator[GaugeMetricFamily]:
        size = GaugeMetricFamily("pybridge_ipam_pool_addresses", "Allocatable addresses of the network's "
                                 "IPAM ranges", labels=["network"])
        reserved = GaugeMetricFamily("pybridge_ipam_reserved_addresses", "Addresses reserved in the "
                                     "network's IPAM store", labels=["network"])
        free = GaugeMetricFamily("pybridge_ipam_free_addresses", "Allocatable addresses not reserved",
                                 labels=["network"])
        # Per range set: one set full fails every ADD of the network even when the other has room.
        labels = ["network", "subnet", "range"]
        range_used = GaugeMetricFamily("pybridge_ipam_range_used_addresses", "Addresses of the range "
                                       "set's pool reserved", labels=labels)
        range_free = GaugeMetricFamily("pybridge_ipam_range_free_addresses", "Addresses of the range "
                                       "set's pool free; at 0 every ADD of the network fails with code 110",
                                       labels=labels)
        for _conf, cfg in networks.stores(networks.load_all(self.conf_dir)):
            held = networks.reserved_ips(cfg)
            if held is None:
                continue
            in_pool = sum(1 for ip in held if any(r.contains(ip) for s in cfg.ranges for r in s))
            total = pool_size(cfg.ranges)
            size.add_metric([cfg.network], total)
            reserved.add_metric([cfg.network], len(held))
            free.add_metric([cfg.network], max(total - in_pool, 0))
            for use in networks.range_use(cfg, held):
                range_used.add_metric([use.network, use.subnets, use.ranges], use.used)
                range_free.add_metric([use.network, use.subnets, use.ranges], use.free)
        yield from (size, reserved, free, range_used, range_free)


def store_problem(conf_dir: str) -> str | None:
    """Why an ADD could not write its reservation now, or None: the probe STATUS makes."""
    for _conf, cfg in networks.stores(networks.load_all(conf_dir)):
        store = networks.open_store(cfg)
        try:
            with store.lock():
                store.probe_writable()
        except CNIError as exc:
            return f"IPAM store of network {cfg.network}: {exc.msg}: {exc.details}"
    return None


class Served:
    """The running endpoints (none when both are off) and the readiness they report."""

    def __init__(self, readiness: endpoint.Readiness | None = None, conf_dir: str = "") -> None:
        self.readiness = readiness
        self.conf_dir = conf_dir
        self.servers: list[endpoint.Endpoint] = []

    def ready_when(self, listening: Callable[[], bool]) -> None:
        """Ready while the agent's socket is bound and every network's IPAM store takes a write."""
        if self.readiness is None:
            return
        self.readiness.add("agent socket", lambda: None if listening() else "agent socket not bound")
        self.readiness.add("IPAM stores", lambda: store_problem(self.conf_dir))

    def close(self) -> None:
        for server in self.servers:
            server.close()
        if self.readiness is not None:
            self.readiness.close()


def start(address: str | None, conf_dir: str | None, health_address: str | None = None
          ) -> tuple[Metrics | None, Served]:
    """Metrics at `address` and health at `health_address` (each: flag, else env, else the
    loopback default)."""
    metrics_at = endpoint.parse_address(address or os.environ.get(endpoint.ADDRESS_ENV) or DEFAULT_ADDRESS)
    health_at = endpoint.parse_address(health_address or os.environ.get(endpoint.HEALTH_ADDRESS_ENV)
                                       or DEFAULT_HEALTH_ADDRESS)
    directory = networks.conf_dir(conf_dir)
    if metrics_at is None and health_at is None:
        return None, Served()
    readiness = endpoint.Readiness()
    metrics, registry = None, None
    if metrics_at is not None:
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        metrics = Metrics(registry)
        registry.register(PoolCollector(directory))
    served = Served(readiness, directory)
    served.servers = endpoint.listen_all([(metrics_at, registry), (health_at, None)], readiness)
    return metrics, served
