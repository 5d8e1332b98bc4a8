"""CHECK: compare what is on the links with the ADD result the runtime kept (prevResult)."""

from __future__ import annotations

import ipaddress

from cnikit.spec.errors import INTERNAL, INVALID_CONFIG, CNIError
from cnikit.spec.result import Interface, Result

from . import link
from .config import BridgeConf
from .host import Host
from .netlink import Link, Netlink


def _drift(what: str, details: str) -> CNIError:
    return CNIError(INTERNAL, f"CHECK failed: {what}", details)


def _find(prev: Result, name: str, sandbox: str | None) -> tuple[int, Interface]:
    for i, iface in enumerate(prev.interfaces):
        if iface.name == name and (iface.sandbox or None) == sandbox:
            return i, iface
    where = f"in sandbox {sandbox}" if sandbox else "on the host"
    raise CNIError(INVALID_CONFIG, "prevResult does not list the interface", f"{name} {where}")


def _verify_bridge(ipr: Netlink, conf: BridgeConf, prev: Result) -> Link:
    bridge = link.find(ipr, conf.bridge)
    if bridge is None or bridge.kind != "bridge":
        raise _drift("bridge missing", f"{conf.bridge} does not exist or is not a bridge")
    _, expected = _find(prev, conf.bridge, None)
    if expected.mac and expected.mac.lower() != bridge.mac.lower():
        raise _drift("bridge MAC changed", f"{conf.bridge}: {bridge.mac} != {expected.mac}")
    if bridge.promisc != conf.promisc_mode:
        raise _drift("bridge promiscuous mode differs", f"{conf.bridge}: promisc={bridge.promisc}")
    return bridge


def _verify_host_veth(
    ipr: Netlink, conf: BridgeConf, prev: Result, bridge: Link, pod: Link
) -> None:
    for iface in prev.interfaces:
        if iface.sandbox or iface.name == conf.bridge:
            continue
        host = link.find(ipr, iface.name)
        if host is None or host.kind != "veth" or host.index != pod.peer_index:
            continue
        if host.master != bridge.index:
            raise _drift("host veth not on the bridge", f"{host.name} is not a port of {bridge.name}")
        if conf.hairpin_mode and not ipr.brport_hairpin(host.index):
            raise _drift("hairpin mode off", host.name)
        return
    raise _drift("host veth missing", f"no host veth in prevResult is the peer of {pod.name}")


def verify(host: Host, conf: BridgeConf, prev: Result, path: str, ifname: str, pod_fd: int) -> None:
    pod_pos, expected_pod = _find(prev, ifname, path)
    state = host.run_in(pod_fd, lambda: link.pod_state(host, ifname))
    if state is None:
        raise _drift("interface missing", f"{ifname} not found in {path}")
    if state.link.kind != "veth":
        raise _drift("interface is not a veth", f"{ifname} is a {state.link.kind or 'device'}")
    if expected_pod.mac and expected_pod.mac.lower() != state.link.mac.lower():
        raise _drift("interface MAC changed", f"{ifname}: {state.link.mac} != {expected_pod.mac}")
    for ip in prev.ips:
        if ip.interface == pod_pos and ipaddress.ip_interface(ip.address) not in state.addrs:
            raise _drift("address missing", f"{ip.address} not on {ifname}")
    for route in prev.routes:
        matching = [gw for d, gw in state.routes if d == route.dst]  # both as networks
        gws = {ipaddress.ip_address(gw) for gw in matching if gw}
        if not matching or (route.gw and ipaddress.ip_address(route.gw) not in gws):
            raise _drift("route missing", f"{route.dst} via {route.gw or '(gateway)'} not in {path}")
    with link.netlink(host) as ipr:
        bridge = _verify_bridge(ipr, conf, prev)
        _verify_host_veth(ipr, conf, prev, bridge, state.link)
