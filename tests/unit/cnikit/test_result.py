"""Result models and version conversion (SPEC section 5 "ADD Success", anchors.md 1.13).

- 1.1.0: interfaces may carry mtu/socketPath/pciID, routes mtu/advmss/priority/table/scope.
- 1.0.0: same shape without the 1.1 additions; no `version` in ips[].
- 0.3.0/0.3.1/0.4.0: no 1.1 additions, and each ips[] entry has a required "version": "4"|"6".
- An undecodable result is code 6.
"""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cnikit.spec.errors import CNIError
from cnikit.spec.result import Result, convert_result, parse_result

DECODE_FAILURE = 6
OLD = ["0.3.0", "0.3.1", "0.4.0"]
IFACE_1_1 = {"mtu", "socketPath", "pciID"}
ROUTE_1_1 = {"mtu", "advmss", "priority", "table", "scope"}

RESULT_1_1: dict[str, Any] = {
    "cniVersion": "1.1.0",
    "interfaces": [
        {"name": "cni0", "mac": "0a:58:0a:01:00:01", "mtu": 1500},
        {"name": "veth1234", "mac": "6a:1b:2c:3d:4e:5f", "mtu": 1500},
        {"name": "eth0", "mac": "0a:58:0a:01:00:05", "mtu": 1500, "sandbox": "/var/run/netns/cni-1",
         "socketPath": "/run/vhost.sock", "pciID": "0000:00:1f.6"},
    ],
    "ips": [
        {"address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 2},
        {"address": "fd00:1::5/64", "gateway": "fd00:1::1", "interface": 2},
    ],
    "routes": [
        {"dst": "0.0.0.0/0", "gw": "10.1.0.1", "mtu": 1400, "advmss": 1360, "priority": 100, "table": 100,
         "scope": 0},
        {"dst": "::/0", "mtu": 1400, "scope": 253},
        {"dst": "192.168.0.0/24"},
    ],
    "dns": {"nameservers": ["10.96.0.10"], "domain": "cluster.local", "search": ["svc.cluster.local"],
            "options": ["ndots:5"]},
}


def without(d: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


@pytest.mark.parametrize("target", OLD)
def test_down_to_0x_adds_ip_version_and_drops_1_1_fields(target: str) -> None:
    out = convert_result(copy.deepcopy(RESULT_1_1), target)
    assert out["cniVersion"] == target
    assert [ip["version"] for ip in out["ips"]] == ["4", "6"]
    for ip, src in zip(out["ips"], RESULT_1_1["ips"], strict=True):
        assert without(ip, {"version"}) == src
    assert out["interfaces"] == [without(i, IFACE_1_1) for i in RESULT_1_1["interfaces"]]
    assert out["routes"] == [without(r, ROUTE_1_1) for r in RESULT_1_1["routes"]]
    assert out["dns"] == RESULT_1_1["dns"]


def test_down_to_1_0_drops_1_1_fields_and_has_no_ip_version() -> None:
    out = convert_result(copy.deepcopy(RESULT_1_1), "1.0.0")
    assert out["cniVersion"] == "1.0.0"
    assert out["ips"] == RESULT_1_1["ips"]
    assert all("version" not in ip for ip in out["ips"])
    assert out["interfaces"] == [without(i, IFACE_1_1) for i in RESULT_1_1["interfaces"]]
    assert out["routes"] == [without(r, ROUTE_1_1) for r in RESULT_1_1["routes"]]
    assert out["dns"] == RESULT_1_1["dns"]


def test_1_1_keeps_everything() -> None:
    out = convert_result(copy.deepcopy(RESULT_1_1), "1.1.0")
    assert out == RESULT_1_1


RESULT_0_4: dict[str, Any] = {
    "cniVersion": "0.4.0",
    "interfaces": [{"name": "eth0", "mac": "0a:58:0a:01:00:05", "sandbox": "/var/run/netns/cni-1"}],
    "ips": [
        {"version": "4", "address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 0},
        {"version": "6", "address": "fd00:1::5/64", "interface": 0},
    ],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}],
    "dns": {},
}


def test_0_4_prev_result_with_version_fields_parses() -> None:
    result = parse_result(copy.deepcopy(RESULT_0_4), "prevResult")
    assert isinstance(result, Result)
    assert [ip.address for ip in result.ips] == ["10.1.0.5/16", "fd00:1::5/64"]
    assert [ip.family for ip in result.ips] == [4, 6]
    assert result.interfaces[0].sandbox == "/var/run/netns/cni-1"
    assert result.routes[0].gw == "10.1.0.1"


@pytest.mark.parametrize("target", ["1.0.0", "1.1.0"])
def test_0_4_up_to_1_x_drops_ip_version(target: str) -> None:
    out = convert_result(copy.deepcopy(RESULT_0_4), target)
    assert out["cniVersion"] == target
    assert out["ips"] == [without(ip, {"version"}) for ip in RESULT_0_4["ips"]]
    assert out["interfaces"] == RESULT_0_4["interfaces"]
    assert out["routes"] == RESULT_0_4["routes"]


@pytest.mark.parametrize("target", OLD)
def test_0_4_round_trip_is_unchanged(target: str) -> None:
    out = convert_result(copy.deepcopy(RESULT_0_4), target)
    assert out == {**RESULT_0_4, "cniVersion": target}


def test_ipam_style_result_without_interfaces() -> None:
    # Delegated IPAM returns an abbreviated result: no interfaces, no ips[].interface.
    ipam = {"cniVersion": "1.0.0", "ips": [{"address": "10.22.0.2/16", "gateway": "10.22.0.1"}],
            "routes": [{"dst": "0.0.0.0/0"}], "dns": {}}
    out = convert_result(ipam, "0.3.1")
    assert out["ips"] == [{"version": "4", "address": "10.22.0.2/16", "gateway": "10.22.0.1"}]
    assert out["interfaces"] == []


def test_route_dst_is_read_as_its_network_like_go() -> None:
    # Go's ParseCIDR (libcni, host-local, the reference bridge) keeps a route's network: the one
    # Route model does the same for results and for `ipam.routes` alike.
    result = parse_result({"cniVersion": "1.1.0", "routes": [{"dst": "10.9.0.1/16", "gw": "10.1.0.1"},
                                                           {"dst": "fd00::5/8"}]})
    assert [r.to_result() for r in result.routes] == [{"dst": "10.9.0.0/16", "gw": "10.1.0.1"},
                                                      {"dst": "fd00::/8"}]


BAD_RESULTS = {
    "bad ipv4": {"ips": [{"address": "10.0.0.300/24"}]},
    "not an ip": {"ips": [{"address": "not-an-ip/24"}]},
    "bare ip, no prefix": {"ips": [{"address": "10.0.0.5"}]},
    "bad prefix": {"ips": [{"address": "10.0.0.5/33"}]},
    "missing address": {"ips": [{"gateway": "10.0.0.1"}]},
    "address not a string": {"ips": [{"address": 167772165}]},
    "bad route dst": {"routes": [{"dst": "10.0.0.0/40"}]},
    "route dst without prefix": {"routes": [{"dst": "10.0.0.0"}]},
    "route dst not a string": {"routes": [{"dst": 167772160}]},
    "scoped route gw": {"routes": [{"dst": "::/0", "gw": "fe80::1%eth0"}]},
    "missing route dst": {"routes": [{"gw": "10.0.0.1"}]},
    "interfaces not a list": {"interfaces": {"name": "eth0"}},
    "interface without name": {"interfaces": [{"mac": "0a:58:0a:01:00:05"}]},
    "ips not a list": {"ips": "10.0.0.5/24"},
}


@pytest.mark.parametrize("data", list(BAD_RESULTS.values()), ids=list(BAD_RESULTS))
def test_bad_result_is_code_6(data: dict[str, Any]) -> None:
    with pytest.raises(CNIError) as info:
        parse_result({"cniVersion": "1.0.0", **data}, "IPAM result")
    assert info.value.code == DECODE_FAILURE
    assert "IPAM result" in info.value.msg


@pytest.mark.parametrize("data", [None, [], "result", 42])
def test_non_object_result_is_code_6(data: Any) -> None:
    with pytest.raises(CNIError) as info:
        parse_result(data)
    assert info.value.code == DECODE_FAILURE


# Go's types decode gateways and route gateways as net.IP; an unparsable one fails to decode.
@pytest.mark.parametrize(
    "data",
    [
        {"ips": [{"address": "10.0.0.5/24", "gateway": "garbage"}]},
        {"ips": [{"address": "10.0.0.5/24", "gateway": "10.0.0.300"}]},
        {"routes": [{"dst": "0.0.0.0/0", "gw": "nope"}]},
    ],
    ids=["gateway-garbage", "gateway-bad-octet", "route-gw-garbage"],
)
def test_bad_gateway_is_code_6(data: dict[str, Any]) -> None:
    with pytest.raises(CNIError) as info:
        parse_result({"cniVersion": "1.0.0", **data}, "IPAM result")
    assert info.value.code == DECODE_FAILURE


# --- property: conversion is consistent for any valid result --------------------------------

v4 = st.tuples(st.ip_addresses(v=4), st.integers(0, 32)).map(lambda t: f"{t[0]}/{t[1]}")
v6 = st.tuples(st.ip_addresses(v=6), st.integers(0, 128)).map(lambda t: f"{t[0]}/{t[1]}")
ip_entries = st.lists(
    st.fixed_dictionaries({"address": st.one_of(v4, v6)}, optional={"interface": st.integers(0, 2)}),
    max_size=4,
)
routes = st.lists(
    st.fixed_dictionaries(
        {"dst": st.sampled_from(["0.0.0.0/0", "::/0", "10.0.0.0/8", "fd00::/8"])},
        optional={k: st.integers(0, 9000) for k in ROUTE_1_1},
    ),
    max_size=3,
)
ifaces = st.lists(
    st.fixed_dictionaries(
        {"name": st.sampled_from(["cni0", "veth0", "eth0"])},
        optional={"mtu": st.integers(68, 9000), "socketPath": st.just("/s"),
                  "pciID": st.just("0000:00:01.0")},
    ),
    max_size=3,
)
results = st.fixed_dictionaries({"cniVersion": st.just("1.1.0"), "interfaces": ifaces, "ips": ip_entries,
                                 "routes": routes})


@given(results, st.sampled_from([*OLD, "1.0.0", "1.1.0"]))
def test_conversion_properties(data: dict[str, Any], target: str) -> None:
    out = convert_result(copy.deepcopy(data), target)
    assert out["cniVersion"] == target
    assert len(out["ips"]) == len(data["ips"])
    for ip, src in zip(out["ips"], data["ips"], strict=True):
        assert ip["address"] == src["address"]
        if target in OLD:
            assert ip["version"] == str(ipaddress.ip_interface(src["address"]).version)
        else:
            assert "version" not in ip
    if target != "1.1.0":
        assert not any(IFACE_1_1 & set(i) for i in out["interfaces"])
        assert not any(ROUTE_1_1 & set(r) for r in out["routes"])
    else:
        assert out["interfaces"] == data["interfaces"]
        assert out["routes"] == data["routes"]
    # converting the converted result again to the same version changes nothing
    assert convert_result(copy.deepcopy(out), target) == out
