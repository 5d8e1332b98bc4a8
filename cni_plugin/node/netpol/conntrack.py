"""Connection tracking state of pod addresses, forgotten before a new pod is placed at them.

The netpol tables accept what conntrack calls established before any policy judges it (replies of
accepted connections must pass). An entry outlives the pod that made it: a peer that keeps
sending to a deleted pod's address keeps the entry alive, and the next pod given that address
would receive it, and answer on it, past its own policy. So the node controller deletes every entry
of an address just before it places a new pod there (agent.py): until that transaction the
address is not placed and the fence drops its traffic before conntrack is consulted, so no new
entry can be confirmed in between.

ctnetlink encoded with struct on rtnl's socket, as the hot path's requests are (pyroute2's
Conntrack cost 30-45 ms per request here, a loop per request): a netns with few entries is
dumped whole once and matched here, one with many filtered by the kernel (WHOLE).
"""

from __future__ import annotations

import _socket
import errno
import struct
from collections.abc import Callable, Collection, Iterator

from ... import nfbatch, rtnl
from ...netlink import NetlinkError
from .objects import Address

_CTNETLINK = 1 << 8  # NFNL_SUBSYS_CTNETLINK, in the message type's high byte
IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE, IPCTNL_MSG_CT_GET_STATS = 1, 2, 5
CTA_STATS_GLOBAL_ENTRIES = 1
# Every dump walks each bucket of the host's whole table (262,144 here: ~14 ms), whatever it
# holds, and the filtered way takes four per address (~55 ms): up to this many entries in the
# netns, one dump of them all matched here is cheaper (a Python walk costs ~0.1 ms per entry).
WHOLE = 2048
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_ZONE, CTA_FILTER = 1, 2, 18, 25
CTA_TUPLE_IP = 1
CTA_FILTER_ORIG_FLAGS, CTA_FILTER_REPLY_FLAGS = 1, 2
CTA_FILTER_FLAG_IP_SRC, CTA_FILTER_FLAG_IP_DST = 1, 2
_IP_ATTR = {(4, "src"): 1, (4, "dst"): 2, (6, "src"): 3, (6, "dst"): 4}  # CTA_IP_V4_SRC...
_NFGEN = struct.Struct("=BBH")  # family, version (0), resource id


def _filters(address: Address) -> list[tuple[int, bytes]]:
    """(family, the dump request's attributes) of the four kernel-side filtered dumps (Linux 5.8+)
    that find the entries with `address` at either end of either direction: the kernel walks its
    table, only matches come back (a Python walk of a 10 000-entry table took about a second)."""
    family = _socket.AF_INET if address.version == 4 else _socket.AF_INET6
    out = []
    directions = ((CTA_TUPLE_ORIG, CTA_FILTER_ORIG_FLAGS), (CTA_TUPLE_REPLY, CTA_FILTER_REPLY_FLAGS))
    for tuple_kind, flags_kind in directions:
        for end, flag in (("src", CTA_FILTER_FLAG_IP_SRC), ("dst", CTA_FILTER_FLAG_IP_DST)):
            ip = rtnl.nested(CTA_TUPLE_IP, rtnl.attr(_IP_ATTR[(address.version, end)], address.packed))
            match = rtnl.nested(tuple_kind, ip)
            flags = rtnl.nested(CTA_FILTER, rtnl.attr(flags_kind, struct.pack("=I", flag)))
            out.append((family, match + flags))
    return out


def _ends(tuple_attr: bytes) -> list[bytes]:
    """The raw source and destination addresses of one CTA_TUPLE_* attribute."""
    return [raw for kind, data in rtnl._attrs(tuple_attr) if kind == CTA_TUPLE_IP
            for _ip_kind, raw in rtnl._attrs(data)]


def _key(body: bytes, raws: Collection[bytes]) -> tuple[int, bytes] | None:
    """(family, the attributes naming the entry for a DELETE) of a dumped entry that has one of
    the raw addresses `raws` at an end: checked here too, as a kernel older than the filter sends all."""
    fields = dict(rtnl._attrs(body, _NFGEN.size))
    ends = [raw for kind in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY) for raw in _ends(fields.get(kind, b""))]
    if CTA_TUPLE_ORIG not in fields or not any(raw in raws for raw in ends):
        return None
    key = rtnl.nested(CTA_TUPLE_ORIG, fields[CTA_TUPLE_ORIG])
    if CTA_ZONE in fields:
        key += rtnl.attr(CTA_ZONE, fields[CTA_ZONE])
    return body[0], key


def _dump(sock: rtnl.Socket, family: int, match: bytes,
          raws: Collection[bytes]) -> Iterator[tuple[int, bytes]]:
    """_key() of each entry of one dump (of `family`, filtered by `match`) with one of `raws` at an end."""
    for _kind, body in sock.request(_CTNETLINK | IPCTNL_MSG_CT_GET, rtnl.NLM_F_DUMP,
                                    _NFGEN.pack(family, 0, 0) + match):
        if (entry := _key(body, raws)) is not None:
            yield entry


def _entries(sock: rtnl.Socket) -> int:
    """How many entries the socket's netns holds (ctnetlink's stats); past WHOLE when unknown."""
    try:
        replies = sock.request(_CTNETLINK | IPCTNL_MSG_CT_GET_STATS, rtnl.NLM_F_ACK,
                               _NFGEN.pack(_socket.AF_UNSPEC, 0, 0))
    except NetlinkError:
        return WHOLE + 1
    for _kind, body in replies:
        for kind, data in rtnl._attrs(body, _NFGEN.size):
            if kind == CTA_STATS_GLOBAL_ENTRIES and len(data) >= 4:
                return int(struct.unpack(">I", data[:4])[0])
    return WHOLE + 1


def _whole(sock: rtnl.Socket, addresses: Collection[Address]) -> set[tuple[int, bytes]]:
    """The entries with one of `addresses` at an end, from one dump of the netns's table."""
    raws = {address.packed for address in addresses}
    return set(_dump(sock, _socket.AF_UNSPEC, b"", raws))  # AF_UNSPEC: both families


def _filtered(sock: rtnl.Socket, addresses: Collection[Address]) -> set[tuple[int, bytes]]:
    """The same, from the kernel's filtered dumps: four per address (an entry may match several)."""
    return {entry for address in addresses for family, match in _filters(address)
            for entry in _dump(sock, family, match, {address.packed})}


def forget(addresses: Collection[Address], open_socket: Callable[[], rtnl.Socket] | None = None) -> int:
    """Delete the conntrack entries with one of `addresses` at either end (original or reply
    direction, so NAT's too) in the socket's netns (default: on the calling thread's kept
    nfnetlink socket, nfbatch.kept: closing one per placement made the kernel flush nf_tables'
    deferred destruction with the commit mutex held, docs/performance.md); how many went.
    NetlinkError or OSError (TimeoutError: no answer within nfbatch.TIMEOUT, the address stays
    unplaced) when conntrack cannot be read or changed (no CAP_NET_ADMIN)."""
    deleted = 0
    with (open_socket() if open_socket is not None else nfbatch.kept()) as sock:
        whole = bool(addresses) and _entries(sock) <= WHOLE
        found = _whole(sock, addresses) if whole else _filtered(sock, addresses)
        for family, key in found:
            try:
                sock.request(_CTNETLINK | IPCTNL_MSG_CT_DELETE, rtnl.NLM_F_ACK,
                             _NFGEN.pack(family, 0, 0) + key)
            except NetlinkError as exc:
                if exc.errno != errno.ENOENT:  # gone meanwhile (timed out, or deleted by another)
                    raise
                continue
            deleted += 1
    return deleted
