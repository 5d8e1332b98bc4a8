"""The bridge netconf (anchors.md 2.1, reference `bridge.go` loadNetConf and cni.dev bridge.md).

- Defaults: bridge "cni0", every flag false, vlan 0 (none), no mtu.
- isDefaultGateway implies isGateway; hairpinMode with promiscMode is an error; IPAM together with
  disableContainerInterface is an error (code 7, invalid network config).
- vlan is 0..4094; an interface name is at most 15 chars without '/', ':' or whitespace.
- An unsupported field is code 2 and "the message must contain the key and value" (SPEC 5).
- MAC precedence, lowest to highest: CNI_ARGS MAC=, args.cni.mac, runtimeConfig.mac; runtimeConfig
  keys count only for capabilities the plugin declared (CONVENTIONS.md).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from cni_plugin import config
from cnikit.spec.errors import CNIError

UNSUPPORTED_FIELD = 2
INVALID_ENV = 4
INVALID_CONFIG = 7


def load(**extra: Any) -> config.BridgeConf:
    return config.load({"cniVersion": "1.0.0", "name": "testnet", "type": "pybridge", **extra})


def load_error(**extra: Any) -> CNIError:
    with pytest.raises(CNIError) as info:
        load(**extra)
    return info.value


def test_defaults() -> None:
    conf = load()
    assert conf.bridge == "cni0"
    for flag in ("is_gateway", "is_default_gateway", "force_address", "ip_masq", "hairpin_mode",
                 "promisc_mode", "port_isolation", "enable_dad", "disable_container_interface"):
        assert getattr(conf, flag) is False, flag
    assert conf.vlan == 0
    assert conf.mtu is None
    assert conf.ipam_type == ""
    assert conf.mac({}) is None
    assert conf.source_check is True  # pybridge's own: on unless turned off


@pytest.mark.parametrize(("value", "expected"), [(True, True), (False, False)])
def test_source_check_is_read(value: bool, expected: bool) -> None:
    assert load(sourceCheck=value).source_check is expected


@pytest.mark.parametrize("value", ["false", 0, None, "off"])
def test_source_check_must_be_a_boolean_code_7_naming_it(value: Any) -> None:
    err = load_error(sourceCheck=value)
    assert err.code == INVALID_CONFIG
    assert "sourceCheck" in err.msg


def test_json_keys_are_read() -> None:
    conf = load(bridge="br-test", isGateway=True, ipMasq=True, hairpinMode=True, mtu=1400,
                forceAddress=True, portIsolation=True, enabledad=True, ipam={"type": "host-local"})
    assert conf.bridge == "br-test"
    assert conf.is_gateway and conf.ip_masq and conf.hairpin_mode and conf.force_address
    assert conf.port_isolation and conf.enable_dad
    assert conf.mtu == 1400
    assert conf.ipam_type == "host-local"
    assert load(vlan=100).vlan == 100


@pytest.mark.parametrize("gateway", [{"isGateway": True}, {"isDefaultGateway": True}])
def test_a_gateway_on_a_vlan_is_unsupported_code_2(gateway: dict[str, Any]) -> None:
    err = load_error(vlan=100, **gateway)
    assert err.code == UNSUPPORTED_FIELD and "'vlan' with 'isGateway'" in err.msg


@pytest.mark.parametrize(
    ("given", "gateway", "default_gateway"),
    [
        ({}, False, False),
        ({"isGateway": True}, True, False),
        ({"isDefaultGateway": True}, True, True),
        ({"isDefaultGateway": True, "isGateway": False}, True, True),
        ({"isDefaultGateway": False, "isGateway": True}, True, False),
    ],
)
def test_default_gateway_implies_gateway(given: dict[str, Any], gateway: bool, default_gateway: bool) -> None:
    conf = load(**given)
    assert conf.is_gateway is gateway
    assert conf.is_default_gateway is default_gateway


@pytest.mark.parametrize(
    ("hairpin", "promisc", "ok"),
    [(False, False, True), (True, False, True), (False, True, True), (True, True, False)],
)
def test_hairpin_and_promisc_are_exclusive(hairpin: bool, promisc: bool, ok: bool) -> None:
    if ok:
        conf = load(hairpinMode=hairpin, promiscMode=promisc)
        assert (conf.hairpin_mode, conf.promisc_mode) == (hairpin, promisc)
    else:
        err = load_error(hairpinMode=hairpin, promiscMode=promisc)
        assert err.code == INVALID_CONFIG
        assert "hairpinMode" in str(err) and "promiscMode" in str(err)


@pytest.mark.parametrize(
    ("ipam", "ok"),
    [({}, True), ({"subnet": "10.0.0.0/24"}, True), ({"type": "host-local"}, False),
     ({"type": "pyipam"}, False)],
)
def test_disable_container_interface_excludes_ipam(ipam: dict[str, Any], ok: bool) -> None:
    if ok:
        assert load(disableContainerInterface=True, ipam=ipam).disable_container_interface is True
    else:
        err = load_error(disableContainerInterface=True, ipam=ipam)
        assert err.code == INVALID_CONFIG
        assert "disableContainerInterface" in str(err)


@pytest.mark.parametrize("mtu", [68, 576, 1280, 1500, 9000, 65535])
def test_mtu_in_range(mtu: int) -> None:
    assert load(mtu=mtu).mtu == mtu


@pytest.mark.parametrize("mtu", [-1, 67, 65536, 1 << 32, "big", [1500]])
def test_mtu_out_of_range_is_code_7(mtu: Any) -> None:
    err = load_error(mtu=mtu)
    assert err.code == INVALID_CONFIG
    assert "mtu" in err.msg


@pytest.mark.parametrize("vlan", [0, 1, 100, 4094])
def test_vlan_in_range(vlan: int) -> None:
    assert load(vlan=vlan).vlan == vlan


@pytest.mark.parametrize("vlan", [-1, 4095, 65536, "ten"])
def test_vlan_out_of_range_is_code_7(vlan: Any) -> None:
    err = load_error(vlan=vlan)
    assert err.code == INVALID_CONFIG
    assert "vlan" in err.msg


@pytest.mark.parametrize("bridge", ["br0", "cni0", "b" * 15, "br-pods_1", "br.100"])
def test_bridge_name_ok(bridge: str) -> None:
    assert load(bridge=bridge).bridge == bridge


@pytest.mark.parametrize("bridge", ["", "b" * 16, "br/0", "br:0", "br 0", "br\t0", "br0\n", ".", "..", 7])
def test_bad_bridge_name_is_code_7(bridge: Any) -> None:
    err = load_error(bridge=bridge)
    assert err.code == INVALID_CONFIG
    assert "bridge" in err.msg


@pytest.mark.parametrize(
    ("key", "value"),
    [("vlanTrunk", [{"id": 101}, {"minID": 200, "maxID": 299}]), ("macspoofchk", True),
     ("preserveDefaultVlan", True)],
)
def test_unsupported_field_is_code_2_naming_key_and_value(key: str, value: Any) -> None:
    err = load_error(**{key: value})
    assert err.code == UNSUPPORTED_FIELD
    assert key in err.msg
    text = str(err)
    assert key in text
    # the value must appear too (SPEC: "must contain the key and value of the unsupported field")
    if isinstance(value, list):
        assert "101" in text and "299" in text
    else:
        assert str(value).lower() in text.lower()


@pytest.mark.parametrize(("key", "value"), [("vlanTrunk", []), ("macspoofchk", False)])
def test_unsupported_field_off_is_accepted(key: str, value: Any) -> None:
    assert load(**{key: value}).name == "testnet"


@pytest.mark.parametrize("ipam_type", ["../../bin/sh", "/usr/bin/evil", "a b", 5])
def test_ipam_type_must_be_a_plugin_name(ipam_type: Any) -> None:
    err = load_error(ipam={"type": ipam_type})
    assert err.code == INVALID_CONFIG
    assert "ipam" in err.msg


# Go's encoding/json refuses a string for a bool and a bool for an int; coercing them silently
# turns a typo into a live setting ("vlan": true became VLAN 1).
@pytest.mark.parametrize(("key", "value"), [("vlan", True), ("isGateway", "yes"), ("mtu", "1500"),
                                            ("hairpinMode", 1)])
def test_wrong_json_type_is_code_7(key: str, value: Any) -> None:
    err = load_error(**{key: value})
    assert err.code == INVALID_CONFIG
    assert key in err.msg


# --- MAC address precedence -----------------------------------------------------------------

MAC_ARGS = "0a:58:00:00:00:01"  # from CNI_ARGS MAC=
MAC_CNI = "0a:58:00:00:00:02"  # from args.cni.mac
MAC_RT = "0a:58:00:00:00:03"  # from runtimeConfig.mac


def mac_sources(from_env: bool, from_args: bool, from_runtime: bool) -> tuple[dict[str, Any], dict[str, str]]:
    extra: dict[str, Any] = {}
    if from_args:
        extra["args"] = {"cni": {"mac": MAC_CNI}}
    if from_runtime:
        extra["runtimeConfig"] = {"mac": MAC_RT}
    cni_args = {"IgnoreUnknown": "1", "MAC": MAC_ARGS} if from_env else {"IgnoreUnknown": "1"}
    return extra, cni_args


# All 8 combinations; the expected winner is the highest-precedence source present.
MAC_TABLE = [
    (env, args, rt, MAC_RT if rt else MAC_CNI if args else MAC_ARGS if env else None)
    for env, args, rt in itertools.product([False, True], repeat=3)
]


@pytest.mark.parametrize(("from_env", "from_args", "from_runtime", "expected"), MAC_TABLE)
@pytest.mark.parametrize("capabilities", [None, {"mac": True}])
def test_mac_precedence(from_env: bool, from_args: bool, from_runtime: bool, expected: str | None,
                        capabilities: dict[str, bool] | None) -> None:
    extra, cni_args = mac_sources(from_env, from_args, from_runtime)
    if capabilities is not None:
        extra["capabilities"] = capabilities
    assert load(**extra).mac(cni_args) == expected


@pytest.mark.parametrize("capabilities", [{}, {"mac": False}, {"portMappings": True}, {"ips": True}])
@pytest.mark.parametrize("from_args", [False, True])
def test_runtime_mac_ignored_without_declared_capability(capabilities: dict[str, bool],
                                                         from_args: bool) -> None:
    extra, cni_args = mac_sources(True, from_args, True)
    extra["capabilities"] = capabilities
    assert load(**extra).mac(cni_args) == (MAC_CNI if from_args else MAC_ARGS)


UPPER = "0A:58:0A:F4:00:2B"


@pytest.mark.parametrize("source", ["env", "args", "runtime"])
def test_uppercase_mac_is_normalised(source: str) -> None:
    extra: dict[str, Any] = {}
    cni_args: dict[str, str] = {}
    if source == "env":
        cni_args["MAC"] = UPPER
    elif source == "args":
        extra["args"] = {"cni": {"mac": UPPER}}
    else:
        extra["runtimeConfig"] = {"mac": UPPER}
    assert load(**extra).mac(cni_args) == UPPER.lower()


BAD_MACS = ["01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff", "33:33:00:00:00:01", "0a:58:0a:f4:00",
            "0a:58:0a:f4:00:02:03", "zz:58:0a:f4:00:02", "0a580af40002", ""]


@pytest.mark.parametrize("mac", BAD_MACS)
@pytest.mark.parametrize("source", ["args", "runtime"])
def test_bad_mac_in_config_is_code_7(mac: str, source: str) -> None:
    extra = {"args": {"cni": {"mac": mac}}} if source == "args" else {"runtimeConfig": {"mac": mac}}
    err = load_error(**extra)
    assert err.code == INVALID_CONFIG
    assert "mac" in err.msg


@pytest.mark.parametrize("mac", BAD_MACS)
def test_bad_mac_in_cni_args_is_rejected(mac: str) -> None:
    conf = load()
    with pytest.raises(CNIError) as info:
        conf.mac({"MAC": mac})
    assert info.value.code in (INVALID_ENV, INVALID_CONFIG)
    assert "MAC" in str(info.value)


def test_unicast_locally_administered_mac_is_accepted() -> None:
    # first octet 0x02: locally administered, unicast (bit 0 clear)
    assert load(args={"cni": {"mac": "02:00:00:00:00:01"}}).mac({}) == "02:00:00:00:00:01"
