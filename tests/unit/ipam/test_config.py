"""ipam.config: canonicalisation of the ipam block, and an error naming the field for every
validation failure."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from cnikit.spec.errors import INVALID_CONFIG, CNIError
from ipam.config import DEFAULT_DATA_DIR, load_ipam_config

ip = ipaddress.ip_address


def conf(block: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"cniVersion": "1.1.0", "name": "net1", "type": "pybridge",
            "ipam": {"type": "pyipam", **block}, **top}


V4 = {"subnet": "10.1.0.0/24"}


def test_defaults_v4() -> None:
    cfg = load_ipam_config(conf({"ranges": [[V4]]}), {})
    (r,), = cfg.ranges
    assert (str(r.range_start), str(r.range_end), str(r.gateway)) == (
        "10.1.0.1", "10.1.0.254", "10.1.0.1")
    assert cfg.network == "net1"
    assert cfg.data_dir == DEFAULT_DATA_DIR
    assert cfg.lock_timeout == 10.0
    assert cfg.routes == () and cfg.resolv_conf is None and cfg.requested_ips == ()


def test_defaults_v6_end_is_last_address() -> None:
    cfg = load_ipam_config(conf({"ranges": [[{"subnet": "fd00::/120"}]]}), {})
    (r,), = cfg.ranges
    assert (str(r.range_start), str(r.range_end), str(r.gateway)) == (
        "fd00::1", "fd00::ff", "fd00::1")


def test_explicit_values_kept() -> None:
    rng = {"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.10", "rangeEnd": "10.1.0.20",
           "gateway": "10.1.0.254"}
    cfg = load_ipam_config(conf({"ranges": [[rng]], "dataDir": "/run/ipam",
                                 "lockTimeout": 2.5, "resolvConf": "/etc/resolv.conf"}), {})
    (r,), = cfg.ranges
    assert str(r) == "10.1.0.10-10.1.0.20"
    assert r.gateway == ip("10.1.0.254")
    assert (cfg.data_dir, cfg.lock_timeout, cfg.resolv_conf) == (
        "/run/ipam", 2.5, "/etc/resolv.conf")


def test_range_sets_order_runtime_then_legacy_then_ranges() -> None:
    netconf = conf(
        {"subnet": "10.2.0.0/24", "gateway": "10.2.0.254", "ranges": [[V4]]},
        runtimeConfig={"ipRanges": [[{"subnet": "10.3.0.0/24"}]]},
    )
    cfg = load_ipam_config(netconf, {})
    assert [str(rs[0].subnet) for rs in cfg.ranges] == ["10.3.0.0/24", "10.2.0.0/24", "10.1.0.0/24"]
    assert cfg.ranges[1][0].gateway == ip("10.2.0.254")


def test_routes_passed_through_canonical() -> None:
    routes = [{"dst": "0.0.0.0/0"}, {"dst": "10.9.0.1/16", "gw": "10.1.0.1", "mtu": 1400}]
    cfg = load_ipam_config(conf({"ranges": [[V4]], "routes": routes}), {})
    assert [r.to_result() for r in cfg.routes] == [
        {"dst": "0.0.0.0/0"}, {"dst": "10.9.0.0/16", "gw": "10.1.0.1", "mtu": 1400}]


def test_requested_ips_union_in_order() -> None:
    netconf = conf({"ranges": [[V4]]},
                   args={"cni": {"ips": ["10.1.0.7", "10.1.0.5"]}},
                   runtimeConfig={"ips": ["10.1.0.8/24"]})
    cfg = load_ipam_config(netconf, {"IP": "10.1.0.5/24, 10.1.0.6"})
    assert cfg.requested_ips == tuple(ip(a) for a in ("10.1.0.5", "10.1.0.6", "10.1.0.7", "10.1.0.8"))


@pytest.mark.parametrize(
    ("capabilities", "honoured"),
    [(None, True), ({"ips": True, "ipRanges": True}, True), ({"ips": False}, False), ({}, False)],
)
def test_runtime_config_needs_capability(capabilities: dict[str, bool] | None,
                                         honoured: bool) -> None:
    top: dict[str, Any] = {"runtimeConfig": {"ips": ["10.1.0.9"],
                                             "ipRanges": [[{"subnet": "10.5.0.0/24"}]]}}
    if capabilities is not None:
        top["capabilities"] = capabilities
    cfg = load_ipam_config(conf({"ranges": [[V4]]}, **top), {})
    assert (cfg.requested_ips == (ip("10.1.0.9"),)) is honoured
    assert (len(cfg.ranges) == 2) is honoured


def test_disjoint_ranges_in_one_subnet_allowed() -> None:
    a = {"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.10", "rangeEnd": "10.1.0.19"}
    b = {"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.20", "rangeEnd": "10.1.0.29"}
    assert len(load_ipam_config(conf({"ranges": [[a, b]]}), {}).ranges[0]) == 2


def r0(**fields: Any) -> dict[str, Any]:
    """`ranges` with one range set holding one range."""
    return {"ranges": [[{**V4, **fields}]]}


# (field the error must name, ipam block overrides, netconf overrides, text in details)
BAD: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("ipam.ranges[0][0].subnet", r0(subnet="10.1.0.5/24"), {}, "host bits"),
    ("ipam.ranges[0][0].subnet", r0(subnet="10.1.0.0/31"), {}, "too small"),
    ("ipam.ranges[0][0].subnet", r0(subnet="10.1.0.0/32"), {}, "too small"),
    ("ipam.ranges[0][0].subnet", r0(subnet="fd00::/127"), {}, "too small"),
    ("ipam.ranges[0][0].subnet", r0(subnet="fd00::/128"), {}, "too small"),
    ("ipam.ranges[0][0].subnet", r0(subnet="10.1.0.0"), {}, "CIDR"),
    ("ipam.ranges[0][0].subnet", r0(subnet="banana/24"), {}, "not a CIDR"),
    ("ipam.ranges[0][0].subnet", r0(subnet=24), {}, "CIDR"),
    ("ipam.ranges[0][0].subnet", {"ranges": [[{"gateway": "10.1.0.1"}]]}, {}, "required"),
    ("ipam.ranges[0][0].rangeStart", r0(rangeStart="10.2.0.1"), {}, "outside subnet"),
    ("ipam.ranges[0][0].rangeEnd", r0(rangeEnd="10.1.1.1"), {}, "outside subnet"),
    ("ipam.ranges[0][0].rangeEnd", r0(rangeStart="10.1.0.9", rangeEnd="10.1.0.8"), {},
     "before rangeStart"),
    ("ipam.ranges[0][0].gateway", r0(gateway="10.9.0.1"), {}, "outside subnet"),
    ("ipam.ranges[0][0].gateway", r0(gateway="fd00::1"), {}, "outside subnet"),
    ("ipam.ranges[0][0].gateway", r0(gateway="x"), {}, "not an IP"),
    ("ipam.ranges[0][0].gateway", r0(gateway="fe80::1%eth0"), {}, "scoped"),
    ("ipam.ranges[1]", {"ranges": [[V4], []]}, {}, "at least one range"),
    ("ipam.ranges[0]", {"ranges": [[V4, {"subnet": "fd00::/64"}]]}, {}, "mixed address families"),
    ("ipam.ranges[0]", {"ranges": [[V4, {"subnet": "10.1.0.0/25"}]]}, {}, "overlaps"),
    ("ipam.ranges", {"ranges": []}, {}, "no IP ranges"),
    ("ipam.ranges", {"ranges": [[V4], [{"subnet": "10.1.0.128/25"}]]}, {},
     "range set 0 (10.1.0.1-10.1.0.254) overlaps range set 1"),
    ("ipam.ranges", {"subnet": "10.1.0.0/16"}, {}, "overlaps"),
    ("ipam.type", {"type": ""}, {}, "at least 1"),
    ("ipam.dataDir", {"dataDir": "relative/dir"}, {}, "absolute"),
    ("ipam.dataDir", {"dataDir": "/var/../etc"}, {}, "absolute"),
    ("ipam.dataDir", {"dataDir": "/var/lib\0x"}, {}, "absolute"),
    ("ipam.resolvConf", {"resolvConf": "resolv.conf"}, {}, "absolute"),
    ("ipam.lockTimeout", {"lockTimeout": 0}, {}, "greater than 0"),
    ("ipam.lockTimeout", {"lockTimeout": 301}, {}, "less than or equal"),
    ("ipam.lockTimeout", {"lockTimeout": True}, {}, "number"),
    ("ipam.routes[0].dst", {"routes": [{"dst": "nowhere"}]}, {}, "CIDR"),
    ("ipam.routes[1].gw", {"routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0", "gw": "1.2.3.400"}]},
     {}, "not an IP"),
    ("ipam.subnet", {"subnet": "10.9.0.1/16"}, {}, "host bits"),
    ("ipam.gateway", {"subnet": "10.9.0.0/16", "gateway": 7}, {}, "IP address"),
    ("runtimeConfig.ipRanges[0][0].subnet", {},
     {"runtimeConfig": {"ipRanges": [[{"subnet": "10.7.0.0/33"}]]}}, "not a CIDR"),
    ("runtimeConfig.ips[0]", {}, {"runtimeConfig": {"ips": ["10.1.0"]}}, "not an IP"),
    ("args.cni.ips[1]", {}, {"args": {"cni": {"ips": ["10.1.0.5", "nope"]}}}, "not an IP"),
    ("name", {}, {"name": "../escape"}, "must match"),
    ("name", {}, {"name": 5}, "string"),
    ("ipam", {}, {"ipam": "pyipam"}, "object"),
    ("runtimeConfig", {}, {"runtimeConfig": []}, "object"),
    ("capabilities", {}, {"runtimeConfig": {}, "capabilities": "ips"}, "object"),
]


@pytest.mark.parametrize(("path", "ipam", "top", "detail"), BAD)
def test_invalid_field_named(path: str, ipam: dict[str, Any], top: dict[str, Any],
                             detail: str) -> None:
    netconf = conf({**r0(), **ipam}, **top)
    with pytest.raises(CNIError) as exc_info:
        load_ipam_config(netconf, {})
    err = exc_info.value
    assert (err.code, err.msg) == (INVALID_CONFIG, f"invalid field '{path}'")
    assert detail in err.details


def test_cni_args_ip_error_named() -> None:
    with pytest.raises(CNIError) as exc_info:
        load_ipam_config(conf({"ranges": [[V4]]}), {"IP": "10.1.0.5,bogus"})
    assert exc_info.value.msg == "invalid field 'CNI_ARGS.IP[1]'"


def test_missing_name() -> None:
    netconf = conf(r0())
    del netconf["name"]
    with pytest.raises(CNIError, match="'name'"):
        load_ipam_config(netconf, {})
