"""The ADD result (SPEC section 5) as pydantic models, kept in the 1.1.0 shape and printed in the
version the caller asked for: 1.0.0 drops the 1.1 additions, 0.3.x/0.4.0 also add `ips[].version`."""

from __future__ import annotations

import ipaddress
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cnikit.ip import parse_cidr, parse_ip

from . import version
from .errors import DECODE_FAILURE, CNIError

_IFACE_1_1 = ("mtu", "socketPath", "pciID")
_ROUTE_1_1 = ("mtu", "advmss", "priority", "table", "scope")


def _ip(value: str | None) -> str | None:
    if value is not None:
        ipaddress.ip_address(value)
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Interface(_Model):
    name: str
    mac: str | None = None
    mtu: int | None = None
    sandbox: str | None = None
    socket_path: str | None = Field(default=None, alias="socketPath")
    pci_id: str | None = Field(default=None, alias="pciID")


class IPConfig(_Model):
    address: str
    gateway: str | None = None
    interface: int | None = None

    @field_validator("address")
    @classmethod
    def _cidr(cls, value: str) -> str:
        ipaddress.ip_interface(value)
        if "/" not in value:
            raise ValueError("address must be in CIDR form")
        return value

    @field_validator("gateway")
    @classmethod
    def _gateway(cls, value: str | None) -> str | None:
        return _ip(value)

    @property
    def family(self) -> int:
        return ipaddress.ip_interface(self.address).version


class Route(_Model):
    """One route, in results and in the `ipam.routes` of a config. `dst` is kept as its network
    ("10.9.0.1/16" is 10.9.0.0/16), as Go's ParseCIDR reads it in host-local and libcni."""

    dst: str
    gw: str | None = None
    mtu: int | None = None
    advmss: int | None = None
    priority: int | None = None
    table: int | None = None
    scope: int | None = None

    @field_validator("dst", mode="plain")
    @classmethod
    def _net(cls, value: object) -> str:
        return str(parse_cidr(value, strict=False))

    @field_validator("gw", mode="plain")
    @classmethod
    def _gw(cls, value: object) -> str | None:
        return None if value is None else str(parse_ip(value))

    def to_result(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class DNS(_Model):
    nameservers: list[str] = Field(default_factory=list)
    domain: str | None = None
    search: list[str] = Field(default_factory=list)
    options: list[str] = Field(default_factory=list)


class Result(_Model):
    cni_version: str = Field(default=version.CURRENT, alias="cniVersion")
    interfaces: list[Interface] = Field(default_factory=list)
    ips: list[IPConfig] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=list)
    dns: DNS = Field(default_factory=DNS)

    def to_version(self, target: str) -> dict[str, Any]:
        out = self.model_dump(by_alias=True, exclude_none=True)
        out["cniVersion"] = target
        if not out["dns"] or not any(out["dns"].values()):
            out["dns"] = {}
        if not version.at_least(target, "1.1.0"):
            for iface in out["interfaces"]:
                for key in _IFACE_1_1:
                    iface.pop(key, None)
            for route in out["routes"]:
                for key in _ROUTE_1_1:
                    route.pop(key, None)
        if not version.at_least(target, "1.0.0"):
            for ip, model in zip(out["ips"], self.ips, strict=True):
                ip["version"] = str(model.family)
        return out


def parse_result(data: Any, what: str = "result") -> Result:
    """Parse a result of any supported version (e.g. an IPAM reply or a prevResult)."""
    if not isinstance(data, dict):
        raise CNIError(DECODE_FAILURE, f"failed to decode {what}", "a JSON object is required")
    try:
        return Result.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise CNIError(DECODE_FAILURE, f"failed to decode {what}", f"{loc}: {first['msg']}") from exc


def convert_result(result: dict[str, Any], to_version: str) -> dict[str, Any]:
    return parse_result(result).to_version(to_version)
