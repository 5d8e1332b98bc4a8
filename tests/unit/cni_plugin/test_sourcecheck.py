"""The source check's rules (sourcecheck.py) as text: what each port lets in, from the pod's MAC
and IPAM addresses. The netns tier (tests/netns/test_sourcecheck.py) shows nft and the bridge
enforce them."""

from __future__ import annotations

import errno
from ipaddress import IPv6Address, ip_interface

import pytest

from cni_plugin import sourcecheck
from cni_plugin.netlink import NetlinkError
from cnikit.ip import IPInterface
from cnikit.spec.errors import SOURCE_CHECK_FAILED, CNIError

MAC = "52:54:00:12:34:56"
V4 = ip_interface("10.88.0.5/24")
V6 = ip_interface("fd88::5/64")


def test_link_local_is_the_kernels_eui64_of_the_mac() -> None:
    # As the kernel derives it (RFC 4291 appendix A): U/L bit flipped, ff:fe in the middle.
    assert sourcecheck.link_local(MAC) == IPv6Address("fe80::5054:ff:fe12:3456")
    assert sourcecheck.link_local("0a:58:0a:f4:00:02") == IPv6Address("fe80::858:aff:fef4:2")


def _text(mac: str, addrs: list[IPInterface], ipv6: bool) -> list[str]:
    return [str(rule) for rule in sourcecheck.port_rules(mac, addrs, ipv6)]


def test_every_port_drops_router_nd_and_other_macs() -> None:
    rules = _text(MAC, [], ipv6=True)
    assert rules == [f"ether saddr != {MAC} drop",
                     "icmpv6 type { nd-router-advert, nd-redirect } drop",
                     "icmpv6 type nd-neighbor-advert @th,32,1 1 drop"]


def test_ipv4_only_pod_sends_only_ipv4_and_arp_from_its_address() -> None:
    rules = _text(MAC, [V4], ipv6=False)
    assert "ether type != { ip, arp } drop" in rules
    assert "arp saddr ip != { 10.88.0.5 } drop" in rules and f"arp saddr ether != {MAC} drop" in rules
    assert "ip saddr != { 10.88.0.5 } drop" in rules
    assert not any("ip6 saddr" in r for r in rules)


def test_dual_stack_pod_may_send_from_its_addresses_its_link_local_and_unspecified_for_dad() -> None:
    rules = _text(MAC, [V4, V6], ipv6=True)
    assert "ether type != { ip, arp, ip6 } drop" in rules
    assert "ip6 saddr != { fd88::5, fe80::5054:ff:fe12:3456 } drop" in rules
    dad = next(i for i, r in enumerate(rules) if r.startswith("ip6 saddr :: "))
    assert "nd-neighbor-solicit" in rules[dad]
    # :: passes only after the router-ND drops and before the source rule
    assert rules.index("icmpv6 type { nd-router-advert, nd-redirect } drop") < dad < len(rules) - 1


@pytest.mark.parametrize(("port", "mac"), [('veth1" drop', MAC), ("veth1", "52:54:00:12:34"),
                                           ("veth1", "52:54:00:12:34:56 drop"), ("", MAC)])
def test_setup_refuses_what_is_not_a_port_name_or_mac(port: str, mac: str) -> None:
    with pytest.raises(CNIError) as info:
        sourcecheck.setup("net", "cid", "eth0", port, mac, [V4], ipv6=False)
    assert info.value.msg == "invalid port for the source check"


def _setup_sending(monkeypatch: pytest.MonkeyPatch, failure: OSError) -> list[str]:
    """setup() whose batch fails with `failure`: the nft scripts it then ran."""
    ran: list[str] = []

    def send(*_: object) -> None:
        raise failure
    monkeypatch.setattr(sourcecheck, "_have_nft", lambda: True)
    monkeypatch.setattr(sourcecheck.nfbatch, "send", send)
    monkeypatch.setattr(sourcecheck.nftables, "run", lambda script, **_: ran.append(script) or "")
    sourcecheck.setup("net", "cid", "eth0", "veth1", MAC, [V4], ipv6=False)
    return ran


def test_a_batch_refused_for_another_reason_is_a_spec_error_and_runs_no_nft(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CNIError) as info:
        _setup_sending(monkeypatch, NetlinkError(errno.EPERM, "Operation not permitted"))
    assert info.value.code == SOURCE_CHECK_FAILED and "Operation not permitted" in str(info.value.details)


def test_a_failed_socket_falls_back_to_nfts_one_run(monkeypatch: pytest.MonkeyPatch) -> None:
    [script] = _setup_sending(monkeypatch, OSError(errno.EMFILE, "Too many open files"))
    assert script.startswith("create chain bridge pybridge ") and "ip saddr != { 10.88.0.5 } drop" in script


def test_addresses_past_what_one_netlink_attribute_holds_go_to_nft(monkeypatch: pytest.MonkeyPatch) -> None:
    """An address set's elements are one attribute (64 KiB at most): thousands of IPAM addresses
    take nft's one run, not a traceback."""
    ran: list[str] = []

    def send(*_: object) -> None:
        raise AssertionError("sent")
    monkeypatch.setattr(sourcecheck, "_have_nft", lambda: True)
    monkeypatch.setattr(sourcecheck.nfbatch, "send", send)
    monkeypatch.setattr(sourcecheck.nftables, "run", lambda script, **_: ran.append(script) or "")
    many = [ip_interface(f"fd88::{i:x}/64") for i in range(1, 3000)]
    sourcecheck.setup("net", "cid", "eth0", "veth1", MAC, many, ipv6=True)
    assert len(ran) == 1 and "fd88::bb7" in ran[0]
