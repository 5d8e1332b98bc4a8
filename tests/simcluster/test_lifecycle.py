"""kind-sim lifecycle: API trouble, the agent restarted, nodes leaving and joining (docs/kubernetes.md).

These change the cluster (a node goes, another comes), so they run after test_kindsim.py.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import grpc
import pytest

from testbed.node import wait_for

from .cluster import Cluster, daemonset
from .kubelet import Pod
from .workloads import WHOAMI

pytestmark = pytest.mark.kindsim

NEXT_LOG = "/run/pybridge/agent-next.log"  # the upgraded agent's call log (a node path)


def _events(pod: Pod, container: str, event: str) -> list[dict[str, object]]:
    found = []
    for line in pod.log(container).splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            found.append(json.loads(line))
    return found


def test_api_refusals_are_logged_and_a_410_relists(cluster: Cluster) -> None:
    assert cluster.api is not None and cluster.store is not None
    name = next(iter(cluster.nodes))
    pod = cluster.daemon_pods[name]
    api = cluster.api
    api.tokens.clear()  # the service account token is no longer valid: every call gets 401
    api.cut()
    try:
        wait_for(
            lambda: any(e.get("status") == 401 for e in _events(pod, "node", "api_error")),
            20,
            "the node controller to log the 401",
        )
    finally:
        api.tokens.add(cluster.token)
    # etcd compacted right after the next list: that watch gets 410 Gone, the agent lists again
    api.compact_after_list = True
    api.cut()
    wait_for(lambda: any(code == 410 for _, code in api.requests), 20, "a watch answered 410")
    cluster.store.add("pybridge-ghost", "172.18.0.250", "containerd://1.6.20")
    ghost = (cluster.pod_cidr("pybridge-ghost"), "172.18.0.250")
    node = cluster.nodes[name]
    try:
        wait_for(lambda: ghost in node.routes(), 20, "the route to a node added after the 410")
    finally:
        cluster.store.delete("pybridge-ghost")
    wait_for(lambda: ghost not in node.routes(), 20, "the ghost's route to go")


def test_agent_restart_fallback_serves_and_pods_keep_connectivity(cluster: Cluster) -> None:
    names = list(cluster.nodes)
    kubelet = cluster.kubelets[names[0]]
    daemon = cluster.daemon_pods[names[0]]
    server = cluster.run_pod(names[0], "steady", {"main": WHOAMI})
    client = cluster.run_pod(names[1], "prober")
    made = [server, client]
    try:
        assert cluster.http_get(client, server.ip, 80) == client.ip
        kubelet.stop_container(daemon, "agent")  # killed; kubelet restarts it a little later
        socket = cluster.nodes[names[0]].node_path("/run/pybridge/agent.sock")
        assert not cluster.ready(names[0]), f"{socket} still accepts with the agent stopped"
        between = cluster.run_pod(names[0], "between", {"main": WHOAMI})  # served by the fallback
        made.append(between)
        assert ipaddress.ip_address(between.ip) in ipaddress.ip_network(cluster.pod_cidr(names[0]))
        assert between.ip != server.ip
        assert cluster.http_get(client, server.ip, 80) == client.ip  # running pods unaffected
        assert cluster.http_get(client, between.ip, 80) == client.ip
        container = next(c for c in daemon.spec["containers"] if c["name"] == "agent")
        kubelet.start(daemon, container)
        cluster.wait_ready([names[0]], timeout=30)
        after = cluster.run_pod(names[0], "after", {"main": WHOAMI})
        made.append(after)
        assert len({server.ip, between.ip, after.ip}) == 3  # agent and fallback share one IPAM store
        assert cluster.http_get(client, after.ip, 80) == client.ip
    finally:
        for pod in made:
            cluster.delete_pod(pod)


def test_upgrade_rolls_out_node_by_node_keeping_connectivity(cluster: Cluster) -> None:
    """The DaemonSet's template changes (image pybridge:next, a new bundle) and is rolled out as
    its updateStrategy says; the new agent logs its calls, which proves who served a new pod."""
    strategy = daemonset()["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    batch = int(strategy["rollingUpdate"]["maxUnavailable"])
    names = list(cluster.nodes)
    servers = {n: cluster.run_pod(n, f"keeper-{i}", {"main": WHOAMI}) for i, n in enumerate(names)}
    prober = cluster.run_pod(names[0], "upgrade-prober")
    made = [*servers.values(), prober]

    def upgraded(template: dict[str, Any]) -> None:
        for container in [*template["spec"]["initContainers"], *template["spec"]["containers"]]:
            container["image"] = "pybridge:next"
            if container["name"] == "agent":
                container.setdefault("env", []).append({"name": "PYBRIDGE_LOG_FILE", "value": NEXT_LOG})

    try:
        old = {n: cluster.nodes[n].node_path("/opt/pybridge/current").readlink().name for n in names}
        for start in range(0, len(names), batch):
            for name in names[start : start + batch]:
                cluster.delete_pod(cluster.daemon_pods[name])
                cluster.deploy(name, edit=upgraded)
                cluster.wait_ready([name])
            for name, server in servers.items():  # running pods never lost connectivity
                assert cluster.http_get(prober, server.ip, 80) == prober.ip, f"after {name}"
        for name in names:
            node = cluster.nodes[name]
            current = node.node_path("/opt/pybridge/current").readlink().name
            assert current != old[name] and node.node_path(f"/opt/pybridge/{current}/VERSION").exists()
            assert node.node_path("/opt/cni/bin/pybridge").readlink().parent.name == current
            fresh = cluster.run_pod(name, "after-upgrade")
            made.append(fresh)
            served = [json.loads(line) for line in node.node_path(NEXT_LOG).read_text().splitlines()]
            assert any(
                e.get("event") == "cni_call"
                and e.get("verb") == "ADD"
                and e.get("code") == 0
                and fresh.id == e.get("container_id")
                for e in served
            ), f"the new agent on {name} did not serve {fresh.name}"
            assert cluster.http_get(fresh, servers[names[0]].ip, 80) == fresh.ip
    finally:
        for pod in made:
            cluster.delete_pod(pod)


def test_forced_cni_version_1_1_0_is_what_containerd_1_6_refuses(cluster: Cluster) -> None:
    """Why `auto` exists: CNI_VERSION=1.1.0 is honoured, and Debian's containerd 1.6 (libcni
    1.1.2) then fails every pod; back to the default, pods work again."""
    if cluster.runtime.major >= 2:
        pytest.skip("containerd 2.x takes a 1.1.0 result: nothing to refuse")
    name = next(iter(cluster.nodes))
    node = cluster.nodes[name]

    def forced(template: dict[str, Any]) -> None:
        node_agent = next(c for c in template["spec"]["containers"] if c["name"] == "node")
        node_agent.setdefault("env", []).append({"name": "CNI_VERSION", "value": "1.1.0"})

    cluster.delete_pod(cluster.daemon_pods[name])
    cluster.deploy(name, edit=forced)
    try:
        wait_for(lambda: (node.conflist() or {}).get("cniVersion") == "1.1.0", 20, "the forced cniVersion")
        with pytest.raises(grpc.RpcError) as refused:
            cluster.run_pod(name, "too-new")
        assert 'unsupported CNI result version "1.1.0"' in str(refused.value.details())
    finally:
        cluster.delete_pod(cluster.daemon_pods[name])
        cluster.deploy(name)
    wait_for(lambda: (node.conflist() or {}).get("cniVersion") == "1.0.0", 20, "the runtime's cniVersion")
    pod = cluster.run_pod(name, "just-right")
    cluster.delete_pod(pod)


ALT_DATA_DIR = "/run/pbt-alt-ipam"  # a node path the agent container has no volume for


def test_agent_and_fallback_share_a_non_default_data_dir(cluster: Cluster) -> None:
    name = "pybridge-altdir"
    cluster.add_node(name)

    def alt(template: dict[str, Any]) -> None:
        node = next(c for c in template["spec"]["containers"] if c["name"] == "node")
        node["command"] = [*node["command"], "--ipam-data-dir", ALT_DATA_DIR]

    daemon = cluster.deploy(name, edit=alt)
    cluster.wait_ready([name])
    made: list[Pod] = []
    try:
        conflist = cluster.nodes[name].conflist()
        assert conflist is not None and conflist["plugins"][0]["ipam"]["dataDir"] == ALT_DATA_DIR
        made.append(cluster.run_pod(name, "by-agent"))
        cluster.kubelets[name].stop_container(daemon, "agent")
        made.append(cluster.run_pod(name, "by-fallback"))
        assert made[0].ip != made[1].ip, f"duplicate pod IP {made[0].ip}: agent and fallback used two stores"
    finally:
        for pod in made:
            cluster.delete_pod(pod)
        cluster.remove_node(name)


def test_node_leaves_and_another_joins(cluster: Cluster) -> None:
    names = list(cluster.nodes)
    leaving = names[-1]
    gone = (cluster.pod_cidr(leaving), cluster.nodes[leaving].ip)
    cluster.remove_node(leaving)
    for name in names[:-1]:
        wait_for(
            lambda n=name: gone not in cluster.nodes[n].routes(), 20, f"{name} to drop {leaving}'s route"
        )

    joined = f"{leaving}-new"
    node = cluster.add_node(joined)
    cluster.deploy(joined)
    cluster.wait_ready([joined])
    cidr = cluster.pod_cidr(joined)
    conflist = node.conflist()
    assert conflist is not None and conflist["plugins"][0]["ipam"]["ranges"] == [
        [{"subnet": cluster.pod_cidr(joined, family)}] for family in (4, 6)
    ]
    for name in names[:-1]:
        wait_for(lambda n=name: (cidr, node.ip) in cluster.nodes[n].routes(), 20, f"{name} to route {joined}")
    server = cluster.run_pod(names[0], "old-timer", {"main": WHOAMI})
    newcomer = cluster.run_pod(joined, "newcomer")
    try:
        assert ipaddress.ip_address(newcomer.ip) in ipaddress.ip_network(cidr)
        assert cluster.http_get(newcomer, server.ip, 80) == newcomer.ip
    finally:
        cluster.delete_pod(newcomer)
        cluster.delete_pod(server)
