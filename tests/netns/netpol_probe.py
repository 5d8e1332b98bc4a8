"""Servers and probes in pod netns for the NetworkPolicy reachability tests, from this process.

A socket belongs to the netns it was created in: a short-lived thread enters the pod's netns
(setns affects only the calling thread), creates the sockets and hands them back; everything
else (serving, connecting, waiting) runs here on those sockets. Each pod serves TCP and UDP on
ports 80 and 81 (IPv4 and IPv6) and answers with its name, as the upstream suite's agnhost does.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from cni_plugin import rtnl
from cni_plugin.node.netpol import apply
from cni_plugin.node.netpol.agent import NetpolAgent

from .harness import Host, bridge_conf
from .netpol_cases import NODE, PODS, Matrix, Pods, World

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
PORTS = (80, 81)
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(netns: str, make: Callable[[], T]) -> T:
    """`make()` run by a thread that entered /run/netns/<netns> (or `netns`, a path)."""
    out: dict[str, T] = {}
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(netns if netns.startswith("/") else f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {netns}")
            finally:
                os.close(fd)
            out["value"] = make()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"setns-{netns}")
    thread.start()
    thread.join(timeout=30)
    if failure:
        raise failure[0]
    return out["value"]


def node_agent(world: World) -> NetpolAgent:
    """The node agent's NetworkPolicy path for the world's node netns: its rules go in with
    `nft -f` there, its bridge ports are read there; no objects yet."""
    assert world.host is not None
    host = world.host.name
    return NetpolAgent(NODE, lambda script: apply.replace(script, world.nft()), lambda *_a, **_k: None,
                       ports=lambda: apply.pod_ports(lambda: in_netns(host, rtnl.Socket)))


def _listeners() -> list[socket.socket]:
    socks = []
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        for port in PORTS:
            s = socket.socket(socket.AF_INET6, kind)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too, as mapped addresses
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::", port))
            if kind == socket.SOCK_STREAM:
                s.listen(64)
            s.setblocking(False)
            socks.append(s)
    return socks


class Servers:
    """Every pod's listeners, served by one thread until close()."""

    def __init__(self, pods: dict[str, str]) -> None:  # pod name -> netns
        self.selector = selectors.DefaultSelector()
        for name, netns in pods.items():
            for s in in_netns(netns, _listeners):
                self.selector.register(s, selectors.EVENT_READ, name.encode())
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="netpol-servers", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            for key, _ in self.selector.select(timeout=0.2):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    if sock.type == socket.SOCK_STREAM:
                        conn, _ = sock.accept()
                        with conn:
                            conn.sendall(key.data)
                    else:
                        _, peer = sock.recvfrom(64)
                        sock.sendto(key.data, peer)
                except OSError:
                    continue  # a client gone already: nothing to answer

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.selector.close()


Probe = tuple[str, str]  # (source netns, destination address)


# UDP sources get ports of their own, never reused in a run: a port the kernel picked again for
# the same pair would match the conntrack entry of an earlier, allowed probe and pass as a reply.
_UDP_SOURCE_PORTS = itertools.count(20000)


def client(proto: str, address: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM)
    if proto == "UDP":
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", next(_UDP_SOURCE_PORTS)))
    s.setblocking(False)
    return s


def probe(probes: Iterable[Probe], proto: str, port: int, timeout: float) -> dict[Probe, bool]:
    """Whether each source reaches each destination (TCP: the handshake completes; UDP: the
    server's answer comes back), all at once, within `timeout` seconds."""
    probes = list(probes)
    by_source: dict[str, list[str]] = {}
    for source, address in probes:
        by_source.setdefault(source, []).append(address)
    selector = selectors.DefaultSelector()
    result = dict.fromkeys(probes, False)
    try:
        for source, addresses in by_source.items():
            socks = in_netns(source, lambda a=addresses: [client(proto, x) for x in a])  # type: ignore[misc]
            for address, s in zip(addresses, socks, strict=True):
                if proto == "TCP":
                    code = s.connect_ex((address, port))
                    if code not in (0, errno.EINPROGRESS):
                        s.close()
                        continue
                    selector.register(s, selectors.EVENT_WRITE, (source, address))
                else:
                    s.sendto(b"ping", (address, port))
                    selector.register(s, selectors.EVENT_READ, (source, address))
        deadline = time.monotonic() + timeout
        while selector.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(timeout=left):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                if proto == "TCP":
                    result[key.data] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                else:
                    try:
                        result[key.data] = bool(sock.recv(64))
                    except OSError:  # ICMP unreachable came back: not reached
                        result[key.data] = False
                selector.unregister(sock)
                sock.close()
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        selector.close()
    return result


def observe(world: Pods, proto: str, port: int, family: int, expected: Matrix | None = None,
            first: float = 1.0) -> Matrix:
    """Every ordered pair of distinct pods, waiting `first` seconds for answers. A pair expected
    open but not reached is probed again with more time (a loaded machine may be slow to answer);
    a pair the rules block stays blocked."""
    pairs = [(s, t) for s in PODS for t in PODS if s != t]
    def run(which: list[tuple[str, str]], timeout: float) -> Matrix:
        seen = probe([(world.netns[s], world.ips[t][family]) for s, t in which], proto, port, timeout)
        return {(s, t): seen[(world.netns[s], world.ips[t][family])] for s, t in which}
    seen = run(pairs, first)
    again = run([p for p, ok in seen.items() if not ok and (expected or {}).get(p, True)], 3.0)
    return {**seen, **again}


def differences(expected: Matrix, seen: Matrix) -> list[str]:
    return [f"{s} -> {t}: expected {'open' if ok else 'blocked'}" for (s, t), ok in sorted(expected.items())
            if seen[(s, t)] != ok]


def pods_on_bridge(
    host: Host, pods: Iterable[str], name: str, bridge: str
) -> tuple[dict[str, str], dict[str, dict[int, str]]]:
    """Dual-stack pods on a bridge of `host` (as a NetworkPolicy node has them, bridge netfilter
    on): each pod's netns and its address per family."""
    host.exec("ip", "link", "set", "lo", "up")
    host.exec("sh", "-c", "; ".join(f"echo 1 > /proc/sys/{n}" for n in apply.BRIDGE_SYSCTLS))
    conf = bridge_conf(host, name=name, bridge=bridge, isDefaultGateway=True)
    conf["ipam"]["ranges"] = [[{"subnet": "10.89.0.0/24"}], [{"subnet": "fd89::/64"}]]
    netns, ips = {}, {}
    for pod in pods:
        netns[pod] = host.new_pod()
        result = host.add(conf, netns[pod], container_id=pod.replace("/", "-"))
        ips[pod] = {(6 if ":" in i["address"] else 4): i["address"].split("/")[0] for i in result["ips"]}
    return netns, ips
