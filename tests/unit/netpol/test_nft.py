"""nft.ruleset on hand-built decisions: the text nft gets (its loading and effect on packets are
checked in real kernels by tests/netns/test_netpol.py)."""

from __future__ import annotations

import ipaddress

from cni_plugin.node.netpol.compile import Decision, PolicyRules, Rule
from cni_plugin.node.netpol.nft import TABLE, removal, ruleset, stable_names

A4, A6, B4 = (ipaddress.ip_address(a) for a in ("10.0.0.2", "fd00::2", "10.0.0.3"))
# Chains are named by a hash of what they are (stable_names): the policies' by their names,
# a combination's by its body.
P = stable_names("p", ["x/deny", "x/web"])
DENY, WEB = P["x/deny"], P["x/web"]
BOTH = stable_names("ingress_", [f"jump {DENY}_ingress\njump {WEB}_ingress\ndrop"]).popitem()[1]
ONLY = stable_names("ingress_", [f"jump {DENY}_ingress\ndrop"]).popitem()[1]


def test_one_transaction_replacing_the_table() -> None:
    text = ruleset(Decision((), {}, {}))
    assert text.startswith(f"add table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n")
    assert removal() == (f"add table inet {TABLE}\ndelete table inet {TABLE}\n"
                         f"add table bridge {TABLE}\ndelete table bridge {TABLE}\n")
    assert f"add table bridge {TABLE}\ndelete table bridge {TABLE}\ntable bridge {TABLE} {{\n" in text
    # egress judged before ingress, replies of accepted connections first in both
    egress, ingress = text.index("chain forward_egress"), text.index("chain forward_ingress")
    assert egress < ingress
    assert "priority filter - 1;" in text[egress:ingress] and "priority filter + 1;" in text[ingress:]
    # what a pod sends to its own node is judged as egress too, by the same maps (input hook)
    to_node = text[text.index("chain input_egress"):]
    to_node = to_node[:to_node.index("\n\t}")]
    assert "hook input priority filter;" in to_node
    assert "ip saddr vmap @egress4" in to_node and "ip6 saddr vmap @egress6" in to_node
    assert text.count("ct state established,related accept") == 3
    # address resolution passes, in both tables; a pod's router advertisement or redirect is judged
    assert text.count("icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept") == 5
    assert "router" not in text and "redirect" not in text


def test_verdict_maps_per_pod_and_chains_per_combination_of_policies() -> None:
    deny = PolicyRules("x/deny", ingress=(), egress=None)
    web = PolicyRules("x/web", ingress=(Rule(peers=None, ranges=(("TCP", 80, 81),)),), egress=None)
    text = ruleset(Decision((deny, web), {A4: (0, 1), A6: (0, 1), B4: (0,)}, {}))
    # one chain per distinct combination, shared by its pods
    assert f"elements = {{ 10.0.0.2 : jump {BOTH}, 10.0.0.3 : jump {ONLY} }}" in text
    assert f"elements = {{ fd00::2 : jump {BOTH} }}" in text
    assert f"\tchain {BOTH} {{\n\t\tjump {DENY}_ingress\n\t\tjump {WEB}_ingress\n\t\tdrop\n\t}}" in text
    assert f"\tchain {ONLY} {{\n\t\tjump {DENY}_ingress\n\t\tdrop\n\t}}" in text
    assert f'\tchain {DENY}_ingress {{\n\t\tcomment "x/deny"\n\t}}' in text  # no rule: allows nothing
    assert "elements = { tcp . 80-81 }" in text
    assert f"\t\tmeta l4proto . th dport @{WEB}_ingress0_ports accept\n" in text


def test_the_bridge_table_judges_by_port_what_is_not_addressed_to_the_ports_own_addresses() -> None:
    deny = PolicyRules("x/deny", ingress=(), egress=None)
    web = PolicyRules("x/web", ingress=(Rule(peers=None, ranges=(("TCP", 80, 81),)),),
                      egress=(Rule(None, None),))
    ports = {A4: {"vetha"}, A6: {"vetha"}, B4: {"vethb", "veth;drop"},
             ipaddress.ip_address("10.0.0.9"): {"vethc"}}
    text = ruleset(Decision((deny, web), {A4: (0, 1), A6: (0, 1), B4: (0,)}, {B4: (1,)}), ports)
    bridge = text[text.index(f"table bridge {TABLE} {{"):]
    assert f'elements = {{ "vetha" : jump {BOTH}, "vethb" : jump {ONLY} }}' in bridge
    egress = stable_names("egress_", [f"jump {WEB}_egress\ndrop"]).popitem()[1]
    assert f'elements = {{ "vethb" : jump {egress} }}' in bridge
    assert 'elements = { "vetha" . 10.0.0.2, "vethb" . 10.0.0.3 }' in bridge  # 10.0.0.9: selected by none
    assert 'elements = { "vetha" . fd00::2 }' in bridge
    assert "veth;drop" not in text  # a port name nft could misread is left out
    assert "\t\toifname . ip daddr @own4 accept\n\t\toifname . ip6 daddr @own6 accept\n" in bridge
    assert "\t\tmeta protocol { ip, ip6 } oifname vmap @ingress_ports\n" in bridge
    assert "\t\tiifname . ip saddr @own4 accept\n" in bridge
    assert "\t\ticmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept\n" in bridge
    assert f"\tchain {BOTH} {{\n\t\tjump {DENY}_ingress\n\t\tjump {WEB}_ingress\n\t\tdrop\n\t}}" in bridge
    assert f"\t\tmeta l4proto . th dport @{WEB}_ingress0_ports accept\n" in bridge
    assert "ct state" not in bridge  # the bridge family has no conntrack
    no_ports = ruleset(Decision((deny,), {A4: (0,)}, {}))
    assert "jump" not in no_ports[no_ports.index("table bridge"):]


def test_peers_per_family_and_named_ports_on_the_destination() -> None:
    peers = tuple(ipaddress.ip_network(n) for n in ("10.1.0.0/16", "fd01::/64"))
    rule = Rule(peers=peers, ranges=(), named=((A4, "UDP", 53),))
    text = ruleset(Decision((PolicyRules("x/dns", ingress=None, egress=(rule,)),), {}, {A4: (0,)}))
    dns = stable_names("p", ["x/dns"])["x/dns"]
    assert (f"ip daddr @{dns}_egress0_peer4 ip daddr . meta l4proto . th dport @{dns}_egress0_named4 accept"
            in text)
    assert "elements = { 10.0.0.2 . udp . 53 }" in text
    assert f"{dns}_egress0_named6" not in text  # no IPv6 named port: an IPv6 peer matches no port
    assert f"ip6 daddr @{dns}_egress0_peer6" not in text
    assert "ip saddr vmap @egress4" in text


def test_peers_of_one_family_allow_nothing_in_the_other() -> None:
    only_v4 = Rule(peers=(ipaddress.ip_network("10.1.0.0/16"),), ranges=None)
    text = ruleset(Decision((PolicyRules("x/v4", ingress=(only_v4,), egress=None),), {A6: (0,)}, {}))
    v4 = stable_names("p", ["x/v4"])["x/v4"]
    assert f"\t\tip saddr @{v4}_ingress0_peer4 accept\n" in text and "ip6 saddr @p" not in text


def test_a_hostile_policy_name_cannot_leave_its_comment() -> None:
    evil = PolicyRules('x/a" ; flush ruleset ; "', ingress=(), egress=None)
    text = ruleset(Decision((evil,), {A4: (0,)}, {}))
    assert 'comment "x/a????flush?ruleset????"' in text and "flush ruleset" not in text


def test_rules_do_not_grow_with_pods_only_set_elements_do() -> None:
    from cni_plugin.node.netpol.compile import decide
    from cni_plugin.node.netpol.objects import NetworkPolicy, Pod

    def pods(count: int) -> list[Pod]:
        def ip(k: int, i: int) -> str:
            return f"10.{k}.{i // 200}.{i % 200 + 1}"

        return [Pod.model_validate({"metadata": {"name": f"p{i}", "namespace": ns, "labels": {"app": "web"}},
                                    "spec": {"nodeName": "n1"},
                                    "status": {"phase": "Running", "podIPs": [{"ip": ip(k, i)}]}})
                for k, ns in enumerate(("x", "y")) for i in range(count)]

    policy = NetworkPolicy.model_validate({
        "metadata": {"name": "web", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress", "Egress"],
                 "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 80}]}],
                 "egress": [{"to": [{"podSelector": {}}]}]}})

    def rules(count: int) -> list[str]:
        text = ruleset(decide([policy], pods(count), [], "n1"))
        return [line for line in text.splitlines() if line.endswith(("accept", "drop")) or "jump p" in line]

    assert rules(10) == rules(300)  # 10 or 300 pods a side: the same rules, bigger sets and maps
