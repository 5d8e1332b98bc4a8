"""The node controller's metrics and readiness: reconciles and their errors, routes programmed, nodes
seen, seconds since the last successful sync; ready once the conflist is written and the watch
has synced."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from . import endpoint

DEFAULT_ADDRESS = "127.0.0.1:9431"


class Refused(Protocol):
    """What is counted of a field the NetworkPolicy side refused (node/netpol/objects.Refusal)."""

    @property
    def kind(self) -> str: ...
DEFAULT_HEALTH_ADDRESS = "127.0.0.1:9433"
# From an API event to the nft transaction that holds it: ms when idle, seconds behind a relist
# of a large cluster or a slow nft, a minute when nft fails and is retried after a backoff.
DELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class NodeMetrics:
    """The node controller's observer: told the outcome of every reconcile."""

    def __init__(self, registry: CollectorRegistry, conflist: str) -> None:
        self.conflist = conflist
        self._lock = threading.Lock()
        self._last_sync: float | None = None
        self._waiting: str | None = "no Node list received yet"
        self.refusals = Counter("pybridge_node_refused", "API objects and fields the node controller "
                                "declined, by kind and reason: malformed (an object or field skipped), "
                                "outside-cluster and default-route (a podCIDR not routed), route-conflict (a "
                                "route it does not own holds the destination)",
                                ["kind", "reason"], registry=registry)
        self.checks: endpoint.Readiness | None = None  # served readiness, told of every change
        self.reconciles = Counter("pybridge_node_reconciles", "Reconciles of the node's conflist, routes "
                                  "and masquerade", registry=registry)
        self.errors = Counter("pybridge_node_reconcile_errors", "Errors met while applying a reconcile",
                              registry=registry)
        self.routes = Gauge("pybridge_node_routes", "Routes to other nodes' podCIDRs programmed",
                            registry=registry)
        self.nodes = Gauge("pybridge_node_nodes", "Node objects seen", registry=registry)
        self.fields_refused = Counter("pybridge_netpol_refused_fields", "Fields of NetworkPolicy, "
                                "ClusterNetworkPolicy, Pod and Namespace objects read that could not be "
                                "used (each read of one counts)",
                                ["kind"], registry=registry)
        # Named after Cilium's cilium_policy_implementation_delay and Calico's felix dataplane
        # apply metrics, so that their dashboards' queries carry over.
        self.delay = Histogram("pybridge_policy_implementation_delay_seconds", "Time from a NetworkPolicy, "
                               "Pod or Namespace event's arrival to the nft transaction holding its effect "
                               "being in force", buckets=DELAY_BUCKETS, registry=registry)
        self.applies = Counter("pybridge_policy_applies", "NetworkPolicy rulesets nft took (each one "
                               "transaction replacing the tables)", registry=registry)
        self.apply_failures = Counter("pybridge_policy_apply_failures", "NetworkPolicy rulesets nft refused "
                                      "or did not finish in time (the rules before stay in force; retried "
                                      "after a backoff)", registry=registry)
        self.rules = Gauge("pybridge_policy_rules", "nft rules of the NetworkPolicy tables in force",
                           registry=registry)
        self.elements = Gauge("pybridge_policy_set_elements", "Elements of the sets and verdict maps of "
                              "the NetworkPolicy tables in force", registry=registry)
        self.closed = Gauge("pybridge_policy_refused", "NetworkPolicies selecting pods of this node enforced "
                            "as allowing nothing in a direction, by reason: invalid (a field could not be "
                            "read), not-compiled (the compiler failed on it)", ["reason"], registry=registry)
        since = Gauge("pybridge_node_seconds_since_last_sync", "Seconds since the last reconcile of a "
                      "full Node list without errors (NaN before the first)", registry=registry)
        since.set_function(self._since_sync)

    def _since_sync(self) -> float:
        with self._lock:
            return math.nan if self._last_sync is None else time.monotonic() - self._last_sync

    def waiting(self, reason: str) -> None:
        with self._lock:
            self._waiting = reason
        self._changed()

    def _changed(self) -> None:
        if self.checks is not None:
            self.checks.refresh()

    def refused(self, kind: str, reason: str) -> None:
        self.refusals.labels(kind, reason).inc()

    def reconciled(self, nodes: int, routes: int, errors: int, full_sync: bool) -> None:
        self.reconciles.inc()
        self.errors.inc(errors)
        self.routes.set(routes)
        self.nodes.set(nodes)
        with self._lock:
            self._waiting = None
            if full_sync and not errors:
                self._last_sync = time.monotonic()
        self._changed()

    def field_refused(self, refusal: Refused) -> None:
        self.fields_refused.labels(refusal.kind).inc()

    def policies_refused(self, reasons: Mapping[str, int]) -> None:
        for reason, count in reasons.items():
            self.closed.labels(reason).set(count)

    def applied(self, delays: Sequence[float], rules: int, elements: int) -> None:
        self.applies.inc()
        for delay in delays:
            self.delay.observe(delay)
        self.rules.set(rules)
        self.elements.set(elements)

    def apply_failed(self) -> None:
        self.apply_failures.inc()

    def readiness(self) -> str | None:
        with self._lock:
            if self._waiting:
                return self._waiting
            if self._last_sync is None:
                return "Node watch not in sync"
        return None if os.path.isfile(self.conflist) else f"conflist {self.conflist} not written"


def start(address: str | None, conflist: str, health_address: str | None = None
          ) -> tuple[NodeMetrics | None, list[endpoint.Endpoint]]:
    """Metrics at `address`, health at `health_address` (each: argument, else env, else the
    loopback default). The readiness registry is `metrics.checks`: more inputs are one `add`."""
    metrics_at = endpoint.parse_address(address or os.environ.get(endpoint.ADDRESS_ENV) or DEFAULT_ADDRESS)
    health_at = endpoint.parse_address(health_address or os.environ.get(endpoint.HEALTH_ADDRESS_ENV)
                                       or DEFAULT_HEALTH_ADDRESS)
    if metrics_at is None and health_at is None:
        return None, []
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    metrics = NodeMetrics(registry, conflist)
    metrics.checks = endpoint.Readiness()
    metrics.checks.add("node controller", metrics.readiness)
    return metrics, endpoint.listen_all([(metrics_at, registry), (health_at, None)], metrics.checks)
