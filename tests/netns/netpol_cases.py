"""The upstream NetworkPolicy cases (Kubernetes test/e2e/network/netpol/network_policy.go) as
steps of events for the agent and the reachability matrices expected after each, written by hand
from each case's intent the way upstream writes them: all reachable, then ExpectPeer-style
patterns ("x/*", "*", "x/a"). Self-traffic is left out, as upstream ignores it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from testbed.harness import Host

NODE = "h17-node"
PODS = [f"{ns}/{p}" for ns in "xyz" for p in "abc"]
PORT_NAMES = [{"name": f"serve-{port}-{proto.lower()}", "containerPort": port, "protocol": proto}
              for port in (80, 81) for proto in ("TCP", "UDP")]
Matrix = dict[tuple[str, str], bool]


@dataclass
class Pods:
    """The pods as the cases see them, on one node (tests/netns) or spread over the simulated
    nodes (tests/simcluster)."""

    netns: dict[str, str]  # "x/a" -> pod netns (a name under /run/netns, or a path)
    ips: dict[str, dict[int, str]]  # "x/a" -> {4: address, 6: address}
    labels: dict[str, dict[str, str]] = field(default_factory=dict)  # "x/a" -> labels, while relabelled
    subnet: str = "10.89.0.0/24"  # holds every pod's IPv4 address
    nodes: dict[str, str] = field(default_factory=dict)  # "x/a" -> its node, NODE if not here

    def pod_object(self, pod: str) -> dict[str, Any]:
        ns, name = pod.split("/")
        return {"metadata": {"name": name, "namespace": ns, "labels": self.labels.get(pod, {"pod": name})},
                "spec": {"nodeName": self.nodes.get(pod, NODE), "containers": [{"name": "main",
                                                                                "ports": PORT_NAMES}]},
                "status": {"phase": "Running", "podIPs": [{"ip": ip} for ip in self.ips[pod].values()]}}


@dataclass
class World(Pods):
    """The node netns (tests/netns) and its pods."""

    host: Host | None = None

    def nft(self) -> list[str]:
        assert self.host is not None
        return ["ip", "netns", "exec", self.host.name, "nft"]


# The upstream Reachability helpers: everything reachable, then patterns ("x/*", "*", "x/a").
def _match(pattern: str, pod: str) -> bool:
    return pattern == "*" or pattern == pod or (pattern.endswith("/*") and pod.startswith(pattern[:-1]))


def reachable(*rules: tuple[str, str, bool]) -> Matrix:
    """ExpectPeer(src, dst, allowed) applied in order on an all-reachable matrix."""
    matrix = {(s, t): True for s in PODS for t in PODS if s != t}
    for src, dst, allowed in rules:
        for s, t in matrix:
            if _match(src, s) and _match(dst, t):
                matrix[(s, t)] = allowed
    return matrix


def ns_policy(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec}


NAME_LABEL = "kubernetes.io/metadata.name"
# Upstream's SetSpecEgressRules also sets policyTypes [Egress]: without it, the API implies
# Ingress as well, and the policy would isolate its pods for ingress too.
EGRESS = {"policyTypes": ["Egress"]}
POD_A = {"matchLabels": {"pod": "a"}}
POD_B = {"matchLabels": {"pod": "b"}}
NS_Y = {"matchLabels": {NAME_LABEL: "y"}}
Y_A = {"namespaceSelector": NS_Y, "podSelector": POD_A}
NOT_X = {"matchExpressions": [{"key": NAME_LABEL, "operator": "NotIn", "values": ["x"]}]}


@dataclass
class Step:
    events: list[tuple[str, str, dict[str, Any]]]  # (kind, event, object) fed to the agent
    checks: list[tuple[str, int, Matrix]]  # (protocol, port, expected matrix)
    families: tuple[int, ...] = (4,)


def add(ns: str, name: str, spec: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    return ("NetworkPolicy", "ADDED", ns_policy(ns, name, spec))


DENY_INTO_X = reachable(("*", "x/*", False))
ONLY_Y_TO_XA = reachable(("x/*", "x/a", False), ("z/*", "x/a", False))
CLOSED_XA = reachable(("*", "x/a", False))
CASES: dict[str, Callable[[Pods], list[Step]]] = {}


def case(title: str) -> Callable[[Callable[[Pods], list[Step]]], Callable[[Pods], list[Step]]]:
    def register(fn: Callable[[Pods], list[Step]]) -> Callable[[Pods], list[Step]]:
        CASES[title] = fn
        return fn
    return register


@case("should support a 'default-deny-ingress' policy")
def _(w: Pods) -> list[Step]:
    return [Step([add("x", "deny-ingress", {"podSelector": {}})],
                 [("TCP", 80, DENY_INTO_X), ("UDP", 80, DENY_INTO_X)], families=(4, 6))]


@case("should support a 'default-deny-all' policy")
def _(w: Pods) -> list[Step]:
    spec = {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    return [Step([add("x", "deny-all", spec)],
                 [("TCP", 80, reachable(("*", "x/*", False), ("x/*", "*", False)))], families=(4, 6))]


@case("should enforce policy to allow traffic from pods within server namespace based on PodSelector")
def _(w: Pods) -> list[Step]:
    spec = {"podSelector": POD_A, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}
    return [Step([add("x", "x-a-allows-x-b", spec)],
                 [("TCP", 80, reachable(("*", "x/a", False), ("x/b", "x/a", True)))])]


@case("should enforce policy to allow ingress traffic for a target")
def _(w: Pods) -> list[Step]:
    allow = {"podSelector": POD_A, "ingress": [{"from": [{"podSelector": {}, "namespaceSelector": {}}]}]}
    return [Step([add("x", "deny-all", {"podSelector": {}}), add("x", "allow-all-to-a", allow)],
                 [("TCP", 80, reachable(("*", "x/b", False), ("*", "x/c", False)))])]


@case("should enforce policy to allow ingress traffic from pods in all namespaces")
def _(w: Pods) -> list[Step]:
    spec = {"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {}}}]}]}
    return [Step([add("x", "allow-from-another-ns", spec)], [("TCP", 80, reachable())])]


@case("should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector")
def _(w: Pods) -> list[Step]:
    spec = {"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": NS_Y}]}]}
    return [Step([add("x", "allow-client-a-via-ns-selector", spec)], [("TCP", 80, ONLY_Y_TO_XA)],
                 families=(4, 6))]


@case("should enforce policy based on PodSelector with MatchExpressions")
def _(w: Pods) -> list[Step]:
    sel = {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b"]}]}
    spec = {"podSelector": POD_A, "ingress": [{"from": [{"podSelector": sel}]}]}
    return [Step([add("x", "x-a-allows-x-b", spec)],
                 [("TCP", 80, reachable(("*", "x/a", False), ("x/b", "x/a", True)))])]


@case("should enforce policy based on NamespaceSelector with MatchExpressions")
def _(w: Pods) -> list[Step]:
    sel = {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["y"]}]}
    spec = {"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": sel}]}]}
    return [Step([add("x", "allow-ns-y-match-selector", spec)], [("TCP", 80, ONLY_Y_TO_XA)])]


@case("should enforce policy based on PodSelector or NamespaceSelector")
def _(w: Pods) -> list[Step]:
    peers = [{"namespaceSelector": NOT_X}, {"podSelector": {"matchLabels": {"pod": "b"}}}]
    spec = {"podSelector": POD_A, "ingress": [{"from": peers}]}
    return [Step([add("x", "allow-ns-y-match-selector", spec)],
                 [("TCP", 80, reachable(("x/c", "x/a", False)))])]


@case("should enforce policy based on PodSelector and NamespaceSelector")
def _(w: Pods) -> list[Step]:
    peer = {"namespaceSelector": NOT_X, "podSelector": {"matchLabels": {"pod": "b"}}}
    spec = {"podSelector": POD_A, "ingress": [{"from": [peer]}]}
    return [Step([add("x", "allow-ns-y-podselector-and-nsselector", spec)],
                 [("TCP", 80, reachable(("*", "x/a", False), ("y/b", "x/a", True), ("z/b", "x/a", True)))])]


@case("should enforce policy based on Multiple PodSelectors and NamespaceSelectors")
def _(w: Pods) -> list[Step]:
    pods = {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b", "c"]}]}
    spec = {"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": NOT_X, "podSelector": pods}]}]}
    return [Step([add("x", "allow-ns-y-z-pod-b-c", spec)],
                 [("TCP", 80, reachable(("x/*", "x/a", False), ("y/a", "x/a", False),
                                        ("z/a", "x/a", False)))])]


@case("should enforce policy based on any PodSelectors")
def _(w: Pods) -> list[Step]:
    peers = [{"podSelector": {"matchLabels": {"pod": p}}} for p in "bc"]
    spec = {"podSelector": POD_A, "ingress": [{"from": peers}]}
    return [Step([add("x", "allow-ns-x-pod-b-c", spec)],
                 [("TCP", 80, reachable(("*", "x/a", False), ("x/b", "x/a", True), ("x/c", "x/a", True)))])]


@case("should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector")  # noqa: E501  (upstream's title)
def _(w: Pods) -> list[Step]:
    spec = {"podSelector": POD_A, "ingress": [{"from": [Y_A]}]}
    return [Step([add("x", "allow-ns-y-pod-a-via-namespace-pod-selector", spec)],
                 [("TCP", 80, reachable(("*", "x/a", False), ("y/a", "x/a", True)))], families=(4, 6))]


@case("should enforce policy based on Ports")
def _(w: Pods) -> list[Step]:
    spec = {"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": NS_Y}],
                                               "ports": [{"port": 81, "protocol": "TCP"}]}]}
    return [Step([add("x", "allow-client-a-via-ns-selector", spec)],
                 [("TCP", 81, ONLY_Y_TO_XA), ("TCP", 80, reachable(("*", "x/a", False)))])]


@case("should enforce multiple, stacked policies with overlapping podSelectors")
def _(w: Pods) -> list[Step]:
    def allow(port: int) -> dict[str, Any]:
        return {"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": NS_Y}],
                                                   "ports": [{"port": port, "protocol": "TCP"}]}]}
    return [Step([add("x", "allow-81", allow(81))],
                 [("TCP", 81, ONLY_Y_TO_XA), ("TCP", 80, reachable(("*", "x/a", False)))]),
            Step([add("x", "allow-80", allow(80))], [("TCP", 80, ONLY_Y_TO_XA)])]


@case("should support allow-all policy")
def _(w: Pods) -> list[Step]:
    return [Step([add("x", "allow-all", {"podSelector": {}, "ingress": [{}]})],
                 [("TCP", 80, reachable()), ("TCP", 81, reachable())])]


@case("should allow ingress access on one named port")
def _(w: Pods) -> list[Step]:
    spec = {"podSelector": {}, "ingress": [{"ports": [{"port": "serve-81-tcp"}]}]}
    return [Step([add("x", "allow-all", spec)], [("TCP", 81, reachable()), ("TCP", 80, DENY_INTO_X)])]


@case("should allow ingress access from namespace on one named port")
def _(w: Pods) -> list[Step]:
    spec = {"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": NS_Y}],
                                               "ports": [{"port": "serve-80-tcp", "protocol": "TCP"}]}]}
    return [Step([add("x", "allow-client-a-via-ns-selector-80", spec)],
                 [("TCP", 80, ONLY_Y_TO_XA), ("TCP", 81, reachable(("*", "x/a", False)))])]


@case("should allow egress access on one named port")
def _(w: Pods) -> list[Step]:
    spec = {**EGRESS, "podSelector": {}, "egress": [{"ports": [{"port": "serve-80-tcp"}]}]}
    return [Step([add("x", "allow-egress", spec)],
                 [("TCP", 80, reachable()), ("TCP", 81, reachable(("x/*", "*", False)))], families=(4, 6))]


@case("should enforce updated policy")
def _(w: Pods) -> list[Step]:
    allow_all = ns_policy("x", "allow-all-mutate-to-deny-all", {"podSelector": {}, "ingress": [{}]})
    deny = ns_policy("x", "allow-all-mutate-to-deny-all", {"podSelector": {}, "ingress": []})
    return [Step([("NetworkPolicy", "ADDED", allow_all)], [("TCP", 81, reachable())]),
            Step([("NetworkPolicy", "MODIFIED", deny)], [("TCP", 81, DENY_INTO_X)])]


@case("should allow ingress access from updated namespace")
def _(w: Pods) -> list[Step]:
    updated = {"namespaceSelector": {"matchLabels": {"ns2": "updated"}}}
    spec = {"podSelector": POD_A, "ingress": [{"from": [updated]}]}
    relabelled = {"metadata": {"name": "y", "labels": {"ns2": "updated"}}}
    return [Step([add("x", "allow-client-a-via-ns-selector", spec)], [("TCP", 80, CLOSED_XA)]),
            Step([("Namespace", "MODIFIED", relabelled)],
                 [("TCP", 80, reachable(("*", "x/a", False), ("y/*", "*", True)))])]


@case("should allow ingress access from updated pod")
def _(w: Pods) -> list[Step]:
    labels = {"pod": "b", "pod2": "updated"}
    spec = {"podSelector": POD_A, "ingress": [{"from": [{"podSelector": {"matchLabels": labels}}]}]}
    w.labels["x/b"] = labels
    relabelled = w.pod_object("x/b")
    del w.labels["x/b"]
    return [Step([add("x", "allow-client-a-via-pod-selector", spec)], [("TCP", 80, CLOSED_XA)]),
            Step([("Pod", "MODIFIED", relabelled)],
                 [("TCP", 80, reachable(("*", "x/a", False), ("x/b", "x/a", True)))])]


@case("should deny ingress from pods on other namespaces")
def _(w: Pods) -> list[Step]:
    spec = {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {}}}]}]}
    return [Step([add("x", "deny-empty-policy", spec)],
                 [("TCP", 80, reachable(("y/*", "x/*", False), ("z/*", "x/*", False)))])]


@case("should deny ingress access to updated pod")
def _(w: Pods) -> list[Step]:
    w.labels["x/a"] = {"pod": "a", "target": "isolated"}
    isolated = w.pod_object("x/a")
    del w.labels["x/a"]
    spec = {"podSelector": {"matchLabels": {"target": "isolated"}}, "ingress": []}
    return [Step([add("x", "deny-ingress-via-label-selector", spec)], [("TCP", 80, reachable())]),
            Step([("Pod", "MODIFIED", isolated)], [("TCP", 80, reachable(("*", "x/a", False)))])]


@case("should deny egress from pods based on PodSelector")
def _(w: Pods) -> list[Step]:
    spec = {"podSelector": POD_A, "policyTypes": ["Egress"]}
    return [Step([add("x", "deny-egress-pod-a", spec)], [("TCP", 80, reachable(("x/a", "*", False)))])]


@case("should deny egress from all pods in a namespace")
def _(w: Pods) -> list[Step]:
    return [Step([add("x", "deny-egress-ns-x", {"podSelector": {}, "policyTypes": ["Egress"]})],
                 [("TCP", 80, reachable(("x/*", "*", False))), ("UDP", 80, reachable(("x/*", "*", False)))])]


@case("should work with Ingress, Egress specified together")
def _(w: Pods) -> list[Step]:
    spec = {"podSelector": POD_A, "policyTypes": ["Egress", "Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
            "egress": [{"ports": [{"port": 80}]}]}
    return [Step([add("x", "allow-client-a-via-pod-selector", spec)],
                 [("TCP", 80, reachable(("*", "x/a", False), ("x/b", "x/a", True))),
                  ("TCP", 81, reachable(("*", "x/a", False), ("x/a", "*", False), ("x/b", "x/a", True)))])]


@case("should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)")  # noqa: E501  (upstream's title)
def _(w: Pods) -> list[Step]:
    to_ya = {**EGRESS, "podSelector": POD_A, "egress": [{"to": [Y_A]}]}
    from_xa = [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "x"}},
                          "podSelector": POD_A}]}]
    return [Step([add("x", "allow-to-ns-y-pod-a", to_ya),
                  add("y", "allow-from-xa-on-ya", {"podSelector": POD_A, "ingress": from_xa}),
                  add("y", "allow-from-xa-on-yb", {"podSelector": POD_B, "ingress": from_xa})],
                 [("TCP", 80, reachable(("x/a", "*", False), ("*", "y/a", False), ("x/a", "y/a", True),
                                        ("*", "y/b", False)))])]


@case("should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector")  # noqa: E501  (upstream's title)
def _(w: Pods) -> list[Step]:
    spec = {**EGRESS, "podSelector": POD_A, "egress": [{"to": [Y_A]}]}
    return [Step([add("x", "allow-to-ns-y-pod-a", spec)],
                 [("TCP", 80, reachable(("x/a", "*", False), ("x/a", "y/a", True)))])]


@case("should enforce ingress policy allowing any port traffic to a server on a specific protocol")
def _(w: Pods) -> list[Step]:
    spec = {"podSelector": POD_A, "ingress": [{"ports": [{"protocol": "TCP"}]}]}
    return [Step([add("x", "allow-ingress-by-proto", spec)],
                 [("TCP", 80, reachable()), ("UDP", 80, reachable(("*", "x/a", False)))])]


@case("should enforce multiple ingress policies with ingress allow-all policy taking precedence")
def _(w: Pods) -> list[Step]:
    port_80 = {"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}
    return [Step([add("x", "allow-ingress-port-80", port_80)],
                 [("TCP", 81, DENY_INTO_X)]),
            Step([add("x", "allow-ingress", {"podSelector": {}, "ingress": [{}]})],
                 [("TCP", 81, reachable())])]


@case("should enforce multiple egress policies with egress allow-all policy taking precedence")
def _(w: Pods) -> list[Step]:
    port_80 = {**EGRESS, "podSelector": {}, "egress": [{"ports": [{"port": 80}]}]}
    return [Step([add("x", "allow-egress-port-80", port_80)],
                 [("TCP", 81, reachable(("x/*", "*", False)))]),
            Step([add("x", "allow-egress", {**EGRESS, "podSelector": {}, "egress": [{}]})],
                 [("TCP", 81, reachable())])]


@case("should stop enforcing policies after they are deleted")
def _(w: Pods) -> list[Step]:
    deny = ns_policy("x", "deny-all", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})
    return [Step([("NetworkPolicy", "ADDED", deny)],
                 [("TCP", 80, reachable(("x/*", "*", False), ("*", "x/*", False)))]),
            Step([("NetworkPolicy", "DELETED", deny)], [("TCP", 80, reachable())])]


@case("should allow egress access to server in CIDR block")
def _(w: Pods) -> list[Step]:
    to_yb = {"ipBlock": {"cidr": f"{w.ips['y/b'][4]}/32"}}
    spec = {**EGRESS, "podSelector": POD_A, "egress": [{"to": [to_yb]}]}
    return [Step([add("x", "allow-client-a-via-cidr-egress-rule", spec)],
                 [("TCP", 80, reachable(("x/a", "*", False), ("x/a", "y/b", True)))])]


@case("should enforce except clause while egress access to server in CIDR block")
def _(w: Pods) -> list[Step]:
    block = {"cidr": w.subnet, "except": [f"{w.ips['x/b'][4]}/32"]}
    spec = {**EGRESS, "podSelector": POD_A, "egress": [{"to": [{"ipBlock": block}]}]}
    return [Step([add("x", "allow-client-a-via-cidr-egress-rule", spec)],
                 [("TCP", 80, reachable(("x/a", "x/b", False)))])]


@case("should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed")
def _(w: Pods) -> list[Step]:
    block = {"cidr": w.subnet, "except": [f"{w.ips['x/b'][4]}/32"]}
    to_xb = {"ipBlock": {"cidr": f"{w.ips['x/b'][4]}/32"}}
    only_b = {**EGRESS, "podSelector": POD_A, "egress": [{"to": [to_xb]}]}
    name = "allow-client-a-via-cidr-egress-rule"
    return [Step([add("x", name, {**EGRESS, "podSelector": POD_A, "egress": [{"to": [{"ipBlock": block}]}]})],
                 [("TCP", 80, reachable(("x/a", "x/b", False)))]),
            Step([("NetworkPolicy", "MODIFIED", ns_policy("x", name, only_b))],
                 [("TCP", 80, reachable(("x/a", "*", False), ("x/a", "x/b", True)))])]


@case("should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector")  # noqa: E501  (upstream's title)
def _(w: Pods) -> list[Step]:
    return [Step([add("x", "allow-egress-for-target", {**EGRESS, "podSelector": POD_A, "egress": [{}]})],
                 [("TCP", 80, reachable())]),
            Step([add("x", "deny-ingress-via-label-selector", {"podSelector": POD_A, "ingress": []})],
                 [("TCP", 80, reachable(("*", "x/a", False)))])]


@case("should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't support SCTP")  # noqa: E501  (upstream's title)
def _(w: Pods) -> list[Step]:
    sctp = {"podSelector": POD_A, "ingress": [{"ports": [{"port": 81, "protocol": "SCTP"}]}]}
    return [Step([add("x", "deny-ingress", {"podSelector": {}}),
                  add("x", "allow-only-sctp-ingress-on-port-81", sctp)],
                 [("TCP", 81, DENY_INTO_X),
                  ("SCTP", 81, reachable(("*", "x/*", False), ("*", "x/a", True)))])]


@case("should properly isolate pods that are selected by a policy allowing SCTP, even if the plugin doesn't support SCTP")  # noqa: E501  (upstream's title)
def _(w: Pods) -> list[Step]:
    sctp = {"podSelector": POD_A, "ingress": [{"ports": [{"port": 80, "protocol": "SCTP"}]}]}
    return [Step([add("x", "allow-only-sctp-ingress-on-port-80", sctp)],
                 [("TCP", 81, CLOSED_XA), ("SCTP", 80, reachable()), ("SCTP", 81, CLOSED_XA)])]


# The upstream file's SCTP context ([Feature:SCTPConnectivity]), probed with real SCTP packets.
@case("SCTP: should support a 'default-deny-ingress' policy")
def _(w: Pods) -> list[Step]:
    return [Step([add("x", "deny-ingress", {"podSelector": {}})], [("SCTP", 80, DENY_INTO_X)],
                 families=(4, 6))]


@case("SCTP: should enforce policy based on Ports")
def _(w: Pods) -> list[Step]:
    sctp = {"podSelector": POD_A, "ingress": [{"ports": [{"port": 81, "protocol": "SCTP"}]}]}
    return [Step([add("x", "allow-only-sctp-ingress-on-port-81", sctp)],
                 [("SCTP", 81, reachable()), ("SCTP", 80, CLOSED_XA)])]


@case("SCTP: should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector")  # noqa: E501  (upstream's title)
def _(w: Pods) -> list[Step]:
    spec = {"podSelector": POD_A, "ingress": [{"from": [Y_A]}]}
    return [Step([add("x", "allow-ns-y-pod-a-via-namespace-pod-selector", spec)],
                 [("SCTP", 80, reachable(("*", "x/a", False), ("y/a", "x/a", True)))])]


# Not upstream's: ICMP has no port, so a rule naming ports never admits it, while a rule naming
# peers only admits every protocol of those peers (echo requests; the replies pass as replies).
@case("pybridge: ICMP: a rule with ports does not admit ICMP, a peer-only rule does")
def _(w: Pods) -> list[Step]:
    peer = [{"namespaceSelector": NS_Y}]
    port_80 = [{"port": 80}]

    def policies(event: str, ports: list[dict[str, Any]] | None) -> list[tuple[str, str, dict[str, Any]]]:
        with_ports = {"ports": ports} if ports else {}
        into_x = {"podSelector": {}, "ingress": [{"from": peer, **with_ports}]}
        out_of_xa = {**EGRESS, "podSelector": POD_A, "egress": [{"to": peer, **with_ports}]}
        return [("NetworkPolicy", event, ns_policy("x", "in", into_x)),
                ("NetworkPolicy", event, ns_policy("x", "out", out_of_xa))]
    y_into_x = reachable(("*", "x/*", False), ("y/*", "x/*", True), ("x/a", "*", False), ("x/a", "y/*", True))
    no_icmp = reachable(("*", "x/*", False), ("x/a", "*", False))
    return [Step(policies("ADDED", port_80), [("TCP", 80, y_into_x), ("ICMP", 0, no_icmp)], families=(4, 6)),
            Step(policies("MODIFIED", None), [("ICMP", 0, y_into_x), ("UDP", 81, y_into_x)], families=(4, 6))]


# Not an upstream case: a port range (endPort) in a real kernel, both families.
@case("pybridge: a range of ports by endPort, TCP and UDP")
def _(w: Pods) -> list[Step]:
    spec = {"podSelector": {}, "ingress": [{"ports": [{"port": 79, "endPort": 80},
                                                      {"protocol": "UDP", "port": 81, "endPort": 9000}]}]}
    return [Step([add("x", "range", spec)],
                 [("TCP", 80, reachable()), ("TCP", 81, DENY_INTO_X), ("UDP", 81, reachable()),
                  ("UDP", 80, DENY_INTO_X)], families=(4, 6))]


@case("should not allow access by TCP when a policy specifies only UDP")
def _(w: Pods) -> list[Step]:
    udp = {"podSelector": POD_A, "ingress": [{"ports": [{"port": 81, "protocol": "UDP"}]}]}
    return [Step([add("x", "allow-only-udp-ingress-on-port-81", udp)],
                 [("TCP", 81, reachable(("*", "x/a", False))), ("UDP", 81, reachable())])]


@case("should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using default ns label")  # noqa: E501  (upstream's title)
def _(w: Pods) -> list[Step]:
    spec = {"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": NS_Y}]}]}
    return [Step([add("x", "allow-client-a-via-ns-selector-for-immutable-ns-label", spec)],
                 [("TCP", 80, ONLY_Y_TO_XA)])]


@case("should enforce policy based on NamespaceSelector with MatchExpressions using default ns label")
def _(w: Pods) -> list[Step]:
    not_y = {"matchExpressions": [{"key": NAME_LABEL, "operator": "NotIn", "values": ["y"]}]}
    spec = {**EGRESS, "podSelector": POD_A, "egress": [{"to": [{"namespaceSelector": not_y}]}]}
    return [Step([add("x", "allow-ns-y-match-selector-for-immutable-ns-label", spec)],
                 [("TCP", 80, reachable(("x/a", "y/*", False)))])]


@case("UDP: should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector")  # noqa: E501  (upstream's title)
def _(w: Pods) -> list[Step]:
    spec = {"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": NS_Y, "podSelector": POD_A}]}]}
    return [Step([add("x", "allow-ns-y-pod-a-via-namespace-pod-selector", spec)],
                 [("UDP", 80, reachable(("*", "x/a", False), ("y/a", "x/a", True)))])]


@case("UDP: should enforce policy based on Ports")
def _(w: Pods) -> list[Step]:
    spec = {"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": NS_Y}],
                                               "ports": [{"port": 81, "protocol": "UDP"}]}]}
    return [Step([add("x", "allow-ingress-on-port-81-ns-x", spec)], [("UDP", 81, ONLY_Y_TO_XA)])]


# --- ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2): the upstream conformance cases
# that apply to one bridge node (pods, namespaces, networks) and the tiers' interplay, each
# matrix written by hand from the order Admin (by priority; Pass: on) -> NetworkPolicy -> Baseline
# -> accept.
CLUSTER_CASES: dict[str, Callable[[Pods], list[Step]]] = {}


def cluster_case(title: str) -> Callable[[Callable[[Pods], list[Step]]], Callable[[Pods], list[Step]]]:
    def register(fn: Callable[[Pods], list[Step]]) -> Callable[[Pods], list[Step]]:
        CLUSTER_CASES[title] = fn
        return fn
    return register


def cnp(name: str, tier: str, priority: int, subject: dict[str, Any], event: str = "ADDED",
        **rules: Any) -> tuple[str, str, dict[str, Any]]:
    return ("ClusterNetworkPolicy", event, {
        "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
        "spec": {"tier": tier, "priority": priority, "subject": subject, **rules}})


def in_ns(name: str) -> dict[str, Any]:
    return {"namespaces": {"matchLabels": {NAME_LABEL: name}}}


def pod_in(ns: str, pod: str) -> dict[str, Any]:
    return {"pods": {"namespaceSelector": {"matchLabels": {NAME_LABEL: ns}},
                     "podSelector": {"matchLabels": {"pod": pod}}}}


ALLOW_ALL_INTO_X = add("x", "allow-all", {"podSelector": {}, "ingress": [{}]})


@cluster_case("CNP interplay: an Admin Deny beats a NetworkPolicy allow")
def _(w: Pods) -> list[Step]:
    deny = cnp("deny-y-to-xa", "Admin", 10, pod_in("x", "a"),
               ingress=[{"action": "Deny", "from": [in_ns("y")]}])
    return [Step([ALLOW_ALL_INTO_X, deny], [("TCP", 80, reachable(("y/*", "x/a", False)))],
                 families=(4, 6))]


@cluster_case("CNP interplay: an Admin Pass defers to the NetworkPolicy, an Admin Accept overrides it")
def _(w: Pods) -> list[Step]:
    rules = [{"action": "Pass", "from": [in_ns("y")]}, {"action": "Accept", "from": [in_ns("z")]},
             {"action": "Deny", "from": [in_ns("y")]}]  # never reached for y: the Pass comes first
    return [Step([add("x", "deny-ingress", {"podSelector": {}}),
                  cnp("pass-y", "Admin", 3, in_ns("x"), ingress=rules)],
                 [("TCP", 80, reachable(("*", "x/*", False), ("z/*", "x/*", True)))])]


@cluster_case("CNP interplay: a Baseline Deny applies only where no NetworkPolicy selects the pod")
def _(w: Pods) -> list[Step]:
    base = cnp("base-deny-y", "Baseline", 10, in_ns("x"),
               ingress=[{"action": "Deny", "from": [in_ns("y")]}])
    np = add("x", "allow-to-a", {"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": {}}]}]})
    return [Step([base, np], [("TCP", 80, reachable(("y/*", "x/*", False), ("y/*", "x/a", True)))])]


@cluster_case("CNP interplay: a deleted policy opens again")
def _(w: Pods) -> list[Step]:
    rules = [{"action": "Deny", "from": [{"namespaces": {}}]}]
    return [Step([cnp("deny-into-xa", "Admin", 1, pod_in("x", "a"), ingress=rules)],
                 [("TCP", 80, CLOSED_XA)]),
            Step([cnp("deny-into-xa", "Admin", 1, pod_in("x", "a"), "DELETED", ingress=rules)],
                 [("TCP", 80, reachable())])]


@cluster_case("CNP admin ingress: the first matching rule wins (standard-ingress-tcp-rules)")
def _(w: Pods) -> list[Step]:
    tcp_80 = [{"tcp": {"destinationPort": {"number": 80}}}]
    rules = [{"action": "Accept", "from": [in_ns("y")]}, {"action": "Deny", "from": [in_ns("y")]},
             {"action": "Deny", "from": [in_ns("z")], "protocols": tcp_80},
             {"action": "Pass", "from": [in_ns("z")], "protocols": tcp_80}]
    return [Step([cnp("ingress-tcp", "Admin", 3, in_ns("x"), ingress=rules)],
                 [("TCP", 80, reachable(("z/*", "x/*", False))), ("TCP", 81, reachable()),
                  ("UDP", 80, reachable())])]


@cluster_case("CNP admin priority: the lower value wins (standard-priority-field)")
def _(w: Pods) -> list[Step]:
    deny = cnp("deny-to-y", "Admin", 5, in_ns("x"), egress=[{"action": "Deny", "to": [in_ns("y")]}])
    allow = cnp("allow-to-yb", "Admin", 4, in_ns("x"),
                egress=[{"action": "Accept", "to": [pod_in("y", "b")]}])
    return [Step([deny, allow], [("TCP", 80, reachable(("x/*", "y/*", False), ("x/*", "y/b", True)))],
                 families=(4, 6))]


@cluster_case("CNP admin egress: networks and a port range (standard-egress-inline-cidr-rules)")
def _(w: Pods) -> list[Step]:
    to_ya = [{"networks": [f"{ip}/{32 if family == 4 else 128}" for family, ip in w.ips["y/a"].items()]}]
    ports = [{"tcp": {"destinationPort": {"range": {"start": 79, "end": 80}}}}]
    deny = cnp("deny-net", "Admin", 1, in_ns("x"),
               egress=[{"action": "Deny", "to": to_ya, "protocols": ports}])
    return [Step([deny],
                 [("TCP", 80, reachable(("x/*", "y/a", False))), ("TCP", 81, reachable()),
                  ("UDP", 80, reachable())], families=(4, 6))]


@cluster_case("CNP baseline: Pass is the default (accept), Deny the rest (standard-gress-rules)")
def _(w: Pods) -> list[Step]:
    rules = [{"action": "Pass", "from": [pod_in("y", "a")]}, {"action": "Deny", "from": [in_ns("y")]}]
    return [Step([cnp("base", "Baseline", 1, in_ns("x"), ingress=rules)],
                 [("UDP", 80, reachable(("y/*", "x/*", False), ("y/a", "x/*", True)))])]


@cluster_case("CNP named port: a destinationNamedPort on the destination pod (ingress-udp-rules)")
def _(w: Pods) -> list[Step]:
    rules = [{"action": "Deny", "from": [{"namespaces": {}}],
              "protocols": [{"destinationNamedPort": "serve-81-udp"}]}]
    return [Step([cnp("deny-81-udp", "Admin", 1, pod_in("x", "a"), ingress=rules)],
                 [("UDP", 81, CLOSED_XA), ("TCP", 81, reachable()), ("UDP", 80, reachable())])]


@cluster_case("CNP fails closed: an unknown action denies that direction of its subjects, others apply")
def _(w: Pods) -> list[Step]:
    bad = cnp("bad", "Baseline", 1, pod_in("x", "a"),
              ingress=[{"action": "Allow", "from": [in_ns("y")]}])  # v1alpha1's name for Accept
    other = cnp("other", "Admin", 1, pod_in("x", "b"),
                ingress=[{"action": "Deny", "from": [in_ns("z")]}])
    return [Step([bad, other], [("TCP", 80, reachable(("*", "x/a", False), ("z/*", "x/b", False)))])]
