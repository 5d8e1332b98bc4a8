"""The bridge plugin's ADD, CHECK, DEL and GC handed an in-memory host (fakehost.py): no root, no
module patched.

The failure tests run ADD once to count its steps, then once per step with that step failing,
and assert each time that nothing of the attachment is left: no veth on either side (so no
pod address), no IPAM reservation, no masquerade rule; on a host that already serves a pod,
that the host is exactly as before.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cni_plugin import verbs
from cni_plugin.netlink import Link
from cnikit import skel
from cnikit.removals import Removals
from cnikit.spec.version import SUPPORTED, at_least
from ipam.index import Indexes
from ipam.plugin import list_reservations

from .fakehost import HOST, FakeHost, FakeSocket

POD = "/run/netns/fake-pod"
CID = "ctr-fake"


@pytest.fixture
def kernel() -> FakeHost:
    kernel = FakeHost()
    kernel.new_netns(POD)
    return kernel


def _conf(tmp_path: Path, version: str = "1.1.0", **extra: Any) -> dict[str, Any]:
    ranges = [[{"subnet": "10.77.0.0/24"}], [{"subnet": "fd77::/64"}]]
    return {"cniVersion": version, "name": "fakenet", "type": "pybridge", "bridge": "pbfake0",
            "isGateway": True, "isDefaultGateway": True, "ipMasq": True,
            "ipam": {"type": "pyipam", "dataDir": str(tmp_path / "ipam"), "ranges": ranges}, **extra}


def _call(
    kernel: FakeHost, verb: str, conf: dict[str, Any], ipam_indexes: Indexes | None = None, cid: str = CID,
    netns: str = POD,
) -> tuple[int, dict[str, Any] | None]:
    env = {"CNI_COMMAND": verb, "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
           "CNI_PATH": "/nonexistent"}
    out = io.StringIO()
    code = skel.run(lambda: verbs.VERBS, env, io.BytesIO(json.dumps(conf).encode()), out,
                    program="pybridge", stderr=io.StringIO(), ipam_indexes=ipam_indexes, host=kernel)
    return code, json.loads(out.getvalue()) if out.getvalue() else None


def _nothing_left(kernel: FakeHost, tmp_path: Path) -> None:
    assert kernel.links(HOST, "veth") == [] and kernel.links(POD) == []
    assert kernel.addresses_in(POD) == []
    assert list_reservations(str(tmp_path / "ipam"), "fakenet") == []
    assert kernel.masq == set()
    assert kernel.port_chains == {}
    assert not list((tmp_path / "ipam" / ".pybridge-netns").glob("fakenet/*"))  # no netns record


def test_the_delegated_pyipam_uses_the_callers_store_indexes(
    kernel: FakeHost, tmp_path: Path, ipam_indexes: Indexes
) -> None:
    conf = _conf(tmp_path)
    assert _call(kernel, "ADD", conf, ipam_indexes)[0] == 0
    assert _call(kernel, "DEL", conf, ipam_indexes)[0] == 0
    kept = ipam_indexes.of(str(tmp_path / "ipam" / "fakenet"))
    assert kept is not None  # it holds what DEL read: the ADD's two reservations
    assert sorted(str(r.ip) for r in kept.entries.values() if r is not None) == ["10.77.0.2", "fd77::2"]
    _nothing_left(kernel, tmp_path)


@pytest.mark.parametrize("version", SUPPORTED)
def test_add_check_del(kernel: FakeHost, tmp_path: Path, version: str) -> None:
    conf = _conf(tmp_path, version)
    code, result = _call(kernel, "ADD", conf)
    assert code == 0 and result is not None, result
    assert [ip["address"] for ip in result["ips"]] == ["10.77.0.2/24", "fd77::2/64"]
    bridge, host, pod = kernel.links(HOST, "bridge")[0], kernel.links(HOST, "veth")[0], kernel.links(POD)[0]
    assert host.master == bridge.index and host.up and pod.up and pod.name == "eth0"
    assert [str(a) for a in kernel.addresses_in(POD)] == ["10.77.0.2/24", "fd77::2/64"]
    assert sorted(map(str, kernel.addresses_in(HOST))) == ["10.77.0.1/24", "fd77::1/64"]
    assert sorted(r[:2] for r in kernel.namespaces[POD].routes) == [("0.0.0.0/0", "10.77.0.1"),
                                                                    ("::/0", "fd77::1")]
    assert kernel.masq == {("fakenet", CID, "eth0")}
    assert [row[2] for row in list_reservations(str(tmp_path / "ipam"), "fakenet")] == [CID, CID]
    assert (tmp_path / "ipam" / ".pybridge-netns" / "fakenet" / f"{CID}:eth0").read_text() == POD
    if at_least(version, "0.4.0"):  # CHECK exists from 0.4.0 on
        assert _call(kernel, "CHECK", {**conf, "prevResult": result})[0] == 0
    assert _call(kernel, "DEL", conf) == (0, None)
    _nothing_left(kernel, tmp_path)
    assert kernel.links(HOST, "bridge") == [bridge]  # the bridge is shared: it stays


NO_ROUTER = {"eth0/accept_ra": "0", "eth0/autoconf": "0", "eth0/addr_gen_mode": "0"}


@pytest.mark.parametrize(("families", "extra", "written"), [
    ("dual-stack", {}, {"lo/disable_ipv6": "0", "eth0/disable_ipv6": "0", "eth0/accept_dad": "0",
                        **NO_ROUTER}),
    ("IPv4", {}, {"eth0/disable_ipv6": "1"}),
    ("IPv4", {"podIPv6LinkLocal": True}, NO_ROUTER),  # the pod's IPv6 as the netns has it, no RA
    ("no IPAM", {"ipam": {}, "isGateway": False, "isDefaultGateway": False, "ipMasq": False}, {}),
])
def test_pod_ipv6_is_on_with_ipv6_addresses_and_off_with_ipv4_ones_only(
    kernel: FakeHost, tmp_path: Path, families: str, extra: dict[str, Any], written: dict[str, str]
) -> None:
    conf = _conf(tmp_path, **extra)
    if families == "IPv4":
        conf["ipam"]["ranges"] = conf["ipam"]["ranges"][:1]
    assert _call(kernel, "ADD", conf)[0] == 0
    prefix = f"{POD}:net/ipv6/conf/"
    pod_knobs = {k.removeprefix(prefix): v for k, v in kernel.sysctls.items() if k.startswith(prefix)}
    assert {k: pod_knobs.get(k) for k in ("lo/disable_ipv6", "eth0/disable_ipv6")} == {
        k: written.get(k) for k in ("lo/disable_ipv6", "eth0/disable_ipv6")}
    assert written.items() <= pod_knobs.items()
    assert kernel.written_while_up == []  # set before the link comes up: no DAD, MLD or RS sent
    assert kernel.links(POD)[0].up


def test_pod_ipv6_that_cannot_be_turned_off_fails_the_add_and_leaves_nothing(
    kernel: FakeHost, tmp_path: Path
) -> None:
    kernel.read_only_sysctls = True
    conf = _conf(tmp_path)
    conf["ipam"]["ranges"] = conf["ipam"]["ranges"][:1]
    code, error = _call(kernel, "ADD", conf)
    assert code == 1 and error is not None, error
    assert error["code"] == 999 and error["msg"] == "failed to turn IPv6 off on eth0", error
    assert "podIPv6LinkLocal" in error["details"] and "Read-only" in error["details"], error
    _nothing_left(kernel, tmp_path)


@pytest.mark.parametrize("source_check", [True, False])
def test_the_port_chain_follows_source_check_and_check_reports_it_missing(
    kernel: FakeHost, tmp_path: Path, source_check: bool
) -> None:
    conf = _conf(tmp_path, sourceCheck=source_check)
    _, result = _call(kernel, "ADD", conf)
    assert result is not None
    host, pod = result["interfaces"][1], result["interfaces"][2]
    expected = {("fakenet", CID, "eth0"): (host["name"], pod["mac"])} if source_check else {}
    assert kernel.port_chains == expected
    assert _call(kernel, "CHECK", {**conf, "prevResult": result})[0] == 0
    kernel.port_chains.clear()
    code, error = _call(kernel, "CHECK", {**conf, "prevResult": result})
    if source_check:
        assert code == 1 and error is not None and error["msg"] == "source check rules missing", error
    else:
        assert code == 0
    assert _call(kernel, "DEL", conf) == (0, None)
    _nothing_left(kernel, tmp_path)


def test_check_reports_what_drifted(kernel: FakeHost, tmp_path: Path) -> None:
    conf = _conf(tmp_path)
    _, result = _call(kernel, "ADD", conf)
    pod = kernel.links(POD)[0]
    kernel.namespaces[POD].addrs[pod.index].remove(kernel.addresses_in(POD)[0])
    code, error = _call(kernel, "CHECK", {**conf, "prevResult": result})
    assert code == 1 and error is not None and error["msg"] == "CHECK failed: address missing"
    kernel.masq.clear()
    kernel.namespaces[POD].links.clear()
    code, error = _call(kernel, "CHECK", {**conf, "prevResult": result})
    assert error is not None and error["msg"] == "CHECK failed: interface missing"


def test_an_add_the_ipam_refuses_leaves_no_netns_record(kernel: FakeHost, tmp_path: Path) -> None:
    conf = _conf(tmp_path)
    conf["ipam"]["ranges"] = [[{"subnet": "10.77.0.0/30"}]]  # one address: .2
    assert _call(kernel, "ADD", conf)[0] == 0
    kernel.new_netns("/run/netns/fake-other")
    code, error = _call(kernel, "ADD", conf, cid="other", netns="/run/netns/fake-other")  # the pool is full
    assert code == 1 and error is not None and error["code"] == 110, error
    assert os.listdir(tmp_path / "ipam" / ".pybridge-netns" / "fakenet") == [f"{CID}:eth0"]


def test_a_failure_at_any_step_of_add_leaves_nothing_behind(kernel: FakeHost, tmp_path: Path) -> None:
    assert _call(kernel, "ADD", _conf(tmp_path))[0] == 0
    steps = list(kernel.steps)
    assert len(steps) > 10 and "add bridge pbfake0" in steps and "masquerade setup" in steps
    for n, step in enumerate(steps, start=1):
        failing = FakeHost()
        failing.new_netns(POD)
        failing.fail_at = n
        work = tmp_path / f"fail-{n}"
        code, error = _call(failing, "ADD", _conf(work))
        assert code == 1 and error is not None and "injected failure" in error["details"], (step, error)
        _nothing_left(failing, work)


def _serving_one_pod(tmp_path: Path) -> FakeHost:
    """A host whose bridge, gateway addresses and MAC pin an ADD of another pod already made."""
    kernel = FakeHost()
    kernel.new_netns("/run/netns/fake-first")
    kernel.new_netns(POD)
    conf = _conf(tmp_path, sourceCheck=True)
    assert _call(kernel, "ADD", conf, cid="first", netns="/run/netns/fake-first")[0] == 0
    return kernel


def test_a_failure_at_any_step_of_add_leaves_a_serving_host_as_it_was(tmp_path: Path) -> None:
    counted = _serving_one_pod(tmp_path / "count")
    before = len(counted.steps)
    assert _call(counted, "ADD", _conf(tmp_path / "count", sourceCheck=True))[0] == 0
    steps = counted.steps[before:]
    assert "add address 10.77.0.3/24" in steps and "add route 0.0.0.0/0" in steps
    assert steps[-3:] == ["sysctl net/ipv4/ip_forward", "sysctl net/ipv6/conf/all/forwarding",
                          "masquerade setup"]
    assert "source check setup" in steps
    for n, step in enumerate(steps, start=1):
        work = tmp_path / f"fail-{n}"
        kernel = _serving_one_pod(work)
        state, reserved = kernel.state(), list_reservations(str(work / "ipam"), "fakenet")
        kernel.fail_at = len(kernel.steps) + n
        code, error = _call(kernel, "ADD", _conf(work, sourceCheck=True))
        assert code == 1 and error is not None and "injected failure" in error["details"], (step, error)
        assert kernel.state() == state, step
        assert list_reservations(str(work / "ipam"), "fakenet") == reserved, step


def test_the_bridge_mac_pinned_is_remembered_by_the_host_not_the_process(tmp_path: Path) -> None:
    kernel = _serving_one_pod(tmp_path)
    bridge = kernel.links(HOST, "bridge")[0]
    assert kernel.pinned == {(bridge.index, bridge.name): bridge.mac}
    before = len(kernel.steps)
    assert _call(kernel, "ADD", _conf(tmp_path))[0] == 0
    assert f"set link {bridge.index}" not in kernel.steps[before:]  # pinned already: not set again
    # Another host whose bridge looks the same (index, name, MAC) was never pinned: it is, now.
    other = FakeHost()
    other.new_netns(POD)
    other.namespaces[HOST].links[bridge.index] = bridge
    other._next_index = bridge.index
    assert _call(other, "ADD", _conf(tmp_path / "other"))[0] == 0
    assert f"set link {bridge.index}" in other.steps and other.pinned == kernel.pinned


def test_del_through_deferred_removal_detaches_now_and_deletes_later(
    kernel: FakeHost, tmp_path: Path
) -> None:
    conf = _conf(tmp_path)
    assert _call(kernel, "ADD", conf)[0] == 0
    removals = Removals()
    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": CID, "CNI_NETNS": POD, "CNI_IFNAME": "eth0",
           "CNI_PATH": "/nonexistent"}
    out = io.StringIO()
    assert skel.run(lambda: verbs.VERBS, env, io.BytesIO(json.dumps(conf).encode()), out, program="pybridge",
                    stderr=io.StringIO(), removals=removals, host=kernel) == 0
    assert removals.drain()
    _nothing_left(kernel, tmp_path)


def test_gc_removes_the_rules_of_attachments_not_valid(kernel: FakeHost, tmp_path: Path) -> None:
    conf = _conf(tmp_path, sourceCheck=True)
    kernel.new_netns("/run/netns/fake-gone")
    assert _call(kernel, "ADD", conf)[0] == 0
    assert _call(kernel, "ADD", conf, cid="gone", netns="/run/netns/fake-gone")[0] == 0
    valid = {"cni.dev/valid-attachments": [{"containerID": CID, "ifname": "eth0"}]}
    assert _call(kernel, "GC", {**conf, **valid}) == (0, None)
    assert kernel.masq == {("fakenet", CID, "eth0")} and set(kernel.port_chains) == {("fakenet", CID, "eth0")}
    assert [row[2] for row in list_reservations(str(tmp_path / "ipam"), "fakenet")] == [CID, CID]


def test_node_agent_routes_through_the_seam() -> None:
    from cni_plugin.node import effects, model

    sock = FakeHost().netlink()
    mine, gone = model.Route("10.70.2.0/24", "172.18.0.3"), model.Route("10.70.9.0/24", "172.18.0.9")
    assert effects.apply_routes(sock, [], [mine]) == []
    assert effects.current_routes(sock) == {mine}
    errors = effects.apply_routes(sock, [mine, gone], [])  # one gone already: not an error
    assert errors == [] and effects.current_routes(sock) == set()


def test_node_agent_adds_never_replaces_a_route_it_does_not_own() -> None:
    from cni_plugin.node import effects, model

    sock = FakeHost().netlink()
    sock.ns.routes.append(("10.70.2.0/24", "172.18.0.99", 7))  # the admin's (an oif, no owner)
    route = model.Route("10.70.2.0/24", "172.18.0.3")
    assert effects.foreign_destinations(sock) == {"10.70.2.0/24"}
    errors = effects.apply_routes(sock, [], [route])  # appeared after the plan: the kernel says EEXIST
    assert errors == ["add 10.70.2.0/24 via 172.18.0.3: File exists"]
    assert sock.ns.routes == [("10.70.2.0/24", "172.18.0.99", 7)] and effects.current_routes(sock) == set()
    moved = model.Route("10.70.2.0/24", "172.18.0.4")
    sock.ns.routes = [("10.70.2.0/24", "172.18.0.3", -effects.RTPROT_PYBRIDGE)]
    assert effects.apply_routes(sock, [], [moved], owned=[route]) == []  # its own: replaced
    assert effects.current_routes(sock) == {moved}


@pytest.mark.parametrize("deferred", [False, True])
def test_del_hands_the_source_check_the_port_it_verified(
    kernel: FakeHost, tmp_path: Path, deferred: bool
) -> None:
    conf = _conf(tmp_path, sourceCheck=True)
    _, result = _call(kernel, "ADD", conf)
    assert result is not None
    removals = Removals() if deferred else None
    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": CID, "CNI_NETNS": POD, "CNI_IFNAME": "eth0",
           "CNI_PATH": "/nonexistent"}
    assert skel.run(lambda: verbs.VERBS, env, io.BytesIO(json.dumps(conf).encode()), io.StringIO(),
                    program="pybridge", stderr=io.StringIO(), removals=removals, host=kernel) == 0
    # through the agent (its removals) the teardown is queued by DEL and done after its answer
    assert ("source check teardown queued" in kernel.steps) == deferred
    assert removals is None or removals.drain()
    assert kernel.teardown_ports == [result["interfaces"][1]["name"]]
    _nothing_left(kernel, tmp_path)


def test_a_pods_own_veth_named_like_ours_gets_no_port_verified(kernel: FakeHost, tmp_path: Path) -> None:
    """The pod deletes its eth0 and makes a veth pair of its own named eth0, with the index of
    the victim's eth0 and, as its peer, the index of the victim's host port: only the netns the
    host finds that port's peer in tells them apart."""
    conf = _conf(tmp_path, sourceCheck=True)
    victim = kernel.new_netns("/run/netns/fake-victim")
    assert _call(kernel, "ADD", conf)[0] == 0
    assert _call(kernel, "ADD", conf, cid="victim", netns=victim)[0] == 0
    [mine] = kernel.links(POD)
    [theirs] = kernel.links(victim)
    FakeSocket(kernel, POD).delete_link(mine.index)
    pod = kernel.namespaces[POD]
    assert theirs.peer_index is not None
    pod.links[theirs.index] = replace(theirs, mac=mine.mac)  # eth0, its peer index the victim's port
    pod.links[theirs.peer_index] = Link(theirs.peer_index, "x", mine.mac, 1500, "veth",
                                        peer_index=theirs.index)
    assert _call(kernel, "DEL", conf) == (0, None)
    assert kernel.teardown_ports == [None]
    assert set(kernel.port_chains) == {("fakenet", "victim", "eth0")}
