"""Issue 26's runtime-level proofs on containerd 2.x: what only 2.x does (STATUS on each CRI
Status for a 1.1.0 conflist, 1.1.0 conflists at all), so each test skips on 1.6 saying why.

Each test installs its own conflist (its own network name, so containerd's loaded config tells
which one is live) in place of the node's and puts the node's back afterwards."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from cni_plugin import chain
from cni_plugin.node import model

from .node import BRIDGE, SUBNET, Node, Pods, conflist, mentions, wait_for, write_json_atomically

pytestmark = pytest.mark.e2e

CONFLIST = "10-pbt-e2e.conflist"  # the node's one conflist (max_conf_num = 1): replaced, then restored
AGENT_NETWORK, SMALL_NETWORK = "pbt-e2e-agent", "pbt-e2e-small"


def _identity(conf: dict[str, Any]) -> tuple[str, str, list[str]]:
    return conf["name"], conf["cniVersion"], [p["type"] for p in conf["plugins"]]


def _loaded(node: Node) -> list[tuple[str, str, list[str]]]:
    """The conflists containerd has loaded (its verbose CRI Status), loopback left out."""
    _, cniconfig = node.cri.status()
    networks = [n["Config"] for n in cniconfig.get("Networks") or []]
    return [(n["Name"], n["CNIVersion"], [p["Network"]["type"] for p in n["Plugins"]])
            for n in networks if n["Name"] != "cni-loopback"]


@pytest.fixture
def install(node: Node) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Put a conflist in the node's place and wait until containerd has loaded it; the node's own
    comes back after the test (request this fixture before `pods`: pods go first)."""
    path = node.root / "net.d" / CONFLIST

    def put(conf: dict[str, Any]) -> None:
        write_json_atomically(path, conf)
        wait_for(lambda: _loaded(node) == [_identity(conf)], 20, f"containerd to load {conf['name']}")

    try:
        yield put
    finally:
        put(conflist(node.root))


def _needs_2x(node: Node, why: str) -> None:
    if node.runtime.major < 2:
        pytest.skip(f"containerd {node.runtime.version}: {why}")


def _agent_plan(node: Node) -> model.Plan:
    """What the node agent writes for a node of this runtime whose CNI bin dir holds Debian 12's
    portmap 1.1.1 (the tier links it there): its own model, its own VERSION probes."""
    settings = model.Settings(node_name="pbt-node", cluster_cidrs=(SUBNET,), network=AGENT_NETWORK,
                              bridge=BRIDGE, ipam_data_dir=str(node.root / "ipam"),
                              log_file=str(node.root / "cni.log"))
    own = model.Node("pbt-node", pod_cidrs=(SUBNET,), runtime_version=f"containerd://{node.runtime.version}")
    plugins = chain.Cache([str(node.root / "bin")])
    return model.plan(settings, [own], [], None, chained=[plugins.probe(t) for t in model.CHAINED])


def test_node_agent_conflist_with_debian_portmap_starts_pods_on_containerd2(
    node: Node, install: Callable[[dict[str, Any]], None], pods: Pods
) -> None:
    _needs_2x(node, "1.6 takes no 1.1.0 conflist: the node agent writes 1.0.0 for it whatever the chain")
    plan = _agent_plan(node)
    assert plan.conflist is not None, plan.waiting
    # For a 2.x node the agent would write 1.1.0; Debian's portmap speaks up to 1.0.0 and says so.
    assert plan.conflist["cniVersion"] == "1.0.0"
    assert any("instead of 1.1.0" in note and "portmap" in note for note in plan.notes), plan.notes
    conf = json.loads(model.render_conflist(plan.conflist))
    conf["plugins"][0]["ipMasq"] = True  # the agent masquerades per node; here a leaked pod shows as a rule
    install(conf)
    mark = len(node.cni_calls())
    pod = pods.run("chain", port_mappings=[{"protocol": "TCP", "container_port": 8080, "host_port": 18082}])
    assert ipaddress.ip_address(pod.ip) in SUBNET
    assert node.reservations(AGENT_NETWORK) == {pod.ip: pod.id}
    assert mentions(node.rules_text(), pod.ip)  # pybridge's masquerade and portmap's DNAT
    pods.remove(pod)
    calls = [(c.verb, c.container_id, c.code) for c in node.cni_calls()[mark:] if c.verb != "STATUS"]
    assert calls == [("ADD", pod.id, 0), ("DEL", pod.id, 0), ("DEL", pod.id, 0)]
    assert node.reservations(AGENT_NETWORK) == {}
    assert not mentions(node.rules_text(), pod.ip) and pod.id not in node.rules_text()
    assert node.veths() == set()


def _small_conflist(node: Node, first: int, last: int) -> dict[str, Any]:
    """pybridge alone (no chained plugin that might not take 1.1.0) at 1.1.0, the version for
    which containerd 2.x calls STATUS, with a range of SUBNET's addresses first..last."""
    hosts = list(SUBNET.hosts())
    return {
        "cniVersion": "1.1.0",
        "name": SMALL_NETWORK,
        "plugins": [{
            "type": "pybridge", "bridge": BRIDGE, "isGateway": True, "isDefaultGateway": True,
            "ipMasq": True, "hairpinMode": True, "logFile": str(node.root / "cni.log"),
            "ipam": {"type": "pyipam", "dataDir": str(node.root / "ipam"),
                     "ranges": [[{"subnet": str(SUBNET), "rangeStart": str(hosts[first]),
                                  "rangeEnd": str(hosts[last])}]]},
        }],
    }


def test_full_pool_fails_the_next_pod_and_network_stays_ready_on_containerd2(
    node: Node, install: Callable[[dict[str, Any]], None], pods: Pods
) -> None:
    _needs_2x(node, "1.6 never calls CNI STATUS, so its NetworkReady cannot depend on a full pool")
    conf = _small_conflist(node, 9, 10)  # 10.77.0.10-10.77.0.11: two addresses
    install(conf)
    mark = len(node.cni_calls())
    made = [pods.run(f"small-{i}") for i in range(2)]
    assert node.reservations(SMALL_NETWORK) == {p.ip: p.id for p in made}
    with pytest.raises(grpc.RpcError) as failure:
        pods.run("no-room")
    details = failure.value.details() or ""
    assert "no IP addresses available in range set: 10.77.0.10-10.77.0.11" in details, details
    assert f"({SUBNET}: 2 of 2 in use)" in details, details
    # kubelet's Status while the pool is full: containerd 2.x asks every plugin STATUS, and the
    # node's network stays ready.
    before = len([c for c in node.cni_calls()[mark:] if c.verb == "STATUS"])
    conditions, _ = node.cri.status()
    assert conditions["NetworkReady"]["status"] is True, conditions["NetworkReady"]
    assert conditions["RuntimeReady"]["status"] is True
    statuses = [c for c in node.cni_calls()[mark:] if c.verb == "STATUS"]
    assert len(statuses) > before and all(c.code == 0 for c in statuses), statuses
    # The failed sandbox is gone with its address; the two pods keep theirs.
    assert node.reservations(SMALL_NETWORK) == {p.ip: p.id for p in made}
    pods.remove(made[0])
    assert ipaddress.ip_address(pods.run("room-again").ip) in SUBNET
    pods.remove_all()
    assert node.reservations(SMALL_NETWORK) == {}
    assert node.veths() == set()


def _pybridge_del(node: Node, conf: dict[str, Any], container_id: str) -> None:
    """The DEL containerd sends after a failed ADD, given to pybridge itself (as RemovePodSandbox
    gives it: no netns), since the chain stops it at portmap."""
    plugin = {**conf["plugins"][0], "name": conf["name"], "cniVersion": conf["cniVersion"]}
    env = {**node.env, "CNI_COMMAND": "DEL", "CNI_CONTAINERID": container_id, "CNI_IFNAME": "eth0",
           "CNI_NETNS": "", "CNI_PATH": str(node.root / "bin")}
    proc = subprocess.run(["nsenter", f"--net=/run/netns/{node.netns}", str(node.root / "bin" / "pybridge")],
                          input=json.dumps(plugin), env=env, text=True, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_1_1_0_conflist_with_debian_portmap_fails_every_pod_on_containerd2(
    node: Node, install: Callable[[dict[str, Any]], None], pods: Pods
) -> None:
    """What the node agent wrote for a 2.x node before it asked the chain: why it now asks."""
    _needs_2x(node, "1.6 takes no 1.1.0 conflist at all")
    plan = _agent_plan(node)
    assert plan.conflist is not None, plan.waiting
    conf = json.loads(model.render_conflist(plan.conflist))
    conf["cniVersion"] = model.cni_version(model.Settings(node_name="pbt-node"), model.Node(
        "pbt-node", runtime_version=f"containerd://{node.runtime.version}"))
    assert conf["cniVersion"] == "1.1.0"
    conf["plugins"][0]["ipMasq"] = True
    install(conf)
    mark = len(node.cni_calls())
    with pytest.raises(grpc.RpcError) as failure:
        pods.run("old-chain")
    details = failure.value.details() or ""
    assert 'plugin type="portmap"' in details and "incompatible CNI versions" in details, details
    calls = [(c.verb, c.container_id, c.code) for c in node.cni_calls()[mark:] if c.verb != "STATUS"]
    # pybridge's ADD succeeded, portmap's failed, and no DEL reached pybridge: its address leaks.
    assert len(calls) == 1 and calls[0][0] == "ADD" and calls[0][2] == 0, calls
    sandbox = calls[0][1]
    leaked = node.reservations(AGENT_NETWORK)
    assert list(leaked.values()) == [sandbox]
    ip = next(iter(leaked))
    assert mentions(node.rules_text(), ip)  # and its masquerade rule
    _pybridge_del(node, conf, sandbox)
    assert node.reservations(AGENT_NETWORK) == {}
    assert not mentions(node.rules_text(), ip) and sandbox not in node.rules_text()
    assert node.veths() == set()
