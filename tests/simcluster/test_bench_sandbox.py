"""kind-sim measurement: CRI RunPodSandbox with pybridge against the reference bridge + host-local,
on the same nodes in the same run (docs/kubernetes.md "kind-sim"). It records the figures, asserting only
that every pod got an address from its plugin: speed is reported, never a pass/fail condition.
"""

from __future__ import annotations

import ipaddress
import json
import os
import statistics
from typing import Any

import pytest

from testbed.node import wait_for, write_json_atomically

from .cluster import Cluster, KindNode
from .conftest import record
from .image import REPO
from .kubelet import Pod

pytestmark = pytest.mark.kindsim

PODS_PER_NODE = int(os.environ.get("PYBRIDGE_KINDSIM_PODS", "30"))
RESULTS = REPO / "build" / "kind-sim" / "results.json"
REFERENCE_FILE = "00-reference.conflist"  # sorts first: containerd (max_conf_num 1) loads it instead


def reference_conflist(subnet: str) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "reference",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni-ref0",
                "isGateway": True,
                "isDefaultGateway": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": "/run/cni-ref-ipam",
                    "ranges": [[{"subnet": subnet}]],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
        ],
    }


def _percentile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, round(q * (len(values) - 1)))]


def _round(cluster: Cluster, name: str, subnet: str, label: str) -> list[float]:
    kubelet = cluster.kubelets[name]
    pods: list[Pod] = []
    try:
        for i in range(PODS_PER_NODE):
            pods.append(kubelet.run_pod(f"{label}-{i}", {"containers": []}))
        addresses = {ipaddress.ip_address(p.ip) for p in pods}
        assert len(addresses) == len(pods) and all(a in ipaddress.ip_network(subnet) for a in addresses)
        return [p.run_seconds for p in pods]
    finally:
        for pod in pods:
            kubelet.delete_pod(pod)


def _reference_loaded(cluster: Cluster, name: str, subnet: str) -> bool:
    pod = cluster.kubelets[name].run_pod("probe", {"containers": []})
    cluster.delete_pod(pod)
    return ipaddress.ip_address(pod.ip) in ipaddress.ip_network(subnet)


def test_run_pod_sandbox_latency_against_the_reference(cluster: Cluster) -> None:
    figures: dict[str, dict[str, float]] = {}
    times: dict[str, list[float]] = {"pybridge": [], "reference": []}
    for index, (name, node) in enumerate(cluster.nodes.items()):
        ref_subnet = f"10.72.{index}.0/24"  # beside podSubnet: the reference gets its own bridge
        conf = node.node_path(f"/etc/cni/net.d/{REFERENCE_FILE}")
        write_json_atomically(conf, reference_conflist(ref_subnet))
        try:
            wait_for(
                lambda n=name, s=ref_subnet: _reference_loaded(cluster, n, s), 20, "the reference conflist"
            )
            times["reference"] += _round(cluster, name, ref_subnet, "ref")
        finally:
            conf.unlink()
        wait_for(
            lambda n=name, s=ref_subnet: not _reference_loaded(cluster, n, s), 20, "pybridge's conflist again"
        )
        times["pybridge"] += _round(cluster, name, cluster.pod_cidr(name), "pyb")
        _remove_reference_bridge(node)
    for plugin, values in times.items():
        figures[plugin] = {
            "pods": len(values),
            "p50_ms": 1000 * statistics.median(values),
            "p95_ms": 1000 * _percentile(values, 0.95),
        }
    figures["ratio_p50"] = {
        "pybridge/reference": figures["pybridge"]["p50_ms"] / figures["reference"]["p50_ms"]
    }
    record(
        RESULTS,
        cluster.runtime.id,
        {
            "run_pod_sandbox": figures,
            "nodes": len(cluster.nodes),
            "pods_per_node": PODS_PER_NODE,
            "machine": os.uname().nodename,
            "cpus": os.cpu_count(),
        },
    )
    print(f"\nRunPodSandbox on {cluster.runtime.id}: {json.dumps(figures)}")


def _remove_reference_bridge(node: KindNode) -> None:
    """The reference bridge stays after its last pod (as on a real node): not part of pybridge's runs."""
    node.in_node("ip", "link", "del", "cni-ref0", check=False)
