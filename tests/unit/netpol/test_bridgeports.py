"""bridgeports.Watch's bookkeeping on a fake kernel: what a notification makes it read again, and
that a failed read is never half kept (tests/netns/test_bridgeports.py runs it on the kernel)."""

from __future__ import annotations

import errno
import ipaddress
import struct
from collections import Counter
from collections.abc import Iterable

import pytest

from cni_plugin import rtnl
from cni_plugin.netlink import Link, NetlinkError
from cni_plugin.node.netpol import bridgeports
from cnikit.ip import IPInterface

BRIDGE = Link(index=2, name="br0", mac="", mtu=1500, kind="bridge")


def _port(index: int, nsid: int) -> Link:
    return Link(index=index, name=f"veth{index}", mac="", mtu=1500, kind="veth", master=BRIDGE.index,
                peer_index=2, peer_netnsid=nsid)


def _address_note(nsid: int | None, index: int) -> rtnl.Notification:
    return rtnl.RTM_NEWADDR, nsid, struct.pack("=BBBBI", 2, 24, 0, 0, index)


class Kernel:
    """One netns's links and its pods' addresses (by the pod netns's id and link index); the
    reads asked of it are counted."""

    def __init__(self) -> None:
        self.links = {BRIDGE.index: BRIDGE, 10: _port(10, 1), 11: _port(11, 2)}
        self.addresses: dict[tuple[int, int], list[IPInterface]] = {
            (1, 2): [ipaddress.ip_interface("10.0.0.10/24")],
            (2, 2): [ipaddress.ip_interface("10.0.0.11/24")],
        }
        self.queued: list[rtnl.Notification] = []
        self.refuse: set[tuple[int, int]] = set()
        self.asked: Counter[tuple[int, int]] = Counter()
        self.dumps = 0

    def socket(self) -> rtnl.Socket:
        return FakeSocket(self)  # type: ignore[return-value]


class FakeSocket:
    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    def close(self) -> None:
        pass

    def __enter__(self) -> FakeSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def listen(self, groups: Iterable[int], buffer: int) -> None:
        pass

    def notifications(self, limit: int) -> tuple[list[rtnl.Notification], bool]:
        queued, self.kernel.queued = self.kernel.queued, []
        return queued, True

    def links(self) -> list[Link]:
        self.kernel.dumps += 1
        return list(self.kernel.links.values())

    def link_by_index(self, index: int) -> Link | None:
        return self.kernel.links.get(index)

    def link_by_name(self, name: str) -> Link | None:
        return next((link for link in self.kernel.links.values() if link.name == name), None)

    def peer_addresses(self, nsid: int, index: int) -> list[IPInterface]:
        self.kernel.asked[nsid, index] += 1
        if (nsid, index) in self.kernel.refuse:
            raise NetlinkError(errno.EACCES, "Permission denied")
        if (nsid, index) not in self.kernel.addresses:
            raise NetlinkError(errno.EINVAL, "Invalid argument")
        return self.kernel.addresses[nsid, index]


def _ips(*texts: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return {ipaddress.ip_address(t) for t in texts}


def test_a_pod_end_notified_many_times_is_read_once_and_other_notes_read_nothing() -> None:
    kernel = Kernel()
    watch = bridgeports.Watch(kernel.socket)
    assert set(watch.pods()) == _ips("10.0.0.10", "10.0.0.11")
    kernel.asked.clear()
    kernel.addresses[1, 2] = [ipaddress.ip_interface("10.0.0.20/24")]
    kernel.queued = [_address_note(1, 2)] * 50 + [
        _address_note(None, 2),  # an address of the host netns: no pod's
        _address_note(7, 2),  # a netns with no port here
        _address_note(2, 3),  # another link of a pod's netns
    ]
    assert set(watch.pods()) == _ips("10.0.0.20", "10.0.0.11")
    assert kernel.asked == Counter({(1, 2): 1})
    assert (kernel.dumps, watch.full_reads) == (1, 1)


def test_a_link_notified_is_read_again_and_leaves_when_it_is_no_port() -> None:
    kernel = Kernel()
    watch = bridgeports.Watch(kernel.socket)
    watch.pods()
    kernel.links[11] = Link(index=11, name="veth11", mac="", mtu=1500, kind="veth", peer_index=2,
                            peer_netnsid=2)  # off the bridge
    kernel.links[12] = _port(12, 3)
    kernel.addresses[3, 2] = [ipaddress.ip_interface("10.0.0.12/24")]
    kernel.queued = [(rtnl.RTM_NEWLINK, None, rtnl.ifinfo(11)), (rtnl.RTM_NEWLINK, None, rtnl.ifinfo(12)),
                     (rtnl.RTM_NEWLINK, None, b"\0")]  # too short to say which: skipped
    assert set(watch.pods()) == _ips("10.0.0.10", "10.0.0.12")
    assert watch.on_bridge("br0") == _ips("10.0.0.10", "10.0.0.12")
    del kernel.links[12]
    kernel.queued = [(rtnl.RTM_DELLINK, None, rtnl.ifinfo(12))]
    assert set(watch.pods()) == _ips("10.0.0.10")
    assert watch.full_reads == 1


def test_a_read_that_fails_is_raised_and_everything_is_read_again_at_the_next_call() -> None:
    kernel = Kernel()
    watch = bridgeports.Watch(kernel.socket)
    watch.pods()
    kernel.addresses[1, 2] = [ipaddress.ip_interface("10.0.0.30/24")]
    kernel.addresses[2, 2] = [ipaddress.ip_interface("10.0.0.31/24")]
    kernel.refuse = {(1, 2)}
    kernel.queued = [_address_note(2, 2), _address_note(1, 2)]
    with pytest.raises(NetlinkError):
        watch.pods()
    kernel.refuse = set()
    assert set(watch.pods()) == _ips("10.0.0.30", "10.0.0.31")  # no notification left: a whole read
    assert watch.full_reads == 2


def test_the_map_is_the_same_object_until_a_port_changes() -> None:
    kernel = Kernel()
    watch = bridgeports.Watch(kernel.socket)
    first = watch.pods()
    kernel.queued = [_address_note(1, 2)]  # read again, the same addresses
    assert watch.pods() is first
    kernel.addresses[1, 2] = []
    kernel.queued = [_address_note(1, 2)]
    assert watch.pods() is not first


def test_an_address_on_two_ports_keeps_the_one_left_when_the_other_goes() -> None:
    kernel = Kernel()
    watch = bridgeports.Watch(kernel.socket)
    watch.pods()
    kernel.links[12] = _port(12, 3)
    kernel.addresses[3, 2] = [ipaddress.ip_interface("10.0.0.10/24")]  # veth10's pod address too
    kernel.queued = [(rtnl.RTM_NEWLINK, None, rtnl.ifinfo(12))]
    assert watch.pods()[ipaddress.ip_address("10.0.0.10")] == {"veth10", "veth12"}
    del kernel.links[10]
    kernel.queued = [(rtnl.RTM_DELLINK, None, rtnl.ifinfo(10))]
    assert dict(watch.pods()) == {ipaddress.ip_address("10.0.0.10"): {"veth12"},
                                  ipaddress.ip_address("10.0.0.11"): {"veth11"}}
    kernel.addresses[3, 2] = []
    kernel.queued = [_address_note(3, 2)]
    assert dict(watch.pods()) == {ipaddress.ip_address("10.0.0.11"): {"veth11"}}
    assert watch.full_reads == 1
