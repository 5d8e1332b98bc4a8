"""A lean rtnetlink layer for the requests on the ADD/DEL hot path.

pyroute2 decodes every attribute of every reply and runs an asyncio loop per request
(~0.3-0.5 ms each, ~30 per ADD); these few requests, encoded with struct on a plain netlink
socket, cost ~0.02 ms. The tests check what this layer does against pyroute2's view of the
same kernel state. Everything else (VLANs, CHECK's reads) stays on pyroute2.
"""

from __future__ import annotations

import _socket  # not `socket`: its enum wrappers cost ~2 ms of a one-shot call's imports
import contextlib
import errno
import ipaddress
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from cnikit.ip import IPInterface

from .netlink import Link, NetlinkError

NETLINK_ROUTE, NETLINK_NETFILTER = 0, 12
SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NETLINK_LISTEN_ALL_NSID = 270, 1, 8
NETLINK_CAP_ACK, NETLINK_GET_STRICT_CHK = 10, 12
RTNLGRP_LINK, RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR = 1, 5, 9
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x2, 0x4, 0x300
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
RTM_GETNSID, NETNSA_NSID, NETNSA_FD = 90, 1, 3
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_MASTER = 1, 3, 4, 5, 10
IFLA_PROTINFO, IFLA_OPERSTATE, IFLA_LINKINFO, IFLA_NET_NS_FD = 12, 16, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER, IFLA_BR_VLAN_FILTERING = 1, 2, 1, 7
IFLA_BRPORT_MODE, IFLA_BRPORT_ISOLATED = 4, 33
IFLA_AF_SPEC, IFLA_INET_CONF, IPV4_DEVCONF_ARP_NOTIFY = 26, 1, 22
IFLA_NUM_TX_QUEUES, IFLA_NUM_RX_QUEUES = 31, 32
IFLA_LINK_NETNSID = 37
IFLA_IFALIAS, IFLA_GROUP, IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS = 20, 27, 29, 1 << 3
IFA_ADDRESS, IFA_LOCAL, IFA_BROADCAST, IFA_FLAGS, IFA_TARGET_NETNSID = 1, 2, 4, 8, 10
IFA_F_NODAD = 0x02
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
NLA_F_NESTED = 0x8000
IFF_UP, IFF_PROMISC = 0x1, 0x100
AF_BRIDGE = 7
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RTN_UNICAST = 254, 3, 0, 253, 1
OPER_UP = 6
BRIDGE_VLAN_INFO_PVID, BRIDGE_VLAN_INFO_UNTAGGED = 0x2, 0x4

_NLMSG = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_ONE = struct.pack("=I", 1)
_RTA = struct.Struct("=HH")
_CMSG_NSID = _socket.CMSG_SPACE(4)

Notification = tuple[int, int | None, bytes]  # type, the id of the netns it came from (None: this one), body



def attr(kind: int, data: bytes) -> bytes:
    raw = _RTA.pack(4 + len(data), kind) + data
    return raw + b"\0" * (-len(raw) % 4)


def nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def ifinfo(index: int = 0, flags: int = 0, change: int = 0, family: int = 0) -> bytes:
    return _IFINFO.pack(family, 0, index, flags, change)


def _attrs(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    while offset + 4 <= len(data):
        length, kind = _RTA.unpack_from(data, offset)
        if length < 4:
            return
        yield kind & ~NLA_F_NESTED, data[offset + 4 : offset + length]
        offset += (length + 3) & ~3


def _u32(data: bytes) -> int:
    return int(struct.unpack("=I", data[:4])[0])


def _s32(data: bytes) -> int:
    return int(struct.unpack("=i", data[:4])[0])


def _parse_link(body: bytes) -> Link:
    _family, _type, index, flags, _change = _IFINFO.unpack_from(body)
    fields = dict(_attrs(body, _IFINFO.size))
    kind = ""
    if IFLA_LINKINFO in fields:
        info = dict(_attrs(fields[IFLA_LINKINFO]))
        kind = info.get(IFLA_INFO_KIND, b"").rstrip(b"\0").decode()
    return Link(
        index=index,
        name=fields.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(),
        mac=":".join(f"{b:02x}" for b in fields.get(IFLA_ADDRESS, b"")),
        mtu=_u32(fields[IFLA_MTU]) if IFLA_MTU in fields else 0,
        kind=kind,
        master=_u32(fields[IFLA_MASTER]) if IFLA_MASTER in fields else None,
        peer_index=_u32(fields[IFLA_LINK]) if IFLA_LINK in fields else None,
        peer_netnsid=_s32(fields[IFLA_LINK_NETNSID]) if IFLA_LINK_NETNSID in fields else None,
        promisc=bool(flags & IFF_PROMISC),
        up=bool(flags & IFF_UP),
        oper_up=IFLA_OPERSTATE in fields and fields[IFLA_OPERSTATE][0] == OPER_UP,
    )


def subject(mtype: int, body: bytes) -> int | None:
    """The link index a link or address message is about; None for another message, or one too
    short to say."""
    if mtype in (RTM_NEWLINK, RTM_DELLINK) and len(body) >= _IFINFO.size:
        return int(_IFINFO.unpack_from(body)[2])
    if mtype in (RTM_NEWADDR, RTM_DELADDR) and len(body) >= _IFADDR.size:
        return int(_IFADDR.unpack_from(body)[4])
    return None


def _mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


@contextlib.contextmanager
def _pyroute2() -> Iterator[Any]:
    """pyroute2 for the requests off the hot path (in this thread's netns), its errors raised
    as this layer's."""
    from pyroute2.iproute.linux import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError as PyrouteError

    ipr = IPRoute()
    try:
        yield ipr
    except PyrouteError as exc:
        raise NetlinkError(exc.code, os.strerror(exc.code)) from exc
    finally:
        ipr.close()


def _messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, body) of each netlink message of a datagram; a length below the header's
    still moves on by a header (a zero length would loop forever)."""
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, mtype, mflags, mseq, _pid = _NLMSG.unpack_from(data, offset)
        yield mtype, mflags, mseq, data[offset + _NLMSG.size : offset + length]
        offset += max((length + 3) & ~3, _NLMSG.size)


def _raise_error(body: bytes) -> None:
    """NetlinkError for an NLMSG_ERROR (or DONE) body whose code is not 0 (an ack)."""
    code = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else 0
    if code:
        raise NetlinkError(code, os.strerror(code))


class Socket:
    """One rtnetlink socket (or, with `protocol`, another netlink family's: request() and
    batch() only): it stays in the netns it was opened in, whichever thread uses it. With
    `timeout`, a wait for the kernel's answer past it raises TimeoutError."""

    def __init__(self, protocol: int = NETLINK_ROUTE, timeout: float | None = None) -> None:
        kind = _socket.SOCK_RAW | _socket.SOCK_CLOEXEC
        self._sock = _socket.socket(_socket.AF_NETLINK, kind, protocol)
        try:
            self._sock.settimeout(timeout)
            self._sock.bind((0, 0))
            if protocol == NETLINK_ROUTE:
                # Strict checking makes the kernel filter dumps by the request's fields (the link
                # of an address dump), so a bridge with a thousand ports is not read whole each time.
                self._sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        except OSError:
            self._sock.close()
            raise
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Socket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, kind: int, flags: int, payload: bytes) -> list[tuple[int, bytes]]:
        """Send one request; return the (type, body) of the replies, raise on a kernel error."""
        self._seq += 1
        seq = self._seq
        self._sock.send(
            _NLMSG.pack(_NLMSG.size + len(payload), kind, flags | NLM_F_REQUEST, seq, 0) + payload
        )
        replies: list[tuple[int, bytes]] = []
        while True:
            for mtype, mflags, mseq, body in _messages(self._sock.recv(1 << 16)):
                if mseq != seq:
                    continue
                if mtype in (NLMSG_ERROR, NLMSG_DONE):  # a dump's error comes in its DONE
                    _raise_error(body)
                    return replies
                replies.append((mtype, body))
                if not mflags & NLM_F_MULTI and not flags & NLM_F_ACK:
                    return replies

    def batch(self, messages: Sequence[tuple[int, int, bytes]]) -> None:
        """Send (type, flags, payload) messages in one datagram, as a netfilter batch is (the
        kernel takes it whole or not at all), and wait for the answer to each asking an ack;
        raise the first error the kernel sent."""
        data = b""
        waiting = set()
        for kind, flags, payload in messages:
            self._seq += 1
            data += _NLMSG.pack(_NLMSG.size + len(payload), kind, flags | NLM_F_REQUEST, self._seq, 0)
            data += payload + b"\0" * (-len(payload) % 4)
            if flags & NLM_F_ACK:
                waiting.add(self._seq)
        self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # an error without the message echoed
        self._sock.send(data)
        while waiting:
            for mtype, _flags, mseq, body in _messages(self._sock.recv(1 << 16)):
                if mtype == NLMSG_ERROR:
                    _raise_error(body)
                    waiting.discard(mseq)

    # --- notifications -------------------------------------------------------------------

    def listen(self, groups: Iterable[int], buffer: int) -> None:
        """Receive the notifications of `groups` (RTNLGRP_*): those of this netns, and those of
        every netns with an id here (NETLINK_LISTEN_ALL_NSID, CAP_NET_BROADCAST over them).
        Use this socket for nothing else: request() skips what is not its answer. It becomes
        non-blocking: with a timeout, Python waits for data before each recvmsg, MSG_DONTWAIT or not."""
        self._sock.setblocking(False)
        self._sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, buffer)
        self._sock.setsockopt(SOL_NETLINK, NETLINK_LISTEN_ALL_NSID, 1)
        for group in groups:
            self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)

    def notifications(self, limit: int) -> tuple[list[Notification], bool]:
        """The notifications queued, without waiting: (type, the id here of the netns it came
        from or None for this one, body) of each, up to `limit` datagrams; and whether the
        queue was drained. OSError ENOBUFS: the kernel dropped some since the last call."""
        found: list[Notification] = []
        for _ in range(limit):
            try:
                data, ancillary, _flags, _from = self._sock.recvmsg(1 << 16, _CMSG_NSID, _socket.MSG_DONTWAIT)
            except BlockingIOError:
                return found, True
            nsid = None
            for level, kind, value in ancillary:
                if level == SOL_NETLINK and kind == NETLINK_LISTEN_ALL_NSID and len(value) >= 4:
                    nsid = _s32(value)
            found.extend((mtype, nsid, body) for mtype, _mflags, _seq, body in _messages(data))
        return found, False

    # --- links ---------------------------------------------------------------------------

    def link_by_name(self, name: str) -> Link | None:
        return self._get_link(ifinfo() + attr(IFLA_IFNAME, name.encode() + b"\0"))

    def link_by_index(self, index: int) -> Link | None:
        return self._get_link(ifinfo(index))

    def _get_link(self, payload: bytes) -> Link | None:
        try:
            replies = self.request(RTM_GETLINK, 0, payload)
        except NetlinkError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        return _parse_link(replies[0][1]) if replies else None

    def add_veth(
        self, name: str, peer: str, peer_netns_fd: int, mtu: int | None, peer_mac: str | None,
        master: int | None = None,
    ) -> None:
        """The pair with its peer born in another netns (no move afterwards). With `master`, the
        host end is also enslaved to it in the same request (the kernel undoes the creation if
        that fails). Both ends stay down.

        Each end gets one TX and one RX queue, the number the kernel's veth uses by default. Left
        unsaid, the kernel allocates one per possible CPU and then cuts the count in use down to
        one, and each cut waits for an expedited RCU grace period with rtnl_lock held: two per
        pair, stalling every other netlink request of the host and interrupting the other CPUs."""
        queues = [attr(IFLA_NUM_TX_QUEUES, _ONE), attr(IFLA_NUM_RX_QUEUES, _ONE)]
        peer_attrs = [
            attr(IFLA_IFNAME, peer.encode() + b"\0"),
            attr(IFLA_NET_NS_FD, struct.pack("=I", peer_netns_fd)),
            *queues,
        ]
        own = [attr(IFLA_IFNAME, name.encode() + b"\0"), *queues]
        if master is not None:
            own.append(attr(IFLA_MASTER, struct.pack("=I", master)))
        if mtu:
            peer_attrs.append(attr(IFLA_MTU, struct.pack("=I", mtu)))
            own.append(attr(IFLA_MTU, struct.pack("=I", mtu)))
        if peer_mac:
            peer_attrs.append(attr(IFLA_ADDRESS, _mac_bytes(peer_mac)))
        info = nested(
            IFLA_LINKINFO,
            attr(IFLA_INFO_KIND, b"veth\0"),
            nested(IFLA_INFO_DATA, nested(VETH_INFO_PEER, ifinfo() + b"".join(peer_attrs))),
        )
        self.request(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, ifinfo() + b"".join(own) + info)

    def add_bridge(self, name: str, mtu: int | None, vlan_filtering: bool) -> None:
        attrs = attr(IFLA_IFNAME, name.encode() + b"\0")
        if mtu:
            attrs += attr(IFLA_MTU, struct.pack("=I", mtu))
        data = [nested(IFLA_INFO_DATA, attr(IFLA_BR_VLAN_FILTERING, b"\1"))] if vlan_filtering else []
        info = nested(IFLA_LINKINFO, attr(IFLA_INFO_KIND, b"bridge\0"), *data)
        self.request(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, ifinfo() + attrs + info)

    def set_link(
        self,
        index: int,
        up: bool | None = None,
        master: int | None = None,
        mac: str | None = None,
        promisc: bool | None = None,
    ) -> None:
        attrs = b""
        if master is not None:
            attrs += attr(IFLA_MASTER, struct.pack("=I", master))
        if mac is not None:
            attrs += attr(IFLA_ADDRESS, _mac_bytes(mac))
        flags = (IFF_UP if up else 0) | (IFF_PROMISC if promisc else 0)
        change = (IFF_UP if up is not None else 0) | (IFF_PROMISC if promisc is not None else 0)
        self.request(RTM_NEWLINK, NLM_F_ACK, ifinfo(index, flags, change) + attrs)

    def set_ipv4_conf(self, index: int, values: dict[int, int]) -> None:
        """Per-link IPv4 sysctls (IPV4_DEVCONF_*) over netlink: no thread in the link's netns."""
        conf = nested(IFLA_INET_CONF, *(attr(key, struct.pack("=I", value)) for key, value in values.items()))
        self.request(
            RTM_NEWLINK, NLM_F_ACK, ifinfo(index) + nested(IFLA_AF_SPEC, nested(_socket.AF_INET, conf))
        )

    def rename(self, index: int, name: str) -> None:
        self.request(RTM_NEWLINK, NLM_F_ACK, ifinfo(index) + attr(IFLA_IFNAME, name.encode() + b"\0"))

    def set_brport(self, index: int, hairpin: bool, isolated: bool) -> None:
        protinfo = nested(
            IFLA_PROTINFO,
            attr(IFLA_BRPORT_MODE, bytes([hairpin])),
            attr(IFLA_BRPORT_ISOLATED, bytes([isolated])),
        )
        self.request(RTM_SETLINK, NLM_F_ACK, ifinfo(index, family=AF_BRIDGE) + protinfo)

    def delete_link(self, index: int) -> None:
        self.request(RTM_DELLINK, NLM_F_ACK, ifinfo(index))

    def mark(self, index: int, group: int, alias: str) -> None:
        """Put a link in a link group, with an alias (neither takes the kernel any time)."""
        attrs = attr(IFLA_GROUP, struct.pack("=I", group)) + attr(IFLA_IFALIAS, alias.encode() + b"\0")
        self.request(RTM_NEWLINK, NLM_F_ACK, ifinfo(index) + attrs)

    def group_members(self, group: int) -> list[tuple[int, str]]:
        """(index, alias) of every link of a link group."""
        found = []
        mask = attr(IFLA_EXT_MASK, struct.pack("=I", RTEXT_FILTER_SKIP_STATS))
        # The kernel cannot filter a dump by group: the attribute's bytes are looked for first (in
        # C), and only the links holding them parsed (~7 ms of Python at 400 links otherwise).
        member = attr(IFLA_GROUP, struct.pack("=I", group))
        for _kind, body in self.request(RTM_GETLINK, NLM_F_DUMP, ifinfo() + mask):
            if member not in body:
                continue
            fields = dict(_attrs(body, _IFINFO.size))
            if IFLA_GROUP in fields and _u32(fields[IFLA_GROUP]) == group:
                alias = fields.get(IFLA_IFALIAS, b"").split(b"\0", 1)[0].decode(errors="replace")
                found.append((_IFINFO.unpack_from(body)[2], alias))
        return found

    def delete_group(self, group: int) -> None:
        """Delete every link of a link group in one request: the kernel unregisters them as one
        batch, with the RCU grace periods of one deletion."""
        self.request(RTM_DELLINK, NLM_F_ACK, ifinfo() + attr(IFLA_GROUP, struct.pack("=I", group)))

    # --- off the hot path: pyroute2 behind the same seam ------------------------------------

    def brport_hairpin(self, index: int) -> bool | None:
        with _pyroute2() as ipr:
            shown = ipr.brport("show", index=index)
            return bool(shown[0].get(("protinfo", "mode"))) if shown else None

    def enable_vlan_filtering(self, index: int) -> None:
        with _pyroute2() as ipr:
            ipr.link("set", index=index, kind="bridge", br_vlan_filtering=1)

    def main_routes(self) -> set[tuple[str, str | None, int]]:
        """(destination, gateway, routing protocol) of every route of the main table; a default
        route's destination is 0.0.0.0/0 or ::/0 (the kernel sends it none)."""
        found = set()
        with _pyroute2() as ipr:
            for family, anywhere in ((_socket.AF_INET, "0.0.0.0"), (_socket.AF_INET6, "::")):
                for msg in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
                    dst, gateway = msg.get_attr("RTA_DST"), msg.get_attr("RTA_GATEWAY")
                    found.add((f"{dst or anywhere}/{msg['dst_len']}", str(gateway) if gateway else None,
                               msg["proto"]))
        return found

    def set_route(self, dst: str, gateway: str, proto: int, replace: bool) -> None:
        """`replace` only a route this caller owns; else `add`, which fails (EEXIST) on one there."""
        with _pyroute2() as ipr:
            ipr.route("replace" if replace else "add", dst=dst, gateway=gateway, proto=proto,
                      table=RT_TABLE_MAIN)

    def delete_route(self, dst: str, gateway: str, proto: int) -> None:
        with _pyroute2() as ipr:
            ipr.route("del", dst=dst, gateway=gateway, proto=proto, table=RT_TABLE_MAIN)

    def uplink_mtu(self, addresses: Iterable[str]) -> int | None:
        """MTU of the link holding one of `addresses`, else of the default route's link."""
        wanted = set(addresses)
        with _pyroute2() as ipr:
            owners = [msg["index"] for msg in ipr.get_addr()
                      if {str(msg.get_attr("IFA_ADDRESS")), str(msg.get_attr("IFA_LOCAL"))} & wanted]
            defaults = [msg.get_attr("RTA_OIF") for family in (_socket.AF_INET, _socket.AF_INET6)
                        for msg in ipr.get_routes(family=family, table=RT_TABLE_MAIN)
                        if msg["dst_len"] == 0 and msg.get_attr("RTA_OIF")]
        index = next(iter(owners + defaults), None)
        found = self.link_by_index(index) if index is not None else None
        return found.mtu if found is not None else None

    def set_port_vlan(self, index: int, vid: int) -> None:
        """The port's only VLAN: `vid`, untagged and its PVID (VLAN 1 removed)."""
        with _pyroute2() as ipr:
            flags = BRIDGE_VLAN_INFO_PVID | BRIDGE_VLAN_INFO_UNTAGGED
            ipr.vlan_filter("add", index=index, vlan_info={"vid": vid, "flags": flags})
            ipr.vlan_filter("del", index=index, vlan_info={"vid": 1})

    # --- addresses and routes --------------------------------------------------------------

    def addresses(self, index: int) -> list[tuple[IPInterface, int]]:
        """(address, IFA flags) of one link."""
        return self._address_dump(_IFADDR.pack(0, 0, 0, 0, index), index)

    def _address_dump(self, payload: bytes, index: int,
                      scope: int | None = None) -> list[tuple[IPInterface, int]]:
        out = []
        for _kind, body in self.request(RTM_GETADDR, NLM_F_DUMP, payload):
            family, prefixlen, flags, found_scope, ifindex = _IFADDR.unpack_from(body)
            if ifindex != index or scope not in (None, found_scope):
                continue
            fields = dict(_attrs(body, _IFADDR.size))
            raw = fields.get(IFA_LOCAL) or fields.get(IFA_ADDRESS)
            if raw is None:
                continue
            if IFA_FLAGS in fields:
                flags = _u32(fields[IFA_FLAGS])
            ip = _socket.inet_ntop(family, raw)
            out.append((ipaddress.ip_interface(f"{ip}/{prefixlen}"), flags))
        return out

    def links(self) -> list[Link]:
        """Every link (each with `peer_netnsid`: the id here of the netns its peer is in)."""
        mask = attr(IFLA_EXT_MASK, struct.pack("=I", RTEXT_FILTER_SKIP_STATS))  # a third of the bytes
        return [_parse_link(body) for _kind, body in self.request(RTM_GETLINK, NLM_F_DUMP, ifinfo() + mask)]

    def bridge_ports(self) -> list[tuple[Link, int]]:
        """Each veth on a bridge whose peer is in another netns, with that netns's id here."""
        return [(link, link.peer_netnsid) for link in self.links()
                if link.kind == "veth" and link.master and link.peer_index and link.peer_netnsid is not None]

    def nsid(self, netns_fd: int) -> int | None:
        """The id this netns knows the netns `netns_fd` by; None if it has given it none (as
        `ip netns list` shows it: no id is assigned by asking)."""
        payload = struct.pack("=B3x", _socket.AF_UNSPEC) + attr(NETNSA_FD, struct.pack("=I", netns_fd))
        for _kind, body in self.request(RTM_GETNSID, NLM_F_ACK, payload):
            raw = dict(_attrs(body, 4)).get(NETNSA_NSID)
            if raw is not None:
                nsid = _s32(raw)
                return nsid if nsid >= 0 else None
        return None

    def default_links(self) -> list[int]:
        """The output link of each default route of the main table, IPv4's first."""
        out = []
        for family in (_socket.AF_INET, _socket.AF_INET6):
            header = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
            for _kind, body in self.request(RTM_GETROUTE, NLM_F_DUMP, header):
                fields = dict(_attrs(body, _RTMSG.size))
                if body[1] == 0 and body[4] == RT_TABLE_MAIN and RTA_OIF in fields:
                    out.append(_u32(fields[RTA_OIF]))
        return out

    def global_addresses(self, index: int) -> list[IPInterface]:
        """The addresses of one link of universe scope (no link-local one)."""
        return [address for address, _flags in self._address_dump(_IFADDR.pack(0, 0, 0, 0, index), index,
                                                                    scope=RT_SCOPE_UNIVERSE)]

    def peer_addresses(self, nsid: int, index: int) -> list[IPInterface]:
        """The addresses of link `index` of the netns known here as `nsid`, read without entering
        it (IFA_TARGET_NETNSID: CAP_NET_ADMIN over that netns)."""
        payload = _IFADDR.pack(0, 0, 0, 0, index) + attr(IFA_TARGET_NETNSID, struct.pack("=i", nsid))
        return [address for address, _flags in self._address_dump(payload, index)]

    def add_address(self, index: int, address: IPInterface, nodad: bool = False) -> None:
        family = _socket.AF_INET if address.version == 4 else _socket.AF_INET6
        raw = address.ip.packed
        attrs = attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw)
        if address.version == 4 and address.network.prefixlen < 31:
            # the subnet broadcast, as `ip addr add ... brd +` and the reference plugin set it
            attrs += attr(IFA_BROADCAST, address.network.broadcast_address.packed)
        if nodad:
            attrs += attr(IFA_FLAGS, struct.pack("=I", IFA_F_NODAD))
        header = _IFADDR.pack(family, address.network.prefixlen, IFA_F_NODAD if nodad else 0, 0, index)
        self.request(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, header + attrs)

    def delete_address(self, index: int, address: IPInterface) -> None:
        family = _socket.AF_INET if address.version == 4 else _socket.AF_INET6
        raw = address.ip.packed
        header = _IFADDR.pack(family, address.network.prefixlen, 0, 0, index)
        self.request(RTM_DELADDR, NLM_F_ACK, header + attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw))

    def routes(self, family: int) -> list[tuple[str, str | None]]:
        """(destination network, gateway) of every route of one family, in every table."""
        out = []
        header = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)  # table 0: no table filter
        for _kind, body in self.request(RTM_GETROUTE, NLM_F_DUMP, header):
            fam, dst_len = body[0], body[1]
            fields = dict(_attrs(body, _RTMSG.size))
            any_address = "::" if fam == _socket.AF_INET6 else "0.0.0.0"
            dst = _socket.inet_ntop(fam, fields[RTA_DST]) if RTA_DST in fields else any_address
            gateway = _socket.inet_ntop(fam, fields[RTA_GATEWAY]) if RTA_GATEWAY in fields else None
            out.append((str(ipaddress.ip_network(f"{dst}/{dst_len}", strict=False)), gateway))
        return out

    def add_route(self, dst: str, gateway: str | None, oif: int) -> None:
        net = ipaddress.ip_network(dst, strict=False)
        family = _socket.AF_INET if net.version == 4 else _socket.AF_INET6
        scope = RT_SCOPE_UNIVERSE if gateway else RT_SCOPE_LINK
        header = _RTMSG.pack(family, net.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST, 0)
        attrs = attr(RTA_OIF, struct.pack("=I", oif))
        if net.prefixlen:
            attrs += attr(RTA_DST, net.network_address.packed)
        if gateway:
            attrs += attr(RTA_GATEWAY, ipaddress.ip_address(gateway).packed)
        self.request(RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, header + attrs)
