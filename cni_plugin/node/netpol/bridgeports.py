"""The bridge ports the bridge table keys on (nft.py): each address on the pod side of a bridge
port (a veth whose peer is in another netns), with the ports it is on. Read in the netns of the
socket, without entering the pods' netns.

Reading them whole takes one links dump and one address dump per port, in the pod's netns:
~150 ms at 500 pods on a 2-core machine, at every event. So the node controller keeps them
(Watch): read whole once, then from the kernel's notifications, subscribed to before that read:
the links of this netns, and the addresses of every netns with an id here (a pod's gets one when
its veth is made). A port is read again only when a notification names it; when the kernel
dropped some (its socket buffer overflowed) or a read failed, everything is read again.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from ... import rtnl
from ...netlink import Link, NetlinkError
from .objects import Address

BUFFER = 4 << 20  # bytes of notifications the kernel queues before it drops (and says ENOBUFS)
GROUPS = (rtnl.RTNLGRP_LINK, rtnl.RTNLGRP_IPV4_IFADDR, rtnl.RTNLGRP_IPV6_IFADDR)
TIMEOUT = 5.0  # s a read waits for the kernel's answer, then TimeoutError (an OSError: read whole next)
DRAIN_LIMIT = 4096  # datagrams taken per refresh: a flood of notifications costs a full read, not more
_GONE = (errno.EINVAL, errno.ENODEV)  # asked of a netns or link that went away meanwhile


def _socket() -> rtnl.Socket:
    return rtnl.Socket(timeout=TIMEOUT)


@dataclass(frozen=True)
class Port:
    name: str
    master: int
    nsid: int  # the id here of the pod's netns
    peer: int  # the index of the pod end there
    addresses: frozenset[Address]


def _port(sock: rtnl.Socket, link: Link) -> Port | None:
    """`link` as a bridge port with its pod end's addresses; None when it is not one (or its pod
    end went away). EACCES (no CAP_NET_ADMIN over the pod's netns) is raised: never "no pods"."""
    if not (link.kind == "veth" and link.master and link.peer_index and link.peer_netnsid is not None):
        return None
    try:
        found = sock.peer_addresses(link.peer_netnsid, link.peer_index)
    except NetlinkError as exc:
        if exc.errno in _GONE:
            return None
        raise
    return Port(link.name, link.master, link.peer_netnsid, link.peer_index,
                frozenset(address.ip for address in found))


def read(sock: rtnl.Socket) -> dict[int, Port]:
    """Every bridge port of the socket's netns, by index."""
    ports = {}
    for link in sock.links():
        port = _port(sock, link)
        if port is not None:
            ports[link.index] = port
    return ports


def addresses(ports: Collection[Port]) -> dict[Address, frozenset[str]]:
    found: dict[Address, set[str]] = {}
    for port in ports:
        for address in port.addresses:
            found.setdefault(address, set()).add(port.name)
    return {address: frozenset(names) for address, names in found.items()}


def _patched(found: Mapping[Address, frozenset[str]],
             changed: list[tuple[Port | None, Port | None]]) -> dict[Address, frozenset[str]]:
    """`found` (addresses()) after the ports' changes, in order."""
    out = dict(found)
    for before, after in changed:
        if before is not None:
            for address in before.addresses:
                names = out.get(address, frozenset()) - {before.name}
                if names:
                    out[address] = names
                else:
                    out.pop(address, None)
        if after is not None:
            for address in after.addresses:
                out[address] = out.get(address, frozenset()) | {after.name}
    return out


def pod_ports(open_socket: Callable[[], rtnl.Socket] = _socket,
              bridge: str | None = None) -> dict[Address, frozenset[str]]:
    """One read, whole; with `bridge`, of that bridge's ports only (none if it does not exist)."""
    with open_socket() as sock:
        ports = list(read(sock).values())
        if bridge is not None:
            master = sock.link_by_name(bridge)
            ports = [p for p in ports if master is not None and p.master == master.index]
    return addresses(ports)


class Watch:
    """The bridge ports, kept from notifications (the module's doc). For one thread; close() it.
    Raises what opening or subscribing raises (EPERM without CAP_NET_BROADCAST)."""

    def __init__(self, open_socket: Callable[[], rtnl.Socket] = _socket) -> None:
        self._events = open_socket()
        try:
            self._events.listen(GROUPS, BUFFER)
            self._sock = open_socket()
        except BaseException:
            self._events.close()
            raise
        self._ports: dict[int, Port] | None = None  # None: to be read whole
        self._map: dict[Address, frozenset[str]] | None = None  # of _ports, made when asked
        self._changed: list[tuple[Port | None, Port | None]] = []  # ports (before, after) since _map
        self.full_reads = 0  # for the tests and the benchmark

    def close(self) -> None:
        self._events.close()
        self._sock.close()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pods(self) -> Mapping[Address, Collection[str]]:
        """Each pod address with the ports it is on: the same object while nothing changed."""
        ports = self._refresh()
        if self._map is None:
            self._map = addresses(ports.values())
        elif self._changed:
            self._map = _patched(self._map, self._changed)  # a new object: the old one is someone's key
        self._changed = []
        return self._map

    def on_bridge(self, bridge: str) -> Collection[Address]:
        """The pod addresses on the ports of `bridge` (none if it does not exist)."""
        ports = self._refresh()
        master = self._sock.link_by_name(bridge)
        if master is None:
            return frozenset()
        return frozenset(a for p in ports.values() if p.master == master.index for a in p.addresses)

    def _refresh(self) -> dict[int, Port]:
        try:
            return self._follow()
        except BaseException:
            self._ports = self._map = None  # a port left half-read: read whole at the next call
            self._changed = []
            raise

    def _follow(self) -> dict[int, Port]:
        try:
            notes, drained = self._events.notifications(DRAIN_LIMIT)
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            notes, drained = [], False
        if self._ports is None or not drained:
            self._ports, self._map, self._changed = read(self._sock), None, []
            self.full_reads += 1
            return self._ports
        links, pod_ends = set(), set()
        for mtype, nsid, body in notes:
            index = rtnl.subject(mtype, body)
            if index is None:
                continue
            if mtype in (rtnl.RTM_NEWLINK, rtnl.RTM_DELLINK):
                links.add(index)  # of this netns; or of a pod's, read here for nothing (ids may coincide)
            if nsid is not None:
                pod_ends.add((nsid, index))
        links.update(i for i, p in self._ports.items() if (p.nsid, p.peer) in pod_ends)
        for index in links:
            self._reread(index)
        return self._ports

    def _reread(self, index: int) -> None:
        assert self._ports is not None
        link = self._sock.link_by_index(index)
        port = None if link is None else _port(self._sock, link)
        before = self._ports.get(index)
        if before == port:
            return
        if port is None:
            del self._ports[index]
        else:
            self._ports[index] = port
        self._changed.append((before, port))
