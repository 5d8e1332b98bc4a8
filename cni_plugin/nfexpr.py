"""nf_tables rules of the bridge family as nft text and as the NFT_MSG_NEWRULE (and anonymous
set) messages nft 1.0 sends for that text, for one nfnetlink batch (nfbatch.py) without nft.

Only the selectors the source check uses are known (SELECTORS). Each is encoded as
`nft --debug=netlink` shows nft encoding it: the dependency nft puts before it (skipped where an
earlier test of the rule already established that protocol), a payload load, then `cmp` for one
value or, for several, a `lookup` in an anonymous constant set sent before the rule (nft turns
a one-element set into a cmp too). A set carries nft's user data (key byte order and the payload
it was typed from), byte for byte as nft 1.0.6 sends it; nft's listing of an anonymous set does
not read it, so no test sees it. tests/netns/test_sourcecheck_batch.py checks that the kernel
holds the same expressions and nft lists the same chain for both forms.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import nfbatch, rtnl
from .nfbatch import NFTA_LIST_ELEM, NFTA_RULE_CHAIN, NFTA_RULE_TABLE, Message, data, u32

# linux/netfilter/nf_tables.h: what only this module encodes (what others do too: nfbatch.py)
NFT_MSG_NEWRULE, NFT_MSG_NEWSET = 6, 9
NFTA_RULE_EXPRESSIONS, NFTA_EXPR_NAME, NFTA_EXPR_DATA = 4, 1, 2
NFTA_SET_TABLE, NFTA_SET_NAME, NFTA_SET_FLAGS, NFTA_SET_KEY_TYPE, NFTA_SET_KEY_LEN = 1, 2, 3, 4, 5
NFTA_SET_DESC, NFTA_SET_ID, NFTA_SET_USERDATA, NFTA_SET_DESC_SIZE = 9, 10, 13, 1
NFTA_IMMEDIATE_DREG, NFTA_IMMEDIATE_DATA = 1, 2
NFT_SET_ANONYMOUS, NFT_SET_CONSTANT = 0x1, 0x2
NFT_REG_VERDICT, NFT_REG_1 = 0, 1
NFT_PAYLOAD_LL_HEADER, NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER = 0, 1, 2
NFT_META_PROTOCOL, NFT_META_L4PROTO = 1, 16
NFT_CMP_EQ, NFT_CMP_NEQ = 0, 1
NFT_LOOKUP_F_INV = 0x1
NLM_F_APPEND = 0x800  # linux/netlink.h: a new rule goes last
VERDICTS = {"drop": 0, "return": -5}
ANONYMOUS = "__set%d"  # the kernel numbers it

ETHER_TYPES = {"ip": 0x0800, "arp": 0x0806, "ip6": 0x86DD}
ICMPV6_TYPES = {"mld-listener-report": 131, "nd-router-advert": 134, "nd-neighbor-solicit": 135,
                "nd-neighbor-advert": 136, "nd-redirect": 137, "mld2-listener-report": 143}
IPPROTO_ICMPV6 = 58


def _expr(name: str, *attrs: bytes) -> bytes:
    return rtnl.nested(NFTA_LIST_ELEM, nfbatch.name(NFTA_EXPR_NAME, name),
                       rtnl.nested(NFTA_EXPR_DATA, *attrs))


def payload(base: int, offset: int, length: int) -> bytes:
    return _expr("payload", u32(1, NFT_REG_1), u32(2, base), u32(3, offset), u32(4, length))


def meta(key: int) -> bytes:
    return _expr("meta", u32(2, key), u32(1, NFT_REG_1))


def cmp(op: int, value: bytes) -> bytes:
    return _expr("cmp", u32(1, NFT_REG_1), u32(2, op), data(3, value))


def bitwise(mask: bytes, xor: bytes) -> bytes:
    """reg 1 = (reg 1 & mask) ^ xor (NFT_BITWISE_BOOL)."""
    return _expr("bitwise", u32(1, NFT_REG_1), u32(2, NFT_REG_1), u32(6, 0), u32(3, len(mask)),
                 data(4, mask), data(5, xor))


def lookup(set_id: int, inverted: bool) -> bytes:
    flags = [u32(5, NFT_LOOKUP_F_INV)] if inverted else []
    return _expr("lookup", u32(2, NFT_REG_1), nfbatch.name(1, ANONYMOUS), u32(4, set_id), *flags)


def verdict(code: int) -> bytes:
    """An immediate verdict (linux/netfilter.h NF_DROP, nf_tables.h NFT_RETURN ...)."""
    return _expr("immediate", u32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT),
                 nfbatch.verdict_data(NFTA_IMMEDIATE_DATA, code))


@dataclass(frozen=True)
class Key:
    """An anonymous set's key as nft types it: its datatype (nft's TYPE_*), length, and the
    payload it came from (nft's proto_* description and field index, in the set's user data)."""

    datatype: int
    length: int
    proto: int
    field: int

    def userdata(self) -> bytes:
        """libnftnl's TLVs (host order): key byte order big endian (2); typeof a payload
        (nft's EXPR_PAYLOAD, 7) of that description and field."""
        def tlv(kind: int, value: bytes) -> bytes:
            return bytes([kind, len(value)]) + value

        def host(value: int) -> bytes:
            return struct.pack("=I", value)
        payload_of = tlv(0, host(self.proto)) + tlv(1, host(self.field))
        return tlv(0, host(2)) + tlv(3, tlv(0, host(7)) + tlv(1, payload_of))


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _address(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


@dataclass(frozen=True)
class Selector:
    needs: tuple[tuple[str, bytes], ...]  # (protocol, the test nft puts before it), in order
    load: bytes  # the payload load (and mask) into reg 1
    encode: Callable[[str], bytes]  # a value's text -> the bytes compared
    key: Key | None = None  # None: never in a set


def _ether_type_is(name: str) -> tuple[str, bytes]:
    return name, payload(NFT_PAYLOAD_LL_HEADER, 12, 2) + cmp(NFT_CMP_EQ, ETHER_TYPES[name].to_bytes(2, "big"))


def _protocol_is(name: str) -> tuple[str, bytes]:
    return name, meta(NFT_META_PROTOCOL) + cmp(NFT_CMP_EQ, ETHER_TYPES[name].to_bytes(2, "big"))


_ICMPV6 = ("icmpv6", meta(NFT_META_L4PROTO) + cmp(NFT_CMP_EQ, bytes([IPPROTO_ICMPV6])))
SELECTORS = {
    "ether saddr": Selector((), payload(NFT_PAYLOAD_LL_HEADER, 6, 6), _mac),
    "ether type": Selector((), payload(NFT_PAYLOAD_LL_HEADER, 12, 2),
                           lambda name: ETHER_TYPES[name].to_bytes(2, "big"), Key(10, 2, 17, 3)),
    "arp saddr ether": Selector((_ether_type_is("arp"),), payload(NFT_PAYLOAD_NETWORK_HEADER, 8, 6), _mac),
    "arp saddr ip": Selector((_ether_type_is("arp"),), payload(NFT_PAYLOAD_NETWORK_HEADER, 14, 4),
                             _address, Key(7, 4, 15, 7)),
    "ip saddr": Selector((_protocol_is("ip"),), payload(NFT_PAYLOAD_NETWORK_HEADER, 12, 4),
                         _address, Key(7, 4, 12, 11)),
    "ip6 saddr": Selector((_protocol_is("ip6"),), payload(NFT_PAYLOAD_NETWORK_HEADER, 8, 16),
                          _address, Key(8, 16, 13, 8)),
    "icmpv6 type": Selector((_ether_type_is("ip6"), _ICMPV6), payload(NFT_PAYLOAD_TRANSPORT_HEADER, 0, 1),
                            lambda name: bytes([ICMPV6_TYPES[name]]), Key(29, 1, 14, 1)),
    # a raw bit: the R flag of a neighbour advertisement, the top bit of its fifth byte
    "@th,32,1": Selector((), payload(NFT_PAYLOAD_TRANSPORT_HEADER, 4, 1) + bitwise(b"\x80", b"\0"),
                         lambda bit: bytes([int(bit) << 7])),
}


@dataclass(frozen=True)
class Test:
    """`selector [!=] value` or, with `braces`, `selector [!=] { values }`."""

    selector: str
    values: tuple[str, ...]
    negated: bool = False
    braces: bool = False

    def __str__(self) -> str:
        listed = f"{{ {', '.join(self.values)} }}" if self.braces else " ".join(self.values)
        return f"{self.selector} {'!= ' if self.negated else ''}{listed}"


@dataclass(frozen=True)
class Rule:
    tests: tuple[Test, ...]
    verdict: str

    def __str__(self) -> str:
        return " ".join([*map(str, self.tests), self.verdict])


def _anonymous_set(family: str, table: str, set_id: int, key: Key, values: Sequence[bytes]) -> list[Message]:
    return [
        nfbatch.message(NFT_MSG_NEWSET, rtnl.NLM_F_CREATE | rtnl.NLM_F_ACK, family,
                        nfbatch.name(NFTA_SET_TABLE, table), nfbatch.name(NFTA_SET_NAME, ANONYMOUS),
                        u32(NFTA_SET_FLAGS, NFT_SET_ANONYMOUS | NFT_SET_CONSTANT),
                        u32(NFTA_SET_KEY_TYPE, key.datatype), u32(NFTA_SET_KEY_LEN, key.length),
                        u32(NFTA_SET_ID, set_id),
                        rtnl.nested(NFTA_SET_DESC, u32(NFTA_SET_DESC_SIZE, len(values))),
                        rtnl.attr(NFTA_SET_USERDATA, key.userdata())),
        nfbatch.set_elements(family, table, ANONYMOUS, [nfbatch.element(value) for value in values],
                             set_id=set_id),
    ]


def rule_messages(family: str, table: str, chain: str, rules: Sequence[Rule]) -> list[Message]:
    """NFT_MSG_NEWRULEs appending `rules` to `chain`, each after the anonymous sets it looks up
    (numbered from 1: a set id names a set within its batch)."""
    messages: list[Message] = []
    sets = 0
    for rule in rules:
        exprs: list[bytes] = []
        established: set[str] = set()
        for test in rule.tests:
            selector = SELECTORS[test.selector]
            for protocol, needed in selector.needs:
                if protocol not in established:
                    exprs.append(needed)
                    established.add(protocol)
            exprs.append(selector.load)
            values = [selector.encode(value) for value in test.values]
            if len(values) == 1:
                exprs.append(cmp(NFT_CMP_NEQ if test.negated else NFT_CMP_EQ, values[0]))
                continue
            if selector.key is None or not values:
                raise ValueError(f"no set of {test.selector}")
            sets += 1
            messages += _anonymous_set(family, table, sets, selector.key, values)
            exprs.append(lookup(sets, test.negated))
        exprs.append(verdict(VERDICTS[rule.verdict]))
        messages.append(nfbatch.message(
            NFT_MSG_NEWRULE, rtnl.NLM_F_CREATE | NLM_F_APPEND | rtnl.NLM_F_ACK, family,
            nfbatch.name(NFTA_RULE_TABLE, table), nfbatch.name(NFTA_RULE_CHAIN, chain),
            rtnl.nested(NFTA_RULE_EXPRESSIONS, *exprs)))
    return messages
