"""NetworkPolicy fails closed: what the API server accepts is read as it reads it (leading zeros,
host bits), and what still cannot be read or compiled isolates the pods the policy selects in
the direction it is in, logged with the policy's name and the field and counted; a bad pod or
namespace field loses that object (or that address) only, never the rest.

Expected verdicts are written by hand from the API's rules on the x/y/z world of netpol_world.py.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from cni_plugin.node.netpol import compile, tiers
from cni_plugin.node.netpol.objects import Cause, Refusal, parse_address, parse_cidr
from cni_plugin.node.netpol.policy_controller import PolicyController

from .netpol_world import ME, namespaces, policy, v4, v6, verdict, world_pods

POD_A = {"matchLabels": {"pod": "a"}}
Y_PODS = {"y/a", "y/b", "y/c"}
ALL = [f"{ns}/{p}" for ns in "xyz" for p in "abc"]


def _ips(*pods: str, family: int = 4) -> set[str]:
    return {str(ipaddress.ip_address((v4 if family == 4 else v6)(p))) for p in pods}


def blocked_into(d: compile.Decision, target: str, family: int = 4) -> set[str]:
    return {s for s in ALL if s != target and not verdict(d, s, target, family=family)}


def blocked_out_of(d: compile.Decision, source: str) -> set[str]:
    return {t for t in ALL if t != source and not verdict(d, source, t)}


@pytest.mark.parametrize(("text", "network"), [
    ("10.0.5.1/24", "10.0.5.0/24"),  # host bits: the network
    ("010.000.005.000/024", "10.0.5.0/24"),  # leading zeros, read in decimal (not octal)
    ("10.0.0.08/30", "10.0.0.8/30"),
    ("fd00::1:5/112", "fd00::1:0/112"),
    ("::ffff:10.0.5.0/120", "10.0.5.0/24"),  # Go reads an IPv4-mapped prefix as the IPv4 one
    ("::ffff:010.0.5.0/120", "10.0.5.0/24"),
])
def test_cidrs_are_read_as_the_api_server_reads_them(text: str, network: str) -> None:
    assert parse_cidr(text) == ipaddress.ip_network(network)


@pytest.mark.parametrize("text", ["10.0.0.0/33", "10.0.0.0", "10.0.0.0/255.255.0.0", "fe80::/64%eth0",
                                  "fe80::%eth0/64", "256.0.0.0/8", "10.0.0.0/", 7, None])
def test_what_the_api_server_refuses_is_refused(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_cidr(text)


def test_addresses_read_leading_zeros_and_refuse_a_zone() -> None:
    assert parse_address("010.000.000.002") == ipaddress.ip_address("10.0.0.2")
    assert parse_address("::ffff:10.0.0.2") == ipaddress.ip_address("10.0.0.2")
    for bad in ("fd00::9%x", "fe80::1%eth0", "10.0.0.256", ""):
        with pytest.raises(ValueError, match="not an IP address"):
            parse_address(bad)


def test_except_with_host_bits_and_leading_zeros_is_the_api_servers_meaning() -> None:
    block = {"ipBlock": {"cidr": "010.0.0.0/16", "except": ["10.0.1.5/24"]}}
    d = compile.decide([policy("x", {"podSelector": POD_A, "ingress": [{"from": [block]}]})], world_pods(),
                       namespaces(), ME)
    assert blocked_into(d, "x/a") == Y_PODS  # 10.0.0.x and 10.0.2.x in, 10.0.1.x excepted


class Recorder:
    """The agent's log and observer."""

    def __init__(self) -> None:
        self.logs: list[tuple[str, dict[str, Any]]] = []
        self.refusals: list[Refusal] = []
        self.closed: list[dict[str, int]] = []
        self.applies: list[tuple[int, int]] = []  # (rules, elements)
        self.delays: list[float] = []
        self.failures = 0

    def log(self, event: str, **fields: Any) -> None:
        self.logs.append((event, fields))

    def field_refused(self, refusal: Refusal) -> None:
        self.refusals.append(refusal)

    def policies_refused(self, reasons: Mapping[str, int]) -> None:
        self.closed.append(dict(reasons))

    def applied(self, delays: Sequence[float], rules: int, elements: int) -> None:
        self.applies.append((rules, elements))
        self.delays += delays

    def apply_failed(self) -> None:
        self.failures += 1


def _agent(policies: list[dict[str, Any]], pods: list[dict[str, Any]] | None = None,
           spaces: list[dict[str, Any]] | None = None,
           cluster: list[dict[str, Any]] = ()) -> tuple[PolicyController, Recorder, list[str]]:  # type: ignore[assignment]
    seen = Recorder()
    applied: list[str] = []
    agent = PolicyController(ME, applied.append, seen.log, seen)
    agent.handle("NetworkPolicy", "SYNC", policies)
    agent.handle("Pod", "SYNC", [p.model_dump(by_alias=True, mode="json") for p in world_pods()]
                 if pods is None else pods)
    agent.handle("Namespace", "SYNC", [{"metadata": {"name": ns, "labels": {"ns": ns}}} for ns in "xyz"]
                 if spaces is None else spaces)
    agent.handle("ClusterNetworkPolicy", "SYNC", list(cluster))
    assert agent.reconcile()
    return agent, seen, applied


def _ingress_map(script: str, family: int = 4) -> set[str]:
    """The pod addresses the ruleset isolates for ingress (elements of its verdict map)."""
    body = script.split(f"map ingress{family} {{", 1)[1].split("}", 1)[0]
    elements = body.split("elements = {", 1)[1].split(",") if "elements = {" in body else []
    return {str(ipaddress.ip_address(e.split(" : ")[0].strip())) for e in elements}


BAD_SPECS = [  # each would make the API server refuse the policy, or is what nft cannot take
    ({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/33"]}}]}]},
     "spec.ingress.0.from.0.ipBlock.except.0"),
    ({"ingress": [{"from": [{"ipBlock": {"cidr": "fd00::/8%eth0"}}]}]}, "spec.ingress.0.from.0.ipBlock.cidr"),
    ({"ingress": [{"ports": [{"protocol": "ICMP"}]}]}, "spec.ingress.0.ports.0.protocol"),
    ({"ingress": [{"ports": [{"port": 70000}]}]}, "spec.ingress.0.ports.0.port"),
    ({"ingress": [{"ports": [{"port": 0}]}]}, "spec.ingress.0.ports.0.port"),
    ({"ingress": [{"ports": [{"port": 80, "endPort": 65536}]}]}, "spec.ingress.0.ports.0.endPort"),
    ({"ingress": [{"ports": [{"port": "http port"}]}]}, "spec.ingress.0.ports.0.port"),
    ({"ingress": [{"ports": [{"port": "80"}]}]}, "spec.ingress.0.ports.0.port"),  # a name needs a letter
    ({"ingress": [{"from": "everyone"}]}, "spec.ingress.0.from"),
]


@pytest.mark.parametrize(("spec", "field"), BAD_SPECS, ids=[f for _s, f in BAD_SPECS])
def test_an_unreadable_ingress_field_isolates_the_selected_pods(spec: dict[str, Any], field: str) -> None:
    """The rule of the bad field, and the others of its direction, allow nothing; the policy's
    pods are isolated all the same, and the policy and field are logged and counted."""
    good_rule: dict[str, Any] = {"from": [{"namespaceSelector": {}}]}  # would allow everyone, if it were read
    spec = {"podSelector": POD_A, "ingress": [*spec["ingress"], good_rule]}
    agent, seen, applied = _agent([{"metadata": {"name": "bad", "namespace": "x"}, "spec": spec}])
    assert _ingress_map(applied[-1]) == _ips("x/a")  # isolated; was open: the policy was dropped
    d = compile.decide(agent.objects["NetworkPolicy"].values(), world_pods(), namespaces(), ME)
    assert blocked_into(d, "x/a") == set(ALL) - {"x/a"}
    assert blocked_out_of(d, "x/a") == set()  # egress is not in its policyTypes
    assert [(r.name, r.field) for r in seen.refusals] == [("x/bad", field)]
    logged = [f for event, f in seen.logs if event == "netpol-refused"]
    assert [(f["object"], f["field"], f["kept"]) for f in logged] == [("x/bad", field, True)]
    assert [f["policy"] for event, f in seen.logs if event == "netpol-closed"] == ["x/bad"]
    assert seen.closed[-1] == {"invalid": 1, "not-compiled": 0}
    assert [r.cause for r in seen.refusals] == [Cause.INVALID]
    assert f'comment "x/bad refused: {field}"' in applied[-1]  # what `pybridge doctor` reads


def test_a_bad_egress_field_closes_egress_only() -> None:
    spec = {"podSelector": POD_A, "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
            "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["0.0.0.0/-1"]}}]}]}
    agent, seen, _applied = _agent([{"metadata": {"name": "p", "namespace": "x"}, "spec": spec}])
    d = compile.decide(agent.objects["NetworkPolicy"].values(), world_pods(), namespaces(), ME)
    assert blocked_into(d, "x/a") == set(ALL) - {"x/a", "x/b"}  # ingress read whole
    assert blocked_out_of(d, "x/a") == set(ALL) - {"x/a"}
    assert [r.field for r in seen.refusals] == ["spec.egress.0.to.0.ipBlock.except.0"]


def test_egress_rules_present_but_unreadable_still_make_it_an_egress_policy() -> None:
    """Without policyTypes a policy with egress rules affects egress: a bad one too."""
    spec = {"podSelector": POD_A, "egress": [{"ports": [{"protocol": "GRE"}]}]}
    agent, _seen, _applied = _agent([{"metadata": {"name": "p", "namespace": "x"}, "spec": spec}])
    d = compile.decide(agent.objects["NetworkPolicy"].values(), world_pods(), namespaces(), ME)
    assert blocked_out_of(d, "x/a") == set(ALL) - {"x/a"}
    assert blocked_into(d, "x/a") == set(ALL) - {"x/a"}


@pytest.mark.parametrize(("spec", "field"), [
    ({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "Like"}]},
      "ingress": [{"from": [{"podSelector": {}}]}]}, "spec.podSelector.matchExpressions.0.operator"),
    ({"podSelector": POD_A, "policyTypes": ["Sideways"]}, "spec.policyTypes.0"),
    ({"podSelector": POD_A, "policyTypes": "Egress"}, "spec.policyTypes"),
])
def test_unreadable_selection_or_types_close_the_widest(spec: dict[str, Any], field: str) -> None:
    """An unreadable podSelector selects every pod of the namespace; unreadable policyTypes mean
    both directions."""
    agent, seen, applied = _agent([{"metadata": {"name": "p", "namespace": "x"}, "spec": spec}])
    d = compile.decide(agent.objects["NetworkPolicy"].values(), world_pods(), namespaces(), ME)
    assert [r.field for r in seen.refusals] == [field]
    if "podSelector" in field:
        assert _ingress_map(applied[-1]) == _ips("x/a", "x/b", "x/c")
        assert blocked_into(d, "x/b") == {s for s in ALL if s != "x/b" and not s.startswith("x/")}
    else:
        assert blocked_into(d, "x/a") == blocked_out_of(d, "x/a") == set(ALL) - {"x/a"}


def test_a_policy_without_a_readable_name_is_left_out_and_counted() -> None:
    _, seen, applied = _agent([{"metadata": {"namespace": 5}, "spec": {}}])
    assert _ingress_map(applied[-1]) == set()
    assert {r.field for r in seen.refusals} == {"name", "namespace"}


def test_a_failure_to_compile_closes_the_direction(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: Any) -> compile.Rule:
        raise ArithmeticError("a bug")

    monkeypatch.setattr(compile, "_rule", broken)
    spec = {"podSelector": POD_A, "ingress": [{}]}  # allows everything, when compiled
    agent, seen, applied = _agent([{"metadata": {"name": "p", "namespace": "x"}, "spec": spec}])
    assert _ingress_map(applied[-1]) == _ips("x/a")
    closed = [f for event, f in seen.logs if event == "netpol-closed"]
    assert closed == [{"kind": "NetworkPolicy", "policy": "x/p", "field": "spec.ingress",
                       "error": "not compiled: ArithmeticError: a bug"}]
    assert 'comment "x/p refused: spec.ingress"' in applied[-1]
    assert seen.closed[-1] == {"invalid": 0, "not-compiled": 1}
    assert [r.cause for r in agent.closed] == [Cause.NOT_COMPILED]  # typed, whatever the message says
    agent.reconcile()  # logged once, not at every ruleset
    assert len([e for e, _f in seen.logs if e == "netpol-closed"]) == 1


def _pod(ns: str, name: str, ips: list[Any], **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {"name": name, "namespace": ns, "labels": {"pod": name}},
                           "spec": {"nodeName": ME}, "status": {"podIPs": [{"ip": ip} for ip in ips]}}
    for key, value in extra.items():
        obj[key].update(value)
    return obj


def test_a_scoped_pod_address_is_refused_and_the_rest_applies() -> None:
    """fd00::9%x once went into the nft script, which nft refused whole: enforcement froze."""
    others = [p.model_dump(by_alias=True, mode="json") for p in world_pods()
              if (p.metadata.namespace, p.metadata.name) != ("x", "a")]
    pods = [*others, _pod("x", "a", [v4("x/a"), "fd00::9%x"])]
    deny = {"metadata": {"name": "deny", "namespace": "x"}, "spec": {"podSelector": {}}}
    _, seen, applied = _agent([deny], pods)
    assert "%" not in applied[-1]
    assert _ingress_map(applied[-1]) == _ips("x/a", "x/b", "x/c")  # x/a isolated by its other IP
    assert _ingress_map(applied[-1], 6) == _ips("x/b", "x/c", family=6)
    assert [(r.kind, r.name, r.field) for r in seen.refusals] == [("Pod", "x/a", "status.podIPs.1.ip")]
    logged = [f for event, f in seen.logs if event == "netpol-refused"]
    assert logged[0]["object"] == "x/a" and logged[0]["kept"] is True


def test_malformed_pods_and_namespaces_are_left_out_alone() -> None:
    pods = [p.model_dump(by_alias=True, mode="json") for p in world_pods()]
    pods[0]["metadata"]["labels"] = {"pod": ["a"]}  # x/a: labels are strings: left out, counted
    pods[1]["spec"]["containers"] = [{"ports": [{"containerPort": "eighty"}]}]  # x/b: port dropped
    pods[2]["status"]["podIP"] = "not an ip"  # x/c: podIP dropped, podIPs kept
    spaces: list[dict[str, Any]] = [{"metadata": {"name": "x", "labels": {"ns": "x"}}},
                                    {"metadata": {"name": "y", "labels": 7}},
                                    {"metadata": {"name": "z", "labels": {"ns": "z"}}}]
    deny = {"metadata": {"name": "deny", "namespace": "x"}, "spec": {"podSelector": {}}}
    agent, seen, applied = _agent([deny], pods, spaces)
    assert _ingress_map(applied[-1]) == _ips("x/b", "x/c")
    assert set(agent.objects["Namespace"]) == {("", "x"), ("", "z")}
    assert sorted((r.kind, r.name, r.field.split(".")[0]) for r in seen.refusals) == [
        ("Namespace", "/y", "metadata"), ("Pod", "x/a", "metadata"), ("Pod", "x/b", "spec"),
        ("Pod", "x/c", "status")]
    assert [f["kept"] for e, f in seen.logs if e == "netpol-refused" and f["object"] == "x/a"] == [False]


def test_a_cluster_policy_failure_to_compile_is_counted_not_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: Any) -> tiers.TierRule:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(tiers, "_rule", broken)
    rule = {"action": "Accept", "from": [{"namespaces": {}}]}
    cnp = {"metadata": {"name": "c"},
           "spec": {"tier": "Admin", "priority": 1, "subject": {"namespaces": {}}, "ingress": [rule]}}
    agent, seen, _applied = _agent([], cluster=[cnp])
    assert [(r.kind, r.name, r.cause) for r in agent.closed] == [
        ("ClusterNetworkPolicy", "c", Cause.NOT_COMPILED)]
    assert seen.closed[-1] == {"invalid": 0, "not-compiled": 1}
