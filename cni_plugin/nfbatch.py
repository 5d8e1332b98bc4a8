"""nf_tables messages sent without nft, as one nfnetlink batch on a socket of the calling thread's
netns (linux/netfilter/nfnetlink.h, nf_tables.h).

nft lists the ruleset into its cache before it evaluates a command: 10-30 ms at 500 pods, ~15 ms
for a DEL's source-check teardown at a few dozen, in process or exec'd. The kernel commits a
batch (NFNL_MSG_BATCH_BEGIN, the messages, NFNL_MSG_BATCH_END) whole or not at all and answers
each message asking an ack, so a refused batch changed nothing and its caller may fall back to
nft. Users: NetworkPolicy's element changes (node/netpol/nfnl.py) and the source check's setup
(its rules by nfexpr.py) and teardown (sourcecheck.py); NetworkPolicy's conntrack deletions use
the same kept socket (kept()). The attributes more than one of them
encodes (data, verdicts, set elements) are here, once.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from collections.abc import Iterator, Sequence

from . import netns, rtnl

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11  # NLMSG_MIN_TYPE, +1
FAMILIES = {"ip": 2, "inet": 1, "bridge": 7, "ip6": 10}  # NFPROTO_*
TIMEOUT = 5.0  # seconds the kernel's answer may take
# linux/netfilter/nf_tables.h
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NFTA_LIST_ELEM = 1
NFTA_RULE_TABLE, NFTA_RULE_CHAIN = 1, 2
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET = 1, 2
NFTA_SET_ELEM_LIST_ELEMENTS, NFTA_SET_ELEM_LIST_SET_ID = 3, 4
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA = 1, 2
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
NFT_JUMP, NFT_GOTO = -3, -4
IFNAMSIZ = 16  # linux/if.h

Message = tuple[int, int, bytes]  # netlink type, flags, payload


def nfgen(family: int, res_id: int = 0) -> bytes:
    """struct nfgenmsg; res_id is big-endian."""
    return struct.pack("=BB", family, 0) + struct.pack(">H", res_id)


def message(kind: int, flags: int, family: str, *attrs: bytes) -> Message:
    """An nf_tables message of type `kind` (NFT_MSG_*) on a table of `family`."""
    return NFNL_SUBSYS_NFTABLES << 8 | kind, flags, nfgen(FAMILIES[family]) + b"".join(attrs)


def name(kind: int, text: str) -> bytes:
    """A NUL-terminated string attribute (a table's, chain's or set's name)."""
    return rtnl.attr(kind, text.encode() + b"\0")


def u32(kind: int, value: int) -> bytes:
    """A 32-bit attribute in network order (a negative value as two's complement)."""
    return rtnl.attr(kind, struct.pack(">I", value & 0xFFFFFFFF))


def data(kind: int, value: bytes) -> bytes:
    """Attribute `kind` holding `value` as nf_tables data (NFTA_DATA_VALUE)."""
    return rtnl.nested(kind, rtnl.attr(NFTA_DATA_VALUE, value))


def verdict_data(kind: int, code: int, chain: str | None = None) -> bytes:
    """Attribute `kind` holding a verdict (NFTA_DATA_VERDICT): `code` (linux/netfilter.h NF_DROP,
    NFT_JUMP ...) and, for a jump or goto, the chain it names."""
    target = [] if chain is None else [name(NFTA_VERDICT_CHAIN, chain)]
    return rtnl.nested(kind, rtnl.nested(NFTA_DATA_VERDICT, u32(NFTA_VERDICT_CODE, code), *target))


def ifname(text: str) -> bytes:
    """An interface name as a key: NUL-padded to IFNAMSIZ."""
    return text.encode().ljust(IFNAMSIZ, b"\0")


def element(key: bytes, *attrs: bytes) -> bytes:
    """A set element (NFTA_LIST_ELEM): its key, then `attrs` (NFTA_SET_ELEM_*)."""
    return rtnl.nested(NFTA_LIST_ELEM, data(NFTA_SET_ELEM_KEY, key), *attrs)


def set_elements(family: str, table: str, set_name: str, elements: Sequence[bytes], *,
                 delete: bool = False, set_id: int | None = None) -> Message:
    """NFT_MSG_NEWSETELEM (or, with `delete`, DELSETELEM) of `elements` in set `set_name` of
    `table`; `set_id` names a set made earlier in the same batch (an anonymous one)."""
    kind, flags = ((NFT_MSG_DELSETELEM, rtnl.NLM_F_ACK) if delete else
                   (NFT_MSG_NEWSETELEM, rtnl.NLM_F_CREATE | rtnl.NLM_F_ACK))
    by_id = [] if set_id is None else [u32(NFTA_SET_ELEM_LIST_SET_ID, set_id)]
    return message(kind, flags, family, name(NFTA_SET_ELEM_LIST_TABLE, table),
                   name(NFTA_SET_ELEM_LIST_SET, set_name), *by_id,
                   rtnl.nested(NFTA_SET_ELEM_LIST_ELEMENTS, *elements))


def framed(messages: Sequence[Message]) -> list[Message]:
    """`messages` between the batch's begin and end (AF_UNSPEC; the subsystem in res_id)."""
    edge = nfgen(0, NFNL_SUBSYS_NFTABLES)
    return [(NFNL_MSG_BATCH_BEGIN, 0, edge), *messages, (NFNL_MSG_BATCH_END, 0, edge)]


def open_socket() -> rtnl.Socket:
    return rtnl.Socket(rtnl.NETLINK_NETFILTER, timeout=TIMEOUT)


class _Kept(threading.local):
    """The calling thread's socket and the netns (netns.thread_netns) that socket belongs to."""

    sock: rtnl.Socket | None = None
    home = (0, 0)


_kept = _Kept()


def _socket() -> rtnl.Socket:
    """The calling thread's socket in its netns, kept across batches: closing an nfnetlink socket
    makes the kernel flush nf_tables' deferred destruction of what earlier batches deleted (an RCU
    grace period, 10-20 ms on this project's VM) with the netns' nf_tables commit mutex held, and
    a veth's creation (nf_tables' netdev notifier, under rtnl_lock), every batch and nft's own
    socket closes wait for that mutex: the agent's DEL teardown batches stalled the next ADDs and
    CHECKs so (docs/performance.md). A thread that has moved to another netns gets a new one."""
    mine = netns.thread_netns()
    if _kept.sock is None or _kept.home != mine:
        _drop()
        _kept.sock, _kept.home = open_socket(), mine
    return _kept.sock


def _drop() -> None:
    sock, _kept.sock = _kept.sock, None
    if sock is not None:
        sock.close()


def send(messages: Sequence[Message]) -> None:
    """Commit `messages` as one batch, on the calling thread's kept socket (commit())."""
    commit(framed(messages))


def commit(batch: Sequence[Message]) -> None:
    """Commit a framed batch on the calling thread's kept socket (kept()). NetlinkError when the
    kernel refused it (nothing changed), OSError (TimeoutError included) when the socket failed
    or the answer did not come in time."""
    with kept() as sock:
        sock.batch(batch)


@contextlib.contextmanager
def kept() -> Iterator[rtnl.Socket]:
    """The calling thread's kept socket (_socket), also for other nfnetlink subsystems' requests
    (conntrack's: node/netpol/conntrack.py). An error raised through it closes and drops it: an
    answer left unread must not be taken for the next request's."""
    sock = _socket()
    try:
        yield sock
    except BaseException:
        _drop()
        raise
