"""A hostile pod on the bridge (CAP_NET_RAW, as containerd's default set gives it): rogue router
advertisements and forged sources, sent from raw sockets made inside the attacker's netns.

Each test sends the genuine frames too, and sees them arrive: what is dropped is dropped by the
check, not lost on the way. With `sourceCheck` off the forged frames arrive (the test can fail).
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import os
import socket
import time
from collections.abc import Callable

import pytest

from cni_plugin import libnft, link, netns, rtnl, sourcecheck
from cni_plugin.host import Kernel as host_kernel
from cni_plugin.netlink import Link
from testbed.harness import Host

from .netpol_probe import in_netns
from .rawframes import (
    PORT,
    Pod,
    drain,
    dual_stack,
    make_pods,
    packet_socket,
    ra_sender,
    router_advertisement,
    router_state,
    udp_frame,
)

pytestmark = pytest.mark.netns


def _ra_listener() -> socket.socket:
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    s.setblocking(False)
    return s


def _udp_listener() -> socket.socket:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", PORT))
    s.setblocking(False)
    return s


# --- rogue router advertisements ----------------------------------------------------------


def _send_ras(attacker: Pod, count: int = 3) -> None:
    sender, index = in_netns(attacker.netns, ra_sender)
    with sender:
        for _ in range(count):
            sender.sendto(router_advertisement(attacker.mac), ("ff02::1", 0, 0, index))
            time.sleep(0.1)


@pytest.mark.parametrize("source_check", [True, False])
def test_a_rogue_router_advertisement_takes_no_other_pods_ipv6(host: Host, source_check: bool) -> None:
    conf = dual_stack(host, sourceCheck=source_check)
    pods = make_pods(host, conf, ("attacker", "victim"))
    attacker, victim = pods["attacker"], pods["victim"]
    listener = in_netns(victim.netns, _ra_listener)
    with listener:
        _send_ras(attacker)
        seen = [data for data, _ in drain(listener, 1.0) if data[:1] == b"\x86"]
    assert router_state(host, victim) == ([], [])
    # The bridge drops RAs from pod ports; with the check off they arrive, and the pod's own
    # accept_ra=0 and autoconf=0 keep its addresses and routes its own.
    assert bool(seen) is not source_check
    for knob in ("accept_ra", "autoconf"):
        value = host.pod_exec(victim.netns, "cat", f"/proc/sys/net/ipv6/conf/eth0/{knob}").stdout.strip()
        assert value == b"0", knob


# --- forged sources -----------------------------------------------------------------------


def _sends(pods: dict[str, Pod]) -> dict[str, bytes]:
    """label -> frame from the attacker to the victim; "genuine" ones carry the attacker's own
    MAC and addresses, "forged" ones the peer's."""
    a, v, p = pods["attacker"], pods["victim"], pods["peer"]
    cases = {
        "genuine v4": (a.mac, a.v4, v.v4),
        "genuine v6": (a.mac, a.v6, v.v6),
        "genuine link-local": (a.mac, a.link_local, v.link_local),
        "forged v4": (a.mac, p.v4, v.v4),
        "forged v6": (a.mac, p.v6, v.v6),
        "forged link-local": (a.mac, p.link_local, v.v6),
        "forged link-local to link-local": (a.mac, p.link_local, v.link_local),
        "forged MAC": (p.mac, p.v4, v.v4),
        "forged MAC own v4": (p.mac, a.v4, v.v4),
    }
    return {label: udp_frame(mac, v.mac, src, dst, label.encode())
            for label, (mac, src, dst) in cases.items()}


@pytest.mark.parametrize("source_check", [True, False])
def test_a_forged_source_never_reaches_another_pod(host: Host, source_check: bool) -> None:
    conf = dual_stack(host, sourceCheck=source_check)
    pods = make_pods(host, conf, ("attacker", "victim", "peer"))
    frames = _sends(pods)
    sender = in_netns(pods["attacker"].netns, packet_socket)
    listener = in_netns(pods["victim"].netns, _udp_listener)
    with sender, listener:
        for frame in frames.values():
            sender.send(frame)
        got = {data.decode(): peer[0] for data, peer in drain(listener, 1.0)}
    expected = set(frames) if source_check is False else {k for k in frames if k.startswith("genuine")}
    assert set(got) == expected, json.dumps(got)


def test_check_finds_the_port_chain_and_del_and_gc_remove_it(host: Host) -> None:
    conf = dual_stack(host)
    kept, gone = host.new_pod(), host.new_pod()
    result = host.add(conf, kept, container_id="kept")
    host.add(conf, gone, container_id="gone")
    assert len(_port_chains(host)) == 2
    assert host.cni("CHECK", {**conf, "prevResult": result}, kept, container_id="kept").ok
    gc_conf = {**conf, "cni.dev/attachments": [{"containerID": "kept", "ifname": "eth0"}]}
    assert host.cni("GC", gc_conf).ok
    assert list(_port_chains(host).values()) == [result["interfaces"][1]["name"]]
    port = result["interfaces"][1]["name"]
    host.exec("nft", "delete", "element", "bridge", "pybridge", "ports", f'{{ "{port}" }}')
    check = host.cni("CHECK", {**conf, "prevResult": result}, kept, container_id="kept")
    assert not check.ok and check.out["msg"] == "source check rules missing", check.out
    assert host.cni("DEL", conf, kept, container_id="kept").ok
    assert _port_chains_after_del(host, 0) == {}


def _port_chains(host: Host) -> dict[str, str]:
    """chain -> host port, from the map."""
    items = json.loads(host.exec("nft", "-j", "list", "table", "bridge", "pybridge").stdout)["nftables"]
    ports = next(item["map"] for item in items if "map" in item)
    return {verdict["goto"]["target"]: port for port, verdict in ports.get("elem", [])}


def _port_chains_after_del(host: Host, left: int, timeout: float = 5.0) -> dict[str, str]:
    """_port_chains once at most `left` are in the map: through the agent, DEL's teardown is
    done after its answer (sourcecheck.Teardowns)."""
    deadline = time.monotonic() + timeout
    while len(chains := _port_chains(host)) > left and time.monotonic() < deadline:
        time.sleep(0.02)
    return chains


def _udp_sender() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def test_a_pod_still_reaches_itself_through_a_service_address(host: Host) -> None:
    """Hairpin as kube-proxy makes it: the pod sends to a service address, the host DNATs it back
    to the pod and masquerades it, so it returns through the pod's own port. The port's check
    sees only what the pod sends, from its own address."""
    conf = dual_stack(host, hairpinMode=True, ipMasq=True, isDefaultGateway=True)
    pod = make_pods(host, conf, ("self",))["self"]
    service = (f"add table ip svc\n"
               f"add chain ip svc pre {{ type nat hook prerouting priority dstnat; }}\n"
               f"add rule ip svc pre ip daddr 10.96.0.10 udp dport {PORT} dnat to {pod.v4}:{PORT}\n"
               f"add chain ip svc post {{ type nat hook postrouting priority srcnat; }}\n"
               f"add rule ip svc post ip saddr {pod.v4} ip daddr {pod.v4} masquerade\n")
    host.exec("nft", "-f", "-", input=service.encode())
    listener = in_netns(pod.netns, _udp_listener)
    sender = in_netns(pod.netns, _udp_sender)
    with listener, sender:
        sender.sendto(b"hairpin", ("10.96.0.10", PORT))
        got = drain(listener, 1.0)
    assert [(data, peer[0]) for data, peer in got] == [(b"hairpin", "::ffff:10.88.0.1")]


def test_a_retried_add_replaces_what_a_crashed_one_left(host: Host) -> None:
    """An ADD that died after its nft run leaves its chain and element; the runtime's next ADD of
    that attachment (a new veth) must take them over, not fail or keep the old port's."""
    conf = dual_stack(host)
    first = host.add(conf, host.new_pod(), container_id="retry")
    host.exec("ip", "link", "del", first["interfaces"][1]["name"])  # no DEL: as after a crash
    for ip, owner in host.reservations("testnet").items():  # nor the IPAM reservation
        if owner.startswith("retry"):
            (host.data_dir / "testnet" / ip).unlink()
    second = host.add(conf, host.new_pod(), container_id="retry")
    assert list(_port_chains(host).values()) == [second["interfaces"][1]["name"]]


def test_concurrent_first_adds_leave_one_base_rule(host: Host) -> None:
    conf = dual_stack(host)
    pods = [host.new_pod() for _ in range(6)]
    with concurrent.futures.ThreadPoolExecutor(len(pods)) as pool:
        replies = list(pool.map(lambda i: host.cni("ADD", conf, pods[i], container_id=f"c{i}"),
                                range(len(pods))))
    assert all(r.ok for r in replies), [r.stderr for r in replies if not r.ok]
    base = json.loads(host.exec("nft", "-j", "list", "chain", "bridge", "pybridge", "prerouting").stdout)
    assert [item["rule"]["comment"] for item in base["nftables"] if "rule" in item] == ["pybridge base v1"]
    assert sorted(_port_chains(host).values()) == sorted(r.out["interfaces"][1]["name"] for r in replies)


@pytest.mark.skipif(not libnft.available(), reason="libnftables not installed")
def test_libnftables_answers_as_nft_does(host: Host) -> None:
    """What ADD's one-run path relies on: success, and the error text nft prints (its misses)."""
    script = "create table bridge pbt\n"
    assert in_netns(host.name, lambda: libnft.run(script, 10)) == (0, "", "")
    code, _, error = in_netns(host.name, lambda: libnft.run(script, 10))
    assert code != 0 and "File exists" in error
    code, _, error = in_netns(host.name, lambda: libnft.run("list table bridge nosuch", 10, json=True))
    assert code != 0 and "No such file or directory" in error
    code, listing, _ = in_netns(host.name, lambda: libnft.run("list table bridge pbt", 10, json=True))
    assert code == 0 and {"table": {"family": "bridge", "name": "pbt", "handle": 1}} in json.loads(
        listing)["nftables"]


@pytest.mark.parametrize("in_process", [True, False])
def test_the_port_chain_is_the_same_with_or_without_libnftables(
    host: Host, monkeypatch: pytest.MonkeyPatch, in_process: bool
) -> None:
    if in_process and not libnft.available():
        pytest.skip("libnftables not installed")
    monkeypatch.setattr(libnft, "available", lambda: in_process)
    host.exec("ip", "link", "add", "vethpbt", "type", "veth", "peer", "name", "vethpbt-peer")
    mac, addr = "0a:58:0a:58:00:09", ipaddress.ip_interface("10.88.0.9/24")
    for _ in range(2):  # the second finds the chain there: the listing path
        in_netns(host.name, lambda: sourcecheck.setup("net", "c", "eth0", "vethpbt", mac, [addr], False))
    assert list(_port_chains(host).values()) == ["vethpbt"]
    chain = sourcecheck.chain_name("net", "c", "eth0")
    rules = host.exec("nft", "list", "chain", "bridge", "pybridge", chain).stdout.decode()
    assert "ip saddr != 10.88.0.9 drop" in rules and f"ether saddr != {mac} drop" in rules


# --- DEL's teardown by the port it verified -------------------------------------------------


def _teardown_by_port(port: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """sourcecheck.teardown with `port`, its listing path and nft made to fail: what it leaves
    is what the one nfnetlink batch left."""
    def listing(*_: object, **__: object) -> None:
        raise AssertionError("listed")

    def nft(*_: object, **__: object) -> str:
        raise AssertionError("nft ran")
    monkeypatch.setattr(sourcecheck, "_replace", listing)
    monkeypatch.setattr(sourcecheck.nftables, "run", nft)
    sourcecheck.teardown("net", "a", "eth0", port)


def _links(host: Host, *names: str) -> None:
    """Host links by these names: an agent's start sweeps the chains of ports without one
    (sourcecheck.sweep), and the agent of the [agent] runs may start its sweep late."""
    for name in names:
        host.exec("ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}p")


def _two_attachments() -> None:
    """Attachments a and b of network net, on ports vetha and vethb."""
    mac, addr = "0a:58:0a:58:00:09", ipaddress.ip_interface("10.88.0.9/24")
    for cid, port in (("a", "vetha"), ("b", "vethb")):
        sourcecheck.setup("net", cid, "eth0", port, mac, [addr], False)


def test_teardown_by_port_deletes_the_element_and_chain_in_one_batch(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    _links(host, "vetha", "vethb")
    in_netns(host.name, _two_attachments)
    in_netns(host.name, lambda: _teardown_by_port("vetha", monkeypatch))
    assert _port_chains(host) == {sourcecheck.chain_name("net", "b", "eth0"): "vethb"}
    assert _chains(host) == {"prerouting", sourcecheck.chain_name("net", "b", "eth0")}


def test_teardown_by_another_attachments_port_falls_back_and_keeps_its_element(host: Host) -> None:
    """The kernel refuses the one batch (the chain is still another element's goto): the listing path
    removes this attachment's element and chain, the other's stay."""
    _links(host, "vetha", "vethb")
    in_netns(host.name, _two_attachments)
    in_netns(host.name, lambda: sourcecheck.teardown("net", "a", "eth0", "vethb"))
    assert _port_chains(host) == {sourcecheck.chain_name("net", "b", "eth0"): "vethb"}
    in_netns(host.name, lambda: sourcecheck.teardown("net", "b", "eth0", "vethb"))
    in_netns(host.name, lambda: sourcecheck.teardown("net", "b", "eth0", "vethb"))  # nothing left: fine
    assert _port_chains(host) == {} and _chains(host) == {"prerouting"}


def _queued_and_run(queued: list[str], between: Callable[[], None] = lambda: None) -> list[int]:
    """Attachments a, b (and c on vethc) set up; `queued` ones' teardowns queued by port, then
    `between`, then run: the size of each batch sent."""
    _two_attachments()
    sourcecheck.setup("net", "c", "eth0", "vethc", "0a:58:0a:58:00:0a",
                      [ipaddress.ip_interface("10.88.0.10/24")], False)
    teardowns = sourcecheck.Teardowns()
    for cid in queued:
        assert teardowns.add("net", cid, "eth0", f"veth{cid}")
    between()
    sizes: list[int] = []
    send = sourcecheck.nfbatch.send
    sourcecheck.nfbatch.send = lambda messages, *rest: (sizes.append(len(messages)), send(messages, *rest))[1]
    try:
        teardowns.run()
    finally:
        sourcecheck.nfbatch.send = send
    return sizes


def test_teardowns_queued_by_del_go_in_one_batch(host: Host) -> None:
    _links(host, "vetha", "vethb", "vethc")
    assert in_netns(host.name, lambda: _queued_and_run(["a", "b"])) == [6]
    assert _port_chains(host) == {sourcecheck.chain_name("net", "c", "eth0"): "vethc"}
    assert _chains(host) == {"prerouting", sourcecheck.chain_name("net", "c", "eth0")}


def test_a_queued_teardown_never_takes_an_attachment_added_again(host: Host) -> None:
    """a is ADDed again on a new port after its DEL queued the teardown: the batch is refused
    whole (a's chain is the new element's goto), then b's alone goes, a's is left as it is."""
    _links(host, "vetha", "vethb", "vethc", "vethz")

    def add_again() -> None:
        sourcecheck.setup("net", "a", "eth0", "vethz", "0a:58:0a:58:00:0b",
                          [ipaddress.ip_interface("10.88.0.11/24")], False)

    assert in_netns(host.name, lambda: _queued_and_run(["a", "b"], add_again)) == [6, 3, 3]
    assert _port_chains(host) == {sourcecheck.chain_name("net", "a", "eth0"): "vethz",
                                  sourcecheck.chain_name("net", "c", "eth0"): "vethc"}


def test_an_agents_start_sweeps_the_chains_of_ports_gone(host: Host) -> None:
    """The teardowns an agent queued die with it: the next one's start removes the chains of
    ports the host has no link of, and keeps the others."""
    host.exec("ip", "link", "add", "vethb", "type", "veth", "peer", "name", "vethbp")
    in_netns(host.name, _two_attachments)
    in_netns(host.name, lambda: host_kernel().port_check_sweep())
    assert _port_chains(host) == {sourcecheck.chain_name("net", "b", "eth0"): "vethb"}
    assert _chains(host) == {"prerouting", sourcecheck.chain_name("net", "b", "eth0")}


def test_del_leaves_no_chain_and_no_element(host: Host) -> None:
    conf = dual_stack(host)
    pods = [host.new_pod() for _ in range(2)]
    for i, pod in enumerate(pods):
        host.add(conf, pod, container_id=f"c{i}")
    assert host.cni("DEL", conf, pods[0], container_id="c0").ok
    kept = sourcecheck.chain_name("testnet", "c1", "eth0")
    assert list(_port_chains_after_del(host, 1)) == [kept] and _chains(host) == {"prerouting", kept}


def _ifindex(host: Host, netns: str | None, name: str) -> int:
    run = host.exec if netns is None else lambda *cmd: host.pod_exec(netns, *cmd)
    return int(json.loads(run("ip", "-j", "link", "show", "dev", name).stdout)[0]["ifindex"])


def _eth0() -> Link | None:
    with rtnl.Socket() as sock:
        return link.find(sock, "eth0")


def _verified_port(host: Host, pod: str) -> str | None:
    """What DEL would verify as the host port of `pod`'s eth0 (link.verified_host_end)."""
    def verify() -> str | None:
        fd = netns.open_netns(f"/run/netns/{pod}")
        try:
            with rtnl.Socket() as sock:
                nsid = sock.nsid(fd)
                pod_link = netns.run_in(fd, _eth0)
                assert pod_link is not None
                end = link.verified_host_end(sock, nsid, pod_link)
                return None if end is None else end.name
        finally:
            os.close(fd)
    return in_netns(host.name, verify)


@pytest.mark.parametrize("element", [True, False])
def test_a_pods_own_veth_named_eth0_never_takes_another_pods_check_away(host: Host, element: bool) -> None:
    """The attacker deletes its eth0 and makes a veth pair of its own, eth0 with the victim's
    eth0's index and its peer x with the victim's host port's: eth0's peer index then names
    the victim's port. DEL must not take it for the attacker's. With the attacker's element
    gone (as by hand), nft no longer refuses to delete its chain: only DEL's check is left."""
    conf = dual_stack(host)
    attacker, victim = host.new_pod(), host.new_pod()
    mine = host.add(conf, attacker, container_id="attacker")["interfaces"][1]["name"]
    if not element:
        host.exec("nft", "delete", "element", "bridge", "pybridge", "ports", f'{{ "{mine}" }}')
    port = host.add(conf, victim, container_id="victim")["interfaces"][1]["name"]
    assert _verified_port(host, victim) == port
    eth0, peer = _ifindex(host, victim, "eth0"), _ifindex(host, None, port)
    host.pod_exec(attacker, "ip", "link", "del", "eth0")
    host.pod_exec(attacker, "ip", "link", "add", "eth0", "index", str(eth0), "type", "veth",
                  "peer", "name", "x", "index", str(peer))
    assert _ifindex(host, attacker, "eth0") == eth0 and _ifindex(host, attacker, "x") == peer
    assert _verified_port(host, attacker) is None
    assert host.cni("DEL", conf, attacker, container_id="attacker").ok
    kept = sourcecheck.chain_name("testnet", "victim", "eth0")
    assert _port_chains(host) == {kept: port} and _chains(host) == {"prerouting", kept}


def _chains(host: Host) -> set[str]:
    items = json.loads(host.exec("nft", "-j", "list", "chains", "bridge").stdout)["nftables"]
    return {item["chain"]["name"] for item in items
            if "chain" in item and item["chain"]["table"] == "pybridge"}
