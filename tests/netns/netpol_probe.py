"""Servers and probes in pod netns for the NetworkPolicy reachability tests, from this process.

A socket belongs to the netns it was created in: a short-lived thread enters the pod's netns
(setns affects only the calling thread), creates the sockets and hands them back; everything
else (serving, connecting, waiting) runs here on those sockets. Each pod serves TCP and UDP on
ports 80 and 81 (IPv4 and IPv6) and answers with its name, as the upstream suite's agnhost does.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import select
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from cni_plugin import rtnl
from cni_plugin.node.netpol import apply, bridgeports
from cni_plugin.node.netpol.policy_controller import PolicyController
from testbed.harness import Host, bridge_conf

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


def node_agent(world: World, watch: bridgeports.Watch | None = None) -> PolicyController:
    """The node controller's NetworkPolicy path for the world's node netns: its rules go in with
    `nft -f` there, its bridge ports are read there (whole at each reconcile, or kept by `watch`,
    as the node controller does); no objects yet."""
    assert world.host is not None
    host = world.host.name
    agent = PolicyController(NODE, lambda script: apply.replace(script, world.nft()), lambda *_a, **_k: None,
                             ports=lambda: bridgeports.pod_ports(lambda: in_netns(host, rtnl.Socket)))
    if watch is not None:
        agent.ports, agent.on_bridge = watch.pods, watch.on_bridge
    return agent


def port_watch(host: str) -> bridgeports.Watch:
    """The bridge ports of netns `host`, kept as the node controller keeps them."""
    return bridgeports.Watch(lambda: in_netns(host, rtnl.Socket))


def _listeners() -> list[socket.socket]:
    socks = [socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_SCTP)
             for family in (socket.AF_INET, socket.AF_INET6)]
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
                s.setblocking(False)
                self.selector.register(s, selectors.EVENT_READ, name.encode())
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="netpol-servers", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            for key, _ in self.selector.select(timeout=0.2):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    if sock.type == socket.SOCK_RAW:
                        _sctp_received(sock.family, sock.recv(2048))
                    elif sock.type == socket.SOCK_STREAM:
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

# --- SCTP: INIT chunks sent from raw sockets, recorded by their initiate tag where they arrive ---
_SCTP_TAGS = itertools.count(0x5C700001)
_sctp_seen: set[int] = set()
_sctp_lock = threading.Condition()


def _crc32c(data: bytes) -> int:
    """CRC32c (Castagnoli), SCTP's checksum (RFC 9260 appendix A)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def sctp_init(source_port: int, port: int, tag: int) -> bytes:
    """An SCTP packet holding one INIT chunk whose initiate tag is `tag`."""
    chunk = struct.pack("!BBHIIHHI", 1, 0, 20, tag, 65536, 1, 1, tag)
    header = struct.pack("!HHI", source_port, port, 0)
    return header + struct.pack("<I", _crc32c(header + b"\0\0\0\0" + chunk)) + chunk


def _sctp_received(family: int, packet: bytes) -> None:
    if family == socket.AF_INET:  # a raw IPv4 socket gets the IP header too
        packet = packet[(packet[0] & 0x0F) * 4:]
    if len(packet) >= 20 and packet[12] == 1:  # an INIT chunk: its initiate tag
        with _sctp_lock:
            _sctp_seen.add(struct.unpack("!I", packet[16:20])[0])
            _sctp_lock.notify_all()


def _sctp_probe(sockets: dict[Probe, socket.socket], port: int, timeout: float) -> dict[Probe, bool]:
    tags = {}
    for (source, address), s in sockets.items():
        tags[(source, address)] = tag = next(_SCTP_TAGS)
        with contextlib.suppress(OSError):
            s.send(sctp_init(next(_UDP_SOURCE_PORTS), port, tag))
    deadline = time.monotonic() + timeout
    with _sctp_lock:
        while not set(tags.values()) <= _sctp_seen and (left := deadline - time.monotonic()) > 0:
            _sctp_lock.wait(left)
        return {p: tag in _sctp_seen for p, tag in tags.items()}


# --- ICMP: echo requests from raw sockets connected to the destination (only its packets come in) ---
_ICMP_IDS = itertools.count(0x1C00)


def _checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _echo_request(family: int, ident: int) -> bytes:
    kind = 8 if family == socket.AF_INET else 128  # the kernel sums ICMPv6 itself
    body = struct.pack("!BBHHH", kind, 0, 0, ident, 1) + b"pybridge"
    return body if family == socket.AF_INET6 else body[:2] + struct.pack("!H", _checksum(body)) + body[4:]


def _is_echo_reply(family: int, packet: bytes, ident: int) -> bool:
    if family == socket.AF_INET:
        packet = packet[(packet[0] & 0x0F) * 4:]
    reply = 0 if family == socket.AF_INET else 129
    return len(packet) >= 8 and packet[0] == reply and struct.unpack("!H", packet[4:6])[0] == ident


RAW = {"ICMP": {socket.AF_INET: socket.IPPROTO_ICMP, socket.AF_INET6: socket.IPPROTO_ICMPV6},
       "SCTP": {socket.AF_INET: socket.IPPROTO_SCTP, socket.AF_INET6: socket.IPPROTO_SCTP}}
# UDP sources get ports of their own, never reused in a run: a port the kernel picked again for
# the same pair would match the conntrack entry of an earlier, allowed probe and pass as a reply.
_UDP_SOURCE_PORTS = itertools.count(20000)


def client(proto: str, address: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    if proto in RAW:
        s = socket.socket(family, socket.SOCK_RAW, RAW[proto][family])
        s.connect((address, 0))
        s.setblocking(False)
        return s
    s = socket.socket(family, socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM)
    if proto == "UDP":
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", next(_UDP_SOURCE_PORTS)))
    s.setblocking(False)
    return s


def probe(probes: Iterable[Probe], proto: str, port: int, timeout: float) -> dict[Probe, bool]:
    """Whether each source reaches each destination (TCP: the handshake completes; UDP: the
    server's answer comes back; ICMP: the echo reply comes back; SCTP: the INIT arrives), all at
    once, within `timeout` seconds."""
    probes = list(probes)
    by_source: dict[str, list[str]] = {}
    for source, address in probes:
        by_source.setdefault(source, []).append(address)
    selector = selectors.DefaultSelector()
    result = dict.fromkeys(probes, False)
    sctp: dict[Probe, socket.socket] = {}
    try:
        for source, addresses in by_source.items():
            socks = in_netns(source, lambda a=addresses: [client(proto, x) for x in a])  # type: ignore[misc]
            for address, s in zip(addresses, socks, strict=True):
                if proto == "SCTP":
                    sctp[(source, address)] = s
                elif proto == "ICMP":
                    ident = next(_ICMP_IDS) & 0xFFFF
                    with contextlib.suppress(OSError):
                        s.send(_echo_request(s.family, ident))
                    selector.register(s, selectors.EVENT_READ, (source, address, ident))
                elif proto == "TCP":
                    code = s.connect_ex((address, port))
                    if code not in (0, errno.EINPROGRESS):
                        s.close()
                        continue
                    selector.register(s, selectors.EVENT_WRITE, (source, address))
                else:
                    s.sendto(b"ping", (address, port))
                    selector.register(s, selectors.EVENT_READ, (source, address))
        if sctp:
            return _sctp_probe(sctp, port, timeout)
        deadline = time.monotonic() + timeout
        while selector.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(timeout=left):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                if proto == "ICMP":
                    source, address, ident = key.data
                    try:
                        if not _is_echo_reply(sock.family, sock.recv(2048), ident):
                            continue  # another ICMP message from there (e.g. IPv6 neighbour discovery)
                    except OSError:
                        continue
                    result[(source, address)] = True
                elif proto == "TCP":
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
        for s in sctp.values():
            s.close()
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


class Flows:
    """A TCP connection and a UDP flow from `source` to `target`'s `port`, set up while allowed,
    with sockets of their own (not the Servers'): whether each one still carries data both ways,
    and whether a new connection or flow to the same port gets through."""

    def __init__(self, world: Pods, source: str, target: str, port: int, family: int = 4) -> None:
        self.address = world.ips[target][family]
        self.source, self.port = world.netns[source], port
        any_address = "::" if family == 6 else "0.0.0.0"
        kind = socket.AF_INET6 if family == 6 else socket.AF_INET

        def serve() -> tuple[socket.socket, socket.socket]:
            tcp = socket.create_server((any_address, port), family=kind)
            udp = socket.socket(kind, socket.SOCK_DGRAM)
            udp.bind((any_address, port))
            return tcp, udp
        self.listener, self.udp_server = in_netns(world.netns[target], serve)
        self.tcp = in_netns(self.source, lambda: socket.create_connection((self.address, port), timeout=3))
        self.udp = in_netns(self.source, lambda: client("UDP", self.address))
        self.listener.settimeout(3)
        self.accepted, _ = self.listener.accept()
        for s in (self.accepted, self.tcp, self.udp_server):
            s.settimeout(1.0)

    def flowing(self) -> tuple[bool, bool]:
        """(TCP, UDP): a message each way on the flows set up before."""
        return self._tcp_round(), self._udp_round(self.udp)

    def new_ones(self) -> tuple[bool, bool]:
        """(TCP, UDP): a new connection, a new flow (another source port)."""
        target = (self.address, self.port)
        try:
            with in_netns(self.source, lambda: socket.create_connection(target, timeout=1.5)):
                tcp = True
        except OSError:
            tcp = False
        udp = in_netns(self.source, lambda: client("UDP", self.address))
        try:
            return tcp, self._udp_round(udp)
        finally:
            udp.close()

    def _tcp_round(self) -> bool:
        try:
            self.tcp.sendall(b"ping")
            if self.accepted.recv(64) != b"ping":
                return False
            self.accepted.sendall(b"pong")
            return self.tcp.recv(64) == b"pong"
        except OSError:
            return False

    def _udp_round(self, sock: socket.socket) -> bool:
        sock.sendto(b"ping", (self.address, self.port))
        try:
            _, peer = self.udp_server.recvfrom(64)
            self.udp_server.sendto(b"pong", peer)
        except OSError:
            return False
        ready, _, _ = select.select([sock], [], [], 1.0)
        return bool(ready) and sock.recv(64) == b"pong"

    def close(self) -> None:
        for s in (self.tcp, self.udp, self.accepted, self.listener, self.udp_server):
            s.close()
