"""The agent's read of the bridge ports: what it gives goes into the bridge table; when it
fails, the ports read last stay in force and the failure is logged."""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Mapping
from typing import Any

from cni_plugin.netlink import NetlinkError
from cni_plugin.node.netpol import nft
from cni_plugin.node.netpol.objects import Address
from cni_plugin.node.netpol.policy_controller import PolicyController

from .netpol_world import ME, world_pods

X_A = ipaddress.ip_address("10.0.0.2")


def test_ports_read_at_each_ruleset_and_kept_when_the_read_fails() -> None:
    reads: list[Mapping[Address, Collection[str]] | Exception] = [{X_A: {"vetha"}}, NetlinkError(1, "EPERM")]
    logs: list[tuple[str, dict[str, Any]]] = []

    def ports() -> Mapping[Address, Collection[str]]:
        result = reads.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    agent = PolicyController(ME, lambda _s: None, lambda e, **f: logs.append((e, f)), ports=ports)
    agent.handle("NetworkPolicy", "SYNC", [{"metadata": {"name": "deny", "namespace": "x"},
                                           "spec": {"podSelector": {"matchLabels": {"pod": "a"}}}}])
    agent.handle("Pod", "SYNC", [p.model_dump(by_alias=True, mode="json") for p in world_pods()])
    agent.handle("Namespace", "SYNC", [])
    agent.handle("ClusterNetworkPolicy", "SYNC", [])
    first = nft.script(agent.tables())
    assert 'elements = { "vetha" : jump ingress_' in first
    assert nft.script(agent.tables()) == first
    assert logs == [("netpol-warning", {"error": "bridge ports not read: [Errno 1] EPERM"})]
