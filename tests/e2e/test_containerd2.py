"""Issue 26's runtime-level proofs: what only containerd 2.x does (STATUS on each CRI Status for a
1.1.0 conflist, 1.1.0 conflists at all), each skipped on 1.6 saying why; and the collection of
what the runtime forgot, on both (on 1.6, whose libcni caches no netns path, pybridge's netns
record alone tells the collector which netns to look for).

Each test installs its own conflist (its own network name, so containerd's loaded config tells
which one is live) in place of the node's and puts the node's back afterwards."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cni_plugin import chain
from cni_plugin.node import model
from testbed.node import (
    BRIDGE,
    SUBNET,
    Node,
    Pod,
    Pods,
    conflist,
    mentions,
    sandbox_config,
    wait_for,
    write_json_atomically,
)

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


def _agent_plan(node: Node) -> model.Desired:
    """What the node controller writes for a node of this runtime whose CNI bin dir holds Debian 12's
    portmap 1.1.1 (the tier links it there): its own model, its own VERSION probes."""
    settings = model.Settings(node_name="pbt-node", cluster_cidrs=(SUBNET,), network=AGENT_NETWORK,
                              bridge=BRIDGE, ipam_data_dir=str(node.root / "ipam"),
                              log_file=str(node.root / "cni.log"))
    own = model.Node("pbt-node", pod_cidrs=(SUBNET,), runtime_version=f"containerd://{node.runtime.version}")
    plugins = chain.Cache([str(node.root / "bin")])
    return model.desired(settings, [own], [], None, chained=[plugins.probe(t) for t in model.CHAINED])


def test_node_agent_conflist_with_debian_portmap_starts_pods_on_containerd2(
    node: Node, install: Callable[[dict[str, Any]], None], pods: Pods
) -> None:
    _needs_2x(node, "1.6 takes no 1.1.0 conflist: the node controller writes 1.0.0 for it whatever the chain")
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
    """What the node controller wrote for a 2.x node before it asked the chain: why it now asks."""
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


# --- collection of what the runtime forgot (issue 26, point 4) -----------------------------------

GC_NETWORK = "pbt-e2e-gc"
FAILING_DEL = "pbt-failing-del"
# A chained plugin that passes ADD through and fails DEL for the pod named "stuck" (CNI_ARGS).
FAILING_DEL_SCRIPT = """#!{python}
import json, os, sys
command = os.environ.get("CNI_COMMAND")
conf = json.load(sys.stdin)
if command == "VERSION":
    print(json.dumps({{"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]}}))
elif command == "ADD":
    print(json.dumps(conf["prevResult"]))
elif command == "DEL" and "K8S_POD_NAME=stuck;" in os.environ.get("CNI_ARGS", "") + ";":
    print(json.dumps({{"cniVersion": conf["cniVersion"], "code": 11, "msg": "pbt: this DEL fails"}}))
    sys.exit(1)
"""


def _gc_conflist(node: Node) -> dict[str, Any]:
    conf = conflist(node.root)
    conf["name"] = GC_NETWORK
    conf["plugins"][1] = {"type": FAILING_DEL}
    return conf


def _in_mntns(node: Node, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", f"--mount={node.mntns}", *cmd], capture_output=True, text=True,
                          check=True, timeout=60)


def _wipe_runtime(node: Node) -> None:
    """What a node whose runtime state is lost looks like: containerd and its shims killed (-9),
    the sandboxes' netns pins and mounts gone with containerd's root and state dirs, containerd
    started afresh (images imported again). No CNI DEL is ever sent."""
    node.stop_containerd(signal.SIGKILL)
    node._kill_leftovers()
    targets = _in_mntns(node, "findmnt", "-rn", "-o", "TARGET").stdout.split()
    for target in reversed([t for t in targets if t.startswith(f"{node.root}/containerd/")]):
        _in_mntns(node, "umount", "-l", target)
    for path in (node.root / "containerd", node.root / "run-containerd", node.root / "runc"):
        for entry in path.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    node.start_containerd()
    node._import_images()
    wait_for(lambda: node.cri.conditions().get("NetworkReady"), 20, "CRI NetworkReady")


def _gc(node: Node, *args: str) -> list[dict[str, Any]]:
    """`pybridge gc --json` where containerd runs (its netns pins, its libcni cache)."""
    cmd = node.private(sys.executable, "-m", "cni_plugin", "gc", "--json", "--conf-dir", node.root / "net.d",
                       "--runtime-socket", node.socket, "--min-age", "0", "--confirm-after", "1", *args)
    # containerd pins the netns under its state dir, here in the node's root dir under /tmp.
    env = {**node.env, "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
           "PYBRIDGE_NETNS_ROOTS": f"/proc:/run:/var/run:{node.root}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return list(json.loads(proc.stdout))


def _cached(node: Node) -> set[str]:
    """Container ids of libcni's cache entries of the gc network."""
    results = node.root / "var-lib-cni" / "results"
    prefix = f"{GC_NETWORK}-"
    return {p.name[len(prefix):].rsplit("-", 1)[0] for p in results.glob(f"{prefix}*")} if results.exists() \
        else set()


@pytest.fixture
def failing_del(node: Node) -> Iterator[None]:
    """The chained plugin in the bin dir (request it before `install` and `pods`: it goes last)."""
    path = node.root / "bin" / FAILING_DEL
    path.write_text(FAILING_DEL_SCRIPT.format(python=sys.executable))
    path.chmod(0o755)
    try:
        yield
    finally:
        path.unlink()


def test_gc_releases_what_a_wiped_runtime_and_a_failing_chained_del_left(
    node: Node, failing_del: None, install: Callable[[dict[str, Any]], None], pods: Pods
) -> None:
    install(_gc_conflist(node))
    victim = pods.run("victim")
    stuck = pods.run("stuck")
    with pytest.raises(grpc.RpcError) as failure:  # kubelet would retry this forever
        node.cri.stop_pod(stuck.id)
    assert "pbt: this DEL fails" in (failure.value.details() or "")
    forgotten = {victim.ip: victim.id, stuck.ip: stuck.id}
    assert node.reservations(GC_NETWORK) == forgotten

    _wipe_runtime(node)
    pods.live.clear()  # containerd knows neither any more
    after = pods.run("after")
    assert after.ip not in forgotten
    # Without the collector this is where it stays: two addresses, their rules and cache entries
    # held for sandboxes no runtime knows, no veth left for either.
    assert node.reservations(GC_NETWORK) == {**forgotten, after.ip: after.id}
    assert all(mentions(node.rules_text(), ip) for ip in forgotten)
    assert _cached(node) == {victim.id, stuck.id, after.id}
    assert len(node.veths()) == 1

    verdicts = {r["container_id"]: r["verdict"] for r in _gc(node, "--dry-run")}
    assert verdicts == {victim.id: "would release", stuck.id: "would release", after.id: "netns exists"}
    assert len(node.reservations(GC_NETWORK)) == 3
    verdicts = {r["container_id"]: r["verdict"] for r in _gc(node)}
    assert verdicts == {victim.id: "released", stuck.id: "released", after.id: "netns exists"}

    assert node.reservations(GC_NETWORK) == {after.ip: after.id}
    rules = node.rules_text()
    assert not any(mentions(rules, ip) for ip in forgotten) and mentions(rules, after.ip)
    assert _cached(node) == {after.id}
    assert len(node.veths()) == 1
    assert node.cri.pod_status(after.id)["network"]["ip"] == after.ip


def test_gc_after_containerd_killed_during_a_burst(
    node: Node, failing_del: None, install: Callable[[dict[str, Any]], None], pods: Pods
) -> None:
    """kill -9 of containerd, its shims and the plugins mid-ADD while RunPodSandbox calls are
    under way, its state lost with it. The collector releases every attachment the kill left,
    also those of an ADD killed before libcni cached its result (pybridge done, the chained
    plugin not): pybridge recorded their netns itself. The pod made afterwards keeps everything."""
    install(_gc_conflist(node))
    mark = len(node.cni_calls())

    def run(i: int) -> None:
        with contextlib.suppress(grpc.RpcError):  # the kill fails them all
            node.cri.run_pod(sandbox_config(f"burst-{i}", node.cgroup_parent))

    burst = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in burst:
        thread.start()
    wait_for(lambda: len([c for c in node.cni_calls()[mark:] if c.verb == "ADD"]) >= 3, 60, "three ADDs")
    node.stop_containerd(signal.SIGKILL)
    node._kill_leftovers()  # the shims, pause processes and plugin processes mid-ADD
    for thread in burst:
        thread.join(60)
    _wipe_runtime(node)
    after = pods.run("after")
    try:
        _collect_after_the_burst(node, after)
    finally:  # should the collector keep any, later tests reuse the addresses: DEL them by hand
        for cid in set(node.reservations(GC_NETWORK).values()) - {after.id}:
            _pybridge_del(node, _gc_conflist(node), cid)


def _collect_after_the_burst(node: Node, after: Pod) -> None:
    cached = _cached(node) - {after.id}
    left = {ip: cid for ip, cid in node.reservations(GC_NETWORK).items() if cid != after.id}
    assert left and cached <= set(left.values())

    verdicts = {r["container_id"]: r["verdict"] for r in _gc(node)}
    assert verdicts[after.id] == "netns exists"
    assert {cid: verdicts[cid] for cid in left.values()} == dict.fromkeys(left.values(), "released")
    # Nothing that no live pod owns is left: reservations, veths, masquerade rules, records.
    assert node.reservations(GC_NETWORK) == {after.ip: after.id}
    rules = node.rules_text()
    assert not any(mentions(rules, ip) for ip in left)
    assert mentions(rules, after.ip)
    assert _cached(node) == {after.id}
    assert len(node.veths()) == 1
    assert os.listdir(node.root / "ipam" / ".pybridge-netns" / GC_NETWORK) == [f"{after.id}:eth0"]
    assert node.cri.pod_status(after.id)["network"]["ip"] == after.ip
    print(f"burst: {len(left)} reservations left by the kill, {len(cached)} with a libcni cache entry, "
          f"{len(left) - len(cached)} without; all released")
