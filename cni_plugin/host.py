"""The kernel to the verbs: the one object an ADD, DEL, CHECK, STATUS or GC is handed
(`Request.host`) for links, addresses and routes (netlink), network namespaces, sysctls and each
attachment's nftables (or iptables) rules.

`Kernel` is the real one: rtnl.py's netlink (pyroute2 behind it off the hot path), netns.py's
workers, sysctl.py's /proc/sys, masq.py's and sourcecheck.py's rules. The unit tier serves the
verbs with an in-memory model instead (tests/unit/cni_plugin/fakehost.py), handed in the same way.

What a host remembers between calls is its own, not a module's: a long-lived caller (the agent)
keeps one `Kernel` for all its calls; a one-shot call makes one for itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

from cnikit.ip import IPInterface

from . import netns, rtnl, sysctl
from .netlink import Netlink

if TYPE_CHECKING:
    from cnikit.removals import Removals

    from . import sourcecheck

T = TypeVar("T")


class Host(Protocol):
    # (bridge index, name) -> the MAC pinned on it (link.pin_mac): a MAC once set stays pinned,
    # and a bridge made again gets a new index, so a bridge still showing it needs no write.
    pinned: dict[tuple[int, str], str]

    # --- netlink and netns ---------------------------------------------------------------
    def netlink(self) -> Netlink:
        """A socket in the calling thread's netns; the caller closes it."""
    def open_netns(self, path: str) -> int:
        """A netns fd by path; netns.NetnsGone if there is none."""
    def reopen_netns(self, fd: int, path: str) -> int:
        """A new fd for the netns a caller sent as `fd`; netns.NetnsGone if it is no netns."""
    def same_netns(self, fd: int) -> bool:
        """Is `fd` the calling thread's netns?"""
    def run_in(self, fd: int, func: Callable[[], T]) -> T:
        """`func`'s result, run in a thread that entered netns `fd`."""

    # --- sysctls, below /proc/sys (or below a directory `sysctl_dir` opened) -------------
    def sysctl_dir(self, base: str) -> int | None:
        """`base` of the calling thread's netns, for `dir_fd=`; None if absent. Caller closes."""
    def sysctl_write(self, key: str, value: str, dir_fd: int | None = None) -> None: ...
    def sysctl_try_write(self, key: str, value: str, dir_fd: int | None = None) -> bool:
        """For knobs that may be absent: False where the write failed."""
    def sysctl_ensure(self, key: str, value: str) -> None:
        """Write only when different (a knob shared by every pod)."""

    # --- each attachment's rules: masquerade and the port's source check -----------------
    def masq_setup(self, network: str, container_id: str, ifname: str,
                   addrs: Sequence[IPInterface], backend: str | None) -> None: ...
    def masq_teardown(self, network: str, container_id: str, ifname: str) -> None: ...
    def masq_in_effect(self, network: str, container_id: str, ifname: str) -> bool: ...
    def masq_gc(self, network: str, valid: set[tuple[str, str]]) -> list[str]: ...
    def port_check_setup(self, network: str, container_id: str, ifname: str, port: str, mac: str,
                         addrs: Sequence[IPInterface], ipv6: bool) -> None: ...
    def port_check_teardown(self, network: str, container_id: str, ifname: str,
                            port: str | None = None, later: Removals | None = None) -> None:
        """`port`: the attachment's host port, verified by DEL (link.verified_host_end); with
        it, `later` (the agent's removals) may do the teardown after DEL's answer."""
    def port_check_in_effect(self, network: str, container_id: str, ifname: str) -> bool: ...
    def port_check_gc(self, network: str, valid: set[tuple[str, str]]) -> list[str]: ...


class Kernel:
    """The host the process runs on. masq.py and sourcecheck.py are imported by the first call
    that has rules (a one-shot call without ipMasq or sourceCheck never loads them)."""

    def __init__(self) -> None:
        self.pinned: dict[tuple[int, str], str] = {}
        self.port_teardowns: sourcecheck.Teardowns | None = None  # DEL's, queued for `later`

    def netlink(self) -> Netlink:
        return rtnl.Socket()

    def open_netns(self, path: str) -> int:
        return netns.open_netns(path)

    def reopen_netns(self, fd: int, path: str) -> int:
        return netns.reopen(fd, path)

    def same_netns(self, fd: int) -> bool:
        return netns.same_netns(fd)

    def run_in(self, fd: int, func: Callable[[], T]) -> T:
        return netns.run_in(fd, func)

    def sysctl_dir(self, base: str) -> int | None:
        return sysctl.open_dir(base)

    def sysctl_write(self, key: str, value: str, dir_fd: int | None = None) -> None:
        sysctl.write(key, value, dir_fd)

    def sysctl_try_write(self, key: str, value: str, dir_fd: int | None = None) -> bool:
        return sysctl.try_write(key, value, dir_fd)

    def sysctl_ensure(self, key: str, value: str) -> None:
        sysctl.ensure(key, value)

    def masq_setup(self, network: str, container_id: str, ifname: str,
                   addrs: Sequence[IPInterface], backend: str | None) -> None:
        from . import masq

        masq.setup(network, container_id, ifname, addrs, backend)

    def masq_teardown(self, network: str, container_id: str, ifname: str) -> None:
        from . import masq

        masq.teardown(network, container_id, ifname)

    def masq_in_effect(self, network: str, container_id: str, ifname: str) -> bool:
        from . import masq

        return masq.attachment_has_rules(network, container_id, ifname)

    def masq_gc(self, network: str, valid: set[tuple[str, str]]) -> list[str]:
        from . import masq

        return masq.gc(network, valid)

    def port_check_setup(self, network: str, container_id: str, ifname: str, port: str, mac: str,
                         addrs: Sequence[IPInterface], ipv6: bool) -> None:
        from . import sourcecheck

        sourcecheck.setup(network, container_id, ifname, port, mac, addrs, ipv6)

    def port_check_teardown(self, network: str, container_id: str, ifname: str,
                            port: str | None = None, later: Removals | None = None) -> None:
        from . import sourcecheck

        if later is not None and port is not None:
            if self.port_teardowns is None:
                self.port_teardowns = sourcecheck.Teardowns()
            if self.port_teardowns.add(network, container_id, ifname, port):
                later.submit(self.port_teardowns.run)  # one run for all queued by then
                return
        sourcecheck.teardown(network, container_id, ifname, port)

    def port_check_sweep(self) -> None:
        """The chains of ports gone with no teardown (sourcecheck.sweep): at an agent's start."""
        from . import sourcecheck

        def names() -> set[str]:
            with rtnl.Socket() as sock:
                return {link.name for link in sock.links()}

        sourcecheck.sweep(names)

    def port_check_in_effect(self, network: str, container_id: str, ifname: str) -> bool:
        from . import sourcecheck

        return sourcecheck.attachment_has_rules(network, container_id, ifname)

    def port_check_gc(self, network: str, valid: set[tuple[str, str]]) -> list[str]:
        from . import sourcecheck

        return sourcecheck.gc(network, valid)
