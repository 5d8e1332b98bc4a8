"""Node routes only where they belong (issue 30), in a real kernel: `pybridge node run
--nodes-file` in a throw-away netns whose main table already holds the admin's routes.

Node objects claim a LAN, half the internet, both default routes and an in-cluster prefix the
admin routes elsewhere: none of those routes may change. The only change is the good node's
route, plus the removal of the agent's own leftovers (an old agent's 128.0.0.0/1 and ::/0).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from testbed.harness import delete_netns, new_netns, sh

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

ME, CLUSTER = "sim-node1", "10.70.0.0/16"
ADMIN = [  # the host's own routes, as an admin or DHCP made them
    ["route", "add", "default", "via", "172.30.0.1"],
    ["-6", "route", "add", "default", "via", "fd00:30::1"],
    ["route", "add", "192.168.50.0/24", "via", "172.30.0.254"],  # the LAN behind a router
    ["route", "add", "10.70.5.0/24", "via", "172.30.0.253"],  # inside the cluster CIDR, but the admin's
]
LEFTOVERS = [  # routes an earlier agent (proto 91) installed for rogue Node objects
    ["route", "add", "128.0.0.0/1", "via", "172.30.0.14", "proto", "91"],
    ["-6", "route", "add", "default", "via", "fd00:30::16", "proto", "91", "metric", "2000"],
]


def node(name: str, ips: list[str], cidrs: list[str]) -> dict[str, Any]:
    return {"kind": "Node", "metadata": {"name": name}, "spec": {"podCIDRs": cidrs},
            "status": {"addresses": [{"type": "InternalIP", "address": ip} for ip in ips]}}


GOOD = [node(ME, ["172.30.0.11", "fd00:30::11"], ["10.70.1.0/24"]),
        node("good", ["172.30.0.12"], ["10.70.2.0/24"])]
ROGUE = [node("lan", ["172.30.0.13"], ["192.168.50.0/24"]),
         node("half", ["172.30.0.14"], ["128.0.0.0/1"]),
         node("v4-default", ["172.30.0.15"], ["0.0.0.0/0"]),
         node("v6-default", ["fd00:30::16"], ["::/0"]),
         node("taken", ["172.30.0.17"], ["10.70.5.0/24"])]


def main_table(netns: str) -> set[tuple[str, str, str, int]]:
    out = set()
    for family in ("-4", "-6"):
        for r in json.loads(sh("ip", "-n", netns, "-j", family, "route", "show", "table", "main").stdout):
            out.add((r["dst"], r.get("gateway", ""), str(r.get("protocol", "")), int(r.get("metric", 0))))
    return out


def reconcile(netns: str, tmp: Path, nodes: list[dict[str, Any]]) -> str:
    path = tmp / "nodes.json"
    path.write_text(json.dumps({"kind": "NodeList", "items": nodes}))
    proc = sh("ip", "netns", "exec", netns, sys.executable, "-m", "cni_plugin", "node", "run",
              "--node-name", ME, "--nodes-file", str(path), "--cni-conf-dir", str(tmp / "net.d"),
              "--ipam-data-dir", str(tmp / "ipam"), "--cluster-cidr", CLUSTER, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.decode()


def test_a_node_cannot_claim_a_route_outside_the_cluster_or_one_not_the_agents(tmp_path: Path) -> None:
    netns = new_netns("routes")
    try:
        for cmd in (["link", "set", "lo", "up"],
                    ["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
                    ["addr", "add", "172.30.0.11/24", "dev", "eth0"],
                    ["-6", "addr", "add", "fd00:30::11/64", "dev", "eth0", "nodad"],
                    ["link", "set", "eth0", "up"], ["link", "set", "eth1", "up"], *ADMIN):
            sh("ip", "-n", netns, *cmd)
        admin = main_table(netns)
        for cmd in LEFTOVERS:
            sh("ip", "-n", netns, *cmd)

        log = reconcile(netns, tmp_path, GOOD + ROGUE)
        assert main_table(netns) == admin | {("10.70.2.0/24", "172.30.0.12", "91", 0)}
        refused = [json.loads(line) for line in log.splitlines() if '"refused"' in line]
        assert sorted((e["reason"], e["subject"]) for e in refused) == [
            ("default-route", "node 'v4-default' podCIDR 0.0.0.0/0"),
            ("default-route", "node 'v6-default' podCIDR ::/0"),
            ("outside-cluster", "node 'half' podCIDR 128.0.0.0/1"),
            ("outside-cluster", "node 'lan' podCIDR 192.168.50.0/24"),
            ("route-conflict", "route 10.70.5.0/24"),
        ]
        masq = sh("ip", "netns", "exec", netns, "nft", "list", "table", "inet", "pybridge_node").stdout
        masq = masq.decode()
        assert "ip daddr != { 10.70.0.0/16, 224.0.0.0/4 } masquerade" in masq  # no rogue CIDR exempted

        # the rogue nodes go: the admin's routes stay, the good node's route too
        reconcile(netns, tmp_path, GOOD)
        assert main_table(netns) == admin | {("10.70.2.0/24", "172.30.0.12", "91", 0)}
    finally:
        delete_netns(netns)
