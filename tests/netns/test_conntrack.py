"""conntrack.forget on the kernel's table: the entries of the addresses asked go, the others stay,
whether the netns's table is dumped whole (few entries) or filtered by the kernel (many)."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
from collections.abc import Iterator

import pytest

from cni_plugin.node.netpol import conntrack
from testbed.harness import delete_netns, new_netns

from .netpol_probe import in_netns

pytestmark = pytest.mark.netns
A, B = "10.9.9.1", "10.9.9.2"
TRACKED = "table inet pbt_ct {\n\tchain c {\n\t\ttype filter hook input priority 0;\n" \
          "\t\tct state new accept\n\t}\n}\n"  # a ct expression: conntrack on in the netns


@pytest.fixture
def netns() -> Iterator[str]:
    name = new_netns("ct")
    try:
        for args in (["link", "set", "lo", "up"], ["addr", "add", f"{A}/32", "dev", "lo"],
                     ["addr", "add", f"{B}/32", "dev", "lo"]):
            subprocess.run(["ip", "-n", name, *args], check=True)
        subprocess.run(["ip", "netns", "exec", name, "nft", "-f", "-"], input=TRACKED, text=True, check=True)
        yield name
    finally:
        delete_netns(name)


def _talk(netns: str, source: str, port: int) -> None:
    """A UDP datagram from `source` to itself: one conntrack entry with it at both ends."""
    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as into:
            into.bind((source, port))
            out.bind((source, 0))
            out.sendto(b"x", (source, port))
            into.recv(10)
    in_netns(netns, send)


@pytest.mark.parametrize("whole", [True, False], ids=["dumped-whole", "filtered-by-the-kernel"])
def test_the_entries_of_the_addresses_asked_go_and_the_others_stay(
        netns: str, whole: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conntrack, "WHOLE", conntrack.WHOLE if whole else -1)
    _talk(netns, A, 5001)
    _talk(netns, A, 5002)
    _talk(netns, B, 5003)

    def forget(address: str) -> int:
        return in_netns(netns, lambda: conntrack.forget([ipaddress.ip_address(address)]))

    assert forget(A) == 2
    assert forget(A) == 0  # gone
    assert forget(B) == 1  # left by the first
