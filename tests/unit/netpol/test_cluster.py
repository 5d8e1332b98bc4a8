"""ClusterNetworkPolicy (v1alpha2) with NetworkPolicy in tiers, on the x/y/z world of netpol_world.py.

Each expected verdict comes from `oracle`, a small evaluator written here from the API's text
(first matching rule of the Admin policies by priority; Pass or no match: the NetworkPolicy tier,
whose outcome each test gives by hand; then Baseline; then accept), reading the policies' raw
dicts, not the code under test. The compiled side is read as nft.py renders it (`compiled`):
a plan per address, each policy's rules in order with their actions.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from cni_plugin.node.netpol import cluster, compile, tiers
from cni_plugin.node.netpol.objects import Address, NetworkPolicy, Pod

from .netpol_world import ME, NAMESPACES, SERVE_81_UDP, namespaces, policy, v4, v6, world_pods

ALL = [f"{ns}/{p}" for ns in NAMESPACES for p in "abc"]
LOCAL = {p for p in ALL if not p.startswith("z/")}
PROBES = [("TCP", 80), ("TCP", 81), ("UDP", 81), ("SCTP", 80)]
# The NetworkPolicy tier's outcome for a (pod, direction): None when no NetworkPolicy selects it,
# else whether it allows the peer (given by hand in each test)
NpTier = Mapping[tuple[str, str], Callable[[str, str, int], bool]]


def cnp(name: str, tier: str, priority: int, subject: dict[str, Any], **rules: Any) -> dict[str, Any]:
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name},
            "spec": {"tier": tier, "priority": priority, "subject": subject, **rules}}


def ns(name: str) -> dict[str, Any]:
    return {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": name}}}


def pods(namespace: str, pod: str) -> dict[str, Any]:
    return {"pods": {"namespaceSelector": {"matchLabels": {"ns": namespace}},
                     "podSelector": {"matchLabels": {"pod": pod}}}}


def tcp(port: int) -> dict[str, Any]:
    return {"tcp": {"destinationPort": {"number": port}}}


# --- the oracle: the API's rules over the raw dicts (matchLabels only, enough for these tests)

def _labels_match(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _ns_labels(who: str) -> dict[str, str]:
    return {"ns": who.split("/")[0], "kubernetes.io/metadata.name": who.split("/")[0]}


def _selects(sel: Mapping[str, Any], who: str) -> bool:
    """A subject or pod peer (namespaces or pods) holding pod `who` (a bare address: never)."""
    if "/" not in who:
        return False
    if "namespaces" in sel:
        return _labels_match(sel["namespaces"], _ns_labels(who))
    return (_labels_match(sel["pods"]["namespaceSelector"], _ns_labels(who))
            and _labels_match(sel["pods"]["podSelector"], {"pod": who.split("/")[1]}))


def _address(who: str, family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(who if "/" not in who else (v4 if family == 4 else v6)(who))


def _port_matches(protocols: list[dict[str, Any]] | None, dst: str, proto: str, port: int) -> bool:
    if protocols is None:
        return True
    for p in protocols:
        if "destinationNamedPort" in p:  # every world pod: serve-80-tcp (TCP 80), serve-81-udp (UDP 81)
            named = {"serve-80-tcp": ("TCP", 80), "serve-81-udp": ("UDP", 81)}
            if "/" in dst and named.get(p["destinationNamedPort"]) == (proto, port):
                return True
            continue
        (key, match), = p.items()
        dp = match["destinationPort"]
        first, last = (dp["number"], dp["number"]) if "number" in dp else (dp["range"]["start"],
                                                                          dp["range"]["end"])
        if key.upper() == proto and first <= port <= last:
            return True
    return False


def _tier(policies: list[dict[str, Any]], tier: str, direction: str, own: str, peer: str, dst: str,
          proto: str, port: int, family: int) -> str | None:
    chosen = sorted((p for p in policies
                     if p["spec"]["tier"] == tier and _selects(p["spec"]["subject"], own)),
                    key=lambda p: (p["spec"]["priority"], p["metadata"]["name"]))
    for p in chosen:
        for rule in p["spec"].get(direction, []):
            for q in rule["from" if direction == "ingress" else "to"]:
                hit = (any(_address(peer, family) in ipaddress.ip_network(n) for n in q["networks"])
                       if "networks" in q else _selects(q, peer))
                if hit and _port_matches(rule.get("protocols"), dst, proto, port):
                    return str(rule["action"])
    return None


def _direction(policies: list[dict[str, Any]], np: NpTier, direction: str, own: str, peer: str, dst: str,
               proto: str, port: int, family: int) -> bool:
    if own not in LOCAL:
        return True  # judged on the other node
    admin = _tier(policies, "Admin", direction, own, peer, dst, proto, port, family)
    if admin in ("Accept", "Deny"):
        return admin == "Accept"
    if (own, direction) in np:
        return np[own, direction](peer, proto, port)
    return _tier(policies, "Baseline", direction, own, peer, dst, proto, port, family) != "Deny"


def oracle(policies: list[dict[str, Any]], np: NpTier, src: str, dst: str, proto: str, port: int,
           family: int = 4) -> bool:
    return (_direction(policies, np, "egress", src, dst, dst, proto, port, family)
            and _direction(policies, np, "ingress", dst, src, dst, proto, port, family))


# --- the compiled side, as the ruleset treats it (nft.py)

def _allows(rule: compile.Rule, peer: Address, dst: Address, proto: str, port: int) -> bool:
    if rule.peers is not None and not any(peer in n for n in rule.peers):
        return False
    return rule.ranges is None or (any(p == proto and a <= port <= b for p, a, b in rule.ranges)
                                   or (dst, proto, port) in rule.named)


def _first(t: tiers.Tiers, chosen: tuple[int, ...], direction: str, peer: Address, dst: Address, proto: str,
           port: int) -> str | None:
    return next((r.action for i in chosen for r in t.policies[i].rules(direction)
                 if _allows(r.rule, peer, dst, proto, port)), None)


def _judged(d: compile.Decision, t: tiers.Tiers, direction: str, own: Address, peer: Address, dst: Address,
            proto: str, port: int) -> bool:
    plan = tiers.judges(d, t, direction).get(own)
    if plan is None:
        return True
    admin = _first(t, plan.admin, direction, peer, dst, proto, port)
    if admin in ("Accept", "Deny"):
        return admin == "Accept"
    if plan.policies is not None:
        return any(_allows(r, peer, dst, proto, port) for i in plan.policies
                   for r in getattr(d.policies[i], direction) or ())
    return _first(t, plan.baseline, direction, peer, dst, proto, port) != "Deny"


def compiled(d: compile.Decision, t: tiers.Tiers, src: str, dst: str, proto: str, port: int,
             family: int = 4) -> bool:
    s, a = _address(src, family), _address(dst, family)
    return _judged(d, t, "egress", s, a, a, proto, port) and _judged(d, t, "ingress", a, s, a, proto, port)


def build(policies: list[dict[str, Any]], nps: list[NetworkPolicy] = (),  # type: ignore[assignment]
          world: list[Pod] | None = None) -> tuple[compile.Decision, tiers.Tiers]:
    read = [cluster.read(p) for p in policies]
    assert all(r[0] is not None for r in read)
    world = world_pods() if world is None else world
    return (compile.decide(nps, world, namespaces(), ME),
            tiers.decide([r[0] for r in read if r[0] is not None], world, namespaces(), ME))


def check(policies: list[dict[str, Any]], nps: list[NetworkPolicy], np: NpTier,
          extra: tuple[str, ...] = ()) -> set[tuple[str, str, str, int]]:
    """Compiled == oracle on every pair, probe and family; returns the blocked (src, dst, proto, port)."""
    d, t = build(policies, nps)
    blocked = set()
    for src in [*ALL, *extra]:
        for dst in ALL:
            if src == dst:
                continue
            for proto, port in PROBES:
                for family in (4, 6):
                    if "/" not in src and family == 6:
                        continue
                    want = oracle(policies, np, src, dst, proto, port, family)
                    got = compiled(d, t, src, dst, proto, port, family)
                    assert got == want, (src, dst, proto, port, family)
                    if not want and family == 4:
                        blocked.add((src, dst, proto, port))
    return blocked


# --- the upstream conformance cases, on x/y/z (x plays gryffindor, y ravenclaw, z slytherin)

def test_admin_ingress_first_matching_rule_wins() -> None:
    """standard-ingress-tcp-rules: Accept, Deny, Pass from ravenclaw (the Accept wins); Deny then
    Pass from slytherin at 80 (Deny wins at 80, other ports open)."""
    p = cnp("ingress-tcp", "Admin", 3, ns("x"), ingress=[
        {"name": "allow-y", "action": "Accept", "from": [ns("y")]},
        {"name": "deny-y", "action": "Deny", "from": [ns("y")]},
        {"name": "pass-y", "action": "Pass", "from": [ns("y")]},
        {"name": "deny-z-80", "action": "Deny", "from": [ns("z")], "protocols": [tcp(80)]},
        {"name": "pass-z-80", "action": "Pass", "from": [ns("z")], "protocols": [tcp(80)]}])
    blocked = check([p], [], {})
    assert blocked == {(f"z/{s}", f"x/{t}", "TCP", 80) for s in "abc" for t in "abc"}


def test_admin_priority_orders_policies_and_egress_uses_networks() -> None:
    """standard-priority-field and standard-egress-inline-cidr-rules: the lower priority value
    wins; networks match addresses, pods or not."""
    deny = cnp("deny-y", "Admin", 5, ns("x"), egress=[{"action": "Deny", "to": [ns("y")]}])
    accept = cnp("accept-y-b", "Admin", 4, ns("x"), egress=[{"action": "Accept", "to": [pods("y", "b")]}])
    cidr = cnp("deny-z-net", "Admin", 6, ns("x"), egress=[
        {"action": "Deny", "to": [{"networks": ["10.0.2.0/24", "fd00::2:0/112"]}], "protocols": [tcp(80)]}])
    blocked = check([deny, accept, cidr], [], {})
    into_y = {(f"x/{s}", f"y/{t}", pr, po) for s in "abc" for t in "ac" for pr, po in PROBES}
    into_z = {(f"x/{s}", f"z/{t}", "TCP", 80) for s in "abc" for t in "abc"}
    assert blocked == into_y | into_z


def test_baseline_tier_applies_to_pods_no_networkpolicy_selects() -> None:
    """baseline standard-gress-rules + api_integration: Baseline Deny, overridden by a
    NetworkPolicy that selects the pod; Baseline Pass means the default (accept)."""
    base = cnp("base", "Baseline", 10, ns("x"), ingress=[
        {"action": "Pass", "from": [pods("y", "a")]},
        {"action": "Deny", "from": [ns("y")]}])
    np = policy("x", {"podSelector": {"matchLabels": {"pod": "a"}},
                      "ingress": [{"from": [{"podSelector": {}}]}]})  # x/a: from x only
    by_hand: NpTier = {("x/a", "ingress"): lambda peer, _proto, _port: peer.startswith("x/")}
    blocked = check([base], [np], by_hand)
    from_y_z = {(s, "x/a") for s in ALL if not s.startswith("x/")}
    baseline = {(f"y/{s}", f"x/{t}") for s in "bc" for t in "bc"}
    assert {(s, t) for s, t, _, _ in blocked} == from_y_z | baseline


def test_named_ports_and_ranges_and_protocols() -> None:
    """standard-ingress-udp/sctp-rules and named ports: a destinationNamedPort on the
    destination pod, a range, another protocol."""
    p = cnp("ports", "Admin", 1, ns("x"), ingress=[
        {"action": "Deny", "from": [ns("y")], "protocols": [{"destinationNamedPort": "serve-81-udp"}]},
        {"action": "Deny", "from": [ns("z")], "protocols": [{"tcp": {"destinationPort": {"range": {
            "start": 79, "end": 80}}}}, {"sctp": {"destinationPort": {"number": 80}}}]}])
    blocked = check([p], [], {})
    assert {(pr, po) for s, _, pr, po in blocked if s.startswith("y/")} == {("UDP", 81)}
    assert {(pr, po) for s, _, pr, po in blocked if s.startswith("z/")} == {("TCP", 80), ("SCTP", 80)}


# --- the interplay of the tiers

def test_admin_deny_beats_a_networkpolicy_allow() -> None:
    deny = cnp("deny", "Admin", 1, pods("x", "a"), ingress=[{"action": "Deny", "from": [pods("x", "b")]}])
    allow = policy("x", {"podSelector": {"matchLabels": {"pod": "a"}},
                         "ingress": [{"from": [{"podSelector": {}}]}]})
    by_hand: NpTier = {("x/a", "ingress"): lambda peer, _proto, _port: peer.startswith("x/")}
    blocked = {(s, t) for s, t, _, _ in check([deny], [allow], by_hand)}
    assert ("x/b", "x/a") in blocked and ("x/c", "x/a") not in blocked


def test_admin_pass_defers_to_the_networkpolicy_and_admin_accept_overrides_it() -> None:
    p = cnp("pass", "Admin", 1, ns("x"), ingress=[
        {"action": "Pass", "from": [ns("y")]}, {"action": "Accept", "from": [ns("z")]},
        {"action": "Deny", "from": [ns("y")]}])  # never reached for y: Pass came first
    deny_all = policy("x", {"podSelector": {}})
    by_hand: NpTier = {(f"x/{p}", "ingress"): lambda _peer, _proto, _port: False for p in "abc"}
    blocked = {(s, t) for s, t, _, _ in check([p], [deny_all], by_hand)}
    # y: passed, then denied by the NetworkPolicy; z: accepted over it; x among itself: the NetworkPolicy
    assert blocked == {(s, f"x/{t}") for s in ALL for t in "abc" if not s.startswith("z/") and s != f"x/{t}"}


def test_admin_pass_then_no_networkpolicy_goes_to_baseline() -> None:
    admin = cnp("pass", "Admin", 1, ns("x"), egress=[{"action": "Pass", "to": [ns("y")]}])
    base = cnp("base", "Baseline", 1, ns("x"), egress=[{"action": "Deny", "to": [ns("y")]},
                                                       {"action": "Deny", "to": [ns("x")]}])
    blocked = {(s, t) for s, t, _, _ in check([admin, base], [], {})}
    assert blocked == {(s, t) for s in ALL for t in ALL if s[0] == "x" and t[0] in "xy" and s != t}


def test_bare_addresses_are_peers_of_networks_only() -> None:
    p = cnp("net", "Admin", 1, ns("x"), egress=[{"action": "Deny", "to": [{"networks": ["192.0.2.0/24"]}]}])
    d, t = build([p])
    assert not compiled(d, t, "x/a", "192.0.2.9", "TCP", 80)
    assert compiled(d, t, "x/a", "198.51.100.1", "TCP", 80)
    assert oracle([p], {}, "x/a", "192.0.2.9", "TCP", 80) is False


def test_a_deleted_policy_opens_again_and_remote_subjects_are_not_judged_here() -> None:
    deny = cnp("deny", "Admin", 1, ns("z"), ingress=[{"action": "Deny", "from": [ns("x")]}])
    d, t = build([deny])
    assert t.policies == () and compiled(d, t, "x/a", "z/a", "TCP", 80)  # z lives on n2
    deny = cnp("deny", "Admin", 1, ns("x"), ingress=[{"action": "Deny", "from": [ns("y")]}])
    d, t = build([deny])
    assert not compiled(d, t, "y/a", "x/a", "TCP", 80)
    d, t = build([])
    assert compiled(d, t, "y/a", "x/a", "TCP", 80)


def test_host_network_pods_are_neither_subjects_nor_peers() -> None:
    world = [p for p in world_pods() if p.metadata.name != "b" or p.metadata.namespace != "y"]
    host = Pod.model_validate({"metadata": {"name": "b", "namespace": "y", "labels": {"pod": "b"}},
                               "spec": {"nodeName": ME, "hostNetwork": True},
                               "status": {"phase": "Running", "podIP": v4("y/b")}})
    p = cnp("deny", "Admin", 1, ns("y"), egress=[{"action": "Deny", "to": [ns("x")]}])
    _, t = build([p], world=[*world, host])
    assert ipaddress.ip_address(v4("y/b")) not in t.selected("egress")
    assert ipaddress.ip_address(v4("y/a")) in t.selected("egress")
    assert SERVE_81_UDP  # the world's pods carry it (the named-port test relies on it)


# --- bad input fails closed for the policy's subjects, and only there

GOOD_RULE = {"action": "Accept", "from": [ns("y")]}


@pytest.mark.parametrize(("rule", "field"), [
    ({"action": "Allow", "from": [ns("y")]}, "spec.ingress.1.action"),  # the v1alpha1 name
    ({"action": "Accept", "from": [ns("y")], "protocols": [tcp(70000)]},
     "spec.ingress.1.protocols.0.tcp.destinationPort.number"),
    ({"action": "Accept", "from": [ns("y")], "protocols": [{"udp": {"destinationPort": {"number": True}}}]},
     "spec.ingress.1.protocols.0.udp.destinationPort.number"),
    ({"action": "Accept", "from": [ns("y")], "protocols": [{"tcp": {"destinationPort": {"range": {
        "start": 90, "end": 80}}}}]}, "spec.ingress.1.protocols.0.tcp.destinationPort.range"),
    ({"action": "Accept", "from": [{"networks": ["10.0.1.0/24"]}]}, "spec.ingress.1.from.0"),  # egress only
    ({"action": "Accept", "from": [{}]}, "spec.ingress.1.from.0"),  # a peer of a newer CRD
    ({"action": "Accept", "from": []}, "spec.ingress.1.from"),
    ({"action": "Accept", "from": [ns("y")], "protocols": [{"destinationNamedPort": "Web_80"}]},
     "spec.ingress.1.protocols.0.destinationNamedPort"),
])
def test_an_unreadable_ingress_rule_denies_all_ingress_of_the_subjects(rule: dict[str, Any],
                                                                       field: str) -> None:
    bad = cnp("bad", "Admin", 5, ns("x"), ingress=[GOOD_RULE, rule],
              egress=[{"action": "Deny", "to": [ns("z")]}])
    other = cnp("other", "Admin", 1, ns("y"), ingress=[{"action": "Deny", "from": [ns("z")]}])
    policy_, refused = cluster.read(bad)
    assert policy_ is not None and policy_.closed == {"Ingress"}
    assert field in {r.field for r in refused} and {r.name for r in refused} == {"bad"}
    read = [policy_, cluster.read(other)[0]]
    d = compile.decide([], world_pods(), namespaces(), ME)
    t = tiers.decide([p for p in read if p is not None], world_pods(), namespaces(), ME)
    assert t.policies[1].refused and t.policies[1].name == "bad"
    # x's ingress closed (even from y, which the good rule accepted); its egress rules still hold;
    # the other policy still applies, and everything else is as before
    assert not any(compiled(d, t, s, "x/a", pr, po) for s in ALL if s != "x/a" for pr, po in PROBES)
    assert not compiled(d, t, "x/a", "z/a", "TCP", 80) and compiled(d, t, "x/a", "y/a", "TCP", 80)
    assert not compiled(d, t, "z/a", "y/a", "TCP", 80) and compiled(d, t, "x/a", "y/b", "TCP", 80)


@pytest.mark.parametrize(("to", "field"), [
    ({"nodes": {}}, "spec.egress.0.to.0"),
    ({"domainNames": ["example.com"]}, "spec.egress.0.to.0"),
    ({"networks": ["10.0.0.0/33"]}, "spec.egress.0.to.0.networks.0"),
    ({"networks": ["fe80::/64%eth0"]}, "spec.egress.0.to.0.networks.0"),
    ({"networks": []}, "spec.egress.0.to.0.networks"),
    ({"networks": ["10.0.0.0/8"], "namespaces": {}}, "spec.egress.0.to.0"),  # two fields
])
def test_an_unsupported_or_bad_egress_peer_denies_all_egress_of_the_subjects(to: dict[str, Any],
                                                                            field: str) -> None:
    bad = cnp("bad", "Baseline", 5, ns("x"), egress=[{"action": "Accept", "to": [to]}])
    policy_, refused = cluster.read(bad)
    assert policy_ is not None and policy_.closed == {"Egress"} and policy_.spec.tier == "Baseline"
    assert field in {r.field for r in refused}
    d, t = compile.decide([], world_pods(), namespaces(), ME), tiers.decide([policy_], world_pods(),
                                                                             namespaces(), ME)
    assert not any(compiled(d, t, "x/a", dst, "TCP", 80) for dst in ALL if dst != "x/a")
    assert compiled(d, t, "y/a", "x/a", "TCP", 80)  # ingress untouched


@pytest.mark.parametrize(("spec", "field", "closed"), [
    ({"tier": "Platform"}, "spec.tier", {"Ingress"}),
    ({"priority": 1001}, "spec.priority", {"Ingress"}),
    ({"priority": "3"}, "spec.priority", {"Ingress"}),
    ({"subject": {}}, "spec.subject", {"Ingress"}),
    ({"subject": {"namespaces": {}, "pods": {"podSelector": {}}}}, "spec.subject", {"Ingress"}),
    ({"subject": {"pods": {"namespaceSelector": {}}}}, "spec.subject.pods.podSelector", {"Ingress"}),
    ({"ingress": "everything"}, "spec.ingress", {"Ingress"}),
])
def test_a_bad_common_field_closes_every_direction_with_rules(spec: dict[str, Any], field: str,
                                                             closed: set[str]) -> None:
    obj = cnp("bad", "Baseline", 5, ns("x"), ingress=[GOOD_RULE])
    obj["spec"].update(spec)
    policy_, refused = cluster.read(obj)
    assert policy_ is not None and policy_.closed == closed and field in {r.field for r in refused}
    if field in ("spec.tier", "spec.priority"):  # read as the first place, where it cannot be overridden
        assert (policy_.spec.tier, policy_.spec.priority) == ("Admin" if field == "spec.tier" else "Baseline",
                                                              0 if field == "spec.priority" else 5)


def test_a_whole_unreadable_spec_closes_both_directions_of_every_pod_and_no_name_is_left_out() -> None:
    policy_, refused = cluster.read({"metadata": {"name": "bad"}, "spec": "garbage"})
    assert policy_ is not None and policy_.closed == {"Ingress", "Egress"}
    assert "spec" in {r.field for r in refused}
    d, t = compile.decide([], world_pods(), namespaces(), ME), tiers.decide([policy_], world_pods(),
                                                                             namespaces(), ME)
    assert not compiled(d, t, "x/a", "y/a", "TCP", 80) and compiled(d, t, "z/a", "z/b", "TCP", 80)
    assert cluster.read({"metadata": {"namespace": "x"}, "spec": {}})[0] is None


def test_the_closed_form_renders_a_drop_at_the_policys_place() -> None:
    from cni_plugin.node.netpol.nft import ruleset, stable_names

    bad = cluster.read(cnp("bad", "Admin", 5, ns("x"), ingress=[{"action": "Drop", "from": [ns("y")]}]))[0]
    assert bad is not None
    text = ruleset(compile.decide([], world_pods(), namespaces(), ME),
                   tiers=tiers.decide([bad], world_pods(), namespaces(), ME))
    chain = stable_names("c", ["bad"])["bad"] + "_ingress"
    assert f'\tchain {chain} {{\n\t\tcomment "bad refused: spec.ingress.0.action"\n\t\tdrop\n\t}}' in text


# --- the node controller: logged with name and field, counted, the others applied; resync without a gap

def _agent_with(cluster_objs: list[dict[str, Any]]) -> tuple[Any, Any, list[str]]:
    from .test_refused import _agent

    nps = [{"metadata": {"name": "deny-b", "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {"pod": "b"}}}}]
    return _agent(nps, cluster=cluster_objs)


def test_the_agent_logs_and_counts_a_refused_policy_and_applies_the_others() -> None:
    from prometheus_client import CollectorRegistry

    from cni_plugin.ops.node_metrics import NodeMetrics

    bad = cnp("bad", "Admin", 5, ns("y"), ingress=[{"action": "Accept", "from": [ns("x")],
                                                    "protocols": [tcp(70000)]}])
    good = cnp("good", "Admin", 1, ns("x"), egress=[{"action": "Deny", "to": [ns("z")]}])
    _, seen, applied = _agent_with([bad, good])
    field = "spec.ingress.0.protocols.0.tcp.destinationPort.number"
    logged = [f for event, f in seen.logs if event == "netpol-refused"]
    assert [(f["kind"], f["object"], f["field"], f["kept"]) for f in logged] == [
        ("ClusterNetworkPolicy", "bad", field, True)]
    assert [(f["kind"], f["policy"], f["field"]) for event, f in seen.logs if event == "netpol-closed"] == [
        ("ClusterNetworkPolicy", "bad", field)]
    assert seen.closed[-1] == {"invalid": 1, "not-compiled": 0}
    assert [r.kind for r in seen.refusals] == ["ClusterNetworkPolicy"]
    text = applied[-1]
    assert f'comment "bad refused: {field}"' in text and 'comment "good"' in text
    assert 'comment "x/deny-b"' in text  # the NetworkPolicy still applies
    registry = CollectorRegistry()
    metrics = NodeMetrics(registry, "/nonexistent")
    for refusal in seen.refusals:
        metrics.field_refused(refusal)
    assert registry.get_sample_value("pybridge_netpol_refused_fields_total",
                                     {"kind": "ClusterNetworkPolicy"}) == 1


def test_a_lost_watch_keeps_the_rules_until_the_relist_replaces_them() -> None:
    """list_watch relists after a lost watch: until its SYNC the rules in force stay (no event
    empties the cache); the SYNC drops what was deleted meanwhile, and a deleted policy opens."""
    deny = cnp("deny", "Admin", 1, ns("x"), ingress=[{"action": "Deny", "from": [ns("y")]}])
    agent, _seen, applied = _agent_with([deny])
    assert '"deny"' in applied[-1]
    agent.handle("Pod", "SYNC", [p.model_dump(by_alias=True, mode="json") for p in world_pods()])
    assert agent.reconcile() and '"deny"' in applied[-1]  # another kind's relist: still enforced
    agent.handle("ClusterNetworkPolicy", "SYNC", [deny])  # a relist that still has it: unchanged
    assert agent.reconcile() and applied[-1] == applied[-2]
    agent.handle("ClusterNetworkPolicy", "SYNC", [])  # deleted while the watch was down
    assert agent.reconcile() and '"deny"' not in applied[-1] and "c0_ingress" not in applied[-1]
    agent.handle("ClusterNetworkPolicy", "ADDED", deny)
    assert agent.reconcile() and '"deny"' in applied[-1]
    agent.handle("ClusterNetworkPolicy", "DELETED", deny)
    assert agent.reconcile() and '"deny"' not in applied[-1]


def test_nothing_is_applied_before_the_cluster_policies_are_listed() -> None:
    from cni_plugin.node.netpol.policy_controller import PolicyController

    applied: list[str] = []
    agent = PolicyController(ME, applied.append, lambda *_a, **_k: None)
    for kind in ("NetworkPolicy", "Pod", "Namespace"):
        agent.handle(kind, "SYNC", [])
    assert not agent.reconcile() and applied == []  # an Admin Deny could be missing yet
    agent.handle("ClusterNetworkPolicy", "SYNC", [])
    assert agent.reconcile() and len(applied) == 1


def test_the_chains_an_admin_pass_and_a_baseline_pass_render() -> None:
    """An Admin Pass is a goto to the rest of the pod's plan (NetworkPolicies, else Baseline),
    one copy of the policy per rest; a Baseline Pass accepts; both tables get the plans."""
    from cni_plugin.node.netpol.nft import ruleset, stable_names

    admin = cnp("admin", "Admin", 1, ns("x"), ingress=[{"action": "Pass", "from": [ns("y")]},
                                                       {"action": "Deny", "from": [{"namespaces": {}}]}])
    base = cnp("base", "Baseline", 1, ns("x"), ingress=[{"action": "Pass", "from": [ns("y")]}])
    np = policy("x", {"podSelector": {"matchLabels": {"pod": "a"}}})
    d, t = build([admin, base], [np])
    xa = ipaddress.ip_address(v4("x/a"))
    ports = {xa: {"vethxa"}}
    text = ruleset(d, ports, t)
    p0, c0, c1 = stable_names("p", ["x/p"])["x/p"], *stable_names("c", ["admin", "base"]).values()
    np_chain = stable_names("ingress_", [f"jump {p0}_ingress\ndrop"]).popitem()[1]
    base_chain = stable_names("ingress_b", [f"jump {c1}_ingress\naccept"]).popitem()[1]
    assert f"\tchain {np_chain} {{\n\t\tjump {p0}_ingress\n\t\tdrop\n\t}}" in text  # x/a: its NetworkPolicy
    assert f"\tchain {base_chain} {{\n\t\tjump {c1}_ingress\n\t\taccept\n\t}}" in text  # x/b, x/c: Baseline
    assert f"\t\tgoto {np_chain}\n" in text and f"\t\tgoto {base_chain}\n" in text
    assert f"\tchain {c0}_ingress_{np_chain} {{" in text and f"\tchain {c0}_ingress_{base_chain} {{" in text
    assert f"\tchain {c1}_ingress {{" in text and f"ip saddr @{c1}_ingressr0_peer4 accept" in text
    bridge = text[text.index("table bridge"):]
    assert '"vethxa" : jump ingress_a' in bridge and f"goto {np_chain}" in bridge
