"""The IP type aliases every package uses (an address, a network, an address with its prefix),
and the two parsers of addresses and CIDRs that configs and results share. They read what Go's
net.ParseIP and net.ParseCIDR read, as the reference plugins and libcni do."""

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


def parse_ip(value: object) -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    if not isinstance(value, str):
        raise ValueError("an IP address string is required")
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError("not an IP address") from None
    # A zone ("fe80::1%eth0") would end up in a file name and means nothing to a pool or route.
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise ValueError("a scoped IPv6 address is not allowed")
    return ip


def parse_cidr(value: object, *, strict: bool) -> IPNetwork:
    """An address/prefix string as its network (Go's ParseCIDR); `strict` refuses host bits."""
    if not isinstance(value, str) or "/" not in value:
        raise ValueError("a CIDR string (address/prefix) is required")
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        raise ValueError("not a CIDR") from None
    if strict and iface.ip != iface.network.network_address:
        raise ValueError(
            f"network has host bits set; for a prefix of length {iface.network.prefixlen}"
            f" the network address is {iface.network.network_address}"
        )
    return iface.network
