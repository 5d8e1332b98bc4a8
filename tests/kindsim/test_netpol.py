"""NetworkPolicy across the simulated nodes: the upstream suite's world (namespaces x, y, z with
pods a, b, c, each namespace with one pod on every node), the objects served by the fake API
(tests/kind/fakeapi.py) and watched by the DaemonSet's node agents through the Kubernetes client,
the rules applied by each node's agent in its own kernel namespace.

The cases and their expected matrices are tests/netns/netpol_cases.py (one source for both
tiers); each case's events become API changes (policies created, replaced, deleted; pods and
namespaces relabelled), and every check probes all 72 ordered pod pairs at once, TCP or UDP, on
port 80 or 81, from sockets made in the pods' own netns. The agents apply asynchronously: a check
probes again until the matrix matches, for at most CONVERGE seconds, then reports the pairs that
differ. Every case runs (~1-2 s each); `make kind-sim-netpol` runs this module alone.
IPv4 only (kind-config.yaml's podSubnet is IPv4).
"""

from __future__ import annotations

import copy
import json
import os
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from cni_plugin.node.netpol.nft import TABLE

from ..netns.netpol_cases import CASES, CLUSTER_CASES, PODS, PORT_NAMES, Matrix, Pods, ns_policy, reachable
from ..netns.netpol_probe import Servers, differences, observe
from ..netns.nodeagent import Flood
from .cluster import Cluster, KindNode
from .image import REPO
from .kubelet import Pod

pytestmark = pytest.mark.kindsim

CONVERGE = 20.0
# The first wait for answers: a blocked pair costs this much, a pair expected open but not seen
# is probed again with 3 s, and a pair seen open is open, so shortening it only saves time.
FIRST_WAIT = 0.3


@dataclass
class Sim:
    cluster: Cluster
    world: Pods
    pods: dict[str, Pod]  # "x/a" -> the running pod

    def apply(self, kind: str, event: str, obj: dict[str, Any]) -> None:
        """A case's event as the change to the API that causes it."""
        meta = obj["metadata"]
        store = self.cluster.store
        assert store is not None
        if kind == "ClusterNetworkPolicy" and event == "DELETED":
            store.remove("clusternetworkpolicies", meta["name"])
        elif kind == "ClusterNetworkPolicy":
            store.put("clusternetworkpolicies", copy.deepcopy(obj))
        elif kind == "NetworkPolicy" and event == "DELETED":
            store.remove("networkpolicies", f"{meta['namespace']}/{meta['name']}")
        elif kind == "NetworkPolicy":
            policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", **copy.deepcopy(obj)}
            store.put("networkpolicies", policy)
        elif kind == "Pod":
            self.cluster.relabel_pod(self.pods[f"{meta['namespace']}/{meta['name']}"], meta["labels"])
        else:
            self.cluster.add_namespace(meta["name"], meta.get("labels"))

    def reset(self) -> None:
        """No policy, every pod and namespace with its first labels."""
        store = self.cluster.store
        assert store is not None
        for resource in ("networkpolicies", "clusternetworkpolicies"):
            for name in list(store.objects[resource]):
                store.remove(resource, name)
        for pod in self.pods.values():
            if pod.labels != {"pod": pod.name}:
                self.cluster.relabel_pod(pod, {"pod": pod.name})
        for ns in "xyz":
            if set(store.objects["namespaces"][ns]["metadata"]["labels"]) != {"kubernetes.io/metadata.name"}:
                self.cluster.add_namespace(ns)

    def converge(self, proto: str, port: int, expected: Matrix) -> list[str]:
        """The pairs still differing from `expected` after at most CONVERGE seconds."""
        deadline = time.monotonic() + CONVERGE
        while True:
            wrong = differences(expected, observe(self.world, proto, port, 4, expected, FIRST_WAIT))
            if not wrong or time.monotonic() > deadline:
                return wrong
            time.sleep(0.2)


def placement(nodes: list[str]) -> dict[str, str]:
    """x/a, y/c, z/b on the first node, x/b, y/a, z/c on the second...: every namespace and every
    pod name on every node, so each case has same-node and cross-node pairs of each kind."""
    return {pod: nodes[(i // 3 + i % 3) % len(nodes)] for i, pod in enumerate(PODS)}


def _start(cluster: Cluster, node: str, pods: list[str]) -> dict[str, Pod]:
    extra = {"main": {"ports": PORT_NAMES}}
    return {
        p: cluster.run_pod(
            node, p.split("/")[1], labels={"pod": p.split("/")[1]}, extra=extra, namespace=p[0]
        )
        for p in pods
    }


@pytest.fixture(scope="module")
def sim(cluster: Cluster) -> Iterator[Sim]:
    nodes = sorted(cluster.nodes)
    assert len(nodes) == 3, nodes
    cluster.wait_ready()
    where = placement(nodes)
    for ns in "xyz":
        cluster.add_namespace(ns)
    pods: dict[str, Pod] = {}
    servers = None
    try:
        with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
            started = [pool.submit(_start, cluster, n, [p for p in PODS if where[p] == n]) for n in nodes]
            for done in started:
                pods.update(done.result())
        pids = {
            p: cluster.kubelets[pod.node].cri.pod_status(pod.id)["info"]["pid"] for p, pod in pods.items()
        }
        world = Pods(
            netns={p: f"/proc/{pid}/ns/net" for p, pid in pids.items()},
            ips={p: {4: pod.ip} for p, pod in pods.items()},
            subnet=cluster.config["networking"]["podSubnet"],
            nodes=where,
        )
        servers = Servers(world.netns)
        yield Sim(cluster, world, pods)
    finally:
        if servers is not None:
            servers.close()
        for pod in pods.values():
            cluster.delete_pod(pod)
        assert cluster.store is not None
        for resource in ("networkpolicies", "clusternetworkpolicies"):
            for name in list(cluster.store.objects[resource]):
                cluster.store.remove(resource, name)
        for ns in "xyz":
            cluster.store.remove("namespaces", ns)


def test_pods_are_api_objects_with_their_node_and_address(sim: Sim) -> None:
    """What kubelet posts: each pod in the API with its labels, namespace, nodeName and podIP."""
    store = sim.cluster.store
    assert store is not None
    served = {
        f"{o['metadata']['namespace']}/{o['metadata']['name']}": o for o in store.listing("pods")["items"]
    }
    for name, pod in sim.pods.items():
        obj = served[name]
        assert obj["metadata"]["labels"] == {"pod": name[2]}
        assert (obj["spec"]["nodeName"], obj["status"]["podIP"]) == (sim.world.nodes[name], pod.ip)
    assert len(set(sim.world.nodes.values())) == 3


@pytest.mark.parametrize(
    "title", [*CASES, *CLUSTER_CASES],
    ids=[re.sub(r"[^A-Za-z0-9]+", "-", t).strip("-") for t in [*CASES, *CLUSTER_CASES]]
)
def test_upstream_case_reachability_across_nodes(sim: Sim, title: str) -> None:
    sim.reset()
    wrong = sim.converge("TCP", 80, reachable())
    assert not wrong, "before the case: " + "; ".join(wrong)
    for number, step in enumerate({**CASES, **CLUSTER_CASES}[title](sim.world)):
        for kind, event, obj in step.events:
            sim.apply(kind, event, obj)
        for proto, port, expected in step.checks:
            wrong = sim.converge(proto, port, expected)
            assert not wrong, f"step {number}, {proto}/{port}: " + "; ".join(wrong)


def _table_handle(node: KindNode) -> str:
    """The netpol table's first line with its handle, which each replacement changes ('' if none)."""
    listed = node.in_node("nft", "-a", "list", "table", "inet", TABLE, check=False).stdout
    return next(iter(listed.splitlines()), "")


def test_a_node_agent_restart_lets_no_forbidden_packet_through(sim: Sim) -> None:
    """The kubelet stops the DaemonSet's node agent (CRI StopContainer: SIGTERM) and starts it
    again, as a roll does, while a pod on another node sends to an isolated pod every ms."""
    sim.reset()
    sim.apply("NetworkPolicy", "ADDED", ns_policy("x", "deny", {"podSelector": {}}))
    wrong = sim.converge("UDP", 80, reachable(("*", "x/*", False)))
    assert not wrong, "; ".join(wrong)
    node = sim.world.nodes["x/a"]
    source = next(p for p in PODS if not p.startswith("x/") and sim.world.nodes[p] != node)
    kubelet, daemon = sim.cluster.kubelets[node], sim.cluster.daemon_pods[node]
    kind_node = sim.cluster.nodes[node]
    before = _table_handle(kind_node)
    assert before
    with Flood(sim.world, source, "x/a") as forbidden:
        started = time.monotonic()
        assert kubelet.stop_container(daemon, "node") == 0
        stopped = time.monotonic() - started
        assert _table_handle(kind_node) == before  # left in force
        kubelet.start(daemon, next(c for c in daemon.spec["containers"] if c["name"] == "node"))
        deadline = time.monotonic() + 60
        while _table_handle(kind_node) == before:  # the new agent replaced it
            assert time.monotonic() < deadline, "the restarted node agent did not apply"
            time.sleep(0.1)
    print(f"node agent stopped in {stopped:.2f} s; {forbidden.sent} datagrams sent across the restart")
    assert stopped < 5
    assert forbidden.sent > 1000
    assert forbidden.answered == 0
    sim.reset()


# --- the event -> rules benchmark: figures, never a pass/fail on time ---------------------------

LATENCY_FILE = REPO / "build" / "kind-sim" / "netpol-latency.json"
ROUNDS = int(os.environ.get("PYBRIDGE_NETPOL_ROUNDS", "3"))


def _ruleset(node: KindNode) -> str:
    return node.in_node("nft", "list", "table", "inet", TABLE, check=False).stdout


def follow(sim: Sim, change: Callable[[], None], timeout: float = 30) -> dict[str, float]:
    """Run `change` (one API event) and watch every node's table: node -> seconds from the API
    event (the store's change) to the first listing that differs from the one before."""
    nodes = [sim.cluster.nodes[n] for n in sorted(sim.cluster.nodes)]
    before = {n.name: _ruleset(n) for n in nodes}
    seen: dict[str, float] = {}
    started = threading.Event()

    def poll(node: KindNode) -> None:
        started.wait()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _ruleset(node) != before[node.name]:
                seen[node.name] = time.monotonic()
                return

    threads = [threading.Thread(target=poll, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    try:
        change()
        assert sim.cluster.store is not None
        event_at = sim.cluster.store.changed_at
    finally:
        started.set()
        for t in threads:
            t.join()
    return {name: at - event_at for name, at in seen.items()}


def _events(sim: Sim, node: str) -> list[tuple[str, Callable[[], None]]]:
    """Changes that alter every node's rules: the from-clients and from-blue policies select
    every pod of x, y, z (each namespace has a pod on every node)."""
    cluster, store = sim.cluster, sim.cluster.store
    assert store is not None
    extra = {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "192.0.2.0/24"}}]}]}
    changed = {**extra, "ingress": [{"from": [{"ipBlock": {"cidr": "198.51.100.0/24"}}]}]}
    client: list[Pod] = []
    ya = sim.pods["y/a"]
    return [
        ("pod relabelled", lambda: cluster.relabel_pod(ya, {"pod": "a", "role": "client"})),
        ("pod relabelled", lambda: cluster.relabel_pod(ya, {"pod": "a"})),
        ("namespace relabelled", lambda: cluster.add_namespace("z", {"team": "blue"})),
        ("namespace relabelled", lambda: cluster.add_namespace("z")),
        ("policy added", lambda: sim.apply("NetworkPolicy", "ADDED", ns_policy("x", "extra", extra))),
        ("policy changed", lambda: sim.apply("NetworkPolicy", "MODIFIED", ns_policy("x", "extra", changed))),
        ("policy removed", lambda: sim.apply("NetworkPolicy", "DELETED", ns_policy("x", "extra", changed))),
        (
            "pod created",
            lambda: client.append(cluster.run_pod(node, "client", labels={"role": "client"}, namespace="y")),
        ),
        ("pod deleted", lambda: cluster.delete_pod(client.pop())),
    ]


def test_event_to_rules_latency_across_nodes(sim: Sim) -> None:
    """Each kind of API event of the issue, ROUNDS times: the time until each node's table
    changed. Asserts only that every node's rules followed every event (within 30 s)."""
    sim.reset()
    everyone = {"podSelector": {}, "namespaceSelector": {}}
    for ns in "xyz":
        clients = {
            "podSelector": {},
            "ingress": [{"from": [{**everyone, "podSelector": {"matchLabels": {"role": "client"}}}]}],
        }
        blue = {
            "podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}],
        }
        sim.apply("NetworkPolicy", "ADDED", ns_policy(ns, "from-clients", clients))
        sim.apply("NetworkPolicy", "ADDED", ns_policy(ns, "from-blue", blue))
    nodes = sorted(sim.cluster.nodes)
    figures: dict[str, list[float]] = {}
    missed = []
    time.sleep(2)  # the setup's own rules settle first
    for round_ in range(ROUNDS):
        for kind, change in _events(sim, nodes[round_ % len(nodes)]):
            seen = follow(sim, change)
            missed += [f"{kind} on {n}" for n in nodes if n not in seen]
            figures.setdefault(kind, []).extend(seen.values())
    summary = {
        kind: {
            "n": len(v),
            "p50_ms": round(statistics.median(v) * 1000, 1),
            "max_ms": round(max(v) * 1000, 1),
        }
        for kind, v in figures.items()
    }
    LATENCY_FILE.parent.mkdir(parents=True, exist_ok=True)
    LATENCY_FILE.write_text(json.dumps(summary, indent=2))
    print(f"\nnetpol event -> rules on each node: {summary}")
    sim.reset()
    assert not missed, f"rules did not follow: {missed}"
