"""nfnl.py's batch bytes against what linux/netfilter/nf_tables.h and nfnetlink.h say (the numbers
are written out here from the headers' enums, not taken from the module), and the policy loop's
use of it: element-only changes go there, the rest and a refused batch to nft."""

from __future__ import annotations

import errno
import struct
from typing import Any

import pytest

from cni_plugin import nfbatch, rtnl
from cni_plugin.netlink import NetlinkError
from cni_plugin.node.netpol import delta, nfnl

from .test_delta import DENY_X, _agent

# nfnetlink.h: NFNL_SUBSYS_NFTABLES 10, NFNL_MSG_BATCH_BEGIN NLMSG_MIN_TYPE (0x10), END 0x11.
# nf_tables.h: enum nf_tables_msg_types NEWSETELEM 12, DELSETELEM 14; nft_set_elem_list_attributes
# TABLE 1, SET 2, ELEMENTS 3; nft_list_attributes ELEM 1; nft_set_elem_attributes KEY 1, DATA 2,
# FLAGS 3, USERDATA 6, KEY_END 10 (after TIMEOUT, EXPIRATION, USERDATA, EXPR, PAD, OBJREF);
# nft_data_attributes VALUE 1, VERDICT 2; nft_verdict_attributes CODE 1, CHAIN 2; NFT_JUMP -3;
# NFT_SET_ELEM_INTERVAL_END 1. netlink.h: NLM_F_ACK 4, NLM_F_CREATE 0x400; NLA_F_NESTED 0x8000.
NEST = 0x8000
BEGIN = (0x10, 0, bytes([0, 0, 0, 10]))  # AF_UNSPEC, NFNETLINK_V0, res_id htons(10)
END = (0x11, 0, bytes([0, 0, 0, 10]))
NEW, DEL = (10 << 8) | 12, (10 << 8) | 14


def nla(kind: int, data: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(data), kind) + data
    return raw + bytes(-len(raw) % 4)


def value(kind: int, raw: bytes) -> bytes:
    return nla(kind | NEST, nla(1, raw))


def elem(*attrs: bytes) -> bytes:
    return nla(1 | NEST, b"".join(attrs))


def message(family: int, table: str, name: str, *elements: bytes) -> bytes:
    return (bytes([family, 0, 0, 0]) + nla(1, table.encode() + b"\0") + nla(2, name.encode() + b"\0")
            + nla(3 | NEST, b"".join(elements)))


def model(sets: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]], family: str = "inet") -> delta.Model:
    return {(family, "t"): {n: delta.Block(kind, header, body) for n, (kind, header, body) in sets.items()}}


VMAP = model({"ingress4": ("map", ("type ipv4_addr : verdict",), ("10.0.0.9 : jump c",))})
INTERVAL4 = ("type ipv4_addr", "flags interval")


def test_a_verdict_map_element_added_and_deleted() -> None:
    jump = nla(2 | NEST, nla(2 | NEST, nla(1, struct.pack(">i", -3)) + nla(2, b"ingress_be5dc0e373\0")))
    added = elem(value(1, bytes([10, 244, 2, 2])), jump)
    assert nfnl.encode("add element inet t ingress4 { 10.244.2.2 : jump ingress_be5dc0e373 }", VMAP) == [
        BEGIN, (NEW, 0x400 | 4, message(1, "t", "ingress4", added)), END]
    assert nfnl.encode("delete element inet t ingress4 { 10.0.0.9 }", VMAP) == [
        BEGIN, (DEL, 4, message(1, "t", "ingress4", elem(value(1, bytes([10, 0, 0, 9]))))), END]


def test_an_interval_is_a_start_and_a_flagged_end_past_it() -> None:
    end = nla(3, struct.pack(">I", 1))
    held = model({"p": ("set", INTERVAL4, ("10.0.0.0/8",))})
    assert nfnl.encode("add element inet t p { 10.244.2.0/31, 192.168.1.1/32 }", held) == [
        BEGIN, (NEW, 0x404, message(1, "t", "p",
                                    elem(value(1, bytes([10, 244, 2, 0]))),
                                    elem(value(1, bytes([10, 244, 2, 2])), end),
                                    elem(value(1, bytes([192, 168, 1, 1]))),
                                    elem(value(1, bytes([192, 168, 1, 2])), end))),
        END]
    # into an empty set, as nft: an interval end at zero first (unless the lowest start is zero)
    empty = model({"p": ("set", INTERVAL4, ())})
    first = nfnl.encode("add element inet t p { 10.244.2.2/32 }", empty)
    assert first is not None and first[1][2] == message(
        1, "t", "p", elem(value(1, bytes(4)), end), elem(value(1, bytes([10, 244, 2, 2]))),
        elem(value(1, bytes([10, 244, 2, 3])), end))
    zero = nfnl.encode("add element inet t p { 0.0.0.0/8 }", empty)
    assert zero is not None and zero[1][2] == message(
        1, "t", "p", elem(value(1, bytes(4))), elem(value(1, bytes([1, 0, 0, 0])), end))
    # deleting it is the same two elements, and no zero end
    gone = nfnl.encode("delete element inet t p { 10.0.0.0/8 }", held)
    assert gone is not None and gone[1] == (DEL, 4, message(
        1, "t", "p", elem(value(1, bytes([10, 0, 0, 0]))), elem(value(1, bytes([11, 0, 0, 0])), end)))


def test_an_interval_to_the_end_of_the_address_space_is_a_start_marked_open() -> None:
    # libnftnl udata: NFTNL_UDATA_SET_ELEM_FLAGS (1), length 4, NFTNL_SET_ELEM_F_INTERVAL_OPEN (1),
    # in host order
    opened = nla(6, bytes([1, 4]) + struct.pack("=I", 1))
    held = model({"p": ("set", ("type ipv6_addr", "flags interval"), ("fd00::/8",))})
    top = nfnl.encode("add element inet t p { ffff::/16 }", held)
    assert top is not None
    assert top[1][2] == message(1, "t", "p", elem(value(1, b"\xff\xff" + bytes(14)), opened))


def test_concatenations_pad_each_field_to_32_bits_and_ranges_take_key_end() -> None:
    ports = model({"r": ("set", ("type inet_proto . inet_service", "flags interval"), ())})
    got = nfnl.encode("add element inet t r { tcp . 80-90 }", ports)
    assert got is not None and got[1][2] == message(1, "t", "r", elem(
        value(1, bytes([6, 0, 0, 0, 0, 80, 0, 0])), value(10, bytes([6, 0, 0, 0, 0, 90, 0, 0]))))
    named = model({"n": ("set", ("type ipv4_addr . inet_proto . inet_service",), ())})
    got = nfnl.encode("add element inet t n { 10.0.0.1 . udp . 53 }", named)
    assert got is not None and got[1][2] == message(1, "t", "n", elem(
        value(1, bytes([10, 0, 0, 1, 17, 0, 0, 0, 0, 53, 0, 0]))))
    own = model({"own4": ("set", ("type ifname . ipv4_addr",), ())}, "bridge")
    got = nfnl.encode('add element bridge t own4 { "veth1" . 10.0.0.1 }', own)
    assert got is not None and got[1][2] == message(7, "t", "own4", elem(  # NFPROTO_BRIDGE
        value(1, b"veth1" + bytes(11) + bytes([10, 0, 0, 1]))))


def test_anything_else_is_left_to_nft() -> None:
    held = model({"p": ("set", INTERVAL4, ()), "placed4": ("set", ("type ipv4_addr",), ()),
                  "names": ("set", ("type ifname", "flags interval"), ()),
                  "m": ("map", ("type ifname : verdict",), ()), "c": ("chain", (), ())})
    for change in ("add element inet t p { 10.0.0.1-10.0.0.7 }", "add element inet t p { 10.0.0.1/8 }",
                   "add element inet t placed4 { 10.0.0.0/31 }", "add element inet t placed4 { fd00::1 }",
                   "add element inet t m { veth1 : jump c }",
                   "add element inet t placed4 { fe80::1%eth0 }",
                   'add element inet t names { "veth1" }',  # an interval of names
                   'add element inet t m { "veth1" : accept }',
                   'add element inet t m { "veth1" }', "add element inet t c { 10.0.0.1 }",
                   "add element inet t absent { 10.0.0.1 }", "add element inet u p { 10.0.0.1 }",
                   "flush chain inet t c", "add element inet t placed4 { 10.0.0.1 }\nflush chain inet t c",
                   ""):
        assert nfnl.encode(change, held) is None, change
    big = ", ".join(f"10.{i // 250}.{i % 250}.1" for i in range(20_000))
    assert nfnl.encode(f"add element inet t placed4 {{ {big} }}", held) is None  # past one datagram


class _Deaf:
    """A netlink socket whose requests never reach the kernel: only the timeout ends the wait."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock

    def send(self, data: bytes) -> int:
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def test_the_wait_for_the_kernels_answer_is_bounded() -> None:
    sock = rtnl.Socket(rtnl.NETLINK_NETFILTER, timeout=0.1)
    try:
        sock._sock = _Deaf(sock._sock)  # type: ignore[assignment]
        with pytest.raises(TimeoutError):
            sock.batch([BEGIN, (NEW, 0x404, b""), END])
    finally:
        sock.close()


def test_element_changes_go_to_the_batch_the_rest_and_refusals_to_nft() -> None:
    scripts: list[str] = []
    batches: list[str] = []
    logs: list[tuple[str, dict[str, Any]]] = []
    agent = _agent(scripts, set())
    agent.log = lambda event, **fields: logs.append((event, fields))

    def elements(change: str, held: delta.Model) -> bool:
        assert held is agent.model  # the tables in force
        if nfnl.encode(change, held) is None:
            return False
        batches.append(change)
        if "refuse" in batches:
            raise NetlinkError(errno.ENOENT, "No such file or directory")
        return True

    agent.apply_elements = elements
    assert agent.reconcile() and len(scripts) == 1 and not batches  # the first apply: whole, by nft
    agent.handle("NetworkPolicy", "ADDED", DENY_X)
    assert agent.reconcile() and len(scripts) == 2 and "add chain" in scripts[-1]  # chains: nft
    pod = next(p for p in agent.objects["Pod"].values() if p.metadata.namespace == "x")
    relabelled = {**pod.model_dump(by_alias=True, mode="json")}
    relabelled["metadata"] = {**relabelled["metadata"], "labels": {"moved": "yes"}}
    agent.handle("Pod", "DELETED", relabelled)
    assert agent.reconcile() and len(scripts) == 2 and batches and " element " in batches[-1]
    assert all(line.startswith(("add element", "delete element")) for line in batches[-1].splitlines())
    batches.append("refuse")
    agent.handle("Pod", "ADDED", relabelled)
    assert agent.reconcile() and len(scripts) == 3 and scripts[-1] == batches[-1]  # nft took it
    assert [e for e, _ in logs].count("netpol-warning") == 1 and "element batch refused" in str(logs)

    def broken(change: str, held: delta.Model) -> bool:
        raise struct.error("a bug")

    agent.apply_elements = broken
    agent.handle("Pod", "DELETED", relabelled)
    assert agent.reconcile() and len(scripts) == 4 and "element" in scripts[-1]  # nft took it too
    assert logs[-2][0] == "netpol-error" and "a bug" in logs[-2][1]["error"]


def test_batches_go_on_the_threads_kept_socket_unless_one_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing an nfnetlink socket stalls the node's next veth creations (nfbatch._socket), so
    the node controller's batches go on nfbatch's kept socket, as the agent's do."""
    committed: list[list[Any]] = []
    monkeypatch.setattr(nfbatch, "commit", committed.append)
    change = "add element inet t ingress4 { 10.244.2.2 : jump ingress_be5dc0e373 }"
    assert nfnl.apply(change, VMAP)
    assert committed == [nfnl.encode(change, VMAP)]
    given: list[object] = []

    class Given:
        def __enter__(self) -> Given:
            return self

        def __exit__(self, *exc: object) -> None:
            given.append("closed")

        def batch(self, messages: list[Any]) -> None:
            given.append(messages)

    assert nfnl.apply(change, VMAP, lambda: Given())  # type: ignore[arg-type, return-value]
    assert given == [nfnl.encode(change, VMAP), "closed"] and len(committed) == 1
