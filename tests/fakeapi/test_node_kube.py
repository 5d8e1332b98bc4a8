"""The node controller against recorded Node objects through the real Kubernetes client (no apiserver).

The objects in data/ are in the API's JSON form for a kind cluster named `pybridge`
(1 control plane + 2 workers): data/nodes.json is the list, data/watch-events.jsonl the watch
that follows (a worker joins without a podCIDR, gets one, a bookmark, worker2 is deleted).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from cni_plugin.node import kube, model
from cni_plugin.node.controller import NodeController
from cni_plugin.node.effects import NodeEffects
from cni_plugin.ops.node_metrics import NodeMetrics

from .apiserver import FakePool, api_client, load, load_events

ME = "pybridge-worker"
CLUSTER = (ipaddress.ip_network("10.70.0.0/16"),)


class Exhausted(Exception):
    pass


class Recorder:
    """Effects that record instead of touching the kernel; routes persist like the kernel's."""

    def __init__(self) -> None:
        self.installed: set[model.Route] = set()
        self.applied: list[model.Desired] = []
        self.resyncs = 0

    def routes(self) -> set[model.Route]:
        return set(self.installed)

    def foreign_routes(self) -> set[str]:
        return set()

    def mtu(self, node: model.Node | None) -> int | None:
        return 1500

    def apply(self, plan: model.Desired) -> list[str]:
        self.installed -= plan.route_deletes
        self.installed |= plan.route_sets
        self.applied.append(plan)
        return []

    def resync(self) -> None:
        self.resyncs += 1


def run(pool: FakePool, agent: NodeController) -> list[tuple[str, str]]:
    """Feed every event the client yields to the agent until the script is used up (the
    stream never raises: the used-up script's error stops it)."""
    done: list[bool] = []

    def exhausted() -> None:
        done.append(True)
        raise Exhausted

    pool.on_exhausted = exhausted
    seen = []
    for kind, obj in kube.node_events(api_client(pool), timeout_seconds=5, backoff=lambda _s: None,
                                      stop=lambda: bool(done)):
        seen.append((kind, obj["metadata"]["name"] if kind != "SYNC" else str(len(obj))))
        agent.handle(kind, obj)
    assert done
    return seen


def routes_of(effects: Recorder) -> set[tuple[str, str]]:
    return {(r.dst, r.gateway) for r in effects.installed}


def test_list_then_watch_node_added_then_removed() -> None:
    pool = FakePool([load("nodes.json")], [load_events("watch-events.jsonl")])
    effects = Recorder()
    agent = NodeController(model.Settings(node_name=ME, cluster_cidrs=CLUSTER), effects)
    seen = run(pool, agent)
    assert seen == [
        ("SYNC", "3"),
        ("ADDED", "pybridge-worker3"),
        ("MODIFIED", "pybridge-worker3"),
        ("DELETED", "pybridge-worker2"),
    ]
    # the watch started at the list's resourceVersion, with a timeout (periodic resync)
    watch = next(q for q in pool.requests if q.get("watch"))
    assert watch["resourceVersion"] == ["1000"] and watch["timeoutSeconds"] == ["5"]
    states = [routes_of_plan(p) for p in effects.applied]
    assert states[0] == {("10.70.0.0/24", "172.18.0.4"), ("10.70.2.0/24", "172.18.0.3")}
    assert states[1] == states[0]  # worker3 joined without a podCIDR: nothing to route yet
    assert states[2] == states[0] | {("10.70.3.0/24", "172.18.0.5")}
    assert states[3] == {("10.70.0.0/24", "172.18.0.4"), ("10.70.3.0/24", "172.18.0.5")}
    assert {(r.dst, r.gateway) for r in effects.applied[3].route_deletes} == {("10.70.2.0/24", "172.18.0.3")}
    assert routes_of(effects) == states[3]
    conf = effects.applied[-1].conflist
    assert conf is not None and conf["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "10.70.1.0/24"}]]
    # masquerade keeps the cluster CIDR unmasqueraded (every node's podCIDR lies inside it)
    masq = effects.applied[-1].masquerade or ""
    assert "ip saddr { 10.70.1.0/24 } ip daddr != { 10.70.0.0/16, 224.0.0.0/4 } masquerade" in masq


def routes_of_plan(plan: model.Desired) -> set[tuple[str, str]]:
    return {(r.dst, r.gateway) for r in plan.routes}


def test_expired_watch_lists_again() -> None:
    later = load("nodes.json")
    later["metadata"]["resourceVersion"] = "1500"
    pool = FakePool([load("nodes.json"), later], [410, []])
    effects = Recorder()
    seen = run(pool, NodeController(model.Settings(node_name=ME, cluster_cidrs=CLUSTER), effects))
    assert seen == [("SYNC", "3"), ("SYNC", "3")]
    assert effects.resyncs == 2
    watches = [q["resourceVersion"] for q in pool.requests if q.get("watch")]
    assert watches[:2] == [["1000"], ["1500"]]


def test_own_podcidr_not_yet_assigned_waits_and_writes_nothing(tmp_path: Path) -> None:
    nodes = load("nodes.json")
    own = next(n for n in nodes["items"] if n["metadata"]["name"] == ME)
    del own["spec"]["podCIDR"], own["spec"]["podCIDRs"]
    assigned: dict[str, Any] = {**own, "spec": {**own["spec"], "podCIDRs": ["10.70.1.0/24"]}}
    pool = FakePool([nodes], [[{"type": "MODIFIED", "object": own}]])
    host = NodeEffects(str(tmp_path / "net.d"))
    touched: list[str] = []
    host.routes = lambda: touched.append("routes") or set()  # type: ignore[method-assign]
    host.foreign_routes = lambda: touched.append("foreign") or set()  # type: ignore[method-assign]
    host.apply = lambda plan: touched.append("apply") or []  # type: ignore[method-assign]
    agent = NodeController(model.Settings(node_name=ME, cluster_cidrs=CLUSTER), host)
    run(pool, agent)
    assert touched == []
    assert not (tmp_path / "net.d").exists()
    # the podCIDR arrives: now (and only now) the agent acts
    plan = agent.handle("MODIFIED", assigned)
    assert plan.waiting is None and touched == ["routes", "foreign", "apply"]


def test_dual_stack_nodes() -> None:
    pool = FakePool([load("nodes-dualstack.json")], [])
    effects = Recorder()
    run(
        pool,
        NodeController(
            model.Settings(
                node_name=ME,
                cluster_cidrs=(ipaddress.ip_network("10.70.0.0/16"), ipaddress.ip_network("fd00:10:70::/56")),
            ),
            effects,
        ),
    )
    assert routes_of(effects) == {
        ("10.70.0.0/24", "172.18.0.4"),
        ("fd00:10:70::/64", "fc00:f853:ccd:e793::4"),
        ("10.70.2.0/24", "172.18.0.3"),
        ("fd00:10:70:2::/64", "fc00:f853:ccd:e793::3"),
    }
    conf = effects.applied[-1].conflist
    assert conf is not None
    assert conf["plugins"][0]["ipam"]["ranges"] == [
        [{"subnet": "10.70.1.0/24"}],
        [{"subnet": "fd00:10:70:1::/64"}],
    ]


def test_metrics_follow_the_recorded_watch(tmp_path: Path) -> None:
    """The node controller's observer over the real client: each event is a reconcile, the gauges
    follow the cache and the routes, readiness waits for the conflist."""
    conflist = tmp_path / model.CONFLIST_NAME
    metrics = NodeMetrics(registry := CollectorRegistry(), str(conflist))
    pool = FakePool([load("nodes.json")], [load_events("watch-events.jsonl")])
    effects = Recorder()
    agent = NodeController(model.Settings(node_name=ME, cluster_cidrs=CLUSTER), effects, metrics)
    run(pool, agent)
    assert registry.get_sample_value("pybridge_node_reconciles_total") == 4  # SYNC + 3 events
    assert registry.get_sample_value("pybridge_node_reconcile_errors_total") == 0
    assert registry.get_sample_value("pybridge_node_nodes") == len(agent.nodes) == 3
    assert registry.get_sample_value("pybridge_node_routes") == len(effects.installed) == 2
    assert (registry.get_sample_value("pybridge_node_seconds_since_last_sync") or -1) >= 0
    assert metrics.readiness() == f"conflist {conflist} not written"  # Recorder writes no file


def test_a_refused_list_is_reported_then_retried_after_a_backoff() -> None:
    pool = FakePool([401, load("nodes.json")], [[]])
    reported: list[int] = []
    waits: list[float] = []
    events = kube.node_events(api_client(pool), timeout_seconds=5, backoff=waits.append,
                              report=lambda exc: reported.append(getattr(exc, "status", 0)))
    assert next(events)[0] == "SYNC"  # the second list, after the 401 was reported
    assert reported == [401] and len(waits) == 1 and 0.25 <= waits[0] <= 0.5  # the backoff's first step
