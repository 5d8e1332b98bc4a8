"""Which traffic each pod of this node allows, decided from the API objects; pure and unit tested.

The API's rules, as networking.k8s.io/v1 documents them:
- a policy selects the pods of its own namespace matching spec.podSelector (empty: all of them);
- it affects Ingress, Egress or both (spec.policyTypes; when absent Ingress, plus Egress if it
  has egress rules). A pod selected by no policy of a direction is open in that direction;
  selected by several, it allows the union of their rules;
- a rule allows traffic when one of its peers and one of its ports match (no peers: any
  address; no ports: any port and protocol);
- a peer is an ipBlock (cidr minus except), or pods: podSelector alone means pods of the
  policy's namespace, namespaceSelector alone all pods of the matching namespaces, both the
  matching pods of the matching namespaces;
- a port is a number, a range (port..endPort), a container port's name (resolved on the
  destination pod: the selected pod for ingress, the peer for egress), or absent (all ports
  of its protocol, TCP when absent).
Host-network pods are never selected and never a pod peer (their addresses are the node's).
A direction of a policy that could not be read or compiled allows nothing (objects.read): it
still isolates the pods the policy selects, and its refused fields are kept to be reported.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .objects import (
    DIRECTIONS,
    Address,
    Cause,
    Direction,
    EgressRule,
    IngressRule,
    IPBlock,
    Namespace,
    Network,
    NetworkPolicy,
    Peer,
    Pod,
    Refusal,
)
from .selectors import matches
from .world import Collapsed, Host, Known, Labels, Matching, World

PortRange = tuple[str, int, int]  # (protocol, first, last)
NamedPort = tuple[Address, str, int]  # (destination address, protocol, resolved number)


@dataclass(frozen=True)
class Rule:
    """One rule of one policy: allows traffic from/to `peers` on `ranges` or `named` ports."""

    peers: tuple[Network, ...] | None  # None: any address
    ranges: tuple[PortRange, ...] | None  # None: any port and protocol (named is then empty)
    named: tuple[NamedPort, ...] = ()


@dataclass(frozen=True)
class PolicyRules:
    name: str  # "namespace/name"
    ingress: tuple[Rule, ...] | None  # None: the policy does not affect this direction
    egress: tuple[Rule, ...] | None
    refused: tuple[Refusal, ...] = ()  # fields that made a direction allow nothing


@dataclass(frozen=True)
class Decision:
    """The policies selecting pods of this node, and for each local pod address the indices of
    the policies selecting it, per direction. Addresses absent from a map are open that way.
    `placed`: every address of one pod of this node (selected or not): what the node controller decided.
    `local`: the pods of this node with addresses, by id() (World.known's entries; the same
    object while they are the same)."""

    policies: tuple[PolicyRules, ...]
    ingress: Mapping[Address, tuple[int, ...]]
    egress: Mapping[Address, tuple[int, ...]]
    placed: frozenset[Address] = frozenset()
    local: Mapping[int, Known] = field(default_factory=dict)


def _peer_pods(peer: Peer, namespace: str, world: World) -> tuple[Pod, ...]:
    selector = peer.namespace_selector
    namespaces = (namespace,) if selector is None else world.namespaces(selector)
    return world.peer_pods(namespaces, peer.pod_selector)


def block_networks(block: IPBlock) -> list[Network]:
    """cidr minus every except inside it, as disjoint networks."""
    kept: list[Network] = [block.cidr]
    for hole in block.except_:
        if hole.version != block.cidr.version:
            continue
        rest: list[Network] = []
        for net in kept:
            if hole.subnet_of(net):  # type: ignore[arg-type]  # same version checked above
                rest.extend(net.address_exclude(hole))  # type: ignore[arg-type]
            elif not net.subnet_of(hole):  # type: ignore[arg-type]
                rest.append(net)
        kept = rest
    return kept


def merge_ranges(ranges: Iterable[PortRange]) -> tuple[PortRange, ...]:
    """Overlapping or adjacent ranges of one protocol merged (for the same reason)."""
    merged: list[PortRange] = []
    for proto, first, last in sorted(set(ranges)):
        if merged and merged[-1][0] == proto and first <= merged[-1][2] + 1:
            merged[-1] = (proto, merged[-1][1], max(last, merged[-1][2]))
        else:
            merged.append((proto, first, last))
    return tuple(merged)


def _rule(rule: IngressRule | EgressRule, policy: NetworkPolicy, world: World,
          direction: Direction, targets: Sequence[Pod]) -> Rule:
    namespace = policy.metadata.namespace
    groups: list[tuple[Pod, ...]] | None = None
    peers: tuple[Network, ...] | None = None
    if rule.peers:
        groups = [_peer_pods(peer, namespace, world) for peer in rule.peers if peer.ip_block is None]
        blocks = [n for peer in rule.peers if peer.ip_block for n in block_networks(peer.ip_block)]
        peers = world.peers(groups, blocks)
    if not rule.ports:
        return Rule(peers=peers, ranges=None)
    # A named port is looked up on the destination: the selected pod for ingress, the peer for egress.
    destinations = targets if direction == "Ingress" else (world.pods if groups is None else
                                                           [p for group in groups for p in group])
    ranges: list[PortRange] = []
    named: set[NamedPort] = set()
    for port in rule.ports:
        if port.port is None:
            ranges.append((port.protocol, 0, 65535))
        elif isinstance(port.port, int):
            ranges.append((port.protocol, port.port, max(port.port, port.end_port or port.port)))
        else:
            for pod in destinations:
                number = pod.named_port(port.port, port.protocol)
                if number is not None:
                    named.update((a, port.protocol, number) for a in world.addresses(pod))
    return Rule(peers=peers, ranges=merge_ranges(ranges),
                named=tuple(sorted(named, key=lambda n: (n[0].version, n[0], n[1], n[2]))))


def _shared_rule(rule: IngressRule | EgressRule, policy: NetworkPolicy, world: World,
                 direction: Direction, targets: Sequence[Pod]) -> Rule:
    """_rule(), once per world for a rule that reads neither the policy's namespace nor the pods
    it selects (an ingress named port): many policies say the same (from every namespace, say)."""
    if any(p.ip_block is None and p.namespace_selector is None for p in rule.peers or ()) or (
            direction == "Ingress" and any(isinstance(p.port, str) for p in rule.ports or ())):
        return _rule(rule, policy, world, direction, targets)
    key = (direction, rule.key)
    found = world.rules.get(key)
    if not isinstance(found, Rule):
        found = world.rules[key] = _rule(rule, policy, world, direction, targets)
    return found


def _direction_rules(policy: NetworkPolicy, world: World, direction: Direction, targets: Sequence[Pod],
                     refused: list[Refusal]) -> tuple[Rule, ...] | None:
    if not policy.affects(direction):
        return None
    rules = policy.spec.ingress if direction == "Ingress" else policy.spec.egress
    try:
        return tuple(_shared_rule(r, policy, world, direction, targets) for r in rules or ())
    except Exception as exc:  # a bug here must close this direction, not drop the policy
        refused.append(Refusal("NetworkPolicy", _name(policy), f"spec.{direction.lower()}",
                               f"not compiled: {type(exc).__name__}: {exc}", Cause.NOT_COMPILED))
        return ()


def _name(policy: NetworkPolicy) -> str:
    return f"{policy.metadata.namespace}/{policy.metadata.name}"


# a policy, what it read (first: its namespace's pods), the addresses of the pods it selects, its
# rules (None: it selects none), the namespaces it read (None: all), the pods it selects
Compiled = tuple[NetworkPolicy, tuple[object, ...], tuple[Address, ...], PolicyRules | None,
                 frozenset[str] | None, tuple[Pod, ...]]


class Memo:
    """What decide() compiled, kept for its next call on the same node (the node controller's): a
    policy's selected pods and PolicyRules while the policy and what it reads (_reads) are the
    same objects. Each namespace's pods are one tuple while they are the same pods; while the
    namespaces with pods and their labels stay, a policy reading none whose pods changed is not
    looked at further."""

    def __init__(self) -> None:
        self.namespaces: dict[str, tuple[Pod, ...]] = {}
        self.known: Mapping[int, Known] = {}
        self.collapsed: Collapsed = {}
        self.labels: Labels = ()
        self.matching: Matching = {}
        self.changed: frozenset[str] | None = None
        self.complete = False  # compiled holds the entries of the last world
        self.compiled: dict[int, Compiled] = {}  # by id() of the policy, kept alive here
        self.selection = _Selection()
        self.placement = _Placement()

    def world(self, pods: Iterable[Pod], namespaces: Iterable[Namespace]) -> World:
        world = World.of(pods, namespaces, self.known)
        by_namespace = {n: _same_pods(self.namespaces.get(n), group)
                        for n, group in world.by_namespace.items()}
        labels = world.labels()
        kept = self.matching if labels == self.labels else {}
        # which namespaces' pods changed since the entries of `compiled` (None: unknown, or labels changed)
        self.changed = None if labels != self.labels or not self.complete else frozenset(
            n for n, group in by_namespace.items() if self.namespaces.get(n) is not group)
        self.complete = False  # until compiled holds this world's entries
        world = World(world.pods, by_namespace, world.namespace_labels, known=world.known, kept=kept,
                      earlier=self.collapsed)
        self.namespaces, self.known, self.collapsed = by_namespace, world.known, world.collapsed
        self.labels, self.matching = labels, world.matching
        return world

    def policy(self, policy: NetworkPolicy, world: World, node_name: str) -> Compiled:
        entry = self.compiled.get(id(policy))
        if entry is not None and entry[0] is policy and self.changed is not None and (
                not self.changed if entry[4] is None else self.changed.isdisjoint(entry[4])):
            return entry
        reads, names = _reads(policy, world)
        if entry is not None and entry[0] is policy and _same(entry[1], reads):
            return (*entry[:4], names, entry[5])
        # the same pods of its namespace: the same pods selected (only peers changed)
        same = entry is not None and entry[0] is policy and entry[1][0] is reads[0]
        kept = (entry[2], entry[5]) if entry is not None and same else None
        addresses, rules, targets = _compiled(policy, world, node_name, kept)
        if entry is not None and entry[0] is policy:
            # the same rules (their pods changed otherwise): the same chains; the same addresses:
            # nothing to change in the maps of what selects each address (_Selection)
            rules = entry[3] if rules == entry[3] else rules
            addresses = entry[2] if addresses == entry[2] else addresses
        return policy, reads, addresses, rules, names, targets


Selects = tuple[tuple[Address, ...], bool, bool]  # a policy's addresses, whether it affects each direction


@dataclass
class _Selection:
    """Decision.ingress and .egress, kept: while the policies with rules are the same (by name,
    in order: the same indices), an event changes the entries of the addresses of the policies
    whose addresses or directions it changed, not all the addresses' (their dicts are copied)."""

    names: tuple[str, ...] = ()
    selects: tuple[Selects, ...] = ()
    ingress: dict[Address, tuple[int, ...]] = field(default_factory=dict)
    egress: dict[Address, tuple[int, ...]] = field(default_factory=dict)

    def update(self, names: tuple[str, ...], selects: tuple[Selects, ...]) -> None:
        """Kept whole or not at all (a failure leaves the last maps with their inputs)."""
        if names != self.names:
            ingress: dict[Address, tuple[int, ...]] = {}
            egress: dict[Address, tuple[int, ...]] = {}
            for i, (addresses, affects_ingress, affects_egress) in enumerate(selects):
                for table in (ingress,) * affects_ingress + (egress,) * affects_egress:
                    for address in addresses:
                        table[address] = (*table.get(address, ()), i)
        else:
            # a policy object replaced (a change of its rules) selects equal addresses, mostly
            changed = [i for i, (old, new) in enumerate(zip(self.selects, selects, strict=True))
                       if (old[0] is not new[0] and old[0] != new[0]) or old[1:] != new[1:]]
            ingress, egress = self.ingress, self.egress  # unchanged, the same objects (nft.Chains)
            if changed:
                ingress, egress = dict(ingress), dict(egress)  # copied: no address hashed
            for i in changed:
                _change(ingress, egress, i, self.selects[i], selects[i])
        self.names, self.selects, self.ingress, self.egress = names, selects, ingress, egress


def _change(ingress: dict[Address, tuple[int, ...]], egress: dict[Address, tuple[int, ...]], i: int,
            before: Selects, after: Selects) -> None:
    """Policy i's entries: those of its addresses before out, those after in, in order."""
    for table, was, now in ((ingress, before[1], after[1]), (egress, before[2], after[2])):
        old = before[0] if was else ()
        new = Counter(after[0] if now else ())
        for address in {*old, *new}:
            kept = [k for k in table.get(address, ()) if k != i]
            indices = tuple(sorted([*kept, *[i] * new[address]]))
            if indices:
                table[address] = indices
            else:
                table.pop(address, None)


@dataclass
class _Placement:
    """Decision.placed, kept: an event changes it at the addresses of the local pods it added or
    removed (by identity: World.known), not all the addresses'."""

    pods: dict[int, Known] = field(default_factory=dict)  # the local pods with addresses, by id()
    held: Counter[Host] = field(default_factory=Counter)  # by how many of them each address is held
    placed: frozenset[Address] = frozenset()

    def update(self, pods: dict[int, Known]) -> frozenset[Address]:
        gone = [e for k, e in self.pods.items() if pods.get(k) is not e]
        came = [e for k, e in pods.items() if self.pods.get(k) is not e]
        if not gone and not came:
            return self.placed
        held = Counter(self.held)
        touched: dict[Host, Address] = {}
        for entries, sign in ((gone, -1), (came, 1)):
            for _pod, addresses, hosts in entries:
                for host, address in dict(zip(hosts, addresses, strict=True)).items():
                    held[host] += sign
                    touched[host] = address
        out = {a for h, a in touched.items() if held[h] != 1}
        placed = self.placed - out | {a for h, a in touched.items() if held[h] == 1}
        self.pods, self.held = pods, +held
        self.placed = frozenset(placed)
        return self.placed


def _same(old: Sequence[object], new: Sequence[object]) -> bool:
    return len(old) == len(new) and all(map(operator.is_, old, new))


def _same_pods(old: tuple[Pod, ...] | None, new: tuple[Pod, ...]) -> tuple[Pod, ...]:
    """`old` when it holds the same pod objects, else `new` (a relist, or a claimed pod, which
    is a new copy at each call, makes new ones: what reads them is compiled again)."""
    return old if old is not None and _same(old, new) else new


def _reads(policy: NetworkPolicy, world: World) -> tuple[tuple[object, ...], frozenset[str] | None]:
    """What compiling the policy reads besides itself: the pods of its namespace (selected, and
    peers of a podSelector alone), of the namespaces its namespaceSelectors match, and all pods
    for an egress named port to any peer (looked up on every pod); and those namespaces (None: all)."""
    reads: list[object] = [world.by_namespace.get(policy.metadata.namespace, ())]
    names: set[str] | None = {policy.metadata.namespace}
    for direction in DIRECTIONS:
        if not policy.affects(direction):
            continue
        for rule in (policy.spec.ingress if direction == "Ingress" else policy.spec.egress) or ():
            # Each list of pods after what read it: the same pods read by other peers are another input
            if not rule.peers and direction == "Egress" and any(isinstance(p.port, str)
                                                                for p in rule.ports or ()):
                reads += (rule, *world.by_namespace.values())
                names = None
            for peer in rule.peers or ():
                if peer.ip_block is None and peer.namespace_selector is not None:
                    matching = world.namespaces(peer.namespace_selector)
                    reads += (peer, *(world.by_namespace[n] for n in matching))
                    if names is not None:
                        names.update(matching)
    return tuple(reads), None if names is None else frozenset(names)


def _compiled(policy: NetworkPolicy, world: World, node_name: str,
              selected: tuple[tuple[Address, ...], tuple[Pod, ...]] | None = None,
              ) -> tuple[tuple[Address, ...], PolicyRules | None, tuple[Pod, ...]]:
    """The addresses of the pods of this node the policy selects, its rules (None when it
    selects none) and those pods. `selected`: the addresses and pods, when known."""
    if selected is None:
        selector = policy.spec.pod_selector
        targets = tuple(p for p in world.by_namespace.get(policy.metadata.namespace, ())
                        if p.spec.node_name == node_name and matches(selector, p.metadata.labels))
        selected = tuple(a for p in targets for a in world.addresses(p)), targets
    addresses, targets = selected
    if not targets:
        return addresses, None, targets  # selects nothing here: nothing to enforce on this node
    refused = list(policy.refused)
    return addresses, PolicyRules(
        name=_name(policy),
        ingress=_direction_rules(policy, world, "Ingress", targets, refused),
        egress=_direction_rules(policy, world, "Egress", targets, refused), refused=tuple(refused)), targets


def decide(policies: Iterable[NetworkPolicy], pods: Iterable[Pod], namespaces: Iterable[Namespace],
           node_name: str, memo: Memo | None = None) -> Decision:
    """`memo`: what the last call compiled (none: all compiled afresh); the same Decision either way."""
    memo = memo or Memo()
    world = memo.world(pods, namespaces)
    ordered = sorted(policies, key=lambda p: (p.metadata.namespace, p.metadata.name))
    compiled: list[PolicyRules] = []
    kept: dict[int, Compiled] = {}
    selects: list[Selects] = []
    for policy in ordered:
        entry = kept[id(policy)] = memo.policy(policy, world, node_name)
        _policy, _reads, addresses, rules, _names, _targets = entry
        if rules is not None:
            compiled.append(rules)
            selects.append((addresses, policy.affects("Ingress"), policy.affects("Egress")))
    memo.compiled, memo.complete = kept, True
    memo.selection.update(tuple(r.name for r in compiled), tuple(selects))
    # An address two pods of this node hold (one gone, its object not yet) is placed for neither:
    # the newer one would get the union of both pods' rules until then.
    placed = memo.placement.update({k: e for k, e in world.known.items() if e[0].spec.node_name == node_name})
    return Decision(tuple(compiled), memo.selection.ingress, memo.selection.egress, placed,
                    memo.placement.pods)
