"""Scenarios 2-10: pods made through containerd's CRI plugin (what kubelet calls) get their
network from pybridge. Every test checks the CNI calls in pybridge's own JSON log."""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from testbed.node import (
    BRIDGE,
    GATEWAY,
    NETWORK,
    NODE_UPLINK_IP,
    OUTSIDE_IP,
    SLEEPER,
    SUBNET,
    CNICall,
    Node,
    Pod,
    Pods,
    http_get_in,
    http_server,
    mentions,
    sh,
    wait_for,
)

pytestmark = pytest.mark.e2e

SERVICE_IP, SERVICE_PORT = "10.96.0.10", 80


def _calls_since(node: Node, mark: int) -> list[CNICall]:
    return node.cni_calls()[mark:]


def _pod_addresses(node: Node, pod: Pod) -> list[str]:
    """eth0's IPv4 addresses seen from the sandbox (pause) process's netns, not through the CRI."""
    pid = node.cri.pod_status(pod.id)["info"]["pid"]
    out = sh("nsenter", "-t", str(pid), "-n", "ip", "-j", "-4", "addr", "show", "eth0").stdout
    return [f"{a['local']}/{a['prefixlen']}" for link in json.loads(out) for a in link["addr_info"]]


def _host_veth(node: Node, pods: Pods, pod: Pod) -> str:
    rc, iflink = pods.exec(pod, "cat", "/sys/class/net/eth0/iflink")
    assert rc == 0, iflink
    return next(name for name, link in node.links().items() if link["ifindex"] == int(iflink))


def _assert_nothing_left(node: Node, removed: list[Pod]) -> None:
    reservations = node.reservations()
    rules = node.rules_text()
    for pod in removed:
        assert pod.id not in reservations.values(), f"{pod.name} still holds an address"
        assert not pod.ip or not mentions(rules, pod.ip), f"a rule still mentions {pod.name}'s {pod.ip}"
        assert pod.id not in rules, f"a rule still names {pod.name}"
    assert node.veths() == set(), "a pod's veth is left on the node"


def test_pod_ip_is_the_address_pybridge_assigned(node: Node, pods: Pods) -> None:
    mark = len(node.cni_calls())
    pod = pods.run("addr")
    assert ipaddress.ip_address(pod.ip) in SUBNET
    # The address the CRI reports is the one pybridge's IPAM reserved for this very sandbox...
    assert node.reservations()[pod.ip] == pod.id
    # ...and the one on eth0 in the netns containerd made for the pod, with the bridge as gateway.
    assert _pod_addresses(node, pod) == [f"{pod.ip}/{SUBNET.prefixlen}"]
    pid = node.cri.pod_status(pod.id)["info"]["pid"]
    route = json.loads(sh("nsenter", "-t", str(pid), "-n", "ip", "-j", "route", "show", "default").stdout)
    assert route[0]["gateway"] == GATEWAY
    calls = _calls_since(node, mark)
    assert [(c.verb, c.container_id, c.ifname, c.code) for c in calls] == [("ADD", pod.id, "eth0", 0)]
    assert "/io.containerd.grpc.v1.cri/netns/cni-" in calls[0].netns


def test_containers_of_a_pod_share_its_netns_and_localhost(node: Node, pods: Pods) -> None:
    mark = len(node.cni_calls())
    pod = pods.run("shared", {"server": http_server(7000, "pong", "127.0.0.1"), "client": SLEEPER})
    pause_pid = node.cri.pod_status(pod.id)["info"]["pid"]
    views = {}
    for name in pod.containers:
        netns = pods.exec(pod, "readlink", "/proc/self/ns/net", container=name)
        addr = pods.exec(pod, "ip", "-o", "-4", "addr", "show", "eth0", container=name)
        mac = pods.exec(pod, "cat", "/sys/class/net/eth0/address", container=name)
        assert netns[0] == addr[0] == mac[0] == 0
        views[name] = (netns[1].strip(), addr[1].split()[3], mac[1].strip())
    # One netns for the pause container and both app containers: same inode, eth0, IP and MAC.
    assert views["server"] == views["client"]
    netns, address, _ = views["server"]
    assert netns == sh("readlink", f"/proc/{pause_pid}/ns/net").stdout.strip()
    assert address == f"{pod.ip}/{SUBNET.prefixlen}"
    # The server listens on 127.0.0.1 only; the other container reaches it over localhost.
    assert pods.http_get(pod, "127.0.0.1", 7000, container="client") == "pong"
    # Exactly one ADD, for the sandbox: containers join its netns without any CNI call.
    calls = _calls_since(node, mark)
    assert [(c.verb, c.container_id) for c in calls] == [("ADD", pod.id)]


@pytest.fixture
def outside_server(node: Node) -> Iterator[None]:
    """An HTTP server in the outside netns that answers with the address it sees the client at."""
    code = (
        "import socket\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('{OUTSIDE_IP}', 9000)); s.listen(8)\n"
        "while True:\n"
        "    c, (peer, _) = s.accept(); c.recv(4096)\n"
        "    c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\n' + peer.encode() + b'\\n'); c.close()\n"
    )
    proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{node.outside}", sys.executable, "-I", "-c", code])
    try:
        wait_for(lambda: ":9000 " in node.in_outside("ss", "-Hltn").stdout, 10, "the outside server")
        yield
    finally:
        proc.kill()
        proc.wait()


def test_pod_to_pod_to_node_and_to_outside_through_masquerade(
    node: Node, pods: Pods, outside_server: None
) -> None:
    a = pods.run("net-a", {"app": SLEEPER})
    b = pods.run("net-b", {"web": http_server(8080, "from-b")})
    # pod <-> pod on the node's bridge
    assert pods.exec(a, "ping", "-c", "1", "-W", "3", b.ip)[0] == 0
    assert pods.http_get(a, b.ip, 8080) == "from-b"
    # pod -> node: the bridge's gateway address
    assert pods.exec(a, "ping", "-c", "1", "-W", "3", GATEWAY)[0] == 0
    # pod -> outside: the outside has no route back to the pod subnet, so only ipMasq makes this
    # work, and the outside sees the node's address instead of the pod's.
    assert node.in_outside("ip", "route", "get", a.ip, check=False).returncode != 0
    seen = pods.http_get(a, OUTSIDE_IP, 9000)
    assert seen == NODE_UPLINK_IP != a.ip
    assert mentions(node.in_node("nft", "list", "table", "inet", "pybridge").stdout, a.ip)


def test_host_port_reaches_the_pod_from_another_netns(node: Node, pods: Pods) -> None:
    pod = pods.run("web", {"web": http_server(8080, "hostport-ok")},
                   port_mappings=[{"protocol": "TCP", "container_port": 8080, "host_port": 18080}])
    # portmap, chained after pybridge, got containerd's capitalised runtimeConfig.portMappings
    # and the ADD result carrying the pod IP.
    assert http_get_in(node.outside, NODE_UPLINK_IP, 18080) == "hostport-ok"
    assert mentions(node.rules_text(), pod.ip)


@pytest.fixture
def service(node: Node) -> Iterator[Callable[[str], None]]:
    """A ClusterIP Service as kube-proxy's nftables mode builds it, for a given endpoint: DNAT in
    prerouting, and masquerade when a pod is its own endpoint."""
    table = "pbt-svc"

    def install(endpoint: str) -> None:
        rules = f"""table ip {table} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat;
    ip daddr {SERVICE_IP} tcp dport {SERVICE_PORT} jump svc;
  }}
  chain svc {{
    ip saddr {endpoint} meta mark set 0x4000;
    meta l4proto tcp dnat to {endpoint}:8080;
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat;
    meta mark & 0x4000 == 0x4000 masquerade;
  }}
}}
"""
        subprocess.run(["nsenter", f"--net=/run/netns/{node.netns}", "nft", "-f", "-"],
                       input=rules, text=True, check=True, capture_output=True)

    try:
        yield install
    finally:
        node.in_node("nft", "delete", "table", "ip", table, check=False)


def test_pod_reaches_itself_through_a_service_thanks_to_hairpin(
    node: Node, pods: Pods, service: Callable[[str], None]
) -> None:
    pod = pods.run("hairpin", {"web": http_server(8080, "svc-ok")})
    service(pod.ip)
    assert pods.http_get(pod, SERVICE_IP, SERVICE_PORT) == "svc-ok"
    # br_netfilter DNATs the frame in the bridge path and sends it back out the port it came in
    # on: only hairpin mode on that port (pybridge's hairpinMode) lets it through.
    veth = _host_veth(node, pods, pod)
    assert node.links()[veth]["master"] == BRIDGE
    assert node.links()[veth]["linkinfo"]["info_slave_data"]["hairpin"] is True
    node.in_node("ip", "link", "set", veth, "type", "bridge_slave", "hairpin", "off")
    try:
        assert pods.try_get(pod, SERVICE_IP, SERVICE_PORT) is None, \
            "the Service answered without hairpin: this test no longer proves anything"
    finally:
        node.in_node("ip", "link", "set", veth, "type", "bridge_slave", "hairpin", "on")
    assert pods.http_get(pod, SERVICE_IP, SERVICE_PORT) == "svc-ok"


def test_stop_then_remove_sends_two_dels_and_leaves_nothing(node: Node, pods: Pods) -> None:
    pod = pods.run("life", {"app": SLEEPER},
                   port_mappings=[{"protocol": "TCP", "container_port": 8080, "host_port": 18081}])
    assert node.veths() and mentions(node.rules_text(), pod.ip)  # pybridge's masq, portmap's DNAT
    mark = len(node.cni_calls())
    node.cri.stop_pod(pod.id)
    stop_calls = _calls_since(node, mark)
    assert [(c.verb, c.container_id, c.code) for c in stop_calls] == [("DEL", pod.id, 0)]
    assert stop_calls[0].netns  # StopPodSandbox: DEL while the netns still exists
    _assert_nothing_left(node, [pod])
    node.cri.remove_pod(pod.id)
    pods.live.pop(pod.id)
    remove_calls = _calls_since(node, mark + 1)
    # RemovePodSandbox: a second DEL, netns already gone (empty CNI_NETNS, no prevResult).
    assert [(c.verb, c.container_id, c.netns, c.code) for c in remove_calls] == [("DEL", pod.id, "", 0)]
    assert pod.id not in {p["id"] for p in node.cri.list_pods()}
    _assert_nothing_left(node, [pod])


def test_failed_add_fails_the_pod_cleanly_and_the_follow_up_del_succeeds(node: Node, pods: Pods) -> None:
    # Exhaust the pool the way other pods would: a reservation for every address in the store.
    store = node.root / "ipam" / NETWORK
    store.mkdir(parents=True, exist_ok=True)
    taken = set(node.reservations())
    filler = [store / str(ip) for ip in SUBNET.hosts() if str(ip) not in taken]
    for path in filler:
        path.write_bytes(b"pbt-filler\r\neth0")
    mark = len(node.cni_calls())
    try:
        with pytest.raises(grpc.RpcError) as failure:
            pods.run("no-room")
        conditions = node.cri.conditions()  # while the pool is still full
    finally:
        for path in filler:
            path.unlink()
    details = failure.value.details() or ""
    assert "failed to setup network for sandbox" in details and "pybridge" in details, details
    # The message names the range set and its use (pyipam's EXHAUSTED, code 110).
    assert f"({SUBNET}: 253 of 253 in use)" in details, details
    # A full pool is not a node fault (containerd 1.6 never calls STATUS; 2.x would on each
    # Status, and pyipam's STATUS stays ok on a full pool).
    assert conditions.get("NetworkReady") is True, conditions
    calls = _calls_since(node, mark)
    assert calls[0].verb == "ADD" and calls[0].code != 0
    sandbox = calls[0].container_id
    # containerd tears the half-made sandbox down at once: every DEL for it succeeds.
    assert calls[1:] and all(c.verb == "DEL" and c.container_id == sandbox and c.code == 0
                             for c in calls[1:]), calls
    assert sandbox not in {p["id"] for p in node.cri.list_pods()}
    assert sandbox not in node.reservations().values()
    assert node.veths() == set()
    # The pool has room again: the next pod gets an address.
    assert ipaddress.ip_address(pods.run("room-again").ip) in SUBNET


def test_twenty_pods_in_parallel_get_distinct_addresses_and_leave_nothing(node: Node, pods: Pods) -> None:
    mark = len(node.cni_calls())
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        made = list(pool.map(lambda i: pods.run(f"par-{i}"), range(20)))
    elapsed = time.monotonic() - started
    statuses = [node.cri.pod_status(p.id) for p in made]
    assert all(s["state"] == "SANDBOX_READY" for s in statuses)
    ips = {p.ip for p in made}
    assert len(ips) == 20 and all(ipaddress.ip_address(ip) in SUBNET for ip in ips)
    assert node.reservations() == {p.ip: p.id for p in made}
    assert len(node.veths()) == 20
    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(pods.remove, made))
    calls = _calls_since(node, mark)
    assert sorted((c.verb, c.code) for c in calls) == [("ADD", 0)] * 20 + [("DEL", 0)] * 40
    assert {c.container_id for c in calls} == {p.id for p in made}
    _assert_nothing_left(node, made)
    print(f"20 pods up in parallel in {elapsed:.1f}s")


def test_pods_keep_their_addresses_across_a_containerd_restart(node: Node, pods: Pods) -> None:
    a = pods.run("keep-a", {"app": SLEEPER})
    b = pods.run("keep-b", {"app": SLEEPER})
    mark = len(node.cni_calls())
    node.stop_containerd(signal.SIGKILL)  # a crash: shims and pods run on
    node.start_containerd()
    wait_for(lambda: node.cri.conditions().get("NetworkReady"), 20, "CRI NetworkReady after the restart")
    for pod in (a, b):
        status = node.cri.pod_status(pod.id)
        assert status["state"] == "SANDBOX_READY"
        assert status["network"]["ip"] == pod.ip
        assert _pod_addresses(node, pod) == [f"{pod.ip}/{SUBNET.prefixlen}"]
    assert pods.exec(a, "ping", "-c", "1", "-W", "3", b.ip)[0] == 0
    assert _calls_since(node, mark) == [], "containerd must not call CNI when it restarts"
    pods.remove_all()
    calls = _calls_since(node, mark)
    assert sorted((c.verb, c.container_id, c.code) for c in calls) == sorted(
        [("DEL", p.id, 0) for p in (a, b) for _ in range(2)])
    _assert_nothing_left(node, [a, b])


def test_host_network_pod_gets_no_cni_call(node: Node, pods: Pods) -> None:
    mark = len(node.cni_calls())
    pod = pods.run("hostnet", {"app": SLEEPER}, host_network=True)
    assert pod.ip == ""
    rc, netns = pods.exec(pod, "readlink", "/proc/self/ns/net")
    assert rc == 0 and netns.strip() == f"net:[{node.netns_inode()}]"  # the node's own netns
    pods.remove(pod)
    assert _calls_since(node, mark) == []
