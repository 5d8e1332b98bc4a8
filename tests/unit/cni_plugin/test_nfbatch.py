"""nfbatch.py's shared nf_tables attributes against linux/netfilter/nf_tables.h and nfnetlink.h
(the numbers written out here from the headers' enums, not taken from the module): the source
check's forms, which only netns tests (the kernel taking them) checked before; the netpol forms
are tests/unit/netpol/test_nfnl.py's.

nfnetlink.h: NFNL_SUBSYS_NFTABLES 10. nf_tables.h: NFT_MSG_NEWSETELEM 12, DELSETELEM 14;
nft_set_elem_list_attributes TABLE 1, SET 2, ELEMENTS 3, SET_ID 4; nft_list_attributes ELEM 1;
nft_set_elem_attributes KEY 1, DATA 2; nft_data_attributes VALUE 1, VERDICT 2;
nft_verdict_attributes CODE 1, CHAIN 2; NFT_GOTO -4, NFT_RETURN -5. netlink.h: NLM_F_ACK 4,
NLM_F_CREATE 0x400; NLA_F_NESTED 0x8000. NFPROTO_BRIDGE 7; IFNAMSIZ 16.
"""

from __future__ import annotations

import struct

from cni_plugin import nfbatch

NEST = 0x8000
NEW, DEL = (10 << 8) | 12, (10 << 8) | 14
BRIDGE = bytes([7, 0, 0, 0])  # nfgenmsg: NFPROTO_BRIDGE, NFNETLINK_V0, res_id 0


def nla(kind: int, data: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(data), kind) + data
    return raw + bytes(-len(raw) % 4)


def test_a_port_element_with_its_goto_and_its_deletion() -> None:
    key = nla(1 | NEST, nla(1, b"veth1" + bytes(11)))
    goto = nla(2 | NEST, nla(2 | NEST, nla(1, struct.pack(">i", -4)) + nla(2, b"c1\0")))
    head = BRIDGE + nla(1, b"t\0") + nla(2, b"ports\0")
    added = nfbatch.element(nfbatch.ifname("veth1"), nfbatch.verdict_data(2, -4, "c1"))
    assert nfbatch.set_elements("bridge", "t", "ports", [added]) == (
        NEW, 0x404, head + nla(3 | NEST, nla(1 | NEST, key + goto)))
    deleted = nfbatch.element(nfbatch.ifname("veth1"))
    assert nfbatch.set_elements("bridge", "t", "ports", [deleted], delete=True) == (
        DEL, 4, head + nla(3 | NEST, nla(1 | NEST, key)))


def test_an_anonymous_sets_elements_name_it_by_id_and_a_verdict_may_name_no_chain() -> None:
    keys = [nla(1 | NEST, nla(1 | NEST, nla(1, value))) for value in (b"\x08\x00", b"\x86\xdd")]
    assert nfbatch.set_elements("bridge", "t", "__set%d", [nfbatch.element(b"\x08\x00"),
                                                           nfbatch.element(b"\x86\xdd")], set_id=3) == (
        NEW, 0x404, BRIDGE + nla(1, b"t\0") + nla(2, b"__set%d\0") + nla(4, struct.pack(">I", 3))
        + nla(3 | NEST, b"".join(keys)))
    assert nfbatch.verdict_data(2, -5) == nla(2 | NEST, nla(2 | NEST, nla(1, b"\xff\xff\xff\xfb")))
