"""Pods and raw frames as a hostile pod writes them: a pod with CAP_NET_RAW (in containerd's
default set) sends what it likes from a packet socket made inside its netns. Shared by the netns
tier (tests/netns/test_sourcecheck.py) and the hostile-pod stress run (tests/reliability)."""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

from testbed.harness import Host, bridge_conf, pod_json

PORT = 7777
RA_PREFIX = ipaddress.IPv6Network("2001:db8:66::/64")
ETH_P_ALL = 0x0003


@dataclass(frozen=True)
class Pod:
    netns: str
    mac: str
    v4: str
    v6: str
    link_local: str  # as the kernel made it, read from the pod


def dual_stack(host: Host, **overrides: Any) -> dict[str, Any]:
    conf = bridge_conf(host, **overrides)
    conf["ipam"]["ranges"] = [[{"subnet": "10.88.0.0/24"}], [{"subnet": "fd88::/64"}]]
    return conf


def make_pods(host: Host, conf: dict[str, Any], names: tuple[str, ...]) -> dict[str, Pod]:
    pods = {}
    for name in names:
        netns = host.new_pod()
        result = host.add(conf, netns, container_id=name)
        ips = [ip["address"].split("/")[0] for ip in result["ips"]]
        pods[name] = Pod(netns, result["interfaces"][2]["mac"], ips[0], ips[1], link_local(host, netns))
    return pods


def link_local(host: Host, netns: str) -> str:
    deadline = time.monotonic() + 5
    while True:
        addrs = pod_json(host, netns, "-6", "addr", "show", "dev", "eth0", "scope", "link")
        found = [a["local"] for a in (addrs[0]["addr_info"] if addrs else []) if "local" in a]
        if found:
            return str(found[0])
        assert time.monotonic() < deadline, f"no link-local address in {netns}"
        time.sleep(0.05)


# --- frames, as a pod with CAP_NET_RAW can write them --------------------------------------


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(src_mac: str, dst_mac: str, src: str, dst: str, payload: bytes, port: int = PORT) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    length = 8 + len(payload)
    udp = struct.pack("!HHHH", port, port, length, 0) + payload
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, socket.IPPROTO_UDP, length)
        udp = udp[:6] + struct.pack("!H", checksum(pseudo + udp) or 0xFFFF) + udp[8:]
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0, 64, socket.IPPROTO_UDP, 0,
                             s.packed, d.packed)
        header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
        ethertype = 0x0800
    else:
        pseudo = s.packed + d.packed + struct.pack("!I3xB", length, socket.IPPROTO_UDP)
        udp = udp[:6] + struct.pack("!H", checksum(pseudo + udp) or 0xFFFF) + udp[8:]
        header = struct.pack("!IHBB16s16s", 6 << 28, length, socket.IPPROTO_UDP, 64, s.packed, d.packed)
        ethertype = 0x86DD
    ether = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", ""))
    return ether + struct.pack("!H", ethertype) + header + udp


def router_advertisement(mac: str) -> bytes:
    """An RA (ICMPv6 type 134; the kernel fills in the checksum) announcing a default route and
    a SLAAC prefix, as a rogue router would."""
    ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
    source_lla = struct.pack("!BB6s", 1, 1, bytes.fromhex(mac.replace(":", "")))
    prefix = struct.pack("!BBBBIII16s", 3, 4, RA_PREFIX.prefixlen, 0xC0, 86400, 14400, 0,
                         RA_PREFIX.network_address.packed)
    return ra + source_lla + prefix


def packet_socket() -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind(("eth0", ETH_P_ALL))
    return s


def ra_sender() -> tuple[socket.socket, int]:
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
    return s, socket.if_nametoindex("eth0")


def drain(sock: socket.socket, seconds: float) -> list[tuple[bytes, Any]]:
    got = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            got.append(sock.recvfrom(2048))
        except BlockingIOError:
            time.sleep(0.02)
    return got


def router_state(host: Host, pod: Pod) -> tuple[list[str], list[Any]]:
    """The victim's addresses in the RA's prefix, and its IPv6 default routes."""
    addrs = pod_json(host, pod.netns, "-6", "addr", "show", "dev", "eth0")[0]["addr_info"]
    taken = [a["local"] for a in addrs if "local" in a and ipaddress.ip_address(a["local"]) in RA_PREFIX]
    return taken, pod_json(host, pod.netns, "-6", "route", "show", "default")
