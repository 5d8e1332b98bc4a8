"""What ADD puts on the pod and the bridge, from the config and the IPAM result alone (pure).

The IPAM result is completed here, once, into the plugin's result: each IP on the pod interface,
the gateway isGateway implies, the default routes isDefaultGateway asks for.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from cnikit.ip import IPInterface
from cnikit.spec.result import Result, Route

from .config import BridgeConf

POD_INDEX = 2  # interfaces are [bridge, host veth, pod]


@dataclass(frozen=True)
class Plan:
    result: Result  # the IPAM result completed (interfaces are added once the links exist)
    addrs: list[IPInterface]  # on the pod interface
    routes: list[tuple[str, str | None]]  # (destination, gateway) in the pod
    gateways: dict[int, IPInterface]  # per family, with the pod subnet's prefix: on the bridge


def plan(conf: BridgeConf, ipam_result: Result) -> Plan:
    result = ipam_result.model_copy(deep=True)
    gateways: dict[int, IPInterface] = {}
    addrs: list[IPInterface] = []  # each address parsed once, here: the netlink layer takes these
    for ip in result.ips:
        ip.interface = POD_INDEX
        iface = ipaddress.ip_interface(ip.address)
        addrs.append(iface)
        if ip.gateway is None and conf.is_gateway:
            ip.gateway = str(iface.network.network_address + 1)
        if ip.gateway and iface.version not in gateways:
            gateways[iface.version] = ipaddress.ip_interface(f"{ip.gateway}/{iface.network.prefixlen}")
    if conf.is_default_gateway:
        result.routes.extend(_default_routes(result, gateways))
    return Plan(result, addrs, _pod_routes(result, gateways), gateways)


def _default_routes(result: Result, gateways: dict[int, IPInterface]) -> list[Route]:
    """A default route per family with a gateway, unless IPAM gave one already."""
    have = {net.version for net in map(ipaddress.ip_network, (r.dst for r in result.routes))
            if net.prefixlen == 0}
    return [Route(dst="0.0.0.0/0" if family == 4 else "::/0", gw=str(gateway.ip))
            for family, gateway in sorted(gateways.items()) if family not in have]


def _pod_routes(result: Result, gateways: dict[int, IPInterface]) -> list[tuple[str, str | None]]:
    out = []
    for route in result.routes:
        family = ipaddress.ip_network(route.dst).version
        gw = route.gw or (str(gateways[family].ip) if family in gateways else None)
        out.append((route.dst, gw))
    return out
