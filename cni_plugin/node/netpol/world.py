"""The pods and namespaces a ruleset is compiled from (compile.py, tiers.py), with what is worked
out on them once per ruleset (which namespaces a selector matches, which pods a peer names, peers'
addresses collapsed), some of it kept from one ruleset to the next (compile.Memo); pure."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .objects import Address, LabelSelector, Namespace, Network, Pod
from .selectors import matches

Labels = tuple[tuple[str, tuple[tuple[str, str], ...]], ...]  # of the namespaces with pods, by name
Host = tuple[int, int]  # an address's version and number
Known = tuple[Pod, tuple[Address, ...], tuple[Host, ...]]  # a pod, its addresses, as Hosts
Collapsed = dict[tuple[frozenset[Host], frozenset[Network]], tuple[Network, ...]]  # collapse()s, by input
Matching = dict[object, tuple[str, ...]]  # namespaces(), by what the selector says (selector_key)


@dataclass(frozen=True)
class World:
    """The pods with addresses, by namespace, and each namespace's labels."""

    pods: Sequence[Pod]
    by_namespace: Mapping[str, tuple[Pod, ...]]
    namespace_labels: Mapping[str, Mapping[str, str]]
    # peers() by id() of its groups, which the entry holds (so that their id()s stay theirs)
    memo: dict[tuple[tuple[int, ...], frozenset[Network]],
               tuple[tuple[tuple[Pod, ...], ...], tuple[Network, ...]]] = field(default_factory=dict)
    groups: dict[tuple[tuple[str, ...], object], tuple[Pod, ...]] = field(default_factory=dict)  # peer_pods()
    known: Mapping[int, Known] = field(default_factory=dict)  # by id() of each pod of `pods`
    matching: Matching = field(default_factory=dict)  # namespaces() of this world
    kept: Matching = field(default_factory=dict)  # namespaces() of an earlier world of the same labels
    collapsed: Collapsed = field(default_factory=dict)  # of this world
    earlier: Collapsed = field(default_factory=dict)  # of the last one: the same peers, the same tuple
    rules: dict[tuple[str, str], object] = field(default_factory=dict)  # compile's rules, by what they say

    @classmethod
    def of(cls, pods: Iterable[Pod], namespaces: Iterable[Namespace],
           earlier: Mapping[int, Known] | None = None) -> World:
        """`earlier`: the `known` of an earlier world, whose pods' addresses need no reading again."""
        known: dict[int, Known] = {}
        by_namespace: dict[str, list[Pod]] = {}
        for pod in pods:
            entry = earlier.get(id(pod)) if earlier else None
            if entry is None or entry[0] is not pod:
                addresses = pod.addresses()
                entry = (pod, addresses, tuple((a.version, int(a)) for a in addresses))
            if entry[1]:
                known[id(pod)] = entry
                by_namespace.setdefault(pod.metadata.namespace, []).append(pod)
        return cls([entry[0] for entry in known.values()], {n: tuple(p) for n, p in by_namespace.items()},
                   {n.metadata.name: n.labels() for n in namespaces}, known=known)

    def addresses(self, pod: Pod) -> tuple[Address, ...]:
        """Those of a pod of the world (pod.addresses(), read once)."""
        return self.known[id(pod)][1]

    def labels_of_namespace(self, name: str) -> Mapping[str, str]:
        return self.namespace_labels.get(name, {"kubernetes.io/metadata.name": name})

    def labels(self) -> Labels:
        return tuple((n, tuple(sorted(self.labels_of_namespace(n).items())))
                     for n in sorted(self.by_namespace))

    def namespaces(self, selector: LabelSelector) -> tuple[str, ...]:
        """The namespaces with pods whose labels match."""
        key = selector_key(selector)  # many policies say the same (all namespaces, say)
        found = self.matching.get(key)
        if found is None:
            found = self.kept.get(key)
            if found is None:
                found = tuple(n for n in self.by_namespace if matches(selector, self.labels_of_namespace(n)))
            self.matching[key] = found
        return found

    def peer_pods(self, namespaces: tuple[str, ...], selector: LabelSelector | None) -> tuple[Pod, ...]:
        """The pods of the namespaces matching `selector` (None: all); remembered for this
        world, as many rules name the same ones (all pods of a namespace, say)."""
        if selector is None and len(namespaces) == 1:
            return self.by_namespace.get(namespaces[0], ())
        key = (namespaces, None if selector is None else selector_key(selector))
        if key not in self.groups:
            self.groups[key] = tuple(p for n in namespaces for p in self.by_namespace.get(n, ())
                                     if selector is None or matches(selector, p.metadata.labels))
        return self.groups[key]

    def peers(self, groups: Sequence[tuple[Pod, ...]], blocks: Iterable[Network]) -> tuple[Network, ...]:
        """The addresses of the pods of the groups and the blocks, collapsed; remembered for
        this world, as many rules name the same peers. Keyed by the groups themselves, cheaper
        than by their addresses."""
        networks = frozenset(blocks)
        key = (tuple(map(id, groups)), networks)
        if key not in self.memo:
            hosts = frozenset(h for group in groups for p in group for h in self.known[id(p)][2])
            self.memo[key] = (tuple(groups), self._collapse(hosts, networks))
        return self.memo[key][1]

    def _collapse(self, hosts: frozenset[Host], networks: frozenset[Network]) -> tuple[Network, ...]:
        """The same tuple as the last world's for the same input: a rule whose peers' addresses
        stayed compiles to an equal Rule, cheaply compared (Memo.policy)."""
        key = (hosts, networks)
        found = self.collapsed.get(key) or self.earlier.get(key)
        self.collapsed[key] = found or _collapse(hosts, networks)
        return self.collapsed[key]



def collapse(networks: Iterable[Network]) -> tuple[Network, ...]:
    """Disjoint, sorted, IPv4 first: nft interval sets reject overlapping elements."""
    return _collapse(frozenset(), networks)


def _collapse(hosts: Iterable[Host], networks: Iterable[Network]) -> tuple[Network, ...]:
    """What ipaddress.collapse_addresses gives (the union's largest aligned blocks), worked out
    on integers: ten times faster, and a pod event recomputes the peers of each rule naming it."""
    spans: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    for version, number in hosts:
        spans[version].append((number, number))
    for net in networks:
        first = int(net.network_address)
        spans[net.version].append((first, first + net.num_addresses - 1))
    return tuple(n for version in (4, 6) for n in _blocks(version, sorted(spans[version])))


def _blocks(version: int, spans: list[tuple[int, int]]) -> Iterable[Network]:
    """The union of sorted (first, last) spans as aligned blocks, in order."""
    bits = 32 if version == 4 else 128
    merged: list[list[int]] = []
    for first, last in spans:
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    for first, last in merged:
        while first <= last:
            aligned = (first & -first).bit_length() - 1 if first else bits
            size = min(aligned, (last - first + 1).bit_length() - 1)
            yield _network(version, first, bits - size)
            first += 1 << size


def selector_key(selector: LabelSelector) -> object:
    """What a selector says, hashable: equal selectors of different policies match the same."""
    return tuple(sorted(selector.match_labels.items())), selector.match_expressions


@functools.lru_cache(maxsize=65536)
def _network(version: int, first: int, prefix: int) -> Network:
    return (ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network)((first, prefix))

