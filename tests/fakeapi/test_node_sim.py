"""Three simulated Kubernetes nodes: the node controller's routes and masquerade in real kernels.

world (a throw-away netns standing in for the docker host): bridge `dockernet` 172.30.0.1/24
and an "internet" address 203.0.113.10 on its lo; it has no route to the pod CIDRs.
node1..3 (netns): eth0 on that bridge (172.30.0.11-13, MTU 1400), default via 172.30.0.1.
Each node runs `pybridge node run --nodes-file` (the reconcile of the DaemonSet's agent, fed
the same Node objects the API would give) and then pybridge from the conflist it wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed.harness import BUSYBOX, Host, delete_netns, new_netns, sh

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

CLUSTER = "10.70.0.0/16"
OUTSIDE = "203.0.113.10"
MTU = 1400
SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7070)); s.listen(1); print("ready", flush=True)
s.settimeout(20); c, peer = s.accept(); c.sendall(peer[0].encode()); c.close()
"""
CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 7070), timeout=5); print(c.recv(100).decode())
"""


@dataclass
class SimNode:
    name: str
    netns: str
    ip: str
    pod_cidr: str
    host: Host
    conf_dir: Path

    def reconcile(self, nodes_file: Path) -> subprocess.CompletedProcess[bytes]:
        return sh(
            "ip",
            "netns",
            "exec",
            self.netns,
            sys.executable,
            "-m",
            "cni_plugin",
            "node",
            "run",
            "--node-name",
            self.name,
            "--nodes-file",
            str(nodes_file),
            "--cni-conf-dir",
            str(self.conf_dir),
            "--ipam-data-dir",
            str(self.conf_dir / "ipam"),
            "--cluster-cidr",
            CLUSTER,
            check=False,
        )

    def routes(self) -> set[tuple[str, str]]:
        out = json.loads(sh("ip", "-n", self.netns, "-j", "route", "show", "proto", "91").stdout)
        return {(r["dst"], r["gateway"]) for r in out}

    def conflist(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.conf_dir / "10-pybridge.conflist").read_text())
        return data

    def plugin_conf(self) -> dict[str, Any]:
        conflist = self.conflist()
        return {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **conflist["plugins"][0]}


def node_object(name: str, ip: str, cidr: str | None) -> dict[str, Any]:
    spec = {"podCIDR": cidr, "podCIDRs": [cidr]} if cidr else {}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "spec": spec,
        "status": {
            "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]
        },
    }


def write_nodes(path: Path, nodes: list[SimNode]) -> Path:
    path.write_text(
        json.dumps(
            {
                "kind": "NodeList",
                "apiVersion": "v1",
                "items": [node_object(n.name, n.ip, n.pod_cidr) for n in nodes],
            }
        )
    )
    return path


class World(list[SimNode]):
    netns = ""


@pytest.fixture
def world(tmp_path: Path, launchers: Path) -> Iterator[World]:
    made: list[str] = []
    nodes = World()
    try:
        w = nodes.netns = new_netns("world")
        made.append(w)
        for cmd in (
            ["link", "set", "lo", "up"],
            ["link", "add", "dockernet", "type", "bridge"],
            ["addr", "add", "172.30.0.1/24", "dev", "dockernet"],
            ["link", "set", "dockernet", "up"],
            ["addr", "add", f"{OUTSIDE}/32", "dev", "lo"],
        ):
            sh("ip", "-n", w, *cmd)
        for i in (1, 2, 3):
            ns = new_netns(f"node{i}")
            made.append(ns)
            ip = f"172.30.0.{10 + i}"
            sh(
                "ip",
                "-n",
                w,
                "link",
                "add",
                f"veth-n{i}",
                "mtu",
                str(MTU),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
                "mtu",
                str(MTU),
            )
            sh("ip", "-n", w, "link", "set", f"veth-n{i}", "master", "dockernet", "up")
            for cmd in (
                ["link", "set", "lo", "up"],
                ["addr", "add", f"{ip}/24", "dev", "eth0"],
                ["link", "set", "eth0", "up"],
                ["route", "add", "default", "via", "172.30.0.1"],
            ):
                sh("ip", "-n", ns, *cmd)
            host = Host(
                name=ns,
                data_dir=tmp_path / f"node{i}" / "ipam",
                bin_dir=launchers,
                agent_socket=tmp_path / "no-agent.sock",
            )
            nodes.append(SimNode(f"sim-node{i}", ns, ip, f"10.70.{i}.0/24", host, tmp_path / f"node{i}"))
        yield nodes
    finally:
        for node in nodes:
            for pod in node.host.pods:
                delete_netns(pod)
        for ns in reversed(made):
            delete_netns(ns)


def serve(netns: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", SERVER],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", proc.stderr
    return proc


def peer_seen_by(server_ns: str, client_ns: str, address: str) -> str:
    """Connect from client_ns to address:7070 served in server_ns; the source address the server saw."""
    server = serve(server_ns)
    try:
        out = sh("ip", "netns", "exec", client_ns, sys.executable, "-c", CLIENT, address, check=False)
        assert out.returncode == 0, out.stderr
        return out.stdout.decode().strip()
    finally:
        server.kill()
        server.wait(timeout=10)


def ping(netns: str, address: str) -> bool:
    return (
        sh(
            "ip", "netns", "exec", netns, BUSYBOX, "ping", "-c", "1", "-W", "2", address, check=False
        ).returncode
        == 0
    )


def test_three_nodes_pods_route_and_masquerade(world: World, tmp_path: Path) -> None:
    nodes_file = write_nodes(tmp_path / "nodes.json", world)
    for node in world:
        proc = node.reconcile(nodes_file)
        assert proc.returncode == 0, proc.stderr
        others = {(n.pod_cidr, n.ip) for n in world if n is not node}
        assert node.routes() == others
        conflist = node.conflist()
        assert conflist["cniVersion"] == "1.0.0"  # no runtime in these Node objects: the safe default
        assert [p["type"] for p in conflist["plugins"]] == ["pybridge", "portmap"]
        assert conflist["plugins"][0]["mtu"] == MTU  # from the uplink holding the InternalIP
        assert conflist["plugins"][0]["ipam"]["ranges"] == [[{"subnet": node.pod_cidr}]]
        assert (
            "pybridge_node" in sh("ip", "netns", "exec", node.netns, "nft", "list", "tables").stdout.decode()
        )

    pods = {}
    for node in world:
        pod = new_netns("simpod")
        node.host.pods.append(pod)  # deleted by the fixture
        result = node.host.add(node.plugin_conf(), pod)
        pods[node.name] = (pod, result["ips"][0]["address"].split("/")[0])

    pod1, ip1 = pods["sim-node1"]
    for other in ("sim-node2", "sim-node3"):
        pod, ip = pods[other]
        assert ping(pod1, ip), f"pod on node1 cannot reach the pod on {other} ({ip})"
        # pod to pod across nodes keeps the pod's address (no masquerade inside the cluster)
        assert peer_seen_by(pod, pod1, ip) == ip1

    # outside the cluster: the world has no route to the pods, so only masquerade makes this work
    assert ping(pod1, OUTSIDE)
    assert peer_seen_by(world.netns, pod1, OUTSIDE) == "172.30.0.11"

    # a second reconcile with nothing new changes nothing (file not even rewritten)
    conflist_path = world[0].conf_dir / "10-pybridge.conflist"
    before = conflist_path.stat().st_mtime_ns
    assert world[0].reconcile(nodes_file).returncode == 0
    assert conflist_path.stat().st_mtime_ns == before

    # node3 leaves: node1 drops its route, keeps node2's
    remaining = write_nodes(tmp_path / "nodes-2.json", world[:2])
    assert world[0].reconcile(remaining).returncode == 0
    assert world[0].routes() == {(world[1].pod_cidr, world[1].ip)}
    assert not ping(pod1, pods["sim-node3"][1])
    assert ping(pod1, pods["sim-node2"][1])


def test_own_node_without_podcidr_writes_nothing(world: World, tmp_path: Path) -> None:
    nodes_file = tmp_path / "nodes.json"
    items = [node_object(n.name, n.ip, n.pod_cidr if n is not world[0] else None) for n in world]
    nodes_file.write_text(json.dumps({"kind": "NodeList", "items": items}))
    proc = world[0].reconcile(nodes_file)
    assert proc.returncode == 3 and b"no podCIDRs" in proc.stderr
    assert not world[0].conf_dir.exists()
    assert world[0].routes() == set()
    assert (
        "pybridge_node"
        not in sh("ip", "netns", "exec", world[0].netns, "nft", "list", "tables").stdout.decode()
    )
