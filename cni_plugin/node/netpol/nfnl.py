"""A change of the netpol tables that only adds and deletes elements of sets and maps the tables
already hold, sent to nf_tables as one nfnetlink batch, without nft.

nft lists the whole ruleset into its cache before it evaluates a command (10-30 ms at 500 pods,
in process or exec'd); a pod coming or going is a few elements. The kernel commits a batch
(NFNL_MSG_BATCH_BEGIN, NFT_MSG_NEWSETELEM / NFT_MSG_DELSETELEM per set, NFNL_MSG_BATCH_END) all
or nothing and answers each message, so a refused batch changed nothing and nft may apply the
same change after it. Elements are encoded as nft 1.0 encodes them (linux/netfilter/nf_tables.h,
nft's src/intervals.c): a key's fields in network order, each field of a concatenation padded to
4 bytes; an interval of a one-field set as its start and, flagged NFT_SET_ELEM_INTERVAL_END, the
value after its end (none at the end of the address space: the start then carries nft's "open"
user data), with an interval end at zero first when the set was empty and the lowest start is
not zero; an interval of a concatenation as NFTA_SET_ELEM_KEY and NFTA_SET_ELEM_KEY_END. What
this module cannot encode exactly (a type, verdict or value it does not know, a set the tables
in force do not hold, any other command) is left to nft: encode() gives None.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ... import nfbatch, rtnl
from ...nfbatch import Message
from . import delta

# linux/netfilter/nf_tables.h: what only this module encodes (what others do too: nfbatch.py)
NFTA_SET_ELEM_FLAGS, NFTA_SET_ELEM_USERDATA, NFTA_SET_ELEM_KEY_END = 3, 6, 10
NFT_SET_ELEM_INTERVAL_END = 0x1
# libnftnl's user data on an interval's start that runs to the end of the key's space: TLV of
# NFTNL_UDATA_SET_ELEM_FLAGS (1), 4 bytes, NFTNL_SET_ELEM_F_INTERVAL_OPEN (1) in host order.
OPEN = bytes([1, 4]) + struct.pack("=I", 1)
LIMIT = 128 * 1024  # bytes of one batch, well under a netlink socket's default send buffer

_LINE = re.compile(r"(add|delete) element (\w+) (\w+) (\w+) \{ (.*) \}")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # an ifname as nft.py renders it
_CHAIN = re.compile(r"[A-Za-z0-9_]{1,255}")
_PORTS = re.compile(r"[0-9]{1,5}(-[0-9]{1,5})?")
_PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}


@dataclass(frozen=True)
class _Type:
    """A set's key: its fields' type names; a map's value is a verdict."""

    fields: tuple[str, ...]
    interval: bool
    verdict: bool


def _type(block: delta.Block) -> _Type | None:
    kind = [h.removeprefix("type ") for h in block.header if h.startswith("type ")]
    flags = [h for h in block.header if not h.startswith("type ")]
    if len(kind) != 1 or flags not in ([], ["flags interval"]):
        return None
    key, _, value = kind[0].partition(" : ")
    fields = tuple(key.split(" . "))
    verdict = block.kind == "map"
    if verdict != (value == "verdict") or not all(f in _WIDTH for f in fields):
        return None
    if flags and (verdict or "ifname" in fields):
        return None  # interval maps and names (wildcards): not rendered, not encoded
    return _Type(fields, bool(flags), verdict)


_WIDTH = {"ipv4_addr": 4, "ipv6_addr": 16, "ifname": nfbatch.IFNAMSIZ, "inet_proto": 1, "inet_service": 2}


def _range(field: str, text: str) -> tuple[int, int] | None:
    """The first and last value a field's text covers (an address, a CIDR, a port range)."""
    try:
        if field in ("ipv4_addr", "ipv6_addr") and "%" not in text:  # no scoped address
            net = ipaddress.ip_network(text, strict=True)
            if net.version != (4 if field == "ipv4_addr" else 6):
                return None
            return int(net.network_address), int(net.broadcast_address)
        if field == "inet_service" and _PORTS.fullmatch(text):
            first, _, last = text.partition("-")
            low, high = int(first), int(last or first)
            return (low, high) if low <= high <= 0xFFFF else None
        if field == "inet_proto":
            number = _PROTOCOLS.get(text, int(text) if text.isdigit() and len(text) <= 3 else -1)
            return (number, number) if 0 <= number <= 0xFF else None
    except ValueError:
        return None
    return None


def _bytes(field: str, value: int) -> bytes:
    return value.to_bytes(_WIDTH[field], "big")


def _ifname(text: str) -> bytes | None:
    name = text[1:-1] if len(text) > 2 and text[0] == text[-1] == '"' else ""
    return nfbatch.ifname(name) if _NAME.fullmatch(name) else None


def _register(raw: bytes) -> bytes:
    """A concatenation's field: padded to whole 32-bit registers (nft's netlink_gen_concat_data)."""
    return raw + bytes(-len(raw) % 4)


def _keys(kind: _Type, text: str) -> tuple[bytes, bytes] | None:
    """The key's first and last value, as the kernel keeps them; None if not encodable."""
    parts = text.split(" . ")
    if len(parts) != len(kind.fields):
        return None
    low, high = b"", b""
    for field, part in zip(kind.fields, parts, strict=True):
        if field == "ifname":
            raw = _ifname(part)
            if raw is None:
                return None
            first = last = raw
        else:
            span = _range(field, part)
            if span is None:
                return None
            first, last = _bytes(field, span[0]), _bytes(field, span[1])
        if len(kind.fields) > 1:
            first, last = _register(first), _register(last)
        low, high = low + first, high + last
    if low != high and not kind.interval:
        return None  # a range in a set without intervals
    return low, high


def _element(key: bytes, flags: int = 0, key_end: bytes | None = None, verdict: str | None = None,
             userdata: bytes | None = None) -> bytes:
    attrs: list[bytes] = []
    if key_end is not None:
        attrs.append(nfbatch.data(NFTA_SET_ELEM_KEY_END, key_end))
    if flags:
        attrs.append(nfbatch.u32(NFTA_SET_ELEM_FLAGS, flags))
    if verdict is not None:
        attrs.append(nfbatch.verdict_data(nfbatch.NFTA_SET_ELEM_DATA, nfbatch.NFT_JUMP, verdict))
    if userdata is not None:
        attrs.append(rtnl.attr(NFTA_SET_ELEM_USERDATA, userdata))
    return nfbatch.element(key, *attrs)


def _elements(kind: _Type, add: bool, items: Sequence[str], empty: bool) -> list[bytes] | None:
    """The set's NFTA_LIST_ELEMs of `items`; `empty`: the set holds nothing in force."""
    out: list[bytes] = []
    lowest: int | None = None
    width = sum(_WIDTH[f] for f in kind.fields)
    for item in items:
        text, _, value = item.partition(" : ")
        verdict = None
        if kind.verdict and (add or value):
            target = value.removeprefix("jump ")
            if not (value.startswith("jump ") and _CHAIN.fullmatch(target)):
                return None
            verdict = target
        elif value:
            return None
        keys = _keys(kind, text)
        if keys is None:
            return None
        low, high = keys
        if not kind.interval:
            out.append(_element(low, verdict=verdict))
        elif len(kind.fields) > 1:
            out.append(_element(low, key_end=high))
        elif int.from_bytes(high, "big") == (1 << 8 * width) - 1:
            out.append(_element(low, userdata=OPEN))
        else:
            after = (int.from_bytes(high, "big") + 1).to_bytes(width, "big")
            out += [_element(low), _element(after, NFT_SET_ELEM_INTERVAL_END)]
        start = int.from_bytes(low, "big")
        lowest = start if lowest is None else min(lowest, start)
    if add and empty and kind.interval and len(kind.fields) == 1 and lowest:
        # nft's first segment (intervals.c, segtree_needs_first_segment): into an empty set, an
        # interval end at zero before the lowest start
        out.insert(0, _element(bytes(width), NFT_SET_ELEM_INTERVAL_END))
    return out


def encode(change: str, model: delta.Model) -> list[Message] | None:
    """The batch applying `change` (a script of delta.diff) to the tables of `model` (in force),
    or None when it is not only element changes nft would encode as this module does."""
    messages: list[Message] = []
    for line in change.splitlines():
        match = _LINE.fullmatch(line)
        if match is None:
            return None
        verb, family, table, name, items = match.groups()
        block = model.get((family, table), {}).get(name)
        kind = None if block is None or block.kind == "chain" else _type(block)
        if kind is None or family not in nfbatch.FAMILIES:
            return None
        assert block is not None
        elements = _elements(kind, verb == "add", items.split(", "), not block.body)
        if elements is None or sum(map(len, elements)) > 0xFFFF - 4:
            return None  # (an attribute's length is 16 bits)
        messages.append(nfbatch.set_elements(family, table, name, elements, delete=verb == "delete"))
    if not messages or sum(16 + len(m[2]) for m in messages) > LIMIT:
        return None
    return nfbatch.framed(messages)


def apply(change: str, model: delta.Model, open_socket: Callable[[], rtnl.Socket] | None = None) -> bool:
    """Apply `change` to the tables of `model` as one batch in the socket's netns (default: on the
    calling thread's kept socket, nfbatch.commit: closing one stalls the node's next veth
    creations): True when done, False when it is not a change this module encodes.
    NetlinkError when the kernel refused it (then nothing changed), OSError (TimeoutError
    included) when the socket failed or the answer did not come in time."""
    messages = encode(change, model)
    if messages is None:
        return False
    if open_socket is None:
        nfbatch.commit(messages)  # framed by encode()
    else:
        with open_socket() as sock:
            sock.batch(messages)
    return True
