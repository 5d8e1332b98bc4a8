"""ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2, sigs.k8s.io/network-policy-api) as a
typed model, read fail-closed.

The API's shape: a cluster-scoped policy in tier Admin or Baseline with a priority 0-1000, a
subject (pods by namespace selector, or by namespace and pod selectors), and ordered ingress and
egress rules, each an action (Accept, Deny, Pass), peers (namespaces, pods; for egress also
networks) and optional protocols (tcp/udp/sctp with a destination port or range, or a
destination named port). Exactly one field of a subject, peer, protocol and port is set.

The experimental peers (nodes, domainNames) are not supported. A field that cannot be read
(one of those peers, an unknown action, a port out of range, a bad CIDR, a peer with no field
we know: the CRD may be newer than us) never opens anything: `read` keeps the policy in its most
closed form. Each direction that holds a bad field, or every direction the policy has rules for
when the bad field is outside them (tier, priority, subject), denies everything for the policy's
subjects at the policy's place; a bad tier is read as Admin, a bad priority as 0, a bad subject
as every pod. Each such field is a Refusal to log and count.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, PrivateAttr, TypeAdapter, ValidationError, model_validator

from .objects import (
    _PORT_NAME,
    DIRECTIONS,
    Direction,
    LabelSelector,
    Name,
    Network,
    Refusal,
    _Api,
    _dict,
    _field,
)

KIND = "ClusterNetworkPolicy"
RESOURCE = ("policy.networking.k8s.io", "v1alpha2", "clusternetworkpolicies")  # group, version, plural
Tier = Literal["Admin", "Baseline"]
Action = Literal["Accept", "Deny", "Pass"]
PortNumber = Annotated[int, Field(strict=True, ge=1, le=65535)]
Priority = Annotated[int, Field(strict=True, ge=0, le=1000)]


def _exactly_one(model: _Api, names: tuple[str, ...]) -> None:
    """The API's MinProperties=1/MaxProperties=1: one field set (none we know: a newer CRD)."""
    present = [n for n in names if getattr(model, n) is not None]
    if len(present) != 1:
        fields = ", ".join(type(model).model_fields[n].alias or n for n in names)
        raise ValueError(f"exactly one of {fields} must be set (found {len(present)})")


class NamespacedPod(_Api):
    namespace_selector: LabelSelector = Field(default_factory=LabelSelector, alias="namespaceSelector")
    pod_selector: LabelSelector = Field(alias="podSelector")


class Subject(_Api):
    namespaces: LabelSelector | None = None
    pods: NamespacedPod | None = None

    @model_validator(mode="after")
    def _one(self) -> Subject:
        _exactly_one(self, ("namespaces", "pods"))
        return self


class PortRange(_Api):
    start: PortNumber
    end: PortNumber

    @model_validator(mode="after")
    def _ordered(self) -> PortRange:
        if self.start >= self.end:
            raise ValueError("start must be less than end")
        return self


class Port(_Api):
    number: PortNumber | None = None
    range: PortRange | None = None

    @model_validator(mode="after")
    def _one(self) -> Port:
        _exactly_one(self, ("number", "range"))
        return self


class ProtocolMatch(_Api):
    destination_port: Port = Field(alias="destinationPort")  # MinProperties=1: the only field


def _port_name(value: object) -> str:
    if isinstance(value, str) and _PORT_NAME.fullmatch(value):
        return value
    raise ValueError("not a port name (IANA_SVC_NAME)")


class Protocol(_Api):
    tcp: ProtocolMatch | None = None
    udp: ProtocolMatch | None = None
    sctp: ProtocolMatch | None = None
    destination_named_port: Annotated[str, BeforeValidator(_port_name)] | None = Field(
        default=None, alias="destinationNamedPort")

    @model_validator(mode="after")
    def _one(self) -> Protocol:
        _exactly_one(self, ("tcp", "udp", "sctp", "destination_named_port"))
        return self


class Peer(_Api):
    namespaces: LabelSelector | None = None
    pods: NamespacedPod | None = None
    networks: tuple[Network, ...] | None = Field(default=None, min_length=1)  # egress only


class IngressPeer(Peer):
    @model_validator(mode="after")
    def _one(self) -> IngressPeer:
        _exactly_one(self, ("namespaces", "pods"))  # networks is not an ingress peer
        return self


class EgressPeer(Peer):
    nodes: Any = None  # declared to be refused by name, not ignored as unknown
    domain_names: Any = Field(default=None, alias="domainNames")

    @model_validator(mode="after")
    def _one(self) -> EgressPeer:
        for name in ("nodes", "domain_names"):
            if getattr(self, name) is not None:
                raise ValueError(f"{type(self).model_fields[name].alias or name}: not supported by pybridge "
                                 "(an experimental peer)")
        _exactly_one(self, ("namespaces", "pods", "networks"))
        return self


class ClusterRule(_Api):
    name: str = ""
    action: Action
    protocols: tuple[Protocol, ...] | None = Field(default=None, min_length=1)


class IngressRule(ClusterRule):
    from_: tuple[IngressPeer, ...] = Field(alias="from", min_length=1)

    @property
    def peers(self) -> tuple[Peer, ...]:
        return self.from_


class EgressRule(ClusterRule):
    to: tuple[EgressPeer, ...] = Field(min_length=1)

    @property
    def peers(self) -> tuple[Peer, ...]:
        return self.to

    @model_validator(mode="after")
    def _named_on_pods(self) -> EgressRule:
        """The CRD's rule: a named port needs pod peers (networks have no named ports)."""
        if (any(p.networks is not None for p in self.to)
                and any(p.destination_named_port is not None for p in self.protocols or ())):
            raise ValueError("a networks peer cannot be set with a destinationNamedPort")
        return self


class Spec(_Api):
    tier: Tier
    priority: Priority
    subject: Subject
    ingress: tuple[IngressRule, ...] = ()
    egress: tuple[EgressRule, ...] = ()


class ClusterNetworkPolicy(_Api):
    metadata: Name
    spec: Spec
    # The directions a refused field closed: they deny everything for the subjects (never from the API)
    _closed: frozenset[Direction] = PrivateAttr(default=frozenset())
    _refused: tuple[Refusal, ...] = PrivateAttr(default=())

    @property
    def closed(self) -> frozenset[Direction]:
        return self._closed

    @property
    def refused(self) -> tuple[Refusal, ...]:
        return self._refused

    def rules(self, direction: Direction) -> tuple[IngressRule, ...] | tuple[EgressRule, ...]:
        return self.spec.ingress if direction == "Ingress" else self.spec.egress


def _part(adapter: TypeAdapter[Any], spec: dict[str, Any], key: str, default: Any, name: str,
          refused: list[Refusal]) -> Any:
    try:
        return adapter.validate_python(spec[key]) if key in spec else adapter.validate_python(default)
    except ValidationError as exc:
        errors = exc.errors()
        # the deepest field only: a list whose only element failed is also said to be too short
        deepest = [e for e in errors if not any(len(o["loc"]) > len(e["loc"]) and o["loc"][:len(e["loc"])]
                                                == e["loc"] for o in errors)]
        refused += [Refusal(KIND, name, _field(("spec", key, *e["loc"])), e["msg"]) for e in deepest]
        return None


_ALL_PODS = Subject(namespaces=LabelSelector())


def _closed_policy(obj: dict[str, Any], meta: Name) -> ClusterNetworkPolicy:
    """The policy in its most closed form (see the module's docstring)."""
    name, refused = meta.name, list[Refusal]()
    spec = _dict(obj.get("spec"))
    if not isinstance(obj.get("spec"), dict):
        refused.append(Refusal(KIND, name, "spec", "not an object"))
    tier = _part(TypeAdapter(Tier), spec, "tier", None, name, refused)
    priority = _part(TypeAdapter(Priority), spec, "priority", None, name,
                     refused)
    subject = _part(TypeAdapter(Subject), spec, "subject", None, name, refused)
    common_bad = bool(refused)
    ingress = _part(TypeAdapter(tuple[IngressRule, ...]), spec, "ingress", (), name, refused)
    egress = _part(TypeAdapter(tuple[EgressRule, ...]), spec, "egress", (), name, refused)
    closed = set[Direction]()
    for direction, rules in zip(DIRECTIONS, (ingress, egress), strict=True):
        key = direction.lower()
        if rules is None or (common_bad and (spec.get(key) or not isinstance(obj.get("spec"), dict))):
            closed.add(direction)
    policy = ClusterNetworkPolicy(metadata=meta, spec=Spec(
        tier=tier or "Admin", priority=0 if priority is None else priority, subject=subject or _ALL_PODS,
        ingress=() if "Ingress" in closed else ingress, egress=() if "Egress" in closed else egress))
    policy._closed, policy._refused = frozenset(closed), tuple(refused)
    return policy


def read(obj: Any) -> tuple[ClusterNetworkPolicy | None, list[Refusal]]:
    """One ClusterNetworkPolicy, with what of it was refused; None without a readable name."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    try:
        name = Name.model_validate(meta)
    except ValidationError as exc:
        label = str(_dict(meta).get("name", "?"))
        return None, [Refusal(KIND, label, _field(e["loc"]), e["msg"]) for e in exc.errors()]
    try:
        return ClusterNetworkPolicy.model_validate(obj), []
    except ValidationError:
        policy = _closed_policy(obj, name)
        return policy, list(policy.refused)
