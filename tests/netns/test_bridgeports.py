"""The node controller's bridge ports, kept from the kernel's notifications (bridgeports.Watch),
against what each test made: pods come and go, addresses change in the pods' netns, ports
change bridge, and a lost notification or a flood means one read of the whole."""

from __future__ import annotations

import ipaddress
import subprocess
import time
from collections.abc import Collection, Iterator

import pytest

from cni_plugin import rtnl
from cni_plugin.node.netpol import bridgeports
from cni_plugin.node.netpol.objects import Address
from testbed.harness import delete_netns, new_netns

from .netpol_probe import in_netns, port_watch

pytestmark = pytest.mark.netns


class Node:
    """A throw-away "host" netns with bridges, and pod netns each with a veth on one of them."""

    def __init__(self) -> None:
        self.host = new_netns("bports")
        self.pods: dict[str, str] = {}  # port name -> pod netns
        self.made: dict[str, set[str]] = {}  # port name -> the addresses put on its pod end
        self.ip("link", "add", "br0", "type", "bridge")
        self.ip("link", "add", "br1", "type", "bridge")

    def ip(self, *args: str, netns: str | None = None) -> None:
        subprocess.run(["ip", "-n", netns or self.host, *args], check=True, capture_output=True)

    def batch(self, port: str, lines: list[str]) -> None:
        """`ip -batch` in the pod netns of `port`."""
        subprocess.run(["ip", "-n", self.pods[port], "-batch", "-"], input="".join(f"{x}\n" for x in lines),
                       check=True, text=True, capture_output=True)

    def add_pod(self, port: str, *addresses: str, bridge: str = "br0") -> None:
        pod = new_netns("bpod")
        self.pods[port] = pod
        self.made[port] = set()
        self.ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", pod)
        self.ip("link", "set", port, "master", bridge, "up")
        for address in addresses:
            self.add_address(port, address)

    def add_address(self, port: str, address: str) -> None:
        nodad = ["nodad"] if ":" in address else []
        self.ip("addr", "add", address, "dev", "eth0", *nodad, netns=self.pods[port])
        self.made[port].add(address)

    def delete_address(self, port: str, address: str) -> None:
        self.ip("addr", "del", address, "dev", "eth0", netns=self.pods[port])
        self.made[port].discard(address)

    def expected(self, *ports: str) -> dict[Address, frozenset[str]]:
        out: dict[Address, set[str]] = {}
        for port in ports or self.made:
            for address in self.made[port]:
                out.setdefault(ipaddress.ip_interface(address).ip, set()).add(port)
        return {a: frozenset(p) for a, p in out.items()}

    def destroy(self) -> None:
        for pod in self.pods.values():
            delete_netns(pod)
        delete_netns(self.host)


@pytest.fixture
def node() -> Iterator[Node]:
    made = Node()
    try:
        yield made
    finally:
        made.destroy()


def _until(watch: bridgeports.Watch, wanted: dict[Address, frozenset[str]]) -> dict[Address, Collection[str]]:
    """The watch's map once it is `wanted`, or at the deadline (a netns goes away in the background)."""
    deadline = time.monotonic() + 10
    while (found := dict(watch.pods())) != wanted and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def test_the_watch_follows_pods_addresses_and_bridges_from_one_read(node: Node) -> None:
    node.add_pod("va", "10.1.0.2/24", "fd01::2/64")
    with port_watch(node.host) as watch:
        first = watch.pods()
        assert first == node.expected()
        assert watch.pods() is first  # nothing changed: nothing read, the same map
        node.add_pod("vb", "10.1.0.3/24")
        node.add_pod("vc", "10.1.1.3/24", bridge="br1")
        assert watch.pods() == node.expected()
        node.add_address("va", "10.1.0.9/24")  # in the pod's netns, as a pod with CAP_NET_ADMIN can
        node.delete_address("va", "fd01::2/64")
        assert watch.pods() == node.expected()
        assert watch.on_bridge("br0") == set(node.expected("va", "vb"))
        assert watch.on_bridge("br1") == set(node.expected("vc"))
        assert watch.on_bridge("nosuch") == set()
        node.ip("link", "set", "vb", "nomaster")  # off the bridge: not a port any more
        node.made["vb"].clear()
        assert watch.pods() == node.expected()
        node.ip("link", "set", "vc", "master", "br0")
        assert watch.on_bridge("br0") == set(node.expected("va", "vc"))
        delete_netns(node.pods["va"])  # its veth goes with it, in the background
        node.made["va"].clear()
        assert _until(watch, node.expected()) == node.expected()
        assert watch.full_reads == 1


def test_a_watch_of_sockets_with_a_timeout_never_waits_for_notifications(node: Node) -> None:
    """The node controller's sockets wait at most bridgeports.TIMEOUT for an answer; the
    subscription must not wait at all when nothing is queued (a refresh raised TimeoutError
    after 5 s when it did)."""
    node.add_pod("va", "10.1.0.2/24")
    def timed() -> rtnl.Socket:
        return rtnl.Socket(timeout=bridgeports.TIMEOUT)

    with bridgeports.Watch(lambda: in_netns(node.host, timed)) as watch:
        assert watch.pods() == node.expected()
        assert watch.pods() == node.expected()  # nothing queued
        node.add_address("va", "10.1.0.9/24")
        assert watch.pods() == node.expected()
        assert watch.full_reads == 1


def test_more_notifications_than_a_refresh_takes_are_a_read_of_the_whole(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    node.add_pod("va", "10.1.0.2/24")
    monkeypatch.setattr(bridgeports, "DRAIN_LIMIT", 1)
    with port_watch(node.host) as watch:
        assert watch.pods() == node.expected()
        node.add_pod("vb", "10.1.0.3/24", "10.1.0.4/24")  # several datagrams
        assert watch.pods() == node.expected()
        assert watch.full_reads == 2  # the first, and the one the limit made


def test_notifications_the_kernel_dropped_are_a_read_of_the_whole(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    node.add_pod("va", "10.1.0.2/24")
    monkeypatch.setattr(bridgeports, "BUFFER", 1)  # the kernel's least: a few notifications
    with port_watch(node.host) as watch:
        assert watch.pods() == node.expected()
        many = [f"10.2.{i // 250}.{i % 250 + 1}/32" for i in range(300)]
        node.batch("va", [f"addr add {a} dev eth0" for a in many])
        node.made["va"].update(many)
        node.batch("va", [f"addr del {a} dev eth0" for a in many[:150]])
        node.made["va"].difference_update(many[:150])
        assert watch.pods() == node.expected()
        assert watch.full_reads == 2  # the first, and the one ENOBUFS made
