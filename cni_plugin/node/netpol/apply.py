"""The netpol tables in the kernel: replaced or removed by one `nft -f` transaction.

nft commits a whole script atomically (all of it or none), and the script deletes and defines
the tables in that one commit, so there is never a moment with no rules or half of them.
"""

from __future__ import annotations

from collections.abc import Sequence

from ... import nft as nftables
from ...nft import NftError as NftError  # the one nft error; the controllers catch it from here
from . import nft

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
