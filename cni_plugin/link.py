"""Links, addresses and routes over netlink: the project's only pyroute2 user.

Host-side functions take an IPRoute opened in the plugin's (host) netns. Pod-side functions
(`pod_*`) are meant to run inside the pod netns via `netns.run_in`, and open their own socket
there, because a netlink socket stays in the netns it was created in.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyroute2.iproute.linux import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import sysctl
from .spec.errors import INTERNAL, UNSUPPORTED_FIELD, CNIError

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

EEXIST = 17
ENODEV = 19
ENOENT = 2
EOPNOTSUPP = 95
IFA_F_NODAD = 0x02
IFA_F_TENTATIVE = 0x40
IFA_F_DADFAILED = 0x08
IFF_PROMISC = 0x100
BRIDGE_VLAN_INFO_PVID = 0x2
BRIDGE_VLAN_INFO_UNTAGGED = 0x4
BRIDGE_VLAN_INFO_BRENTRY = 0x20
VETH_NAME_TRIES = 10
# The reference plugin's wait for the bridge port to come up, in seconds.
OPER_UP_WAITS = (0.0, 0.002, 0.01, 0.05, 0.5, 1.0, 1.0)
DAD_TIMEOUT = 5.0


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    mac: str
    mtu: int
    kind: str
    master: int | None = None
    peer_index: int | None = None
    promisc: bool = False
    hairpin: bool | None = None
    operstate: str = ""


@dataclass(frozen=True)
class PodState:
    link: Link
    addrs: list[IPInterface] = field(default_factory=list)
    routes: list[tuple[str, str | None]] = field(default_factory=list)


@contextlib.contextmanager
def netlink_errors(what: str) -> Iterator[None]:
    """The one place where netlink failures become CNI errors."""
    try:
        yield
    except NetlinkError as exc:
        raise CNIError(INTERNAL, f"netlink: {what} failed", f"{exc.args[-1] if exc.args else exc}") from exc


@contextlib.contextmanager
def route_socket() -> Iterator[Any]:
    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _link(ipr: Any, index: int) -> Link | None:
    try:
        msg = ipr.get_links(index)[0]
    except NetlinkError as exc:
        if exc.code in (ENODEV, ENOENT):
            return None
        raise
    mode = msg.get(("protinfo", "mode")) if msg.get("master") else None
    return Link(
        index=msg["index"],
        name=msg.get("ifname"),
        mac=msg.get("address"),
        mtu=msg.get("mtu"),
        kind=msg.get(("linkinfo", "kind")) or "",
        master=msg.get("master"),
        peer_index=msg.get("link"),
        promisc=bool(msg["flags"] & IFF_PROMISC),
        hairpin=None if mode is None else bool(mode),
        operstate=msg.get("operstate") or "",
    )


def find(ipr: Any, name: str) -> Link | None:
    found = ipr.link_lookup(ifname=name)
    return _link(ipr, found[0]) if found else None


def get(ipr: Any, index: int) -> Link | None:
    return _link(ipr, index)


def brport_hairpin(ipr: Any, index: int) -> bool | None:
    shown = ipr.brport("show", index=index)
    return bool(shown[0].get(("protinfo", "mode"))) if shown else None


# --- host side -----------------------------------------------------------------------------


def _no_vlan_filtering() -> CNIError:
    return CNIError(UNSUPPORTED_FIELD, "unsupported field 'vlan'",
                    "this kernel has no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING)")


def ensure_bridge(ipr: Any, name: str, mtu: int | None, promisc: bool, vlan_filtering: bool) -> Link:
    """Create the bridge or reuse it; EEXIST is a concurrent first ADD, not an error."""
    attrs: dict[str, Any] = {"ifname": name, "kind": "bridge"}
    if mtu:
        attrs["mtu"] = mtu
    if vlan_filtering:
        attrs["br_vlan_filtering"] = 1
    with netlink_errors(f"create bridge {name}"):
        try:
            ipr.link("add", **attrs)
        except NetlinkError as exc:
            if exc.code == EOPNOTSUPP and vlan_filtering:
                raise _no_vlan_filtering() from exc
            if exc.code != EEXIST:
                raise
        bridge = find(ipr, name)
        if bridge is None:
            raise CNIError(INTERNAL, f"bridge {name} vanished while being set up")
        if bridge.kind != "bridge":
            raise CNIError(INTERNAL, f"{name} already exists but is not a bridge", f"kind {bridge.kind!r}")
        if vlan_filtering:
            try:
                ipr.link("set", index=bridge.index, kind="bridge", br_vlan_filtering=1)
            except NetlinkError as exc:
                if exc.code == EOPNOTSUPP:
                    raise _no_vlan_filtering() from exc
                raise
        if promisc and not bridge.promisc:
            ipr.link("set", index=bridge.index, flags=IFF_PROMISC, change=IFF_PROMISC)
        sysctl.try_write(f"net/ipv6/conf/{name}/accept_ra", "0")
        ipr.link("set", index=bridge.index, state="up")
    found = find(ipr, name)
    assert found is not None
    return found


def create_veth(ipr: Any, pod_fd: int, ifname: str, mtu: int | None, mac: str | None) -> Link:
    """Create the pair from the host with the peer born in the pod netns (no move needed).

    The caller has checked that `ifname` is free in the pod, so EEXIST means the random host
    name clashed: retry with another, like the reference plugin.
    """
    peer: dict[str, Any] = {"ifname": ifname, "net_ns_fd": pod_fd}
    attrs: dict[str, Any] = {"kind": "veth", "peer": peer}
    if mtu:
        attrs["mtu"] = peer["mtu"] = mtu
    if mac:
        peer["address"] = mac
    for _ in range(VETH_NAME_TRIES):
        name = f"veth{secrets.token_hex(4)}"
        with netlink_errors(f"create veth {name}"):
            try:
                ipr.link("add", ifname=name, **attrs)
            except NetlinkError as exc:
                if exc.code == EEXIST:
                    continue
                raise
            host = find(ipr, name)
        if host is None:
            raise CNIError(INTERNAL, f"veth {name} vanished while being set up")
        return host
    raise CNIError(INTERNAL, "failed to find a free host veth name", f"{VETH_NAME_TRIES} tries")


def attach_port(ipr: Any, host: Link, bridge: Link, hairpin: bool, isolated: bool, vlan: int) -> None:
    with netlink_errors(f"attach {host.name} to {bridge.name}"):
        sysctl.try_write(f"net/ipv6/conf/{host.name}/accept_ra", "0")
        ipr.link("set", index=host.index, master=bridge.index, state="up")
        if hairpin or isolated:
            ipr.brport("set", index=host.index, mode=int(hairpin), isolated=int(isolated))
        if vlan:
            ipr.vlan_filter("add", index=host.index, vlan_info={
                "vid": vlan, "flags": BRIDGE_VLAN_INFO_PVID | BRIDGE_VLAN_INFO_UNTAGGED})
            ipr.vlan_filter("del", index=host.index, vlan_info={"vid": 1})


def delete_link(ipr: Any, index: int) -> None:
    with netlink_errors("delete link"), contextlib.suppress(NetlinkError):
        ipr.link("del", index=index)


def _addrs(ipr: Any, index: int) -> list[tuple[IPInterface, int]]:
    out = []
    for msg in ipr.get_addr(index=index):
        addr = ipaddress.ip_interface(f"{msg.get('IFA_ADDRESS')}/{msg['prefixlen']}")
        flags = msg.get("IFA_FLAGS") or msg["flags"]
        out.append((addr, flags))
    return out


def ensure_gateway(ipr: Any, link: Link, gateway: IPInterface, force: bool) -> None:
    """Put the gateway on the bridge once. A different address of the same family and subnet is an
    error, or is replaced with forceAddress (as the reference does)."""
    with netlink_errors(f"add gateway {gateway} to {link.name}"):
        for addr, _flags in _addrs(ipr, link.index):
            if addr == gateway:
                return
            if addr.version == gateway.version and addr.network.overlaps(gateway.network) \
                    and not addr.ip.is_link_local:
                if not force:
                    raise CNIError(INTERNAL, f"{link.name} has an IP address different from {gateway}",
                                   f"found {addr}; set forceAddress to replace it")
                ipr.addr("del", index=link.index, address=str(addr.ip), prefixlen=addr.network.prefixlen)
        extra = {"flags": IFA_F_NODAD} if gateway.version == 6 else {}
        try:
            ipr.addr("add", index=link.index, address=str(gateway.ip),
                     prefixlen=gateway.network.prefixlen, **extra)
        except NetlinkError as exc:
            if exc.code != EEXIST:  # a concurrent ADD put it there first
                raise


def pin_mac(ipr: Any, index: int) -> None:
    """Stop the bridge MAC from following its lowest port's MAC as pods come and go. Read it
    now: a bridge whose last port left has a zero MAC until a port joins again."""
    with netlink_errors("pin bridge MAC"):
        bridge = get(ipr, index)
        if bridge is not None and bridge.mac and bridge.mac != "00:00:00:00:00:00":
            ipr.link("set", index=index, address=bridge.mac)


def wait_oper_up(ipr: Any, index: int) -> Link:
    for delay in OPER_UP_WAITS:
        time.sleep(delay)
        link = get(ipr, index)
        if link is None:
            break
        if link.operstate == "UP":
            return link
    raise CNIError(INTERNAL, "bridge port in error state", "the host veth did not come up")


# --- pod side (run inside the pod netns) ----------------------------------------------------


def pod_link_exists(ifname: str) -> bool:
    with route_socket() as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def _route_args(dst: str, gw: str | None, index: int) -> dict[str, Any]:
    net = ipaddress.ip_network(dst, strict=False)
    args: dict[str, Any] = {"dst": str(net), "oif": index}
    if gw:
        args["gateway"] = gw
    return args


def pod_configure(
    ifname: str,
    addrs: Sequence[IPInterface],
    routes: Sequence[tuple[str, str | None]],
    enable_dad: bool,
    up: bool,
) -> Link:
    """Addresses, link up, routes; DAD off unless asked, so ADD never waits for it."""
    with route_socket() as ipr, netlink_errors(f"configure {ifname}"):
        link = find(ipr, ifname)
        if link is None:
            raise CNIError(INTERNAL, f"{ifname} vanished from the pod netns")
        sysctl.try_write(f"net/ipv4/conf/{ifname}/arp_notify", "1")
        if any(a.version == 6 for a in addrs):
            for dev in ("lo", ifname):
                sysctl.try_write(f"net/ipv6/conf/{dev}/disable_ipv6", "0")
            sysctl.try_write(f"net/ipv6/conf/{ifname}/keep_addr_on_down", "1")
            sysctl.try_write(f"net/ipv6/conf/{ifname}/accept_dad", "1" if enable_dad else "0")
            if enable_dad:
                sysctl.try_write(f"net/ipv6/conf/{ifname}/enhanced_dad", "1")
        for addr in addrs:
            ipr.addr("add", index=link.index, address=str(addr.ip), prefixlen=addr.network.prefixlen)
        if up:
            ipr.link("set", index=link.index, state="up")
        if enable_dad and any(a.version == 6 for a in addrs):
            _settle_dad(ipr, link.index)
        for dst, gw in routes:
            try:
                ipr.route("add", **_route_args(dst, gw, link.index))
            except NetlinkError as exc:
                if exc.code != EEXIST:
                    raise
        found = get(ipr, link.index)
        assert found is not None
        return found


def _settle_dad(ipr: Any, index: int) -> None:
    deadline = time.monotonic() + DAD_TIMEOUT
    while time.monotonic() < deadline:
        flags = [f for a, f in _addrs(ipr, index) if a.version == 6 and not a.ip.is_link_local]
        if any(f & IFA_F_DADFAILED for f in flags):
            raise CNIError(INTERNAL, "IPv6 duplicate address detection failed")
        if not any(f & IFA_F_TENTATIVE for f in flags):
            return
        time.sleep(0.05)
    raise CNIError(INTERNAL, "IPv6 duplicate address detection did not finish", f"{DAD_TIMEOUT} s")


def pod_delete(ifname: str) -> list[IPInterface]:
    """Delete the pod end (the host end goes with it); returns the addresses it had."""
    with route_socket() as ipr, netlink_errors(f"delete {ifname}"):
        link = find(ipr, ifname)
        if link is None:
            return []
        addrs = [a for a, _ in _addrs(ipr, link.index) if a.ip.is_global or a.ip.is_private]
        try:
            ipr.link("del", index=link.index)
        except NetlinkError as exc:
            if exc.code not in (ENODEV, ENOENT):
                raise
        return addrs


def pod_state(ifname: str) -> PodState | None:
    with route_socket() as ipr, netlink_errors(f"read {ifname}"):
        link = find(ipr, ifname)
        if link is None:
            return None
        addrs = [a for a, _ in _addrs(ipr, link.index)]
        routes = []
        # All routes of the netns: with two attachments on one network the second default route
        # is the first one's, and CHECK asks only that the route exists.
        for family in (2, 10):
            for msg in ipr.get_routes(family=family):
                dst = msg.get("RTA_DST")
                net = f"{dst}/{msg['dst_len']}" if dst else ("0.0.0.0/0" if family == 2 else "::/0")
                routes.append((str(ipaddress.ip_network(net, strict=False)), msg.get("RTA_GATEWAY")))
        return PodState(link=link, addrs=addrs, routes=routes)
