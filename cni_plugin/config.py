"""The bridge plugin's netconf: pydantic at the edge, canonicalised once at load."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cnikit.spec.args import validate_ifname
from cnikit.spec.errors import INVALID_CONFIG, UNSUPPORTED_FIELD, CNIError
from cnikit.spec.result import DNS
from cnikit.spec.validation import config_error, declared_runtime_config

_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")

# Reference bridge options we do not implement: refusing them beats silently ignoring them.
UNSUPPORTED = ("vlanTrunk", "macspoofchk", "preserveDefaultVlan")


def _mac(value: str | None) -> str | None:
    if value is None:
        return None
    if not _MAC.fullmatch(value) or int(value[:2], 16) & 1:
        raise ValueError("must be a unicast MAC address like 0a:58:0a:f4:00:02")
    return value.lower()


class _Model(BaseModel):
    # strict: a JSON string "yes" or a number 1 is not a boolean, as in the reference decoder.
    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)


MacAddress = Annotated[str | None, AfterValidator(_mac)]


class CniArgsBlock(_Model):
    mac: MacAddress = None
    ips: list[str] | None = None


class ArgsBlock(_Model):
    cni: CniArgsBlock = Field(default_factory=CniArgsBlock)


class RuntimeConfig(_Model):
    mac: MacAddress = None
    ips: list[str] | None = None


class BridgeConf(_Model):
    cni_version: str = Field(alias="cniVersion")
    name: str
    type: str = "pybridge"
    bridge: str = "cni0"
    is_gateway: bool = Field(default=False, alias="isGateway")
    is_default_gateway: bool = Field(default=False, alias="isDefaultGateway")
    force_address: bool = Field(default=False, alias="forceAddress")
    ip_masq: bool = Field(default=False, alias="ipMasq")
    ip_masq_backend: Literal["nftables", "iptables"] | None = Field(default=None, alias="ipMasqBackend")
    mtu: int | None = Field(default=None, ge=0, le=65535)
    hairpin_mode: bool = Field(default=False, alias="hairpinMode")
    promisc_mode: bool = Field(default=False, alias="promiscMode")
    port_isolation: bool = Field(default=False, alias="portIsolation")
    # Each port lets in only its pod's own MAC and addresses, and no router advertisements
    # (sourcecheck.py); not in the reference, so on unless turned off.
    source_check: bool = Field(default=True, alias="sourceCheck")
    vlan: int = Field(default=0, ge=0, le=4094)
    enable_dad: bool = Field(default=False, alias="enabledad")
    disable_container_interface: bool = Field(default=False, alias="disableContainerInterface")
    pod_ipv6_link_local: bool = Field(default=False, alias="podIPv6LinkLocal")
    ipam: dict[str, Any] = Field(default_factory=dict)
    dns: DNS | None = None
    log_file: str | None = Field(default=None, alias="logFile")
    args: ArgsBlock = Field(default_factory=ArgsBlock)
    runtime_config: RuntimeConfig = Field(default_factory=RuntimeConfig, alias="runtimeConfig")
    capabilities: dict[str, bool] | None = None
    prev_result: dict[str, Any] | None = Field(default=None, alias="prevResult")

    @field_validator("bridge")
    @classmethod
    def _bridge_name(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty")
        try:
            validate_ifname(value)
        except CNIError as exc:
            raise ValueError(exc.details) from None
        return value

    @field_validator("mtu")
    @classmethod
    def _mtu(cls, value: int | None) -> int | None:
        if value == 0:  # the reference treats 0 as unset
            return None
        if value is not None and value < 68:
            raise ValueError("must be 0 (unset) or at least 68")
        return value

    @field_validator("ipam")
    @classmethod
    def _ipam_type(cls, value: dict[str, Any]) -> dict[str, Any]:
        kind = value.get("type")
        if kind is not None and (not isinstance(kind, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", kind)):
            raise ValueError("ipam.type must be a plugin name (letters, digits, '_', '.', '-')")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> BridgeConf:
        if self.is_default_gateway:
            self.is_gateway = True
        if self.hairpin_mode and self.promisc_mode:
            raise ValueError("hairpinMode and promiscMode cannot both be set")
        if self.disable_container_interface and self.ipam_type:
            raise ValueError("disableContainerInterface cannot be used with IPAM")
        return self

    @property
    def ipam_type(self) -> str:
        kind = self.ipam.get("type")
        return kind if isinstance(kind, str) else ""

    def mac(self, cni_args: dict[str, str]) -> str | None:
        """MAC precedence, lowest to highest: CNI_ARGS MAC=, args.cni.mac, runtimeConfig.mac."""
        mac = None
        if "MAC" in cni_args:
            try:
                mac = _mac(cni_args["MAC"])
            except ValueError as exc:
                raise CNIError(INVALID_CONFIG, "invalid CNI_ARGS 'MAC'", str(exc)) from None
        mac = self.args.cni.mac or mac
        return self.runtime_config.mac or mac  # only a declared capability is left in it


def load(config: dict[str, Any]) -> BridgeConf:
    for key in UNSUPPORTED:
        if config.get(key):
            raise CNIError(UNSUPPORTED_FIELD, f"unsupported field '{key}'",
                           f"{key}={config[key]!r} is not implemented by pybridge")
    if config.get("runtimeConfig") is not None:
        config = {**config, "runtimeConfig": declared_runtime_config(config)}
    try:
        conf = BridgeConf.model_validate(config)
    except ValidationError as exc:
        raise config_error(exc) from None
    if conf.vlan and conf.is_gateway:  # after the model made isDefaultGateway imply isGateway
        raise CNIError(UNSUPPORTED_FIELD, "unsupported field 'vlan' with 'isGateway'",
                       "a gateway on a VLAN sub-interface is not implemented by pybridge")
    return conf
