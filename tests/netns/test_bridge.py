"""pybridge ADD/DEL/CHECK/STATUS/GC against real netlink, in throw-away namespaces."""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import time

import pytest

from cnikit.spec.version import at_least
from testbed.harness import Host, bridge_conf, delete_netns, pod_json

pytestmark = pytest.mark.netns


def test_two_pods_ping_each_other_and_the_gateway(host: Host, spec_version: str) -> None:
    conf = bridge_conf(host, cniVersion=spec_version, isDefaultGateway=True)
    a, b = host.new_pod(), host.new_pod()
    ra = host.add(conf, a, "pod-a")
    rb = host.add(conf, b, "pod-b")
    ip_a = ra["ips"][0]["address"].split("/")[0]
    ip_b = rb["ips"][0]["address"].split("/")[0]
    assert ra["cniVersion"] == spec_version and ip_a != ip_b
    assert ipaddress.ip_address(ip_a) in ipaddress.ip_network("10.88.0.0/24")
    assert host.ping(a, ip_b)
    assert host.ping(b, ip_a)
    assert host.ping(a, "10.88.0.1")
    # The result describes what is on the links: bridge, host veth, pod interface.
    names = [i["name"] for i in ra["interfaces"]]
    assert names[0] == "br-test" and names[2] == "eth0"
    assert ra["interfaces"][2]["sandbox"] == f"/run/netns/{a}"
    assert ra["ips"][0]["interface"] == 2
    pod_link = pod_json(host, a, "link", "show", "eth0")[0]
    assert pod_link["address"] == ra["interfaces"][2]["mac"]
    host_link = host.links()[ra["interfaces"][1]["name"]]
    assert host_link["master"] == "br-test"
    routes = pod_json(host, a, "route", "show", "default")
    assert routes[0]["gateway"] == "10.88.0.1"
    # Gratuitous ARP when the pod link comes up, as the reference sets it.
    assert host.pod_exec(a, "cat", "/proc/sys/net/ipv4/conf/eth0/arp_notify").stdout.strip() == b"1"


def test_ipv4_only_pods_have_no_ipv6_on_eth0_unless_asked(host: Host) -> None:
    a, b = host.new_pod(), host.new_pod()
    host.add(bridge_conf(host), a, "pod-a")
    assert host.pod_exec(a, "cat", "/proc/sys/net/ipv6/conf/eth0/disable_ipv6").stdout.strip() == b"1"
    assert pod_json(host, a, "-6", "addr", "show", "dev", "eth0") in ([], [{}])
    lo = host.pod_exec(a, "cat", "/proc/sys/net/ipv6/conf/lo/disable_ipv6").stdout.strip()
    assert lo == b"0"  # ::1 stays
    host.add(bridge_conf(host, podIPv6LinkLocal=True), b, "pod-b")  # as the reference leaves it
    assert host.pod_exec(b, "cat", "/proc/sys/net/ipv6/conf/eth0/disable_ipv6").stdout.strip() == b"0"
    eth0 = pod_json(host, b, "-6", "addr", "show", "dev", "eth0")[0]["addr_info"]
    assert [i["scope"] for i in eth0] == ["link"], eth0


NET_ADDR_SET = "3"  # include/linux/netdevice.h: the address was set, it no longer follows the ports


def test_the_bridge_mac_is_pinned_and_stays_as_pods_come_and_go(host: Host) -> None:
    conf = bridge_conf(host)
    pods = [host.new_pod() for _ in range(4)]
    first = host.add(conf, pods[0], "c0")
    pinned = first["interfaces"][0]["mac"]
    for i, pod in enumerate(pods[1:3], start=1):
        assert host.add(conf, pod, f"c{i}")["interfaces"][0]["mac"] == pinned
    for i, pod in enumerate(pods[:3]):
        assert host.cni("DEL", conf, pod, f"c{i}").ok
    host.settle_veths(0)
    last = host.add(conf, pods[3], "c3")  # one port again, its own MAC: the bridge keeps its own
    assert last["interfaces"][0]["mac"] == pinned
    assert host.links()["br-test"]["address"] == pinned
    assert host.exec("cat", "/sys/class/net/br-test/addr_assign_type").stdout.strip() == NET_ADDR_SET.encode()


def test_add_twice_with_one_ifname_fails_and_keeps_the_first(host: Host) -> None:
    conf = bridge_conf(host)
    pod = host.new_pod()
    first = host.add(conf, pod)
    again = host.cni("ADD", conf, pod)
    assert again.rc != 0
    assert "eth0" in again.out["msg"]
    # The failed call must not have undone the first attachment.
    assert list(host.reservations("testnet")) == [first["ips"][0]["address"].split("/")[0]]
    assert first["interfaces"][1]["name"] in host.links()


def test_del_twice_succeeds_and_frees_everything(host: Host, spec_version: str) -> None:
    conf = bridge_conf(host, cniVersion=spec_version)
    pod = host.new_pod()
    result = host.add(conf, pod)
    veth = result["interfaces"][1]["name"]
    assert host.cni("DEL", conf, pod).ok
    assert host.cni("DEL", conf, pod).ok
    assert host.reservations("testnet") == {}
    assert veth not in host.settle_veths(0)
    assert pod_json(host, pod, "link", "show") and all(
        link["ifname"] != "eth0" for link in pod_json(host, pod, "link", "show"))


def test_del_after_the_netns_vanished_frees_the_ip(host: Host) -> None:
    conf = bridge_conf(host)
    pod = host.new_pod()
    result = host.add(conf, pod)
    host.pods.remove(pod)
    delete_netns(pod)
    reply = host.cni("DEL", conf, pod)
    assert reply.ok, reply.stdout
    assert host.reservations("testnet") == {}
    # The kernel removes the host end when it destroys the netns, asynchronously.
    deadline = time.monotonic() + 10
    while result["interfaces"][1]["name"] in host.links():
        assert time.monotonic() < deadline, "host veth outlived its pod netns"
        time.sleep(0.05)


def test_del_with_empty_netns_frees_the_ip(host: Host) -> None:
    conf = bridge_conf(host)
    pod = host.new_pod()
    host.add(conf, pod)
    assert host.cni("DEL", conf, netns_path="").ok
    assert host.reservations("testnet") == {}


def test_check_passes_then_fails_after_an_address_is_removed(host: Host, spec_version: str) -> None:
    conf = bridge_conf(host, cniVersion=spec_version, isDefaultGateway=True)
    pod = host.new_pod()
    result = host.add(conf, pod)
    check_conf = {**conf, "prevResult": result}
    if not at_least(spec_version, "0.4.0"):  # no CHECK before 0.4.0: refused, code 1
        refused = host.cni("CHECK", check_conf, pod)
        assert refused.rc != 0 and refused.out["code"] == 1, refused.stdout
        return
    ok = host.cni("CHECK", check_conf, pod)
    assert ok.ok and ok.out is None, ok.stdout
    address = result["ips"][0]["address"]
    host.pod_exec(pod, "ip", "addr", "del", address, "dev", "eth0")
    bad = host.cni("CHECK", check_conf, pod)
    assert bad.rc != 0
    assert address in bad.out["details"]


def test_check_without_prev_result_is_an_error(host: Host) -> None:
    conf = bridge_conf(host)
    pod = host.new_pod()
    host.add(conf, pod)
    reply = host.cni("CHECK", conf, pod)
    assert reply.rc != 0 and "prevResult" in reply.out["msg"]


def test_dual_stack_add_returns_both_families_without_waiting_for_dad(host: Host) -> None:
    conf = bridge_conf(host, isDefaultGateway=True)
    conf["ipam"]["ranges"] = [[{"subnet": "10.88.0.0/24"}], [{"subnet": "fd88::/64"}]]
    a, b = host.new_pod(), host.new_pod()
    ra = host.add(conf, a, "pod-a")
    # Usable the moment ADD returns: DAD is off on the pod interface, nothing is tentative.
    eth0 = pod_json(host, a, "-6", "addr", "show", "dev", "eth0")[0]["addr_info"]
    assert [i for i in eth0 if i.get("tentative")] == [], eth0
    assert host.pod_exec(a, "cat", "/proc/sys/net/ipv6/conf/eth0/accept_dad").stdout.strip() == b"0"
    rb = host.add(conf, b, "pod-b")
    families = sorted(ipaddress.ip_interface(ip["address"]).version for ip in ra["ips"])
    assert families == [4, 6]
    v6_b = next(ip["address"] for ip in rb["ips"] if ":" in ip["address"]).split("/")[0]
    assert host.ping(a, v6_b)
    assert host.ping(a, "fd88::1")
    defaults = {r["dst"] for r in ra["routes"]}
    assert defaults == {"0.0.0.0/0", "::/0"}
    # ...through bridge ports with no IPv6 of their own (no link-local address, no routes).
    for result in (ra, rb):
        port = result["interfaces"][1]["name"]
        assert host.exec("cat", f"/proc/sys/net/ipv6/conf/{port}/disable_ipv6").stdout.strip() == b"1"
        assert json.loads(host.exec("ip", "-j", "-6", "addr", "show", "dev", port).stdout) in ([], [{}])


def test_hairpin_mtu_and_promisc_are_set(host: Host) -> None:
    conf = bridge_conf(host, hairpinMode=True, mtu=1400)
    pod = host.new_pod()
    result = host.add(conf, pod)
    links = host.links()
    veth = links[result["interfaces"][1]["name"]]
    assert veth["mtu"] == 1400
    assert links["br-test"]["mtu"] == 1400
    assert veth["linkinfo"]["info_slave_data"]["hairpin"] is True
    assert pod_json(host, pod, "link", "show", "eth0")[0]["mtu"] == 1400
    promisc = bridge_conf(host, name="other", bridge="br-promisc", promiscMode=True)
    promisc["ipam"]["ranges"] = [[{"subnet": "10.89.0.0/24"}]]
    host.add(promisc, host.new_pod(), "c2")
    assert host.links()["br-promisc"]["promiscuity"] >= 1


def test_twenty_concurrent_adds_get_distinct_addresses(host: Host) -> None:
    conf = bridge_conf(host)
    pods = [host.new_pod() for _ in range(20)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        replies = list(pool.map(lambda i: host.cni("ADD", conf, pods[i], f"par-{i}"), range(20)))
    assert all(r.ok for r in replies), [r.stdout for r in replies if not r.ok]
    addresses = {r.out["ips"][0]["address"] for r in replies}
    assert len(addresses) == 20
    assert len(host.reservations("testnet")) == 20
    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        dels = list(pool.map(lambda i: host.cni("DEL", conf, pods[i], f"par-{i}"), range(20)))
    assert all(r.ok for r in dels)
    assert host.reservations("testnet") == {}
    assert host.settle_veths(0) == []


def test_failed_add_undoes_ipam_and_veth(host: Host) -> None:
    # The bridge already holds another address in the pod subnet, so the gateway step fails
    # after IPAM and the veth were done: both must be undone.
    host.exec("ip", "link", "add", "br-test", "type", "bridge")
    host.exec("ip", "addr", "add", "10.88.0.200/24", "dev", "br-test")
    conf = bridge_conf(host)
    pod = host.new_pod()
    reply = host.cni("ADD", conf, pod)
    assert reply.rc != 0
    assert "10.88.0.200" in reply.out["details"]
    assert host.reservations("testnet") == {}
    assert not [name for name in host.links() if name.startswith("veth")]
    assert all(link["ifname"] != "eth0" for link in pod_json(host, pod, "link", "show"))
    forced = host.cni("ADD", {**conf, "forceAddress": True}, pod)
    assert forced.ok, forced.stdout


def test_full_pool_fails_the_add_cleanly_and_status_still_succeeds(host: Host) -> None:
    """A full pool fails the ADD that wants an address, naming the range and its use; STATUS
    stays OK (containerd 2.x would mark the node's network not ready on any STATUS error)."""
    conf = bridge_conf(host)
    conf["ipam"]["ranges"] = [[{"subnet": "10.88.0.0/30"}]]  # .2 is the only address
    assert host.cni("STATUS", conf).ok
    host.add(conf, host.new_pod(), "first")
    pod = host.new_pod()
    reply = host.cni("ADD", conf, pod, "second")
    assert reply.rc != 0 and reply.out["code"] == 110, reply.stdout
    assert "10.88.0.1-10.88.0.2 (10.88.0.0/30: 1 of 1 in use)" in reply.out["msg"], reply.stdout
    assert len([n for n in host.links() if n.startswith("veth")]) == 1
    status = host.cni("STATUS", conf)
    assert status.ok and status.out is None, status.stdout


def test_status_fails_when_the_bridge_name_is_taken_by_another_kind_of_link(host: Host) -> None:
    conf = bridge_conf(host)
    host.exec("ip", "link", "add", conf["bridge"], "type", "veth", "peer", "name", "peer-of-br")
    status = host.cni("STATUS", conf)
    assert status.rc != 0 and status.out["code"] == 50, status.stdout
    assert "not a bridge" in status.out["msg"], status.stdout
    assert not host.cni("ADD", conf, host.new_pod(), "c1").ok  # what STATUS foretold
    host.exec("ip", "link", "del", conf["bridge"])
    assert host.cni("STATUS", conf).ok


def test_status_fails_when_the_store_cannot_be_written(host: Host) -> None:
    conf = bridge_conf(host)
    host.add(conf, host.new_pod(), "first")
    store = host.data_dir / conf["name"]
    store.rename(store.with_name("moved"))
    store.write_text("")  # a file where the store's directory should be: no ADD can reserve
    status = host.cni("STATUS", conf)
    assert status.rc != 0 and status.out["code"] == 50, status.stdout
    store.unlink()
    store.with_name("moved").rename(store)
    assert host.cni("STATUS", conf).ok


def test_gc_releases_what_is_not_valid(host: Host) -> None:
    conf = bridge_conf(host)
    keep, drop = host.new_pod(), host.new_pod()
    kept = host.add(conf, keep, "keep")
    host.add(conf, drop, "drop")
    gc_conf = {**conf, "cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]}
    assert host.cni("GC", gc_conf).ok
    assert list(host.reservations("testnet")) == [kept["ips"][0]["address"].split("/")[0]]


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_result_is_printed_in_the_requested_version(host: Host, version: str) -> None:
    conf = bridge_conf(host, cniVersion=version)
    result = host.add(conf, host.new_pod())
    assert result["cniVersion"] == version
    has_version = "version" in result["ips"][0]
    assert has_version == (version in ("0.3.0", "0.3.1", "0.4.0"))


def _kernel_has_vlan_filtering(host: Host) -> bool:
    host.exec("ip", "link", "add", "br-probe", "type", "bridge")
    try:
        return host.exec("ip", "link", "set", "br-probe", "type", "bridge", "vlan_filtering", "1",
                         check=False).returncode == 0
    finally:
        host.exec("ip", "link", "del", "br-probe")


def test_vlan_access_port(host: Host) -> None:
    conf = bridge_conf(host, isGateway=False, vlan=42)
    if not _kernel_has_vlan_filtering(host):
        reply = host.cni("ADD", conf, host.new_pod())
        assert reply.out["code"] == 2 and "vlan" in reply.out["msg"]
        pytest.skip("kernel without CONFIG_BRIDGE_VLAN_FILTERING: checked the clear error instead")
    a, b = host.new_pod(), host.new_pod()
    ra, rb = host.add(conf, a, "va"), host.add(conf, b, "vb")
    shown = json.loads(host.exec("bridge", "-j", "vlan", "show").stdout)
    vlans = {entry["ifname"]: entry["vlans"] for entry in shown}
    port = vlans[ra["interfaces"][1]["name"]]
    assert [v["vlan"] for v in port] == [42]
    assert "PVID" in port[0]["flags"] and "Egress Untagged" in port[0]["flags"]
    assert host.ping(a, rb["ips"][0]["address"].split("/")[0])


def _masq_rules_for(host: Host, address: str) -> list[dict[str, object]]:
    ruleset = json.loads(host.exec("nft", "-j", "list", "ruleset").stdout)["nftables"]
    return [item["rule"] for item in ruleset if "rule" in item and item["rule"]["family"] != "bridge"
            and address in json.dumps(item["rule"])]


def test_ip_masq_rules_appear_and_vanish_even_with_an_empty_netns(host: Host) -> None:
    conf = bridge_conf(host, ipMasq=True)
    pod = host.new_pod()
    result = host.add(conf, pod)
    address = result["ips"][0]["address"].split("/")[0]
    rules = _masq_rules_for(host, address)
    assert len(rules) == 1 and "masquerade" in json.dumps(rules[0])
    assert host.cni("CHECK", {**conf, "prevResult": result}, pod).ok
    assert host.cni("DEL", conf, netns_path="").ok
    assert _masq_rules_for(host, address) == []
    assert host.reservations("testnet") == {}


def test_gc_removes_stale_masquerade_rules(host: Host) -> None:
    conf = bridge_conf(host, ipMasq=True)
    kept = host.add(conf, host.new_pod(), "keep")
    gone = host.add(conf, host.new_pod(), "gone")
    gc_conf = {**conf, "cni.dev/attachments": [{"containerID": "keep", "ifname": "eth0"}]}
    assert host.cni("GC", gc_conf).ok
    assert _masq_rules_for(host, kept["ips"][0]["address"].split("/")[0])
    assert _masq_rules_for(host, gone["ips"][0]["address"].split("/")[0]) == []


def test_add_right_after_del_with_the_same_netns_and_ifname(host: Host) -> None:
    """The agent deletes the veth after answering DEL: the ifname must be free at once, and the
    old port must not carry traffic for the address that is handed out again."""
    conf = bridge_conf(host)
    conf["ipam"]["ranges"] = [[{"subnet": "10.88.0.0/30"}]]  # one address: it is reused
    pod = host.new_pod()
    first = host.add(conf, pod)
    assert host.cni("DEL", conf, pod).ok
    second = host.add(conf, pod)
    assert second["ips"][0]["address"] == first["ips"][0]["address"]
    up_ports = [name for name, link in host.links().items()
                if link.get("master") == "br-test" and "LOWER_UP" in link["flags"]]
    assert up_ports == [second["interfaces"][1]["name"]]
    assert host.ping(pod, "10.88.0.1")
    assert host.settle_veths(1) == [second["interfaces"][1]["name"]]
