"""The node controller recomputes only what an event touches (compile.Memo, nft.Chains): after
each event of long seeded random sequences, the tables it applied are those a controller that
never saw an earlier state computes from the same objects. The worlds are small and crowded so
that every sharing happens: addresses reused and held twice, named ports, peers and ports shared
by several rules (one set, named by the first), namespaces relabelled under namespaceSelectors,
ClusterNetworkPolicies, relists."""

from __future__ import annotations

import ipaddress
import random
from typing import Any

import pytest

from cni_plugin.node.netpol import apply, cluster, nft, world
from cni_plugin.node.netpol.objects import Address
from cni_plugin.node.netpol.policy_controller import WATCHED, PolicyController

ME = "n1"
NAMESPACES = ("a", "b", "c", "d")
LABELS = ({}, {"app": "web"}, {"app": "db"}, {"app": "web", "tier": "x"}, {"tier": "x"})
FENCE = nft.Fence("pyb0", (ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00:1::/64")))
PORTS: dict[Address, set[str]] = {ipaddress.ip_address(f"10.1.0.{i}"): {f"veth{i % 3}"} for i in range(2, 6)}


def _selector(r: random.Random) -> dict[str, Any]:
    if r.random() < 0.2:
        return {"matchExpressions": [{"key": "app", "operator": r.choice(["In", "NotIn", "Exists"]),
                                      "values": ["web"]}]}
    return {"matchLabels": dict(r.choice(LABELS))}


def _pod(r: random.Random, name: str) -> dict[str, Any]:
    host = r.randrange(2, 10)  # few addresses: reused, sometimes by two pods at once
    ports = [{"name": "http", "containerPort": r.choice([80, 8080])},
             {"name": "dns", "containerPort": 53, "protocol": "UDP"}][:r.randrange(3)]
    return {"metadata": {"name": name, "namespace": r.choice(NAMESPACES), "uid": f"u{r.randrange(10**6)}",
                         "labels": dict(r.choice(LABELS))},
            "spec": {"nodeName": r.choice([ME, ME, "n2"]), "hostNetwork": r.random() < 0.05,
                     "containers": [{"ports": ports}]},
            "status": {"phase": r.choice(["Running"] * 9 + ["Succeeded"]),
                       "podIPs": [{"ip": f"10.1.0.{host}"}, {"ip": f"fd00:1::{host}"}][:r.randrange(1, 3)]}}


def _peer(r: random.Random) -> dict[str, Any]:
    kind = r.randrange(4)
    if kind == 0:
        return {"ipBlock": {"cidr": r.choice(["10.1.0.0/24", "10.0.0.0/8", "fd00:1::/64"]),
                            "except": [r.choice(["10.1.0.4/31", "fd00:1::4/127", "10.9.0.0/16"])]}}
    peer: dict[str, Any] = {}
    if kind in (1, 3):
        peer["podSelector"] = _selector(r)
    if kind in (2, 3):
        peer["namespaceSelector"] = r.choice([{}, {"matchLabels": {"team": r.choice("xy")}}])
    return peer


def _port(r: random.Random) -> dict[str, Any]:
    return r.choice([{"port": 80}, {"port": "http"}, {"protocol": "UDP", "port": "dns"},
                     {"port": 8000, "endPort": 8100}, {"protocol": "UDP"}])


def _rules(r: random.Random, side: str) -> list[dict[str, Any]]:
    rules = []
    for _ in range(r.randrange(3)):
        rule: dict[str, Any] = {}
        if r.random() < 0.8:
            rule[side] = [_peer(r) for _ in range(r.randrange(1, 3))]
        if r.random() < 0.7:
            rule["ports"] = [_port(r) for _ in range(r.randrange(1, 3))]
        rules.append(rule)
    return rules


def _policy(r: random.Random, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"podSelector": _selector(r), "ingress": _rules(r, "from")}
    if r.random() < 0.6:
        spec["egress"] = _rules(r, "to")
    if r.random() < 0.5:
        spec["policyTypes"] = r.choice([["Ingress"], ["Egress"], ["Ingress", "Egress"]])
    if r.random() < 0.05:
        spec["ingress"] = [{"ports": [{"port": 70000}]}]  # refused: closed, and named in a comment
    return {"metadata": {"name": name, "namespace": r.choice(NAMESPACES)}, "spec": spec}


def _namespace(r: random.Random, name: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"team": r.choice("xyz")}}}


def _cnp(r: random.Random, name: str) -> dict[str, Any]:
    peers = [{"namespaces": {"matchLabels": {"team": r.choice("xy")}}}, {"networks": ["10.1.0.0/29"]},
             {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": dict(r.choice(LABELS))}}}]
    rules = [{"action": r.choice(["Accept", "Deny", "Pass"]), "to": [r.choice(peers)],
              **({"protocols": [{"destinationNamedPort": "http"}]} if r.random() < 0.3 else {})}
             for _ in range(r.randrange(1, 3))]
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": cluster.KIND,
            "metadata": {"name": name},
            "spec": {"tier": r.choice(["Admin", "Baseline"]), "priority": r.randrange(5),
                     "subject": {"namespaces": {"matchLabels": {"team": r.choice("xy")}}}, "egress": rules}}


MAKE = {"Pod": _pod, "NetworkPolicy": _policy, "Namespace": _namespace, cluster.KIND: _cnp}
NAMES = {"Pod": [f"p{i}" for i in range(14)], "NetworkPolicy": [f"np{i}" for i in range(8)],
         "Namespace": list(NAMESPACES), cluster.KIND: ["c0", "c1"]}
WEIGHTS = {"Pod": 10, "NetworkPolicy": 5, "Namespace": 3, cluster.KIND: 1}


def _key(kind: str, obj: dict[str, Any]) -> tuple[str, str]:
    return obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def _controller(r: random.Random | None = None) -> PolicyController:
    """With `r`, one apply in ten fails (a change refused: the whole tables follow; a whole
    replacement refused: tried again)."""
    def apply_script(_script: str) -> None:
        if r is not None and r.random() < 0.1:
            raise apply.NftError("refused")

    return PolicyController(ME, apply_script, lambda *_a, **_k: None, ports=lambda: PORTS, fence=FENCE)


def _from_scratch(world: dict[str, dict[tuple[str, str], dict[str, Any]]]) -> str:
    fresh = _controller()
    for kind in WATCHED:
        fresh.handle(kind, "SYNC", list(world[kind].values()))
    return nft.script(fresh.tables())


def _event(r: random.Random, world: dict[str, dict[tuple[str, str], dict[str, Any]]]) -> tuple[str, str, Any]:
    kind = r.choices(list(WEIGHTS), list(WEIGHTS.values()))[0]
    store = world[kind]
    if r.random() < 0.04:  # a relist: some objects changed meanwhile
        for key in list(store):
            if r.random() < 0.3:
                store[key] = MAKE[kind](r, key[1])
                if key[0]:  # the same pod or policy, changed
                    store[key]["metadata"]["namespace"] = key[0]
        return kind, "SYNC", list(store.values())
    name = r.choice(NAMES[kind])
    if kind != "Namespace" and r.random() < 0.3:
        gone = [k for k in store if k[1] == name]
        if gone:
            return kind, "DELETED", store.pop(gone[0])
    obj = MAKE[kind](r, name)
    old = [k for k in store if k[1] == name]
    if kind == "Pod" and old and r.random() < 0.5:  # the same pod changed: relabelled, moved, readdressed
        obj["metadata"]["namespace"] = old[0][0]
    if old and old[0] != _key(kind, obj):  # the name taken in another namespace: that one goes first
        return kind, "DELETED", store.pop(old[0])
    event = "MODIFIED" if _key(kind, obj) in store else "ADDED"
    store[_key(kind, obj)] = obj
    return kind, event, obj


@pytest.mark.parametrize("seed", range(6))
def test_each_event_gives_the_tables_computed_from_scratch(seed: int) -> None:
    r = random.Random(seed)
    world: dict[str, dict[tuple[str, str], dict[str, Any]]] = {kind: {} for kind in WATCHED}
    for kind in WATCHED:
        for name in r.sample(NAMES[kind], len(NAMES[kind]) // 2 + (kind == "Namespace")):
            obj = MAKE[kind](r, name)
            world[kind][_key(kind, obj)] = obj
    agent = _controller(random.Random(seed))
    for kind in WATCHED:
        agent.handle(kind, "SYNC", list(world[kind].values()))
    for step in range(150):
        agent.handle(*_event(r, world))
        for _ in range(10):  # a failed apply is tried again (serve() does after a backoff)
            agent.reconcile()
            if not agent.failed:
                break
        assert agent.applied == _from_scratch(world), f"seed {seed}, event {step}"


def test_the_sequences_reach_what_they_should() -> None:
    """The random worlds do hold what the test is about (else it would prove little)."""
    r = random.Random(0)
    world: dict[str, dict[tuple[str, str], dict[str, Any]]] = {kind: {} for kind in WATCHED}
    seen = {"named": 0, "shared": 0, "tiers": 0, "held twice": 0}
    for _ in range(300):
        _event(r, world)
        text = _from_scratch(world)
        seen["named"] += "_named4" in text
        seen["tiers"] += "\tjump c" in text
        seen["shared"] += any(text.count(f"@{name} ") > 1 for name in
                              (line.split()[1] for line in text.splitlines() if line.startswith("\tset p")))
        local = [p for p in world["Pod"].values() if p["spec"]["nodeName"] == ME]
        ips = [i["ip"] for p in local for i in p["status"]["podIPs"]]
        seen["held twice"] += len(ips) != len(set(ips))
    assert all(count > 10 for count in seen.values()), seen


def test_collapse_gives_what_ipaddress_does() -> None:
    r = random.Random(1)
    for _ in range(2000):
        nets = [ipaddress.ip_network((r.choice([0, 0xFFFFFF00, 0x0A000000]) + r.randrange(300),
                                      r.choice([32, 32, 31, 30, 24, 0])), strict=False)
                for _ in range(r.randrange(12))]
        nets += [ipaddress.ip_network((r.choice([0, 2**128 - 512]) + r.randrange(300),
                                       r.choice([128, 127, 120, 64, 0])), strict=False)
                 for _ in range(r.randrange(12))]
        want = [*ipaddress.collapse_addresses(n for n in nets if n.version == 4),
                *ipaddress.collapse_addresses(n for n in nets if n.version == 6)]
        assert list(world.collapse(nets)) == want, nets


def test_an_egress_named_port_to_any_peer_reads_every_pod() -> None:
    """`to: []` is any peer, as no `to`: the named port is looked up on every pod, so a pod of
    another namespace coming or going changes the rules (its address and port allowed or not)."""
    world: dict[str, dict[tuple[str, str], dict[str, Any]]] = {kind: {} for kind in WATCHED}
    policy = {"metadata": {"name": "np", "namespace": "a"},
              "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                       "egress": [{"to": [], "ports": [{"port": "http"}]}]}}
    selected = _pod(random.Random(0), "p0")
    selected["metadata"].update(namespace="a")
    selected["spec"].update(nodeName=ME, hostNetwork=False)
    selected["status"].update(phase="Running", podIPs=[{"ip": "10.1.0.2"}])
    peer = {"metadata": {"name": "web", "namespace": "b", "uid": "u1"},
            "spec": {"nodeName": "n2", "containers": [{"ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.1.0.9"}]}}
    world["NetworkPolicy"][("a", "np")] = policy
    world["Pod"][("a", "p0")] = selected
    world["Namespace"] = {("", n): {"metadata": {"name": n}} for n in NAMESPACES}
    agent = _controller()
    for kind in WATCHED:
        agent.handle(kind, "SYNC", list(world[kind].values()))
    agent.reconcile()
    for event in ("ADDED", "DELETED"):
        if event == "ADDED":
            world["Pod"][("b", "web")] = peer
        else:
            del world["Pod"][("b", "web")]
        agent.handle("Pod", event, peer)
        agent.reconcile()
        assert agent.applied == _from_scratch(world), event
        assert ("10.1.0.9 . tcp . 8080" in (agent.applied or "")) == (event == "ADDED")
