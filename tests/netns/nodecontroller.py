"""The whole node controller (`pybridge node run`, a process of its own) in a node netns: pods x/a,
y/a, z/a on its bridge serving UDP and TCP on ports 80 and 81, and a fake API server (plain HTTP
on the node's loopback, tests/fakeapi/apiserver.py) with the node, the pods, their namespaces and
whatever NetworkPolicies a test puts there.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cni_plugin.node.netpol.nft import TABLE
from testbed.harness import Host, new_netns

from ..fakeapi.apiserver import ApiServer, NodeStore
from .netpol_cases import NODE, Pods, World
from .netpol_probe import Servers, client, in_netns, pods_on_bridge, probe

PODS = ["x/a", "y/a", "z/a"]
METRICS_PORT = 19431  # the node controller's, inside the node netns
TOKEN = "node-controller-test"


@dataclass
class NodeWorld(World):
    store: NodeStore = field(default_factory=lambda: NodeStore("10.89.0.0/16"))
    kubeconfig: Path = Path()
    tmp: Path = Path()
    agent: subprocess.Popen[bytes] | None = None
    runs: int = 0

    def log(self) -> str:
        return (self.tmp / f"node-controller-{self.runs}.log").read_text()

    def start(self) -> subprocess.Popen[bytes]:
        """A new node controller process, its log in node-controller-N.log."""
        assert self.host is not None
        self.runs += 1
        with open(self.tmp / f"node-controller-{self.runs}.log", "wb") as log:
            self.agent = subprocess.Popen(
                ["ip", "netns", "exec", self.host.name, sys.executable, "-m", "cni_plugin", "node", "run",
                 "--node-name", NODE, "--kubeconfig", str(self.kubeconfig), "--cluster-cidr", "10.89.0.0/16",
                 "--cni-conf-dir", str(self.tmp / "net.d"), "--cni-bin-dir", str(self.tmp / "bin"),
                 "--bridge", "h29np0", "--ipam-data-dir", str(self.tmp / "ipam"), "--resync", "30",
                 "--metrics-address", f"127.0.0.1:{METRICS_PORT}"],
                stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYBRIDGE_HEALTH_ADDRESS": "off"})
        return self.agent

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, float]:
        """(exit code, seconds from the signal to the exit)."""
        assert self.agent is not None
        started = time.monotonic()
        self.agent.send_signal(signum)
        code = self.agent.wait(timeout=timeout)
        self.agent = None
        return code, time.monotonic() - started

    def logged(self, event: str) -> list[dict[str, Any]]:
        """The fields of each `event` the running (or last) agent logged."""
        lines = (json.loads(line) for line in self.log().splitlines() if line.startswith("{"))
        return [line for line in lines if line.get("event") == event]

    def wait_logged(self, event: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.logged(event):
            assert self.agent is not None and self.agent.poll() is None, self.log()
            assert time.monotonic() < deadline, f"no {event} within {timeout}s: {self.log()}"
            time.sleep(0.1)

    def table(self) -> str:
        """The netpol inet table as nft lists it ('' when absent)."""
        assert self.host is not None
        return self.host.exec("nft", "list", "table", "inet", TABLE, check=False).stdout.decode()

    def put(self, resource: str, obj: dict[str, Any]) -> None:
        self.store.put(resource, obj)


def _kubeconfig(path: Path, port: int) -> Path:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "t", "user": {"token": TOKEN}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
    }))
    return path


def _listen() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


@contextlib.contextmanager
def node_world(tmp: Path, launchers: Path) -> Iterator[NodeWorld]:
    """The node netns, its pods and API; the node controller is started by the test (and killed
    after it, if still running)."""
    host = Host(name=new_netns("h29node"), data_dir=tmp / "pods-ipam", bin_dir=launchers,
                agent_socket=tmp / "a.sock")
    servers, api, world = None, None, None
    try:
        netns, ips = pods_on_bridge(host, PODS, "h29node", "h29np0")
        servers = Servers(netns)
        (tmp / "bin").mkdir()
        world = NodeWorld(netns, ips, host=host, tmp=tmp)
        world.store.add(NODE, "10.0.0.1")
        for ns in "xyz":
            world.put("namespaces", {"metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}}})
        for pod in PODS:
            world.put("pods", world.pod_object(pod))
        api = ApiServer(world.store, in_netns(host.name, _listen), None, None, TOKEN)
        world.kubeconfig = _kubeconfig(tmp / "kubeconfig", api.httpd.socket.getsockname()[1])
        yield world
    finally:
        if world is not None and world.agent is not None:
            world.agent.kill()
            world.agent.wait()
        if api is not None:
            api.close()
        if servers is not None:
            servers.close()
        host.destroy()


class Flood:
    """UDP datagrams from `source` to `target` port 80, one every millisecond, from the block's
    start to its end; `sent` and `answered` (each answer got through the rules)."""

    def __init__(self, world: Pods, source: str, target: str) -> None:
        self.address = world.ips[target][4]
        self.socks = in_netns(world.netns[source], lambda: [client("UDP", self.address) for _ in range(4)])
        self.sent = self.answered = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="flood")

    def _run(self) -> None:
        while not self.done.is_set():
            for s in self.socks:
                with contextlib.suppress(OSError):
                    s.sendto(b"ping", (self.address, 80))
                    self.sent += 1
            readable, _, _ = select.select(self.socks, [], [], 0.001)
            for s in readable:
                with contextlib.suppress(OSError):
                    self.answered += bool(s.recv(64))

    def __enter__(self) -> Flood:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        time.sleep(0.2)  # answers still on their way
        self.done.set()
        self.thread.join()
        for s in self.socks:
            s.close()


def reached(world: World, source: str, target: str) -> bool:
    """Does a UDP datagram from `source` to `target` port 80 get its answer within 2 s?"""
    address = world.ips[target][4]
    return probe([(world.netns[source], address)], "UDP", 80, 2.0)[(world.netns[source], address)]
