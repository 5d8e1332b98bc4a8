"""Connection tracking state of pod addresses, forgotten before a new pod is placed at them.

The netpol tables accept what conntrack calls established before any policy judges it (replies of
accepted connections must pass). An entry outlives the pod that made it: a peer that keeps
sending to a deleted pod's address keeps the entry alive, and the next pod given that address
would receive it, and answer on it, past its own policy. So the node agent deletes every entry
of an address just before it places a new pod there (agent.py): until that transaction the
address is not placed and the fence drops its traffic before conntrack is consulted, so no new
entry can be confirmed in between.

ctnetlink encoded with struct on rtnl's socket, as the hot path's requests are: pyroute2's
Conntrack costs tens of ms per request here (a loop per request), one dump of the table does.
"""

from __future__ import annotations

import errno
import ipaddress
import struct
from collections.abc import Callable, Collection, Iterator

from ... import rtnl
from ...netlink import NetlinkError
from .objects import Address

_CTNETLINK = 1 << 8  # NFNL_SUBSYS_CTNETLINK, in the message type's high byte
IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 1, 2
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_ZONE = 1, 2, 18
CTA_TUPLE_IP = 1
_ADDRESSES = {1: 4, 2: 4, 3: 16, 4: 16}  # CTA_IP_V4_SRC, _V4_DST, _V6_SRC, _V6_DST: their lengths
_NFGEN = struct.Struct("=BBH")  # family, version (0), resource id
AF_UNSPEC = 0


def _ends(tuple_attr: bytes) -> Iterator[Address]:
    """The source and destination addresses of one CTA_TUPLE_* attribute."""
    for kind, data in rtnl._attrs(tuple_attr):
        if kind == CTA_TUPLE_IP:
            for ip_kind, raw in rtnl._attrs(data):
                if _ADDRESSES.get(ip_kind) == len(raw):
                    yield ipaddress.ip_address(raw)


def _matches(body: bytes, addresses: Collection[Address]) -> tuple[int, bytes] | None:
    """(family, the attributes naming the entry for a DELETE) when either end of either tuple
    of this dumped entry is one of `addresses`."""
    family = body[0]
    fields = dict(rtnl._attrs(body, _NFGEN.size))
    ends = [a for kind in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY) for a in _ends(fields.get(kind, b""))]
    if CTA_TUPLE_ORIG not in fields or not any(a in addresses for a in ends):
        return None
    key = rtnl.nested(CTA_TUPLE_ORIG, fields[CTA_TUPLE_ORIG])
    if CTA_ZONE in fields:
        key += rtnl.attr(CTA_ZONE, fields[CTA_ZONE])
    return family, key


def forget(addresses: Collection[Address], open_socket: Callable[[], rtnl.Socket] | None = None) -> int:
    """Delete the conntrack entries with one of `addresses` at either end (original or reply
    direction, so NAT's too) in the socket's netns (default: this process's); how many went.
    NetlinkError or OSError when conntrack cannot be read or changed (no CAP_NET_ADMIN)."""
    if not addresses:
        return 0
    wanted = set(addresses)
    deleted = 0
    with (open_socket or (lambda: rtnl.Socket(rtnl.NETLINK_NETFILTER)))() as sock:
        dump = sock.request(_CTNETLINK | IPCTNL_MSG_CT_GET, rtnl.NLM_F_DUMP, _NFGEN.pack(AF_UNSPEC, 0, 0))
        for _kind, body in dump:
            found = _matches(body, wanted)
            if found is None:
                continue
            family, key = found
            try:
                sock.request(_CTNETLINK | IPCTNL_MSG_CT_DELETE, rtnl.NLM_F_ACK,
                             _NFGEN.pack(family, 0, 0) + key)
            except NetlinkError as exc:
                if exc.errno != errno.ENOENT:  # gone meanwhile (timed out, or deleted by another)
                    raise
                continue
            deleted += 1
    return deleted
