"""A hostile pod floods an isolated one: on a dual-stack bridge, pod b (CAP_NET_RAW: a packet
socket and a raw ICMPv6 socket made in its netns) sends rogue router advertisements, UDP with
forged sources, broadcast and multicast UDP, and unicast UDP to pod a's API and link-local
addresses. Pod a is isolated (deny-all ingress through the node controller's PolicyController); pod c is a
legitimate, open peer.

A packet socket on a's eth0 counts every attack frame that reaches the pod at all, whatever
socket would take it. The defended run (sourceCheck on, the policy applied) must count 0 there,
and leave a without a SLAAC address or a default route; c still gets b's genuine broadcasts, so
the counting works in that same run. The control run (sourceCheck off, no policy) sends the same
flood and must count every kind at a: the test can fail.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import struct
import threading
import time
from collections import Counter

import pytest

from cni_plugin.node.netpol import apply
from testbed.harness import Host
from tests.netns.netpol_cases import POD_A, World, ns_policy
from tests.netns.netpol_probe import in_netns, node_agent
from tests.netns.rawframes import (
    Pod,
    dual_stack,
    make_pods,
    packet_socket,
    ra_sender,
    router_advertisement,
    router_state,
    udp_frame,
)

from .conftest import HostFactory, record, scale

MARK = b"pbt-hostile:"
SUBNET_V4 = ipaddress.IPv4Network("10.88.0.0/24")
BROADCAST_MAC = "ff:ff:ff:ff:ff:ff"
ALL_NODES_MAC = "33:33:00:00:00:01"
SOL_PACKET, PACKET_STATISTICS = 263, 6
PACKET_OUTGOING = 4


def _attacks(b: Pod, a: Pod, c: Pod, rng: random.Random) -> dict[str, tuple[str, str, str]]:
    """kind -> (destination MAC, source address, destination address) of b's UDP frames; each
    round draws new random sources."""
    random_v4 = str(SUBNET_V4[rng.randrange(2, 254)])
    random_v6 = str(ipaddress.IPv6Address(0x20010DB8 << 96 | rng.getrandbits(96)))
    return {
        "forged c v4": (a.mac, c.v4, a.v4),
        "forged c v6": (a.mac, c.v6, a.v6),
        "forged c link-local": (a.mac, c.link_local, a.link_local),
        "forged link-local": (a.mac, "fe80::bad", a.v6),
        "forged random v4": (a.mac, random_v4, a.v4),
        "forged random v6": (a.mac, random_v6, a.v6),
        "forged c subnet broadcast": (BROADCAST_MAC, c.v4, str(SUBNET_V4.broadcast_address)),
        "subnet broadcast": (BROADCAST_MAC, b.v4, str(SUBNET_V4.broadcast_address)),
        "limited broadcast": (BROADCAST_MAC, b.v4, "255.255.255.255"),
        "multicast ff02::1": (ALL_NODES_MAC, b.link_local, "ff02::1"),
        "unicast v4": (a.mac, b.v4, a.v4),
        "unicast v6": (a.mac, b.v6, a.v6),
        "unicast link-local": (a.mac, b.link_local, a.link_local),
    }


FLOODED = {"subnet broadcast", "limited broadcast", "multicast ff02::1"}  # what c, open, must get


def _kind(frame: bytes) -> str | None:
    """The attack kind a received frame carries: "router advertisement", a UDP kind from its
    payload, or None for the bridge's own traffic (ND, MLD)."""
    ethertype = struct.unpack("!H", frame[12:14])[0]
    if ethertype == 0x86DD and frame[20] == 58 and frame[54:55] == b"\x86":
        return "router advertisement"
    at = frame.find(MARK)
    return frame[at + len(MARK):].split(b"|")[0].decode() if at >= 0 else None


class Counting:
    """A packet socket on a pod's eth0, drained by a thread: attack frames received, by kind."""

    def __init__(self, pod: Pod) -> None:
        self.sock = in_netns(pod.netns, packet_socket)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            self.sock.settimeout(0.1)
        except OSError:
            self.sock.close()
            raise
        self.seen: Counter[str] = Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._count, daemon=True)
        self.thread.start()

    def _count(self) -> None:
        while not self.stop.is_set():
            try:
                frame, address = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            kind = _kind(frame) if address[2] != PACKET_OUTGOING else None
            if kind is not None:
                self.seen[kind] += 1

    def close(self) -> int:
        """Stops counting; the frames the socket itself dropped (a full buffer), which must be 0
        for the counts to be whole."""
        self.stop.set()
        self.thread.join(timeout=10)
        try:
            return int(struct.unpack("II", self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))[1])
        finally:
            self.sock.close()


def _flood(b: Pod, a: Pod, c: Pod, rounds: int) -> Counter[str]:
    """`rounds` times an RA to ff02::1 (the kernel's raw ICMPv6 socket, hop limit 255) and each
    UDP kind (a packet socket), from b's netns; returns what was sent, by kind."""
    sent: Counter[str] = Counter()
    rng = random.Random(30)
    advertisement = router_advertisement(b.mac)
    with in_netns(b.netns, packet_socket) as frames:
        ra, index = in_netns(b.netns, ra_sender)
        with ra:
            for n in range(rounds):
                ra.sendto(advertisement, ("ff02::1", 0, 0, index))
                sent["router advertisement"] += 1
                for kind, (dst_mac, src, dst) in _attacks(b, a, c, rng).items():
                    frames.send(udp_frame(b.mac, dst_mac, src, dst, MARK + f"{kind}|{n}".encode()))
                    sent[kind] += 1
                if n % 20 == 19:
                    time.sleep(0.002)  # a flood, not a burst bigger than the veths' backlog
    return sent


Outcome = tuple[Counter[str], dict[str, Counter[str]], dict[str, int], float, tuple[list[str], list[object]]]


def _run(host: Host, defended: bool) -> Outcome:
    """What b sent, what a and c counted, their sockets' drops, the flood's seconds, and a's
    addresses in the RA's prefix and IPv6 default routes after it."""
    conf = dual_stack(host, name="hostile", bridge="br-hostile", sourceCheck=defended)
    pods = make_pods(host, conf, ("a", "b", "c"))
    a, b, c = pods["a"], pods["b"], pods["c"]
    world = World({f"x/{n}": p.netns for n, p in pods.items()},
                  {f"x/{n}": {4: p.v4, 6: p.v6} for n, p in pods.items()}, subnet=str(SUBNET_V4), host=host)
    agent = node_agent(world)
    agent.handle("Namespace", "SYNC", [{"metadata": {"name": "x"}}])
    agent.handle("ClusterNetworkPolicy", "SYNC", [])
    agent.handle("Pod", "SYNC", [world.pod_object(p) for p in world.netns])
    agent.handle("NetworkPolicy", "SYNC",
                 [ns_policy("x", "deny-all", {"podSelector": POD_A})] if defended else [])
    assert agent.reconcile()
    counters: dict[str, Counting] = {}
    dropped: dict[str, int] = {}
    try:
        for name, pod in (("a", a), ("c", c)):
            counters[name] = Counting(pod)
        started = time.monotonic()
        sent = _flood(b, a, c, scale(30, 3000))
        seconds = time.monotonic() - started
        time.sleep(1.0)  # what is on its way arrives
    finally:
        for name, counter in counters.items():
            dropped[name] = counter.close()
        apply.remove(world.nft())
    return sent, {n: k.seen for n, k in counters.items()}, dropped, seconds, router_state(host, a)


@pytest.mark.parametrize("defended", [True, False], ids=["defended", "control"])
def test_a_hostile_pods_flood_never_reaches_an_isolated_pod(make_host: HostFactory, defended: bool) -> None:
    host = make_host(tag="hostile")
    host.exec("sh", "-c", "; ".join(f"echo 1 > /proc/sys/{name}" for name in apply.BRIDGE_SYSCTLS))
    sent, seen, dropped, seconds, victim_router = _run(host, defended)
    record(f"hostile_pod[{'defended' if defended else 'control'}]", sent=sum(sent.values()),
           sent_by_kind=dict(sent), received_by_victim=dict(seen["a"]), received_by_peer=dict(seen["c"]),
           socket_drops=dropped, flood_seconds=round(seconds, 2))
    assert dropped == {"a": 0, "c": 0}, dropped  # the counts are whole
    assert victim_router == ([], [])  # no SLAAC address, no default route from the RAs
    if defended:
        assert sum(seen["a"].values()) == 0, dict(seen["a"])
        # the counting works in this very run: c, open, gets b's genuine broadcasts and no forgery
        assert set(seen["c"]) >= FLOODED, dict(seen["c"])
        assert not [k for k in seen["c"] if k.startswith("forged")], dict(seen["c"])
    else:
        assert seen["a"] == sent, dict(seen["a"])  # every frame reaches an open pod
