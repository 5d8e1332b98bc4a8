"""The netpol tables in the kernel: replaced or removed by one nft transaction.

nft commits a whole script atomically (all of it or none), and the script deletes and defines
the tables in that one commit, so there is never a moment with no rules or half of them.

Scripts run through libnftables in this process (libnft.py, the kept context) where the library
is there: a policy's change then costs ~8 ms instead of ~24-37 ms for exec'ing nft (its start and
its own cache listing; measured side by side at 500 pods and 200 policies, docs/performance.md).
The wait stays bounded: a call that does not answer in time fails this apply (NftError); until it
returns, later applies fail at the library's lock within their deadline, and the policy loop tries
again after a backoff. Nothing else changes the tables meanwhile (after a failure the loop sends
no element batch, policy_controller.py), and its first apply after the call returned replaces the
tables whole, so a late commit of the hung call cannot stay in force.
"""

from __future__ import annotations

from collections.abc import Sequence

from ... import nft as nftables
from ...nft import NftError as NftError  # the one nft error; the controllers catch it from here
from . import nft

# Bridged pod-to-pod packets reach the inet forward hook only with these on (per netns).
BRIDGE_SYSCTLS = ("net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-ip6tables")


def replace(script: str, command: Sequence[str] | None = None, check_only: bool = False) -> None:
    """`command` is the nft to exec (default: libnftables in this process, else the nft on PATH;
    in the calling thread's netns). NftError when nft fails, is missing or does not finish in time."""
    nftables.run(script, check=check_only, command=command, in_process=True)


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
