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


def _copy(ipam_result: Result) -> Result:
    """A copy plan() may complete without touching the caller's: new IP entries (it sets their
    interface and gateway) and new lists; the routes and DNS, which it never changes, are shared.
    (A deep model copy cost more than the rest of plan() on every ADD.)"""
    return ipam_result.model_copy(update={
        "ips": [ip.model_copy() for ip in ipam_result.ips],
        "routes": list(ipam_result.routes),
        "interfaces": list(ipam_result.interfaces),
    })


def plan(conf: BridgeConf, ipam_result: Result) -> Plan:
    result = _copy(ipam_result)
    # Each address parsed once: ipaddress parsing was most of what plan() cost an ADD.
    addrs = [ipaddress.ip_interface(ip.address) for ip in result.ips]
    gateways: dict[int, IPInterface] = {}
    for ip, iface in zip(result.ips, addrs, strict=True):
        ip.interface = POD_INDEX
        if ip.gateway is None and conf.is_gateway:
            ip.gateway = str(iface.network.network_address + 1)
        if ip.gateway and iface.version not in gateways:
            gateways[iface.version] = ipaddress.ip_interface((ip.gateway, iface.network.prefixlen))
    families = [ipaddress.ip_network(route.dst).version for route in result.routes]
    routes = [(route.dst, route.gw or _gateway_ip(gateways, family))
              for route, family in zip(result.routes, families, strict=True)]
    if conf.is_default_gateway:
        have = {family for route, family in zip(result.routes, families, strict=True)
                if route.dst.endswith("/0")}
        for family, gateway in sorted(gateways.items()):
            if family not in have:  # IPAM gave none for this family
                dst, gw = "0.0.0.0/0" if family == 4 else "::/0", str(gateway.ip)
                # Both canonical, made here: the model's validators would only parse them again.
                result.routes.append(Route.model_construct(dst=dst, gw=gw))
                routes.append((dst, gw))
    return Plan(result, addrs, routes, gateways)


def _gateway_ip(gateways: dict[int, IPInterface], family: int) -> str | None:
    return str(gateways[family].ip) if family in gateways else None
