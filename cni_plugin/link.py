"""Links, addresses and routes for the verbs.

The hot path (what every ADD and DEL does) goes through the lean `rtnl` layer; pyroute2, the
project's netlink library, serves the rest (bridge VLAN filters, CHECK's route and bridge-port
reads). Every function reaches the kernel through the `host.Host` it is handed (the verbs' request's).
Host-side functions take a `Netlink` opened in the plugin's (host) netns.
A netlink socket stays in the netns it was created in, and a /proc/sys directory names the
knobs of the netns it was opened in: `pod_configure` works through both, opened by one trip of
a thread into the pod (`open_pod`); the other pod-side functions (`pod_*`) run inside the pod
netns via `Host.run_in` and open their own socket there.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import functools
import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from cnikit import turns
from cnikit.ip import IPInterface
from cnikit.spec.errors import INTERNAL, UNSUPPORTED_FIELD, CNIError

from . import rtnl
from .host import Host
from .netlink import Link, Netlink, NetlinkError

IFA_F_TENTATIVE = 0x40
IFA_F_DADFAILED = 0x08
VETH_NAME_TRIES = 10
# The reference plugin's wait for the bridge port to come up, in seconds, with shorter first
# steps: the kernel's link watch usually flips it within a millisecond of the pod end coming up,
# and on a bridge of a thousand ports the first read is often just too early.
OPER_UP_WAITS = (0.0, 0.0003, 0.001, 0.002, 0.01, 0.05, 0.5, 1.0, 1.0)
DAD_TIMEOUT = 5.0
# Host ends of deleted pods, waiting for `sweep_removed`: a link group of their own (a number any
# tool may use; this one is pybridge's, docs/operations.md) and an alias saying so.
REMOVAL_GROUP = 0x70627264
REMOVAL_ALIAS = "pybridge: removing"


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
        raise CNIError(INTERNAL, f"netlink: {what} failed", exc.strerror or str(exc)) from exc


@contextlib.contextmanager
def netlink(host: Host) -> Iterator[Netlink]:
    """A netlink socket of `host` in the calling thread's netns."""
    sock = host.netlink()
    try:
        yield sock
    finally:
        sock.close()


def find(sock: Netlink, name: str) -> Link | None:
    return sock.link_by_name(name)


def get(sock: Netlink, index: int) -> Link | None:
    return sock.link_by_index(index)


# --- host side -----------------------------------------------------------------------------


def _no_vlan_filtering() -> CNIError:
    return CNIError(
        UNSUPPORTED_FIELD,
        "unsupported field 'vlan'",
        "this kernel has no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING)",
    )


def ensure_bridge(host: Host, sock: Netlink, name: str, mtu: int | None, promisc: bool,
                  vlan_filtering: bool) -> Link:
    """Create the bridge or reuse it; EEXIST is a concurrent first ADD, not an error."""
    with netlink_errors(f"create bridge {name}"):
        bridge = find(sock, name)
        if bridge is None:
            try:
                sock.add_bridge(name, mtu, vlan_filtering)
            except NetlinkError as exc:
                if exc.errno == errno.EOPNOTSUPP and vlan_filtering:
                    raise _no_vlan_filtering() from exc
                if exc.errno != errno.EEXIST:
                    raise
            bridge = find(sock, name)
            if bridge is None:
                raise CNIError(INTERNAL, f"bridge {name} vanished while being set up")
        if bridge.kind != "bridge":
            raise CNIError(INTERNAL, f"{name} already exists but is not a bridge", f"kind {bridge.kind!r}")
        if vlan_filtering:
            _enable_vlan_filtering(sock, bridge.index)
        if bridge.up and bridge.promisc >= promisc:
            return bridge  # the common case: one lookup
        host.sysctl_try_write(f"net/ipv6/conf/{name}/accept_ra", "0")
        sock.set_link(bridge.index, up=True, promisc=True if promisc else None)
    found = find(sock, name)
    assert found is not None
    return found


def _enable_vlan_filtering(sock: Netlink, index: int) -> None:
    try:
        sock.enable_vlan_filtering(index)
    except NetlinkError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            raise _no_vlan_filtering() from exc
        raise


def create_veth(host: Host, sock: Netlink, pod_fd: int, ifname: str, mtu: int | None, mac: str | None,
                bridge: Link) -> Link:
    """Create the pair from the host with the peer born in the pod netns (no move needed) and
    the host end enslaved to `bridge` in the same request, then bring the host end up with no
    IPv6 of its own: a bridge port needs none (the bridge takes its frames, IPv6 included), and
    with it the kernel would give every port a link-local address, routes and DAD, and walk the
    host's whole IPv6 routing table on each port's events (at 1000 pods, ~15% of the agent's
    CPU went to fib6_clean_all and the link-watch waits behind it).

    The caller has checked that `ifname` is free in the pod, so EEXIST means the random host
    name clashed: retry with another, like the reference plugin.
    """
    for _ in range(VETH_NAME_TRIES):
        name = f"veth{secrets.token_hex(4)}"
        with netlink_errors(f"create veth {name}"):
            try:
                sock.add_veth(name, ifname, pod_fd, mtu, mac, master=bridge.index)
            except NetlinkError as exc:
                if exc.errno == errno.EEXIST:
                    continue
                raise
            end = find(sock, name)
            if end is None:
                raise CNIError(INTERNAL, f"veth {name} vanished while being set up")
            try:
                host.sysctl_try_write(f"net/ipv6/conf/{name}/disable_ipv6", "1")  # absent: no IPv6 at all
                sock.set_link(end.index, up=True)
            except BaseException:
                delete_link(sock, end.index)  # the caller undoes only what it was handed
                raise
        return end
    raise CNIError(INTERNAL, "failed to find a free host veth name", f"{VETH_NAME_TRIES} tries")


def configure_port(sock: Netlink, host: Link, hairpin: bool, isolated: bool, vlan: int) -> None:
    """The bridge port's options, where the config sets any. (No accept_ra on the port, as the
    reference: a bridge port's own IPv6 stack never sees the frames, the bridge takes them.)"""
    with netlink_errors(f"configure bridge port {host.name}"):
        if hairpin or isolated:
            sock.set_brport(host.index, hairpin, isolated)
        if vlan:
            sock.set_port_vlan(host.index, vlan)


def delete_link(sock: Netlink, index: int) -> None:
    with netlink_errors("delete link"), contextlib.suppress(NetlinkError):
        sock.delete_link(index)


def ensure_gateway(sock: Netlink, link: Link, gateway: IPInterface, force: bool) -> None:
    """Put the gateway on the bridge once. A different address of the same family and subnet is an
    error, or is replaced with forceAddress (as the reference does)."""
    with netlink_errors(f"add gateway {gateway} to {link.name}"):
        for addr, _flags in sock.addresses(link.index):
            if addr == gateway:
                return
            if (
                addr.version == gateway.version
                and addr.network.overlaps(gateway.network)
                and not addr.ip.is_link_local
            ):
                if not force:
                    raise CNIError(
                        INTERNAL,
                        f"{link.name} has an IP address different from {gateway}",
                        f"found {addr}; set forceAddress to replace it",
                    )
                sock.delete_address(link.index, addr)
        try:
            # Our own subnet's gateway: no DAD, so pods can use it at once.
            sock.add_address(link.index, gateway, nodad=gateway.version == 6)
        except NetlinkError as exc:
            if exc.errno != errno.EEXIST:  # a concurrent ADD put it there first
                raise


def pin_mac(host: Host, sock: Netlink, bridge: Link) -> Link:
    """Stop the bridge MAC from following its lowest port's MAC as pods come and go. Read it
    now: a bridge whose last port left has a zero MAC until a port joins again. `bridge` is as
    read before this ADD's port joined. A bridge `host` remembers pinning to the MAC it still
    shows needs neither the read nor the write again: two requests fewer per ADD in the agent."""
    if host.pinned.get((bridge.index, bridge.name)) == bridge.mac:
        return bridge
    with netlink_errors("pin bridge MAC"):
        current = get(sock, bridge.index) or bridge
        if current.mac and current.mac != "00:00:00:00:00:00":
            sock.set_link(current.index, mac=current.mac)
            host.pinned[(current.index, current.name)] = current.mac
        return current


def wait_oper_up(sock: Netlink, index: int) -> Link:
    for delay in OPER_UP_WAITS:
        if delay:
            with turns.waiting():
                time.sleep(delay)
        link = get(sock, index)
        if link is None:
            break
        if link.oper_up:
            return link
    raise CNIError(INTERNAL, "bridge port in error state", "the host veth did not come up")


# --- pod side (run inside the pod netns) ----------------------------------------------------


@dataclass(frozen=True)
class Pod:
    """The pod netns, usable from the calling thread: a netlink socket and the directory of its
    IPv6 sysctls (None: no IPv6 in the kernel), both of `host`. Only their opening needs a thread
    that entered the netns, and one trip serves both."""

    host: Host
    sock: Netlink
    ipv6_conf: int | None


def _open_pod(host: Host) -> Pod:
    sock = host.netlink()
    try:
        return Pod(host, sock, host.sysctl_dir("net/ipv6/conf/"))
    except BaseException:
        sock.close()
        raise


@contextlib.contextmanager
def open_pod(host: Host, pod_fd: int) -> Iterator[Pod]:
    pod = host.run_in(pod_fd, lambda: _open_pod(host))
    try:
        yield pod
    finally:
        pod.sock.close()
        if pod.ipv6_conf is not None:
            os.close(pod.ipv6_conf)


def _pod_ipv6(host: Host, conf: int, ifname: str, v6: bool, enable_dad: bool) -> None:
    """IPv6 on the pod end, set while it is down. With IPv6 addresses: on (lo too, as the
    reference), DAD as asked. With IPv4 ones only: off, as Docker does on IPv4-only interfaces:
    no link-local address a pod could reach others by around IPv4 rules, and no DAD, MLD reports
    and router solicitations for the bridge to flood to every port (at 1000 pods, most of an
    ADD's growth)."""
    if not v6:
        try:
            host.sysctl_write(f"{ifname}/disable_ipv6", "1", conf)
        except OSError as exc:
            raise CNIError(INTERNAL, f"failed to turn IPv6 off on {ifname}",
                           f"{exc.strerror}; set podIPv6LinkLocal to keep it on") from exc
        return
    for dev in ("lo", ifname):
        host.sysctl_try_write(f"{dev}/disable_ipv6", "0", conf)
    host.sysctl_try_write(f"{ifname}/keep_addr_on_down", "1", conf)
    host.sysctl_try_write(f"{ifname}/accept_dad", "1" if enable_dad else "0", conf)
    if enable_dad:
        host.sysctl_try_write(f"{ifname}/enhanced_dad", "1", conf)


def _pod_no_router(host: Host, conf: int, ifname: str) -> None:
    """A pod end with IPv6 on takes no router advertisements and makes no SLAAC address: its
    addresses and routes are IPAM's, and another pod's RA would route it through that pod (the
    class of CVE-2020-10749). Its link-local address is the EUI-64 one of its MAC, which the
    source check (sourcecheck.py) lets through. Set on the interface only: the kernel reads
    accept_ra and autoconf per interface (`all` is not consulted), and `default` would reach
    links other plugins put in the same netns."""
    for knob, value in (("accept_ra", "0"), ("autoconf", "0"), ("addr_gen_mode", "0")):
        try:
            host.sysctl_write(f"{ifname}/{knob}", value, conf)
        except OSError as exc:
            raise CNIError(INTERNAL, f"failed to set {knob} on {ifname}", exc.strerror or str(exc)) from exc


def pod_configure(
    pod: Pod,
    ifname: str,
    addrs: Sequence[IPInterface],
    routes: Sequence[tuple[str, str | None]],
    enable_dad: bool,
    up: bool,
    keep_link_local: bool,
) -> Link:
    """Addresses, link up, routes; DAD off unless asked (accept_dad), so ADD never waits for it.
    `keep_link_local`: leave an IPv4-only pod end's IPv6 as the netns has it (the reference's
    way). With no addresses at all (no IPAM) the pod's IPv6 is the user's and left alone."""
    sock = pod.sock
    with netlink_errors(f"configure {ifname}"):
        link = find(sock, ifname)
        if link is None:
            raise CNIError(INTERNAL, f"{ifname} vanished from the pod netns")
        # Gratuitous ARP when the link comes up, as the reference sets it.
        sock.set_ipv4_conf(link.index, {rtnl.IPV4_DEVCONF_ARP_NOTIFY: 1})
        v6 = any(a.version == 6 for a in addrs)
        if pod.ipv6_conf is not None and (v6 or (addrs and not keep_link_local)):
            _pod_ipv6(pod.host, pod.ipv6_conf, ifname, v6, enable_dad)
        if pod.ipv6_conf is not None and addrs and (v6 or keep_link_local):
            _pod_no_router(pod.host, pod.ipv6_conf, ifname)
        for addr in addrs:
            sock.add_address(link.index, addr)  # DAD is off by the accept_dad sysctl, as the reference
        if up:
            sock.set_link(link.index, up=True)
        if enable_dad and v6:
            _settle_dad(sock, link.index)
        for dst, gw in routes:
            try:
                sock.add_route(dst, gw, link.index)
            except NetlinkError as exc:
                if exc.errno != errno.EEXIST:
                    raise
        return link  # its name, MAC and MTU, all the result needs, are as found


def _settle_dad(sock: Netlink, index: int) -> None:
    deadline = time.monotonic() + DAD_TIMEOUT
    while time.monotonic() < deadline:
        flags = [f for a, f in sock.addresses(index) if a.version == 6 and not a.ip.is_link_local]
        if any(f & IFA_F_DADFAILED for f in flags):
            raise CNIError(INTERNAL, "IPv6 duplicate address detection failed")
        if not any(f & IFA_F_TENTATIVE for f in flags):
            return
        with turns.waiting():
            time.sleep(0.05)
    raise CNIError(INTERNAL, "IPv6 duplicate address detection did not finish", f"{DAD_TIMEOUT} s")


def _pod_veth(sock: Netlink, ifname: str) -> Link | None:
    """The pod end by name, if it is a veth: any other kind of link by that name was made by
    someone else and is never ours to touch."""
    link = find(sock, ifname)
    return link if link is not None and link.kind == "veth" else None


HostEnd = Callable[[Link], Link | None]  # the host end of a pod veth, if verified


def no_host_end(_pod: Link) -> Link | None:
    return None


def pod_delete(host: Host, ifname: str, host_end_of: HostEnd = no_host_end) -> Link | None:
    """Delete the pod end (the host end goes with it). Returns `host_end_of` the pod end, read
    before the host end goes; None if there is no veth of that name."""
    with netlink(host) as sock, netlink_errors(f"delete {ifname}"):
        link = _pod_veth(sock, ifname)
        if link is None:
            return None
        end = host_end_of(link)
        try:
            sock.delete_link(link.index)
        except NetlinkError as exc:
            if exc.errno not in (errno.ENODEV, errno.ENOENT):
                raise
        return end


def pod_detach(host: Host, ifname: str,
               host_end_of: HostEnd = no_host_end) -> tuple[Link, Link | None] | None:
    """Take the pod end out of service without waiting for the kernel's deletion: down (so the
    bridge port loses its carrier) and renamed (so `ifname` is free for a new ADD at once).
    Returns it as it was, for `pod_delete_index`, and `host_end_of` it; None if there is no
    veth of that name."""
    with netlink(host) as sock, netlink_errors(f"detach {ifname}"):
        link = _pod_veth(sock, ifname)
        if link is None:
            return None
        end = host_end_of(link)
        sock.set_link(link.index, up=False)
        sock.rename(link.index, f"pbdel{secrets.token_hex(5)}")
        return link, end


def verified_host_end(sock: Netlink, pod_nsid: int | None, pod: Link) -> Link | None:
    """The host end of pod veth `pod`, if the host netns (`sock`) agrees: the host link `pod`
    names as its peer is a veth whose own peer is `pod`'s index in the netns the host knows as
    `pod_nsid` (pod ends of every netns often share one index). A pod can make a veth pair of its
    own named like ours: its peer index then names an unrelated host link (another pod's port),
    which is never ours. None, too, on any netlink failure: the callers then do without it."""
    if pod.peer_index is None or pod_nsid is None:
        return None
    try:
        peer = get(sock, pod.peer_index)
    except NetlinkError:
        return None
    if peer is None or peer.kind != "veth" or peer.peer_index != pod.index:
        return None
    return peer if peer.peer_netnsid is not None and peer.peer_netnsid == pod_nsid else None


def mark_host_end(sock: Netlink, end: Link, bridge: str) -> bool:
    """Mark `end` (a pod's host end, as verified_host_end found it) for `sweep_removed` if it is
    a port of `bridge`. False, and nothing marked, otherwise or on any netlink failure: the
    caller then deletes the pod end by itself."""
    try:
        port_of = find(sock, bridge)
        if port_of is None or end.master != port_of.index:
            return False
        sock.mark(end.index, REMOVAL_GROUP, REMOVAL_ALIAS)
    except NetlinkError:
        return False
    return True


def sweeper(host: Host) -> Callable[[], None]:
    """The sweep of `host`, one object per host: Removals runs work submitted again before it
    ran once, by identity."""
    return _sweepers.setdefault(host, functools.partial(sweep_removed, host))


_sweepers: dict[Host, Callable[[], None]] = {}


def sweep_removed(host: Host) -> None:
    """Delete the host ends marked for removal in this netns (their pod ends go with them): all
    in one request, one kernel batch, when every link of the group carries the mark; else the
    marked ones one by one. A link of the group without the mark is never deleted."""
    with netlink(host) as sock, netlink_errors("delete links marked for removal"):
        members = sock.group_members(REMOVAL_GROUP)
        ours = [index for index, alias in members if alias == REMOVAL_ALIAS]
        if ours and len(ours) == len(members):
            try:
                sock.delete_group(REMOVAL_GROUP)
            except NetlinkError as exc:
                if exc.errno != errno.ENODEV:  # gone meanwhile (their netns was deleted)
                    raise
            return
        for index in ours:
            delete_link(sock, index)


def pod_delete_index(host: Host, index: int) -> None:
    with netlink(host) as sock:
        delete_link(sock, index)


def pod_state(host: Host, ifname: str) -> PodState | None:
    with netlink(host) as sock, netlink_errors(f"read {ifname}"):
        link = find(sock, ifname)
        if link is None:
            return None
        addrs = [a for a, _ in sock.addresses(link.index)]
        # All routes of the netns: with two attachments on one network the second default
        # route is the first one's, and CHECK asks only that the route exists.
        routes = sock.routes(_socket.AF_INET) + sock.routes(_socket.AF_INET6)
    return PodState(link=link, addrs=addrs, routes=routes)
