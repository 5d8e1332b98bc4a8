"""A new pod is isolated until the node controller placed it (nft.Fence), and an ADD's claim places it
(cni_plugin/placement.py, netpol/claims.py). The packets: tests/netns/test_netpol_placement.py."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from cni_plugin import placement
from cni_plugin.node.netpol import claims, compile, nft, objects
from cni_plugin.node.netpol.policy_controller import PolicyController

NODE = "n1"
FENCE = nft.Fence("pyb0", (ipaddress.ip_network("10.244.0.0/16"), ipaddress.ip_network("fd44::/48")))
DENY = {"metadata": {"name": "deny", "namespace": "x"}, "spec": {"podSelector": {}}}


def pod(name: str, ips: tuple[str, ...] = (), node: str = NODE, ns: str = "x") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "labels": {"pod": name}}, "spec": {"nodeName": node},
            "status": {"phase": "Running", "podIPs": [{"ip": ip} for ip in ips]}}


def chain(text: str, table: str, name: str) -> list[str]:
    body = text[text.index(f"table {table} pybridge_netpol {{"):]
    body = body[body.index(f"\tchain {name} {{"):]
    return [line.strip() for line in body[:body.index("\t}")].splitlines()[2:]]  # after the hook line


def elements(text: str, name: str) -> str:
    body = text[text.index(f"\tset {name} {{"):]
    return body[:body.index("\t}")]


def test_an_address_not_placed_is_dropped_both_ways_before_any_policy() -> None:
    world = [objects.read("Pod", pod("a", ("10.244.1.2", "fd44::2")))[0]]
    text = nft.ruleset(compile.decide([], world, [], NODE), fence=FENCE)  # type: ignore[arg-type]
    egress, ingress = chain(text, "inet", "forward_egress"), chain(text, "inet", "forward_ingress")
    assert egress[1:3] == ['iifname "pyb0" ip saddr { 10.244.0.0/16 } ip saddr != @placed4 drop',
                           'iifname "pyb0" ip6 saddr { fd44::/48 } ip6 saddr != @placed6 drop']
    assert ingress[1:3] == ['oifname "pyb0" ip daddr { 10.244.0.0/16 } ip daddr != @placed4 drop',
                            'oifname "pyb0" ip6 daddr { fd44::/48 } ip6 daddr != @placed6 drop']
    # neighbour discovery first, then the fence, and only then conntrack: an entry left by the
    # address's last pod must not let a pod not placed through
    assert egress[0].startswith("icmpv6 type") and ingress[0].startswith("icmpv6 type")
    assert egress[3] == ingress[3] == "ct state established,related accept"
    assert "10.244.1.2" in elements(text, "placed4") and "fd44::2" in elements(text, "placed6")
    # a placed pod no policy selects stays open: it is in no verdict map
    assert "10.244.1.2 : jump" not in text


def test_without_a_fence_nothing_changes() -> None:
    decision = compile.decide([], [objects.read("Pod", pod("a", ("10.244.1.2",)))[0]], [], NODE)  # type: ignore[list-item]
    assert nft.ruleset(decision) == nft.ruleset(decision, fence=nft.Fence("pyb0", ()))
    assert nft.ruleset(decision) == nft.ruleset(decision, fence=nft.Fence('a" drop', FENCE.networks))
    assert "placed" not in nft.ruleset(decision)


def test_only_this_nodes_pods_are_placed() -> None:
    pods = [objects.read("Pod", p)[0] for p in (pod("a", ("10.244.1.2",)), pod("b", ("10.244.2.2",), "n2"))]
    assert compile.decide([], pods, [], NODE).placed == {ipaddress.ip_address("10.244.1.2")}  # type: ignore[arg-type]


def _agent() -> PolicyController:
    agent = PolicyController(NODE, lambda _s: None, lambda *_a, **_k: None, fence=FENCE)
    agent.handle("NetworkPolicy", "SYNC", [DENY])
    agent.handle("Namespace", "SYNC", [{"metadata": {"name": "x"}}])
    agent.handle("ClusterNetworkPolicy", "SYNC", [])
    return agent


def test_no_fence_while_the_cluster_has_no_policy() -> None:
    agent = PolicyController(NODE, lambda _s: None, lambda *_a, **_k: None, fence=FENCE)
    for kind in ("NetworkPolicy", "Namespace", "ClusterNetworkPolicy"):
        agent.handle(kind, "SYNC", [])
    agent.handle("Pod", "SYNC", [pod("a", ("10.244.1.2",))])
    assert agent.reconcile() and "placed4" not in (agent.applied or "")
    agent.handle("NetworkPolicy", "ADDED", DENY)
    assert agent.reconcile() and "ip saddr != @placed4 drop" in (agent.applied or "")
    assert "10.244.1.2" in elements(agent.applied or "", "placed4")


def claim(name: str, *ips: str, ns: str = "x") -> placement.Claim:
    return placement.Claim(namespace=ns, name=name, ips=ips)  # type: ignore[arg-type]


def test_a_claim_places_a_seen_pod_under_its_policies() -> None:
    agent = _agent()
    agent.handle("Pod", "SYNC", [pod("new")])  # seen, no IP in the API yet
    assert agent.reconcile()
    assert "10.244.1.9" not in agent.applied  # type: ignore[operator]
    agent.handle("Claim", "ADDED", claim("new", "10.244.1.9"))
    assert agent.reconcile()
    text = agent.applied or ""
    assert "10.244.1.9" in elements(text, "placed4")
    assert "10.244.1.9 : jump ingress_" in text  # the default deny selects it


def test_a_claim_waits_for_its_pod_and_the_api_wins() -> None:
    agent = _agent()
    agent.handle("Pod", "SYNC", [])
    agent.handle("Claim", "ADDED", claim("new", "10.244.1.9"))
    agent.reconcile()
    assert "10.244.1.9" not in (agent.applied or "")  # not seen: its namespace unknown, isolated
    agent.handle("Pod", "ADDED", pod("new"))
    agent.reconcile()
    assert "10.244.1.9" in elements(agent.applied or "", "placed4")
    agent.handle("Pod", "MODIFIED", pod("new", ("10.244.1.7",)))
    agent.reconcile()
    assert "10.244.1.9" not in (agent.applied or "") and "10.244.1.7" in (agent.applied or "")
    assert not agent.claims.by_pod


def test_claims_of_other_nodes_deleted_or_expired_pods_are_dropped() -> None:
    now = [0.0]
    store = claims.Claims(clock=lambda: now[0])
    pods = {("x", "far"): objects.read("Pod", pod("far", node="n2"))[0]}
    store.add(claim("far", "10.244.1.3"))
    store.add(claim("unseen", "10.244.1.4"))
    assert [p.addresses() for p in store.pods(pods, NODE)] == [()]  # type: ignore[arg-type]
    assert list(store.by_pod) == [("x", "unseen")]
    now[0] = claims.TTL + 1
    list(store.pods({}, NODE))
    assert not store.by_pod
    agent = _agent()
    agent.handle("Pod", "SYNC", [pod("new")])
    agent.handle("Claim", "ADDED", claim("new", "10.244.1.9"))
    agent.handle("Pod", "DELETED", pod("new"))
    assert not agent.claims.by_pod


def test_claims_are_bounded() -> None:
    store = claims.Claims()
    for k in range(claims.MAX + 5):
        store.add(claim(f"p{k}", "10.244.1.2"))
    assert len(store.by_pod) == claims.MAX and ("x", "p0") not in store.by_pod


ENV = {"CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=web-1;K8S_POD_UID=u"}
RESULT = json.dumps({"ips": [{"address": "10.244.1.9/24"}, {"address": "fd44::9/64"}]})


def test_an_add_result_becomes_a_claim() -> None:
    got = placement.claim_of(ENV, RESULT)
    assert got == claim("web-1", "10.244.1.9", "fd44::9")
    assert placement.claim_of({}, RESULT) is None  # not Kubernetes: no claim
    assert placement.claim_of({"CNI_ARGS": "K8S_POD_NAMESPACE=x"}, RESULT) is None
    assert placement.claim_of(ENV, "not json") is None
    assert placement.claim_of(ENV, json.dumps({"ips": []})) is None
    assert placement.claim_of({"CNI_ARGS": "broken"}, RESULT) is None


@pytest.mark.parametrize("data", [
    b"", b"\xff\xfe", b"[]", b"null", b'{"namespace": "x", "name": "a", "ips": ["10.0.0.1"], "x": 1}',
    b'{"namespace": "X", "name": "a", "ips": ["10.0.0.1"]}',
    b'{"namespace": "x", "name": "a\\"} drop", "ips": ["10.0.0.1"]}',
    b'{"namespace": "x", "name": "a", "ips": ["10.0.0.1", "10.0.0.2", "10.0.0.3"]}',
    b'{"namespace": "x", "name": "a", "ips": ["fe80::1%eth0"]}',
    b'{"namespace": "x", "name": "a", "ips": []}', b"{" * 2000])
def test_what_is_not_a_claim_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        placement.read(data)


def test_a_claim_goes_over_the_socket_and_nothing_listening_is_no_error(tmp_path: Path) -> None:
    path = str(tmp_path / "netpol.sock")
    assert not placement.after_add(ENV, RESULT, path)
    with claims.bind(path) as sock:
        assert oct(Path(path).stat().st_mode & 0o777) == "0o600"
        assert placement.after_add(ENV, RESULT, path)
        assert placement.read(sock.recv(placement.MAX_DATAGRAM)) == claim("web-1", "10.244.1.9", "fd44::9")
        assert not placement.after_add({}, RESULT, path)
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(placement.MAX_DATAGRAM)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM):
        pass


def test_a_relist_keeps_a_placed_pod_placed() -> None:
    agent = _agent()
    agent.handle("Pod", "SYNC", [pod("new")])
    agent.handle("Claim", "ADDED", claim("new", "10.244.1.9"))
    agent.reconcile()
    relists = (("Pod", [pod("new")]), ("NetworkPolicy", [DENY]), ("Namespace", [{"metadata": {"name": "x"}}]))
    for kind, listed in relists:
        agent.handle(kind, "SYNC", listed)  # the watch was lost: a fresh list of each kind
        agent.reconcile()
        assert "10.244.1.9 : jump ingress_" in (agent.applied or ""), kind


def _recording_agent(calls: list[Any], fail: list[bool] | None = None,
                     logged: list[str] | None = None) -> PolicyController:
    """An agent whose applies and conntrack deletions are written to `calls`, in order, its log
    events to `logged`; the deletion raises while fail[0]."""
    def forget(addresses: Any) -> int:
        if fail and fail[0]:
            raise OSError(1, "Operation not permitted")
        calls.append(("forget", [str(a) for a in addresses]))
        return 0

    agent = PolicyController(NODE, lambda _s: calls.append("apply"),
                        lambda event, **_k: (logged if logged is not None else []).append(event),
                        fence=FENCE, forget=forget)
    agent.handle("NetworkPolicy", "SYNC", [DENY])
    agent.handle("Namespace", "SYNC", [{"metadata": {"name": "x"}}])
    agent.handle("ClusterNetworkPolicy", "SYNC", [])
    return agent


def test_conntrack_of_an_address_goes_before_a_new_pod_is_placed_there() -> None:
    calls: list[Any] = []
    agent = _recording_agent(calls)
    agent.handle("Pod", "SYNC", [pod("a", ("10.244.1.2",))])
    assert agent.reconcile() and calls == ["apply"]  # the fence comes up: the pods there keep theirs
    agent.handle("Pod", "ADDED", pod("b", ("10.244.1.3", "fd44::3")))
    assert agent.reconcile()
    assert calls[1:] == [("forget", ["10.244.1.3", "fd44::3"]), "apply"]  # before the placing transaction
    agent.handle("Pod", "DELETED", pod("b", ("10.244.1.3", "fd44::3")))
    assert agent.reconcile() and calls[3:] == ["apply"]  # b's addresses unplaced
    agent.handle("Pod", "ADDED", pod("c"))
    agent.handle("Claim", "ADDED", claim("c", "10.244.1.3"))  # another pod at b's address
    assert agent.reconcile()
    assert calls[4:] == [("forget", ["10.244.1.3"]), "apply"]
    agent.handle("Pod", "MODIFIED", pod("a", ("10.244.1.2",)) | {"metadata": {
        "name": "a", "namespace": "x", "labels": {"pod": "a", "role": "other"}}})
    agent.reconcile()
    assert calls[6:] == []  # the same pods where they were (relabelled): nothing goes


def test_an_address_that_passes_from_one_pod_to_another_at_once_is_unplaced_first() -> None:
    """b goes and c comes at its address in one batch: the table in force places the address for
    b, whose rules may let entries form while they are deleted, so it is unplaced first."""
    calls: list[Any] = []
    agent = _recording_agent(calls)
    agent.handle("Pod", "SYNC", [pod("b", ("10.244.1.3",), ns="y")])  # y: no policy, open
    agent.reconcile()
    agent.handle("Pod", "DELETED", pod("b", ("10.244.1.3",), ns="y"))
    agent.handle("Pod", "ADDED", pod("c", ("10.244.1.3",)))
    assert agent.reconcile() and agent.failed  # tried again
    assert calls[1:] == ["apply"] and "10.244.1.3" not in elements(agent.applied or "", "placed4")
    assert agent.reconcile() and not agent.failed
    assert calls[2:] == [("forget", ["10.244.1.3"]), "apply"]
    assert "10.244.1.3" in elements(agent.applied or "", "placed4")


def test_a_pod_in_place_of_another_of_the_same_name_still_has_conntrack_forgotten() -> None:
    calls: list[Any] = []
    agent = _recording_agent(calls)
    agent.handle("Pod", "SYNC", [pod("a", ("10.244.1.2",))])
    agent.reconcile()
    same = pod("a", ("10.244.1.2",))
    same["metadata"]["uid"] = "second"  # a StatefulSet's pod made anew, at the same address
    agent.handle("Pod", "MODIFIED", same)
    assert agent.reconcile() and calls[1:] == ["apply"]  # unplaced first
    assert agent.reconcile() and calls[2:] == [("forget", ["10.244.1.2"]), "apply"]
    agent.reconcile()
    assert calls[4:] == []  # and only once


def test_an_address_whose_conntrack_cannot_be_forgotten_stays_unplaced_until_it_can() -> None:
    calls: list[Any] = []
    fail, logged = [True], []
    agent = _recording_agent(calls, fail, logged)
    agent.handle("Pod", "SYNC", [])
    agent.reconcile()
    agent.handle("Pod", "ADDED", pod("b", ("10.244.1.3",)))
    agent.reconcile()
    assert agent.failed  # tried again after a backoff
    assert "10.244.1.3" not in elements(agent.applied or "", "placed4")
    assert "netpol-warning" in logged
    fail[0] = False
    assert agent.reconcile() and not agent.failed
    assert "10.244.1.3" in elements(agent.applied or "", "placed4")


def test_an_address_two_pods_of_the_node_hold_is_placed_for_neither() -> None:
    raw = (pod("old", ("10.244.1.2",), ns="y"), pod("new", ("10.244.1.2",)), pod("c", ("10.244.1.4",)))
    pods = [objects.read("Pod", p)[0] for p in raw]
    decision = compile.decide([], pods, [], NODE)  # type: ignore[arg-type]
    assert decision.placed == {ipaddress.ip_address("10.244.1.4")}


def _ct_entry(orig: tuple[str, str], reply: tuple[str, str], zone: bytes = b"") -> bytes:
    """A dumped conntrack entry as ctnetlink sends it (IPv4, addresses only)."""
    from cni_plugin import rtnl

    def tuple_(kind: int, ends: tuple[str, str]) -> bytes:
        source, destination = (ipaddress.ip_address(end).packed for end in ends)
        ips = rtnl.attr(1, source) + rtnl.attr(2, destination)
        return rtnl.nested(kind, rtnl.nested(1, ips))
    return bytes([socket.AF_INET, 0, 0, 0]) + tuple_(1, orig) + tuple_(2, reply) + (
        rtnl.attr(18, zone) if zone else b"")


def test_conntrack_entries_of_an_address_are_asked_for_at_either_end_of_either_direction() -> None:
    from cni_plugin import rtnl
    from cni_plugin.node.netpol import conntrack

    asked = conntrack._filters(ipaddress.ip_address("10.244.1.3"))
    raw = ipaddress.ip_address("10.244.1.3").packed
    wanted = set()
    for tuple_kind, flags_kind in ((1, 1), (2, 2)):  # original, reply
        for ip_attr, flag in ((1, 1), (2, 2)):  # source, destination
            wanted.add((socket.AF_INET, rtnl.nested(tuple_kind, rtnl.nested(1, rtnl.attr(ip_attr, raw)))
                        + rtnl.nested(25, rtnl.attr(flags_kind, struct.pack("=I", flag)))))
    assert set(asked) == wanted
    assert {family for family, _ in conntrack._filters(ipaddress.ip_address("fd44::3"))} == {socket.AF_INET6}


def test_a_dumped_conntrack_entry_is_deleted_by_its_original_tuple_and_zone() -> None:
    from cni_plugin.node.netpol import conntrack

    address = ipaddress.ip_address("10.244.1.3")
    entry = _ct_entry(("10.244.1.9", "10.71.0.10"), ("10.244.1.3", "10.244.1.9"), zone=b"\0\7")  # DNAT
    key = conntrack._key(entry, {address.packed})
    assert key is not None and key[0] == socket.AF_INET
    assert b"\x0a\x47\x00\x0a" in key[1] and b"\x0a\xf4\x01\x03" not in key[1]  # the original tuple
    assert b"\x06\x00\x12\x00\x00\x07" in key[1]  # and the zone (CTA_ZONE 18, 7)
    # what a kernel without the filter would send as well: not this address's, never deleted
    other = _ct_entry(("10.244.1.9", "10.244.1.4"), ("10.244.1.4", "10.244.1.9"))
    assert conntrack._key(other, {address.packed}) is None
    assert conntrack._key(bytes([socket.AF_INET, 0, 0, 0]), {address.packed}) is None


def test_a_claim_places_only_addresses_found_on_a_port_of_the_fence_bridge() -> None:
    asked: list[str] = []
    found = {ipaddress.ip_address("10.244.1.9")}

    def on_bridge(bridge: str) -> set[Any]:
        asked.append(bridge)
        if not found:
            raise OSError(13, "Permission denied")
        return found

    logged: list[str] = []
    agent = PolicyController(NODE, lambda _s: None, lambda event, **_k: logged.append(event), fence=FENCE,
                        on_bridge=on_bridge)
    for kind, items in (("NetworkPolicy", [DENY]), ("Namespace", [{"metadata": {"name": "x"}}]),
                        ("ClusterNetworkPolicy", []), ("Pod", [pod("new"), pod("forged")])):
        agent.handle(kind, "SYNC", items)
    agent.reconcile()
    assert asked == []  # no claim: nothing read
    agent.handle("Claim", "ADDED", claim("new", "10.244.1.9"))
    agent.handle("Claim", "ADDED", claim("forged", "10.244.1.8"))  # on no port
    agent.reconcile()
    assert asked == ["pyb0"]
    assert elements(agent.applied or "", "placed4").count("10.244.1.") == 1
    assert "10.244.1.9" in elements(agent.applied or "", "placed4")
    found.clear()  # the ports cannot be read: no claim places anything
    agent.reconcile()
    assert "10.244.1.9" not in elements(agent.applied or "", "placed4") and "netpol-warning" in logged
