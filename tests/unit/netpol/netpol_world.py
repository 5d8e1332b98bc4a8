"""A small cluster for the NetworkPolicy tests: namespaces x, y, z with pods a, b, c each (the
upstream suite's shape). Pods of x and y run on node n1 (this node), those of z on n2."""

from __future__ import annotations

import ipaddress
from typing import Any

from cni_plugin.node.netpol.compile import Decision, Rule
from cni_plugin.node.netpol.objects import Address, Namespace, NetworkPolicy, Pod

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
ME = "n1"
SERVE_81_UDP = {"name": "serve-81-udp", "containerPort": 81, "protocol": "UDP"}


def v4(pod: str) -> str:
    ns, name = pod.split("/")
    return f"10.0.{NAMESPACES.index(ns)}.{PODS.index(name) + 2}"


def v6(pod: str) -> str:
    ns, name = pod.split("/")
    return f"fd00::{NAMESPACES.index(ns)}:{PODS.index(name) + 2}"


def pod(ns: str, name: str, node: str | None = None, **extra: Any) -> Pod:
    obj: dict[str, Any] = {
        "metadata": {"name": name, "namespace": ns, "labels": {"pod": name}},
        "spec": {"nodeName": node or ("n2" if ns == "z" else ME),
                 "containers": [{"ports": [{"name": "serve-80-tcp", "containerPort": 80}, SERVE_81_UDP]}]},
        "status": {"phase": "Running", "podIPs": [{"ip": v4(f"{ns}/{name}")}, {"ip": v6(f"{ns}/{name}")}]},
    }
    for key, value in extra.items():
        obj[key].update(value)
    return Pod.model_validate(obj)


def world_pods() -> list[Pod]:
    return [pod(ns, name) for ns in NAMESPACES for name in PODS]


def namespaces(**labels: dict[str, str]) -> list[Namespace]:
    return [Namespace.model_validate({"metadata": {"name": ns, "labels": labels.get(ns, {"ns": ns})}})
            for ns in NAMESPACES]


def policy(ns: str, spec: dict[str, Any], name: str = "p") -> NetworkPolicy:
    return NetworkPolicy.model_validate({"metadata": {"name": name, "namespace": ns}, "spec": spec})


def _rule_allows(rule: Rule, peer: Address, dst: Address, proto: str, port: int) -> bool:
    """How the ruleset treats one rule: a peer and a port must match (nft.py's accept rules)."""
    if rule.peers is not None and not any(peer in n for n in rule.peers):
        return False
    if rule.ranges is None:
        return True
    return (any(p == proto and a <= port <= b for p, a, b in rule.ranges)
            or (dst, proto, port) in rule.named)


def _direction_ok(d: Decision, direction: str, own: Address, peer: Address, dst: Address,
                  proto: str, port: int) -> bool:
    """Open when `own` is selected by no policy of the direction, else one rule of one policy allows."""
    table = d.ingress if direction == "ingress" else d.egress
    return own not in table or any(_rule_allows(r, peer, dst, proto, port) for i in table[own]
                                   for r in getattr(d.policies[i], direction) or ())


def verdict(d: Decision, src: str, dst: str, proto: str = "TCP", port: int = 80, family: int = 4) -> bool:
    """Would a new connection src -> dst (pods as "ns/name", or a bare address) pass this node's rules?"""
    def address(who: str) -> Address:
        return ipaddress.ip_address(who if "/" not in who else (v4 if family == 4 else v6)(who))

    s, t = address(src), address(dst)
    return (_direction_ok(d, "egress", s, t, t, proto, port)
            and _direction_ok(d, "ingress", t, s, t, proto, port))
