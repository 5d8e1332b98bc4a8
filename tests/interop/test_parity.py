"""Same conflist, same pods: reference bridge + host-local against pybridge + pyipam, via libcni.

Against Debian 12's reference plugins (1.1.1) and sid's (1.9.1), the version in the test id. The
results and the kernel state they leave must match, except for the differences listed in
docs/configuration.md ("Differences from the reference bridge"), which _differences pins down here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from scripts import sid
from testbed.harness import Host

from .drive import Libcni

pytestmark = pytest.mark.interop

PODS = ("par-a", "par-b")
SIDES = {"reference": ("bridge", "host-local"), "pybridge": ("pybridge", "pyipam")}


def _conf(host: Host, plugin: str, ipam: str) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "parity",
        "plugins": [{
            "type": plugin, "bridge": "br-par", "isGateway": True, "isDefaultGateway": True,
            "hairpinMode": True, "mtu": 1400,
            "ipam": {"type": ipam, "dataDir": str(host.data_dir),
                     "ranges": [[{"subnet": "10.67.0.0/24"}], [{"subnet": "fd67::/64"}]],
                     # the second without gw: installed via the gateway; CHECK of reference < 1.9 fails it
                     "routes": [{"dst": "192.0.2.0/24", "gw": "10.67.0.1"}, {"dst": "198.51.100.0/24"}]},
        }],
    }


def _ip(host: Host, *args: str, pod: str | None = None) -> Any:
    cmd = ("ip", "-j", "-d", *args)
    raw = host.pod_exec(pod, *cmd).stdout if pod else host.exec(*cmd).stdout
    return json.loads(raw)


def _sysctl(host: Host, key: str, pod: str | None = None) -> str:
    cmd = ("cat", f"/proc/sys/net/{key}")
    return (host.pod_exec(pod, *cmd) if pod else host.exec(*cmd)).stdout.decode().strip()


def _addrs(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keep = ("family", "local", "prefixlen", "broadcast", "scope", "nodad")
    return sorted(({k: a[k] for k in keep if k in a} for a in entries if a["scope"] != "link"),
                  key=lambda a: (a["family"], a["local"]))


def _routes(host: Host, pod: str) -> list[dict[str, Any]]:
    routes = _ip(host, "route", "show", pod=pod) + _ip(host, "-6", "route", "show", pod=pod)
    keep = ("dst", "gateway", "dev", "protocol", "scope", "metric", "prefsrc", "flags")
    return sorted(({k: r[k] for k in keep if k in r} for r in routes if not r["dst"].startswith("fe80")),
                  key=lambda r: (r["dst"], r.get("gateway", "")))


def _link(entry: dict[str, Any]) -> dict[str, Any]:
    keep = ("mtu", "operstate", "promiscuity", "master", "txqlen", "address",
            "num_tx_queues", "num_rx_queues")
    out = {k: entry[k] for k in keep if k in entry}
    slave = entry.get("linkinfo", {}).get("info_slave_data", {})
    out.update({f"port_{k}": slave[k] for k in ("hairpin", "isolated", "learning", "flood", "state")
                if k in slave})
    return out


def _state(host: Host, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The kernel state of one side, with names and random MACs replaced by their role."""
    links = {link["ifname"]: link for link in _ip(host, "link", "show")}
    bridge = _link(links["br-par"])
    state: dict[str, Any] = {
        "bridge": bridge,
        "bridge_addrs": _addrs(_ip(host, "addr", "show", "br-par")[0]["addr_info"]),
        "ports": sorted(_link(link)["port_state"] for link in links.values()
                        if link.get("master") == "br-par"),
        "forwarding": [_sysctl(host, "ipv4/ip_forward"), _sysctl(host, "ipv6/conf/all/forwarding")],
        "bridge_accept_ra": _sysctl(host, "ipv6/conf/br-par/accept_ra"),
        "port_chains": _port_chains(host),
    }
    for cid, result in results.items():
        pod = result["interfaces"][2]["sandbox"].rsplit("/", 1)[1]
        veth = _link(links[result["interfaces"][1]["name"]])
        eth0 = _ip(host, "addr", "show", "eth0", pod=pod)[0]
        assert eth0["address"] == result["interfaces"][2]["mac"]  # result and kernel agree
        assert veth.pop("address") == result["interfaces"][1]["mac"]
        state[cid] = {
            "veth": veth,
            "veth_ipv6_off": _sysctl(host, f"ipv6/conf/{result['interfaces'][1]['name']}/disable_ipv6"),
            "eth0": {**_link(eth0), "address": "<mac>"},
            "eth0_addrs": _addrs(eth0["addr_info"]),
            "routes": _routes(host, pod),
            "sysctls": [_sysctl(host, k, pod) for k in (
                "ipv4/conf/eth0/arp_notify", "ipv6/conf/eth0/accept_dad", "ipv6/conf/eth0/disable_ipv6",
                "ipv6/conf/eth0/addr_gen_mode")],
            "router_knobs": [_sysctl(host, f"ipv6/conf/eth0/{k}", pod) for k in ("accept_ra", "autoconf")],
        }
    state["bridge_mac_is_a_port_mac"] = bridge.pop("address") in {
        r["interfaces"][1]["mac"] for r in results.values()}
    return state


def _port_chains(host: Host) -> int:
    """Ports in pybridge's bridge-family map (sourceCheck); 0 without the table."""
    listing = host.exec("nft", "-j", "list", "table", "bridge", "pybridge", check=False)
    if listing.returncode != 0:
        return 0
    items = json.loads(listing.stdout)["nftables"]
    return sum(len(item["map"].get("elem", [])) for item in items if "map" in item)


def _result_shape(result: dict[str, Any], pod_of: Callable[[str], str]) -> dict[str, Any]:
    bridge, veth, eth0 = result["interfaces"]
    assert re.fullmatch(r"veth[0-9a-f]{8}", veth["name"]), veth
    assert eth0["sandbox"] == f"/run/netns/{pod_of(eth0['sandbox'])}"
    return {
        "cniVersion": result["cniVersion"],
        "interfaces": [sorted(bridge), sorted(veth), sorted(eth0), bridge["name"], eth0["name"]],
        "ips": result["ips"],
        "routes": result["routes"],
        "dns": result.get("dns"),
    }


def _possible_cpus() -> int:
    with open("/sys/devices/system/cpu/possible") as f:
        spans = [span.split("-") for span in f.read().strip().split(",")]
    return sum(int(span[-1]) - int(span[0]) + 1 for span in spans)


def _older(version: str, than: str) -> bool:
    return tuple(map(int, version.split("."))) < tuple(map(int, than.split(".")))


def _differences(ref: dict[str, Any], ours: dict[str, Any], pods: tuple[str, ...], version: str) -> None:
    """Check the differences docs/configuration.md documents, then drop them: the rest must be equal.
    `version` is the reference plugins' (1.1.1, 1.9.1): the pod's eth0 txqlen is 0 with 1.1.1, the
    kernel's default 1000 with 1.9.1, as with pybridge."""
    for side, queues in ((ref, _possible_cpus()), (ours, 1)):  # veth queues allocated, both ends
        for cid in pods:
            for end in ("veth", "eth0"):
                assert (side[cid][end].pop("num_tx_queues"), side[cid][end].pop("num_rx_queues")) == (
                    queues, queues), (cid, end)
    ref_eth0_txqlen = 0 if _older(version, "1.9") else 1000
    for side, veth_txqlen, eth0_txqlen in ((ref, 0, ref_eth0_txqlen), (ours, 1000, 1000)):  # queue lengths
        for cid in pods:
            assert side[cid]["veth"].pop("txqlen", 0) == veth_txqlen, cid
            assert side[cid]["eth0"].pop("txqlen", 0) == eth0_txqlen, cid
    for side, nodad in ((ref, None), (ours, True)):  # IPv6 gateway on the bridge: DAD skipped
        v6 = [a for a in side["bridge_addrs"] if a["family"] == "inet6"]
        assert [a.pop("nodad", None) for a in v6] == [nodad]
    for side, off in ((ref, "0"), (ours, "1")):  # pybridge's host veths have no IPv6 of their own
        for cid in pods:
            assert side[cid].pop("veth_ipv6_off") == off
    for side, knobs in ((ref, ["1", "1"]), (ours, ["0", "0"])):  # pybridge's pods take no RA, no SLAAC
        for cid in pods:
            assert side[cid].pop("router_knobs") == knobs, cid
    # pybridge filters each port to its pod's own sources (sourceCheck); the reference does not.
    assert (ref.pop("port_chains"), ours.pop("port_chains")) == (0, len(pods))
    # The reference bridge keeps its own MAC; pybridge's takes its first port's and pins it.
    first_port_present = "par-a" in pods
    assert (ref.pop("bridge_mac_is_a_port_mac"), ours.pop("bridge_mac_is_a_port_mac")) == (
        False, first_port_present)


def test_reference_and_pybridge_leave_the_same_results_and_kernel_state(
    make_host: Callable[[str], Host], make_libcni: Callable[..., Libcni], reference: Path
) -> None:
    version = sid.plugins_version(reference)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    states: dict[str, dict[str, Any]] = {}
    after_del: dict[str, dict[str, Any]] = {}
    for side, (plugin, ipam) in SIDES.items():
        host = make_host(f"par{side[:3]}")
        libcni = make_libcni(host, reference=reference)
        net = libcni.write(_conf(host, plugin, ipam))
        pods = {cid: host.new_pod() for cid in PODS}
        results[side] = {cid: libcni.ok("add", net, pods[cid], container_id=cid) for cid in PODS}
        for cid in PODS:
            check = libcni.run("check", net, pods[cid], container_id=cid)
            if side == "reference" and _older(version, "1.9"):
                assert b"Expected Route {Dst:{IP:198.51.100.0" in check.stderr, check.stderr
            else:
                assert check.ok, (side, check.stderr)
        ip_b = results[side]["par-b"]["ips"][0]["address"].split("/")[0]
        assert host.ping(pods["par-a"], ip_b), side
        states[side] = _state(host, results[side])
        libcni.ok("del", net, pods["par-a"], container_id="par-a")
        after_del[side] = _state(host, {"par-b": results[side]["par-b"]})
        libcni.ok("del", net, pods["par-b"], container_id="par-b")
        assert host.reservations("parity") == {}

    ref, ours = results["reference"], results["pybridge"]
    for cid in PODS:
        shape = {side: _result_shape(results[side][cid], lambda s: s.rsplit("/", 1)[1]) for side in SIDES}
        assert shape["pybridge"] == shape["reference"], cid
        assert ours[cid]["ips"] == ref[cid]["ips"]
    _differences(states["reference"], states["pybridge"], PODS, version)
    assert states["pybridge"] == states["reference"]
    # After par-a's DEL: one port left, the bridge and its gateway addresses stay on both sides.
    _differences(after_del["reference"], after_del["pybridge"], ("par-b",), version)
    assert after_del["pybridge"] == after_del["reference"]
    assert after_del["pybridge"]["ports"] == ["forwarding"]
