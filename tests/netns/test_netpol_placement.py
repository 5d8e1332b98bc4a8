"""A pod added while the node controller has not seen its address is isolated from its first packet
(issue 28 point 2), real kernel and nft: a node netns, pybridge's agent serving the ADDs, the
node controller's NetworkPolicy loop (agent.serve) with its claim socket where the agent looks for it.

Namespace x has a default-deny policy (Ingress and Egress); y/p, in y, has no policy. Before the
ADD of x/new, the node controller knows the pod x/new (labels, no IP: kubelet posts it after the ADD).
From before the ADD until the placement has long happened, y/p sends UDP to every address the
new pod may get, and x/new sends to y/p from a socket made in its netns before the ADD: no
datagram may arrive either way. Then a policy letting y in shows the same probes do pass.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni_plugin import placement
from cni_plugin.hostnet import NETPOL_TABLE
from cni_plugin.node.loop import Event
from cni_plugin.node.netpol import apply, bridgeports, claims, conntrack, nft, policy_controller
from cni_plugin.node.netpol.objects import parse_cidr
from testbed.harness import Host, bridge_conf, new_netns

from .netpol_probe import in_netns, node_agent, port_watch

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

SUBNET = "10.91.0.0/28"  # the new pod gets one of these; y/p gets the first
BRIDGE = "h17fp0"
NODE = "h17-node"
PORT = 80
GHOST = "10.91.0.13"  # claimed for y/ghost, on no port


def _pod(name: str, ns: str, ips: tuple[str, ...] = ()) -> dict[str, object]:
    return {"metadata": {"name": name, "namespace": ns, "labels": {"pod": name}}, "spec": {"nodeName": NODE},
            "status": {"phase": "Running", "podIPs": [{"ip": ip} for ip in ips]}}


@pytest.fixture
def host(tmp_path: Path, launchers: Path) -> Iterator[Host]:
    h = Host(name=new_netns("h17fp"), data_dir=tmp_path / "ipam", bin_dir=launchers,
             agent_socket=tmp_path / "run" / "agent.sock")
    try:
        h.exec("ip", "link", "set", "lo", "up")
        h.exec("sh", "-c", "; ".join(f"echo 1 > /proc/sys/{n}" for n in apply.BRIDGE_SYSCTLS))
        h.start_agent(tmp_path / "agent.log")
        yield h
    finally:
        h.destroy()


@pytest.fixture
def watch(host: Host) -> Iterator[bridgeports.Watch]:
    """The bridge ports followed from before the first pod, as the node controller does."""
    with port_watch(host.name) as ports:
        yield ports


def _udp(netns: str, port: int) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
        s.setblocking(False)
        return s
    return in_netns(netns, make)


def _received(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            sock.recv(64)
        except BlockingIOError:
            return count
        count += 1


def _send_until(stop: threading.Event, sock: socket.socket, targets: list[str], sent: list[int]) -> None:
    while not stop.is_set():
        for target in targets:
            try:
                sock.sendto(b"x", (target, PORT))
                sent[0] += 1
            except OSError:
                pass  # no address or route yet in the new pod: try again
        time.sleep(0.002)


def test_a_pod_added_before_the_node_agent_saw_its_address_is_closed_from_its_first_packet(
        host: Host, watch: bridgeports.Watch, tmp_path: Path) -> None:
    conf = bridge_conf(host, name="h17fp", bridge=BRIDGE, isDefaultGateway=True)
    conf["ipam"]["ranges"] = [[{"subnet": SUBNET}]]
    outside = host.new_pod()
    prober_ip = host.add(conf, outside, container_id="y-p")["ips"][0]["address"].split("/")[0]
    agent = node_agent(WorldLike(host), watch)  # type: ignore[arg-type]
    agent.fence = nft.Fence(BRIDGE, (parse_cidr("10.91.0.0/16"),))
    deny = {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    agent.handle("NetworkPolicy", "SYNC", [{"metadata": {"name": "deny", "namespace": "x"}, "spec": deny}])
    agent.handle("Namespace", "SYNC", [{"metadata": {"name": "x"}}, {"metadata": {"name": "y"}}])
    # y/ghost has no port on the bridge: a claim for it (root sends it, by mistake) places nothing
    agent.handle("Pod", "SYNC", [_pod("p", "y", (prober_ip,)), _pod("new", "x"), _pod("ghost", "y")])
    agent.handle("ClusterNetworkPolicy", "SYNC", [])
    assert agent.reconcile()
    events: queue.Queue[Event] = queue.Queue()
    stop = threading.Event()
    claim_sock = claims.bind(str(tmp_path / "run" / "netpol.sock"))  # where the agent sends claims
    loops = [threading.Thread(target=claims.receive, args=(claim_sock, events, stop, lambda *a, **k: None)),
             threading.Thread(target=policy_controller.serve, args=(agent, events, stop))]
    pod = host.new_pod()
    at_prober, at_pod = _udp(outside, PORT), _udp(pod, PORT)
    from_prober, from_pod = _udp(outside, 0), _udp(pod, 0)
    candidates = [str(a) for a in parse_cidr(SUBNET).hosts() if str(a) != prober_ip]
    sent_out, sent_in = [0], [0]
    senders = [threading.Thread(target=_send_until, args=(stop, from_prober, candidates, sent_out)),
               threading.Thread(target=_send_until, args=(stop, from_pod, [prober_ip], sent_in))]
    try:
        for thread in [*loops, *senders]:
            thread.start()
        assert placement.announce(placement.Claim(namespace="y", name="ghost", ips=(GHOST,)),  # type: ignore[arg-type]
                                  str(tmp_path / "run" / "netpol.sock"))
        time.sleep(0.2)
        reply = host.cni("ADD", conf, pod, container_id="x-new",
                         env={"CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=new"})
        assert reply.ok, reply.stdout
        new_ip = reply.out["ips"][0]["address"].split("/")[0]  # type: ignore[index]
        deadline = time.monotonic() + 10
        while new_ip not in (agent.applied or "") and time.monotonic() < deadline:
            time.sleep(0.01)
        placed = new_ip in (agent.applied or "")
        ghost = _placed(agent, GHOST)
        time.sleep(0.5)  # under its policy now: still nothing may pass
        forbidden = (_received(at_pod), _received(at_prober))
        sent = (sent_out[0], sent_in[0])
        # The probes can pass: let y in and x out, as a policy
        events.put(("NetworkPolicy", "ADDED", {"metadata": {"name": "open", "namespace": "x"}, "spec": {
            "podSelector": {}, "policyTypes": ["Ingress", "Egress"], "ingress": [{}], "egress": [{}]}}))
        deadline = time.monotonic() + 10
        while '"x/open"' not in (agent.applied or "") and time.monotonic() < deadline:
            time.sleep(0.01)
        allowed = [0, 0]  # ARP may have given up on the new address meanwhile: it retries within 1 s
        deadline = time.monotonic() + 5
        while not all(allowed) and time.monotonic() < deadline:
            time.sleep(0.05)
            allowed = [allowed[0] + _received(at_pod), allowed[1] + _received(at_prober)]
    finally:
        stop.set()
        for thread in [*loops, *senders]:
            thread.join(timeout=10)
        for s in (at_prober, at_pod, from_prober, from_pod):
            s.close()
        apply.remove(["ip", "netns", "exec", host.name, "nft"])
    assert sent[0] > 100 and sent[1] > 100, sent
    assert forbidden == (0, 0), f"passed that policy forbids (into, out of the new pod): {forbidden}"
    assert placed, "the ADD's claim did not place the pod"
    assert not ghost, f"a claim placed y/ghost at {GHOST}, no port of the bridge has it"
    assert allowed[0] > 0 and allowed[1] > 0, allowed


class WorldLike:
    """What netpol_probe.node_agent reads of a world: the node netns and its nft."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def nft(self) -> list[str]:
        return ["ip", "netns", "exec", self.host.name, "nft"]


REUSED = "10.91.1.3"  # the range below has two addresses: the prober's and the one pods take turns at


def _placed(agent: policy_controller.PolicyController, address: str) -> bool:
    """Whether the ruleset in force has `address` in its set placed4."""
    placed = (agent.applied or "").split("set placed4 {", 1)[-1].split("}", 1)[0]
    return address in placed.replace(",", " ").split()


def _quiet(count: Counter[bytes], still: float, timeout: float) -> bool:
    """Whether `count` stopped changing for `still` seconds within `timeout`."""
    deadline = time.monotonic() + timeout
    seen, since = count.total(), time.monotonic()
    while time.monotonic() < deadline:
        if time.monotonic() - since >= still:
            return True
        time.sleep(0.02)
        if count.total() != seen:
            seen, since = count.total(), time.monotonic()
    return False


def _exchange(stop: threading.Event, sock: socket.socket, peer: tuple[str, int], tag: bytes,
              got: Counter[bytes]) -> None:
    """Send `tag` to `peer` from `sock` every 2 ms and count what `sock` receives, by sender's tag."""
    while not stop.is_set():
        with contextlib.suppress(OSError):  # no address or route yet: the next round tries again
            sock.sendto(tag, peer)
        while True:
            try:
                got[sock.recv(64)] += 1
            except BlockingIOError:
                break
        time.sleep(0.002)


def test_a_new_pod_at_the_address_of_a_deleted_one_gets_none_of_its_conversations(
        host: Host, watch: bridgeports.Watch, tmp_path: Path) -> None:
    """y/p and y/old talk UDP (y/p:5000 <-> y/old:80; an established conntrack entry). y/old is
    deleted while y/p goes on sending, and x/new, under default deny, gets its address: nothing
    of that conversation may reach x/new or come from it, not before its placement (the
    established entry used to be accepted before the fence) nor after (before the policy). The
    node controller sees x/new's object only a second after its ADD, so its claim waits meanwhile."""
    conf = bridge_conf(host, name="h17re", bridge=BRIDGE, isDefaultGateway=True)
    conf["ipam"]["ranges"] = [[{"subnet": "10.91.1.0/29", "rangeStart": "10.91.1.2", "rangeEnd": REUSED}]]
    outside, old, new = host.new_pod(), host.new_pod(), host.new_pod()
    prober_ip = host.add(conf, outside, container_id="y-p")["ips"][0]["address"].split("/")[0]
    assert host.add(conf, old, container_id="y-old")["ips"][0]["address"] == f"{REUSED}/29"
    agent = node_agent(WorldLike(host), watch)  # type: ignore[arg-type]
    agent.fence = nft.Fence(BRIDGE, (parse_cidr("10.91.0.0/16"),))
    agent.forget = lambda addresses: in_netns(host.name, lambda: conntrack.forget(addresses))
    deny = {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    agent.handle("NetworkPolicy", "SYNC", [{"metadata": {"name": "deny", "namespace": "x"}, "spec": deny}])
    agent.handle("Namespace", "SYNC", [{"metadata": {"name": "x"}}, {"metadata": {"name": "y"}}])
    agent.handle("Pod", "SYNC", [_pod("p", "y", (prober_ip,)), _pod("old", "y", (REUSED,))])
    agent.handle("ClusterNetworkPolicy", "SYNC", [])
    assert agent.reconcile()
    events: queue.Queue[Event] = queue.Queue()
    stop = threading.Event()
    claim_sock = claims.bind(str(tmp_path / "run" / "netpol.sock"))
    loops = [threading.Thread(target=claims.receive, args=(claim_sock, events, stop, lambda *a, **k: None)),
             threading.Thread(target=policy_controller.serve, args=(agent, events, stop))]
    client, server = _udp(outside, 5000), _udp(old, PORT)
    fresh = _udp(new, PORT)  # x/new's, made before its ADD
    # each tells its sender: y/p "p", y/old "old", x/new "new"
    at_client: Counter[bytes] = Counter()
    at_server: Counter[bytes] = Counter()
    at_new: Counter[bytes] = Counter()
    threads = [threading.Thread(target=_exchange, args=(stop, client, (REUSED, PORT), b"p", at_client)),
               threading.Thread(target=_exchange, args=(stop, server, (prober_ip, 5000), b"old", at_server))]
    new_threads = [threading.Thread(target=_exchange, args=(stop, fresh, (prober_ip, 5000), b"new", at_new))]
    try:
        for thread in [*loops, *threads]:
            thread.start()
        deadline = time.monotonic() + 10
        while not (at_client[b"old"] > 10 and at_server[b"p"] > 10) and time.monotonic() < deadline:
            time.sleep(0.01)
        talked = (at_client[b"old"], at_server[b"p"])
        # y/old goes (DEL, then its API object) while y/p goes on sending; x/new gets its address
        assert host.cni("DEL", conf, old, container_id="y-old").ok
        events.put(("Pod", "DELETED", _pod("old", "y", (REUSED,))))
        deadline = time.monotonic() + 10
        while _placed(agent, REUSED) and time.monotonic() < deadline:
            time.sleep(0.01)
        host.pod_exec(outside, "ip", "neigh", "flush", "dev", "eth0")  # y/p resolves the address anew
        # what y/old sent while its address was placed may still be unread (its veth goes after
        # DEL's answer): y/p's count must stop before it counts x/new's
        assert _quiet(at_client, 0.3, 5), "y/p kept receiving from the address once it was unplaced"
        for thread in new_threads:
            thread.start()
        at_client.clear()
        reply = host.cni("ADD", conf, new, container_id="x-new",
                         env={"CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=new"})
        assert reply.ok, reply.stdout
        assert reply.out["ips"][0]["address"] == f"{REUSED}/29"  # type: ignore[index]
        time.sleep(1.0)  # not placed: its claim waits for the pod's object
        before = (dict(at_new), dict(at_client))
        # what the kernel held then, for a failure's message: the agent's own view is `applied`
        in_kernel = host.exec("nft", "list", "set", "inet", NETPOL_TABLE, "placed4", check=False).stdout
        events.put(("Pod", "ADDED", _pod("new", "x")))  # no IP yet: placed by the claim
        deadline = time.monotonic() + 10
        while '"x/deny"' not in (agent.applied or "") or f"{REUSED} : jump" not in (agent.applied or ""):
            assert time.monotonic() < deadline, "x/new was never placed"
            time.sleep(0.01)
        time.sleep(1.5)  # placed, under default deny
        after = (dict(at_new - Counter(before[0])), dict(at_client - Counter(before[1])))
    finally:
        stop.set()
        for thread in [*loops, *threads, *new_threads]:
            if thread.ident is not None:
                thread.join(timeout=10)
        for s in (client, server, fresh):
            s.close()
        apply.remove(["ip", "netns", "exec", host.name, "nft"])
    assert talked[0] > 10 and talked[1] > 10, f"y/p and y/old never talked: {talked}"
    # by sender: what reached x/new, what reached y/p
    assert before == ({}, {}), (f"passed before x/new was placed (into it, out of it): {before}; "
                                f"the kernel's placed4 then: {in_kernel.decode()!r}")
    assert after == ({}, {}), f"passed once x/new was placed under default deny (into it, out of it): {after}"
