"""A Decision rendered as one nftables script that replaces the tables `inet pybridge_netpol` and
`bridge pybridge_netpol` in one transaction.

Layout (per packet: two verdict-map lookups and the set lookups of the selecting policies,
never one rule per pod pair):
- base chain `forward_egress` (forward hook, before `forward_ingress`): replies of accepted
  connections pass (conntrack established/related); else the source address is looked up in
  the verdict maps @egress4/@egress6 of this node's pods selected for egress, which jump to the
  chain of the pod's combination of policies; that chain jumps each policy's chain (a match
  accepts) and drops what none allowed. An accept ends this base chain only: the packet goes on to
- base chain `forward_ingress`: the same with the destination address and the ingress maps.
With ClusterNetworkPolicies (tiers.py) a pod's chain first jumps the chains of its Admin
policies (rules in order, each with its verdict: accept, drop, or for Pass a goto to the rest),
then goes to the rest: its NetworkPolicies' chain as above, or, if none selects it, a chain
jumping its Baseline policies' and accepting what they leave (a Baseline Pass accepts).
Pod to pod on the bridge crosses the forward hook through br_netfilter (bridge-nf-call-ip{,6}tables,
on by default, turned on by the agent where off); routed traffic to and from other nodes crosses it anyway.
Traffic between the node itself and its pods takes the input/output hooks: what the node sends
to its pods is never judged (the API exempts ingress from the pod's node: kubelet probes), what a
pod sends to its node is judged as egress by base chain `input_egress` (input hook), with the
same verdict maps: the API exempts no egress.
IPv6 neighbour solicitations and advertisements are never judged either: a pod that cannot
resolve its peer cannot talk at all, whatever the policy. Router solicitations, advertisements
and redirects between pods are judged like any packet (a pod's router is the node, whose
traffic takes the input/output hooks).

The inet table knows a pod by its API addresses only. What a pod receives at, or sends from, any
other address (its IPv6 link-local one, a broadcast or multicast address, an address it added
itself) is judged in the bridge table by the pod's bridge port, when the node controller found the
pod's API address on the pod side of that port (apply.pod_ports): base chains `forward_egress`
and `forward_ingress` of the bridge forward hook let frames whose source (egress) or destination
(ingress) is the port's own API address on to the inet table, pass IPv6 neighbour solicitations
and advertisements and non-IP frames (ARP), and send every other IP frame from or to the port of
an isolated pod through the same policy chains, looked up by port in @egress_ports and
@ingress_ports. The bridge family has no conntrack: such traffic passes only as new traffic the
policy allows, so replies to a pod's own link-local or multicast conversations do not (its API
addresses keep their conntrack in the inet table). A link-local source is never a pod peer: it
passes only a rule whose peers are all addresses or an ipBlock holding it.

With a Fence, a pod the node controller has not placed yet (not in @placed4/@placed6: its ADD gave it
an address the agent has not decided on) is isolated both ways from its first packet: a packet
from (to) the fence's bridge whose source (destination) is in the cluster's pod networks but not
placed is dropped in the inet table, before conntrack's established/related accept: an entry
left by the address's last pod passes no packet of a pod not placed (and the node controller deletes
such entries before it places the new pod: conntrack.py). (The bridge table cannot do the same for its other
addresses: naming the bridge of a port there needs `meta ibrname`, CONFIG_NFT_BRIDGE_META.)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from ...hostnet import NETPOL_REFUSED, NETPOL_TABLE
from .compile import Decision, PolicyRules, Rule
from .delta import Block, Model
from .objects import Address, Network
from .tiers import ClusterRules, Judges, Tiers, judged, merged
from .world import collapse

TABLE = NETPOL_TABLE
NFT_COMMENT = 128  # nft's longest comment
REFUSED = NETPOL_REFUSED  # in a policy chain's comment: the fields that made it allow nothing
_FAMILY = {4: "ip", 6: "ip6"}
_ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
_NEIGHBOUR = "nd-neighbor-solicit, nd-neighbor-advert"  # what address resolution needs between pods
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # a port name safe to quote in the script
_VERDICT = {"Accept": "accept", "Deny": "drop"}  # Pass: on to the next tier (Script.tier_chain)


@dataclass(frozen=True)
class Fence:
    """This node's bridge and the cluster's pod networks: what an unplaced pod's traffic is."""

    bridge: str
    networks: tuple[Network, ...]

    def valid(self) -> bool:
        return bool(_IFNAME.fullmatch(self.bridge)) and bool(self.networks)


def _set(type_: str, elements: Iterable[str], interval: bool, kind: str = "set") -> Block:
    header = (f"type {type_}", "flags interval") if interval else (f"type {type_}",)
    return Block(kind, header, tuple(elements))


def _printable(name: str) -> str:
    """A policy's namespace/name as an nft comment: the API allows only [a-z0-9.-] in both, but
    a hostile source could send anything, and a quote would end the comment."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "./-_") else "?" for c in name)[:120]


def _comment(policy: PolicyRules | ClusterRules) -> str:
    """The policy's name, and the fields that closed it (`pybridge doctor` reads them)."""
    if not policy.refused:
        return _printable(policy.name)
    fields = " ".join(sorted({_printable(r.field) for r in policy.refused}))
    return f"{_printable(policy.name)} {REFUSED} {fields}"[:NFT_COMMENT]


def stable_names(prefix: str, keys: Iterable[str]) -> dict[str, str]:
    """A name per key from its hash, the same in every ruleset holding the key, so that an update
    (delta.py) rewrites only what changed; a name already taken (a hash shared by two keys) gets
    a counter, in the order of the sorted keys."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for key in sorted(set(keys)):
        name = base = prefix + hashlib.blake2b(key.encode(), digest_size=5).hexdigest()
        count = 0
        while name in taken:
            count += 1
            name = f"{base}x{count}"
        taken.add(name)
        names[key] = name
    return names


@functools.lru_cache(maxsize=65536)
def _text(network: Network) -> str:
    """A network as nft reads it; remembered, as each ruleset names the same peers."""
    return str(network)


def _port(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


# an address's version, number and text, and the address: in order as the tuples sort
_Address = tuple[int, int, str, Address]
_Judged = tuple[Address, Judges]  # what tiers.judged() lists
SetKey = str  # a set's type, whether of intervals and its elements, joined: a str keeps its hash


@dataclass(frozen=True)
class _Recipe:
    """A policy's chain rendered on its own: the sets it names, each with the name it gave it,
    and the chain naming them so; and that chain with some sets named otherwise (those another
    chain gave its name first), by the renaming, as the next ruleset mostly renames the same."""

    policy: PolicyRules
    sets: tuple[tuple[str, SetKey, Block], ...]
    chain: Block
    renamed: dict[tuple[tuple[str, str], ...], Block] = dataclasses.field(default_factory=dict, compare=False)

    def named(self, renamed: dict[str, str]) -> Block:
        key = tuple(renamed.items())
        if key not in self.renamed:
            if len(self.renamed) >= 2:  # those of the last ruleset's tables (inet, bridge)
                self.renamed.clear()
            self.renamed[key] = dataclasses.replace(self.chain, body=tuple(
                " ".join(renamed.get(word, word) for word in line.split(" ")) for line in self.chain.body))
        return self.renamed[key]


@dataclass(frozen=True)
class _Dispatched:
    """What _Script.dispatch() or port_dispatch() wrote for one direction, and from what."""

    selected: object  # the addresses judged (tiers.judged), or each port's plan: by identity
    inputs: tuple[object, ...]  # the policies' chain names (by identity), then the rest of the arguments
    sets: dict[str, Block]
    chains: dict[str, Block]
    texts: dict[int, _Address]  # Chains.texts() of the selected addresses, by id()


@dataclass(frozen=True)
class _PortLayout:
    """What the bridge table keys on, from the ports and the addresses judged (by identity):
    each port's plan per direction, the ports' own addresses, and the policies they use."""

    inputs: tuple[object, ...]
    by_text: dict[str, tuple[str, ...]]  # of inputs[0]: each address's ports fit for the script, by its text
    combos: dict[str, dict[str, Judges]]
    own_keys: set[tuple[str, int, str]]  # port, version and text of each port's own addresses
    own: dict[int, Block]
    used: dict[str, set[int]]


class Chains:
    """The policy chains of the last ruleset, kept for the next while their PolicyRules is the
    same object (compile.Memo hands the same object back while what it read is the same), and
    the chain names of the last ruleset's policies."""

    def __init__(self) -> None:
        self.last: dict[str, _Recipe] = {}
        self.used: dict[str, _Recipe] = {}
        self.names: tuple[tuple[str, ...], list[str]] = ((), [])
        # each pod address's text, version and number, by id() of the address (which the entry
        # holds): a pod's address objects stay while the pod does, and hashing one is slow
        self.addresses: dict[int, _Address] = {}
        self.seen: dict[int, _Address] = {}
        # per direction: tiers.judged of a Decision map (the object, kept: compile._Selection
        # hands the same one back while no selection changed), and what dispatch() wrote for it
        self.judgements: dict[str, tuple[Mapping[Address, tuple[int, ...]], list[_Judged]]] = {}
        self.dispatched: dict[str, _Dispatched] = {}
        self.layout: _PortLayout | None = None  # the bridge table's, kept while its inputs are the same

    def judged(self, decision: Decision, tiers: Tiers, direction: str) -> list[_Judged]:
        """tiers.judged(), the same list while the direction's map is the same object and no
        ClusterNetworkPolicy judges (dispatch() then writes what it wrote last)."""
        policies = decision.ingress if direction == "ingress" else decision.egress
        last = self.judgements.get(direction)
        if last is not None and last[0] is policies and not tiers.policies:
            return last[1]
        found = judged(decision, tiers, direction)
        if tiers.policies:
            self.judgements.pop(direction, None)
        else:
            self.judgements[direction] = (policies, found)
        return found

    def texts(self, addresses: Iterable[Address]) -> list[_Address]:
        seen, last = self.seen, self.addresses
        found = []
        for address in addresses:
            entry = seen.get(id(address)) or last.get(id(address))
            if entry is None or entry[3] is not address:
                entry = (address.version, int(address), str(address), address)
            seen[id(address)] = entry
            found.append(entry)
        return found

    def policy_names(self, policies: tuple[PolicyRules, ...]) -> list[str]:
        """Each policy's chain name, less its direction (stable_names of their names)."""
        names = tuple(p.name for p in policies)
        if names != self.names[0]:
            by_name = stable_names("p", names)
            self.names = (names, [by_name[name] for name in names])
        return self.names[1]

    def get(self, chain: str, policy: PolicyRules) -> _Recipe | None:
        recipe = self.used.get(chain) or self.last.get(chain)
        return recipe if recipe is not None and recipe.policy is policy else None

    def done(self) -> None:
        """What this ruleset did not use goes."""
        self.last, self.used = self.used, {}
        self.addresses, self.seen = self.seen, {}


class _Script:
    def __init__(self, tiers: Tiers | None = None, chains: Chains | None = None) -> None:
        self.sets: dict[str, Block] = {}
        self.chains: dict[str, Block] = {}
        self.known: dict[SetKey, str] = {}
        self.tiers = tiers or Tiers()
        self.memo = chains or Chains()
        self.tier_chains: set[str] = set()
        # by id() of a tuple of peers, kept alive by the entry itself
        self.peer_texts: dict[tuple[int, int], tuple[tuple[Network, ...], list[str]]] = {}
        self.policy_names: list[str] = []  # each NetworkPolicy's chain name, less its direction
        by_name = stable_names("c", (p.name for p in self.tiers.policies))
        self.tier_names = [by_name[p.name] for p in self.tiers.policies]

    def texts(self, networks: tuple[Network, ...], version: int) -> list[str]:
        """The networks of a family as nft reads them, once per tuple: the compiler hands the
        same tuple to every rule naming the same peers (world.World.peers)."""
        key = (id(networks), version)
        if key not in self.peer_texts:
            self.peer_texts[key] = (networks, [_text(n) for n in networks if n.version == version])
        return self.peer_texts[key][1]

    def shared(self, name: str, type_: str, elements: Iterable[str], interval: bool) -> str:
        """The name of a set with these elements: rules naming the same peers or ports (all pods
        of a namespace, say) share the set of the first one."""
        items = tuple(elements)
        key = "\n".join((type_, str(interval), *items))
        if key not in self.known:
            self.known[key] = name
            self.sets[name] = _set(type_, items, interval)
        return self.known[key]

    def rule_lines(self, prefix: str, rule: Rule, peer_side: str, verdict: str = "accept") -> list[str]:
        """nft rules giving `verdict` to what `rule` matches; the peer is the packet's `peer_side`."""
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
                peers = self.texts(rule.peers, version)
                if not peers:
                    continue  # peers given, none of this family: nothing allowed in it
                name = self.shared(f"{prefix}_peer{version}", _ADDR_TYPE[version], peers, interval=True)
                peer = f"{_FAMILY[version]} {peer_side} @{name}"
            for ports in ([""] if rule.ranges is None else port_matches[version]):
                line = " ".join(filter(None, (peer, ports, verdict)))
                if line not in lines:
                    lines.append(line)
        return lines

    def policy_chain(self, chain: str, policy: PolicyRules, rules: Iterable[Rule], peer_side: str) -> None:
        """The chain and its sets, rendered alone once (Chains), then named as this ruleset's
        sets are: a set with the elements of one an earlier chain named is that one."""
        recipe = self.memo.get(chain, policy)
        if recipe is None:
            alone = _Script()
            alone.peer_texts = self.peer_texts
            body = tuple(line for k, rule in enumerate(rules)
                         for line in alone.rule_lines(f"{chain}{k}", rule, peer_side))
            sets = tuple((name, key, alone.sets[name]) for key, name in alone.known.items())
            recipe = _Recipe(policy, sets, Block("chain", (f'comment "{_comment(policy)}"',), body))
        self.memo.used[chain] = recipe
        renamed: dict[str, str] = {}
        for name, key, block in recipe.sets:
            known = self.known.setdefault(key, name)
            if known == name:
                self.sets[name] = block
            else:
                renamed[f"@{name}"] = f"@{known}"
        self.chains[chain] = recipe.named(renamed) if renamed else recipe.chain

    def tier_chain(self, i: int, direction: str, rest: str) -> str:
        """The chain of ClusterNetworkPolicy `i`: its rules in order, each with its action. A
        Pass of an Admin policy goes to `rest` (a chain that always ends in a verdict, so the
        goto never comes back), hence one copy of such a policy per `rest`."""
        policy = self.tiers.policies[i]
        passes = policy.tier == "Admin" and any(r.action == "Pass" for r in policy.rules(direction))
        chain = f"{self.tier_names[i]}_{direction}" + (f"_{rest}" if passes else "")
        if chain not in self.tier_chains:
            self.tier_chains.add(chain)
            peer_side = "saddr" if direction == "ingress" else "daddr"
            pass_to = f"goto {rest}" if passes else "accept"  # a Baseline Pass: on to the default, accept
            body = tuple(line for k, r in enumerate(policy.rules(direction))
                         for line in self.rule_lines(f"{chain}r{k}", r.rule, peer_side,
                                                     _VERDICT.get(r.action, pass_to)))
            self.chains[chain] = Block("chain", (f'comment "{_comment(policy)}"',), body)
        return chain

    def named_chains(self, prefix: str, bodies: Mapping[Judges, list[str]]) -> dict[Judges, str]:
        """A chain per distinct body, named by the body (stable_names); each plan's chain."""
        keys = {plan: "\n".join(body) for plan, body in bodies.items()}
        names = stable_names(prefix, keys.values())
        for key in sorted(set(keys.values()), key=names.__getitem__):
            self.chains[names[key]] = Block("chain", (), tuple(key.split("\n")))
        return {plan: names[key] for plan, key in keys.items()}

    def combo_chains(self, direction: str, selected: Iterable[Judges]) -> dict[Judges, str]:
        """A chain per plan judging a pod: the Admin policies' chains, then either its
        NetworkPolicies' (each one's chain, then drop) or the Baseline policies' (then accept).
        Named by what they jump to: a pod coming or going adds or drops no other pod's chain.
        In a set order: the first chain to name a set's elements names the set, and a set's order
        is not (Python 3.11 hashes None, in Judges, by its address)."""
        chosen = sorted(set(selected), key=_plan_order)
        rests = self.named_chains(f"{direction}_", {
            p: [*(f"jump {self.policy_names[i]}_{direction}" for i in p.policies), "drop"]
            for p in chosen if p.policies is not None})
        rests |= self.named_chains(f"{direction}_b", {
            p: [*(f"jump {self.tier_chain(i, direction, '')}" for i in p.baseline), "accept"]
            for p in chosen if p.policies is None})
        admins = self.named_chains(f"{direction}_a", {
            p: [*(f"jump {self.tier_chain(i, direction, rests[p])}" for i in p.admin), f"goto {rests[p]}"]
            for p in chosen if p.admin})
        return {p: admins.get(p, rests[p]) for p in chosen}

    def dispatch(self, direction: str, selected: Sequence[tuple[Address, Judges]], key: str, priority: str,
                 fence: Fence | None) -> None:
        """The per-plan chains, the verdict maps from pod address to them, the base chain."""
        self._kept(direction, selected, (self.policy_names, fence, key, priority),
                   lambda: self._dispatch(direction, selected, key, priority, fence))

    def _kept(self, name: str, selected: object, inputs: tuple[object, ...],
              write: Callable[[], list[_Address]]) -> None:
        """What `write` adds to the script (and the address texts it used), kept in Chains under
        `name`: written again as it was while `selected` and the policies' chain names (inputs[0])
        are the same objects and the rest of `inputs` equal; not with ClusterNetworkPolicies."""
        last = self.memo.dispatched.get(name)
        if (last is not None and last.selected is selected and last.inputs[0] is inputs[0]
                and last.inputs[1:] == inputs[1:] and not self.tiers.policies):
            self.sets.update(last.sets)
            self.chains.update(last.chains)
            self.memo.seen.update(last.texts)  # kept for the next ruleset, as texts() would
            return
        self.memo.dispatched.pop(name, None)
        sets, chains = set(self.sets), set(self.chains)
        texts = write()
        if not self.tiers.policies:
            self.memo.dispatched[name] = _Dispatched(
                selected, inputs, {n: b for n, b in self.sets.items() if n not in sets},
                {n: b for n, b in self.chains.items() if n not in chains}, {id(t[3]): t for t in texts})

    def _dispatch(self, direction: str, selected: Sequence[tuple[Address, Judges]], key: str, priority: str,
                  fence: Fence | None) -> list[_Address]:
        plans = {id(p): p for _a, p in selected}  # few objects (tiers.judges): by id(), unhashed
        chains = {id(p): chain for p, chain in self.combo_chains(direction, plans.values()).items()}
        texts = self.memo.texts(a for a, _plan in selected)
        rows = sorted(zip(texts, (chains[id(plan)] for _a, plan in selected), strict=True), key=_in_order)
        for version in (4, 6):
            elements = [f"{address[2]} : jump {chain}" for address, chain in rows if address[0] == version]
            self.sets[f"{direction}{version}"] = _set(f"{_ADDR_TYPE[version]} : verdict", elements,
                                                      interval=False, kind="map")
        lookup = (f"ip {key} vmap @{direction}4", f"ip6 {key} vmap @{direction}6")
        self.chains[f"forward_{direction}"] = Block("chain", (_hook("forward", priority),), (
            f"icmpv6 type {{ {_NEIGHBOUR} }} accept",
            # before conntrack: an entry left by the address's last pod is no pass
            *_unplaced(fence, "iifname" if key == "saddr" else "oifname", key),
            "ct state established,related accept", *lookup))
        if direction == "egress":  # the API exempts only ingress from the pod's own node
            self.chains["input_egress"] = Block("chain", (_hook("input", "filter"),), (*_NOT_JUDGED, *lookup))
        return texts

    def port_dispatch(self, direction: str, by_port: Mapping[str, Judges], side: str, key: str,
                      priority: str) -> None:
        """The bridge table's: a port's frames at other addresses than its own judged by its policies."""
        self._kept(f"ports_{direction}", by_port, (self.policy_names, side, key, priority),
                   lambda: self._port_dispatch(direction, by_port, side, key, priority))

    def _port_dispatch(self, direction: str, by_port: Mapping[str, Judges], side: str, key: str,
                       priority: str) -> list[_Address]:
        combos = self.combo_chains(direction, by_port.values())
        elements = [f'"{port}" : jump {combos[c]}' for port, c in sorted(by_port.items())]
        self.sets[f"{direction}_ports"] = _set("ifname : verdict", elements, interval=False, kind="map")
        self.chains[f"forward_{direction}"] = Block("chain", (_hook("forward", priority),), (
            f"icmpv6 type {{ {_NEIGHBOUR} }} accept",
            f"{side} . ip {key} @own4 accept",
            f"{side} . ip6 {key} @own6 accept",
            f"meta protocol {{ ip, ip6 }} {side} vmap @{direction}_ports"))
        return []


def _plan_order(plan: Judges) -> tuple[tuple[int, ...], bool, tuple[int, ...], tuple[int, ...]]:
    return plan.admin, plan.policies is None, plan.policies or (), plan.baseline


def _in_order(row: tuple[_Address, str]) -> int:
    """IPv4 first, then by number: one int, compared in C (tuples of tuples took ~1 ms at 750)."""
    return row[0][0] << 128 | row[0][1]


def _hook(hook: str, priority: str) -> str:
    return f"type filter hook {hook} priority {priority}; policy accept;"


# replies of accepted connections; neighbour discovery, without which a pod cannot talk at all
_NOT_JUDGED = ("ct state established,related accept", f"icmpv6 type {{ {_NEIGHBOUR} }} accept")


def _unplaced(fence: Fence | None, side: str, key: str) -> list[str]:
    """Drop what comes from (goes to) the bridge at a pod network address no pod was placed at."""
    if fence is None:
        return []
    lines = []
    for version in (4, 6):
        networks = [str(n) for n in collapse(fence.networks) if n.version == version]
        if networks:
            family = _FAMILY[version]
            lines.append(f'{side} "{fence.bridge}" {family} {key} {{ {", ".join(networks)} }}'
                         f" {family} {key} != @placed{version} drop")
    return lines


def _placed(decision: Decision, chains: Chains) -> dict[str, Block]:
    addresses = chains.texts(decision.placed)
    return {f"placed{version}": _set(_ADDR_TYPE[version], sorted(a[2] for a in addresses if a[0] == version),
                                     interval=False)
            for version in (4, 6)}


def _policy_chains(script: _Script, decision: Decision,
                   used: Mapping[str, Collection[int]] | None = None) -> None:
    """Each policy's chain per direction it affects (only the `used` ones, when given)."""
    script.policy_names = script.memo.policy_names(decision.policies)
    for i, policy in enumerate(decision.policies):
        for direction, rules, peer_side in (("ingress", policy.ingress, "saddr"),
                                            ("egress", policy.egress, "daddr")):
            if rules is not None and (used is None or i in used[direction]):
                script.policy_chain(f"{script.policy_names[i]}_{direction}", policy, rules, peer_side)


def _table(script: _Script) -> dict[str, Block]:
    return {**script.sets, **script.chains}


def _by_text(ports: Mapping[Address, Collection[str]]) -> dict[str, tuple[str, ...]]:
    """Each address's ports fit for the script, by the address's text: an ipaddress object
    hashes in Python, a str keeps its hash."""
    return {str(address): tuple(p for p in sorted(names) if _IFNAME.fullmatch(p))
            for address, names in ports.items()}


def _own_sets(own: set[tuple[str, int, str]]) -> dict[int, Block]:
    """The sets of each port's own addresses, by version: frames there are not judged again."""
    return {version: _set(f"ifname . {_ADDR_TYPE[version]}",
                          sorted(f'"{p}" . {t}' for p, v, t in own if v == version), interval=False)
            for version in (4, 6)}


def _port_layout(ports: Mapping[Address, Collection[str]], chains: Chains,
                 selected: Mapping[str, Sequence[tuple[Address, Judges]]]) -> _PortLayout:
    """For each port holding a selected pod's API address, that pod's plan (a port holding several
    pods' addresses is judged by all their policies); the same object while the ports and the
    selection are (bridgeports.Watch and Chains.judged hand the same ones back while unchanged)."""
    inputs = (ports, selected["ingress"], selected["egress"])
    last = chains.layout
    if last is not None and all(a is b for a, b in zip(last.inputs, inputs, strict=True)):
        return last
    by_text = last.by_text if last is not None and last.inputs[0] is ports else _by_text(ports)
    by_port: dict[str, dict[str, list[Judges]]] = {"ingress": {}, "egress": {}}
    own: set[tuple[str, int, str]] = set()
    for direction in ("ingress", "egress") if by_text else ():
        pairs = selected[direction]
        for (_address, judges), (version, _n, text, _a) in zip(pairs, chains.texts(a for a, _j in pairs),
                                                               strict=True):
            for port in by_text.get(text, ()):
                by_port[direction].setdefault(port, []).append(judges)
                own.add((port, version, text))
    plans: dict[tuple[int, ...], Judges] = {}  # a port's plans merged once per distinct list

    def plan(found: list[Judges]) -> Judges:
        key = tuple(map(id, found))
        if key not in plans:
            plans[key] = merged(found)
        return plans[key]

    combos = {d: {port: plan(p) for port, p in by_.items()} for d, by_ in by_port.items()}
    if last is not None:  # equal plans: the same object, so port_dispatch() writes what it wrote
        combos = {d: last.combos[d] if last.combos[d] == c else c for d, c in combos.items()}
    own_sets = last.own if last is not None and last.own_keys == own else _own_sets(own)
    used = {d: {i for c in p.values() for i in c.policies or ()} for d, p in combos.items()}
    chains.layout = _PortLayout(inputs, by_text, combos, own, own_sets, used)
    return chains.layout


def _bridge(decision: Decision, tiers: Tiers, ports: Mapping[Address, Collection[str]], chains: Chains,
            selected: Mapping[str, Sequence[tuple[Address, Judges]]]) -> _Script:
    """The bridge table: each port judged by the plan of the selected addresses it holds
    (_port_layout). `selected`: the addresses judged in each direction (tiers.judged)."""
    layout = _port_layout(ports, chains, selected)
    script = _Script(tiers, chains)
    _policy_chains(script, decision, layout.used)
    for version in (4, 6):
        script.sets[f"own{version}"] = layout.own[version]
    script.port_dispatch("egress", layout.combos["egress"], "iifname", "saddr", "filter - 1")
    script.port_dispatch("ingress", layout.combos["ingress"], "oifname", "daddr", "filter + 1")
    return script


def model(decision: Decision, ports: Mapping[Address, Collection[str]] | None = None,
          tiers: Tiers | None = None, fence: Fence | None = None, chains: Chains | None = None) -> Model:
    """Both tables (delta.Model; script() is their text). `ports`: the bridge ports each address
    was found on (none: the bridge table judges nothing); `tiers`: the ClusterNetworkPolicies
    around the NetworkPolicies (tiers.py). `fence`: pods not placed are isolated (None or not
    valid: open, as before the node controller knew them). `chains`: the policy chains of the
    last call, kept for this one (the node controller's; none: all rendered afresh)."""
    tiers = tiers or Tiers()
    fence = fence if fence is not None and fence.valid() else None
    chains = chains or Chains()
    script = _Script(tiers, chains)
    _policy_chains(script, decision)
    if fence:
        script.sets.update(_placed(decision, chains))
    selected = {direction: chains.judged(decision, tiers, direction) for direction in ("egress", "ingress")}
    script.dispatch("egress", selected["egress"], "saddr", "filter - 1", fence)
    script.dispatch("ingress", selected["ingress"], "daddr", "filter + 1", fence)
    bridge = _bridge(decision, tiers, ports or {}, chains, selected)
    chains.done()
    return {("inet", TABLE): _table(script), ("bridge", TABLE): _table(bridge)}


def script(tables: Model) -> str:
    """The tables replaced in one transaction (add + delete + define is idempotent)."""
    lines: list[str] = []
    for (family, name), table in tables.items():
        lines += [f"add table {family} {name}", f"delete table {family} {name}", f"table {family} {name} {{"]
        for block_name, block in table.items():
            lines += [f"\t{block.kind} {block_name} {{", *(f"\t\t{line}" for line in block.header)]
            if block.kind == "chain":
                lines += [f"\t\t{rule}" for rule in block.body]
            elif block.body:
                lines.append(f"\t\telements = {{ {', '.join(block.body)} }}")
            lines.append("\t}")
        lines.append("}")
    return "\n".join([*lines, ""])


def ruleset(decision: Decision, ports: Mapping[Address, Collection[str]] | None = None,
            tiers: Tiers | None = None, fence: Fence | None = None) -> str:
    """The text of model(): both tables, replaced in one transaction."""
    return script(model(decision, ports, tiers, fence))


def removal() -> str:
    """Deletes the tables if present (the add makes the delete never fail)."""
    return "".join(f"add table {family} {TABLE}\ndelete table {family} {TABLE}\n"
                   for family in ("inet", "bridge"))


def census(tables: Model) -> tuple[int, int]:
    """(rules, elements of the sets and maps) of the tables: what the kernel holds once nft took them."""
    counts = [0, 0]
    for table in tables.values():
        for block in table.values():
            counts[block.kind != "chain"] += len(block.body)
    return counts[0], counts[1]
