"""ClusterNetworkPolicy compiled for the pods of this node, and its tiers joined with NetworkPolicy's
decision; pure and unit tested.

The order of evaluation, per direction of a packet (v1alpha2's ClusterNetworkPolicySpec.tier):
1. Admin tier: the Admin policies selecting the pod, by priority (then name), each one's rules in
   order; the first rule matching decides: Accept accepts, Deny drops, Pass goes on to 2.
2. NetworkPolicy tier: if a NetworkPolicy of the direction selects the pod, it decides (its
   rules allow, or the packet is dropped).
3. Baseline tier: as 1 for the Baseline policies; Pass, like no match, goes on to 4.
4. Accept.
An egress Accept ends the egress judgement only: the destination's ingress is judged as well.
Host-network pods are neither subjects nor pod peers (World leaves them out: no addresses).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .cluster import KIND, Action, ClusterNetworkPolicy, EgressRule, IngressRule, NamespacedPod, Peer, Tier
from .compile import Decision, NamedPort, PortRange, Rule, merge_ranges
from .objects import DIRECTIONS, Address, Cause, Direction, LabelSelector, Namespace, Network, Pod, Refusal
from .selectors import matches
from .world import World

DENY_ALL = Rule(peers=None, ranges=None)


@dataclass(frozen=True)
class TierRule:
    action: Action
    rule: Rule


@dataclass(frozen=True)
class ClusterRules:
    name: str
    tier: Tier
    priority: int
    ingress: tuple[TierRule, ...]  # in order; none: the policy does not affect the direction
    egress: tuple[TierRule, ...]
    refused: tuple[Refusal, ...] = ()  # fields that closed a direction (it denies everything)

    def rules(self, direction: str) -> tuple[TierRule, ...]:
        return self.ingress if direction == "ingress" else self.egress


@dataclass(frozen=True)
class Judges:
    """What judges one pod's address in one direction: Admin policies (indices into
    Tiers.policies, in order), then NetworkPolicies (indices into Decision.policies; None: no
    NetworkPolicy selects the pod), else Baseline policies."""

    admin: tuple[int, ...]
    policies: tuple[int, ...] | None
    baseline: tuple[int, ...]


@dataclass(frozen=True)
class Tiers:
    """The ClusterNetworkPolicies with rules for pods of this node, in order of precedence (Admin
    before Baseline, by priority, then name), and per direction the indices of those selecting
    each local pod address."""

    policies: tuple[ClusterRules, ...] = ()
    ingress: Mapping[Address, tuple[int, ...]] | None = None
    egress: Mapping[Address, tuple[int, ...]] | None = None

    def selected(self, direction: str) -> Mapping[Address, tuple[int, ...]]:
        return (self.ingress if direction == "ingress" else self.egress) or {}


def _in_namespaces(selector: LabelSelector, world: World) -> list[str]:
    return [n for n in world.by_namespace if matches(selector, world.labels_of_namespace(n))]


def _pods(namespaces: LabelSelector | None, pods: NamespacedPod | None, world: World) -> list[Pod]:
    """The pods of a subject or peer: all pods of the namespaces, or the pods matching both selectors."""
    if pods is not None:
        return [p for n in _in_namespaces(pods.namespace_selector, world) for p in world.by_namespace[n]
                if matches(pods.pod_selector, p.metadata.labels)]
    assert namespaces is not None  # exactly one is set (cluster.Subject, cluster.Peer)
    return [p for n in _in_namespaces(namespaces, world) for p in world.by_namespace[n]]


def _named(pods: Iterable[Pod], name: str) -> set[NamedPort]:
    """A destinationNamedPort on the destination pods: any protocol of the container port."""
    return {(a, port.protocol, port.container_port) for pod in pods for c in pod.spec.containers
            for port in c.ports if port.name == name for a in pod.addresses()}


def _rule(rule: IngressRule | EgressRule, world: World, subjects: Sequence[Pod]) -> TierRule:
    peers: tuple[Peer, ...] = rule.from_ if isinstance(rule, IngressRule) else rule.to
    peer_pods = [p for peer in peers if peer.networks is None
                 for p in _pods(peer.namespaces, peer.pods, world)]
    networks: list[Network] = [n for peer in peers for n in peer.networks or ()]
    addresses = world.peers([tuple(peer_pods)], networks)
    if rule.protocols is None:
        return TierRule(rule.action, Rule(peers=addresses, ranges=None))
    ranges: list[PortRange] = []
    named: set[NamedPort] = set()
    destinations = subjects if isinstance(rule, IngressRule) else peer_pods
    for protocol in rule.protocols:
        if protocol.destination_named_port is not None:
            named |= _named(destinations, protocol.destination_named_port)
        for proto, match in (("TCP", protocol.tcp), ("UDP", protocol.udp), ("SCTP", protocol.sctp)):
            if match is not None:
                port = match.destination_port
                first, last = (port.number, port.number) if port.range is None else (port.range.start,
                                                                                      port.range.end)
                ranges.append((proto, first or 0, last or 0))
    ordered = tuple(sorted(named, key=lambda n: (n[0].version, n[0], n[1], n[2])))
    return TierRule(rule.action, Rule(peers=addresses, ranges=merge_ranges(ranges), named=ordered))


def _direction(policy: ClusterNetworkPolicy, direction: Direction, world: World, subjects: Sequence[Pod],
               refused: list[Refusal]) -> tuple[TierRule, ...]:
    if direction in policy.closed:
        return (TierRule("Deny", DENY_ALL),)
    try:
        return tuple(_rule(r, world, subjects) for r in policy.rules(direction))
    except Exception as exc:  # a bug here must close this direction, not drop the policy
        refused.append(Refusal(KIND, policy.metadata.name, f"spec.{direction.lower()}",
                               f"not compiled: {type(exc).__name__}: {exc}", Cause.NOT_COMPILED))
        return (TierRule("Deny", DENY_ALL),)


def _precedence(policy: ClusterNetworkPolicy) -> tuple[int, int, str]:
    return (policy.spec.tier != "Admin", policy.spec.priority, policy.metadata.name)


def decide(policies: Iterable[ClusterNetworkPolicy], pods: Iterable[Pod], namespaces: Iterable[Namespace],
           node_name: str) -> Tiers:
    ordered = sorted(policies, key=_precedence)
    if not ordered:
        return Tiers()  # the common case: no pod read
    world = World.of(pods, namespaces)
    compiled: list[ClusterRules] = []
    selected: dict[str, dict[Address, list[int]]] = {"ingress": {}, "egress": {}}
    for policy in ordered:
        subjects = [p for p in _pods(policy.spec.subject.namespaces, policy.spec.subject.pods, world)
                    if p.spec.node_name == node_name]
        if not subjects:
            continue  # selects nothing here: nothing to enforce on this node
        refused = list(policy.refused)
        ingress, egress = (_direction(policy, d, world, subjects, refused) for d in DIRECTIONS)
        if not ingress and not egress:
            continue
        index = len(compiled)
        compiled.append(ClusterRules(policy.metadata.name, policy.spec.tier, policy.spec.priority,
                                     ingress, egress, tuple(refused)))
        for direction, rules in (("ingress", ingress), ("egress", egress)):
            if rules:
                for address in (a for pod in subjects for a in pod.addresses()):
                    selected[direction].setdefault(address, []).append(index)
    by_address = ({a: tuple(i) for a, i in selected[d].items()} for d in ("ingress", "egress"))
    return Tiers(tuple(compiled), *by_address)


def judges(decision: Decision, tiers: Tiers, direction: str) -> dict[Address, Judges]:
    """Each local address judged in `direction` by something, with what judges it."""
    return dict(judged(decision, tiers, direction))


def judged(decision: Decision, tiers: Tiers, direction: str) -> list[tuple[Address, Judges]]:
    """judges() as pairs: a dict would hash each address again (in Python: ipaddress)."""
    policies = decision.ingress if direction == "ingress" else decision.egress
    by_tier = tiers.selected(direction)
    result: list[tuple[Address, Judges]] = []
    plans: dict[tuple[tuple[int, ...], tuple[int, ...] | None], Judges] = {}  # one object per plan
    keys = (((a, (by_tier.get(a, ()), policies.get(a))) for a in policies.keys() | by_tier.keys()) if by_tier
            else ((a, ((), p)) for a, p in policies.items()))  # without tiers: no address hashed
    for address, key in keys:
        if key not in plans:
            chosen = key[0]
            plans[key] = Judges(admin=tuple(i for i in chosen if tiers.policies[i].tier == "Admin"),
                                policies=key[1],
                                baseline=tuple(i for i in chosen if tiers.policies[i].tier == "Baseline"))
        result.append((address, plans[key]))
    return result


def merged(plans: Iterable[Judges]) -> Judges:
    """The plan of a bridge port holding several selected addresses: judged by all their policies."""
    chosen = list(plans)
    policies = [p.policies for p in chosen if p.policies is not None]
    return Judges(admin=tuple(sorted({i for p in chosen for i in p.admin})),
                policies=tuple(sorted({i for p in policies for i in p})) if policies else None,
                baseline=tuple(sorted({i for p in chosen for i in p.baseline})))
