"""kind-sim: the image, the DaemonSet and pods on three nodes made of real parts (README "kind-sim")."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from cni_plugin.node.install import bundle_digest

from .cluster import GATEWAY, OUTSIDE_IP, Cluster
from .kubelet import Pod

pytestmark = pytest.mark.kindsim


def _events(text: str) -> list[dict[str, object]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_daemonset_installs_the_image_bundle_and_writes_the_conflist(cluster: Cluster) -> None:
    for name, node in cluster.nodes.items():
        pod = cluster.daemon_pods[name]
        installed = [e for e in _events(pod.log("install")) if e.get("event") == "installed"]
        assert installed, pod.log("install")
        bundle = node.node_path(str(installed[0]["bundle"]).removeprefix("/host"))
        # what the image's entrypoint runs is what the node got: its digest names the copy
        assert bundle.name == bundle_digest(str(bundle))
        assert node.node_path("/opt/pybridge/current").readlink().name == bundle.name
        for program in ("pybridge", "pyipam"):  # symlinks in the node's own terms
            link = node.node_path(f"/opt/cni/bin/{program}").readlink()
            assert link.parent == Path("/opt/pybridge") / bundle.name, link
        conflist = node.conflist()
        assert conflist is not None
        assert conflist["plugins"][0]["ipam"]["ranges"] == [[{"subnet": cluster.pod_cidr(name)}]]
        # containerd 1.6 here: the agent must have picked a version its libcni accepts
        assert node.runtime_version().startswith("containerd://1.")
        assert conflist["cniVersion"] == "1.0.0"
        others = {(cluster.pod_cidr(o), n.ip) for o, n in cluster.nodes.items() if o != name}
        assert node.routes() == others


def test_pods_get_addresses_from_their_node_and_reach_each_other(cluster: Cluster) -> None:
    names = list(cluster.nodes)
    pods: list[Pod] = []
    try:
        for name in names:
            for i in range(2):
                pods.append(cluster.run_pod(name, f"web-{i}", {"main": ["sleep", "3600"]}, labels={"app": "web"}))
        for pod in pods:
            assert ipaddress.ip_address(pod.ip) in ipaddress.ip_network(cluster.pod_cidr(pod.node))
        src = pods[0]
        for dst in pods[1:]:
            rc, out = cluster.exec(src, "ping", "-c", "1", "-W", "2", dst.ip)
            assert rc == 0, f"{src.node}/{src.name} -> {dst.node}/{dst.name} ({dst.ip}): {out}"
    finally:
        for pod in pods:
            cluster.delete_pod(pod)


def test_outside_through_masquerade(cluster: Cluster) -> None:
    name = next(iter(cluster.nodes))
    pod = cluster.run_pod(name, "egress")
    try:
        rc, out = cluster.exec(pod, "ping", "-c", "1", "-W", "2", OUTSIDE_IP)
        assert rc == 0, out
        rc, out = cluster.exec(pod, "ping", "-c", "1", "-W", "2", GATEWAY)
        assert rc == 0, out
    finally:
        cluster.delete_pod(pod)
