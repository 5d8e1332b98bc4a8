"""The API objects NetworkPolicy enforcement reads, typed as networking.k8s.io/v1 and core/v1 serve them.

Parsed from the API's JSON form (camelCase). Unknown fields are ignored; a field of the wrong type
or a selector operator the API does not define raises pydantic's ValidationError, which names the
field: the agent logs it and leaves that one object out (the API server validates these objects,
so this only happens with a hostile or broken source).
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cnikit.ip import IPAddress, IPNetwork

Network = IPNetwork  # the names this package's models use
Address = IPAddress

Protocol = Literal["TCP", "UDP", "SCTP"]
PortNumber = Annotated[int, Field(ge=1, le=65535)]


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

    @field_validator("cidr", mode="before")
    @classmethod
    def _loose_cidr(cls, value: object) -> object:
        # The API accepts host bits set ("10.0.0.1/24"); they mean the network.
        return ipaddress.ip_network(value, strict=False) if isinstance(value, str) else value


class Peer(_Api):
    pod_selector: LabelSelector | None = Field(default=None, alias="podSelector")
    namespace_selector: LabelSelector | None = Field(default=None, alias="namespaceSelector")
    ip_block: IPBlock | None = Field(default=None, alias="ipBlock")


class PolicyPort(_Api):
    protocol: Protocol = "TCP"
    port: PortNumber | str | None = None  # a number or a container port's name; None: every port
    end_port: PortNumber | None = Field(default=None, alias="endPort")


class IngressRule(_Api):
    peers: tuple[Peer, ...] | None = Field(default=None, alias="from")
    ports: tuple[PolicyPort, ...] | None = None


class EgressRule(_Api):
    peers: tuple[Peer, ...] | None = Field(default=None, alias="to")
    ports: tuple[PolicyPort, ...] | None = None


class PolicySpec(_Api):
    pod_selector: LabelSelector = Field(default_factory=LabelSelector, alias="podSelector")
    ingress: tuple[IngressRule, ...] | None = None
    egress: tuple[EgressRule, ...] | None = None
    policy_types: tuple[Literal["Ingress", "Egress"], ...] | None = Field(default=None, alias="policyTypes")


class Metadata(_Api):
    name: str
    namespace: str = ""
    labels: dict[str, str] = Field(default_factory=dict)


class NetworkPolicy(_Api):
    metadata: Metadata
    spec: PolicySpec = Field(default_factory=PolicySpec)

    def affects(self, direction: Literal["Ingress", "Egress"]) -> bool:
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
