"""The `ipam` block of a netconf, validated and canonicalised once at load (host-local semantics).

Range sets come from three places, in this order (as host-local prepends them):
`runtimeConfig.ipRanges`, the legacy top-level `ipam.subnet`/`rangeStart`/`rangeEnd`/`gateway`,
then `ipam.ranges`. Each source is validated on its own so an error names the field the user
wrote, e.g. `ipam.ranges[0][0].subnet` or `runtimeConfig.ipRanges[1][0].gateway`.
"""

from __future__ import annotations

import functools
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import combinations
from typing import Annotated, Any, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictFloat,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cnikit.ip import IPAddress, IPNetwork, parse_cidr, parse_ip
from cnikit.spec.errors import INVALID_CONFIG, CNIError
from cnikit.spec.names import absolute_path, validate_network_name
from cnikit.spec.result import Route
from cnikit.spec.validation import config_error, declared_runtime_config

DEFAULT_DATA_DIR = "/var/lib/cni/networks"
DEFAULT_LOCK_TIMEOUT = 10.0
MAX_LOCK_TIMEOUT = 300.0

T = TypeVar("T")


def _parse_requested_ip(value: object) -> IPAddress:
    """A requested IP may carry a prefix ("10.1.0.5/24"); only the address matters."""
    if isinstance(value, str) and "/" in value:
        try:
            return ipaddress.ip_interface(value).ip
        except ValueError:
            raise ValueError("not an IP address or IP/prefix") from None
    return parse_ip(value)


def parse_subnet(value: object) -> IPNetwork:
    net = parse_cidr(value, strict=True)
    # host-local: "too small to allocate from" once fewer than 4 addresses (v4) remain.
    if net.prefixlen > net.max_prefixlen - 2:
        raise ValueError(f"network {net} is too small to allocate from")
    return net


Address = Annotated[IPAddress, PlainValidator(parse_ip)]
RequestedIP = Annotated[IPAddress, PlainValidator(_parse_requested_ip)]
Subnet = Annotated[IPNetwork, PlainValidator(parse_subnet)]
AbsolutePath = Annotated[str, AfterValidator(absolute_path)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Range(_Model):
    """One pool: addresses rangeStart..rangeEnd (inclusive) of subnet, minus the gateway."""

    subnet: Subnet
    range_start: Address = Field(alias="rangeStart")
    range_end: Address = Field(alias="rangeEnd")
    gateway: Address

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        try:
            net = parse_subnet(data.get("subnet"))
        except ValueError:
            return data  # the subnet field reports it
        first = net.network_address + 1
        # host-local: v4 stops before the broadcast address, v6 uses the last address.
        last = net.broadcast_address - 1 if net.version == 4 else net.broadcast_address
        given = {key: value for key, value in data.items() if value is not None}
        return {"rangeStart": first, "rangeEnd": last, "gateway": first, **given}

    @field_validator("range_start", "range_end", "gateway")
    @classmethod
    def _inside_subnet(cls, ip: IPAddress, info: ValidationInfo) -> IPAddress:
        net = info.data.get("subnet")
        if net is None:
            return ip
        if ip not in net:
            raise ValueError(f"outside subnet {net}")
        start = info.data.get("range_start")
        if info.field_name == "range_end" and start is not None and ip < start:
            raise ValueError(f"before rangeStart {start}")
        return ip

    def contains(self, ip: IPAddress) -> bool:
        same_family = ip.version == self.subnet.version
        return same_family and int(self.range_start) <= int(ip) <= int(self.range_end)

    def __str__(self) -> str:
        return f"{self.range_start}-{self.range_end}"


RangeSet = tuple[Range, ...]


def pool_size(range_sets: tuple[RangeSet, ...]) -> int:
    """Allocatable addresses: each range's start..end, less its gateway when inside it."""
    size = 0
    for r in (r for range_set in range_sets for r in range_set):
        size += int(r.range_end) - int(r.range_start) + 1
        size -= int(r.range_start) <= int(r.gateway) <= int(r.range_end)
    return size



def _overlaps(a: Range, b: Range) -> bool:
    return a.contains(b.range_start) or a.contains(b.range_end) or b.contains(a.range_start)


def _check_range_set(ranges: RangeSet) -> RangeSet:
    if not ranges:
        raise ValueError("a range set needs at least one range")
    for other in ranges[1:]:
        if other.subnet.version != ranges[0].subnet.version:
            raise ValueError(f"mixed address families in one range set: {ranges[0]} and {other}")
    for a, b in combinations(ranges, 2):
        if _overlaps(a, b):
            raise ValueError(f"range {a} overlaps range {b}")
    return ranges


_ValidRangeSet = Annotated[RangeSet, AfterValidator(_check_range_set)]


def describe(range_set: RangeSet) -> str:
    return ",".join(str(r) for r in range_set)


def subnets(range_set: RangeSet) -> str:
    """The set's subnets, each once, in order: "10.244.1.0/24"."""
    return ",".join(dict.fromkeys(str(r.subnet) for r in range_set))


class _IPAMBlock(_Model):
    type: str = Field(min_length=1)
    ranges: tuple[_ValidRangeSet, ...] = ()
    routes: tuple[Route, ...] = ()
    data_dir: AbsolutePath = Field(DEFAULT_DATA_DIR, alias="dataDir")
    resolv_conf: AbsolutePath | None = Field(None, alias="resolvConf")
    lock_timeout: StrictFloat = Field(
        DEFAULT_LOCK_TIMEOUT, alias="lockTimeout", gt=0, le=MAX_LOCK_TIMEOUT
    )


class _RuntimeConfig(_Model):
    ips: tuple[RequestedIP, ...] = ()
    ip_ranges: tuple[_ValidRangeSet, ...] = Field((), alias="ipRanges")


class _CNIArgs(_Model):
    ips: tuple[RequestedIP, ...] = ()


class _Args(_Model):
    cni: _CNIArgs = _CNIArgs()


_BLOCK = TypeAdapter(_IPAMBlock)
_LEGACY = TypeAdapter(Range)
_RUNTIME = TypeAdapter(_RuntimeConfig)
_ARGS = TypeAdapter(_Args)
_IP_LIST = TypeAdapter(tuple[RequestedIP, ...])

_LEGACY_KEYS = ("subnet", "rangeStart", "rangeEnd", "gateway")


@dataclass(frozen=True)
class IPAMConfig:
    network: str
    ranges: tuple[RangeSet, ...]
    routes: tuple[Route, ...]
    data_dir: str
    resolv_conf: str | None
    lock_timeout: float
    requested_ips: tuple[IPAddress, ...]


def _validate(adapter: TypeAdapter[T], data: object, prefix: str) -> T:
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        raise config_error(exc, prefix) from None


def _invalid(path: str, details: str) -> CNIError:
    return CNIError(INVALID_CONFIG, f"invalid field '{path}'", details)


def _runtime_config(netconf: Mapping[str, Any]) -> _RuntimeConfig:
    raw = declared_runtime_config(netconf)
    if raw is None:
        return _RuntimeConfig()
    if not isinstance(raw, dict):
        raise _invalid("runtimeConfig", "an object is required")
    return _validate(_RUNTIME, raw, "runtimeConfig")


def _requested_ips(
    netconf: Mapping[str, Any], cni_args: Mapping[str, str], runtime: _RuntimeConfig
) -> tuple[IPAddress, ...]:
    from_env: tuple[IPAddress, ...] = ()
    if cni_args.get("IP"):
        items = [item.strip() for item in cni_args["IP"].split(",")]
        from_env = _validate(_IP_LIST, items, "CNI_ARGS.IP")
    args = _validate(_ARGS, netconf.get("args") or {}, "args")
    # The union in source order (CNI_ARGS, args.cni, runtimeConfig), without repeats.
    return tuple(dict.fromkeys((*from_env, *args.cni.ips, *runtime.ips)))


def _check_disjoint(range_sets: tuple[RangeSet, ...]) -> None:
    if not range_sets:
        raise _invalid("ipam.ranges", "no IP ranges specified")
    for (i, a), (j, b) in combinations(enumerate(range_sets), 2):
        if any(_overlaps(x, y) for x in a for y in b):
            raise _invalid(
                "ipam.ranges",
                f"range set {i} ({describe(a)}) overlaps range set {j} ({describe(b)})",
            )


# What of a netconf and CNI_ARGS the IPAM config is made of (nothing else is read).
_INPUTS = ("name", "ipam", "runtimeConfig", "capabilities", "args")
# A long-lived caller (the agent) loads the same few configs for every call: parsing one cost an
# ADD ~0.2 ms (pydantic, ipaddress), a hit ~0.02. Bounded in entries and in each key's size;
# errors are not kept (each call raises its own). The config is frozen, so sharing it is safe.
_KEPT_CONFIGS = 64
_MAX_KEY = 16 * 1024


def load_ipam_config(netconf: Mapping[str, Any], cni_args: Mapping[str, str]) -> IPAMConfig:
    try:
        key = json.dumps([*(netconf.get(k) for k in _INPUTS), cni_args.get("IP")])
    except (TypeError, ValueError, RecursionError):  # not JSON-shaped: parsed as it is
        return _load(netconf, cni_args)
    if len(key) > _MAX_KEY:
        return _load(netconf, cni_args)
    return _load_kept(key)


@functools.lru_cache(maxsize=_KEPT_CONFIGS)
def _load_kept(key: str) -> IPAMConfig:
    """The config of the inputs `key` holds (load_ipam_config's key: JSON keeps key order, so
    an invalid config's first error is the same as from the netconf itself)."""
    *values, ip = json.loads(key)
    netconf = {k: v for k, v in zip(_INPUTS, values, strict=True) if v is not None}
    return _load(netconf, {"IP": ip} if ip is not None else {})


def _load(netconf: Mapping[str, Any], cni_args: Mapping[str, str]) -> IPAMConfig:
    name = netconf.get("name")
    if not isinstance(name, str):
        raise _invalid("name", "a string is required")
    validate_network_name(name)
    raw = netconf.get("ipam")
    if not isinstance(raw, dict):
        raise _invalid("ipam", "an object is required")
    block = _validate(_BLOCK, raw, "ipam")
    runtime = _runtime_config(netconf)
    legacy: tuple[RangeSet, ...] = ()
    if raw.get("subnet") is not None:
        legacy = ((_validate(_LEGACY, {k: raw.get(k) for k in _LEGACY_KEYS}, "ipam"),),)
    range_sets = (*runtime.ip_ranges, *legacy, *block.ranges)
    _check_disjoint(range_sets)
    return IPAMConfig(
        network=name,
        ranges=range_sets,
        routes=block.routes,
        data_dir=block.data_dir,
        resolv_conf=block.resolv_conf,
        lock_timeout=block.lock_timeout,
        requested_ips=_requested_ips(netconf, cni_args, runtime),
    )
