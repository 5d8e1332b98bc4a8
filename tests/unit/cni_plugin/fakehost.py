"""An in-memory kernel for the verbs (cni_plugin.host.Host): its netns, links, addresses, routes,
sysctls and each attachment's rules, handed to the verbs as `Request.host`, so ADD, DEL and
CHECK run as unit tests without root and without patching a module.

Namespaces are named by their path; `open_netns` hands out a real fd, on a file of this host's
own that stands for the namespace (so a dup of it names it too), and `run_in` runs the function
with that namespace as the calling thread's.
Every change (a netlink write, a sysctl `ensure`, a rule setup) is one numbered step: with
`fail_at = n` the n-th step fails as the kernel would refuse it. `read_only_sysctls` makes every
sysctl write fail as a read-only /proc/sys does.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import secrets
import socket
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from cni_plugin import netns
from cni_plugin.netlink import Link, NetlinkError
from cnikit.ip import IPInterface
from cnikit.removals import Removals

T = TypeVar("T")
HOST = "host"
Attachment = tuple[str, str, str]  # network, container id, ifname


@dataclass
class Namespace:
    links: dict[int, Link] = field(default_factory=dict)
    addrs: dict[int, list[IPInterface]] = field(default_factory=dict)
    # (destination, gateway, oif); the node controller's routes by protocol carry -proto as oif
    routes: list[tuple[str, str | None, int]] = field(default_factory=list)
    peer_ns: dict[int, str] = field(default_factory=dict)  # a veth's index -> its peer's netns
    marks: dict[int, tuple[int, str]] = field(default_factory=dict)  # index -> (group, alias)


def _mac() -> str:
    return ":".join(f"{b:02x}" for b in bytes([0x02]) + secrets.token_bytes(5))


class FakeHost:
    def __init__(self) -> None:
        self.pinned: dict[tuple[int, str], str] = {}
        self.namespaces: dict[str, Namespace] = {HOST: Namespace()}
        self._files = tempfile.TemporaryDirectory(prefix="fakehost-")
        self._paths: dict[str, str] = {}  # a namespace (or sysctl dir) -> the file standing for it
        self._names: dict[int, str] = {}  # that file's inode -> what it stands for
        self.sysctls: dict[str, str] = {}
        self.written_while_up: list[str] = []
        self.masq: set[Attachment] = set()
        self.port_chains: dict[Attachment, tuple[str, str]] = {}  # -> (port, pod MAC)
        self.teardown_ports: list[str | None] = []  # the port each source check teardown was given
        self.hairpin: set[int] = set()
        self.steps: list[str] = []
        self.fail_at: int | None = None
        self.read_only_sysctls = False
        self._next_index = 100
        self._current = threading.local()

    # --- what a test sets up and looks at -------------------------------------------------

    def new_netns(self, path: str) -> str:
        self.namespaces[path] = Namespace()
        return path

    def links(self, ns: str, kind: str | None = None) -> list[Link]:
        return [lk for lk in self.namespaces[ns].links.values() if kind is None or lk.kind == kind]

    def addresses_in(self, ns: str) -> list[IPInterface]:
        return [a for addrs in self.namespaces[ns].addrs.values() for a in addrs]

    def state(self) -> tuple[Any, ...]:
        """Everything an ADD may change but the sysctls (the kernel keeps a netns's own knobs
        too), as a value to compare."""
        spaces = {name: (dict(ns.links), {i: list(a) for i, a in ns.addrs.items() if a}, sorted(ns.routes))
                  for name, ns in self.namespaces.items()}
        return spaces, set(self.masq), dict(self.port_chains), set(self.hairpin)

    # --- steps and failures ---------------------------------------------------------------

    def step(self, what: str) -> None:
        self.steps.append(what)
        if self.fail_at is not None and len(self.steps) == self.fail_at:
            raise NetlinkError(errno.EIO, f"injected failure at step {len(self.steps)}: {what}")

    def new_index(self) -> int:
        self._next_index += 1
        return self._next_index

    # --- netlink and netns (cni_plugin.host.Host) -----------------------------------------

    def current(self) -> str:
        return getattr(self._current, "ns", HOST)

    def netlink(self) -> FakeSocket:
        return FakeSocket(self, self.current())

    def _fd_for(self, name: str) -> int:
        path = self._paths.get(name)
        if path is None:
            path = self._paths[name] = os.path.join(self._files.name, str(len(self._paths)))
            with open(path, "w"):
                pass
            self._names[os.stat(path).st_ino] = name
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def name_of(self, fd: int) -> str:
        """The namespace (or `netns:sysctl dir`) an fd this host handed out stands for."""
        return self._names[os.fstat(fd).st_ino]

    def open_netns(self, path: str) -> int:
        if path not in self.namespaces:
            raise netns.NetnsGone(path)
        return self._fd_for(path)

    def reopen_netns(self, fd: int, path: str) -> int:
        if self.name_of(fd) not in self.namespaces:
            raise netns.NetnsGone(path)
        return self._fd_for(self.name_of(fd))

    def same_netns(self, fd: int) -> bool:
        return self.name_of(fd) == self.current()

    def run_in(self, fd: int, func: Callable[[], T]) -> T:
        before = self.current()
        self._current.ns = self.name_of(fd)
        try:
            return func()
        finally:
            self._current.ns = before

    # --- sysctls --------------------------------------------------------------------------

    def sysctl_dir(self, base: str) -> int | None:
        return self._fd_for(f"{self.current()}:{base}")

    def sysctl_write(self, key: str, value: str, dir_fd: int | None = None) -> None:
        """Kept as `netns:key`: below a directory, in the netns it was opened in. A link's own
        knobs written while it is up are also noted in `written_while_up`."""
        if self.read_only_sysctls:
            raise OSError(errno.EROFS, "Read-only file system")
        where = self.name_of(dir_fd) if dir_fd is not None else f"{self.current()}:"
        self.sysctls[where + key] = value
        ns, _, path = (where + key).partition(":")
        parts = path.removeprefix("net/ipv6/conf/").split("/")
        if len(parts) == 2 and any(lk.name == parts[0] and lk.up for lk in self.links(ns)):
            self.written_while_up.append(where + key)

    def sysctl_try_write(self, key: str, value: str, dir_fd: int | None = None) -> bool:
        try:
            self.sysctl_write(key, value, dir_fd)
        except OSError:
            return False
        return True

    def sysctl_ensure(self, key: str, value: str) -> None:
        self.step(f"sysctl {key}")
        self.sysctls[f"{self.current()}:{key}"] = value

    # --- each attachment's rules ----------------------------------------------------------

    def masq_setup(self, network: str, container_id: str, ifname: str,
                   addrs: Sequence[IPInterface], backend: str | None) -> None:
        self.step("masquerade setup")
        self.masq.add((network, container_id, ifname))

    def masq_teardown(self, network: str, container_id: str, ifname: str) -> None:
        self.step("masquerade teardown")
        self.masq.discard((network, container_id, ifname))

    def masq_in_effect(self, network: str, container_id: str, ifname: str) -> bool:
        return (network, container_id, ifname) in self.masq

    def masq_gc(self, network: str, valid: set[tuple[str, str]]) -> list[str]:
        self.masq = {a for a in self.masq if a[0] != network or a[1:] in valid}
        return []

    def port_check_setup(self, network: str, container_id: str, ifname: str, port: str, mac: str,
                         addrs: Sequence[IPInterface], ipv6: bool) -> None:
        self.step("source check setup")
        self.port_chains[(network, container_id, ifname)] = (port, mac)

    def port_check_teardown(self, network: str, container_id: str, ifname: str,
                            port: str | None = None, later: Removals | None = None) -> None:
        def teardown() -> None:
            self.step("source check teardown")
            self.teardown_ports.append(port)
            self.port_chains.pop((network, container_id, ifname), None)

        if later is not None and port is not None:
            self.step("source check teardown queued")
            later.submit(teardown)
        else:
            teardown()

    def port_check_in_effect(self, network: str, container_id: str, ifname: str) -> bool:
        return (network, container_id, ifname) in self.port_chains

    def port_check_gc(self, network: str, valid: set[tuple[str, str]]) -> list[str]:
        self.port_chains = {a: p for a, p in self.port_chains.items() if a[0] != network or a[1:] in valid}
        return []


class FakeSocket:
    """One socket in one namespace of the fake host (the seam netlink.Netlink)."""

    def __init__(self, host: FakeHost, ns: str) -> None:
        self.host = host
        self.name = ns
        self.ns = host.namespaces[ns]

    def close(self) -> None:
        pass

    def __enter__(self) -> FakeSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        found = self.ns.links.get(index)
        peer_ns = self.ns.peer_ns.get(index)
        if found is None or peer_ns is None:
            return found
        return replace(found, peer_netnsid=self._nsid(peer_ns))  # as the kernel reports a veth's peer

    def nsid(self, netns_fd: int) -> int | None:
        return self._nsid(self.host.name_of(netns_fd))

    def _nsid(self, name: str) -> int:
        return list(self.host.namespaces).index(name)

    def add_veth(self, name: str, peer: str, peer_netns_fd: int, mtu: int | None,
                 peer_mac: str | None, master: int | None = None) -> None:
        self.host.step(f"add veth {name}")
        pod = self.host.namespaces[self.host.name_of(peer_netns_fd)]
        self._name_free(self.ns, name)
        self._name_free(pod, peer)
        host_index, pod_index = self.host.new_index(), self.host.new_index()
        mtu = mtu or 1500
        if master is not None:
            self._link(master)
        self.ns.links[host_index] = Link(host_index, name, _mac(), mtu, "veth", peer_index=pod_index,
                                         master=master)
        pod.links[pod_index] = Link(pod_index, peer, peer_mac or _mac(), mtu, "veth", peer_index=host_index)
        self.ns.peer_ns[host_index] = self.host.name_of(peer_netns_fd)
        pod.peer_ns[pod_index] = self.name

    def add_bridge(self, name: str, mtu: int | None, vlan_filtering: bool) -> None:
        self.host.step(f"add bridge {name}")
        self._name_free(self.ns, name)
        index = self.host.new_index()
        self.ns.links[index] = Link(index, name, _mac(), mtu or 1500, "bridge")

    def set_link(self, index: int, up: bool | None = None, master: int | None = None,
                 mac: str | None = None, promisc: bool | None = None) -> None:
        self.host.step(f"set link {index}")
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
        self.host.step(f"ipv4 conf {index}")
        self._link(index)

    def rename(self, index: int, name: str) -> None:
        self.host.step(f"rename {index}")
        self._name_free(self.ns, name)
        self.ns.links[index] = replace(self._link(index), name=name)

    def set_brport(self, index: int, hairpin: bool, isolated: bool) -> None:
        self.host.step(f"bridge port {index}")
        self._link(index)
        (self.host.hairpin.add if hairpin else self.host.hairpin.discard)(index)

    def brport_hairpin(self, index: int) -> bool | None:
        return index in self.host.hairpin if index in self.ns.links else None

    def enable_vlan_filtering(self, index: int) -> None:
        self.host.step(f"vlan filtering {index}")

    def set_port_vlan(self, index: int, vid: int) -> None:
        self.host.step(f"port vlan {index}")

    def delete_link(self, index: int) -> None:
        """A veth goes with its peer, each with its addresses, routes and own sysctls."""
        self.host.step(f"delete link {index}")
        lk = self._link(index)
        for name, ns in self.host.namespaces.items():
            for gone in {index, lk.peer_index} if lk.kind == "veth" else {index}:
                if gone is not None and gone in ns.links:
                    prefix = f"{name}:net/ipv6/conf/{ns.links[gone].name}/"
                    self.host.sysctls = {k: v for k, v in self.host.sysctls.items()
                                         if not k.startswith(prefix)}
                    self.host.hairpin.discard(gone)
                    del ns.links[gone]
                    ns.addrs.pop(gone, None)
                    ns.peer_ns.pop(gone, None)
                    ns.marks.pop(gone, None)
                    ns.routes = [r for r in ns.routes if r[2] != gone]

    def mark(self, index: int, group: int, alias: str) -> None:
        self.host.step(f"mark link {index}")
        self._link(index)
        self.ns.marks[index] = (group, alias)

    def group_members(self, group: int) -> list[tuple[int, str]]:
        return [(index, alias) for index, (g, alias) in self.ns.marks.items() if g == group]

    def delete_group(self, group: int) -> None:
        for index, _alias in self.group_members(group):
            self.delete_link(index)

    def addresses(self, index: int) -> list[tuple[IPInterface, int]]:
        return [(a, 0) for a in self.ns.addrs.get(index, [])]

    def add_address(self, index: int, address: IPInterface, nodad: bool = False) -> None:
        self.host.step(f"add address {address}")
        self._link(index)
        have = self.ns.addrs.setdefault(index, [])
        if address in have:
            raise NetlinkError(errno.EEXIST, os.strerror(errno.EEXIST))
        have.append(address)

    def delete_address(self, index: int, address: IPInterface) -> None:
        self.host.step(f"delete address {address}")
        self.ns.addrs.get(index, []).remove(address)

    def routes(self, family: int) -> list[tuple[str, str | None]]:
        version = 4 if family == socket.AF_INET else 6
        return [(dst, gw) for dst, gw, _ in self.ns.routes if ipaddress.ip_network(dst).version == version]

    def add_route(self, dst: str, gateway: str | None, oif: int) -> None:
        self.host.step(f"add route {dst}")
        self._link(oif)
        dst = str(ipaddress.ip_network(dst, strict=False))
        if any(r[0] == dst for r in self.ns.routes):
            raise NetlinkError(errno.EEXIST, os.strerror(errno.EEXIST))
        self.ns.routes.append((dst, gateway, oif))

    def main_routes(self) -> set[tuple[str, str | None, int]]:
        # a route added by add_route (an oif, no owner) counts as proto 3 (boot), as the kernel's
        return {(dst, gw, -owner if owner < 0 else 3) for dst, gw, owner in self.ns.routes}

    def set_route(self, dst: str, gateway: str, proto: int, replace: bool) -> None:
        self.host.step(f"{'replace' if replace else 'add'} route {dst}")
        if not replace and any(r[0] == dst for r in self.ns.routes):
            raise NetlinkError(errno.EEXIST, os.strerror(errno.EEXIST))
        self.ns.routes = [r for r in self.ns.routes if r[0] != dst] + [(dst, gateway, -proto)]

    def delete_route(self, dst: str, gateway: str, proto: int) -> None:
        self.host.step(f"delete route {dst}")
        if (dst, gateway, -proto) not in self.ns.routes:
            raise NetlinkError(errno.ESRCH, os.strerror(errno.ESRCH))
        self.ns.routes.remove((dst, gateway, -proto))

    def uplink_mtu(self, addresses: Iterable[str]) -> int | None:
        wanted = set(addresses)
        owner = next((i for i, addrs in self.ns.addrs.items() if {str(a.ip) for a in addrs} & wanted), None)
        return self.ns.links[owner].mtu if owner is not None else None
