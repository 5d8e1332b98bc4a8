"""The netpol tables in the kernel: replaced or removed by one `nft -f` transaction; the bridge
ports the bridge table keys on, read from the kernel.

nft commits a whole script atomically (all of it or none), and the script deletes and defines
the tables in that one commit, so there is never a moment with no rules or half of them.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence

from ... import nft as nftables
from ... import rtnl
from ...netlink import NetlinkError
from ...nft import NftError as NftError  # the one nft error; the controllers catch it from here
from . import nft
from .objects import Address

# Bridged pod-to-pod packets reach the inet forward hook only with these on (per netns).
BRIDGE_SYSCTLS = ("net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-ip6tables")


def replace(script: str, command: Sequence[str] | None = None, check_only: bool = False) -> None:
    """`command` is the nft invocation (default: the nft on PATH, in this process's netns).
    NftError when nft fails, is missing or does not finish in time."""
    nftables.run(script, check=check_only, command=command)


def remove(command: Sequence[str] | None = None) -> None:
    replace(nft.removal(), command)


def enable_bridge_netfilter(proc_sys: str = "/proc/sys") -> list[str]:
    """Turn the bridge sysctls on in this netns where they are off (1 is the default in a new
    netns; /proc/sys is read-only in an unprivileged container); an error text per one left off."""
    errors = []
    for name in BRIDGE_SYSCTLS:
        path = f"{proc_sys}/{name}"
        try:
            with open(path) as f:
                if f.read().strip() == "1":
                    continue
            with open(path, "w") as f:
                f.write("1\n")
        except OSError as exc:
            errors.append(f"{name}: {exc}")
    return errors


def pod_ports(open_socket: Callable[[], rtnl.Socket] = rtnl.Socket,
              bridge: str | None = None) -> dict[Address, set[str]]:
    """Each address on the pod side of a bridge port (a veth whose peer is in another netns),
    with the ports it is on: what the bridge table keys policy on (nft.py). Read in the netns
    of the socket (default: this process's), without entering the pods' netns. With `bridge`,
    the ports of that bridge only (none if it does not exist)."""
    found: dict[Address, set[str]] = {}
    with open_socket() as sock:
        master = None
        if bridge is not None:
            link = sock.link_by_name(bridge)
            if link is None:
                return found
            master = link.index
        for link, nsid in sock.bridge_ports():
            if master is not None and link.master != master:
                continue
            try:
                addresses = sock.peer_addresses(nsid, link.peer_index or 0)
            except NetlinkError as exc:
                if exc.errno in (errno.EINVAL, errno.ENODEV):  # the pod's netns went away meanwhile
                    continue
                raise  # EACCES without CAP_NET_ADMIN: said by the agent, never taken for "no pods"
            for address in addresses:
                found.setdefault(address.ip, set()).add(link.name)
    return found
