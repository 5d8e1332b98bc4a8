"""The lean rtnetlink layer, checked against pyroute2's view of the same kernel state."""

from __future__ import annotations

import errno
import ipaddress
import os
import subprocess
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from pyroute2.iproute.linux import IPRoute

from cni_plugin import netns, rtnl
from cni_plugin.netlink import Link
from cnikit.ip import IPInterface
from testbed.harness import delete_netns, new_netns

pytestmark = pytest.mark.netns
T = TypeVar("T")


class Pair:
    """Two throw-away netns ("host" and "pod") and a way to run code inside each."""

    def __init__(self) -> None:
        self.names = [new_netns("rtnl"), new_netns("rtnl")]
        self.fds = [os.open(f"/run/netns/{n}", os.O_RDONLY) for n in self.names]

    def host(self, func: Callable[[], T]) -> T:
        return netns.run_in(self.fds[0], func)

    def pod(self, func: Callable[[], T]) -> T:
        return netns.run_in(self.fds[1], func)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        for name in self.names:
            delete_netns(name)


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    try:
        yield p
    finally:
        p.close()


def pyroute2_link(name: str) -> Any:
    with IPRoute() as ipr:
        return ipr.get_links(ipr.link_lookup(ifname=name)[0])[0]


def test_bridge_and_veth_match_pyroute2(pair: Pair) -> None:
    def host_side() -> tuple[Link | None, Link | None, Any, Any]:
        with rtnl.Socket() as sock:
            sock.add_bridge("br-rt", 1400, vlan_filtering=False)
            sock.add_veth("veth-rt", "eth7", pair.fds[1], 1400, "0a:58:0a:00:00:07")
            bridge = sock.link_by_name("br-rt")
            veth = sock.link_by_name("veth-rt")
            assert bridge is not None and veth is not None
            sock.set_link(veth.index, up=True, master=bridge.index)
            sock.set_brport(veth.index, hairpin=True, isolated=True)
            with IPRoute() as ipr:
                port = ipr.brport("show", index=veth.index)[0]
            # Read both views after the port joined: the bridge then takes the port's MAC.
            return (sock.link_by_name("br-rt"), sock.link_by_index(veth.index), pyroute2_link("br-rt"),
                    port, pyroute2_link("veth-rt"))

    bridge, veth, py_bridge, port, py_veth = pair.host(host_side)
    assert bridge is not None and veth is not None
    assert (bridge.index, bridge.name, bridge.mac, bridge.mtu, bridge.kind) == (
        py_bridge["index"], py_bridge.get("ifname"), py_bridge.get("address"), py_bridge.get("mtu"),
        py_bridge.get(("linkinfo", "kind")))
    assert veth.kind == "veth" and veth.master == bridge.index and veth.up
    assert port.get(("protinfo", "mode")) == 1 and port.get(("protinfo", "isolated")) == 1
    peer = pair.pod(lambda: pyroute2_link("eth7"))
    assert peer.get("address") == "0a:58:0a:00:00:07" and peer.get("mtu") == 1400
    assert peer.get("link") == veth.index
    # One queue each way on both ends, the number a veth uses by default, allocated as such
    # instead of one per CPU that the kernel then shrinks under rtnl_lock.
    for end in (py_veth, peer):
        assert (end.get("num_tx_queues"), end.get("num_rx_queues")) == (1, 1)


def test_addresses_and_routes_match_pyroute2(pair: Pair) -> None:
    def pod_side() -> tuple[list[tuple[IPInterface, int]], list[Any], list[Any], Any, Any]:
        with rtnl.Socket() as sock:
            sock.add_bridge("dummy-br", None, vlan_filtering=False)
            sock.add_bridge("other-br", None, vlan_filtering=False)
            link = sock.link_by_name("dummy-br")
            other = sock.link_by_name("other-br")
            assert link is not None and other is not None
            sock.set_link(link.index, up=True)
            sock.add_address(link.index, ipaddress.ip_interface("10.55.0.2/24"))
            sock.add_address(link.index, ipaddress.ip_interface("fd55::2/64"), nodad=True)
            sock.add_address(other.index, ipaddress.ip_interface("10.56.0.2/24"))
            sock.add_route("10.60.0.0/16", "10.55.0.1", link.index)
            sock.add_route("0.0.0.0/0", "10.55.0.1", link.index)
            with pytest.raises(rtnl.NetlinkError) as exists:
                sock.add_address(link.index, ipaddress.ip_interface("10.55.0.2/24"))
            assert exists.value.errno == errno.EEXIST
            sock.add_route("fd60::/48", "fd55::1", link.index)
            mine = sock.addresses(link.index)
            with IPRoute() as ipr:
                every = {family: ipr.get_routes(family=family) for family in (2, 10)}
                ours = {family: sock.routes(family) for family in (2, 10)}
                by_link = ipr.get_routes(family=2, oif=link.index)
                return mine, ipr.get_addr(index=link.index), by_link, every, ours

    mine, theirs, routes, every, our_routes = pair.pod(pod_side)
    ours = {str(a) for a, _ in mine if not a.ip.is_link_local}
    assert ours == {"10.55.0.2/24", "fd55::2/64"}  # other-br's address is filtered out
    seen = {f"{m.get('IFA_ADDRESS')}/{m['prefixlen']}" for m in theirs}
    assert ours <= seen
    by_dst = {(r.get("RTA_DST"), r["dst_len"]): r.get("RTA_GATEWAY") for r in routes}
    assert by_dst[("10.60.0.0", 16)] == "10.55.0.1"
    assert by_dst[(None, 0)] == "10.55.0.1"
    # Every route of each family, all tables, as pyroute2 reports them.
    for family, any_net in ((2, "0.0.0.0/0"), (10, "::/0")):
        theirs_all = sorted((str(ipaddress.ip_network(f"{r.get('RTA_DST')}/{r['dst_len']}", strict=False))
                             if r.get("RTA_DST") else any_net, r.get("RTA_GATEWAY")) for r in every[family])
        assert sorted(our_routes[family], key=str) == sorted(theirs_all, key=str)
    assert ("fd60::/48", "fd55::1") in our_routes[10] and ("10.60.0.0/16", "10.55.0.1") in our_routes[2]


def test_missing_links_and_errors(pair: Pair) -> None:
    def host_side() -> None:
        with rtnl.Socket() as sock:
            assert sock.link_by_name("nope0") is None
            assert sock.link_by_index(999999) is None
            with pytest.raises(rtnl.NetlinkError) as gone:
                sock.delete_link(999999)
            assert gone.value.errno == errno.ENODEV

    pair.host(host_side)


def test_bridge_ports_and_their_peers_addresses_read_from_the_host(pair: Pair) -> None:
    """A bridge port's peer addresses, read without entering the pod netns, as pyroute2 sees
    them inside it; a veth off any bridge is no port."""
    def host_side() -> tuple[list[tuple[Link, int]], list[IPInterface]]:
        with rtnl.Socket() as sock:
            sock.add_bridge("br-pp", None, vlan_filtering=False)
            sock.add_veth("veth-pp", "eth8", pair.fds[1], None, None)
            sock.add_veth("veth-off", "eth9", pair.fds[1], None, None)
            bridge, veth = sock.link_by_name("br-pp"), sock.link_by_name("veth-pp")
            assert bridge is not None and veth is not None
            sock.set_link(veth.index, up=True, master=bridge.index)
            ports = sock.bridge_ports()
            pair.pod(add_addresses)
            return ports, sock.peer_addresses(ports[0][1], ports[0][0].peer_index or 0)

    def add_addresses() -> Any:
        with rtnl.Socket() as sock:
            eth8 = sock.link_by_name("eth8")
            assert eth8 is not None
            sock.add_address(eth8.index, ipaddress.ip_interface("10.57.0.2/24"))
            sock.add_address(eth8.index, ipaddress.ip_interface("fe80::57/64"), nodad=True)

    def pod_view() -> set[str]:
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname="eth8")[0]
            return {f"{m.get('IFA_ADDRESS')}/{m['prefixlen']}" for m in ipr.get_addr(index=index)}

    ports, addresses = pair.host(host_side)
    assert [link.name for link, _nsid in ports] == ["veth-pp"]
    assert {str(a) for a in addresses} == pair.pod(pod_view) == {"10.57.0.2/24", "fe80::57/64"}


def test_links_netns_ids_default_routes_and_global_addresses_match_pyroute2(pair: Pair) -> None:
    """What `pybridge ls` and `doctor` read: every link with its peer's netns id, the id a netns
    fd has here, the default routes' links, the addresses of universe scope."""
    def host_side() -> tuple[list[tuple[Link, int | None]], int | None, list[int], list[IPInterface], Any]:
        with rtnl.Socket() as sock:
            sock.add_veth("veth-ls", "eth6", pair.fds[1], None, None)
            veth = sock.link_by_name("veth-ls")
            assert veth is not None
            sock.set_link(veth.index, up=True)
            sock.add_address(veth.index, ipaddress.ip_interface("10.58.0.1/24"))
            sock.add_address(veth.index, ipaddress.ip_interface("fe80::58/64"), nodad=True)
            sock.add_route("0.0.0.0/0", "10.58.0.2", veth.index)
            with IPRoute() as ipr:
                py = ([r.get_attr("RTA_OIF") for r in ipr.get_default_routes()],
                      ipr.get_netnsid(fd=pair.fds[1])["nsid"],
                      {str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(index=veth.index)
                       if a["scope"] == 0})
            return sock.links(), sock.nsid(pair.fds[1]), sock.default_links(), \
                sock.global_addresses(veth.index), py

    links, nsid, defaults, addresses, (py_defaults, py_nsid, py_addresses) = pair.host(host_side)
    veth = next(link for link in links if link.name == "veth-ls")
    assert veth.peer_netnsid is not None and veth.peer_netnsid == nsid == py_nsid
    assert [link.peer_netnsid for link in links if link.name == "lo"] == [None]
    assert defaults == py_defaults == [veth.index]
    assert {str(a.ip) for a in addresses} == py_addresses == {"10.58.0.1"}


def test_group_members_are_the_links_of_the_group_and_only_they(pair: Pair) -> None:
    """The dump is looked through for the group's attribute before any link is parsed: links of
    other groups, and of none, are left out; each member comes with its alias, or none."""
    group = 0x70627264
    made = [("gm-a", group, "pybridge: removing"), ("gm-b", group, ""), ("gm-c", group + 1, "other"),
            ("gm-d", 0, "pybridge: removing")]
    for name, in_group, alias in made:
        subprocess.run(["ip", "-n", pair.names[0], "link", "add", name, "group", str(in_group),
                        "type", "veth", "peer", "name", f"{name}-p"], check=True)
        if alias:
            subprocess.run(["ip", "-n", pair.names[0], "link", "set", name, "alias", alias], check=True)

    def members() -> list[tuple[str, str]]:
        with rtnl.Socket() as sock:
            names = {link.index: link.name for link in sock.links()}
            return sorted((names[index], alias) for index, alias in sock.group_members(group))

    assert pair.host(members) == [("gm-a", "pybridge: removing"), ("gm-b", "")]
