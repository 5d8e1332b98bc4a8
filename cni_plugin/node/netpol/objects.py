"""The API objects NetworkPolicy enforcement reads, typed as networking.k8s.io/v1 and core/v1 serve them.

Parsed from the API's JSON form (camelCase). Unknown fields are ignored. Addresses and CIDRs are
read as the API server reads them (k8s.io/utils/net ParseIPSloppy/ParseCIDRSloppy: leading zeros
allowed, host bits of a CIDR masked off; an IPv4-mapped IPv6 address is the IPv4 one).

What the API server would refuse can still arrive from a hostile or broken source; it never opens
anything (`read`): a policy keeps its name and namespace and loses the direction the bad field is
in, which then allows nothing (no podSelector read: all pods of its namespace; no policyTypes read:
both directions); a pod or namespace loses the bad list element (an address, a container port) or,
when the field is not in such a list, is left out whole. Each such field is a Refusal to log.
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
)

from cnikit.ip import IPAddress, IPNetwork

Direction = Literal["Ingress", "Egress"]
DIRECTIONS: tuple[Direction, ...] = ("Ingress", "Egress")

# k8s.io/utils/net: leading zeros of each IPv4 number (and of the prefix length) are dropped, and
# what is left is read in decimal, as Go's parser did before 1.17.
_LEADING_ZEROS = re.compile(r"(^|:)0*(0|[1-9][0-9]*)\.0*(0|[1-9][0-9]*)\.0*(0|[1-9][0-9]*)\.0*(0|[1-9][0-9]*)"
                            r"((/)0*(0|[1-9][0-9]*))?$")


def _sloppy(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("a string is required")
    if "%" in value:  # a zone means nothing in a rule, and nft refuses the whole script for it
        raise ValueError("a scoped address (with a %zone) is not allowed")
    return _LEADING_ZEROS.sub(r"\1\2.\3.\4.\5\7\8", value)


def parse_address(value: object) -> IPAddress:
    """An address as the API server reads it (ParseIPSloppy)."""
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    try:
        ip = ipaddress.ip_address(_sloppy(value))
    except ValueError as exc:
        raise ValueError(f"not an IP address: {exc}") from None
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return mapped or ip


def parse_cidr(value: object) -> IPNetwork:
    """A CIDR as the API server reads it (ParseCIDRSloppy); host bits mean the network."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    try:
        text = _sloppy(value)
    except ValueError as exc:
        raise ValueError(f"not a CIDR: {exc}") from None
    _address, slash, prefix = text.partition("/")
    if not slash or not prefix.isascii() or not prefix.isdigit():  # Go takes no netmask form
        raise ValueError("not a CIDR (address/prefix length)")
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError("not a CIDR") from None
    mapped = net.network_address.ipv4_mapped if isinstance(net, ipaddress.IPv6Network) else None
    if mapped is not None and net.prefixlen >= 96:  # Go treats ::ffff:a.b.c.d/96+n as a.b.c.d/n
        return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


Network = Annotated[IPNetwork, BeforeValidator(parse_cidr)]  # the names this package's models use
Address = Annotated[IPAddress, BeforeValidator(parse_address)]

Protocol = Literal["TCP", "UDP", "SCTP"]
PortNumber = Annotated[int, Field(ge=1, le=65535)]
_PORT_NAME = re.compile(r"(?=.*[a-z])(?!-)(?!.*--)[a-z0-9-]{1,15}(?<!-)")


def _port(value: object) -> object:
    """A port number, or a container port's name as the API validates it (IANA_SVC_NAME: 1-15 of
    [a-z0-9-], a letter, no leading, trailing or double hyphen); one error for either."""
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    if isinstance(value, str) and _PORT_NAME.fullmatch(value):
        return value
    raise ValueError("not a port number (1-65535) nor a port name (IANA_SVC_NAME)")


PortOrName = Annotated[int | str, BeforeValidator(_port)]


class _Api(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)


class Requirement(_Api):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[str, ...] = ()


class LabelSelector(_Api):
    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels")
    match_expressions: tuple[Requirement, ...] = Field(default=(), alias="matchExpressions")


class IPBlock(_Api):
    cidr: Network
    except_: tuple[Network, ...] = Field(default=(), alias="except")


class Peer(_Api):
    pod_selector: LabelSelector | None = Field(default=None, alias="podSelector")
    namespace_selector: LabelSelector | None = Field(default=None, alias="namespaceSelector")
    ip_block: IPBlock | None = Field(default=None, alias="ipBlock")


class PolicyPort(_Api):
    protocol: Protocol = "TCP"
    port: PortOrName | None = None  # a number or a container port's name; None: every port
    end_port: PortNumber | None = Field(default=None, alias="endPort")


class _Rule(_Api):
    @functools.cached_property
    def key(self) -> str:
        """What the rule says, as text: equal rules of different policies compile alike (compile.py)."""
        return self.model_dump_json()


class IngressRule(_Rule):
    peers: tuple[Peer, ...] | None = Field(default=None, alias="from")
    ports: tuple[PolicyPort, ...] | None = None


class EgressRule(_Rule):
    peers: tuple[Peer, ...] | None = Field(default=None, alias="to")
    ports: tuple[PolicyPort, ...] | None = None


class PolicySpec(_Api):
    pod_selector: LabelSelector = Field(default_factory=LabelSelector, alias="podSelector")
    ingress: tuple[IngressRule, ...] | None = None
    egress: tuple[EgressRule, ...] | None = None
    policy_types: tuple[Direction, ...] | None = Field(default=None, alias="policyTypes")


class Name(_Api):
    name: str
    namespace: str = ""


class Metadata(Name):
    labels: dict[str, str] = Field(default_factory=dict)
    uid: str = ""  # tells a pod from an earlier one of the same name (a StatefulSet's)


class Cause(StrEnum):
    """Why a policy is enforced closed in a direction: the reason label of
    pybridge_netpol_policies_refused (ops/node_metrics.py)."""

    INVALID = "invalid"  # a field of the object could not be read
    NOT_COMPILED = "not-compiled"  # the compiler failed on a direction (a bug, closed not dropped)


@dataclass(frozen=True)
class Refusal:
    """A field of an API object that could not be read, and what was done instead."""

    kind: str
    name: str  # "namespace/name"
    field: str  # "spec.ingress.0.from.0.ipBlock.except.0"
    reason: str  # for people: logs, the rule comment
    cause: Cause = Cause.INVALID


class NetworkPolicy(_Api):
    metadata: Name  # its own labels play no part
    spec: PolicySpec = Field(default_factory=PolicySpec)
    # The fields `read` could not read; each refused the direction it is in (never from the API)
    _refused: tuple[Refusal, ...] = PrivateAttr(default=())

    @property
    def refused(self) -> tuple[Refusal, ...]:
        return self._refused

    def affects(self, direction: Direction) -> bool:
        """policyTypes, or when absent: Ingress always, Egress when the policy has egress rules."""
        if self.spec.policy_types is not None:
            return direction in self.spec.policy_types
        return direction == "Ingress" or bool(self.spec.egress)


class ContainerPort(_Api):
    name: str | None = None
    container_port: PortNumber = Field(alias="containerPort")
    protocol: Protocol = "TCP"


class Container(_Api):
    ports: tuple[ContainerPort, ...] = ()


class PodSpec(_Api):
    node_name: str | None = Field(default=None, alias="nodeName")
    host_network: bool = Field(default=False, alias="hostNetwork")
    containers: tuple[Container, ...] = ()


class PodIP(_Api):
    ip: Address


class PodStatus(_Api):
    phase: str | None = None
    pod_ips: tuple[PodIP, ...] = Field(default=(), alias="podIPs")
    pod_ip: Address | None = Field(default=None, alias="podIP")


class Pod(_Api):
    metadata: Metadata
    spec: PodSpec = Field(default_factory=PodSpec)
    status: PodStatus = Field(default_factory=PodStatus)

    def addresses(self) -> tuple[Address, ...]:
        """The pod's own IPs; none for host-network pods (policies never select them) and for
        pods that finished."""
        if self.spec.host_network or self.status.phase in ("Succeeded", "Failed"):
            return ()
        ips = tuple(p.ip for p in self.status.pod_ips)
        return ips or ((self.status.pod_ip,) if self.status.pod_ip else ())

    def named_port(self, name: str, protocol: Protocol) -> int | None:
        return next((p.container_port for c in self.spec.containers for p in c.ports
                     if p.name == name and p.protocol == protocol), None)


class Namespace(_Api):
    metadata: Metadata

    def labels(self) -> dict[str, str]:
        # The API server sets this label on every namespace (1.21+); a recorded object may lack it.
        return {"kubernetes.io/metadata.name": self.metadata.name, **self.metadata.labels}


Model = NetworkPolicy | Pod | Namespace
KINDS: dict[str, type[Model]] = {"NetworkPolicy": NetworkPolicy, "Pod": Pod, "Namespace": Namespace}


def _field(loc: tuple[int | str, ...]) -> str:
    return ".".join(map(str, loc))


def _refusals(kind: str, name: str, exc: ValidationError) -> list[Refusal]:
    return [Refusal(kind, name, _field(e["loc"]), e["msg"]) for e in exc.errors()]


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _or_refused(model: Any, value: object, default: Any, loc: str, name: str,
                refused: list[Refusal]) -> Any:
    """`value` read as `model` (a pydantic TypeAdapter), or `default` with its errors recorded."""
    try:
        return model.validate_python(value)
    except ValidationError as exc:
        refused += [Refusal("NetworkPolicy", name, _field((loc, *e["loc"])), e["msg"]) for e in exc.errors()]
        return default


def _closed_policy(obj: dict[str, Any], meta: Name) -> NetworkPolicy:
    """The policy with each unreadable part in its most closed form: the rules of a direction
    with a bad field are none (deny), a bad podSelector selects all pods of the namespace, bad
    policyTypes mean both directions."""
    name = f"{meta.namespace}/{meta.name}"
    spec, refused = _dict(obj.get("spec")), list[Refusal]()
    if not isinstance(obj.get("spec", {}), dict):
        refused.append(Refusal("NetworkPolicy", name, "spec", "not an object"))
    selector = _or_refused(TypeAdapter(LabelSelector), spec.get("podSelector", {}), LabelSelector(),
                           "spec.podSelector", name, refused)
    types = _or_refused(TypeAdapter(tuple[Direction, ...] | None), spec.get("policyTypes"), DIRECTIONS,
                        "spec.policyTypes", name, refused)
    ingress = _or_refused(TypeAdapter(tuple[IngressRule, ...] | None), spec.get("ingress"), (),
                          "spec.ingress", name, refused)
    egress = _or_refused(TypeAdapter(tuple[EgressRule, ...] | None), spec.get("egress"), (),
                         "spec.egress", name, refused)
    if types is None:  # as affects() reads an absent policyTypes, a present but bad egress included
        types = ("Ingress", "Egress") if egress or spec.get("egress") else ("Ingress",)
    spec_read = PolicySpec(pod_selector=selector, ingress=ingress, egress=egress, policy_types=types)
    policy = NetworkPolicy(metadata=meta, spec=spec_read)
    policy._refused = tuple(refused)
    return policy


# Pod fields dropped when bad rather than the pod: its addresses, container ports, containers
# (fewer addresses or ports never allow more). Any other bad field leaves the pod out.
_DROPPABLE = (("status", "podIPs", int), ("status", "podIPs"), ("status", "podIP"),
              ("spec", "containers", int, "ports", int), ("spec", "containers", int, "ports"),
              ("spec", "containers", int), ("spec", "containers"))


def _droppable(loc: tuple[int | str, ...]) -> tuple[int | str, ...] | None:
    for shape in _DROPPABLE:
        head = loc[:len(shape)]
        if len(head) == len(shape) and all(s == h if isinstance(s, str) else isinstance(h, int)
                                           for s, h in zip(shape, head, strict=True)):
            return head
    return None


def _pruned_pod(obj: dict[str, Any], name: str) -> tuple[Pod | None, list[Refusal]]:
    refused, copied = list[Refusal](), False
    while True:
        try:
            return Pod.model_validate(obj), refused
        except ValidationError as exc:
            if not copied:  # pruned on a copy: the caller's object stays as it came
                obj, copied = copy.deepcopy(obj), True
            found = _refusals("Pod", name, exc)
            heads = {_droppable(e["loc"]) for e in exc.errors()}
            if None in heads:
                return None, found
            refused += found
            # the deepest and last first, so that the other elements keep their index
            for head in sorted((h for h in heads if h is not None), reverse=True,
                               key=lambda h: [str(k).zfill(9) for k in h]):
                parent: Any = obj
                for key in head[:-1]:
                    parent = parent[key]
                del parent[head[-1]]


def read(kind: str, obj: Any) -> tuple[Model | None, list[Refusal]]:
    """One API object, with what of it was refused; None when it cannot be used at all."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    try:
        name = Name.model_validate(meta)
    except ValidationError as exc:
        label = "/".join(str(_dict(meta).get(k, "?")) for k in ("namespace", "name"))
        return None, _refusals(kind, label, exc)
    label = f"{name.namespace}/{name.name}"
    if kind == "Pod":
        return _pruned_pod(obj, label)
    try:
        return KINDS[kind].model_validate(obj), []
    except ValidationError as exc:
        if kind != "NetworkPolicy":
            return None, _refusals(kind, label, exc)
        policy = _closed_policy(obj, name)
        return policy, list(policy.refused)
