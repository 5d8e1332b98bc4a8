"""NetworkPolicy enforced in real kernels: a node netns, pybridge ADDs the upstream suite's pods
(namespaces x, y, z with pods a, b, c) on its bridge, every pod serves TCP and UDP on ports 80
and 81, and for cases of Kubernetes' test/e2e/network/netpol/network_policy.go the observed
reachability matrix of every pod pair equals the one expected from the case's intent.

The cases and their expected matrices are in netpol_cases.py; the rules come from the agent's
own path: objects -> PolicyController -> nft -f inside the node netns. Everything here is on one
node (plus one routed remote pod); the cases with pods spread over nodes need the multi-node
simulated world (tests/fakeapi, issue 12).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cni_plugin import libnft
from cni_plugin.node.netpol import apply, compile, delta, nfnl, nft
from cni_plugin.node.netpol.nft import TABLE
from cni_plugin.node.netpol.policy_controller import PolicyController
from testbed.harness import Host, delete_netns, new_netns, sh

from .netpol_cases import (
    CASES,
    CLUSTER_CASES,
    EGRESS,
    NAME_LABEL,
    NODE,
    NOT_X,
    ONLY_Y_TO_XA,
    POD_A,
    POD_B,
    PODS,
    World,
    ns_policy,
    reachable,
)
from .netpol_probe import (
    Flows,
    Servers,
    client,
    differences,
    in_netns,
    node_agent,
    observe,
    pods_on_bridge,
    probe,
)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, launchers: Path) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("netpol")
    host = Host(name=new_netns("h17np"), data_dir=tmp / "ipam", bin_dir=launchers,
                agent_socket=tmp / "a.sock")
    servers = None
    try:
        netns, ips = pods_on_bridge(host, PODS, "h17netpol", "h17np0")
        servers = Servers(netns)
        yield World(netns, ips, host=host)
    finally:
        if servers is not None:
            servers.close()
        host.destroy()


def _reset(world: World) -> PolicyController:
    agent = node_agent(world)
    agent.handle("NetworkPolicy", "SYNC", [])
    agent.handle("Pod", "SYNC", [world.pod_object(p) for p in PODS])
    agent.handle("Namespace", "SYNC", [{"metadata": {"name": ns}} for ns in "xyz"])
    agent.handle("ClusterNetworkPolicy", "SYNC", [])
    assert agent.reconcile()
    return agent


def _node(world: World) -> Host:
    """The node netns, which the `world` fixture always makes."""
    assert world.host is not None
    return world.host


@pytest.mark.parametrize("title", [*CASES, *CLUSTER_CASES],
                         ids=[re.sub(r"[^A-Za-z0-9]+", "-", t).strip("-") for t in [*CASES, *CLUSTER_CASES]])
def test_upstream_case_reachability(world: World, title: str) -> None:
    agent = _reset(world)
    try:
        for number, step in enumerate({**CASES, **CLUSTER_CASES}[title](world)):
            for kind, event, obj in step.events:
                agent.handle(kind, event, obj)
            agent.reconcile()
            for proto, port, expected in step.checks:
                for family in step.families:
                    wrong = differences(expected, observe(world, proto, port, family, expected))
                    assert not wrong, f"step {number}, {proto}/{port} IPv{family}: " + "; ".join(wrong)
    finally:
        apply.remove(world.nft())


def _flood(world: World, source: str, target: str, replace: Callable[[], None]) -> int:
    """UDP datagrams from `source` to `target` port 80 every millisecond while `replace()` runs;
    returns how many were answered (each one got through the rules)."""
    socks = in_netns(world.netns[source], lambda: [client("UDP", world.ips[target][4]) for _ in range(4)])
    answered = 0
    done = threading.Event()

    def replace_then_stop() -> None:
        replace()
        done.set()
    worker = threading.Thread(target=replace_then_stop)
    try:
        worker.start()
        while not done.is_set():
            for s in socks:
                s.sendto(b"ping", (world.ips[target][4], 80))
            readable, _, _ = select.select(socks, [], [], 0.001)
            for s in readable:
                with contextlib.suppress(OSError):
                    answered += bool(s.recv(64))
        worker.join()
    finally:
        for s in socks:
            s.close()
    return answered


def test_replacing_the_rules_never_leaves_a_gap(world: World) -> None:
    agent = _reset(world)
    scripts = []
    for name in ("deny-one", "deny-two"):  # same effect, other text: each apply replaces the table
        agent.handle("NetworkPolicy", "SYNC", [ns_policy("x", name, {"podSelector": POD_A})])
        scripts.append(nft.script(agent.tables()))
    try:
        assert _flood(world, "y/a", "x/a", lambda: time.sleep(0.3)) > 0  # the probe itself works
        apply.replace(scripts[0], world.nft())

        def replace_many() -> None:
            for i in range(40):
                apply.replace(scripts[i % 2], world.nft())
        assert _flood(world, "y/a", "x/a", replace_many) == 0
    finally:
        apply.remove(world.nft())


def test_a_failing_script_changes_nothing_and_removal_is_clean(world: World) -> None:
    agent = _reset(world)
    agent.handle("NetworkPolicy", "ADDED", ns_policy("x", "deny", {"podSelector": POD_A}))
    assert agent.reconcile()
    node = _node(world)
    listed = node.exec("nft", "list", "table", "inet", TABLE).stdout
    broken = nft.ruleset(compile.decide([], [], [], NODE)) + "this is no nft\n"
    try:
        with pytest.raises(apply.NftError):
            apply.replace(broken, world.nft())
        assert node.exec("nft", "list", "table", "inet", TABLE).stdout == listed
        assert observe(world, "TCP", 80, 4)[("y/a", "x/a")] is False
    finally:
        apply.remove(world.nft())
    apply.remove(world.nft())  # removing what is not there is fine
    assert TABLE not in node.exec("nft", "list", "tables").stdout.decode()
    assert observe(world, "TCP", 80, 4)[("y/a", "x/a")] is True


def test_the_node_itself_reaches_its_pods_under_deny_all(world: World) -> None:
    """kubelet probes come from the node: never judged, whatever the policies say."""
    agent = _reset(world)
    deny_all = {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for ns in "xyz":
        agent.handle("NetworkPolicy", "ADDED", ns_policy(ns, "deny-all", deny_all))
    assert agent.reconcile()
    try:
        targets = [(_node(world).name, world.ips[p][family]) for p in PODS for family in (4, 6)]
        seen = probe(targets, "TCP", 80, 3.0)
        assert [t for t, ok in seen.items() if not ok] == []
        assert not any(observe(world, "TCP", 80, 4, reachable(("*", "*", False))).values())
    finally:
        apply.remove(world.nft())


V6_BLOCK = {"ipBlock": {"cidr": "fd00::/8", "except": ["fd00::1:0/112"]}}
V4_BLOCK = {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.1.0/24"]}}
MANY_PORTS = [{"port": 80, "endPort": 90}, {"protocol": "SCTP"}, {"protocol": "UDP", "port": "serve-81-udp"},
              {"port": 85}]
CHECKED_SPECS: list[dict[str, Any]] = [
    {"podSelector": {}},
    {"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "ingress": [{}], "egress": [{}]},
    {"podSelector": POD_A,
     "ingress": [{"from": [V6_BLOCK, V4_BLOCK, {"namespaceSelector": NOT_X, "podSelector": POD_B}],
                  "ports": MANY_PORTS}]},
    {**EGRESS, "podSelector": {},
     "egress": [{"to": [{"podSelector": {}}], "ports": [{"port": "serve-80-tcp"}]},
                {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]},
]


def test_rulesets_pass_nft_check_mode() -> None:
    """Each ruleset of the unit tests' x/y/z world for these shapes passes `nft -c -f` in a
    throw-away netns; a broken one does not."""
    from tests.unit.netpol.netpol_world import ME, namespaces, policy, world_pods

    netns = new_netns("h17chk")
    command = ["ip", "netns", "exec", netns, "nft"]
    try:
        ports = {a: {f"veth{i}"} for i, pod in enumerate(world_pods()) for a in pod.addresses()}
        for number, spec in enumerate(CHECKED_SPECS):
            decision = compile.decide([policy("x", spec, name=f"p{number}"), policy("y", spec)], world_pods(),
                                      namespaces(), ME)
            assert decision.policies, spec
            apply.replace(nft.ruleset(decision, ports), command, check_only=True)
        with pytest.raises(apply.NftError):
            apply.replace(nft.ruleset(compile.decide([], [], [], ME)).replace("vmap", "vamp"), command,
                          check_only=True)
    finally:
        delete_netns(netns)


REMOTE_POD = "10.90.0.5"  # r/a, a pod of another node, reached through a route as across nodes


@pytest.fixture(scope="module")
def remote(world: World) -> Iterator[str]:
    """A netns standing for another node and its pod r/a: a veth from the node, routes both ways.
    Traffic between it and the node's pods is routed, not bridged (the cross-node path)."""
    node = _node(world)
    name = new_netns("h17rm")
    servers = None
    try:
        node.exec("ip", "link", "add", "h17rm0", "type", "veth", "peer", "name", "eth0", "netns", name)
        node.exec("ip", "addr", "add", "192.168.77.1/30", "dev", "h17rm0")
        node.exec("ip", "link", "set", "h17rm0", "up")
        node.exec("ip", "route", "add", "10.90.0.0/24", "via", "192.168.77.2")
        for cmd in (["addr", "add", "192.168.77.2/30", "dev", "eth0"], ["link", "set", "eth0", "up"],
                    ["link", "set", "lo", "up"], ["addr", "add", f"{REMOTE_POD}/32", "dev", "lo"],
                    ["route", "add", "10.89.0.0/24", "via", "192.168.77.1", "src", REMOTE_POD]):
            sh("ip", "-n", name, *cmd)
        servers = Servers({"r/a": name})
        yield name
    finally:
        if servers is not None:
            servers.close()
        delete_netns(name)


def test_routed_traffic_to_and_from_another_node_is_judged(world: World, remote: str) -> None:
    """Ingress from a remote pod and egress to it take the routed path through the node; the
    namespace r and its pod exist only as API objects here, as they would for another node."""
    agent = _reset(world)
    agent.handle("Namespace", "ADDED", {"metadata": {"name": "r"}})
    agent.handle("Pod", "ADDED", {"metadata": {"name": "a", "namespace": "r", "labels": {"pod": "a"}},
                                  "spec": {"nodeName": "other"},
                                  "status": {"phase": "Running", "podIPs": [{"ip": REMOTE_POD}]}})
    from_r = {"namespaceSelector": {"matchLabels": {NAME_LABEL: "r"}}}
    agent.handle("NetworkPolicy", "ADDED", ns_policy("x", "from-r", {"podSelector": POD_A,
                                                                      "ingress": [{"from": [from_r]}]}))
    agent.handle("NetworkPolicy", "ADDED", ns_policy("x", "b-no-egress", {**EGRESS, "podSelector": POD_B}))
    agent.handle("NetworkPolicy", "ADDED", ns_policy("y", "a-no-ingress", {"podSelector": POD_A}))
    assert agent.reconcile()
    try:
        inbound = probe([(remote, world.ips[p][4]) for p in ("x/a", "x/b", "y/a")], "TCP", 80, 3.0)
        assert inbound == {(remote, world.ips["x/a"][4]): True,  # admitted by from-r
                           (remote, world.ips["x/b"][4]): True,  # x/b's ingress is open; replies pass
                           (remote, world.ips["y/a"][4]): False}  # a-no-ingress
        outbound = probe([(world.netns[p], REMOTE_POD) for p in ("x/a", "x/b", "x/c")], "TCP", 80, 3.0)
        assert outbound == {(world.netns["x/a"], REMOTE_POD): True, (world.netns["x/b"], REMOTE_POD): False,
                            (world.netns["x/c"], REMOTE_POD): True}
        assert observe(world, "TCP", 80, 4, reachable(("y/a", "x/a", False)))[("y/a", "x/a")] is False
    finally:
        apply.remove(world.nft())


def _link_local(world: World, pod: str) -> tuple[str, int]:
    """The pod's IPv6 link-local address on eth0, and eth0's index (its scope)."""
    out = sh("ip", "-n", world.netns[pod], "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link").stdout
    address = out.decode().split()[3].split("/")[0]
    return address, in_netns(world.netns[pod], lambda: socket.if_nametoindex("eth0"))


def _tcp_link_local(world: World, source: str, target: str) -> bool:
    """Whether `source` completes a TCP handshake with `target`'s link-local address, port 80."""
    address, _ = _link_local(world, target)
    scope = in_netns(world.netns[source], lambda: socket.if_nametoindex("eth0"))

    def connect() -> bool:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.settimeout(2.0)
            try:
                s.connect((address, 80, 0, scope))
            except OSError:
                return False
            return True
    return in_netns(world.netns[source], connect)


GROUP_PORT = 9099
# (family, destination, SO_BROADCAST) of the datagrams every pod's bridge port gets a copy of
FLOODED = [(socket.AF_INET, "10.89.0.255", True), (socket.AF_INET, "255.255.255.255", True),
           (socket.AF_INET6, "ff02::1", False)]


def _flooded_udp(world: World, source: str, receivers: list[str]) -> dict[tuple[str, str], bool]:
    """UDP from `source` to the subnet broadcast, the limited broadcast and all-nodes multicast;
    whether each receiver got each one (a socket on GROUP_PORT per family in each)."""
    def listen() -> list[socket.socket]:
        socks = []
        for family, any_address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = socket.socket(family, socket.SOCK_DGRAM)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((any_address, GROUP_PORT))
            s.setblocking(False)
            socks.append(s)
        return socks

    def send() -> None:
        scope = socket.if_nametoindex("eth0")
        for family, destination, broadcast in FLOODED:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                if broadcast:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                target = (destination, GROUP_PORT, 0, scope)[:2 if family == socket.AF_INET else 4]
                for _ in range(3):
                    s.sendto(destination.encode(), target)

    listeners = {pod: in_netns(world.netns[pod], listen) for pod in receivers}
    try:
        in_netns(world.netns[source], send)
        time.sleep(0.5)
        got = {(pod, dest) : False for pod in receivers for _f, dest, _b in FLOODED}
        for pod, socks in listeners.items():
            for s in socks:
                while True:
                    try:
                        got[(pod, s.recv(64).decode())] = True
                    except BlockingIOError:
                        break
        return got
    finally:
        for socks in listeners.values():
            for s in socks:
                s.close()


def test_link_local_tcp_to_an_isolated_pod_is_judged(world: World) -> None:
    """x/a admits only x/c: x/b reached x/a at its fe80:: address all the same, as the rules
    knew x/a by its API addresses only. A link-local source is no pod peer: x/c is refused
    there too, and reaches x/a at its API address."""
    agent = _reset(world)
    assert _tcp_link_local(world, "x/b", "x/a")  # the probe itself works
    agent.handle("NetworkPolicy", "ADDED", ns_policy("x", "from-c", {
        "podSelector": POD_A, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}]}]}))
    assert agent.reconcile()
    try:
        assert not _tcp_link_local(world, "x/b", "x/a")
        assert not _tcp_link_local(world, "x/c", "x/a")
        assert _tcp_link_local(world, "x/b", "x/c")  # between pods not isolated: as before
        seen = probe([(world.netns["x/c"], world.ips["x/a"][6]), (world.netns["x/b"], world.ips["x/a"][6])],
                     "TCP", 80, 3.0)
        assert list(seen.values()) == [True, False]
    finally:
        apply.remove(world.nft())


def test_link_local_from_an_egress_isolated_pod_is_judged(world: World) -> None:
    """x/b may send to x/c only: not to x/a's fe80:: address from its own fe80:: one."""
    agent = _reset(world)
    to_c = {"to": [{"podSelector": {"matchLabels": {"pod": "c"}}}]}
    agent.handle("NetworkPolicy", "ADDED", ns_policy("x", "to-c", {**EGRESS, "podSelector": POD_B,
                                                                    "egress": [to_c]}))
    assert agent.reconcile()
    try:
        assert not _tcp_link_local(world, "x/b", "x/a")
        assert _tcp_link_local(world, "x/a", "x/c")
    finally:
        apply.remove(world.nft())


def test_broadcast_and_multicast_to_an_ingress_isolated_pod_are_judged_like_unicast(world: World) -> None:
    """Deny-all ingress on x/a: no broadcast or multicast datagram reaches it (x/c, open, gets
    them all). Allowed from x/b on that port: the IPv4 broadcasts, sent from x/b's API address,
    pass; the IPv6 multicast, sent from x/b's link-local address, does not."""
    agent = _reset(world)
    agent.handle("NetworkPolicy", "ADDED", ns_policy("x", "deny", {"podSelector": POD_A}))
    assert agent.reconcile()
    try:
        got = _flooded_udp(world, "x/b", ["x/a", "x/c"])
        assert got == {(pod, dest): pod == "x/c" for pod in ("x/a", "x/c") for _f, dest, _b in FLOODED}
        from_b = {"from": [{"podSelector": POD_B}], "ports": [{"protocol": "UDP", "port": GROUP_PORT}]}
        agent.handle("NetworkPolicy", "MODIFIED", ns_policy("x", "deny", {"podSelector": POD_A,
                                                                           "ingress": [from_b]}))
        assert agent.reconcile()
        assert _flooded_udp(world, "x/b", ["x/a"]) == {
            ("x/a", "10.89.0.255"): True, ("x/a", "255.255.255.255"): True, ("x/a", "ff02::1"): False}
    finally:
        apply.remove(world.nft())


def test_connections_established_before_a_deny_go_on_new_ones_are_denied(world: World) -> None:
    """A policy judges the first packet of a connection: replies and later packets of a
    connection conntrack already holds pass ("ct state established"), so a TCP connection and
    a UDP flow set up while allowed go on after a deny; a new connection, a new flow are denied."""
    agent = _reset(world)
    flows = Flows(world, "y/a", "x/a", 82)
    try:
        assert flows.flowing() == (True, True)
        assert flows.new_ones() == (True, True)  # the probes themselves work
        agent.handle("NetworkPolicy", "ADDED", ns_policy("x", "deny", {"podSelector": POD_A}))
        assert agent.reconcile()
        assert flows.new_ones() == (False, False)
        assert flows.flowing() == (True, True)
    finally:
        flows.close()
        apply.remove(world.nft())


def test_egress_to_the_node_itself_is_judged(world: World) -> None:
    """The API exempts only ingress from the pod's node (kubelet probes): x, isolated for
    egress, reaches the node's addresses only where an egress rule allows them (an ipBlock), in
    both families, while the node still reaches x (its replies are replies) and y, not
    isolated, still reaches the node."""
    agent = _reset(world)
    gateways = {4: "10.89.0.1", 6: "fd89::1"}  # the node's addresses on the pods' bridge
    servers = Servers({"node": _node(world).name})
    sources = ("x/a", "x/b", "y/a")

    def seen(family: int) -> dict[str, bool]:
        out = probe([(world.netns[p], gateways[family]) for p in sources], "TCP", 80, 1.5)
        return {p: out[(world.netns[p], gateways[family])] for p in sources}
    try:
        agent.handle("NetworkPolicy", "ADDED", ns_policy("x", "no-egress", {**EGRESS, "podSelector": {}}))
        assert agent.reconcile()
        for family in (4, 6):
            assert seen(family) == {"x/a": False, "x/b": False, "y/a": True}, family
        from_node = probe([(_node(world).name, world.ips[p][6]) for p in ("x/a", "x/b")], "TCP", 80, 3.0)
        assert all(from_node.values())
        to_node = {"to": [{"ipBlock": {"cidr": f"{gateways[4]}/32"}},
                          {"ipBlock": {"cidr": f"{gateways[6]}/128"}}]}
        agent.handle("NetworkPolicy", "ADDED", ns_policy("x", "to-node", {**EGRESS, "podSelector": POD_A,
                                                                          "egress": [to_node]}))
        assert agent.reconcile()
        for family in (4, 6):
            assert seen(family) == {"x/a": True, "x/b": False, "y/a": True}, family
    finally:
        servers.close()
        apply.remove(world.nft())


def _listing(world: World) -> list[str]:
    """Both tables as nft -j lists them, less the handles (the kernel's numbering of what it got)."""
    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k != "handle"}
        return [strip(v) for v in obj] if isinstance(obj, list) else obj

    objects = [o for family in ("inet", "bridge") for o in json.loads(
        _node(world).exec("nft", "-j", "list", "table", family, TABLE).stdout)["nftables"]]
    return sorted(json.dumps(strip(o), sort_keys=True) for o in objects if "metainfo" not in o)


@pytest.mark.parametrize("in_process", [False, True], ids=["exec", "libnftables"])
def test_events_applied_as_changes_leave_what_a_fresh_apply_of_the_end_state_leaves(
        world: World, in_process: bool) -> None:
    """Each event after the first apply is a change in one transaction (nft monitor sees no table
    deleted or added): only elements as one netlink batch (nfnl.py), else by nft (exec'd, or
    through libnftables in process as the node controller runs it); and the tables it leaves
    equal those a fresh apply of the last state by exec'd nft makes."""
    if in_process and not libnft.available():
        pytest.skip("libnftables not installed")
    agent = _reset(world)
    scripts: list[str] = []
    batches: list[str] = []
    host = _node(world).name

    def apply_script(script: str) -> None:
        scripts.append(script)
        if in_process:
            in_netns(host, lambda: apply.replace(script))
        else:
            apply.replace(script, world.nft())

    agent.apply_script = apply_script

    def elements(change: str, model: delta.Model) -> bool:
        done = in_netns(host, lambda: nfnl.apply(change, model))
        batches.extend([change] if done else [])
        return done

    agent.apply_elements = elements
    monitor = subprocess.Popen(["ip", "netns", "exec", host, "nft", "monitor"],
                               stdout=subprocess.PIPE, text=True)
    team_y = {"namespaceSelector": {"matchLabels": {"team": "y"}}}
    only_y = {"podSelector": POD_A, "ingress": [{"from": [team_y], "ports": [{"port": 80}]}]}
    relabelled = {**world.pod_object("x/b"), "metadata": {"name": "b", "namespace": "x",
                                                          "labels": {"pod": "a"}}}
    deny_c = ns_policy("x", "deny-c", {"podSelector": {"matchLabels": {"pod": "c"}}})
    events = [("NetworkPolicy", "ADDED", deny_c),
              ("NetworkPolicy", "ADDED", ns_policy("x", "only-y", only_y)),
              ("Namespace", "MODIFIED", {"metadata": {"name": "y", "labels": {"team": "y"}}}),
              ("Pod", "MODIFIED", relabelled),  # x/b now selected by only-y
              ("NetworkPolicy", "MODIFIED", ns_policy("x", "only-y", {**only_y, "ingress": [
                  *only_y["ingress"], {"from": [{"podSelector": POD_B}], "ports": [{"port": 81}]}]})),
              ("NetworkPolicy", "DELETED", deny_c),
              ("Pod", "MODIFIED", world.pod_object("x/b"))]  # and back
    try:
        time.sleep(0.3)  # the monitor listens
        for event in events:
            agent.handle(*event)
            assert agent.reconcile()
        changes = _listing(world)
        apply.replace(agent.applied or "", world.nft())  # the end state, replaced whole
        assert changes == _listing(world)
        assert observe(world, "TCP", 80, 4, ONLY_Y_TO_XA) == ONLY_Y_TO_XA
    finally:
        monitor.terminate()
        seen = monitor.communicate(timeout=5)[0]
        apply.remove(world.nft())
    assert len(scripts) + len(batches) == len(events) and not any("delete table" in s for s in scripts)
    assert batches and any("flush chain" in s for s in scripts)
    changed = seen[:seen.index(f"delete table inet {TABLE}")]  # up to the fresh apply
    assert "add rule inet" in changed and not re.search(r"^(add|delete) table", changed, re.MULTILINE)
