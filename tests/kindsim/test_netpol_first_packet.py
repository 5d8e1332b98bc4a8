"""Issue 28 point 2 across the simulated cluster: pods started by the kubelet stand-in through
containerd into a default-deny namespace pass no packet the policy forbids, from the moment their
sandbox exists (docs/networkpolicy.md#new-pods-closed-from-the-first-packet).

A prober pod in a namespace without policy, on the same node, sends UDP to every address of the
node's podCIDR every few ms; a watcher opens a socket in each new pod netns the moment its pin
appears (before the ADD finished) and sends to the prober from it. A packet socket in the node
netns sees every frame the bridge hands to a pod's veth: none may carry the prober's datagrams
into a new pod, nor a new pod's datagrams to the prober. A pod started last in a namespace without
policy does receive the prober's: the counting sees what passes. PYBRIDGE_FIRST_PACKET_PODS pods
(default 30; the issue asks 200, which takes this 2-vCPU machine too long for `make test`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from ..netns.netpol_probe import in_netns
from .cluster import Cluster
from .kubelet import Pod

pytestmark = pytest.mark.kindsim

PODS = int(os.environ.get("PYBRIDGE_FIRST_PACKET_PODS", "30"))
PORT = 7
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4


def _repeat(stop: threading.Event, step: Callable[[], None], pause: float) -> threading.Thread:
    def run() -> None:
        while not stop.is_set():
            step()
            time.sleep(pause)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _send(sock: socket.socket, targets: list[str]) -> None:
    for target in targets:
        with contextlib.suppress(OSError):  # no address or route yet: the next round tries again
            sock.sendto(b"probe", (target, PORT))


class Delivered:
    """Frames the node hands to a pod (out of a veth): (source, destination) of UDP to PORT."""

    def __init__(self, netns: str) -> None:
        self.seen: Counter[tuple[str, str]] = Counter()
        self.sock = in_netns(netns, lambda: socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM,
                                                          socket.htons(ETH_P_IP)))
        self.sock.settimeout(0.2)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                data, (ifname, _proto, pkttype, *_rest) = self.sock.recvfrom(256)
            except TimeoutError:
                continue
            if pkttype != PACKET_OUTGOING or not ifname.startswith("veth") or len(data) < 24 or data[9] != 17:
                continue
            header = (data[0] & 0x0F) * 4
            if len(data) >= header + 4 and struct.unpack("!H", data[header + 2:header + 4])[0] == PORT:
                self.seen[(socket.inet_ntoa(data[12:16]), socket.inet_ntoa(data[16:20]))] += 1


def test_pods_started_into_a_default_deny_namespace_pass_nothing_forbidden(cluster: Cluster) -> None:
    cluster.wait_ready()
    node_name = sorted(cluster.nodes)[0]
    node, store = cluster.nodes[node_name], cluster.store
    assert store is not None
    cidr = ipaddress.ip_network(cluster.pod_cidr(node_name))
    for ns in ("fp-deny", "fp-open"):
        cluster.add_namespace(ns)
    store.put("networkpolicies", {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                                  "metadata": {"name": "deny-all", "namespace": "fp-deny"},
                                  "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}})
    started: list[Pod] = []
    stop = threading.Event()
    threads: list[threading.Thread] = []
    sockets: list[socket.socket] = []
    inside: list[socket.socket] = []  # one per new pod netns, sending to the prober
    pins = node.node_path("/var/run/netns")
    known = set(os.listdir(pins))
    try:
        prober = cluster.run_pod(node_name, "prober", namespace="fp-open")
        started.append(prober)
        prober_pid = cluster.kubelets[node_name].cri.pod_status(prober.id)["info"]["pid"]
        out = in_netns(f"/proc/{prober_pid}/ns/net", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sockets.append(out)
        delivered = Delivered(f"/run/netns/{node.netns}")
        sockets.append(delivered.sock)
        threads.append(threading.Thread(target=delivered.run, args=(stop,), daemon=True))
        threads[-1].start()
        targets = [str(a) for a in cidr.hosts() if str(a) != prober.ip]
        threads.append(_repeat(stop, lambda: _send(out, targets), 0.005))
        def watch() -> None:
            for name in set(os.listdir(pins)) - known:
                try:
                    inside.append(in_netns(str(pins / name),
                                           lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)))
                except OSError:
                    continue  # not yet a netns bind mount: looked at again
                known.add(name)
            for sock in list(inside):
                _send(sock, [prober.ip])

        threads.append(_repeat(stop, watch, 0.002))
        time.sleep(0.5)
        pods = []
        for i in range(PODS):
            pods.append(cluster.run_pod(node_name, f"p{i}", namespace="fp-deny", labels={"pod": f"p{i}"}))
            started.append(pods[-1])
        time.sleep(1.0)
        control = cluster.run_pod(node_name, "control", namespace="fp-open")
        started.append(control)
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        for sock in [*sockets, *inside]:
            sock.close()
        for pod in started:
            cluster.delete_pod(pod)
        store.remove("networkpolicies", "fp-deny/deny-all")
        for ns in ("fp-deny", "fp-open"):
            store.remove("namespaces", ns)
    addresses = {p.ip for p in pods}
    assert len(addresses) == PODS and len(inside) >= PODS, (addresses, len(inside))
    into = {pair: n for pair, n in delivered.seen.items() if pair[0] == prober.ip and pair[1] in addresses}
    out_of = {pair: n for pair, n in delivered.seen.items() if pair[0] in addresses and pair[1] == prober.ip}
    assert not into and not out_of, f"passed that policy forbids: into new pods {into}, out of them {out_of}"
    assert delivered.seen[(prober.ip, control.ip)] > 0, "the control pod received nothing: nothing was seen"
