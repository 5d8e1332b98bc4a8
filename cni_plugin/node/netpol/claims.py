"""The addresses ADDs announced for this node's pods (cni_plugin/placement.py), until the API shows them.

A new pod is isolated until the node controller places it (nft.Fence). Its IPs reach the API only
after its ADD returned, so the ADD announces them on a root-only datagram socket; the pod's
labels come from the watch, and the pod is placed with the claimed addresses that the node controller
finds on the pod side of a port of its bridge (a claim's word alone places nothing). The API's
addresses win once it has them. A claim for a pod not (yet) seen waits for it, at most TTL
seconds; at most MAX claims are kept (the oldest go first): a claim that went leaves its
address isolated, never open.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping

from ... import placement
from ..loop import Event, Log
from .objects import Address, Pod, PodIP, PodStatus

Key = tuple[str, str]
TTL = 300.0
MAX = 1024


class Claims:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.by_pod: dict[Key, tuple[placement.Claim, float]] = {}

    def add(self, claim: placement.Claim) -> None:
        key = (claim.namespace, claim.name)
        self.by_pod.pop(key, None)
        self.by_pod[key] = (claim, self.clock())
        while len(self.by_pod) > MAX:
            del self.by_pod[next(iter(self.by_pod))]

    def forget(self, key: Key) -> None:
        self.by_pod.pop(key, None)

    def pods(self, pods: Mapping[Key, Pod], node_name: str,
             on_bridge: Collection[Address] | None = None) -> Iterable[Pod]:
        """The pods, each local one the API shows without addresses given its claimed ones, of
        those `on_bridge` (the addresses found on the pod side of the bridge's ports; None: all).
        Claims the API made moot (addresses shown, another node, finished) or too old are dropped."""
        now = self.clock()
        for key, (_claim, since) in list(self.by_pod.items()):
            pod = pods.get(key)
            if pod is None:
                if now - since > TTL:
                    del self.by_pod[key]
            elif pod.spec.node_name != node_name or pod.status.pod_ips or pod.status.pod_ip \
                    or pod.status.phase in ("Succeeded", "Failed"):
                del self.by_pod[key]
        claimed = {key: claim for key, (claim, _) in self.by_pod.items() if key in pods}
        for key, pod in pods.items():
            claim = claimed.get(key)
            if claim is None:
                yield pod
            else:
                ips = [ip for ip in claim.ips if on_bridge is None or ip in on_bridge]
                status = PodStatus(phase=pod.status.phase, podIPs=tuple(PodIP(ip=ip) for ip in ips))
                yield pod.model_copy(update={"status": status})


def bind(path: str) -> socket.socket:
    """The node controller's claim socket, root only (0600); a stale one is replaced."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.settimeout(0.5)  # to see `stop`
    return sock


def receive(sock: socket.socket, events: queue.Queue[Event], stop: threading.Event, log: Log) -> None:
    """Each datagram read as a claim into the events, as ("Claim", "ADDED", claim), until `stop`;
    what is not a claim is logged and dropped."""
    with sock:
        while not stop.is_set():
            try:
                data = sock.recv(placement.MAX_DATAGRAM)
            except TimeoutError:
                continue
            except OSError as exc:
                log("netpol-warning", error=f"claim socket: {exc}"[:300])
                stop.wait(1.0)
                continue
            try:
                events.put(("Claim", "ADDED", placement.read(data)))
            except ValueError as exc:
                log("netpol-refused", kind="Claim", object="-", field="datagram", error=str(exc)[:300],
                    kept=False)
