"""Element changes as one raw nfnetlink batch (cni_plugin/node/netpol/nfnl.py) against nft: the
same sequence of changes applied raw in one throw-away netns and by `nft -f` in another leaves
the same `nft list table` after every step; a batch with one bad element changes nothing."""

from __future__ import annotations

import errno
import itertools
import os
import subprocess
from collections.abc import Iterator

import pytest

from cni_plugin.netlink import NetlinkError
from cni_plugin.node.netpol import delta, nfnl
from testbed.harness import delete_netns, new_netns

from .netpol_probe import in_netns

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

# name: (kind, header), in each family's table `t`
SETS: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    "inet": {"s4": ("set", ("type ipv4_addr", "flags interval")),
             "s6": ("set", ("type ipv6_addr", "flags interval")),
             "placed4": ("set", ("type ipv4_addr",)),
             "placed6": ("set", ("type ipv6_addr",)),
             "m4": ("map", ("type ipv4_addr : verdict",)),
             "m6": ("map", ("type ipv6_addr : verdict",)),
             "n4": ("set", ("type ipv4_addr . inet_proto . inet_service",)),
             "n6": ("set", ("type ipv6_addr . inet_proto . inet_service",)),
             "pp": ("set", ("type inet_proto . inet_service", "flags interval"))},
    "bridge": {"mp": ("map", ("type ifname : verdict",)),
               "o4": ("set", ("type ifname . ipv4_addr",)),
               "o6": ("set", ("type ifname . ipv6_addr",))},
}
EMPTY: dict[str, list[str]] = {}
STATES: list[dict[str, list[str]]] = [
    EMPTY,
    {"s4": ["10.0.1.0/24", "10.0.2.0/24", "10.0.5.5/32", "255.255.255.0/24"],  # adjacent; the top
     "s6": ["fd00::1/128", "fd00::2/127", "ffff::/16"],
     "placed4": ["10.0.0.1", "10.0.0.2"], "placed6": ["fd00::1"],
     "m4": ["10.0.0.1 : jump c", "10.0.0.2 : jump d"], "m6": ["fd00::1 : jump c"],
     "n4": ["10.0.0.1 . tcp . 8080"], "n6": ["fd00::1 . udp . 53"],
     "pp": ["tcp . 80-90", "udp . 53", "sctp . 1-65535"],
     "mp": ['"veth1" : jump c', '"p-1.x_y" : jump d'], "o4": ['"veth1" . 10.0.0.1'],
     "o6": ['"veth1" . fd00::1']},
    {"s4": ["0.0.0.0/8", "10.0.1.0/24", "10.0.3.0/24", "10.0.5.4/31", "255.255.255.0/24"],  # from zero
     "s6": ["::/0"],  # the whole space: from zero, open
     "placed4": ["10.0.0.2"], "placed6": ["fd00::1", "fd00::9"],
     "m4": ["10.0.0.1 : jump d", "10.0.0.2 : jump d"], "m6": ["fd00::9 : jump d"],  # a verdict changed
     "n4": ["10.0.0.1 . tcp . 8080", "10.0.0.2 . tcp . 8080"], "n6": [],
     "pp": ["tcp . 80-91", "udp . 53", "sctp . 1-65535"],
     "mp": ['"veth2" : jump c', '"veth3" : jump c'], "o4": ['"veth2" . 10.0.0.2'], "o6": []},
    EMPTY,
    {"s4": ["0.0.0.0/0"], "s6": ["::/1", "8000::/1"],  # adjacent halves of the whole space
     "placed4": ["10.0.0.3"], "m4": ["10.0.0.3 : jump c"], "pp": ["tcp . 443"], "mp": ['"veth1" : jump d']},
    {"s4": ["10.0.0.0/31", "10.0.0.2/31", "192.168.0.0/16"], "s6": ["::/1"], "placed4": ["10.0.0.3"],
     "m4": ["10.0.0.3 : jump c"], "pp": ["tcp . 443", "udp . 443"], "mp": ['"veth1" : jump d']},
]


def script(state: dict[str, list[str]]) -> str:
    """Both tables as nft.ruleset() writes its own: one header line each, elements on one line."""
    lines = []
    for family, sets in SETS.items():
        lines.append(f"table {family} t {{")
        for name, (kind, header) in sets.items():
            lines += [f"\t{kind} {name} {{", *(f"\t\t{h}" for h in header)]
            if state.get(name):
                lines.append(f"\t\telements = {{ {', '.join(state[name])} }}")
            lines.append("\t}")
        lines += ["\tchain c {", "\t}", "\tchain d {", "\t}", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    raw, by_nft = new_netns("nfnlraw"), new_netns("nfnlnft")
    try:
        for netns in (raw, by_nft):
            _nft(netns, script(EMPTY))
        yield raw, by_nft
    finally:
        delete_netns(raw)
        delete_netns(by_nft)


def _nft(netns: str, text: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=text, text=True, check=True,
                   capture_output=True, timeout=30)


def _listing(netns: str) -> str:
    return "".join(subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "table", family, "t"],
                                  capture_output=True, text=True, check=True, timeout=30).stdout
                   for family in SETS)


def _kernel(netns: str) -> dict[str, list[str]]:
    """Each set's elements as the kernel holds them (nft's netlink debug view: key, flags, interval
    ends, user data), sorted: a hash set's order differs between two sets."""
    held: dict[str, list[str]] = {}
    for family in SETS:
        argv = ["ip", "netns", "exec", netns, "nft", "--debug=netlink", "list", "table", family, "t"]
        out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout
        name = ""
        for line in out.splitlines():
            if line.startswith(f"{family} t @"):
                name = line
                held[name] = []
            elif line.startswith("\telement ") and name:
                held[name].append(line.strip())
            elif not line.startswith("\t"):
                name = ""
    return {name: sorted(elements) for name, elements in held.items()}


def _raw(netns: str, change: str, model: delta.Model) -> bool:
    return in_netns(netns, lambda: nfnl.apply(change, model))


def test_element_changes_sent_raw_leave_what_nft_leaves(pair: tuple[str, str]) -> None:
    raw, by_nft = pair
    for before, after in itertools.pairwise(STATES):
        model = delta.parse(script(before))
        change = delta.diff(model, delta.parse(script(after)))
        assert change
        assert _raw(raw, change, model), change  # all of it encoded, none left to nft
        _nft(by_nft, change)
        listed = _listing(by_nft)
        assert _listing(raw) == listed, change
        assert _kernel(raw) == _kernel(by_nft), change
        for elements in after.values():  # and nft applied what the state says
            for element in elements:
                assert element.split(" ")[0].removesuffix("/32").removesuffix("/128").strip('"') in listed


def test_a_batch_with_one_bad_element_changes_nothing(pair: tuple[str, str]) -> None:
    raw, _ = pair
    state = {"s4": ["10.0.1.0/24"], "placed4": ["10.0.0.1"], "m4": ["10.0.0.1 : jump c"]}
    model = delta.parse(script(state))
    _nft(raw, delta.diff(delta.parse(script(EMPTY)), model) or "")
    before = _listing(raw)
    change = ("delete element inet t m4 { 10.0.0.1 }\n"
              "add element inet t s4 { 10.0.7.0/24 }\n"
              "add element inet t m4 { 10.0.0.1 : jump d }\n"
              "delete element inet t placed4 { 10.0.0.9 }\n")  # not there
    with pytest.raises(NetlinkError) as refused:
        _raw(raw, change, model)
    assert refused.value.errno == errno.ENOENT
    assert _listing(raw) == before
    assert _raw(raw, change.replace("10.0.0.9", "10.0.0.1"), model)  # the same, good, goes in
    assert _listing(raw) != before


def test_what_nfnl_cannot_encode_is_left_to_nft() -> None:
    model = delta.parse(script({"s4": ["10.0.1.0/24"]}))
    for change in ("add element inet t s4 { 10.0.1.0-10.0.1.7 }\n",  # a range nft.py does not write
                   "add element inet t nothere { 10.0.0.1 }\n",
                   "add element inet t m4 { 10.0.0.1 : accept }\n",
                   "add element inet t m4 { 10.0.0.1 : goto c }\n",
                   "add element inet t placed4 { 10.0.0.0/31 }\n",
                   "add element inet t placed4 { fd00::1 }\n",
                   "add element inet t mp { veth1 : jump c }\n",
                   "flush chain inet t c\n",
                   "add element inet t s4 { 10.0.2.0/24 }\nflush chain inet t c\n"):
        assert nfnl.encode(change, model) is None, change

