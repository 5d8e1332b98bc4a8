"""An in-memory kernel behind the netlink seam (cni_plugin.netlink.Netlink), its netns, sysctls and
masquerade rules, so the bridge plugin's verbs run as unit tests without root.

Namespaces are named by their path; `netns.open_netns` hands out a real fd (on /dev/null) that
this kernel maps to one, and `netns.run_in` runs the function with that namespace as the calling
thread's. Every change (a netlink write, a sysctl `ensure`, a masquerade setup, an IPAM ADD) is
one numbered step: with `fail_at = n` the n-th step fails as the kernel would refuse it.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import pytest

from cni_plugin import ipam_client, link, masq, netns, sourcecheck, sysctl
from cni_plugin.netlink import Link, NetlinkError
from cnikit.ip import IPInterface

T = TypeVar("T")
HOST = "host"


@dataclass
class Namespace:
    links: dict[int, Link] = field(default_factory=dict)
    addrs: dict[int, list[IPInterface]] = field(default_factory=dict)
    # (destination, gateway, oif); the node agent's routes by protocol carry -proto as oif
    routes: list[tuple[str, str | None, int]] = field(default_factory=list)


def _mac() -> str:
    return ":".join(f"{b:02x}" for b in bytes([0x02]) + secrets.token_bytes(5))


class FakeKernel:
    def __init__(self) -> None:
        self.namespaces: dict[str, Namespace] = {HOST: Namespace()}
        self.fds: dict[int, str] = {}
        self.sysctls: dict[str, str] = {}
        self.written_while_up: list[str] = []
        self.masq: set[tuple[str, str, str]] = set()
        self.port_chains: dict[tuple[str, str, str], tuple[str, str]] = {}  # -> (port, pod MAC)
        self.hairpin: set[int] = set()
        self.steps: list[str] = []
        self.fail_at: int | None = None
        self._next_index = 100
        self._current = threading.local()

    # --- the namespaces ---------------------------------------------------------------

    def new_netns(self, path: str) -> str:
        self.namespaces[path] = Namespace()
        return path

    def current(self) -> str:
        return getattr(self._current, "ns", HOST)

    def open_netns(self, path: str) -> int:
        if path not in self.namespaces:
            raise netns.NetnsGone(path)
        fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        self.fds[fd] = path
        return fd

    def same_netns(self, fd: int) -> bool:
        return self.fds.get(fd) == self.current()

    def run_in(self, fd: int, func: Callable[[], T]) -> T:
        before = self.current()
        self._current.ns = self.fds[fd]
        try:
            return func()
        finally:
            self._current.ns = before

    def open_sysctl_dir(self, base: str) -> int:
        fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        self.fds[fd] = f"{self.current()}:{base}"
        return fd

    def write_sysctl(self, key: str, value: str, dir_fd: int | None = None) -> bool:
        """Kept as `netns:key`: below a directory, in the netns it was opened in. A link's own
        knobs written while it is up are also noted in `written_while_up`."""
        where = self.fds[dir_fd] if dir_fd is not None else f"{self.current()}:"
        self.sysctls[where + key] = value
        ns, _, path = (where + key).partition(":")
        parts = path.removeprefix("net/ipv6/conf/").split("/")
        if len(parts) == 2 and any(lk.name == parts[0] and lk.up for lk in self.links(ns)):
            self.written_while_up.append(where + key)
        return True

    def socket(self) -> FakeSocket:
        return FakeSocket(self, self.current())

    # --- steps and failures -----------------------------------------------------------

    def step(self, what: str) -> None:
        self.steps.append(what)
        if self.fail_at is not None and len(self.steps) == self.fail_at:
            raise NetlinkError(errno.EIO, f"injected failure at step {len(self.steps)}: {what}")

    def new_index(self) -> int:
        self._next_index += 1
        return self._next_index

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
        monkeypatch.setattr(link, "open_socket", self.socket)
        monkeypatch.setattr(link, "_pinned", {})  # what a process pinned belongs to its kernel
        monkeypatch.setattr(netns, "open_netns", self.open_netns)
        monkeypatch.setattr(netns, "same_netns", self.same_netns)
        monkeypatch.setattr(netns, "run_in", self.run_in)
        monkeypatch.setattr(sysctl, "try_write", self.write_sysctl)
        monkeypatch.setattr(sysctl, "write", self.write_sysctl)
        monkeypatch.setattr(sysctl, "open_dir", self.open_sysctl_dir)
        has_rules = lambda network, cid, ifname: (network, cid, ifname) in self.masq  # noqa: E731

        def ensure(key: str, value: str) -> None:
            self.step(f"sysctl {key}")
            self.sysctls[key] = value

        def masq_setup(network: str, cid: str, ifname: str, addrs: Any, backend: str | None = None) -> None:
            self.step("masquerade setup")
            self.masq.add((network, cid, ifname))

        monkeypatch.setattr(sysctl, "ensure", ensure)
        monkeypatch.setattr(masq, "setup", masq_setup)
        monkeypatch.setattr(masq, "teardown", lambda net, cid, ifname: self.masq.discard((net, cid, ifname)))
        monkeypatch.setattr(masq, "attachment_has_rules", has_rules)
        monkeypatch.setattr(masq, "gc", lambda network, valid: [])
        def port_setup(network: str, cid: str, ifname: str, port: str, mac: str, *_: Any) -> None:
            self.step("source check setup")
            self.port_chains[(network, cid, ifname)] = (port, mac)

        monkeypatch.setattr(sourcecheck, "setup", port_setup)
        monkeypatch.setattr(sourcecheck, "teardown",
                            lambda net, cid, ifname: self.port_chains.pop((net, cid, ifname), None))
        monkeypatch.setattr(sourcecheck, "attachment_has_rules",
                            lambda net, cid, ifname: (net, cid, ifname) in self.port_chains)
        monkeypatch.setattr(sourcecheck, "gc", lambda network, valid: [])
        real_add = ipam_client.add

        def ipam_add(req: Any, kind: str) -> Any:
            self.step("ipam add")
            return real_add(req, kind)

        monkeypatch.setattr(ipam_client, "add", ipam_add)
        return self

    # --- what a test looks at -----------------------------------------------------------

    def links(self, ns: str, kind: str | None = None) -> list[Link]:
        return [lk for lk in self.namespaces[ns].links.values() if kind is None or lk.kind == kind]

    def addresses_in(self, ns: str) -> list[IPInterface]:
        return [a for addrs in self.namespaces[ns].addrs.values() for a in addrs]


class FakeSocket:
    """One socket in one namespace of the fake kernel (the seam netlink.Netlink)."""

    def __init__(self, kernel: FakeKernel, ns: str) -> None:
        self.kernel = kernel
        self.ns = kernel.namespaces[ns]

    def close(self) -> None:
        pass

    def _link(self, index: int) -> Link:
        found = self.ns.links.get(index)
        if found is None:
            raise NetlinkError(errno.ENODEV, os.strerror(errno.ENODEV))
        return found

    def _name_free(self, ns: Namespace, name: str) -> None:
        if any(lk.name == name for lk in ns.links.values()):
            raise NetlinkError(errno.EEXIST, os.strerror(errno.EEXIST))

    def link_by_name(self, name: str) -> Link | None:
        return next((lk for lk in self.ns.links.values() if lk.name == name), None)

    def link_by_index(self, index: int) -> Link | None:
        return self.ns.links.get(index)

    def add_veth(self, name: str, peer: str, peer_netns_fd: int, mtu: int | None,
                 peer_mac: str | None, master: int | None = None) -> None:
        self.kernel.step(f"add veth {name}")
        pod = self.kernel.namespaces[self.kernel.fds[peer_netns_fd]]
        self._name_free(self.ns, name)
        self._name_free(pod, peer)
        host_index, pod_index = self.kernel.new_index(), self.kernel.new_index()
        mtu = mtu or 1500
        if master is not None:
            self._link(master)
        self.ns.links[host_index] = Link(host_index, name, _mac(), mtu, "veth", peer_index=pod_index,
                                         master=master)
        pod.links[pod_index] = Link(pod_index, peer, peer_mac or _mac(), mtu, "veth", peer_index=host_index)

    def add_bridge(self, name: str, mtu: int | None, vlan_filtering: bool) -> None:
        self.kernel.step(f"add bridge {name}")
        self._name_free(self.ns, name)
        index = self.kernel.new_index()
        self.ns.links[index] = Link(index, name, _mac(), mtu or 1500, "bridge")

    def set_link(self, index: int, up: bool | None = None, master: int | None = None,
                 mac: str | None = None, promisc: bool | None = None) -> None:
        self.kernel.step(f"set link {index}")
        lk = self._link(index)
        changes: dict[str, Any] = {}
        if up is not None:
            changes.update(up=up, oper_up=up)
        if master is not None:
            changes["master"] = master
        if mac is not None:
            changes["mac"] = mac
        if promisc is not None:
            changes["promisc"] = promisc
        self.ns.links[index] = replace(lk, **changes)

    def set_ipv4_conf(self, index: int, values: dict[int, int]) -> None:
        self.kernel.step(f"ipv4 conf {index}")
        self._link(index)

    def rename(self, index: int, name: str) -> None:
        self.kernel.step(f"rename {index}")
        self._name_free(self.ns, name)
        self.ns.links[index] = replace(self._link(index), name=name)

    def set_brport(self, index: int, hairpin: bool, isolated: bool) -> None:
        self.kernel.step(f"bridge port {index}")
        self._link(index)
        (self.kernel.hairpin.add if hairpin else self.kernel.hairpin.discard)(index)

    def brport_hairpin(self, index: int) -> bool | None:
        return index in self.kernel.hairpin if index in self.ns.links else None

    def enable_vlan_filtering(self, index: int) -> None:
        self.kernel.step(f"vlan filtering {index}")

    def set_port_vlan(self, index: int, vid: int) -> None:
        self.kernel.step(f"port vlan {index}")

    def delete_link(self, index: int) -> None:
        self.kernel.step(f"delete link {index}")
        lk = self._link(index)
        for ns in self.kernel.namespaces.values():
            for gone in {index, lk.peer_index} if lk.kind == "veth" else {index}:
                if gone is not None and gone in ns.links:
                    del ns.links[gone]
                    ns.addrs.pop(gone, None)
                    ns.routes = [r for r in ns.routes if r[2] != gone]

    def addresses(self, index: int) -> list[tuple[IPInterface, int]]:
        return [(a, 0) for a in self.ns.addrs.get(index, [])]

    def add_address(self, index: int, address: IPInterface, nodad: bool = False) -> None:
        self.kernel.step(f"add address {address}")
        self._link(index)
        have = self.ns.addrs.setdefault(index, [])
        if address in have:
            raise NetlinkError(errno.EEXIST, os.strerror(errno.EEXIST))
        have.append(address)

    def delete_address(self, index: int, address: IPInterface) -> None:
        self.kernel.step(f"delete address {address}")
        self.ns.addrs.get(index, []).remove(address)

    def routes(self, family: int) -> list[tuple[str, str | None]]:
        version = 4 if family == socket.AF_INET else 6
        return [(dst, gw) for dst, gw, _ in self.ns.routes if ipaddress.ip_network(dst).version == version]

    def add_route(self, dst: str, gateway: str | None, oif: int) -> None:
        self.kernel.step(f"add route {dst}")
        self._link(oif)
        dst = str(ipaddress.ip_network(dst, strict=False))
        if any(r[0] == dst for r in self.ns.routes):
            raise NetlinkError(errno.EEXIST, os.strerror(errno.EEXIST))
        self.ns.routes.append((dst, gateway, oif))

    def main_routes(self) -> set[tuple[str, str | None, int]]:
        # a route added by add_route (an oif, no owner) counts as proto 3 (boot), as the kernel's
        return {(dst, gw, -owner if owner < 0 else 3) for dst, gw, owner in self.ns.routes}

    def set_route(self, dst: str, gateway: str, proto: int, replace: bool) -> None:
        self.kernel.step(f"{'replace' if replace else 'add'} route {dst}")
        if not replace and any(r[0] == dst for r in self.ns.routes):
            raise NetlinkError(errno.EEXIST, os.strerror(errno.EEXIST))
        self.ns.routes = [r for r in self.ns.routes if r[0] != dst] + [(dst, gateway, -proto)]

    def delete_route(self, dst: str, gateway: str, proto: int) -> None:
        self.kernel.step(f"delete route {dst}")
        if (dst, gateway, -proto) not in self.ns.routes:
            raise NetlinkError(errno.ESRCH, os.strerror(errno.ESRCH))
        self.ns.routes.remove((dst, gateway, -proto))

    def uplink_mtu(self, addresses: Iterable[str]) -> int | None:
        wanted = set(addresses)
        owner = next((i for i, addrs in self.ns.addrs.items() if {str(a.ip) for a in addrs} & wanted), None)
        return self.ns.links[owner].mtu if owner is not None else None
