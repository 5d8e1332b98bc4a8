"""NetworkPolicy semantics (networking.k8s.io/v1 as the API reference documents it) on the
x/y/z world of netpol_world.py, with every expected verdict written from the spec by hand.

x and y live on this node (n1), z on n2: rules of this node judge egress of x/*, y/* and
ingress to x/*, y/*; a z -> z connection never crosses this node (open here).
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from cni_plugin.node.netpol.compile import Decision, block_networks, decide, merge_ranges
from cni_plugin.node.netpol.objects import IPBlock, LabelSelector, NetworkPolicy, Pod
from cni_plugin.node.netpol.selectors import matches

from .netpol_world import ME, namespaces, pod, policy, verdict, world_pods

ALL = [f"{ns}/{p}" for ns in "xyz" for p in "abc"]


SERVE_8080 = {"name": "serve-80-tcp", "containerPort": 8080}


def with_pod(new: Pod) -> list[Pod]:
    """The world with one pod replaced."""
    same = (new.metadata.namespace, new.metadata.name)
    return [*(p for p in world_pods() if (p.metadata.namespace, p.metadata.name) != same), new]


def run(*policies: NetworkPolicy, pods: list[Pod] | None = None, **ns_labels: dict[str, str]) -> Decision:
    return decide(policies, world_pods() if pods is None else pods, namespaces(**ns_labels), ME)


def matrix(d: Decision, **kw: Any) -> set[tuple[str, str]]:
    """The pairs that are blocked (self-traffic stays inside the pod and is left out)."""
    return {(s, t) for s in ALL for t in ALL if s != t and not verdict(d, s, t, **kw)}


def others_to(target: str) -> set[tuple[str, str]]:
    return {(s, target) for s in ALL if s != target}


def test_no_policy_everything_open() -> None:
    d = run()
    assert d.policies == () and not d.ingress and not d.egress
    assert matrix(d) == set()


def test_deny_all_ingress_in_namespace_blocks_everyone_into_it_and_nothing_out() -> None:
    d = run(policy("x", {"podSelector": {}}))  # no policyTypes, no rules: Ingress only
    assert matrix(d) == others_to("x/a") | others_to("x/b") | others_to("x/c")
    assert verdict(d, "x/a", "y/a")  # egress untouched


def test_policy_selects_by_pod_label_only_in_its_namespace() -> None:
    d = run(policy("x", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": []}))
    assert matrix(d) == others_to("x/a")  # y/a carries the same label: not selected


def test_allow_from_same_namespace_pod_selector() -> None:
    d = run(policy("x", {"podSelector": {"matchLabels": {"pod": "a"}},
                         "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}))
    assert matrix(d) == others_to("x/a") - {("x/b", "x/a")}  # y/b has pod=b but another namespace


def test_namespace_selector_alone_means_all_pods_there() -> None:
    d = run(policy("x", {"podSelector": {"matchLabels": {"pod": "a"}},
                         "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}))
    assert matrix(d) == others_to("x/a") - {("y/a", "x/a"), ("y/b", "x/a"), ("y/c", "x/a")}


def test_pod_and_namespace_selector_in_one_peer_is_and_in_two_peers_is_or() -> None:
    both = {"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "c"}}}
    d = run(policy("x", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [both]}]}))
    assert matrix(d) == others_to("x/a") - {("y/c", "x/a")}
    apart = [{"namespaceSelector": both["namespaceSelector"]}, {"podSelector": both["podSelector"]}]
    d = run(policy("x", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": apart}]}))
    assert matrix(d) == others_to("x/a") - {("y/a", "x/a"), ("y/b", "x/a"), ("y/c", "x/a"), ("x/c", "x/a")}


def test_empty_namespace_selector_is_every_namespace_and_empty_from_every_source() -> None:
    every_ns = {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}]}
    d = run(policy("x", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [every_ns]}))
    assert matrix(d) == others_to("x/a") - {("x/b", "x/a"), ("y/b", "x/a"), ("z/b", "x/a")}
    d = run(policy("x", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{}]}))
    assert matrix(d) == set()
    assert verdict(d, "192.0.2.7", "x/a")


def test_namespace_default_name_label_when_the_object_lacks_it() -> None:
    sel = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "z"}}}
    d = run(policy("x", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [sel]}]}))
    assert matrix(d) == others_to("x/a") - {("z/a", "x/a"), ("z/b", "x/a"), ("z/c", "x/a")}


@pytest.mark.parametrize(("operator", "values", "allowed_from"), [
    ("In", ["b", "c"], {"x/b", "x/c"}),
    ("NotIn", ["b"], {"x/c"}),  # x/a is the target, self left out
    ("Exists", [], {"x/b", "x/c"}),
    ("DoesNotExist", [], set()),
])
def test_match_expressions_on_pod_labels(operator: str, values: list[str], allowed_from: set[str]) -> None:
    expr = {"key": "pod", "operator": operator, "values": values}
    d = run(policy("x", {"podSelector": {"matchLabels": {"pod": "a"}},
                         "ingress": [{"from": [{"podSelector": {"matchExpressions": [expr]}}]}]}))
    assert matrix(d) == others_to("x/a") - {(s, "x/a") for s in allowed_from}


def test_not_in_matches_pods_without_the_key_and_selectors_and_together() -> None:
    not_in = LabelSelector.model_validate({"matchExpressions": [{"key": "tier", "operator": "NotIn",
                                                                "values": ["db"]}]})
    assert matches(not_in, {}) and matches(not_in, {"tier": "web"}) and not matches(not_in, {"tier": "db"})
    both = LabelSelector.model_validate({"matchLabels": {"app": "w"},
                                         "matchExpressions": [{"key": "tier", "operator": "Exists"}]})
    assert matches(both, {"app": "w", "tier": ""}) and not matches(both, {"app": "w"})
    assert not matches(both, {"tier": "x"}) and matches(LabelSelector(), {"any": "thing"})


def test_ip_block_with_except() -> None:
    block = {"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.1.0/24"]}}
    d = run(policy("x", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [block]}]}))
    # 10.0.0.x (x) and 10.0.2.x (z) are in, 10.0.1.x (y) is excepted, outside addresses are out
    assert matrix(d) == {("y/a", "x/a"), ("y/b", "x/a"), ("y/c", "x/a")}
    assert not verdict(d, "192.0.2.1", "x/a") and verdict(d, "10.0.200.1", "x/a")
    assert not verdict(d, "y/b", "x/a", family=6)  # an IPv4 block allows no IPv6 peer


def test_block_networks_and_port_merging() -> None:
    block = IPBlock.model_validate({"cidr": "10.0.0.5/30", "except": ["10.0.0.4/31", "::/0"]})
    networks = block_networks(block)
    assert [str(n) for n in networks] == ["10.0.0.6/31"]  # host bits in cidr mean its network
    assert merge_ranges([("TCP", 80, 80), ("TCP", 81, 90), ("UDP", 80, 80), ("TCP", 85, 100)]) == (
        ("TCP", 80, 100), ("UDP", 80, 80))


def test_ports_numbers_ranges_protocols() -> None:
    ports = [{"port": 80}, {"protocol": "UDP", "port": 81, "endPort": 83}, {"protocol": "SCTP"}]
    d = run(policy("x", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": ports}]}))
    assert verdict(d, "y/a", "x/a", "TCP", 80) and not verdict(d, "y/a", "x/a", "TCP", 81)
    assert not verdict(d, "y/a", "x/a", "UDP", 80) and verdict(d, "y/a", "x/a", "UDP", 81)
    assert verdict(d, "y/a", "x/a", "UDP", 83) and not verdict(d, "y/a", "x/a", "UDP", 84)
    assert verdict(d, "y/a", "x/a", "SCTP", 9999) and not verdict(d, "y/a", "x/a", "TCP", 9999)


def test_port_without_protocol_is_tcp() -> None:
    d = run(policy("x", {"podSelector": {}, "ingress": [{"ports": [{"port": 81}]}]}))
    assert verdict(d, "y/a", "x/b", "TCP", 81) and not verdict(d, "y/a", "x/b", "UDP", 81)


def test_named_port_ingress_resolves_on_the_selected_pod() -> None:
    pods = with_pod(pod("x", "b", spec={"containers": [{"ports": [SERVE_8080]}]}))
    d = run(policy("x", {"podSelector": {}, "ingress": [{"ports": [{"port": "serve-80-tcp"}]}]}), pods=pods)
    assert verdict(d, "y/a", "x/a", "TCP", 80) and not verdict(d, "y/a", "x/a", "TCP", 8080)
    assert verdict(d, "y/a", "x/b", "TCP", 8080) and not verdict(d, "y/a", "x/b", "TCP", 80)
    assert verdict(d, "y/a", "x/b", "TCP", 8080, family=6)


def test_named_port_needs_the_protocol_of_the_container_port() -> None:
    udp = {"port": "serve-81-udp", "protocol": "UDP"}
    d = run(policy("x", {"podSelector": {}, "ingress": [{"ports": [udp]}]}))
    assert verdict(d, "y/a", "x/a", "UDP", 81) and not verdict(d, "y/a", "x/a", "TCP", 81)
    # protocol defaults to TCP, and the pod's serve-81-udp is UDP: nothing matches
    d = run(policy("x", {"podSelector": {}, "ingress": [{"ports": [{"port": "serve-81-udp"}]}]}))
    assert not verdict(d, "y/a", "x/a", "UDP", 81) and not verdict(d, "y/a", "x/a", "TCP", 81)


def test_named_port_egress_resolves_on_the_peer() -> None:
    pods = with_pod(pod("z", "c", spec={"containers": [{"ports": [SERVE_8080]}]}))
    d = run(policy("x", {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                         "egress": [{"ports": [{"port": "serve-80-tcp"}]}]}), pods=pods)
    assert verdict(d, "x/a", "z/b", "TCP", 80) and not verdict(d, "x/a", "z/c", "TCP", 80)
    assert verdict(d, "x/a", "z/c", "TCP", 8080) and not verdict(d, "x/a", "z/b", "TCP", 8080)
    assert not verdict(d, "x/a", "192.0.2.1", "TCP", 80)  # a name never matches a non-pod address


def test_the_same_rule_in_two_namespaces_reads_each_its_own() -> None:
    # compile shares the Rule of equal rules across policies: not of those reading their namespace
    spec = {"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}
    d = run(policy("x", spec), policy("y", spec))
    assert verdict(d, "x/b", "x/a") and verdict(d, "y/b", "y/a")
    assert not verdict(d, "y/b", "x/a") and not verdict(d, "x/b", "y/a")


def test_the_same_named_port_rule_in_two_namespaces_resolves_on_each_ones_pods() -> None:
    # nor of an ingress named port, which is looked up on the pods the policy selects
    pods = with_pod(pod("y", "a", spec={"containers": [{"ports": [SERVE_8080]}]}))
    spec = {"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": "serve-80-tcp"}]}]}
    d = run(policy("x", spec), policy("y", spec), pods=pods)
    assert verdict(d, "x/b", "x/a", "TCP", 80) and not verdict(d, "x/b", "x/a", "TCP", 8080)
    assert verdict(d, "x/b", "y/a", "TCP", 8080) and not verdict(d, "x/b", "y/a", "TCP", 80)


def test_egress_deny_all_and_implied_policy_types() -> None:
    d = run(policy("x", {"podSelector": {}, "policyTypes": ["Egress"]}))
    assert matrix(d) == {(f"x/{p}", t) for p in "abc" for t in ALL if t != f"x/{p}"}
    # egress rules without policyTypes: the policy affects both directions
    d = run(policy("x", {"podSelector": {"matchLabels": {"pod": "a"}},
                         "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}))
    assert matrix(d) == ({("x/a", t) for t in ALL if t not in ("x/a", "x/b")} | others_to("x/a"))
    # policyTypes [Ingress] with egress rules present: egress is not affected
    d = run(policy("x", {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                         "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}))
    assert matrix(d) == others_to("x/a")


def test_several_policies_are_a_union_per_direction() -> None:
    from_b = policy("x", {"podSelector": {"matchLabels": {"pod": "a"}},
                          "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}, name="b")
    ns_y = {"namespaceSelector": {"matchLabels": {"ns": "y"}}}
    from_y = policy("x", {"podSelector": {}, "ingress": [{"from": [ns_y]}]}, name="y")
    d = run(from_b, from_y)
    y_pods = {"y/a", "y/b", "y/c"}
    assert matrix(d) == ((others_to("x/a") - {(s, "x/a") for s in y_pods | {"x/b"}})
                         | (others_to("x/b") - {(s, "x/b") for s in y_pods})
                         | (others_to("x/c") - {(s, "x/c") for s in y_pods}))


def test_pods_of_other_nodes_are_not_judged_here_but_are_peers() -> None:
    d = run(policy("z", {"podSelector": {}}))  # z lives on n2: nothing selected here
    assert d.policies == () and matrix(d) == set()
    d = run(policy("x", {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector":
                                                                   {"matchLabels": {"ns": "z"}}}]}]}))
    assert verdict(d, "z/a", "x/b") and not verdict(d, "y/a", "x/b")


def test_host_network_and_finished_pods_are_never_selected_nor_peers() -> None:
    pods = [p for p in world_pods() if p.metadata.namespace != "x"]
    pods += [pod("x", "a", spec={"hostNetwork": True}), pod("x", "b", status={"phase": "Succeeded"}),
             pod("x", "c")]
    d = run(policy("x", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}), pods=pods)
    assert list(d.ingress) == [pod("x", "c").addresses()[0], pod("x", "c").addresses()[1]]
    assert not verdict(d, "x/a", "x/c") and not verdict(d, "x/b", "x/c")  # their IPs are no pod peers


def test_ipv6_follows_the_same_rules() -> None:
    d = run(policy("x", {"podSelector": {"matchLabels": {"pod": "a"}},
                         "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}},
                                               {"ipBlock": {"cidr": "fd00::2:0/112"}}]}]}))
    assert verdict(d, "x/b", "x/a", family=6) and verdict(d, "z/c", "x/a", family=6)
    assert not verdict(d, "y/b", "x/a", family=6) and not verdict(d, "z/c", "x/a", family=4)


@pytest.mark.parametrize(("spec", "field"), [
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Like"}]}}, "operator"),
    ({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}, "cidr"),
    ({"ingress": [{"ports": [{"protocol": "ICMP"}]}]}, "protocol"),
    ({"policyTypes": ["Sideways"]}, "policyTypes"),
    ({"ingress": [{"ports": [{"port": 70000}]}]}, "port"),  # would make the whole nft script fail
    ({"ingress": [{"ports": [{"port": 80, "endPort": 0}]}]}, "endPort"),
])
def test_invalid_policy_is_an_error_naming_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        policy("x", spec)
    assert field in str(info.value)
