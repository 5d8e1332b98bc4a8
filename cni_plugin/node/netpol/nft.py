"""A Decision rendered as one nftables script that replaces the table `inet pybridge_netpol`.

Layout (per packet: two verdict-map lookups and the set lookups of the selecting policies,
never one rule per pod pair):
- base chain `forward_egress` (forward hook, before `forward_ingress`): replies of accepted
  connections pass (conntrack established/related); else the source address is looked up in
  the verdict maps @egress4/@egress6 of this node's pods selected for egress, which jump to the
  chain of the pod's combination of policies; that chain jumps each policy's chain (a match
  accepts) and drops what none allowed. An accept ends this base chain only: the packet goes on to
- base chain `forward_ingress`: the same with the destination address and the ingress maps.
Pod to pod on the bridge crosses the forward hook through br_netfilter (bridge-nf-call-ip{,6}tables,
on by default, turned on by the agent where off); routed traffic to and from other nodes crosses it anyway.
Traffic between the node itself and its pods takes the input/output hooks and is never judged.
IPv6 neighbour discovery is never judged either: a pod that cannot resolve its peer cannot talk
at all, whatever the policy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .compile import Decision, PolicyRules, Rule
from .objects import Address

TABLE = "pybridge_netpol"
NFT_COMMENT = 128  # nft's longest comment
REFUSED = "refused:"  # in a policy chain's comment: the fields that made it allow nothing
_FAMILY = {4: "ip", 6: "ip6"}
_ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
_ND = "nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert, nd-redirect"


def _set(name: str, type_: str, elements: Iterable[str], interval: bool, kind: str = "set") -> list[str]:
    items = list(elements)
    lines = [f"\t{kind} {name} {{", f"\t\ttype {type_}"]
    if interval:
        lines.append("\t\tflags interval")
    if items:
        lines.append(f"\t\telements = {{ {', '.join(items)} }}")
    return [*lines, "\t}"]


def _printable(name: str) -> str:
    """A policy's namespace/name as an nft comment: the API allows only [a-z0-9.-] in both, but
    a hostile source could send anything, and a quote would end the comment."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "./-_") else "?" for c in name)[:120]


def _comment(policy: PolicyRules) -> str:
    """The policy's name, and the fields that closed it (`pybridge doctor` reads them)."""
    if not policy.refused:
        return _printable(policy.name)
    fields = " ".join(sorted({_printable(r.field) for r in policy.refused}))
    return f"{_printable(policy.name)} {REFUSED} {fields}"[:NFT_COMMENT]


def _port(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


class _Script:
    def __init__(self) -> None:
        self.sets: list[str] = []
        self.chains: list[str] = []
        self.known: dict[tuple[str, bool, tuple[str, ...]], str] = {}

    def shared(self, name: str, type_: str, elements: Iterable[str], interval: bool) -> str:
        """The name of a set with these elements: rules naming the same peers or ports (all pods
        of a namespace, say) share the set of the first one."""
        key = (type_, interval, tuple(elements))
        if key not in self.known:
            self.known[key] = name
            self.sets += _set(name, type_, key[2], interval)
        return self.known[key]

    def rule_lines(self, prefix: str, rule: Rule, peer_side: str) -> list[str]:
        """nft rules accepting what `rule` allows; the peer is the packet's `peer_side` (saddr/daddr)."""
        port_matches: dict[int, list[str]] = {4: [], 6: []}
        if rule.ranges:
            ports = self.shared(f"{prefix}_ports", "inet_proto . inet_service",
                                (f"{p.lower()} . {_port(a, b)}" for p, a, b in rule.ranges), interval=True)
            for version in (4, 6):
                port_matches[version].append(f"meta l4proto . th dport @{ports}")
        for version in (4, 6):
            named = [n for n in rule.named if n[0].version == version]
            if named:
                name = self.shared(f"{prefix}_named{version}",
                                   f"{_ADDR_TYPE[version]} . inet_proto . inet_service",
                                   (f"{a} . {p.lower()} . {n}" for a, p, n in named), interval=False)
                port_matches[version].append(f"{_FAMILY[version]} daddr . meta l4proto . th dport @{name}")
        lines: list[str] = []
        for version in (4, 6):
            if rule.peers is None:
                peer = ""
            else:
                peers = [str(n) for n in rule.peers if n.version == version]
                if not peers:
                    continue  # peers given, none of this family: nothing allowed in it
                name = self.shared(f"{prefix}_peer{version}", _ADDR_TYPE[version], peers, interval=True)
                peer = f"{_FAMILY[version]} {peer_side} @{name}"
            for ports in ([""] if rule.ranges is None else port_matches[version]):
                line = "\t\t" + " ".join(filter(None, (peer, ports, "accept")))
                if line not in lines:
                    lines.append(line)
        return lines

    def policy_chain(self, chain: str, policy: PolicyRules, rules: Iterable[Rule], peer_side: str) -> None:
        body = [line for k, rule in enumerate(rules)
                for line in self.rule_lines(f"{chain}{k}", rule, peer_side)]
        self.chains += [f"\tchain {chain} {{", f'\t\tcomment "{_comment(policy)}"', *body, "\t}"]

    def dispatch(self, direction: str, selected: Mapping[Address, tuple[int, ...]], key: str,
                 priority: str) -> None:
        """The per-combination chains, the verdict maps from pod address to them, the base chain."""
        combos = {c: k for k, c in enumerate(sorted(set(selected.values())))}
        for combo, k in combos.items():
            jumps = [f"\t\tjump p{i}_{direction}" for i in combo]
            self.chains += [f"\tchain {direction}_{k} {{", *jumps, "\t\tdrop", "\t}"]
        for version in (4, 6):
            elements = [f"{a} : jump {direction}_{combos[c]}"
                        for a, c in sorted((a, c) for a, c in selected.items() if a.version == version)]
            self.sets += _set(f"{direction}{version}", f"{_ADDR_TYPE[version]} : verdict", elements,
                              interval=False, kind="map")
        self.chains += [f"\tchain forward_{direction} {{",
                        f"\t\ttype filter hook forward priority {priority}; policy accept;",
                        "\t\tct state established,related accept",
                        f"\t\ticmpv6 type {{ {_ND} }} accept",
                        f"\t\tip {key} vmap @{direction}4",
                        f"\t\tip6 {key} vmap @{direction}6",
                        "\t}"]


def ruleset(decision: Decision) -> str:
    """The whole table, replaced in one transaction (add + delete + define is idempotent)."""
    script = _Script()
    for i, policy in enumerate(decision.policies):
        if policy.ingress is not None:
            script.policy_chain(f"p{i}_ingress", policy, policy.ingress, "saddr")
        if policy.egress is not None:
            script.policy_chain(f"p{i}_egress", policy, policy.egress, "daddr")
    script.dispatch("egress", decision.egress, "saddr", "filter - 1")
    script.dispatch("ingress", decision.ingress, "daddr", "filter + 1")
    return "\n".join([f"add table inet {TABLE}", f"delete table inet {TABLE}", f"table inet {TABLE} {{",
                      *script.sets, *script.chains, "}", ""])


def removal() -> str:
    """Deletes the table if present (the add makes the delete never fail)."""
    return f"add table inet {TABLE}\ndelete table inet {TABLE}\n"
