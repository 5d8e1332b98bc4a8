"""NetworkPolicy figures of the node controller (root; docs/networkpolicy.md): not a timed test.

The world: 500 pods on this node (the worst case: every one gets rules) in 50 namespaces, and
200 policies of the shapes users write (pod and namespace selectors, both in one peer, ipBlock
with except, numbered, ranged and named ports, ingress and egress). The measuring runs in a
throw-away netns (this script re-execs itself under `ip netns exec`), with the agent made and
applying as the node controller does (policy_controller.launch): the new-pod fence on with its
conntrack deletions (BENCH_NETPOL_FENCE=0: off, as without a cluster CIDR), the heap settled after
a relist, an element-only change as one netlink batch (nfnl.py), anything else through
libnftables in process (apply.py; exec'd `nft -f` where the library is missing);
BENCH_NETPOL_BATCH=0 sends every change to nft.
- convergence: the agent's imports (a fresh interpreter), then from the lists handed to the
  agent to the table applied;
- event -> rules: EVENTS events (pod add and delete, pod label change, namespace label change,
  policy add, change and delete, in turn) through the agent's queue and thread to the applied
  table: p50, p99 and max, per kind and over all; and per kind the apply stage alone (the time in
  the batch and in nft, of the event's reconcile) and how many events each path took;
- size: the ruleset (lines of `nft list table`, set elements, chains, rules) at 50, 200 and 500
  pods, with the 200 policies;
- RSS: this process holding an API view of 5,000 pods (4,500 on other nodes) and its ruleset;
- the bridge ports: PORTS real pod netns (the world's first pods, their addresses), each with a
  veth on a bridge of the throw-away netns, which the agent keys its bridge table on and keeps
  from netlink notifications as the node controller does (bridgeports.Watch), in every figure
  above; and, timed apart, one read of them whole (what every event cost before the watch: one
  links dump, one address dump per port in the pod's netns), and the watch's refresh with
  nothing changed and after one pod's address changed (BENCH_NETPOL_PORTS=0: no ports;
  BENCH_NETPOL_WATCH=0: the agent reads the ports whole at each event, as where it cannot subscribe).
The targets are printed next to the figures; nothing fails on them. Prints JSON.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import queue
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import kubernetes  # noqa: F401  # the agent's import, counted in its RSS

from cni_plugin.node.netpol import apply, bridgeports, conntrack, delta, nfnl, nft
from cni_plugin.node.netpol.objects import parse_cidr
from cni_plugin.node.netpol.policy_controller import OnBridge, PolicyController, Ports, serve, settle_heap

NODE = "bench-node"
NAMESPACES = [f"ns{i}" for i in range(50)]
PODS, POLICIES, API_PODS, EVENTS = 500, 200, 5000, int(os.environ.get("BENCH_NETPOL_EVENTS", "301"))
PORTS = int(os.environ.get("BENCH_NETPOL_PORTS", str(PODS)))
WATCH = os.environ.get("BENCH_NETPOL_WATCH", "1") != "0"  # 0: the ports read whole at each event
FENCE = os.environ.get("BENCH_NETPOL_FENCE", "1") != "0"  # 0: new pods not fenced (no cluster CIDR)
BRIDGE = "br0"
BATCH = os.environ.get("BENCH_NETPOL_BATCH", "1") != "0"
TARGETS = {"p50_ms": 20, "p99_ms": 100, "max_ms": 250, "convergence_s": 2, "rss_mib_5000_pods": 150}


def pod(i: int, node: str = NODE, app: str | None = None) -> dict[str, Any]:
    return {"metadata": {"name": f"p{i}", "namespace": NAMESPACES[i % len(NAMESPACES)],
                         "labels": {"app": app or f"app{i % 20}", "tier": ("web", "api", "db")[i % 3]}},
            "spec": {"nodeName": node, "containers": [{"ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running",
                       "podIPs": [{"ip": f"10.{244 + i // 62500}.{i // 250 % 250}.{i % 250 + 2}"},
                                  {"ip": f"fd00:244::{i + 2:x}"}]}}


def policy(i: int, port: int = 8080) -> dict[str, Any]:
    shapes: list[dict[str, Any]] = [
        {"podSelector": {"matchLabels": {"app": f"app{i % 20}"}},
         "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "web"}}}],
                      "ports": [{"port": port}]}]},
        {"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["db"]}]},
         "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": f"t{i % 5}"}},
                                "podSelector": {"matchLabels": {"tier": "api"}}}],
                      "ports": [{"port": "http"}]}]},
        {"podSelector": {"matchLabels": {"tier": "api"}}, "policyTypes": ["Egress"],
         "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [f"10.{i % 250}.0.0/16"]}}],
                     "ports": [{"port": 5000, "endPort": 5100}, {"protocol": "UDP", "port": 53}]}]},
        {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]},
    ]
    return {"metadata": {"name": f"np{i}", "namespace": NAMESPACES[i % len(NAMESPACES)]},
            "spec": shapes[i % 4]}


def namespace(i: int, team: int) -> dict[str, Any]:
    return {"metadata": {"name": NAMESPACES[i], "labels": {"team": f"t{team}"}}}


def _lists(pods: int, remote: int = 0) -> dict[str, list[dict[str, Any]]]:
    return {"NetworkPolicy": [policy(i) for i in range(POLICIES)],
            "Pod": [pod(i) for i in range(pods)] + [pod(pods + i, "other-node") for i in range(remote)],
            "Namespace": [namespace(i, i % 5) for i in range(len(NAMESPACES))], "ClusterNetworkPolicy": []}


class Stage:
    """The apply stage of the events: the time spent in the element batch and in nft since reset(),
    and the path that applied ("batch", "nft", or "batch+nft" when nft took a refused batch's change)."""

    def __init__(self) -> None:
        self.spent = 0.0
        self.paths: list[str] = []

    def reset(self) -> None:
        self.spent, self.paths = 0.0, []

    def script(self, script: str) -> None:
        started = time.perf_counter()
        try:
            apply.replace(script)
        finally:
            self.spent += time.perf_counter() - started
            self.paths.append("nft")

    def elements(self, change: str, model: delta.Model) -> bool:
        started = time.perf_counter()
        try:
            done = nfnl.apply(change, model)
        finally:
            self.spent += time.perf_counter() - started
        if done:
            self.paths.append("batch")
        return done


def _agent(lists: dict[str, list[dict[str, Any]]], stage: Stage | None = None,
           ports: tuple[Ports, OnBridge] | None = None) -> PolicyController:
    """The node controller's NetworkPolicy agent as policy_controller.launch makes it: with the
    new-pod fence (BENCH_NETPOL_FENCE=0: without), its conntrack deletions, the heap settled."""
    stage = stage or Stage()
    agent = PolicyController(NODE, stage.script, lambda *_a, **_k: None, ports=ports and ports[0],
                             apply_elements=stage.elements if BATCH else None)
    if FENCE:
        agent.fence = nft.Fence(BRIDGE, (parse_cidr("10.244.0.0/14"), parse_cidr("fd00:244::/64")))
        agent.forget = conntrack.forget
        agent.on_bridge = ports and ports[1]
    agent.settle = settle_heap
    for kind, items in lists.items():
        agent.handle(kind, "SYNC", items)
    return agent


def _events() -> list[tuple[str, str, str, dict[str, Any]]]:
    """(label, kind, event, object), each changing the rules; in turn, and undone a round later."""
    out = []
    for k in range(EVENTS // 7 + 1):
        # pod 4j: selected by policy j % 100 (its app label); its relabelling always changes the rules
        extra, moved, back = pod(PODS + k), k // 2 * 4 % PODS, k % 2 == 1
        team = k // 2 % len(NAMESPACES)
        out += [("pod add", "Pod", "ADDED", extra), ("pod delete", "Pod", "DELETED", extra),
                ("pod label", "Pod", "MODIFIED", pod(moved, app=None if back else "moved")),
                ("namespace label", "Namespace", "MODIFIED",
                 namespace(team, team % 5 if back else team % 5 + 1)),
                ("policy add", "NetworkPolicy", "ADDED", policy(POLICIES + k)),
                ("policy change", "NetworkPolicy", "MODIFIED", policy(k % 4 * 4, 8081 + k)),
                ("policy delete", "NetworkPolicy", "DELETED", policy(POLICIES + k))]
    return out[:EVENTS]


def _quantiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"n": len(ordered), "p50_ms": round(statistics.median(ordered) * 1000, 1),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 1),
            "max_ms": round(ordered[-1] * 1000, 1)}


def _size(script: str, listed: str) -> dict[str, int]:
    rules, elements = nft.census(delta.parse(script))
    return {"lines": len(listed.splitlines()), "chains": listed.count("\tchain "), "rules": rules,
            "set_elements": elements}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(round(int(line.split()[1]) / 1024, 1) for line in f if line.startswith("VmRSS:"))


def main() -> None:
    imports = subprocess.run([sys.executable, "-c", "import time; t = time.perf_counter(); "
                              "import cni_plugin.node.controller, cni_plugin.node.netpol.policy_controller, "
                              "kubernetes.client; "
                              "print(time.perf_counter() - t)"],
                             capture_output=True, text=True, check=True)
    netns = f"pbt-h17bench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    pods = [f"{netns}-p{i}" for i in range(PORTS)]
    try:
        if pods:
            _bridge_ports(netns, pods)
        inside = subprocess.run(["ip", "netns", "exec", netns, sys.executable, __file__, "measure"],
                                stdout=subprocess.PIPE, text=True, check=True).stdout
        if pods:
            read = subprocess.run(["ip", "netns", "exec", netns, sys.executable, __file__, "ports", pods[0]],
                                  stdout=subprocess.PIPE, text=True, check=True).stdout
    finally:
        for name in [*pods, netns]:
            subprocess.run(["ip", "netns", "del", name], check=False, stderr=subprocess.DEVNULL)
    measured = json.loads(inside)
    if pods:
        measured["bridge_ports_read"] = json.loads(read)
    measured["convergence"] = {"imports_s": round(float(imports.stdout), 2), **measured["convergence"]}
    print(json.dumps({
        "machine": f"{os.cpu_count()} CPU, kernel {platform.release()}, "
                   f"Python {platform.python_version()}",
        "pods": PODS, "namespaces": len(NAMESPACES), "policies": POLICIES, "targets": TARGETS,
        "element_batch": BATCH, "ports_watched": WATCH, "fence": FENCE, **measured}, indent=2))


def _bridge_ports(netns: str, pods: list[str]) -> None:
    """In `netns`: bridge BRIDGE and a veth per pod netns, its pod end with an IPv4 and an IPv6 address."""
    def batch(where: list[str], lines: list[str]) -> None:
        subprocess.run(["ip", *where, "-batch", "-"], input="".join(f"{line}\n" for line in lines),
                       text=True, check=True)

    batch([], [f"netns add {pod}" for pod in pods])
    batch(["-n", netns], [f"link add {BRIDGE} type bridge", f"link set {BRIDGE} up", *(
        line for i, pod in enumerate(pods)
        for line in (f"link add v{i} type veth peer name eth0 netns {pod}",
                     f"link set v{i} master {BRIDGE} up"))])
    for i, pod in enumerate(pods):
        batch(["-n", pod], [f"addr add 10.{244 + i // 62500}.{i // 250 % 250}.{i % 250 + 2}/16 dev eth0",
                            f"addr add fd00:244::{i + 2:x}/64 dev eth0 nodad", "link set eth0 up"])


def ports(pod_netns: str) -> None:
    """In main's throw-away netns, p50 of 10: one read of the bridge ports whole, the links dump
    alone, and the watch's refresh with nothing changed and after an address of `pod_netns`'s
    pod changed (added, then removed: `ip` outside the time)."""
    from cni_plugin import rtnl

    def links() -> list[Any]:
        with rtnl.Socket() as sock:
            return sock.bridge_ports()

    def p50(read: Any, before: Any = lambda _i: None) -> tuple[int, float]:
        times, found = [], 0
        for i in range(10):
            before(i)
            started = time.perf_counter()
            found = len(read())
            times.append(time.perf_counter() - started)
        return found, round(statistics.median(times) * 1000, 2)

    def change(i: int) -> None:
        subprocess.run(["ip", "-n", pod_netns, "addr", "add" if i % 2 == 0 else "del", "10.99.0.1/32",
                        "dev", "eth0"], check=True)

    addresses, all_ms = p50(bridgeports.pod_ports)
    ports_found, links_ms = p50(links)
    with bridgeports.Watch() as watch:
        watch.pods()
        _found, idle_ms = p50(watch.pods)
        _found, changed_ms = p50(watch.pods, change)
        whole = watch.full_reads
    print(json.dumps({"ports": ports_found, "addresses": addresses, "read_whole_p50_ms": all_ms,
                      "links_dump_p50_ms": links_ms, "watch_idle_p50_ms": idle_ms,
                      "watch_one_changed_p50_ms": changed_ms, "watch_whole_reads": whole}))


def _settle(in_force: list[float]) -> None:
    """The node controller's settle_heap, after the rules went in: convergence ends there."""
    in_force.append(time.perf_counter())
    settle_heap()


@contextlib.contextmanager
def _watch() -> Iterator[tuple[Ports, OnBridge] | None]:
    """The bridge ports of this netns, all and by bridge, as the node controller keeps them (or,
    BENCH_NETPOL_WATCH=0, reads them where it cannot subscribe); None without ports."""
    if not PORTS:
        yield None
        return
    if not WATCH:
        yield bridgeports.pod_ports, lambda bridge: bridgeports.pod_ports(bridge=bridge)
        return
    with bridgeports.Watch() as watch:
        yield watch.pods, watch.on_bridge


def measure() -> None:
    """The figures but the imports', in this process's netns (main's throw-away one)."""
    with contextlib.ExitStack() as held:
        _measure(held)


def _measure(held: contextlib.ExitStack) -> None:
    listing = ["nft", "list", "table", "inet", nft.TABLE]
    sizes = {}
    for count in (50, 200, PODS):
        with _watch() as watch:
            agent = _agent(_lists(count), ports=watch)
            assert agent.reconcile()
        listed = subprocess.run(listing, capture_output=True, text=True, check=True).stdout
        sizes[str(count)] = _size(agent.applied or "", listed)
    syncs = []
    stage = Stage()
    for _ in range(3):
        apply.remove()
        lists = _lists(PODS)
        started = time.perf_counter()
        watch = held.enter_context(_watch())  # its first read counts: a node agent's start
        agent = _agent(lists, stage, watch)
        in_force: list[float] = []
        agent.settle = functools.partial(_settle, in_force)
        assert agent.reconcile()
        syncs.append(in_force[0] - started)

    events: queue.Queue[tuple[str, str, Any]] = queue.Queue()
    done: queue.Queue[float] = queue.Queue()
    stop = threading.Event()
    worker = threading.Thread(target=serve, args=(agent, events, stop, lambda: done.put(time.monotonic())))
    worker.start()
    latencies: dict[str, list[float]] = {}
    stages: dict[str, list[float]] = {}
    paths: dict[str, Counter[str]] = {}
    try:
        for label, kind, event, obj in _events():
            stage.reset()
            sent = time.monotonic()
            events.put((kind, event, obj))
            latencies.setdefault(label, []).append(done.get(timeout=60) - sent)
            stages.setdefault(label, []).append(stage.spent)
            paths.setdefault(label, Counter())["+".join(stage.paths)] += 1
    finally:
        stop.set()
        worker.join()
    apply.remove()
    rss = subprocess.run([sys.executable, __file__, "rss"], capture_output=True, text=True, check=True).stdout
    print(json.dumps({
        "convergence": {"lists_to_rules_s": round(statistics.median(syncs), 2)},
        "event_to_rules": {"all": _quantiles([s for v in latencies.values() for s in v]),
                           **{label: _quantiles(v) for label, v in latencies.items()}},
        "apply_stage": {"all": _quantiles([s for v in stages.values() for s in v]),
                        **{label: {**_quantiles(v), "paths": dict(paths[label])}
                           for label, v in stages.items()}},
        "ruleset_size": sizes,
        "rss_mib_5000_pods": float(rss),
    }))


def rss() -> None:
    """In a process of its own: the agent holding the 5,000 pods' view, its rules applied."""
    with _watch() as watch:
        agent = _agent(_lists(PODS, API_PODS - PODS), ports=watch)
        assert agent.reconcile()
        print(_rss_mib())
    apply.remove()


if __name__ == "__main__":
    if sys.argv[1:2] == ["rss"]:
        rss()
    elif sys.argv[1:2] == ["measure"]:
        measure()
    elif sys.argv[1:2] == ["ports"]:
        ports(sys.argv[2])
    else:
        main()
