"""delta.diff between rulesets of nft.ruleset(): what an event changes is said as element and
chain operations, and what cannot be said so is left to a whole replacement (their effect in a
kernel: tests/netns/test_netpol_incremental.py)."""

from __future__ import annotations

import ipaddress

import pytest

from cni_plugin.node.netpol import apply, delta, nft
from cni_plugin.node.netpol.compile import Decision, PolicyRules, Rule
from cni_plugin.node.netpol.objects import Refusal
from cni_plugin.node.netpol.policy_controller import PolicyController

from .netpol_world import ME, namespaces, policy, world_pods

A4, B4, C4 = (ipaddress.ip_address(a) for a in ("10.0.0.2", "10.0.0.3", "10.0.0.4"))
DENY = PolicyRules("x/deny", ingress=(), egress=None)
WEB = PolicyRules("x/web", ingress=(Rule(peers=(ipaddress.ip_network("10.1.0.0/16"),),
                                         ranges=(("TCP", 80, 81),)),), egress=None)
TABLE = f"inet {nft.TABLE}"


def _diff(before: Decision, after: Decision) -> list[str]:
    change = delta.diff(delta.parse(nft.ruleset(before)), delta.parse(nft.ruleset(after)))
    assert change is not None
    return change.splitlines()


def test_parse_reads_back_the_sets_maps_and_chains() -> None:
    model = delta.parse(nft.ruleset(Decision((DENY, WEB), {A4: (0, 1), B4: (0,)}, {})))
    assert set(model) == {("inet", nft.TABLE), ("bridge", nft.TABLE)}
    inet = model[("inet", nft.TABLE)]
    assert inet["ingress4"].kind == "map" and inet["ingress4"].header == ("type ipv4_addr : verdict",)
    assert {e.split(" : ")[0] for e in inet["ingress4"].body} == {"10.0.0.2", "10.0.0.3"}
    forward = inet["forward_ingress"]
    assert forward.header == ("type filter hook forward priority filter + 1; policy accept;",)
    assert forward.body[:2] == ("icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept",
                               "ct state established,related accept")  # no fence here
    ports = [b for b in inet.values() if b.body == ("tcp . 80-81",)]
    assert len(ports) == 1 and ports[0].header == ("type inet_proto . inet_service", "flags interval")


def test_the_same_ruleset_is_no_change() -> None:
    decision = Decision((DENY, WEB), {A4: (0, 1), B4: (0,)}, {})
    assert _diff(decision, decision) == []


def test_a_pod_coming_and_going_is_element_operations_only() -> None:
    before = Decision((DENY, WEB), {A4: (0, 1)}, {})
    after = Decision((DENY, WEB), {A4: (0, 1), B4: (0, 1)}, {})
    added = _diff(before, after)
    assert len(added) == 1
    assert added[0].startswith(f"add element {TABLE} ingress4 {{ 10.0.0.3 : jump ingress_")
    assert _diff(after, before) == [f"delete element {TABLE} ingress4 {{ 10.0.0.3 }}"]


def test_a_pod_changing_combination_gets_its_new_chain_and_the_old_one_goes() -> None:
    before = Decision((DENY, WEB), {A4: (0,)}, {})
    after = Decision((DENY, WEB), {A4: (0, 1)}, {})
    change = _diff(before, after)
    new_chain = [c for c in change if c.startswith(f"add chain {TABLE} ingress_")]
    old_chain = [c for c in change if c.startswith(f"delete chain {TABLE} ingress_")]
    assert len(new_chain) == len(old_chain) == 1
    # the map's element is replaced (by its key) before the old chain goes, after the new one came
    delete_element = change.index(f"delete element {TABLE} ingress4 {{ 10.0.0.2 }}")
    add_element = next(i for i, c in enumerate(change) if c.startswith(f"add element {TABLE} ingress4"))
    assert change.index(new_chain[0]) < add_element and delete_element < change.index(old_chain[0])
    assert not any(c.startswith(("flush chain", "add rule")) and c.split()[4].startswith("p") for c in change)


def test_a_policy_change_touches_only_its_own_chain_and_sets() -> None:
    changed = PolicyRules("x/web", ingress=(Rule(peers=(ipaddress.ip_network("10.2.0.0/16"),),
                                                 ranges=(("TCP", 80, 81), ("UDP", 53, 53))),
                                            Rule(peers=None, ranges=(("TCP", 443, 443),))), egress=None)
    other = PolicyRules("x/other", ingress=(Rule(peers=(ipaddress.ip_network("10.3.0.0/16"),),
                                                 ranges=None),), egress=None)
    change = _diff(Decision((DENY, other, WEB), {A4: (0, 1, 2), B4: (0, 1)}, {}),
                   Decision((DENY, other, changed), {A4: (0, 1, 2), B4: (0, 1)}, {}))
    web = nft.stable_names("p", ["x/deny", "x/other", "x/web"])["x/web"] + "_ingress"
    named = {c.split()[4] for c in change if c.split()[1] in ("chain", "rule", "element")}
    assert named and all(n.startswith(web) for n in named), change
    assert f"flush chain {TABLE} {web}" in change  # a rule more: the chain is written again
    assert f"delete element {TABLE} {web}0_peer4 {{ 10.1.0.0/16 }}" in change  # its sets changed in place
    assert not any(c.startswith("delete chain") or c.split()[1] == "table" for c in change)


def test_a_policy_added_brings_its_chain_and_the_combination_that_jumps_to_it() -> None:
    change = _diff(Decision((DENY,), {A4: (0,)}, {}), Decision((DENY, WEB), {A4: (0, 1)}, {}))
    web = nft.stable_names("p", ["x/deny", "x/web"])["x/web"] + "_ingress"
    assert f'add chain {TABLE} {web} {{ comment "x/web" ; }}' in change
    assert any(c.startswith(f"add rule {TABLE} {web} ip saddr @{web}0_peer4") for c in change)
    assert any(c.startswith(f"add set {TABLE} {web}0_ports {{ type inet_proto . inet_service ; flags "
                            "interval ; }") for c in change)
    # the sets exist before the rules naming them, the rules before the chains jumping there go
    first_rule = next(i for i, c in enumerate(change) if c.startswith("add rule"))
    assert all(i < first_rule for i, c in enumerate(change) if c.startswith(("add set", "add chain")))
    assert change[-1].startswith(f"delete chain {TABLE} ingress_")


def test_what_is_not_a_change_of_elements_or_chains_is_a_whole_replacement() -> None:
    one = delta.parse(nft.ruleset(Decision((DENY,), {A4: (0,)}, {})))
    refused = PolicyRules("x/deny", ingress=(), egress=None,
                          refused=(Refusal("NetworkPolicy", "x/deny", "spec.ingress", "bad"),))
    assert delta.diff(one, delta.parse(nft.ruleset(Decision((refused,), {A4: (0,)}, {})))) is None  # comment
    inet_only = {k: v for k, v in one.items() if k[0] == "inet"}
    assert delta.diff(inet_only, one) is None  # a table appears
    base = dict(one[("inet", nft.TABLE)])
    base["forward_ingress"] = delta.Block("chain", ("type filter hook forward priority 5; policy accept;",),
                                          base["forward_ingress"].body)
    assert delta.diff(one, {**one, ("inet", nft.TABLE): base}) is None  # a base chain's hook
    retyped = dict(one[("inet", nft.TABLE)])
    retyped["ingress4"] = delta.Block("map", ("type ipv4_addr : verdict", "flags interval"), ())
    assert delta.diff(one, {**one, ("inet", nft.TABLE): retyped}) is None  # a set's type


def test_names_are_stable_and_distinct() -> None:
    names = nft.stable_names("p", ["x/a", "x/b", "x/a"])
    assert names == {k: v for k, v in nft.stable_names("p", ["x/b", "x/a", "y/c"]).items() if k != "y/c"}
    assert names["x/a"] == nft.stable_names("p", ["x/a", "y/z"])["x/a"]
    assert len(set(names.values())) == 2 and all(n.startswith("p") and len(n) <= 16 for n in names.values())


def _agent(scripts: list[str], fail: set[str]) -> PolicyController:
    def apply_script(script: str) -> None:
        scripts.append(script)
        if any(marker in script for marker in fail):
            raise apply.NftError("refused")

    agent = PolicyController(ME, apply_script, lambda *_a, **_k: None)
    for kind, items in (("NetworkPolicy", []), ("Pod", world_pods()), ("Namespace", namespaces()),
                        ("ClusterNetworkPolicy", [])):
        agent.handle(kind, "SYNC", [i.model_dump(by_alias=True, mode="json") for i in items])
    return agent


DENY_X = policy("x", {"podSelector": {}, "policyTypes": ["Ingress"]}).model_dump(by_alias=True, mode="json")


def test_the_agent_replaces_whole_at_start_then_applies_changes() -> None:
    scripts: list[str] = []
    agent = _agent(scripts, set())
    assert agent.reconcile() and "delete table" in scripts[-1]
    agent.handle("NetworkPolicy", "ADDED", DENY_X)
    assert agent.reconcile() and "delete table" not in scripts[-1] and "add chain" in scripts[-1]
    full = agent.applied
    agent.handle("NetworkPolicy", "SYNC", [DENY_X])  # a relist: the whole ruleset again
    assert agent.reconcile() and scripts[-1] == full


def test_a_change_nft_refused_is_followed_by_the_whole_ruleset_at_once() -> None:
    scripts: list[str] = []
    agent = _agent(scripts, {"add element"})
    assert agent.reconcile()
    agent.handle("NetworkPolicy", "ADDED", DENY_X)
    assert agent.reconcile() and not agent.failed
    assert "add element" in scripts[-2] and "delete table" not in scripts[-2]  # the change, refused
    assert scripts[-1] == agent.applied and "delete table" in scripts[-1]  # then the whole, in force


def test_after_a_failed_apply_the_next_is_whole() -> None:
    scripts: list[str] = []
    agent = _agent(scripts, {"delete table", "add element"})
    assert not agent.reconcile() and agent.failed
    agent.apply_script = scripts.append
    agent.handle("NetworkPolicy", "ADDED", DENY_X)
    assert agent.reconcile() and "delete table" in scripts[-1]


def test_a_hash_shared_by_two_keys_still_gives_two_names(monkeypatch: pytest.MonkeyPatch) -> None:
    class Same:
        def __init__(self, *_a: object, **_k: object) -> None: ...
        def hexdigest(self) -> str:
            return "0000000000"

    monkeypatch.setattr(nft.hashlib, "blake2b", Same)
    assert nft.stable_names("p", ["y/b", "x/a"]) == {"x/a": "p0000000000", "y/b": "p0000000000x1"}


def test_a_policy_newly_refused_is_applied_by_a_whole_replacement() -> None:
    """Its chain's comment names the refused field (`pybridge doctor` reads it): a comment cannot
    be changed in place, so the tables are replaced whole, and the policy closes its pods."""
    scripts: list[str] = []
    agent = _agent(scripts, set())
    agent.handle("NetworkPolicy", "ADDED", DENY_X)
    agent.reconcile()
    agent.handle("NetworkPolicy", "MODIFIED", {**DENY_X, "spec": {
        "podSelector": {}, "ingress": [{"ports": [{"port": 70000}]}]}})
    assert agent.reconcile()
    assert scripts[-1] == agent.applied and "delete table" in scripts[-1]
    assert 'comment "x/p refused: spec.ingress.0.ports.0.port"' in scripts[-1]
